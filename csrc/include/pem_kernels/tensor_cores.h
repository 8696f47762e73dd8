// Tensor-core helpers shared by the CUDA kernels: WMMA (<mma.h>) TF32 and bf16 fragments, which
// need compute capability 8.0 or newer.
//
// PEM_TENSOR_CORES is defined where those fragments exist: in host passes, in device passes for
// sm_80 and newer, and in the CPU emulation of the CUDA sources (tests/cuda_emulation, which
// provides nvcuda::wmma itself). Kernels that use them compile to a trap for older targets, and
// the host launches them only where tensor_core_code() says their code has the tensor cores.
#pragma once

#ifndef PEM_CUDA_EMULATION
#include <cuda_bf16.h>
#include <mma.h>
#endif

#include <map>
#include <mutex>
#include <tuple>

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PEM_TENSOR_CORES 1
#endif

namespace pem_kernels {

namespace wmma = nvcuda::wmma;

// Whether `kernel`, a kernel using the fragments below, runs with them on the current device:
// compute capability 8.0 or newer, and the binary's code for this device compiled for a virtual
// architecture of 8.0 or newer. A build whose only code for the device is an older
// architecture's PTX (say TORCH_CUDA_ARCH_LIST="7.5+PTX" on an H100) JIT-compiles the kernel from
// code without PEM_TENSOR_CORES, whose launch would trap and lose the CUDA context; the callers
// take their FMA kernels instead. Asked of the driver once per kernel and compute capability
// (the code a device runs depends on its minor too: sm_86 code does not run on an sm_80 GPU, which
// may fall back to older PTX); in the CPU emulation every time, so that a test can change the
// emulated build.
template <typename Kernel>
bool tensor_core_code(Kernel* kernel) {
  const cudaDeviceProp* properties = at::cuda::getCurrentDeviceProperties();
  if (properties->major < 8) return false;
  const auto ask = [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    return attributes.ptxVersion >= 80;
  };
#ifdef PEM_CUDA_EMULATION
  return ask();
#else
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int>, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel),
                                   10 * properties->major + properties->minor);
  const auto found = known.find(key);
  return found != known.end() ? found->second : known[key] = ask();
#endif
}

// x rounded to TF32 (to nearest, ties away from zero, 10 mantissa bits kept).
__device__ __forceinline__ float round_to_tf32(float x) {
#ifdef PEM_TENSOR_CORES
  return wmma::__float_to_tf32(x);
#else
  return x;  // never called: see above
#endif
}

// Splits a loaded fp32 fragment into its TF32 part (in place) and, for 3xTF32 (kPasses = 3), the
// TF32 remainder; elementwise, so the fragments' unspecified layout does not matter.
template <int kPasses, typename Fragment>
__device__ __forceinline__ void split_tf32(Fragment& big, Fragment& small) {
#pragma unroll
  for (int e = 0; e < Fragment::num_elements; ++e) {
    const float value = big.x[e];
    big.x[e] = round_to_tf32(value);
    if constexpr (kPasses == 3) small.x[e] = round_to_tf32(value - big.x[e]);
  }
}

}  // namespace pem_kernels

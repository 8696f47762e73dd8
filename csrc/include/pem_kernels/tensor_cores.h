// Tensor-core helpers shared by the CUDA kernels: WMMA (<mma.h>) TF32 and bf16 fragments, which
// need compute capability 8.0 or newer.
//
// PEM_TENSOR_CORES is defined where those fragments exist: in host passes, in device passes for
// sm_80 and newer, and in the CPU emulation of the CUDA sources (tests/cuda_emulation, which
// provides nvcuda::wmma itself). Kernels that use them compile to a trap for older targets, and
// the host launches them only on devices of compute capability 8.0 or newer.
#pragma once

#ifndef PEM_CUDA_EMULATION
#include <cuda_bf16.h>
#include <mma.h>
#endif

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PEM_TENSOR_CORES 1
#endif

namespace pem_kernels {

namespace wmma = nvcuda::wmma;

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

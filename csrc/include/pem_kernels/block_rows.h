// Device helpers of the CUDA kernels in which a block of kRowThreads threads owns one row of
// PEM-CA's [B, N, C] query tensors (csrc/cuda/query_projection.cu, prototype_attention.cu): a
// deterministic block-wide sum and a row-times-Linear product. N is a few hundred rows and C a few
// hundred channels in PEM, so a row's vectors live in shared memory and the weights stream from
// L2; what these kernels save is launches (one where the unfused ops take six to ten), not FLOPs.
#pragma once

#include <cstdint>

namespace pem_kernels {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

// The sum of every thread's `value`, returned to all threads; `scratch` holds kRowWarps values.
// The lanes reduce with shuffles and lane 0's result stands for the warp; the warps' results are
// then added in warp order, so the rounding is the same on every run.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kRowWarps; ++w) total += scratch[w];
  __syncthreads();  // the next call writes scratch again
  return total;
}

// out[o] = bias[o] + weight[o, :] . in for o < out_channels (nn.Linear's layout, weight
// [out_channels, in_channels] row-major), `in` in shared memory. Warp w takes outputs
// w, w + kRowWarps, ..., its lanes consecutive input channels, so each weight row is read in
// coalesced segments; lane 0's sum (a fixed order) is stored. The caller synchronizes before
// reading `out`.
template <typename scalar_t, typename acc_t>
__device__ void row_linear(const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                           const acc_t* in, int64_t in_channels, int64_t out_channels,
                           acc_t* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t o = warp; o < out_channels; o += kRowWarps) {
    const scalar_t* weight_row = weight + o * in_channels;
    acc_t dot = 0;
    for (int64_t c = lane; c < in_channels; c += 32) {
      dot += static_cast<acc_t>(weight_row[c]) * in[c];
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    }
    if (lane == 0) out[o] = dot + static_cast<acc_t>(bias[o]);
  }
}

}  // namespace pem_kernels

// PEM-CA's query projection on CUDA, fused for inference (mirrors
// csrc/cpu/query_projection.cpp):
//
//   queries[b, q, :] = l2norm(weight @ LayerNorm(tgt[q, b, :] + query_pos[q, b, :]) + bias)
//
// the official layer's F.normalize(query_proj(tgt + query_pos)) with query_proj = LayerNorm ->
// Linear. Unfused that is six launches on a few hundred rows (the add, LayerNorm, the Linear, and
// F.normalize's norm, clamp and division), each costing the host more than the GPU; here it is
// one. A block owns one row (a (query, image) pair): it keeps the row's LayerNorm (two passes:
// the mean, then the centered squares) and its projection in shared memory, each warp takes
// output channels w, w + 8, ... with its lanes on consecutive input channels (row_linear in
// pem_kernels/block_rows.h), and the row is divided by its L2 norm (max(norm, 1e-12), a NaN norm kept NaN) and
// rounded once into [B, Q, C_out]. Everything in acc_t with IEEE products, so fp32 matches the
// Linear under torch's default "highest" precision; every sum is taken in a fixed order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "pem_kernels/block_rows.h"
#include "pem_kernels/check.h"
#include "pem_kernels/query_projection_checks.h"

namespace pem_kernels {
namespace {

// F.normalize's eps: rows are divided by max(||row||, eps).
constexpr double kNormalizeEps = 1e-12;

// One block per row r = q * B + b of tgt [Q, B, C]; out [B, Q, C_out].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads) query_projection_kernel(
    const scalar_t* __restrict__ tgt, const scalar_t* __restrict__ pos,
    const scalar_t* __restrict__ ln_weight, const scalar_t* __restrict__ ln_bias, acc_t ln_eps,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, int64_t batch,
    int64_t queries, int64_t channels, int64_t out_channels, scalar_t* __restrict__ out) {
  __shared__ acc_t normed[kQueryProjectionMaxChannels];
  __shared__ acc_t projected[kQueryProjectionMaxChannels];
  __shared__ acc_t scratch[kRowWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* x = tgt + row * channels;
  const scalar_t* p = pos == nullptr ? nullptr : pos + row * channels;
  // 1. LayerNorm. A thread reads and rewrites the same channels in every pass, so its own
  // normed[] entries need no barrier between the passes.
  acc_t sum = 0;
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    acc_t value = static_cast<acc_t>(x[c]);
    if (p != nullptr) value += static_cast<acc_t>(p[c]);
    normed[c] = value;
    sum += value;
  }
  const acc_t mean = block_sum(sum, scratch) / static_cast<acc_t>(channels);
  acc_t squares = 0;
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    squares += (normed[c] - mean) * (normed[c] - mean);
  }
  const acc_t variance = block_sum(squares, scratch) / static_cast<acc_t>(channels);
  const acc_t rstd = acc_t(1) / std::sqrt(variance + ln_eps);
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    normed[c] = (normed[c] - mean) * rstd * static_cast<acc_t>(ln_weight[c]) +
        static_cast<acc_t>(ln_bias[c]);
  }
  __syncthreads();
  // 2. The Linear.
  row_linear(weight, bias, normed, channels, out_channels, projected);
  __syncthreads();
  // 3. The row over its L2 norm, to row (b, q) of the output.
  acc_t row_squares = 0;
  for (int64_t o = threadIdx.x; o < out_channels; o += kRowThreads) {
    row_squares += projected[o] * projected[o];
  }
  const acc_t norm = std::sqrt(block_sum(row_squares, scratch));
  // Not fmax(eps, norm): a NaN norm must stay NaN, as in F.normalize.
  const acc_t divisor = norm < static_cast<acc_t>(kNormalizeEps) ? static_cast<acc_t>(kNormalizeEps) : norm;
  const int64_t q = row / batch, b = row % batch;
  scalar_t* dst = out + (b * queries + q) * out_channels;
  for (int64_t o = threadIdx.x; o < out_channels; o += kRowThreads) {
    dst[o] = static_cast<scalar_t>(projected[o] / divisor);
  }
}

at::Tensor query_projection_cuda(
    const at::Tensor& tgt_in, const std::optional<at::Tensor>& query_pos_in,
    const at::Tensor& ln_weight_in, const at::Tensor& ln_bias_in, double ln_eps,
    const at::Tensor& weight_in, const at::Tensor& bias_in) {
  check_query_projection_inputs(tgt_in, query_pos_in, ln_weight_in, ln_bias_in, ln_eps, weight_in,
                                bias_in);
  const c10::cuda::CUDAGuard device_guard(tgt_in.device());
  const at::Tensor tgt = tgt_in.detach().contiguous();
  const at::Tensor pos =
      query_pos_in.has_value() ? query_pos_in->detach().contiguous() : at::Tensor();
  const at::Tensor ln_weight = ln_weight_in.detach().contiguous();
  const at::Tensor ln_bias = ln_bias_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach().contiguous();
  const at::Tensor bias = bias_in.detach().contiguous();
  const int64_t queries = tgt.size(0), batch = tgt.size(1), channels = tgt.size(2);
  const int64_t rows = queries * batch, out_channels = weight.size(0);
  at::Tensor out = at::empty({batch, queries, out_channels}, tgt.options());
  if (out.numel() == 0) return out;
  PEM_CHECK(rows <= std::numeric_limits<int32_t>::max(), "query_projection: tgt of shape ",
            tgt.sizes(), " has more than 2^31 - 1 rows (Q * B)");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tgt.scalar_type(), "query_projection_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        query_projection_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
                tgt.const_data_ptr<scalar_t>(),
                pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr,
                ln_weight.const_data_ptr<scalar_t>(), ln_bias.const_data_ptr<scalar_t>(),
                static_cast<acc_t>(ln_eps), weight.const_data_ptr<scalar_t>(),
                bias.const_data_ptr<scalar_t>(), batch, queries, channels, out_channels,
                out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("query_projection", &query_projection_cuda);
}

}  // namespace pem_kernels

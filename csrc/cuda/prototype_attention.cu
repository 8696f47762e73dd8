// PEM-CA's prototype attention on CUDA for inference (pem_kernels::prototype_attention):
//
//   out = residual + W_out(alpha * l2norm(W_A(P * q) + b_A) + P) + b_out
//
// with l2norm F.normalize (eps 1e-12) over the query axis (the official code: every (image,
// channel) column over the N queries) or over the channels (the paper). The ATen composition
// (pem_kernels/reference/prototype_attention.py) is eight launches on a few hundred rows, each
// costing the host more than the GPU; here it is two, a block per (image, query) row:
//   1. hidden[b, n, :] = W_A (P * q)[b, n, :] + b_A, in acc_t;
//   2. the row's norm (over queries: each thread sums its channels' column over the image's N
//      rows in query order; over channels: a block sum), mixed = hidden / max(norm, eps) * alpha
//      + P in shared memory, and out = residual + W_out mixed + b_out, rounded once.
// The column norms need every row of step 1, hence two launches. fp32 with IEEE products, sums
// in a fixed order. No backward: pem_kernels/ops/prototype_attention.py runs it only where no
// gradient is recorded and the ATen composition everywhere else.

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
#include <utility>

#include "pem_kernels/block_rows.h"
#include "pem_kernels/check.h"

namespace pem_kernels {
namespace {

// Channels a row may have: a row's vectors are held in shared memory.
constexpr int64_t kMaxChannels = 1024;
// F.normalize's eps.
constexpr double kNormalizeEps = 1e-12;

void check_prototype_attention_inputs(
    const at::Tensor& prototypes, const at::Tensor& queries, const at::Tensor& residual,
    const at::Tensor& proj_weight, const at::Tensor& proj_bias, const at::Tensor& alpha,
    const at::Tensor& out_weight, const at::Tensor& out_bias) {
  PEM_CHECK(prototypes.dim() == 3, "prototype_attention: prototypes must be [B, N, C], got shape ",
            prototypes.sizes());
  PEM_CHECK(at::isFloatingType(prototypes.scalar_type()),
            "prototype_attention: prototypes must be a floating tensor, got dtype ",
            prototypes.scalar_type());
  const int64_t channels = prototypes.size(2);
  PEM_CHECK(channels <= kMaxChannels, "prototype_attention: at most ", kMaxChannels,
            " channels, got ", channels);
  for (const auto& [name, t] : {std::pair{"queries", &queries}, std::pair{"residual", &residual}}) {
    PEM_CHECK(t->sizes() == prototypes.sizes(), "prototype_attention: ", name,
              " must have prototypes' shape ", prototypes.sizes(), ", got ", t->sizes());
  }
  for (const auto& [name, t] :
       {std::pair{"proj_weight", &proj_weight}, std::pair{"out_weight", &out_weight}}) {
    PEM_CHECK(t->dim() == 2 && t->size(0) == channels && t->size(1) == channels,
              "prototype_attention: ", name, " must be [C, C] = [", channels, ", ", channels,
              "], got shape ", t->sizes());
  }
  for (const auto& [name, t] : {std::pair{"proj_bias", &proj_bias}, std::pair{"out_bias", &out_bias}}) {
    PEM_CHECK(t->dim() == 1 && t->size(0) == channels, "prototype_attention: ", name,
              " must be [C] = [", channels, "], got shape ", t->sizes());
  }
  PEM_CHECK(alpha.numel() == channels, "prototype_attention: alpha must have C = ", channels,
            " elements, got shape ", alpha.sizes());
  for (const auto& [name, t] :
       {std::pair{"queries", &queries}, std::pair{"residual", &residual},
        std::pair{"proj_weight", &proj_weight}, std::pair{"proj_bias", &proj_bias},
        std::pair{"alpha", &alpha}, std::pair{"out_weight", &out_weight},
        std::pair{"out_bias", &out_bias}}) {
    PEM_CHECK(t->scalar_type() == prototypes.scalar_type(), "prototype_attention: ", name,
              " dtype ", t->scalar_type(), " must equal prototypes dtype ",
              prototypes.scalar_type());
    PEM_CHECK(t->device() == prototypes.device(), "prototype_attention: ", name, " is on ",
              t->device(), ", expected prototypes' device ", prototypes.device());
  }
}

// Step 1, one block per row r = b * N + n: hidden[r, :] = W_A (P * q)[r, :] + b_A.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads) attention_hidden_kernel(
    const scalar_t* __restrict__ prototypes, const scalar_t* __restrict__ queries,
    const scalar_t* __restrict__ proj_weight, const scalar_t* __restrict__ proj_bias,
    int64_t channels, acc_t* __restrict__ hidden) {
  __shared__ acc_t product[kMaxChannels];
  const int64_t row = blockIdx.x;
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    product[c] = static_cast<acc_t>(prototypes[row * channels + c]) *
        static_cast<acc_t>(queries[row * channels + c]);
  }
  __syncthreads();
  row_linear(proj_weight, proj_bias, product, channels, channels, hidden + row * channels);
}

// Step 2, one block per row r = b * N + n of the output (strides out_strides, the layout of
// residual as the op's fake kernel gives it).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads) attention_output_kernel(
    const acc_t* __restrict__ hidden, const scalar_t* __restrict__ prototypes,
    const scalar_t* __restrict__ residual, const scalar_t* __restrict__ alpha,
    const scalar_t* __restrict__ out_weight, const scalar_t* __restrict__ out_bias,
    int64_t queries, int64_t channels, bool over_queries, int64_t out_stride_b,
    int64_t out_stride_n, int64_t out_stride_c, scalar_t* __restrict__ out) {
  __shared__ acc_t mixed[kMaxChannels];
  __shared__ acc_t result[kMaxChannels];
  __shared__ acc_t scratch[kRowWarps];
  const int64_t row = blockIdx.x, b = row / queries, n = row % queries;
  const acc_t* h = hidden + row * channels;
  const acc_t eps = static_cast<acc_t>(kNormalizeEps);
  acc_t row_divisor = 0;
  if (!over_queries) {
    acc_t squares = 0;
    for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) squares += h[c] * h[c];
    const acc_t norm = std::sqrt(block_sum(squares, scratch));
    // Not fmax(eps, norm): a NaN norm must stay NaN, as in F.normalize.
    row_divisor = norm < eps ? eps : norm;
  }
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    acc_t divisor = row_divisor;
    if (over_queries) {
      const acc_t* column = hidden + b * queries * channels + c;
      acc_t squares = 0;
      for (int64_t i = 0; i < queries; ++i) squares += column[i * channels] * column[i * channels];
      const acc_t norm = std::sqrt(squares);
      divisor = norm < eps ? eps : norm;
    }
    mixed[c] = h[c] / divisor * static_cast<acc_t>(alpha[c]) +
        static_cast<acc_t>(prototypes[row * channels + c]);
  }
  __syncthreads();
  row_linear(out_weight, out_bias, mixed, channels, channels, result);
  __syncthreads();
  for (int64_t c = threadIdx.x; c < channels; c += kRowThreads) {
    out[b * out_stride_b + n * out_stride_n + c * out_stride_c] =
        static_cast<scalar_t>(result[c] + static_cast<acc_t>(residual[row * channels + c]));
  }
}

at::Tensor prototype_attention_cuda(
    const at::Tensor& prototypes_in, const at::Tensor& queries_in, const at::Tensor& residual_in,
    const at::Tensor& proj_weight_in, const at::Tensor& proj_bias_in, const at::Tensor& alpha_in,
    const at::Tensor& out_weight_in, const at::Tensor& out_bias_in, bool normalize_over_queries) {
  check_prototype_attention_inputs(prototypes_in, queries_in, residual_in, proj_weight_in,
                                   proj_bias_in, alpha_in, out_weight_in, out_bias_in);
  const c10::cuda::CUDAGuard device_guard(prototypes_in.device());
  const at::Tensor prototypes = prototypes_in.detach().contiguous();
  const at::Tensor queries = queries_in.detach().contiguous();
  const at::Tensor residual = residual_in.detach().contiguous();
  const at::Tensor proj_weight = proj_weight_in.detach().contiguous();
  const at::Tensor proj_bias = proj_bias_in.detach().contiguous();
  const at::Tensor alpha = alpha_in.detach().reshape({-1}).contiguous();
  const at::Tensor out_weight = out_weight_in.detach().contiguous();
  const at::Tensor out_bias = out_bias_in.detach().contiguous();
  // residual's layout, as the fake kernel (empty_like(residual)) promises.
  at::Tensor out = at::empty_like(residual_in);
  if (out.numel() == 0) return out;
  const int64_t batch = prototypes.size(0), rows_per_image = prototypes.size(1);
  const int64_t channels = prototypes.size(2), rows = batch * rows_per_image;
  PEM_CHECK(rows <= std::numeric_limits<int32_t>::max(), "prototype_attention: prototypes of shape ",
            prototypes.sizes(), " have more than 2^31 - 1 rows (B * N)");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, prototypes.scalar_type(), "prototype_attention_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor hidden =
            at::empty({rows, channels}, prototypes.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        attention_hidden_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
                prototypes.const_data_ptr<scalar_t>(), queries.const_data_ptr<scalar_t>(),
                proj_weight.const_data_ptr<scalar_t>(), proj_bias.const_data_ptr<scalar_t>(),
                channels, hidden.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        attention_output_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
                hidden.const_data_ptr<acc_t>(), prototypes.const_data_ptr<scalar_t>(),
                residual.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
                out_weight.const_data_ptr<scalar_t>(), out_bias.const_data_ptr<scalar_t>(),
                rows_per_image, channels, normalize_over_queries, out.stride(0), out.stride(1),
                out.stride(2), out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("prototype_attention", &prototype_attention_cuda);
}

}  // namespace pem_kernels

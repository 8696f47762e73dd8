// PEM-CA's query projection on the CPU, fused for inference (mirrors
// csrc/cuda/query_projection.cu and pem_kernels/triton/query_projection.py):
//
//   queries[b, q, :] = l2norm(weight @ LayerNorm(tgt[q, b, :] + query_pos[q, b, :]) + bias)
//
// the official layer's F.normalize(query_proj(tgt + query_pos)) with query_proj = LayerNorm ->
// Linear: six ATen calls unfused (the add, LayerNorm, the Linear, and F.normalize's norm, clamp
// and division), one op here. Each row's LayerNorm is computed in acc_t (two passes: the mean,
// then the centered squares), one BLAS GEMM projects all rows, and each projected row is divided
// by its L2 norm (max(norm, 1e-12), a NaN norm kept NaN) and rounded once into [B, Q, C_out].

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "pem_kernels/parallel.h"
#include "pem_kernels/query_projection_checks.h"

namespace pem_kernels {
namespace {

// F.normalize's eps: rows are divided by max(||row||, eps).
constexpr double kNormalizeEps = 1e-12;
// Rows per at::parallel_for task: a row is a few hundred multiply-adds.
constexpr int64_t kRowGrain = 16;

template <typename scalar_t>
void query_projection_cpu_impl(
    const at::Tensor& tgt, const at::Tensor& pos, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double ln_eps, const at::Tensor& weight, const at::Tensor& bias,
    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t queries = tgt.size(0), batch = tgt.size(1), channels = tgt.size(2);
  const int64_t rows = queries * batch, out_channels = weight.size(0);
  const at::Tensor gamma_acc = ln_weight.to(acc_dtype).contiguous();
  const at::Tensor beta_acc = ln_bias.to(acc_dtype).contiguous();
  const acc_t* gamma = gamma_acc.const_data_ptr<acc_t>();
  const acc_t* beta = beta_acc.const_data_ptr<acc_t>();
  const scalar_t* x = tgt.const_data_ptr<scalar_t>();
  const scalar_t* p = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
  const acc_t eps = static_cast<acc_t>(ln_eps);

  // 1. normed[r, :] = LayerNorm(tgt + query_pos)[r, :], row r = q * B + b of tgt.
  at::Tensor normed = at::empty({rows, channels}, tgt.options().dtype(acc_dtype));
  acc_t* normed_data = normed.mutable_data_ptr<acc_t>();
  pem_kernels::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x_row = x + r * channels;
      const scalar_t* p_row = p == nullptr ? nullptr : p + r * channels;
      acc_t* row = normed_data + r * channels;
      acc_t sum = 0;
      for (int64_t c = 0; c < channels; ++c) {
        acc_t value = static_cast<acc_t>(x_row[c]);
        if (p_row != nullptr) value += static_cast<acc_t>(p_row[c]);
        row[c] = value;
        sum += value;
      }
      const acc_t mean = sum / static_cast<acc_t>(channels);
      acc_t squares = 0;
      for (int64_t c = 0; c < channels; ++c) squares += (row[c] - mean) * (row[c] - mean);
      const acc_t rstd = acc_t(1) / std::sqrt(squares / static_cast<acc_t>(channels) + eps);
      for (int64_t c = 0; c < channels; ++c) row[c] = (row[c] - mean) * rstd * gamma[c] + beta[c];
    }
  });
  // 2. The Linear over all rows, in acc_t (the GEMM the Linear runs, through torch's BLAS).
  const at::Tensor projected =
      at::addmm(bias.to(acc_dtype), normed, weight.to(acc_dtype).t());
  // 3. Each row over its L2 norm, rounded once, to row (b, q) of the output.
  const acc_t* projected_data = projected.const_data_ptr<acc_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  pem_kernels::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = projected_data + r * out_channels;
      acc_t squares = 0;
      for (int64_t j = 0; j < out_channels; ++j) squares += row[j] * row[j];
      const acc_t norm = std::sqrt(squares);
      // Not std::max(eps, norm): a NaN norm must stay NaN, as in F.normalize.
      const acc_t divisor = norm < static_cast<acc_t>(kNormalizeEps) ? static_cast<acc_t>(kNormalizeEps) : norm;
      const int64_t q = r / batch, b = r % batch;
      scalar_t* dst = out_data + (b * queries + q) * out_channels;
      for (int64_t j = 0; j < out_channels; ++j) dst[j] = static_cast<scalar_t>(row[j] / divisor);
    }
  });
}

at::Tensor query_projection_cpu(
    const at::Tensor& tgt_in, const std::optional<at::Tensor>& query_pos_in,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double ln_eps,
    const at::Tensor& weight, const at::Tensor& bias) {
  check_query_projection_inputs(tgt_in, query_pos_in, ln_weight, ln_bias, ln_eps, weight, bias);
  // ATen ops run on these internally (addmm, conversions); detached inputs keep them out of
  // autograd.
  const at::Tensor tgt = tgt_in.detach().contiguous();
  const at::Tensor pos =
      query_pos_in.has_value() ? query_pos_in->detach().contiguous() : at::Tensor();
  at::Tensor out = at::empty({tgt.size(1), tgt.size(0), weight.size(0)}, tgt.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tgt.scalar_type(), "query_projection_cpu", [&] {
        query_projection_cpu_impl<scalar_t>(tgt, pos, ln_weight.detach(), ln_bias.detach(),
                                            ln_eps, weight.detach(), bias.detach(), out);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CPU, m) {
  m.impl("query_projection", &query_projection_cpu);
}

}  // namespace pem_kernels

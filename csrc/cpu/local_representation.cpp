// PEM-CA's feature projection on the CPU, fused for inference (mirrors
// pem_kernels/triton/local_representation.py):
//
//   keys[b, p, :] = out_weight @ dwconv3x3(BN(memory + pos))[b, :, p] + out_bias
//
// with BN in eval mode as a per-channel affine and the depthwise conv's zero padding applied after
// BN (nn.Conv2d pads its BN-normalized input). Unfused, the chain makes four full passes over the
// [B, C, H, W] map (add, BN, conv, a Linear over a transposed view). Here each task takes a block
// of image rows: it builds the depthwise-conv tile [C, rows * W] in acc_t from the NCHW input (per
// channel the block's rows and the one above and below it are read once, BN'd into padded line
// buffers) and multiplies it by out_weight^T with one BLAS call straight into the output rows.
// Intermediates stay in acc_t, so fp16/bf16 results are rounded once. With normalize, each output row is L2-normalized in acc_t
// while it is still in cache (what prototype_select's normalize_keys would otherwise do per key tile).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "pem_kernels/local_representation_checks.h"
#include "pem_kernels/parallel.h"
#include "pem_kernels/simd.h"

namespace pem_kernels {
namespace {

// Pixels per task (whole image rows, at least one): each task's conv tile [C + 1, rows * W] and
// its GEMM result stay in the core's L2 (1 MiB each in fp32 at PEM's 256 channels), the GEMM is
// large enough for BLAS, and every BN'd source row is computed (rows + 2) / rows times instead of 3
// (one output row per task did that: 30% more time at 32768 pixels). Narrow maps (W = 8 at 1/32 of
// a 256-pixel-wide image) group many rows.
constexpr int64_t kTilePixels = 1024;
// F.normalize's eps: rows are divided by max(||row||, eps).
constexpr double kNormalizeEps = 1e-12;

// row[0:n] /= max(||row||_2, eps), in acc_t. The squares are summed in 8 interleaved partial
// sums (lane l takes the elements i with i % 8 == l), then the partial sums in order: a fixed
// order, so the result is the same on every run and in both clones, and no chain of n dependent
// adds (one sum was half of this op's time at PEM's 256 channels).
template <typename acc_t>
PEM_ALWAYS_INLINE void normalize_row_body(acc_t* row, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t partial[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += row[i + l] * row[i + l];
  }
  for (int64_t i = whole; i < n; ++i) partial[i - whole] += row[i] * row[i];
  acc_t sum_sq = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum_sq += partial[l];
  const acc_t norm = std::sqrt(sum_sq);
  // Not std::max(eps, norm): a NaN norm must stay NaN, as in F.normalize.
  const acc_t divisor = norm < static_cast<acc_t>(kNormalizeEps) ? static_cast<acc_t>(kNormalizeEps) : norm;
  for (int64_t i = 0; i < n; ++i) row[i] /= divisor;
}
PEM_SIMD_CLONES void normalize_row(float* row, int64_t n) { normalize_row_body(row, n); }
PEM_SIMD_CLONES void normalize_row(double* row, int64_t n) { normalize_row_body(row, n); }

// Eval-mode BatchNorm as x * scale[c] + shift[c] in acc_t: scale = weight / sqrt(var + eps),
// shift = bias - mean * scale (the CUDA and Triton kernels compute the same per channel).
template <typename scalar_t, typename acc_t>
void bn_affine(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
               const at::Tensor& bias, double eps, std::vector<acc_t>& scale,
               std::vector<acc_t>& shift) {
  const int64_t channels = mean.size(0);
  const scalar_t* m = mean.const_data_ptr<scalar_t>();
  const scalar_t* v = var.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scale.resize(channels);
  shift.resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    acc_t s = acc_t(1) / std::sqrt(static_cast<acc_t>(v[c]) + static_cast<acc_t>(eps));
    if (w != nullptr) s *= static_cast<acc_t>(w[c]);
    scale[c] = s;
    shift[c] = (b != nullptr ? static_cast<acc_t>(b[c]) : acc_t(0)) - static_cast<acc_t>(m[c]) * s;
  }
}

// line[i] = (x[i] + pos[i]) * scale + shift (pos optional): one BN'd source row in acc_t.
template <typename acc_t, typename scalar_t>
PEM_ALWAYS_INLINE void bn_row_body(acc_t* line, const scalar_t* x, const scalar_t* pos, int64_t n,
                                   acc_t scale, acc_t shift) {
  if (pos == nullptr) {
    for (int64_t i = 0; i < n; ++i) line[i] = static_cast<acc_t>(x[i]) * scale + shift;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      line[i] = (static_cast<acc_t>(x[i]) + static_cast<acc_t>(pos[i])) * scale + shift;
    }
  }
}
// fp16/bf16 rows convert element by element; fp32 and fp64 rows are SIMD clones (below).
template <typename acc_t, typename scalar_t>
void bn_row(acc_t* line, const scalar_t* x, const scalar_t* pos, int64_t n, acc_t scale,
            acc_t shift) {
  bn_row_body(line, x, pos, n, scale, shift);
}
PEM_SIMD_CLONES void bn_row(float* line, const float* x, const float* pos, int64_t n, float scale,
                            float shift) {
  bn_row_body(line, x, pos, n, scale, shift);
}
PEM_SIMD_CLONES void bn_row(double* line, const double* x, const double* pos, int64_t n,
                            double scale, double shift) {
  bn_row_body(line, x, pos, n, scale, shift);
}

// One output row of the depthwise 3x3 conv: out[w] = bias + sum of w9[3 * dy + dx] *
// lines[dy][w + dx], from three BN'd source rows padded with a zero on each side.
template <typename acc_t>
PEM_ALWAYS_INLINE void conv3x3_row_body(acc_t* out, const acc_t* l0, const acc_t* l1,
                                        const acc_t* l2, const acc_t* w9, acc_t bias,
                                        int64_t width) {
  for (int64_t w = 0; w < width; ++w) {
    out[w] = bias + w9[0] * l0[w] + w9[1] * l0[w + 1] + w9[2] * l0[w + 2] + w9[3] * l1[w] +
        w9[4] * l1[w + 1] + w9[5] * l1[w + 2] + w9[6] * l2[w] + w9[7] * l2[w + 1] +
        w9[8] * l2[w + 2];
  }
}
PEM_SIMD_CLONES void conv3x3_row(float* out, const float* l0, const float* l1, const float* l2,
                                 const float* w9, float bias, int64_t width) {
  conv3x3_row_body(out, l0, l1, l2, w9, bias, width);
}
PEM_SIMD_CLONES void conv3x3_row(double* out, const double* l0, const double* l1,
                                 const double* l2, const double* w9, double bias, int64_t width) {
  conv3x3_row_body(out, l0, l1, l2, w9, bias, width);
}

template <typename scalar_t>
void local_representation_cpu_impl(
    const at::Tensor& memory, const at::Tensor& pos, const at::Tensor& bn_mean,
    const at::Tensor& bn_var, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    double bn_eps, const at::Tensor& dw_weight, const at::Tensor& dw_bias,
    const at::Tensor& out_weight, const at::Tensor& out_bias, bool normalize, at::Tensor& keys) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const auto acc_options = memory.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t batch = memory.size(0), channels = memory.size(1);
  const int64_t height = memory.size(2), width = memory.size(3);
  const int64_t out_channels = out_weight.size(0);
  const scalar_t* x = memory.data_ptr<scalar_t>();
  const scalar_t* p = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
  // Small parameters in acc_t once, so the inner loops do not convert (and fp64 stays fp64).
  std::vector<acc_t> scale, shift;
  bn_affine<scalar_t>(bn_mean, bn_var, bn_weight, bn_bias, bn_eps, scale, shift);
  const at::Tensor dw_w = dw_weight.reshape({channels, 9}).to(acc_options.dtype()).contiguous();
  const at::Tensor dw_b = dw_bias.to(acc_options.dtype()).contiguous();
  // [C + 1, C_out]: out_weight^T with out_bias as an extra row, matched by a row of ones under
  // each conv tile, so the GEMM adds the bias (addmm would first copy the broadcast bias into
  // every output block: 10% of the op at 32768 pixels).
  const at::Tensor weight_t = at::cat(
      {out_weight.to(acc_options.dtype()).t(), out_bias.to(acc_options.dtype()).unsqueeze(0)}, 0);
  const acc_t* dww = dw_w.data_ptr<acc_t>();
  const acc_t* dwb = dw_b.data_ptr<acc_t>();

  // Fewer rows on small maps, so that every thread gets a task (PEM's maps at strides 32 and 16
  // hold 1-2 tasks of 1024 pixels).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_per_task = std::clamp<int64_t>(
      std::min(kTilePixels / width, (batch * height + threads - 1) / threads), 1, height);
  const int64_t row_blocks = (height + rows_per_task - 1) / rows_per_task;
  const int64_t plane = height * width;
  const int64_t line_size = width + 2;  // a zero on each side: the conv's padding

  pem_kernels::parallel_for(0, batch * row_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_pixels = rows_per_task * width;
    at::Tensor tile = at::empty({channels + 1, tile_pixels}, acc_options);
    tile[channels].fill_(1);  // the bias row (see weight_t); never overwritten
    at::Tensor result = kSameType ? at::Tensor() : at::empty({tile_pixels, out_channels}, acc_options);
    // The task's BN'd source rows row0 - 1 .. row0 + rows of one channel, zero outside the image.
    std::vector<acc_t> lines((rows_per_task + 2) * line_size, acc_t(0));
    acc_t* conv = tile.data_ptr<acc_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks;
      const int64_t row0 = (task % row_blocks) * rows_per_task;
      const int64_t rows = std::min(rows_per_task, height - row0);
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t base = (b * channels + c) * plane;
        for (int64_t i = 0; i < rows + 2; ++i) {
          acc_t* line = lines.data() + i * line_size;
          const int64_t hh = row0 - 1 + i;
          if (hh < 0 || hh >= height) {
            std::fill(line, line + line_size, acc_t(0));
          } else {
            line[0] = line[width + 1] = 0;
            bn_row(line + 1, x + base + hh * width,
                   p == nullptr ? nullptr : p + base + hh * width, width, scale[c], shift[c]);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* l0 = lines.data() + r * line_size;
          conv3x3_row(conv + c * tile_pixels + r * width, l0, l0 + line_size,
                      l0 + 2 * line_size, dww + c * 9, dwb[c], width);
        }
      }
      const int64_t count = rows * width;
      const at::Tensor lhs = tile.narrow(1, 0, count).t();  // [count, C + 1]
      at::Tensor out_rows = keys[b].narrow(0, row0 * width, count);
      // BLAS runs single-threaded here: we are inside at::parallel_for.
      at::Tensor acc_rows = kSameType ? out_rows : result.narrow(0, 0, count);
      at::mm_out(acc_rows, lhs, weight_t);
      if (normalize) {
        acc_t* data = acc_rows.data_ptr<acc_t>();  // contiguous [count, C_out]
        for (int64_t i = 0; i < count; ++i) normalize_row(data + i * out_channels, out_channels);
      }
      if constexpr (!kSameType) out_rows.copy_(acc_rows);
    }
  });
}

at::Tensor local_representation_cpu(
    const at::Tensor& memory_in, const std::optional<at::Tensor>& pos_in, const at::Tensor& bn_mean,
    const at::Tensor& bn_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double bn_eps, const at::Tensor& dw_weight,
    const at::Tensor& dw_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
    bool normalize) {
  check_local_representation_inputs(memory_in, pos_in, bn_mean, bn_var, bn_weight, bn_bias,
                                    dw_weight, dw_bias, out_weight, out_bias);
  // ATen ops run on these internally (views, addmm_out); detached inputs keep them out of autograd.
  const at::Tensor memory = memory_in.detach().contiguous();
  const at::Tensor pos = pos_in.has_value() ? pos_in->detach().contiguous() : at::Tensor();
  at::Tensor keys = at::empty(
      {memory.size(0), memory.size(2) * memory.size(3), out_weight.size(0)}, memory.options());
  if (keys.numel() == 0) return keys;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, memory.scalar_type(), "local_representation_cpu", [&] {
        local_representation_cpu_impl<scalar_t>(
            memory, pos, bn_mean.detach().contiguous(), bn_var.detach().contiguous(),
            bn_weight.has_value() ? bn_weight->detach().contiguous() : at::Tensor(),
            bn_bias.has_value() ? bn_bias->detach().contiguous() : at::Tensor(), bn_eps,
            dw_weight.detach(), dw_bias.detach(), out_weight.detach(), out_bias.detach(), normalize,
            keys);
      });
  return keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CPU, m) {
  m.impl("local_representation", &local_representation_cpu);
}

}  // namespace pem_kernels

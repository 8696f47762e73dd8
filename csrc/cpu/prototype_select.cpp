// prototype_select on the CPU: a streaming masked argmax over pixel tiles.
//
// For each (image b, head h, query n) the kernel finds the allowed pixel whose key chunk has the
// largest dot product with the query chunk. Scores are computed one pixel tile at a time into a
// small per-thread buffer ([N, kPixelTile]) and folded into a running argmax, so the similarity
// tensor [B, heads, HW, N] never exists. Work is split over (b, h, pixel chunk) and partial argmaxes
// are merged in chunk order, so results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pem_kernels/check.h"
#include "pem_kernels/parallel.h"
#include "pem_kernels/prototype_select_checks.h"
#include "pem_kernels/prototype_select_common.h"
#include "pem_kernels/simd.h"

// The mask-and-max scan is compiled for AVX2 and for baseline x86-64 (PEM_SIMD_CLONES).

namespace pem_kernels {
namespace {

// Pixels per score tile: the [N, kPixelTile] fp32 score tile of one head stays in L2 and each
// BLAS call is large enough that its fixed cost stays small.
constexpr int64_t kPixelTile = 512;

// Eight-lane vectors (GCC/Clang vector extensions) for the mask-and-max scan of fold_scores.
template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float value __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double value __attribute__((vector_size(64)));
  typedef int64_t mask __attribute__((vector_size(64)));
};
typedef int8_t MaskBytes __attribute__((vector_size(8)));
typedef float LogitLanes __attribute__((vector_size(32)));
typedef int32_t LogitBlocked __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int64_t kFoldBlock = 32;

// The mask as the kernel reads it: bool bytes (True = allowed), fp32 mask logits (allowed where
// a logit is not < 0, the PEM code's rule: NaN allows; PEM-CA passes its logits, so no bool copy
// is made), or neither (every pixel allowed). `offset` moves both to a row or pixel.
struct MaskView {
  // Bytes, not bool: a bool tensor viewed from other bytes (a 0/255 uint8 mask) may hold any
  // nonzero value, which allows.
  const uint8_t* bytes = nullptr;
  const float* logits = nullptr;

  bool any() const { return bytes != nullptr || logits != nullptr; }
  MaskView offset(int64_t elements) const {
    return {bytes == nullptr ? nullptr : bytes + elements,
            logits == nullptr ? nullptr : logits + elements};
  }
  bool allowed(int64_t p) const {
    return bytes != nullptr ? bytes[p] != 0 : logits == nullptr || !(logits[p] < 0.0f);
  }
};

// Folds the scores of one query over pixels [first_pixel, first_pixel + count) into its running
// argmax. A blocked pixel scores -inf, which never replaces anything, so nothing branches on the
// (random) mask: each block of kFoldBlock pixels gets a vector max first and is only scanned when
// it may hold a winner. A state left at index -1 saw no allowed pixel scoring above -inf;
// resolve_unselected() settles those rare rows.
template <typename acc_t>
PEM_ALWAYS_INLINE void fold_scores_impl(
    const acc_t* scores, MaskView mask_row, int64_t first_pixel, int64_t count,
    ArgmaxState<acc_t>& state) {
  using Vec = typename Lanes<acc_t>::value;
  using VecMask = typename Lanes<acc_t>::mask;
  constexpr acc_t kBlocked = -std::numeric_limits<acc_t>::infinity();
  auto score_at = [&](int64_t p) {
    return mask_row.allowed(p) ? scores[p] : kBlocked;
  };
  int64_t p0 = 0;
  for (; p0 + kFoldBlock <= count; p0 += kFoldBlock) {
    if (state.score != state.score) return;  // a NaN is selected and can never be replaced
    Vec block_max = Vec{} + kBlocked;
    VecMask has_nan = VecMask{};
    for (int64_t j = 0; j < kFoldBlock; j += kLanes) {
      Vec score;
      std::memcpy(&score, scores + p0 + j, sizeof(Vec));
      if (mask_row.bytes != nullptr) {
        MaskBytes allowed_bytes;
        std::memcpy(&allowed_bytes, mask_row.bytes + p0 + j, sizeof(MaskBytes));
        const VecMask allowed = __builtin_convertvector(allowed_bytes, VecMask);
        score = allowed != 0 ? score : Vec{} + kBlocked;
      } else if (mask_row.logits != nullptr) {
        LogitLanes logits;
        std::memcpy(&logits, mask_row.logits + p0 + j, sizeof(LogitLanes));
        const LogitBlocked blocked = logits < LogitLanes{};  // NaN: not blocked
        score = __builtin_convertvector(blocked, VecMask) != 0 ? Vec{} + kBlocked : score;
      }
      has_nan |= score != score;
      block_max = score > block_max ? score : block_max;
    }
    bool may_win = false;
    for (int64_t lane = 0; lane < kLanes; ++lane)
      may_win |= has_nan[lane] != 0 || block_max[lane] > state.score;
    if (!may_win) continue;
    for (int64_t j = 0; j < kFoldBlock; ++j) argmax_fold(state, score_at(p0 + j), first_pixel + p0 + j);
  }
  for (; p0 < count; ++p0) argmax_fold(state, score_at(p0), first_pixel + p0);
}

PEM_SIMD_CLONES void fold_scores(
    const float* scores, MaskView mask_row, int64_t first_pixel, int64_t count,
    ArgmaxState<float>& state) {
  fold_scores_impl(scores, mask_row, first_pixel, count, state);
}

PEM_SIMD_CLONES void fold_scores(
    const double* scores, MaskView mask_row, int64_t first_pixel, int64_t count,
    ArgmaxState<double>& state) {
  fold_scores_impl(scores, mask_row, first_pixel, count, state);
}

// Per-pixel divisor of the in-op key normalization: max(||keys[b, p, :]||, eps), as F.normalize.
template <typename scalar_t, typename acc_t>
at::Tensor key_norm_divisors(const scalar_t* keys, int64_t rows, int64_t channels) {
  at::Tensor divisors = at::empty({rows}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = divisors.data_ptr<acc_t>();
  pem_kernels::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t sum_sq = 0;
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t v = static_cast<acc_t>(keys[r * channels + c]);
        sum_sq += v * v;
      }
      out[r] = std::max(static_cast<acc_t>(std::sqrt(sum_sq)), static_cast<acc_t>(kKeyNormEps));
    }
  });
  return divisors;
}

template <typename scalar_t, typename acc_t>
inline acc_t key_value(const scalar_t* keys, const acc_t* divisors, int64_t row, int64_t channel, int64_t channels) {
  const acc_t v = static_cast<acc_t>(keys[row * channels + channel]);
  return divisors == nullptr ? v : v / divisors[row];
}

struct Problem {
  int64_t batch, pixels, channels, queries, heads, head_dim;
};

// The masked running argmax of every (image, head, query) over all pixels, for the images listed
// in `images`: tiles of kPixelTile pixels are scored with one GEMM each and folded into
// per-query states; pixel chunks run in parallel and are merged afterwards. An empty ``mask``
// allows every pixel. With ``divisors`` (defined: normalize_keys) each key tile is divided by its
// pixels' norms before its GEMM, as the reference normalizes the keys before its product (so
// exactly parallel keys tie as there, and a tile takes D divisions per pixel, not N). Queries that
// saw no allowed pixel scoring above -inf are left at index -1; the indices of images not listed
// are not written.
template <typename scalar_t, typename acc_t>
void tiled_argmax(
    const Problem& pr, const at::Tensor& keys_tensor, const at::Tensor& queries_tensor,
    MaskView mask, const at::Tensor& divisors, const std::vector<int64_t>& images,
    int64_t* indices) {
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Split pixels into chunks when (listed images) * heads alone cannot keep every thread busy.
  const int64_t tiles = (pr.pixels + kPixelTile - 1) / kPixelTile;
  const int64_t heads_total = static_cast<int64_t>(images.size()) * pr.heads;
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::clamp<int64_t>((wanted_tasks + heads_total - 1) / heads_total, 1, tiles);

  at::Tensor partial_scores = at::empty({heads_total, chunks, pr.queries}, acc_options);
  at::Tensor partial_indices = at::empty({heads_total, chunks, pr.queries}, at::kLong);
  acc_t* part_score = partial_scores.data_ptr<acc_t>();
  int64_t* part_index = partial_indices.data_ptr<int64_t>();

  // Per-thread scratch (allocated through ATen, so memory profiling sees it): the head's queries
  // [N, D] in acc_t, the score tile [N, kPixelTile], and for fp16/bf16 or normalized keys an
  // acc_t key tile [tile, D].
  const bool copy_keys = !std::is_same_v<scalar_t, acc_t> || divisors.defined();
  const int64_t key_tile_size = copy_keys ? pr.head_dim * kPixelTile : 0;
  const int64_t scratch_per_thread =
      pr.queries * pr.head_dim + pr.queries * kPixelTile + key_tile_size;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_per_thread}, acc_options);

  pem_kernels::parallel_for(0, heads_total * chunks, 1, [&](int64_t task_begin, int64_t task_end) {
    const at::Tensor thread_scratch = scratch[at::get_thread_num()];
    at::Tensor query_block = thread_scratch.narrow(0, 0, pr.queries * pr.head_dim)
                                 .view({pr.queries, pr.head_dim});
    at::Tensor score_tile = thread_scratch.narrow(0, pr.queries * pr.head_dim, pr.queries * kPixelTile)
                                .view({pr.queries, kPixelTile});
    at::Tensor key_tile = thread_scratch.narrow(0, scratch_per_thread - key_tile_size, key_tile_size);
    const acc_t* scores = score_tile.data_ptr<acc_t>();
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;  // bh: listed image * heads + h
      const int64_t b = images[bh / pr.heads], h = bh % pr.heads;
      const int64_t channel0 = h * pr.head_dim;
      query_block.copy_(queries_tensor[b].narrow(1, channel0, pr.head_dim));

      std::vector<ArgmaxState<acc_t>> states(
          pr.queries, ArgmaxState<acc_t>{-std::numeric_limits<acc_t>::infinity(), -1});
      const int64_t tile_begin = chunk * tiles / chunks, tile_end = (chunk + 1) * tiles / chunks;
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t pixel0 = tile * kPixelTile;
        const int64_t count = std::min(kPixelTile, pr.pixels - pixel0);
        const at::Tensor keys_t = keys_tensor[b].narrow(0, pixel0, count).narrow(1, channel0, pr.head_dim).t();
        at::Tensor tile_scores = score_tile.narrow(1, 0, count);
        // BLAS runs single-threaded here: we are inside at::parallel_for.
        if (copy_keys) {
          // Pixel-major like the keys ([count, D]: rows read contiguously); BLAS takes its
          // transpose.
          at::Tensor tile = key_tile.narrow(0, 0, count * pr.head_dim).view({count, pr.head_dim});
          const at::Tensor keys_tile = keys_t.t();
          if (divisors.defined()) {
            at::div_out(tile, keys_tile, divisors.narrow(0, b * pr.pixels + pixel0, count).view({count, 1}));
          } else {
            tile.copy_(keys_tile);
          }
          at::mm_out(tile_scores, query_block, tile.t());
        } else {
          at::mm_out(tile_scores, query_block, keys_t);
        }
        for (int64_t n = 0; n < pr.queries; ++n) {
          const MaskView mask_row = mask.offset((b * pr.queries + n) * pr.pixels + pixel0);
          fold_scores(scores + n * kPixelTile, mask_row, pixel0, count, states[n]);
        }
      }
      for (int64_t n = 0; n < pr.queries; ++n) {
        part_score[(bh * chunks + chunk) * pr.queries + n] = states[n].score;
        part_index[(bh * chunks + chunk) * pr.queries + n] = states[n].index;
      }
    }
  });

  // Chunks hold disjoint pixel ranges; merging them is order-independent (argmax_merge).
  for (int64_t bh = 0; bh < heads_total; ++bh) {
    for (int64_t n = 0; n < pr.queries; ++n) {
      ArgmaxState<acc_t> merged{0, -1};
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t at = (bh * chunks + chunk) * pr.queries + n;
        merged = argmax_merge(merged, ArgmaxState<acc_t>{part_score[at], part_index[at]});
      }
      indices[(images[bh / pr.heads] * pr.heads + bh % pr.heads) * pr.queries + n] =
          merged.index;
    }
  }
}

// Indices still at -1 after the main pass belong to queries whose allowed pixels all score -inf
// (they take their first allowed pixel) or that have no allowed pixel at all (empty-mask rule).
// Queries that select over all pixels are common, not rare: an untrained model's masks are often
// all empty. They get a second tiled pass without the mask over their images only, so they cost
// at most as much as the main pass rather than a scalar dot product per pixel.
template <typename scalar_t, typename acc_t>
void resolve_unselected(
    const Problem& pr, const at::Tensor& keys_tensor, const at::Tensor& queries_tensor,
    MaskView mask, const at::Tensor& divisors, bool official_empty, int64_t* indices) {
  std::vector<int64_t> over_all_pixels;  // flat (b, h, n) positions in indices
  std::vector<int64_t> images_over_all_pixels;  // their images, each once
  for (int64_t b = 0; b < pr.batch; ++b) {
    std::vector<int64_t> first_allowed(pr.queries, -2);  // -2: not looked up yet
    auto lookup_first_allowed = [&](int64_t n) {
      if (first_allowed[n] == -2) {
        first_allowed[n] = -1;
        const MaskView row = mask.offset((b * pr.queries + n) * pr.pixels);
        for (int64_t p = 0; p < pr.pixels; ++p) {
          if (row.allowed(p)) {
            first_allowed[n] = p;
            break;
          }
        }
      }
      return first_allowed[n];
    };
    bool image_all_empty = true;
    for (int64_t n = 0; n < pr.queries && image_all_empty; ++n) {
      image_all_empty = lookup_first_allowed(n) < 0;
    }
    const EmptyQueryChoice choice = empty_query_choice(official_empty, image_all_empty);
    for (int64_t h = 0; h < pr.heads; ++h) {
      for (int64_t n = 0; n < pr.queries; ++n) {
        const int64_t at = (b * pr.heads + h) * pr.queries + n;
        if (indices[at] >= 0) continue;
        const int64_t first = lookup_first_allowed(n);
        if (first >= 0) {
          indices[at] = first;
        } else if (choice == EmptyQueryChoice::kPixelZero) {
          indices[at] = 0;
        } else {
          over_all_pixels.push_back(at);
          if (images_over_all_pixels.empty() || images_over_all_pixels.back() != b) {
            images_over_all_pixels.push_back(b);
          }
        }
      }
    }
  }
  if (over_all_pixels.empty()) return;
  at::Tensor unmasked = at::empty({pr.batch * pr.heads * pr.queries}, at::kLong);
  int64_t* unmasked_indices = unmasked.data_ptr<int64_t>();
  tiled_argmax<scalar_t, acc_t>(
      pr, keys_tensor, queries_tensor, MaskView{}, divisors, images_over_all_pixels,
      unmasked_indices);
  for (const int64_t at : over_all_pixels) {
    // Without a mask every pixel is allowed, so only an all-NaN-free, all -inf row stays at -1;
    // such a row takes pixel 0, its first allowed pixel.
    indices[at] = unmasked_indices[at] >= 0 ? unmasked_indices[at] : 0;
  }
}

template <typename scalar_t>
void prototype_select_cpu_impl(
    const Problem& pr, const at::Tensor& keys_tensor, const at::Tensor& queries_tensor,
    MaskView mask, bool official_empty, bool normalize_keys, scalar_t* prototypes,
    int64_t* indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* keys = keys_tensor.data_ptr<scalar_t>();
  const at::Tensor divisor_tensor = normalize_keys
      ? key_norm_divisors<scalar_t, acc_t>(keys, pr.batch * pr.pixels, pr.channels)
      : at::Tensor();
  const acc_t* divisors = normalize_keys ? divisor_tensor.data_ptr<acc_t>() : nullptr;

  std::vector<int64_t> every_image(pr.batch);
  for (int64_t b = 0; b < pr.batch; ++b) every_image[b] = b;
  tiled_argmax<scalar_t, acc_t>(
      pr, keys_tensor, queries_tensor, mask, divisor_tensor, every_image, indices);
  resolve_unselected<scalar_t, acc_t>(
      pr, keys_tensor, queries_tensor, mask, divisor_tensor, official_empty, indices);

  pem_kernels::parallel_for(0, pr.batch * pr.queries, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / pr.queries, n = bn % pr.queries;
      for (int64_t h = 0; h < pr.heads; ++h) {
        const int64_t row = b * pr.pixels + indices[(b * pr.heads + h) * pr.queries + n];
        for (int64_t d = 0; d < pr.head_dim; ++d) {
          const int64_t c = h * pr.head_dim + d;
          prototypes[bn * pr.channels + c] =
              static_cast<scalar_t>(key_value(keys, divisors, row, c, pr.channels));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prototype_select_cpu(
    const at::Tensor& keys_in, const at::Tensor& queries_in, const std::optional<at::Tensor>& mask_in,
    int64_t num_heads, bool official_empty, bool normalize_keys) {
  check_prototype_select_inputs(keys_in, queries_in, mask_in, num_heads, {at::kFloat});
  // The kernel runs ATen ops (views, mm_out) on its inputs internally; detached views keep those
  // out of autograd, which differentiates the op as a whole (pem_kernels/ops/prototype_select.py).
  const at::Tensor keys = keys_in.detach().contiguous();
  const at::Tensor queries = queries_in.detach().contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const Problem pr{keys.size(0), keys.size(1), keys.size(2), queries.size(1), num_heads,
                   keys.size(2) / num_heads};
  at::Tensor prototypes = at::empty({pr.batch, pr.queries, pr.channels}, keys.options());
  at::Tensor indices = at::empty({pr.batch, pr.heads, pr.queries}, keys.options().dtype(at::kLong));
  if (indices.numel() == 0) return {prototypes, indices};
  MaskView mask_view;
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool) {
      mask_view.bytes = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
    } else {
      mask_view.logits = mask.data_ptr<float>();
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, keys.scalar_type(), "prototype_select_cpu", [&] {
        prototype_select_cpu_impl<scalar_t>(
            pr, keys, queries, mask_view, official_empty, normalize_keys,
            prototypes.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
      });
  return {prototypes, indices};
}

// grad_keys[b, p, :] collects grad_prototypes rows of every (head, query) that selected pixel p.
// Each image's selected pixels are accumulated in a fixed (head, query) order in acc_t, so the
// result is deterministic and half-precision grads are summed in fp32. With normalize_keys the
// accumulated gradient is pulled back through k / max(||k||, eps).
template <typename scalar_t>
void prototype_select_backward_cpu_impl(
    const Problem& pr, const scalar_t* grad, const scalar_t* keys, const int64_t* indices,
    bool normalize_keys, scalar_t* grad_keys) {
  using acc_t = at::opmath_type<scalar_t>;
  pem_kernels::parallel_for(0, pr.batch, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t* image_indices = indices + b * pr.heads * pr.queries;
      std::vector<int64_t> pixels(image_indices, image_indices + pr.heads * pr.queries);
      std::sort(pixels.begin(), pixels.end());
      pixels.erase(std::unique(pixels.begin(), pixels.end()), pixels.end());
      std::vector<acc_t> accumulated(pixels.size() * pr.channels, acc_t(0));
      for (int64_t h = 0; h < pr.heads; ++h) {
        for (int64_t n = 0; n < pr.queries; ++n) {
          const int64_t pixel = image_indices[h * pr.queries + n];
          PEM_CHECK(
              pixel >= 0 && pixel < pr.pixels, "_prototype_select_backward: index ", pixel,
              " out of range [0, ", pr.pixels, ")");
          const int64_t slot = std::lower_bound(pixels.begin(), pixels.end(), pixel) - pixels.begin();
          for (int64_t d = 0; d < pr.head_dim; ++d) {
            const int64_t c = h * pr.head_dim + d;
            accumulated[slot * pr.channels + c] +=
                static_cast<acc_t>(grad[(b * pr.queries + n) * pr.channels + c]);
          }
        }
      }
      for (size_t slot = 0; slot < pixels.size(); ++slot) {
        const acc_t* g = accumulated.data() + slot * pr.channels;
        const scalar_t* key = keys + (b * pr.pixels + pixels[slot]) * pr.channels;
        scalar_t* out = grad_keys + (b * pr.pixels + pixels[slot]) * pr.channels;
        if (!normalize_keys) {
          for (int64_t c = 0; c < pr.channels; ++c) out[c] = static_cast<scalar_t>(g[c]);
          continue;
        }
        acc_t sum_sq = 0, key_dot_grad = 0;
        for (int64_t c = 0; c < pr.channels; ++c) {
          const acc_t k = static_cast<acc_t>(key[c]);
          sum_sq += k * k;
          key_dot_grad += k * g[c];
        }
        const acc_t norm = std::sqrt(sum_sq);
        if (!key_norm_is_clamped(norm)) {
          // d(k / ||k||) = (g - k (k . g) / ||k||^2) / ||k||
          const acc_t projection = key_dot_grad / (norm * norm);
          for (int64_t c = 0; c < pr.channels; ++c)
            out[c] = static_cast<scalar_t>((g[c] - static_cast<acc_t>(key[c]) * projection) / norm);
        } else {  // the divisor is the constant eps
          for (int64_t c = 0; c < pr.channels; ++c)
            out[c] = static_cast<scalar_t>(g[c] / static_cast<acc_t>(kKeyNormEps));
        }
      }
    }
  });
}

at::Tensor prototype_select_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& keys_in, const at::Tensor& indices_in,
    bool normalize_keys) {
  check_prototype_select_backward_inputs(grad_in, keys_in, indices_in);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor grad = grad_in.to(keys.scalar_type()).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t heads = indices.size(1);
  const Problem pr{keys.size(0), keys.size(1), keys.size(2), indices.size(2), heads,
                   keys.size(2) / heads};
  at::Tensor grad_keys = at::zeros_like(keys);
  if (grad.numel() == 0) return grad_keys;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, keys.scalar_type(), "prototype_select_backward_cpu", [&] {
        prototype_select_backward_cpu_impl<scalar_t>(
            pr, grad.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
            normalize_keys, grad_keys.data_ptr<scalar_t>());
      });
  return grad_keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CPU, m) {
  m.impl("prototype_select", &prototype_select_cpu);
  m.impl("_prototype_select_backward", &prototype_select_backward_cpu);
}

}  // namespace pem_kernels

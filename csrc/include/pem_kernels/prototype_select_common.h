// Argmax rules of prototype_select, shared by the CPU and CUDA kernels so that both pick exactly
// the pixel torch.argmax would pick over the same scores.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PEM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PEM_HOST_DEVICE inline
#endif

namespace pem_kernels {

// F.normalize's default eps: keys are divided by max(||k||, eps).
constexpr double kKeyNormEps = 1e-12;

// Whether the backward of k / max(||k||, eps) sees the divisor as the constant eps: torch's
// clamp_min passes no gradient to the norm at norm <= eps. A NaN norm is not clamped: the full
// formula gives NaN, as autograd does (a plain `norm > eps` test would give a finite g / eps).
template <typename acc_t>
PEM_HOST_DEVICE bool key_norm_is_clamped(acc_t norm) {
  return norm <= static_cast<acc_t>(kKeyNormEps);
}

// True when `candidate`, found at a higher pixel index than `best`, must replace it. NaN counts as
// larger than every number (as torch.argmax treats it), so the first NaN wins and is never replaced;
// equal scores keep the lower index.
template <typename acc_t>
PEM_HOST_DEVICE bool score_beats(acc_t candidate, acc_t best) {
  const bool best_is_nan = best != best;
  return !best_is_nan && !(candidate <= best);
}

// A running argmax over pixels; index < 0 means "no pixel seen yet".
template <typename acc_t>
struct ArgmaxState {
  acc_t score;
  int64_t index;
};

// Visits pixel `index` (larger than any pixel visited before) in the CPU's -inf-initialized
// formulation: a state still at index -1 afterwards saw no pixel scoring above -inf.
template <typename acc_t>
PEM_HOST_DEVICE void argmax_fold(ArgmaxState<acc_t>& state, acc_t score, int64_t index) {
  if (score_beats(score, state.score)) {
    state.score = score;
    state.index = index;
  }
}

// Merges two partial argmaxes over disjoint pixel sets; associative and commutative, so any
// reduction tree gives the same (deterministic) result.
template <typename acc_t>
PEM_HOST_DEVICE ArgmaxState<acc_t> argmax_merge(ArgmaxState<acc_t> a, ArgmaxState<acc_t> b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  const ArgmaxState<acc_t>& lower = a.index < b.index ? a : b;
  const ArgmaxState<acc_t>& higher = a.index < b.index ? b : a;
  return score_beats(higher.score, lower.score) ? higher : lower;
}

// Where a query with no allowed pixel gets its prototype from.
enum class EmptyQueryChoice : int { kSelectOverAllPixels, kPixelZero };

// Mask2Former convention: an empty query selects over all pixels. Official PEM: only when every
// query of the image is empty is the image unmasked; otherwise an empty query gets pixel 0.
PEM_HOST_DEVICE EmptyQueryChoice empty_query_choice(bool official_empty, bool image_all_empty) {
  return (!official_empty || image_all_empty) ? EmptyQueryChoice::kSelectOverAllPixels
                                              : EmptyQueryChoice::kPixelZero;
}

}  // namespace pem_kernels

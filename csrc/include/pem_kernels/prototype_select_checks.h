// Argument checks of prototype_select, shared by the CPU and CUDA entry points so that both reject
// bad input with the same message (naming the argument, its value and what was expected).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <string>

#include "pem_kernels/check.h"

namespace pem_kernels {

inline void check_prototype_select_inputs(
    const at::Tensor& keys,
    const at::Tensor& queries,
    const std::optional<at::Tensor>& mask,
    int64_t num_heads,
    std::initializer_list<at::ScalarType> logit_dtypes) {
  PEM_CHECK(keys.dim() == 3, "prototype_select: keys must be [B, HW, C], got shape ", keys.sizes());
  PEM_CHECK(
      queries.dim() == 3, "prototype_select: queries must be [B, N, C], got shape ", queries.sizes());
  PEM_CHECK(
      at::isFloatingType(keys.scalar_type()),
      "prototype_select: keys must be a floating tensor, got dtype ", keys.scalar_type());
  PEM_CHECK(
      queries.scalar_type() == keys.scalar_type(),
      "prototype_select: queries dtype ", queries.scalar_type(), " must equal keys dtype ",
      keys.scalar_type());
  PEM_CHECK(
      queries.device() == keys.device(), "prototype_select: queries is on ", queries.device(),
      " but keys is on ", keys.device());
  const int64_t batch = keys.size(0), pixels = keys.size(1), channels = keys.size(2);
  PEM_CHECK(
      queries.size(0) == batch && queries.size(2) == channels,
      "prototype_select: queries must be [B, N, C] = [", batch, ", N, ", channels,
      "] to match keys, got ", queries.sizes());
  PEM_CHECK(pixels >= 1, "prototype_select: keys needs at least one pixel, got shape ", keys.sizes());
  PEM_CHECK(
      num_heads >= 1 && channels % num_heads == 0,
      "prototype_select: num_heads must be a positive divisor of C = ", channels, ", got ",
      num_heads);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    // logit_dtypes: the mask logits the device's kernel reads itself (allowed where not < 0).
    const at::ScalarType type = m.scalar_type();
    if (type != at::kBool &&
        std::find(logit_dtypes.begin(), logit_dtypes.end(), type) == logit_dtypes.end()) {
      std::string names;  // built only for the error: the check runs on every call
      for (const at::ScalarType t : logit_dtypes) {
        names += (names.empty() ? "" : "/") + std::string(c10::toString(t));
      }
      PEM_CHECK(false, "prototype_select: mask must be bool or mask logits (", names,
                "), got dtype ", type);
    }
    PEM_CHECK(
        m.device() == keys.device(), "prototype_select: mask is on ", m.device(),
        " but keys is on ", keys.device());
    PEM_CHECK(
        m.dim() == 3 && m.size(0) == batch && m.size(1) == queries.size(1) && m.size(2) == pixels,
        "prototype_select: mask must be [B, N, HW] = [", batch, ", ", queries.size(1), ", ",
        pixels, "], got ", m.sizes());
  }
}

inline void check_prototype_select_backward_inputs(
    const at::Tensor& grad_prototypes, const at::Tensor& keys, const at::Tensor& indices) {
  PEM_CHECK(keys.dim() == 3, "_prototype_select_backward: keys must be [B, HW, C], got ", keys.sizes());
  PEM_CHECK(
      indices.dim() == 3 && indices.scalar_type() == at::kLong && indices.size(0) == keys.size(0),
      "_prototype_select_backward: indices must be int64 [B, heads, N], got ", indices.scalar_type(),
      " ", indices.sizes());
  const int64_t heads = indices.size(1);
  PEM_CHECK(
      heads >= 1 && keys.size(2) % heads == 0,
      "_prototype_select_backward: indices.shape[1] (heads) must divide C = ", keys.size(2),
      ", got ", heads);
  PEM_CHECK(
      grad_prototypes.dim() == 3 && grad_prototypes.size(0) == keys.size(0) &&
          grad_prototypes.size(1) == indices.size(2) && grad_prototypes.size(2) == keys.size(2),
      "_prototype_select_backward: grad_prototypes must be [B, N, C] = [", keys.size(0), ", ",
      indices.size(2), ", ", keys.size(2), "], got ", grad_prototypes.sizes());
  PEM_CHECK(
      grad_prototypes.device() == keys.device() && indices.device() == keys.device(),
      "_prototype_select_backward: all tensors must be on ", keys.device());
}

}  // namespace pem_kernels

// Argument checks of query_projection, shared by the CPU and CUDA entry points so that both reject
// bad input with the same message (naming the argument, its value and what was expected).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "pem_kernels/check.h"

namespace pem_kernels {

// Channels (in and out) a row may have: the CUDA kernel keeps a row's LayerNorm output and its
// projection in shared memory, two arrays of this size.
constexpr int64_t kQueryProjectionMaxChannels = 1024;

inline void check_query_projection_inputs(
    const at::Tensor& tgt, const std::optional<at::Tensor>& query_pos, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double ln_eps, const at::Tensor& weight, const at::Tensor& bias) {
  PEM_CHECK(tgt.dim() == 3, "query_projection: tgt must be [Q, B, C], got shape ", tgt.sizes());
  PEM_CHECK(at::isFloatingType(tgt.scalar_type()),
            "query_projection: tgt must be a floating tensor, got dtype ", tgt.scalar_type());
  const int64_t channels = tgt.size(2);
  PEM_CHECK(weight.dim() == 2 && weight.size(1) == channels,
            "query_projection: weight must be [C_out, C] with C = ", channels, ", got shape ",
            weight.sizes());
  const int64_t out_channels = weight.size(0);
  PEM_CHECK(channels <= kQueryProjectionMaxChannels && out_channels <= kQueryProjectionMaxChannels,
            "query_projection: at most ", kQueryProjectionMaxChannels,
            " channels in and out, got C = ", channels, " and C_out = ", out_channels);
  PEM_CHECK(std::isfinite(ln_eps) && ln_eps >= 0,
            "query_projection: ln_eps must be finite and >= 0, got ", std::to_string(ln_eps));
  if (query_pos.has_value()) {
    PEM_CHECK(query_pos->sizes() == tgt.sizes(), "query_projection: query_pos must have tgt's shape ",
              tgt.sizes(), ", got ", query_pos->sizes());
  }
  for (const auto& [name, t, length] :
       {std::tuple{"ln_weight", &ln_weight, channels}, std::tuple{"ln_bias", &ln_bias, channels},
        std::tuple{"bias", &bias, out_channels}}) {
    PEM_CHECK(t->dim() == 1 && t->size(0) == length, "query_projection: ", name, " must be [",
              length, "], got shape ", t->sizes());
  }
  const at::Tensor* pos = query_pos.has_value() ? &*query_pos : nullptr;
  for (const auto& [name, t] : {std::pair{"query_pos", pos}, std::pair{"ln_weight", &ln_weight},
                                std::pair{"ln_bias", &ln_bias}, std::pair{"weight", &weight},
                                std::pair{"bias", &bias}}) {
    if (t == nullptr) continue;
    PEM_CHECK(t->scalar_type() == tgt.scalar_type(), "query_projection: ", name, " dtype ",
              t->scalar_type(), " must equal tgt dtype ", tgt.scalar_type());
    // The dispatcher picks the kernel by the first device it sees; a tensor left on another
    // device would otherwise be read through the wrong kind of pointer.
    PEM_CHECK(t->device() == tgt.device(), "query_projection: ", name, " is on ", t->device(),
              ", expected tgt's device ", tgt.device());
  }
}

}  // namespace pem_kernels

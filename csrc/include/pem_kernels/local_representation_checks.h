// Argument checks of local_representation, shared by the CPU and CUDA entry points so that both
// reject bad input with the same message (naming the argument, its value and what was expected).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "pem_kernels/check.h"

namespace pem_kernels {

inline void check_local_representation_inputs(
    const at::Tensor& memory, const std::optional<at::Tensor>& pos, const at::Tensor& bn_scale,
    const at::Tensor& bn_shift, const at::Tensor& dw_weight, const at::Tensor& dw_bias,
    const at::Tensor& out_weight, const at::Tensor& out_bias) {
  PEM_CHECK(memory.dim() == 4, "local_representation: memory must be [B, C, H, W], got shape ",
            memory.sizes());
  PEM_CHECK(at::isFloatingType(memory.scalar_type()),
            "local_representation: memory must be a floating tensor, got dtype ",
            memory.scalar_type());
  const int64_t channels = memory.size(1);
  if (pos.has_value()) {
    PEM_CHECK(pos->sizes() == memory.sizes(), "local_representation: pos must have memory's shape ",
              memory.sizes(), ", got ", pos->sizes());
    PEM_CHECK(pos->scalar_type() == memory.scalar_type(), "local_representation: pos dtype ",
              pos->scalar_type(), " must equal memory dtype ", memory.scalar_type());
    PEM_CHECK(pos->device() == memory.device(), "local_representation: pos is on ", pos->device(),
              ", expected memory's device ", memory.device());
  }
  for (const auto& [name, t] : {std::pair{"bn_scale", &bn_scale}, std::pair{"bn_shift", &bn_shift}}) {
    PEM_CHECK(t->dim() == 1 && t->size(0) == channels, "local_representation: ", name,
              " must be [C] = [", channels, "], got shape ", t->sizes());
    PEM_CHECK(at::isFloatingType(t->scalar_type()), "local_representation: ", name,
              " must be a floating tensor, got ", t->scalar_type());
  }
  PEM_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == channels && dw_weight.size(1) == 1 &&
                dw_weight.size(2) == 3 && dw_weight.size(3) == 3,
            "local_representation: dw_weight must be [C, 1, 3, 3] = [", channels,
            ", 1, 3, 3], got shape ", dw_weight.sizes());
  PEM_CHECK(dw_bias.dim() == 1 && dw_bias.size(0) == channels,
            "local_representation: dw_bias must be [C] = [", channels, "], got shape ",
            dw_bias.sizes());
  PEM_CHECK(out_weight.dim() == 2 && out_weight.size(1) == channels,
            "local_representation: out_weight must be [C_out, C] with C = ", channels,
            ", got shape ", out_weight.sizes());
  PEM_CHECK(out_bias.dim() == 1 && out_bias.size(0) == out_weight.size(0),
            "local_representation: out_bias must be [C_out] = [", out_weight.size(0),
            "], got shape ", out_bias.sizes());
  for (const auto& [name, t] : {std::pair{"dw_weight", &dw_weight}, std::pair{"dw_bias", &dw_bias},
                                std::pair{"out_weight", &out_weight},
                                std::pair{"out_bias", &out_bias}}) {
    PEM_CHECK(t->scalar_type() == memory.scalar_type(), "local_representation: ", name,
              " dtype ", t->scalar_type(), " must equal memory dtype ", memory.scalar_type());
  }
  // The dispatcher picks the kernel by the first device it sees; a parameter left on another
  // device would otherwise be read through the wrong kind of pointer.
  for (const auto& [name, t] : {std::pair{"bn_scale", &bn_scale}, std::pair{"bn_shift", &bn_shift},
                                std::pair{"dw_weight", &dw_weight}, std::pair{"dw_bias", &dw_bias},
                                std::pair{"out_weight", &out_weight},
                                std::pair{"out_bias", &out_bias}}) {
    PEM_CHECK(t->device() == memory.device(), "local_representation: ", name, " is on ",
              t->device(), ", expected memory's device ", memory.device());
  }
}

}  // namespace pem_kernels

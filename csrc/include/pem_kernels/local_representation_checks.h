// Argument checks of local_representation, shared by the CPU and CUDA entry points so that both
// reject bad input with the same message (naming the argument, its value and what was expected).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "pem_kernels/check.h"

namespace pem_kernels {

inline void check_local_representation_inputs(
    const at::Tensor& memory, const std::optional<at::Tensor>& pos, const at::Tensor& bn_mean,
    const at::Tensor& bn_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& dw_weight,
    const at::Tensor& dw_bias, const at::Tensor& out_weight, const at::Tensor& out_bias) {
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
  // The BatchNorm's running statistics and (optional) affine, in eval mode.
  std::vector<std::pair<const char*, const at::Tensor*>> per_channel = {
      {"bn_mean", &bn_mean}, {"bn_var", &bn_var}, {"dw_bias", &dw_bias}};
  if (bn_weight.has_value()) per_channel.emplace_back("bn_weight", &*bn_weight);
  if (bn_bias.has_value()) per_channel.emplace_back("bn_bias", &*bn_bias);
  for (const auto& [name, t] : per_channel) {
    PEM_CHECK(t->dim() == 1 && t->size(0) == channels, "local_representation: ", name,
              " must be [C] = [", channels, "], got shape ", t->sizes());
  }
  PEM_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == channels && dw_weight.size(1) == 1 &&
                dw_weight.size(2) == 3 && dw_weight.size(3) == 3,
            "local_representation: dw_weight must be [C, 1, 3, 3] = [", channels,
            ", 1, 3, 3], got shape ", dw_weight.sizes());
  PEM_CHECK(out_weight.dim() == 2 && out_weight.size(1) == channels,
            "local_representation: out_weight must be [C_out, C] with C = ", channels,
            ", got shape ", out_weight.sizes());
  PEM_CHECK(out_bias.dim() == 1 && out_bias.size(0) == out_weight.size(0),
            "local_representation: out_bias must be [C_out] = [", out_weight.size(0),
            "], got shape ", out_bias.sizes());
  std::vector<std::pair<const char*, const at::Tensor*>> parameters = per_channel;
  parameters.insert(parameters.end(), {{"dw_weight", &dw_weight}, {"out_weight", &out_weight},
                                       {"out_bias", &out_bias}});
  for (const auto& [name, t] : parameters) {
    // The kernels read every parameter as memory's scalar type and convert it to acc_t.
    PEM_CHECK(t->scalar_type() == memory.scalar_type(), "local_representation: ", name,
              " dtype ", t->scalar_type(), " must equal memory dtype ", memory.scalar_type());
    // The dispatcher picks the kernel by the first device it sees; a parameter left on another
    // device would otherwise be read through the wrong kind of pointer.
    PEM_CHECK(t->device() == memory.device(), "local_representation: ", name, " is on ",
              t->device(), ", expected memory's device ", memory.device());
  }
}

}  // namespace pem_kernels

// How the CUDA kernels multiply fp32 operands where tensor cores can do it: the rules of the
// Triton kernels (pem_kernels.triton.fp32_dot_precision), so that one setting governs both.
//   * kTf32 where PyTorch's own fp32 matmuls may use TF32 (torch.set_float32_matmul_precision
//     "high" or "medium", or torch.backends.cuda.matmul.allow_tf32).
//   * Otherwise kTf32x3 (PyTorch's default "highest"): each operand split into a TF32 part and a
//     TF32 remainder, three tensor-core products summed in fp32, fp32's accuracy (at most about
//     5e-7 relative error per product; IEEE's is 6e-8).
//   * kIeee, fp32 FMAs, with the environment variable PEM_KERNELS_FP32_DOT=ieee (or "tf32x3",
//     the default; any other value is an error naming it).
#pragma once

#include <ATen/Context.h>

#include <cstdlib>
#include <string>

#include "pem_kernels/check.h"

namespace pem_kernels {

enum class Fp32Products { kIeee, kTf32, kTf32x3 };

inline Fp32Products fp32_products() {
  bool tf32_allowed = false;
  try {
    tf32_allowed = at::globalContext().allowTF32CuBLAS();
  } catch (const c10::Error&) {
    // torch raises when both its legacy and its per-backend TF32 settings were used: keep fp32
    // accuracy rather than guess.
  }
  if (tf32_allowed) return Fp32Products::kTf32;
  const char* choice = std::getenv("PEM_KERNELS_FP32_DOT");
  if (choice == nullptr || std::string(choice) == "tf32x3") return Fp32Products::kTf32x3;
  PEM_CHECK(std::string(choice) == "ieee", "PEM_KERNELS_FP32_DOT: expected one of ('tf32x3', ",
            "'ieee'), got '", choice, "'");
  return Fp32Products::kIeee;
}

}  // namespace pem_kernels

// at::parallel_for for the CPU kernels, run in the caller's InferenceMode.
//
// at::parallel_for hands ranges to ATen's worker threads, and those do not inherit the calling
// thread's InferenceMode (a thread-local state). Under torch.inference_mode() the kernels' own
// buffers and outputs are inference tensors, and the ATen ops a task runs on them (at::mm_out
// into an output tile, copy_ into a scratch view) would then be in-place updates of inference
// tensors outside InferenceMode, which ATen refuses: every CPU op failed under
// torch.inference_mode() with more than one thread. Each range re-enters the caller's mode.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <optional>

namespace pem_kernels {

template <typename Function>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const Function& function) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(begin, end, grain_size, [&](int64_t range_begin, int64_t range_end) {
    // Only where the caller is in InferenceMode: InferenceMode(false) would turn grad mode on,
    // also in the calling thread, which runs one of the ranges itself.
    std::optional<c10::InferenceMode> same_mode;
    if (inference) same_mode.emplace();
    function(range_begin, range_end);
  });
}

}  // namespace pem_kernels

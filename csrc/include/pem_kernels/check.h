// PEM_CHECK: TORCH_CHECK with a message whose integers and shapes are formatted without
// std::ostream, used by every argument check of the extension.
//
// Why: on the first GPU machine (H200, torch 2.11, g++ 13.3) each TORCH_CHECK whose message
// streamed an integer into c10::str's std::ostringstream killed the process with a segmentation
// fault, while messages of text, dtypes and devices (no integer goes through the stream's num_put)
// raised RuntimeError as they should. The same toolchain without a GPU raises in every case, so the
// cause is in that machine's runtime; `python -m benchmarks.diagnose_cpp_errors` collects the
// evidence. std::to_string does not touch the stream's locale facets, and an argument error must
// never take the process down.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace pem_kernels::detail {

inline void append_message_part(std::string& out, const char* text) { out += text; }
inline void append_message_part(std::string& out, const std::string& text) { out += text; }
inline void append_message_part(std::string& out, c10::ScalarType dtype) {
  out += c10::toString(dtype);
}
inline void append_message_part(std::string& out, const c10::Device& device) {
  out += device.str();
}
// The format of c10's ArrayRef printing: "[2, 30, 16]".
inline void append_message_part(std::string& out, c10::IntArrayRef sizes) {
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += ']';
}
template <typename Int, std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>,
                                         int> = 0>
void append_message_part(std::string& out, Int value) {
  out += std::to_string(value);
}

template <typename... Parts>
std::string check_message(const Parts&... parts) {
  std::string out;
  (append_message_part(out, parts), ...);
  return out;
}

}  // namespace pem_kernels::detail

// The message is built only when the condition fails, as TORCH_CHECK's own.
#define PEM_CHECK(cond, ...) \
  TORCH_CHECK((cond), ::pem_kernels::detail::check_message(__VA_ARGS__))

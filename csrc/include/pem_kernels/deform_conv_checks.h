// Argument checks and sizes of deform_conv2d, shared by the CPU and CUDA entry points so that both
// reject bad input with the same messages (naming the argument, its value and what was expected).
#pragma once

#include <ATen/ATen.h>

#include "pem_kernels/check.h"
#include "pem_kernels/deform_conv_common.h"

namespace pem_kernels {

// Every size of one convolution, validated by check_inputs().
struct ConvShape {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  int64_t out_h, out_w;

  PEM_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  PEM_HOST_DEVICE int64_t out_pixels() const { return out_h * out_w; }
  PEM_HOST_DEVICE int64_t group_channels() const { return in_channels / groups; }
  PEM_HOST_DEVICE int64_t group_out_channels() const { return out_channels / groups; }
  PEM_HOST_DEVICE int64_t offset_group_channels() const { return in_channels / offset_groups; }
  // Rows of the column tile of one convolution group: (channel, tap) pairs.
  PEM_HOST_DEVICE int64_t group_rows() const { return group_channels() * taps(); }
  // (offset group, tap) pairs: the rows of the sample tables.
  PEM_HOST_DEVICE int64_t sample_rows() const { return offset_groups * taps(); }
};

inline void check_like_input(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& input) {
  PEM_CHECK(
      tensor.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ",
      tensor.scalar_type(), ", expected input's dtype ", input.scalar_type());
  PEM_CHECK(
      tensor.device() == input.device(), op, ": ", name, " is on ", tensor.device(),
      ", expected input's device ", input.device());
}

// Validates the arguments shared by the forward and backward ops; each message names the
// argument, its value and what was expected.
inline ConvShape check_inputs(
    const char* op, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
    int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  PEM_CHECK(
      input.dim() == 4, op, ": input must be a 4-D tensor [B, C_in, H, W], got shape ",
      input.sizes());
  PEM_CHECK(
      weight.dim() == 4, op,
      ": weight must be a 4-D tensor [C_out, C_in / groups, kh, kw], got shape ", weight.sizes());
  PEM_CHECK(
      offset.dim() == 4, op,
      ": offset must be a 4-D tensor [B, 2 * offset_groups * kh * kw, out_h, out_w], got shape ",
      offset.sizes());
  PEM_CHECK(
      at::isFloatingType(input.scalar_type()), op,
      ": input must be a floating tensor, got dtype ", input.scalar_type());
  check_like_input(op, "weight", weight, input);
  check_like_input(op, "offset", offset, input);
  if (mask.has_value()) check_like_input(op, "mask", *mask, input);
  if (bias.has_value()) check_like_input(op, "bias", *bias, input);
  PEM_CHECK(
      stride_h >= 1 && stride_w >= 1, op, ": stride_h and stride_w must be >= 1, got (",
      stride_h, ", ", stride_w, ")");
  PEM_CHECK(
      pad_h >= 0 && pad_w >= 0, op, ": pad_h and pad_w must be >= 0, got (", pad_h, ", ", pad_w,
      ")");
  PEM_CHECK(
      dilation_h >= 1 && dilation_w >= 1, op, ": dilation_h and dilation_w must be >= 1, got (",
      dilation_h, ", ", dilation_w, ")");

  ConvShape s{};
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dilation_h = dilation_h;
  s.dilation_w = dilation_w;
  s.groups = groups;
  s.offset_groups = offset_groups;
  PEM_CHECK(
      s.in_channels >= 1 && s.height >= 1 && s.width >= 1, op,
      ": input must have C_in, H, W >= 1, got shape ", input.sizes());
  PEM_CHECK(
      s.out_channels >= 1 && weight.size(1) >= 1 && s.kernel_h >= 1 && s.kernel_w >= 1, op,
      ": weight must have every dimension >= 1, got shape ", weight.sizes());
  PEM_CHECK(
      groups >= 1 && s.in_channels == groups * weight.size(1), op, ": groups = ", groups,
      " must be >= 1 with weight.size(1) * groups == C_in, got weight shape ", weight.sizes(),
      " and C_in = ", s.in_channels);
  PEM_CHECK(
      s.out_channels % groups == 0, op, ": weight.size(0) = ", s.out_channels,
      " (C_out) must be divisible by groups = ", groups);
  PEM_CHECK(
      offset_groups >= 1 && s.in_channels % offset_groups == 0, op, ": offset_groups = ",
      offset_groups, " must be a positive divisor of C_in = ", s.in_channels);
  const int64_t span_h = s.height + 2 * pad_h - dilation_h * (s.kernel_h - 1) - 1;
  const int64_t span_w = s.width + 2 * pad_w - dilation_w * (s.kernel_w - 1) - 1;
  PEM_CHECK(
      span_h >= 0 && span_w >= 0, op, ": input of spatial size ", s.height, " x ", s.width,
      " is too small for kernel ", s.kernel_h, " x ", s.kernel_w, " with padding (", pad_h, ", ",
      pad_w, ") and dilation (", dilation_h, ", ", dilation_w, ")");
  s.out_h = span_h / stride_h + 1;
  s.out_w = span_w / stride_w + 1;
  const std::vector<int64_t> offset_shape{s.batch, 2 * s.sample_rows(), s.out_h, s.out_w};
  PEM_CHECK(
      offset.sizes() == at::IntArrayRef(offset_shape), op,
      ": offset must have shape [B, 2 * offset_groups * kh * kw, out_h, out_w] = ",
      at::IntArrayRef(offset_shape), ", got ", offset.sizes());
  if (mask.has_value()) {
    const std::vector<int64_t> mask_shape{s.batch, s.sample_rows(), s.out_h, s.out_w};
    PEM_CHECK(
        mask->sizes() == at::IntArrayRef(mask_shape), op,
        ": mask must have shape [B, offset_groups * kh * kw, out_h, out_w] = ",
        at::IntArrayRef(mask_shape), ", got ", mask->sizes());
  }
  if (bias.has_value()) {
    PEM_CHECK(
        bias->dim() == 1 && bias->size(0) == s.out_channels, op,
        ": bias must have shape [C_out] = [", s.out_channels, "], got ", bias->sizes());
  }
  return s;
}

// check_inputs() for the backward op, plus grad_output's shape, dtype and device.
inline ConvShape check_backward_inputs(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const std::optional<at::Tensor>& mask, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t groups, int64_t offset_groups) {
  constexpr const char* kOp = "_deform_conv2d_backward";
  const ConvShape s = check_inputs(
      kOp, input, weight, offset, mask, std::nullopt, stride_h, stride_w, pad_h, pad_w,
      dilation_h, dilation_w, groups, offset_groups);
  const std::vector<int64_t> output_shape{s.batch, s.out_channels, s.out_h, s.out_w};
  PEM_CHECK(
      grad_output.sizes() == at::IntArrayRef(output_shape), kOp,
      ": grad_output must have the output's shape [B, C_out, out_h, out_w] = ",
      at::IntArrayRef(output_shape), ", got ", grad_output.sizes());
  check_like_input(kOp, "grad_output", grad_output, input);
  return s;
}

// Whether a kernel reads the input in place as channels_last. A tensor that is both contiguous and
// channels_last-contiguous (C == 1 or H == W == 1) is read as NCHW.
inline bool reads_channels_last(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The layout the CPU and CUDA kernels read: channels_last in place, anything else as contiguous
// NCHW. Detached: the kernels run ATen ops (views, GEMMs) internally, and autograd differentiates
// the op as a whole (pem_kernels/ops/deform_conv.py).
inline at::Tensor kernel_input(const at::Tensor& input) {
  const at::Tensor detached = input.detach();
  return reads_channels_last(detached) ? detached : detached.contiguous();
}

}  // namespace pem_kernels

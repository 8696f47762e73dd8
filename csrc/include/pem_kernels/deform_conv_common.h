// Sampling rules of deform_conv2d (modulated deformable convolution, DCNv2), shared by the CPU
// and CUDA kernels so that both sample, and differentiate the samples, exactly as
// torchvision.ops.deform_conv2d does.
//
// A sample at the fractional position (y, x) of one input channel is the bilinear interpolation
// of the four corners (floor(y) + {0, 1}, floor(x) + {0, 1}). Each corner that lies inside the
// image contributes weight * value; a corner outside contributes nothing (zero padding) and is
// never read. The derivatives with respect to y and x hold floor() constant, i.e. they are the
// right-hand derivatives at integer coordinates: at exactly y == -1 the sample is zero (row 0 has
// weight 0) but its y-derivative is the slope towards row 0, while at y == H everything is zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PEM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PEM_HOST_DEVICE inline
#endif

namespace pem_kernels {

// Corner order everywhere: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0),
// 3 = (y0 + 1, x0 + 1).
constexpr int kBilinearCorners = 4;

// Everything the forward and backward passes need to know about one sample position.
template <typename acc_t>
struct BilinearSample {
  // Element offsets of the corners from the start of the channel (row * stride_y + col *
  // stride_x); 0 for corners outside the image, which must then be skipped (see `inside`).
  int64_t offset[kBilinearCorners];
  // Interpolation weights; 0 for corners outside the image.
  acc_t weight[kBilinearCorners];
  // Fractional parts y - floor(y) and x - floor(x), from which the derivatives are built.
  acc_t frac_y, frac_x;
  // Bit i set when corner i lies inside the image. 0xF (all four) is the common case that kernels
  // handle without per-corner tests.
  uint8_t inside;
};

constexpr uint8_t kAllCornersInside = 0xF;

// Undeformed sampling coordinate of output index `out_index` and kernel tap `tap` along one axis,
// plus the learned offset. Computed in acc_t, as the reference does, so positions agree exactly.
template <typename acc_t>
PEM_HOST_DEVICE acc_t sample_coordinate(
    int64_t out_index, int64_t tap, int64_t stride, int64_t pad, int64_t dilation, acc_t offset) {
  return static_cast<acc_t>(out_index * stride - pad + tap * dilation) + offset;
}

// Corners, weights and inside flags of the sample at (y, x) in a height x width image whose
// elements are `stride_y` / `stride_x` apart (channels_last images have stride_x = channels).
template <typename acc_t>
PEM_HOST_DEVICE BilinearSample<acc_t> bilinear_sample(
    acc_t y, acc_t x, int64_t height, int64_t width, int64_t stride_y, int64_t stride_x) {
  BilinearSample<acc_t> s;
  for (int i = 0; i < kBilinearCorners; ++i) {
    s.offset[i] = 0;
    s.weight[i] = acc_t(0);
  }
  s.frac_y = acc_t(0);
  s.frac_x = acc_t(0);
  s.inside = 0;
  // Some corner is inside only when -1 <= y < height and -1 <= x < width. Testing this first also
  // keeps huge, infinite and NaN coordinates (NaN fails every comparison) away from the integer
  // conversion below, which would be undefined for them.
  if (!(y >= acc_t(-1) && y < static_cast<acc_t>(height) && x >= acc_t(-1) &&
        x < static_cast<acc_t>(width))) {
    return s;
  }
  const acc_t floor_y = std::floor(y), floor_x = std::floor(x);
  const int64_t y0 = static_cast<int64_t>(floor_y), x0 = static_cast<int64_t>(floor_x);
  s.frac_y = y - floor_y;
  s.frac_x = x - floor_x;
  const bool row_inside[2] = {y0 >= 0, y0 + 1 < height};
  const bool col_inside[2] = {x0 >= 0, x0 + 1 < width};
  const acc_t row_weight[2] = {acc_t(1) - s.frac_y, s.frac_y};
  const acc_t col_weight[2] = {acc_t(1) - s.frac_x, s.frac_x};
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      if (row_inside[dy] && col_inside[dx]) {
        const int corner = 2 * dy + dx;
        s.offset[corner] = (y0 + dy) * stride_y + (x0 + dx) * stride_x;
        s.weight[corner] = row_weight[dy] * col_weight[dx];
        s.inside |= static_cast<uint8_t>(1u << corner);
      }
    }
  }
  return s;
}

// The (unmodulated) sample of one channel whose element 0 is at `channel`: the weighted sum of
// the corners inside the image, in corner order. Corners outside are never read, so a non-finite
// value there cannot leak into the result.
template <typename scalar_t, typename acc_t>
PEM_HOST_DEVICE acc_t bilinear_interpolate(
    const scalar_t* channel, const BilinearSample<acc_t>& s) {
  if (s.inside == kAllCornersInside) {
    return s.weight[0] * static_cast<acc_t>(channel[s.offset[0]]) +
        s.weight[1] * static_cast<acc_t>(channel[s.offset[1]]) +
        s.weight[2] * static_cast<acc_t>(channel[s.offset[2]]) +
        s.weight[3] * static_cast<acc_t>(channel[s.offset[3]]);
  }
  acc_t value = 0;
  for (int corner = 0; corner < kBilinearCorners; ++corner) {
    if (s.inside & (1u << corner)) {
      value += s.weight[corner] * static_cast<acc_t>(channel[s.offset[corner]]);
    }
  }
  return value;
}

// The four corner values of one channel (element 0 at `channel`), zero for corners outside the
// image, which are never read.
template <typename scalar_t, typename acc_t>
PEM_HOST_DEVICE void load_corners(
    const scalar_t* channel, const BilinearSample<acc_t>& s, acc_t value[kBilinearCorners]) {
  for (int corner = 0; corner < kBilinearCorners; ++corner) {
    value[corner] = (s.inside & (1u << corner)) ? static_cast<acc_t>(channel[s.offset[corner]])
                                                 : acc_t(0);
  }
}

// d(sample) / dy with floor(y) held constant: the x-interpolated lower row minus the upper row.
template <typename acc_t>
PEM_HOST_DEVICE acc_t bilinear_grad_y(
    const BilinearSample<acc_t>& s, const acc_t value[kBilinearCorners]) {
  return (acc_t(1) - s.frac_x) * (value[2] - value[0]) + s.frac_x * (value[3] - value[1]);
}

// d(sample) / dx with floor(x) held constant: the y-interpolated right column minus the left one.
template <typename acc_t>
PEM_HOST_DEVICE acc_t bilinear_grad_x(
    const BilinearSample<acc_t>& s, const acc_t value[kBilinearCorners]) {
  return (acc_t(1) - s.frac_y) * (value[1] - value[0]) + s.frac_y * (value[3] - value[2]);
}

// Gradient contributions of one channel's sample (channel element 0 at `channel`), given the
// gradient `grad_sample` arriving at its unmodulated value: adds grad_sample * value to
// *grad_value (one channel's share of the mask gradient) and grad_sample * d(value)/dy and
// d(value)/dx to *grad_y and *grad_x (its share of the offset gradient).
template <typename scalar_t, typename acc_t>
PEM_HOST_DEVICE void accumulate_sample_grads(
    const scalar_t* channel, const BilinearSample<acc_t>& s, acc_t grad_sample,
    acc_t* grad_value, acc_t* grad_y, acc_t* grad_x) {
  acc_t value[kBilinearCorners];
  load_corners(channel, s, value);
  *grad_value += grad_sample *
      (s.weight[0] * value[0] + s.weight[1] * value[1] + s.weight[2] * value[2] +
       s.weight[3] * value[3]);
  *grad_y += grad_sample * bilinear_grad_y(s, value);
  *grad_x += grad_sample * bilinear_grad_x(s, value);
}

}  // namespace pem_kernels

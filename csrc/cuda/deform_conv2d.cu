// deform_conv2d on CUDA: the semantics of csrc/cpu/deform_conv2d.cpp (torchvision's DCNv2), with
// the same argument checks (deform_conv_checks.h) and sampling rules (deform_conv_common.h).
//
// Forward: an implicit GEMM per weight group, out[m, n] = sum_k col[m, k] * W[n, k] with m an
// output pixel, n an output channel and k an (input channel, tap) pair; each block computes a
// 64 x 64 output tile and gathers its [16 x 64] column tile (bilinear samples times the
// modulation) straight into shared memory, so the column matrix never exists. fp32 accumulation.
//
// Backward, a correct-first version: one thread per (image, offset group, tap, pixel) forms the
// column gradient and writes the offset and mask gradients and scatters the input gradient with
// atomics (so it is not deterministic: torch.use_deterministic_algorithms(True) raises; the CPU
// and Triton backends are deterministic); one thread per weight element reduces its gradient
// over all pixels in a fixed order. The tiled backward is future work.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pem_kernels/deform_conv_checks.h"
#include "pem_kernels/deform_conv_common.h"

namespace pem_kernels {
namespace {

constexpr int kTileM = 64;  // output pixels per block
constexpr int kTileN = 64;  // output channels per block
constexpr int kTileK = 16;  // (channel, tap) pairs per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 output micro-tile
constexpr int kElementThreads = 256;

int64_t blocks_for(int64_t count, int threads) { return (count + threads - 1) / threads; }

// Sample of channel `channel` of image `b` at output pixel (oy, ox) and tap `tap`, times the
// modulation; `mask` may be null.
template <typename scalar_t, typename acc_t>
__device__ acc_t modulated_sample(
    const ConvShape& s, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
    int64_t b, int64_t channel, int64_t tap, int64_t oy, int64_t ox) {
  const int64_t row = (channel / s.offset_group_channels()) * s.taps() + tap;
  const int64_t pixel = oy * s.out_w + ox;
  const scalar_t* offset_yx = offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  const acc_t y = sample_coordinate<acc_t>(
      oy, tap / s.kernel_w, s.stride_h, s.pad_h, s.dilation_h, static_cast<acc_t>(offset_yx[0]));
  const acc_t x = sample_coordinate<acc_t>(
      ox, tap % s.kernel_w, s.stride_w, s.pad_w, s.dilation_w,
      static_cast<acc_t>(offset_yx[s.out_pixels()]));
  const BilinearSample<acc_t> sample = bilinear_sample<acc_t>(y, x, s.height, s.width, s.width, 1);
  acc_t value = bilinear_interpolate<scalar_t, acc_t>(
      input + (b * s.in_channels + channel) * s.height * s.width, sample);
  if (mask != nullptr) {
    value *= static_cast<acc_t>(mask[(b * s.sample_rows() + row) * s.out_pixels() + pixel]);
  }
  return value;
}

// Grid (M tiles, N tiles, groups).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) deform_conv2d_forward_kernel(
    ConvShape s, const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ output) {
  __shared__ acc_t column_tile[kTileK][kTileM];
  __shared__ acc_t weight_tile[kTileK][kTileN];
  const int64_t group = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t pixels_total = s.batch * s.out_pixels();
  const int64_t group_rows = s.group_rows(), out_per_group = s.group_out_channels();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4] = {};

  for (int64_t k0 = 0; k0 < group_rows; k0 += kTileK) {
    // Consecutive threads take consecutive pixels: their offsets and outputs are contiguous.
    for (int i = threadIdx.x; i < kTileK * kTileM; i += kThreads) {
      const int kk = i / kTileM, mm = i % kTileM;
      const int64_t k = k0 + kk, m = m0 + mm;
      acc_t value = 0;
      if (k < group_rows && m < pixels_total) {
        const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
        const int64_t channel = group * s.group_channels() + k / s.taps();
        value = modulated_sample<scalar_t, acc_t>(
            s, input, offset, mask, b, channel, k % s.taps(), pixel / s.out_w, pixel % s.out_w);
      }
      column_tile[kk][mm] = value;
    }
    // Consecutive threads take consecutive k: the weight rows [C_out, C_in/groups * kh * kw]
    // are contiguous along k.
    for (int i = threadIdx.x; i < kTileK * kTileN; i += kThreads) {
      const int kk = i % kTileK, nn = i / kTileK;
      const int64_t k = k0 + kk, n = n0 + nn;
      weight_tile[kk][nn] = (k < group_rows && n < out_per_group)
          ? static_cast<acc_t>(weight[(group * out_per_group + n) * group_rows + k])
          : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = column_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = weight_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= pixels_total) continue;
    const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= out_per_group) continue;
      const int64_t channel = group * out_per_group + n;
      const acc_t add = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[channel]);
      output[(b * s.out_channels + channel) * s.out_pixels() + pixel] =
          static_cast<scalar_t>(acc[i][j] + add);
    }
  }
}

at::Tensor deform_conv2d_cuda(
    const at::Tensor& input_in, const at::Tensor& weight_in, const at::Tensor& offset_in,
    const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& bias_in,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
    int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_inputs(
      "deform_conv2d", input_in, weight_in, offset_in, mask_in, bias_in, stride_h, stride_w,
      pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups);
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;
  const dim3 grid(
      blocks_for(s.batch * s.out_pixels(), kTileM), blocks_for(s.group_out_channels(), kTileN),
      s.groups);
  TORCH_CHECK(
      grid.x < (1u << 31) && grid.y <= 65535 && grid.z <= 65535,
      "deform_conv2d (cuda): the problem is too large for one launch: ", s.batch, " images of ",
      s.out_pixels(), " pixels, ", s.out_channels, " output channels, ", s.groups, " groups");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        deform_conv2d_forward_kernel<scalar_t, acc_t>
            <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                s, input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                offset.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr,
                bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, output.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

// One thread per (image, offset group, tap, output pixel): the column gradient of each channel of
// the offset group, dcol = sum_n W[n, c, tap] * grad_out[b, n, pixel] over its weight group's
// output channels, gives the mask gradient (dcol * sample), the offset gradient
// (dcol * mask * d sample / d(y, x)) and, through atomics, the input gradient.
template <typename scalar_t, typename acc_t>
__global__ void deform_conv2d_backward_data_kernel(
    ConvShape s, const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, acc_t* grad_input, scalar_t* grad_offset,
    scalar_t* grad_mask) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.batch * s.sample_rows() * s.out_pixels()) return;
  const int64_t pixel = index % s.out_pixels();
  const int64_t row = (index / s.out_pixels()) % s.sample_rows();
  const int64_t b = index / (s.out_pixels() * s.sample_rows());
  const int64_t offset_group = row / s.taps(), tap = row % s.taps();
  const int64_t oy = pixel / s.out_w, ox = pixel % s.out_w;
  const scalar_t* offset_yx = offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  const acc_t y = sample_coordinate<acc_t>(
      oy, tap / s.kernel_w, s.stride_h, s.pad_h, s.dilation_h, static_cast<acc_t>(offset_yx[0]));
  const acc_t x = sample_coordinate<acc_t>(
      ox, tap % s.kernel_w, s.stride_w, s.pad_w, s.dilation_w,
      static_cast<acc_t>(offset_yx[s.out_pixels()]));
  const BilinearSample<acc_t> sample = bilinear_sample<acc_t>(y, x, s.height, s.width, s.width, 1);
  const int64_t mask_at = (b * s.sample_rows() + row) * s.out_pixels() + pixel;
  const acc_t modulation = mask == nullptr ? acc_t(1) : static_cast<acc_t>(mask[mask_at]);
  acc_t grad_value = 0, grad_y = 0, grad_x = 0;
  const int64_t channel_begin = offset_group * s.offset_group_channels();
  for (int64_t channel = channel_begin; channel < channel_begin + s.offset_group_channels(); ++channel) {
    const int64_t group = channel / s.group_channels();
    const int64_t local = channel % s.group_channels();
    acc_t dcol = 0;
    for (int64_t n = group * s.group_out_channels(); n < (group + 1) * s.group_out_channels(); ++n) {
      dcol += static_cast<acc_t>(weight[(n * s.group_channels() + local) * s.taps() + tap]) *
          static_cast<acc_t>(grad_output[(b * s.out_channels + n) * s.out_pixels() + pixel]);
    }
    const int64_t plane = (b * s.in_channels + channel) * s.height * s.width;
    accumulate_sample_grads<scalar_t, acc_t>(
        input + plane, sample, dcol, &grad_value, &grad_y, &grad_x);
    for (int corner = 0; corner < kBilinearCorners; ++corner) {
      if (sample.inside & (1u << corner)) {
        atomicAdd(grad_input + plane + sample.offset[corner], dcol * modulation * sample.weight[corner]);
      }
    }
  }
  scalar_t* grad_offset_yx = grad_offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  grad_offset_yx[0] = static_cast<scalar_t>(grad_y * modulation);
  grad_offset_yx[s.out_pixels()] = static_cast<scalar_t>(grad_x * modulation);
  if (mask != nullptr) grad_mask[mask_at] = static_cast<scalar_t>(grad_value);
}

// One thread per weight element (output channel, input channel of its group, tap): the sum over
// images and pixels of grad_out * modulated sample, in a fixed order (deterministic).
template <typename scalar_t, typename acc_t>
__global__ void deform_conv2d_backward_weight_kernel(
    ConvShape s, const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, scalar_t* grad_weight) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.out_channels * s.group_rows()) return;
  const int64_t out_channel = index / s.group_rows();
  const int64_t k = index % s.group_rows();
  const int64_t group = out_channel / s.group_out_channels();
  const int64_t channel = group * s.group_channels() + k / s.taps(), tap = k % s.taps();
  acc_t sum = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const scalar_t* grad_row = grad_output + (b * s.out_channels + out_channel) * s.out_pixels();
    for (int64_t pixel = 0; pixel < s.out_pixels(); ++pixel) {
      const acc_t grad = static_cast<acc_t>(grad_row[pixel]);
      if (grad != acc_t(0)) {
        sum += grad * modulated_sample<scalar_t, acc_t>(
            s, input, offset, mask, b, channel, tap, pixel / s.out_w, pixel % s.out_w);
      }
    }
  }
  grad_weight[index] = static_cast<scalar_t>(sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& input_in, const at::Tensor& weight_in,
    const at::Tensor& offset_in, const std::optional<at::Tensor>& mask_in, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_backward_inputs(
      grad_output_in, input_in, weight_in, offset_in, mask_in, stride_h, stride_w, pad_h, pad_w,
      dilation_h, dilation_w, groups, offset_groups);
  at::globalContext().alertNotDeterministic("_deform_conv2d_backward (cuda backend)");
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  at::Tensor grad_mask =
      mask.defined() ? at::zeros(mask.sizes(), mask.options()) : at::empty({0}, input.options());
  // grad_bias: a fixed-order reduction by ATen, accumulated in fp32 for half inputs.
  at::Tensor grad_bias = grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(input.scalar_type()))
                             .to(input.scalar_type());
  if (s.batch == 0) {
    return {at::zeros_like(input), grad_weight, grad_offset, grad_mask, grad_bias};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Atomics accumulate in acc_t; the result is rounded once.
        at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        const int64_t data_threads = s.batch * s.sample_rows() * s.out_pixels();
        deform_conv2d_backward_data_kernel<scalar_t, acc_t>
            <<<blocks_for(data_threads, kElementThreads), kElementThreads, 0, stream>>>(
                s, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                weight.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, grad_input_acc.data_ptr<acc_t>(),
                grad_offset.data_ptr<scalar_t>(), mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t weight_threads = s.out_channels * s.group_rows();
        deform_conv2d_backward_weight_kernel<scalar_t, acc_t>
            <<<blocks_for(weight_threads, kElementThreads), kElementThreads, 0, stream>>>(
                s, grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                offset.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<scalar_t>() : nullptr,
                grad_weight.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_input = grad_input_acc.to(input.scalar_type());
      });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace pem_kernels

// PEM-CA's feature projection on CUDA, fused for inference (mirrors
// csrc/cpu/local_representation.cpp):
//
//   keys[b, p, :] = out_weight @ dwconv3x3(BN(memory + pos))[b, :, p] + out_bias
//
// with BN in eval mode as a per-channel affine and the depthwise conv's zero padding applied after
// BN (nn.Conv2d pads its BN-normalized input). The modules make three passes over the [B, C, H, W]
// map before their Linear (the add, the BN, the conv: each reads and writes the whole map, 32 MiB
// per pass in fp32 at PEM's 1/8 level of 1024x2048). Here one kernel reads memory and pos once and
// writes the conv features pixel-major ([B, H*W, C], the Linear's operand), and the Linear is one
// cuBLAS GEMM through at::addmm: the GEMM the Linear runs, under torch's precision rules (IEEE or
// TF32 in fp32 as torch.get_float32_matmul_precision() says). The features are computed in acc_t
// and rounded once to the input dtype (the modules round after the add, the BN and the conv).
// With normalize, the GEMM runs in acc_t and every row is divided by its L2 norm before one
// rounding, as on the CPU. PEMCrossAttention does not ask for that on this backend: the selection
// normalizes the keys (normalize_keys) at the cost of one norm pass, where this would be a GEMM in
// acc_t for fp16/bf16 plus a norm pass and a division pass.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "pem_kernels/check.h"
#include "pem_kernels/local_representation_checks.h"

namespace pem_kernels {
namespace {

// A block computes kTilePixels consecutive pixels of `tile_rows` consecutive image rows for
// kTileChannels channels, row after row, with the BN'd source rows the 3x3 window needs in a
// ring of three lines: each source row is read from memory once per block, where a block of one
// row reads three rows for one (the H200 run of 2026-11-27: 0.113 ms at 32768 px, C = 256, fp32,
// about 5x the time of its bytes at HBM's rate). kTileChannels is a warp: a warp's lanes take
// consecutive channels of one pixel, so the pixel-major stores of the features are one 128-byte
// segment per warp (fp32).
constexpr int kTilePixels = 32;
constexpr int kTileChannels = 32;
constexpr int kThreads = 256;
// Rows per block at most: the host halves it while the grid would have fewer than
// kBlocksPerSM blocks per SM (small maps keep their parallelism).
constexpr int kMaxTileRows = 8;
constexpr int kBlocksPerSM = 4;
// A BN'd source row of the tile with the two columns the 3x3 window reaches beyond it.
constexpr int kLine = kTilePixels + 2;
// Shared-memory words per channel: its three ring lines, plus one so that consecutive channels
// (the lanes of a warp) start 103 words apart, an odd stride: no bank conflicts between lanes.
constexpr int kChannelStride = 3 * kLine + 1;
// F.normalize's eps: rows are divided by max(||row||, eps).
constexpr double kNormalizeEps = 1e-12;

// features[b, h * W + w, c] = dw_bias[c] + sum over the 3x3 window of dw_weight[c] times
// BN(memory + pos)[b, c] (zero outside the image), for the block's tile and channel tile.
// BN in eval mode from its running statistics and optional affine (bn_weight, bn_bias may be
// null), as the CPU kernel computes it: scale = weight / sqrt(var + eps), shift = bias -
// mean * scale, in acc_t. blockIdx.x = (b * row_groups + group) * row_tiles + tile (rows
// group * tile_rows onwards, columns tile * kTilePixels onwards), blockIdx.y = channel tile.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bn_depthwise_conv_kernel(
    const scalar_t* __restrict__ memory, const scalar_t* __restrict__ pos,
    const scalar_t* __restrict__ bn_mean, const scalar_t* __restrict__ bn_var,
    const scalar_t* __restrict__ bn_weight, const scalar_t* __restrict__ bn_bias, acc_t bn_eps,
    const scalar_t* __restrict__ dw_weight, const scalar_t* __restrict__ dw_bias,
    int64_t channels, int64_t height, int64_t width, int64_t row_tiles, int64_t row_groups,
    int tile_rows, scalar_t* __restrict__ features) {
  __shared__ acc_t lines[kTileChannels * kChannelStride];
  __shared__ acc_t scale[kTileChannels], shift[kTileChannels];
  const int64_t tile = blockIdx.x % row_tiles;
  const int64_t h0 = (blockIdx.x / row_tiles) % row_groups * tile_rows;
  const int64_t b = blockIdx.x / row_tiles / row_groups;
  const int64_t w0 = tile * kTilePixels;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileChannels;
  const int64_t plane = height * width;
  if (threadIdx.x < kTileChannels && c0 + threadIdx.x < channels) {
    const int64_t channel = c0 + threadIdx.x;
    // IEEE division and square root (nvcc's defaults without fast math), as on the CPU.
    acc_t s = acc_t(1) / std::sqrt(static_cast<acc_t>(bn_var[channel]) + bn_eps);
    if (bn_weight != nullptr) s *= static_cast<acc_t>(bn_weight[channel]);
    scale[threadIdx.x] = s;
    shift[threadIdx.x] = (bn_bias != nullptr ? static_cast<acc_t>(bn_bias[channel]) : acc_t(0)) -
        static_cast<acc_t>(bn_mean[channel]) * s;
  }
  __syncthreads();
  // Source row source_h (h0 - 1 <= source_h <= h0 + tile_rows), BN'd, into its ring line; the
  // line of row source_h - 3, which it replaces, is no longer read. Consecutive threads read
  // consecutive pixels of one channel.
  const auto load_line = [&](int64_t source_h) {
    const int line = static_cast<int>((source_h - h0 + 1) % 3);
    for (int i = threadIdx.x; i < kTileChannels * kLine; i += kThreads) {
      const int c = i / kLine, x = i % kLine;
      const int64_t channel = c0 + c, source_w = w0 + x - 1;
      acc_t value = 0;  // the conv's zero padding (and channels past C, never read)
      if (channel < channels && source_h >= 0 && source_h < height && source_w >= 0 &&
          source_w < width) {
        const int64_t at = (b * channels + channel) * plane + source_h * width + source_w;
        acc_t sum = static_cast<acc_t>(memory[at]);
        if (pos != nullptr) sum += static_cast<acc_t>(pos[at]);
        value = sum * scale[c] + shift[c];
      }
      lines[c * kChannelStride + line * kLine + x] = value;
    }
  };
  const int c = threadIdx.x % kTileChannels;
  const int64_t channel = c0 + c;
  acc_t w9[9] = {};
  acc_t bias = 0;
  if (channel < channels) {
    for (int k = 0; k < 9; ++k) w9[k] = static_cast<acc_t>(dw_weight[channel * 9 + k]);
    bias = static_cast<acc_t>(dw_bias[channel]);
  }
  load_line(h0 - 1);
  load_line(h0);
  const int64_t h_end = std::min(height, h0 + tile_rows);
  for (int64_t h = h0; h < h_end; ++h) {
    load_line(h + 1);
    __syncthreads();
    if (channel < channels) {
      const int first = static_cast<int>((h - h0) % 3);
      const acc_t* l0 = lines + c * kChannelStride + first * kLine;
      const acc_t* l1 = lines + c * kChannelStride + (first + 1) % 3 * kLine;
      const acc_t* l2 = lines + c * kChannelStride + (first + 2) % 3 * kLine;
      scalar_t* out = features + (b * plane + h * width + w0) * channels + channel;
      for (int x = threadIdx.x / kTileChannels; x < kTilePixels && w0 + x < width;
           x += kThreads / kTileChannels) {
        // The CPU kernel's order of the nine products.
        const acc_t value = bias + w9[0] * l0[x] + w9[1] * l0[x + 1] + w9[2] * l0[x + 2] +
            w9[3] * l1[x] + w9[4] * l1[x + 1] + w9[5] * l1[x + 2] + w9[6] * l2[x] +
            w9[7] * l2[x + 1] + w9[8] * l2[x + 2];
        out[x * channels] = static_cast<scalar_t>(value);
      }
    }
    __syncthreads();  // before the next load_line replaces row h - 1's line
  }
}

// Rows per block: kMaxTileRows, halved while the grid would have fewer than kBlocksPerSM blocks
// per SM.
int tile_rows_for(int64_t batch, int64_t height, int64_t row_tiles, int64_t channel_blocks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = kBlocksPerSM * sms;
  int rows = kMaxTileRows;
  while (rows > 1 &&
         batch * ((height + rows - 1) / rows) * row_tiles * channel_blocks < wanted) {
    rows /= 2;
  }
  return rows;
}

at::Tensor local_representation_cuda(
    const at::Tensor& memory_in, const std::optional<at::Tensor>& pos_in, const at::Tensor& bn_mean,
    const at::Tensor& bn_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double bn_eps, const at::Tensor& dw_weight,
    const at::Tensor& dw_bias, const at::Tensor& out_weight, const at::Tensor& out_bias,
    bool normalize) {
  check_local_representation_inputs(memory_in, pos_in, bn_mean, bn_var, bn_weight, bn_bias,
                                    dw_weight, dw_bias, out_weight, out_bias);
  const c10::cuda::CUDAGuard device_guard(memory_in.device());
  // ATen ops run on these internally (addmm, views); detached inputs keep them out of autograd.
  const at::Tensor memory = memory_in.detach().contiguous();
  const at::Tensor pos = pos_in.has_value() ? pos_in->detach().contiguous() : at::Tensor();
  const int64_t batch = memory.size(0), channels = memory.size(1);
  const int64_t height = memory.size(2), width = memory.size(3);
  const int64_t pixels = batch * height * width, out_channels = out_weight.size(0);
  if (pixels * out_channels == 0) {
    return at::empty({batch, height * width, out_channels}, memory.options());
  }
  const int64_t row_tiles = (width + kTilePixels - 1) / kTilePixels;
  const int64_t channel_blocks = (channels + kTileChannels - 1) / kTileChannels;
  const int tile_rows = tile_rows_for(batch, height, row_tiles, channel_blocks);
  const int64_t row_groups = (height + tile_rows - 1) / tile_rows;
  const int64_t row_blocks = batch * row_groups * row_tiles;
  PEM_CHECK(row_blocks <= std::numeric_limits<int32_t>::max(),
            "local_representation: memory of shape ", memory.sizes(),
            " needs more than 2^31 - 1 blocks of ", kTilePixels, " pixels");
  PEM_CHECK(channel_blocks <= 65535, "local_representation: memory must have at most ",
            65535 * kTileChannels, " channels, got ", channels);
  const auto acc_dtype = at::toOpMathType(memory.scalar_type());
  at::Tensor features = at::empty({pixels, channels}, memory.options());
  if (channels > 0) {
    // Contiguous already in a module (no copy then); optional affine as null pointers.
    const at::Tensor mean = bn_mean.detach().contiguous(), var = bn_var.detach().contiguous();
    const at::Tensor bn_w = bn_weight.has_value() ? bn_weight->detach().contiguous() : at::Tensor();
    const at::Tensor bn_b = bn_bias.has_value() ? bn_bias->detach().contiguous() : at::Tensor();
    const at::Tensor weight9 = dw_weight.detach().reshape({channels, 9}).contiguous();
    const at::Tensor bias = dw_bias.detach().contiguous();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, memory.scalar_type(), "local_representation_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          bn_depthwise_conv_kernel<scalar_t, acc_t>
              <<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(channel_blocks)),
                 kThreads, 0, stream>>>(
                  memory.const_data_ptr<scalar_t>(),
                  pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr,
                  mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
                  bn_w.defined() ? bn_w.const_data_ptr<scalar_t>() : nullptr,
                  bn_b.defined() ? bn_b.const_data_ptr<scalar_t>() : nullptr,
                  static_cast<acc_t>(bn_eps), weight9.const_data_ptr<scalar_t>(),
                  bias.const_data_ptr<scalar_t>(), channels, height, width, row_tiles,
                  row_groups, tile_rows, features.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  const at::Tensor weight = out_weight.detach(), out_b = out_bias.detach();
  at::Tensor keys;
  if (!normalize) {
    keys = at::addmm(out_b, features, weight.t());
  } else {
    // The norm of the unrounded rows (op schema): the GEMM's result in acc_t, rounded once.
    const at::Tensor rows =
        at::addmm(out_b.to(acc_dtype), features.to(acc_dtype), weight.to(acc_dtype).t());
    // F.normalize: a NaN norm stays NaN through clamp_min, a zero row is divided by eps.
    keys = (rows / at::linalg_vector_norm(rows, 2, {-1}, /*keepdim=*/true).clamp_min(kNormalizeEps))
               .to(memory.scalar_type());
  }
  return keys.view({batch, height * width, out_channels});
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("local_representation", &local_representation_cuda);
}

}  // namespace pem_kernels

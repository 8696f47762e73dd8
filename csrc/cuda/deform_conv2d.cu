// deform_conv2d on CUDA: the semantics of csrc/cpu/deform_conv2d.cpp (torchvision's DCNv2), with
// the same argument checks (deform_conv_checks.h) and sampling rules (deform_conv_common.h).
//
// Memory formats, as on the CPU: a channels_last input is read in place through its strides (no
// NCHW copy) and its gradient is written in the same layout; any other layout is made contiguous
// NCHW first. offset, mask and grad_output are made contiguous; the output is contiguous NCHW.
//
// Forward: an implicit GEMM per weight group, out[m, n] = sum_k col[m, k] * W[n, k] with m an
// output pixel, n an output channel and k a (tap, input channel) pair; each block computes a
// 64 x 64 output tile and gathers its [16 x 64] column tile (bilinear samples times the
// modulation) straight into shared memory, so the column matrix never exists. fp32 accumulation.
// When 16 consecutive k share a tap and an offset group (channel counts that are multiples of
// 16, PEM's case) the tile's 64 sample positions are computed once and shared by the channels,
// and a channels_last input is read 4 channels per vector load (Gather below). The K loop is
// software-pipelined: the next stage's global loads are in flight while the current stage's
// product runs.
//
// Backward: the structure of the CPU backward, one image and one block of output pixels at a
// time (the block size depends on the shape only), each step parallel over the block:
//   1. the modulated column tile [C_in * taps, pixels] in acc_t (one thread per offset group, tap
//      and pixel computes the sample position once for all channels of its offset group);
//   2. grad_weight_g += grad_out_g @ columns_g^T and 3. grad_columns_g = W_g^T @ grad_out_g,
//      cuBLAS GEMMs in acc_t;
//   4. offset and mask gradients: one thread per (offset group, tap, pixel) sums its channels in
//      order;
//   5. grad_input, the scatter of the column gradient through the bilinear weights. By default
//      (as torchvision) one thread per (channel, tap, pixel) adds its share to the four corners
//      with atomics: fast, but the order of the additions, and so the last bits of grad_input,
//      vary from run to run. Under torch.use_deterministic_algorithms(True) the scatter is
//      turned into a gather instead: every (offset group, tap, pixel, corner) of the block is
//      listed with the corner's input pixel as a sort key; a stable sort and a searchsorted give
//      each (offset group, input pixel) its list of entries in entry order, and one thread per
//      (channel, input pixel) adds them up in that order (the order in which the CPU kernel adds
//      them) onto grad_input.
// Every other gradient element is written by one thread per launch with a fixed order of
// additions, so in deterministic mode the whole backward is bit-identical from run to run (its
// cuBLAS calls follow torch's rules there, i.e. CUBLAS_WORKSPACE_CONFIG must be set as for any
// CUDA matmul). fp16/bf16 gradients are computed in fp32 and rounded once. Extra memory: two
// column tiles of at most kBackwardTileBytes each, in deterministic mode the entry list (about
// 30 bytes per (offset group, tap, pixel, corner) of a block) and, for fp16/bf16, fp32 copies of
// one image's input gradient and of the weight gradient.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "pem_kernels/check.h"
#include "pem_kernels/deform_conv_checks.h"
#include "pem_kernels/deform_conv_common.h"

namespace pem_kernels {
namespace {

constexpr int kTileM = 64;  // output pixels per block
constexpr int kTileN = 64;  // output channels per block
constexpr int kTileK = 16;  // (channel, tap) pairs per shared-memory stage
// 16 x 16 threads, each owning a 4 x 4 output micro-tile of 4 consecutive pixels x 4 consecutive
// channels, so that its operands are one 16-byte shared-memory load each (LDS.128): the inner
// product then issues 2 loads per 16 FMAs instead of 8, which kept it bound by shared memory.
constexpr int kThreads = 256;
constexpr int kElementThreads = 256;

int64_t blocks_for(int64_t count, int threads) { return (count + threads - 1) / threads; }

// Element strides of a 4-D [B, C, H, W] tensor of any layout (NCHW, channels_last).
struct Strides4 {
  int64_t image, channel, row, col;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The sample of (offset group, tap) row `row` of image `b` at output pixel `pixel`: its corners
// as element offsets row * stride_y + col * stride_x within one channel.
template <typename scalar_t, typename acc_t>
__device__ BilinearSample<acc_t> sample_at(
    const ConvShape& s, const scalar_t* offset, int64_t b, int64_t row, int64_t pixel,
    int64_t stride_y, int64_t stride_x) {
  const int64_t tap = row % s.taps();
  const int64_t oy = pixel / s.out_w, ox = pixel % s.out_w;
  const scalar_t* offset_yx = offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  const acc_t y = sample_coordinate<acc_t>(
      oy, tap / s.kernel_w, s.stride_h, s.pad_h, s.dilation_h, static_cast<acc_t>(offset_yx[0]));
  const acc_t x = sample_coordinate<acc_t>(
      ox, tap % s.kernel_w, s.stride_w, s.pad_w, s.dilation_w,
      static_cast<acc_t>(offset_yx[s.out_pixels()]));
  return bilinear_sample<acc_t>(y, x, s.height, s.width, stride_y, stride_x);
}

// The modulation of row `row` of image `b` at output pixel `pixel`; 1 without a mask.
template <typename scalar_t, typename acc_t>
__device__ acc_t modulation_at(
    const ConvShape& s, const scalar_t* mask, int64_t b, int64_t row, int64_t pixel) {
  return mask == nullptr
      ? acc_t(1)
      : static_cast<acc_t>(mask[(b * s.sample_rows() + row) * s.out_pixels() + pixel]);
}

// Sample of channel `channel` of image `b` at output pixel `pixel` and tap `tap`, times the
// modulation; `mask` may be null.
template <typename scalar_t, typename acc_t>
__device__ acc_t modulated_sample(
    const ConvShape& s, const Strides4& in, const scalar_t* input, const scalar_t* offset,
    const scalar_t* mask, int64_t b, int64_t channel, int64_t tap, int64_t pixel) {
  const int64_t row = (channel / s.offset_group_channels()) * s.taps() + tap;
  const BilinearSample<acc_t> sample =
      sample_at<scalar_t, acc_t>(s, offset, b, row, pixel, in.row, in.col);
  return bilinear_interpolate<scalar_t, acc_t>(input + b * in.image + channel * in.channel, sample) *
      modulation_at<scalar_t, acc_t>(s, mask, b, row, pixel);
}

// How the forward kernel gathers a [kTileK x kTileM] column tile.
enum class Gather {
  // Every element computes its own sample position: any channel counts.
  kPerElement,
  // Every stage of kTileK (tap, channel) pairs lies within one tap and one offset group
  // (C_in / groups and C_in / offset_groups are multiples of kTileK): the tile's kTileM samples
  // are computed once per (offset group, tap) into shared memory and serve all its channels.
  kSharedSamples,
  // kSharedSamples on a channels_last input with 4-aligned channels: one vector load fetches
  // kVectorChannels consecutive channels of a corner.
  kVectorizedChannels,
};

constexpr int kVectorChannels = 4;

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kVectorChannels) ChannelVector {
  scalar_t value[kVectorChannels];
};

// Grid (M tiles, N tiles, groups). `weight` is laid out [C_out, kh, kw, C_in / groups], so that
// k = tap * (C_in / groups) + channel and a stage of kTileK consecutive k usually shares one tap.
//
// Software-pipelined: the global loads of stage s + 1 (its input corners and weights, into
// registers) are issued before the product of stage s runs from shared memory, so that their
// latency hides behind its FMAs; they are blended, modulated and stored to shared memory after
// it. Each thread gathers kVectorChannels channels of one pixel per stage.
template <typename scalar_t, typename acc_t, Gather kGather>
__global__ void __launch_bounds__(kThreads) deform_conv2d_forward_kernel(
    ConvShape s, Strides4 in, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ output) {
  constexpr int kPerThread = kTileK * kTileM / kThreads;  // column elements per thread and stage
  static_assert(kPerThread == kVectorChannels && kTileK * kTileN == kPerThread * kThreads);
  constexpr bool kSampleTables = kGather != Gather::kPerElement;
  __shared__ __align__(16) acc_t column_tile[kTileK][kTileM];
  __shared__ __align__(16) acc_t weight_tile[kTileK][kTileN];
  // The samples of the tile's pixels for one (offset group, tap) row (kSharedSamples and
  // kVectorizedChannels): corner element offsets from the input's start (image included),
  // bilinear weights, the modulation and inside flags (0 past the last pixel). The modulation
  // multiplies the blended sample, not each corner weight, as in torchvision: a NaN mask then
  // gives NaN for a sample outside the image too, and an inf mask times a zero corner weight
  // gives no NaN.
  __shared__ int64_t corner_offset[kTileM][kBilinearCorners];
  __shared__ acc_t corner_weight[kTileM][kBilinearCorners];
  __shared__ acc_t sample_modulation[kTileM];
  __shared__ uint8_t corner_inside[kTileM];
  const int64_t group = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t pixels_total = s.batch * s.out_pixels();
  const int64_t group_rows = s.group_rows(), out_per_group = s.group_out_channels();
  const int64_t group_channels = s.group_channels();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // The thread's pixel and its channels (rows of the column tile). Consecutive threads take
  // consecutive pixels (their offsets, and in NCHW their samples, are adjacent) or, on
  // kVectorizedChannels, consecutive channel vectors of one pixel (adjacent memory).
  constexpr int kVectors = kTileK / kVectorChannels;
  const int mm = kGather == Gather::kVectorizedChannels ? threadIdx.x / kVectors
                                                        : threadIdx.x % kTileM;
  const auto tile_row = [&](int r) {
    return kGather == Gather::kVectorizedChannels
        ? static_cast<int>(threadIdx.x % kVectors) * kVectorChannels + r
        : static_cast<int>(threadIdx.x / kTileM) + r * (kThreads / kTileM);
  };
  // Registers from a stage's loads to its store: the corners of the thread's samples (sample
  // tables) or its modulated samples (kPerElement), and its weight tile elements.
  acc_t corner_values[kPerThread][kBilinearCorners];
  acc_t element_values[kPerThread];
  acc_t weight_values[kPerThread];
  acc_t acc[4][4] = {};
  int64_t tables_row = -1;  // the (offset group, tap) row the sample tables hold

  // Makes the sample tables hold the row of stage k0; the same decision in every thread, and a
  // barrier after a rewrite. Called only when no thread reads the tables.
  const auto prepare_tables = [&](int64_t k0) {
    const int64_t c0 = group * group_channels + k0 % group_channels;
    const int64_t row = (c0 / s.offset_group_channels()) * s.taps() + k0 / group_channels;
    if (row == tables_row) return;
    if (threadIdx.x < kTileM) {
      const int64_t m = m0 + threadIdx.x;
      uint8_t inside = 0;
      acc_t modulation = 0;
      if (m < pixels_total) {
        const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
        const BilinearSample<acc_t> sample =
            sample_at<scalar_t, acc_t>(s, offset, b, row, pixel, in.row, in.col);
        modulation = modulation_at<scalar_t, acc_t>(s, mask, b, row, pixel);
        for (int corner = 0; corner < kBilinearCorners; ++corner) {
          corner_offset[threadIdx.x][corner] = b * in.image + sample.offset[corner];
          corner_weight[threadIdx.x][corner] = sample.weight[corner];
        }
        inside = sample.inside;
      }
      sample_modulation[threadIdx.x] = modulation;
      corner_inside[threadIdx.x] = inside;
    }
    tables_row = row;
    __syncthreads();
  };

  // Issues the global loads of stage k0 into registers.
  const auto load_stage = [&](int64_t k0) {
    if constexpr (kGather == Gather::kPerElement) {
      const int64_t m = m0 + mm;
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int64_t k = k0 + tile_row(r);
        element_values[r] = k < group_rows && m < pixels_total
            ? modulated_sample<scalar_t, acc_t>(
                  s, in, input, offset, mask, m / s.out_pixels(),
                  group * group_channels + k % group_channels, k / group_channels,
                  m % s.out_pixels())
            : acc_t(0);
      }
    } else {
      // Stages lie within one tap and one offset group: every row of the tile has its corners
      // at the offsets of the tables, in channel c0 + tile row.
      const scalar_t* stage_input = input + (group * group_channels + k0 % group_channels) *
          in.channel;
      const uint8_t inside = corner_inside[mm];
#pragma unroll
      for (int corner = 0; corner < kBilinearCorners; ++corner) {
        const bool read = inside & (1u << corner);
        if constexpr (kGather == Gather::kSharedSamples) {
#pragma unroll
          for (int r = 0; r < kPerThread; ++r) {
            corner_values[r][corner] = read
                ? static_cast<acc_t>(
                      stage_input[tile_row(r) * in.channel + corner_offset[mm][corner]])
                : acc_t(0);
          }
        } else {
          ChannelVector<scalar_t> v{};
          if (read) {
            v = *reinterpret_cast<const ChannelVector<scalar_t>*>(
                stage_input + tile_row(0) + corner_offset[mm][corner]);  // channel stride 1
          }
#pragma unroll
          for (int r = 0; r < kPerThread; ++r) corner_values[r][corner] = v.value[r];
        }
      }
    }
    // Consecutive threads take consecutive k: the weight rows are contiguous along k.
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int i = threadIdx.x + r * kThreads;
      const int64_t k = k0 + i % kTileK, n = n0 + i / kTileK;
      weight_values[r] = k < group_rows && n < out_per_group
          ? static_cast<acc_t>(weight[(group * out_per_group + n) * group_rows + k])
          : acc_t(0);
    }
  };

  // Blends and modulates the loaded stage (with the tables it was loaded with) into shared memory.
  const auto store_stage = [&]() {
    if constexpr (kGather == Gather::kPerElement) {
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) column_tile[tile_row(r)][mm] = element_values[r];
    } else {
      const uint8_t inside = corner_inside[mm];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        acc_t value = 0;
#pragma unroll
        for (int corner = 0; corner < kBilinearCorners; ++corner) {
          if (inside & (1u << corner)) value += corner_weight[mm][corner] * corner_values[r][corner];
        }
        column_tile[tile_row(r)][mm] = value * sample_modulation[mm];
      }
    }
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int i = threadIdx.x + r * kThreads;
      weight_tile[i % kTileK][i / kTileK] = weight_values[r];
    }
  };

  if constexpr (kSampleTables) prepare_tables(0);
  load_stage(0);
  for (int64_t k0 = 0; k0 < group_rows; k0 += kTileK) {
    store_stage();
    __syncthreads();
    if (k0 + kTileK < group_rows) {
      if constexpr (kSampleTables) prepare_tables(k0 + kTileK);
      load_stage(k0 + kTileK);
    }
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = column_tile[kk][4 * ty + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = weight_tile[kk][4 * tx + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
    }
    __syncthreads();  // before the next store_stage overwrites the tiles
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + 4 * ty + i;
    if (m >= pixels_total) continue;
    const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 4 * tx + j;
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
  const at::Tensor input = kernel_input(input_in);
  // [C_out, kh, kw, C_in / groups]: (tap, channel) order along k (a copy of the small weight).
  const at::Tensor weight = weight_in.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;
  const int64_t pixel_blocks = blocks_for(s.batch * s.out_pixels(), kTileM);
  const int64_t channel_blocks = blocks_for(s.group_out_channels(), kTileN);
  PEM_CHECK(
      pixel_blocks < (int64_t{1} << 31) && channel_blocks <= 65535 && s.groups <= 65535,
      "deform_conv2d (cuda): the problem is too large for one launch: ", s.batch, " images of ",
      s.out_pixels(), " pixels, ", s.out_channels, " output channels, ", s.groups, " groups");
  const dim3 grid(pixel_blocks, channel_blocks, s.groups);
  const Strides4 in = strides_of(input);
  const bool shared_samples =
      s.group_channels() % kTileK == 0 && s.offset_group_channels() % kTileK == 0;
  // Channel vectors start at multiples of kVectorChannels elements (c0 is a multiple of kTileK;
  // the row, column and image strides of channels_last are multiples of C_in).
  const bool vectorized = shared_samples && in.channel == 1 &&
      s.in_channels % kVectorChannels == 0 &&
      reinterpret_cast<uintptr_t>(input.const_data_ptr()) %
              (kVectorChannels * input.element_size()) == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto launch = [&](auto gather) {
          deform_conv2d_forward_kernel<scalar_t, acc_t, decltype(gather)::value>
              <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                  s, in, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                  offset.const_data_ptr<scalar_t>(),
                  mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr,
                  bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                  output.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (vectorized) {
          launch(std::integral_constant<Gather, Gather::kVectorizedChannels>{});
        } else if (shared_samples) {
          launch(std::integral_constant<Gather, Gather::kSharedSamples>{});
        } else {
          launch(std::integral_constant<Gather, Gather::kPerElement>{});
        }
      });
  return output;
}

// Upper bound of each backward column tile (the columns and their gradient): large enough that the
// GEMMs over a tile fill the GPU, small enough to stay well below torchvision's im2col buffer.
constexpr int64_t kBackwardTileBytes = 32 << 20;
// Pixel blocks are multiples of this (except the last block of an image).
constexpr int64_t kPixelAlign = 128;

// Output pixels per backward block: a function of the shape only, so that grad_weight is always
// accumulated in the same order.
int64_t backward_block_pixels(const ConvShape& s, int64_t element_size) {
  const int64_t column_bytes = s.in_channels * s.taps() * element_size;
  const int64_t by_size = kBackwardTileBytes / column_bytes / kPixelAlign * kPixelAlign;
  return std::min(std::max(by_size, kPixelAlign), s.out_pixels());
}

// Step 1. One thread per (channel chunk, offset group * taps + tap, pixel of the block): the
// modulated samples of up to kFillChannels channels of the offset group,
// columns[(c * taps + tap) * count + j]. A thread per sample over all of the group's channels
// left too few threads in flight (PEM: 9 x 7168 per block, each looping over 128 channels; 0.1 ms
// per 33 MB block on an H100); a chunk recomputes its sample's coordinates, which is cheap.
constexpr int64_t kFillChannels = 16;

__host__ __device__ inline int64_t fill_channel_chunks(const ConvShape& s) {
  return (s.offset_group_channels() + kFillChannels - 1) / kFillChannels;
}

// The (channel chunk, row, pixel j of the block) item of thread `index` in steps 1 and 5 (j
// fastest: consecutive threads on consecutive pixels, so column accesses are coalesced) and its
// channels [c_begin, c_end); `valid` is false past the last item.
struct ChunkItem {
  int64_t row, j, tap, c_begin, c_end;
  bool valid;
};

__device__ __forceinline__ ChunkItem chunk_item(const ConvShape& s, int64_t index, int64_t count) {
  ChunkItem item;
  item.valid = index < fill_channel_chunks(s) * s.sample_rows() * count;
  item.j = index % count;
  item.row = index / count % s.sample_rows();
  item.tap = item.row % s.taps();
  const int64_t group_begin = (item.row / s.taps()) * s.offset_group_channels();
  const int64_t group_end = group_begin + s.offset_group_channels();
  item.c_begin = group_begin + index / count / s.sample_rows() * kFillChannels;
  item.c_end = item.c_begin + kFillChannels < group_end ? item.c_begin + kFillChannels : group_end;
  return item;
}

template <typename scalar_t, typename acc_t>
__global__ void fill_columns_kernel(
    ConvShape s, Strides4 in, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b,
    int64_t pixel0, int64_t count, acc_t* __restrict__ columns) {
  const ChunkItem item =
      chunk_item(s, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, count);
  if (!item.valid) return;
  const int64_t j = item.j;
  const BilinearSample<acc_t> sample =
      sample_at<scalar_t, acc_t>(s, offset, b, item.row, pixel0 + j, in.row, in.col);
  const acc_t modulation = modulation_at<scalar_t, acc_t>(s, mask, b, item.row, pixel0 + j);
  for (int64_t c = item.c_begin; c < item.c_end; ++c) {
    columns[(c * s.taps() + item.tap) * count + j] =
        modulation *
        bilinear_interpolate<scalar_t, acc_t>(input + b * in.image + c * in.channel, sample);
  }
}

// Step 4. The offset and mask gradients: per (row, pixel of the block) a sum over the offset
// group's channels. The column's gradient reaches the unmodulated sample times the modulation,
// and the modulation times the sample. A block is kCoordinateWarps warps x 32 lanes: lane l of
// every warp works on item blockIdx.x * 32 + l (item = row * count + j: consecutive lanes on
// consecutive pixels, so the grad_columns reads are coalesced) and warp w on the channel chunks
// w, w + kCoordinateWarps, ... (kFillChannels channels each, in channel order); the warps' sums
// are then added in warp order, so the result is the same from run to run. One thread per item
// over all of the group's channels left too few threads in flight (PEM: 0.48 ms of the 4.33 ms
// forward+backward at (1,128,128,256) on an H100).
constexpr int kCoordinateWarps = kElementThreads / 32;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads) coordinate_grads_kernel(
    ConvShape s, Strides4 in, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b,
    int64_t pixel0, int64_t count, const acc_t* __restrict__ grad_columns,
    scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  __shared__ acc_t partial[kCoordinateWarps][3][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool active = index < s.sample_rows() * count;  // every thread reaches the barrier
  const int64_t row = index / count, j = index % count, pixel = pixel0 + j;
  acc_t sum_value = 0, sum_dy = 0, sum_dx = 0;
  if (active) {
    const int64_t tap = row % s.taps(), channels = s.offset_group_channels();
    const BilinearSample<acc_t> sample =
        sample_at<scalar_t, acc_t>(s, offset, b, row, pixel, in.row, in.col);
    const int64_t group_begin = (row / s.taps()) * channels, group_end = group_begin + channels;
    for (int64_t c0 = group_begin + warp * kFillChannels; c0 < group_end;
         c0 += kCoordinateWarps * kFillChannels) {
      for (int64_t c = c0; c < c0 + kFillChannels && c < group_end; ++c) {
        accumulate_sample_grads<scalar_t, acc_t>(
            input + b * in.image + c * in.channel, sample,
            grad_columns[(c * s.taps() + tap) * count + j], &sum_value, &sum_dy, &sum_dx);
      }
    }
  }
  partial[warp][0][lane] = sum_value;
  partial[warp][1][lane] = sum_dy;
  partial[warp][2][lane] = sum_dx;
  __syncthreads();
  if (warp != 0 || !active) return;
  for (int w = 1; w < kCoordinateWarps; ++w) {
    sum_value += partial[w][0][lane];
    sum_dy += partial[w][1][lane];
    sum_dx += partial[w][2][lane];
  }
  const acc_t modulation = modulation_at<scalar_t, acc_t>(s, mask, b, row, pixel);
  scalar_t* grad_y = grad_offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  grad_y[0] = static_cast<scalar_t>(modulation * sum_dy);
  grad_y[s.out_pixels()] = static_cast<scalar_t>(modulation * sum_dx);
  if (grad_mask != nullptr) {
    grad_mask[(b * s.sample_rows() + row) * s.out_pixels() + pixel] = static_cast<scalar_t>(sum_value);
  }
}

// Step 5a. One thread per (row, pixel of the block): its four corners as entries
// e = (row * count + j) * 4 + corner of the block's entry list, with the sort key
// offset group * H * W + the corner's input pixel (y * W + x), or H * W * offset_groups (sorts
// last) for a corner outside the image, and the weight bilinear weight * modulation.
template <typename scalar_t, typename acc_t>
__global__ void corner_entries_kernel(
    ConvShape s, const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
    int64_t b, int64_t pixel0, int64_t count, int64_t* __restrict__ keys,
    acc_t* __restrict__ weights) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.sample_rows() * count) return;
  const int64_t row = index / count, j = index % count;
  const int64_t image_pixels = s.height * s.width;
  const BilinearSample<acc_t> sample =
      sample_at<scalar_t, acc_t>(s, offset, b, row, pixel0 + j, s.width, 1);
  const acc_t modulation = modulation_at<scalar_t, acc_t>(s, mask, b, row, pixel0 + j);
  const int64_t key0 = (row / s.taps()) * image_pixels;
  for (int corner = 0; corner < kBilinearCorners; ++corner) {
    const bool inside = sample.inside & (1u << corner);
    keys[index * kBilinearCorners + corner] =
        inside ? key0 + sample.offset[corner] : s.offset_groups * image_pixels;
    weights[index * kBilinearCorners + corner] = inside ? sample.weight[corner] * modulation : acc_t(0);
  }
}

// Step 5b. One thread per (channel, input pixel): adds the entries of its (offset group, input
// pixel), in entry order (tap, pixel, corner), weight * grad_columns[(c * taps + tap), j], onto
// grad_input. Consecutive threads take consecutive pixels for NCHW and consecutive channels for
// channels_last, so that their grad_input elements are adjacent.
template <typename acc_t>
__global__ void input_grad_kernel(
    ConvShape s, Strides4 grad_in, bool channel_fastest, int64_t count,
    const int64_t* __restrict__ entry_begin, const int64_t* __restrict__ order,
    const acc_t* __restrict__ weights, const acc_t* __restrict__ grad_columns,
    acc_t* __restrict__ grad_image) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t image_pixels = s.height * s.width;
  if (index >= s.in_channels * image_pixels) return;
  const int64_t c = channel_fastest ? index % s.in_channels : index / image_pixels;
  const int64_t p = channel_fastest ? index / s.in_channels : index % image_pixels;
  const int64_t list = (c / s.offset_group_channels()) * image_pixels + p;
  const int64_t begin = entry_begin[list], end = entry_begin[list + 1];
  if (begin == end) return;
  acc_t* grad = grad_image + c * grad_in.channel + (p / s.width) * grad_in.row +
      (p % s.width) * grad_in.col;
  acc_t sum = *grad;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t entry = order[i];
    const int64_t sample = entry / kBilinearCorners;  // row * count + j
    const int64_t tap = (sample / count) % s.taps(), j = sample % count;
    sum += weights[entry] * grad_columns[(c * s.taps() + tap) * count + j];
  }
  *grad = sum;
}

// Step 5 outside deterministic mode. One thread per (channel chunk, row, pixel of the block), as
// in step 1, consecutive threads on consecutive pixels: for each of up to kFillChannels channels
// of the offset group it adds grad_columns times the modulation and each corner's bilinear
// weight onto grad_image with atomics (fp32, or fp64 for fp64 inputs). The sample is computed
// once per chunk (it was once per channel: one thread per (channel * taps + tap, pixel)).
template <typename scalar_t, typename acc_t>
__global__ void input_grad_atomic_kernel(
    ConvShape s, Strides4 grad_in, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, int64_t b, int64_t pixel0, int64_t count,
    const acc_t* __restrict__ grad_columns, acc_t* grad_image) {
  const ChunkItem item =
      chunk_item(s, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, count);
  if (!item.valid) return;
  const int64_t j = item.j;
  const BilinearSample<acc_t> sample =
      sample_at<scalar_t, acc_t>(s, offset, b, item.row, pixel0 + j, grad_in.row, grad_in.col);
  const acc_t modulation = modulation_at<scalar_t, acc_t>(s, mask, b, item.row, pixel0 + j);
  for (int64_t c = item.c_begin; c < item.c_end; ++c) {
    const acc_t value = grad_columns[(c * s.taps() + item.tap) * count + j] * modulation;
    acc_t* channel = grad_image + c * grad_in.channel;
    for (int corner = 0; corner < kBilinearCorners; ++corner) {
      if (sample.inside & (1u << corner)) {
        atomicAdd(channel + sample.offset[corner], sample.weight[corner] * value);
      }
    }
  }
}

template <typename scalar_t>
void deform_conv2d_backward_impl(
    const ConvShape& s, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& offset, const at::Tensor& mask,
    at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_offset,
    at::Tensor& grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  // fp32/fp64 gradients are accumulated in place; fp16/bf16 ones in fp32 buffers.
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t taps = s.taps(), pixels = s.out_pixels();
  const int64_t group_rows = s.group_rows(), group_out = s.group_out_channels();
  const int64_t image_pixels = s.height * s.width;
  const int64_t block = backward_block_pixels(s, sizeof(acc_t));
  const int64_t blocks_per_image = (pixels + block - 1) / block;

  const at::Tensor weight_acc =
      weight.to(acc_options.dtype()).contiguous().view({s.out_channels, group_rows});
  at::Tensor grad_weight_acc = kSameType ? grad_weight.view({s.out_channels, group_rows})
                                         : at::zeros({s.out_channels, group_rows}, acc_options);
  // grad_input of the current image in acc_t, in grad_input's own layout: grad_input itself, or
  // a one-image fp32 buffer.
  const at::Tensor grad_image_buffer =
      kSameType ? at::Tensor() : at::empty_like(grad_input[0], acc_options);
  Strides4 grad_in = strides_of(grad_input);
  if constexpr (!kSameType) {
    TORCH_INTERNAL_ASSERT(grad_image_buffer.strides() == grad_input.strides().slice(1));
  }
  const bool channel_fastest = grad_in.channel == 1 && s.in_channels > 1;

  const at::Tensor columns_storage = at::empty({s.in_channels * taps * block}, acc_options);
  const at::Tensor grad_columns_storage = at::empty({s.in_channels * taps * block}, acc_options);
  // The sorted gather of step 5 (deterministic mode only): the entry list and the boundaries of
  // its lists, one per (offset group, input pixel): list l holds the sorted entries
  // [entry_begin[l], entry_begin[l + 1]).
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t entries_max = deterministic ? s.sample_rows() * block * kBilinearCorners : 0;
  const at::Tensor keys_storage = at::empty({entries_max}, input.options().dtype(at::kLong));
  const at::Tensor weights_storage = at::empty({entries_max}, acc_options);
  const at::Tensor list_bounds = deterministic
      ? at::arange(s.offset_groups * image_pixels + 1, input.options().dtype(at::kLong))
      : at::Tensor();
  const at::Tensor grad_output_rows = grad_output.view({s.batch, s.out_channels, pixels});
  const Strides4 in = strides_of(input);
  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  const scalar_t* offset_data = offset.const_data_ptr<scalar_t>();
  const scalar_t* mask_data = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;

  for (int64_t b = 0; b < s.batch; ++b) {
    acc_t* grad_image;
    if constexpr (kSameType) {
      grad_image = grad_input.data_ptr<acc_t>() + b * grad_input.stride(0);
    } else {
      grad_image_buffer.zero_();
      grad_image = grad_image_buffer.data_ptr<acc_t>();
    }
    for (int64_t block_index = 0; block_index < blocks_per_image; ++block_index) {
      const int64_t pixel0 = block_index * block;
      const int64_t count = std::min(block, pixels - pixel0);
      const int64_t sample_threads = s.sample_rows() * count;
      const unsigned sample_blocks = blocks_for(sample_threads, kElementThreads);
      const at::Tensor columns =
          columns_storage.narrow(0, 0, s.in_channels * taps * count).view({s.in_channels * taps, count});
      const at::Tensor grad_columns = grad_columns_storage.narrow(0, 0, s.in_channels * taps * count)
                                          .view({s.in_channels * taps, count});

      // 1. The modulated column tile.
      fill_columns_kernel<scalar_t, acc_t>
          <<<blocks_for(fill_channel_chunks(s) * sample_threads, kElementThreads),
             kElementThreads, 0, stream>>>(
          s, in, input_data, offset_data, mask_data, b, pixel0, count, columns.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      // 2., 3. grad_weight_g += grad_out_g @ columns_g^T; grad_columns_g = W_g^T @ grad_out_g.
      at::Tensor grad_out_block = grad_output_rows[b].narrow(1, pixel0, count);
      if constexpr (!kSameType) grad_out_block = grad_out_block.to(acc_options.dtype());
      for (int64_t g = 0; g < s.groups; ++g) {
        const at::Tensor grad_out_g = grad_out_block.narrow(0, g * group_out, group_out);
        grad_weight_acc.narrow(0, g * group_out, group_out)
            .addmm_(grad_out_g, columns.narrow(0, g * group_rows, group_rows).t());
        at::Tensor grad_columns_g = grad_columns.narrow(0, g * group_rows, group_rows);
        at::mm_out(
            grad_columns_g, weight_acc.narrow(0, g * group_out, group_out).t(), grad_out_g);
      }

      // 4. Offset and mask gradients.
      coordinate_grads_kernel<scalar_t, acc_t>
          <<<blocks_for(sample_threads, 32), kElementThreads, 0, stream>>>(
          s, in, input_data, offset_data, mask_data, b, pixel0, count,
          grad_columns.const_data_ptr<acc_t>(), grad_offset.data_ptr<scalar_t>(),
          mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      // 5. grad_input: atomics, or the sorted entry list in deterministic mode.
      if (!deterministic) {
        input_grad_atomic_kernel<scalar_t, acc_t>
            <<<blocks_for(fill_channel_chunks(s) * sample_threads, kElementThreads),
               kElementThreads, 0, stream>>>(
                s, grad_in, offset_data, mask_data, b, pixel0, count,
                grad_columns.const_data_ptr<acc_t>(), grad_image);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        continue;
      }
      const int64_t entries = sample_threads * kBilinearCorners;
      const at::Tensor keys = keys_storage.narrow(0, 0, entries);
      const at::Tensor weights = weights_storage.narrow(0, 0, entries);
      corner_entries_kernel<scalar_t, acc_t><<<sample_blocks, kElementThreads, 0, stream>>>(
          s, offset_data, mask_data, b, pixel0, count, keys.data_ptr<int64_t>(),
          weights.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // The optional<bool> spells out the stable overload: a plain `true` would bind to
      // sort(self, dim, descending) and mean dim = 1.
      const auto [sorted_keys, order] =
          at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
      const at::Tensor entry_begin = at::searchsorted(sorted_keys, list_bounds);
      input_grad_kernel<acc_t>
          <<<blocks_for(s.in_channels * image_pixels, kElementThreads), kElementThreads, 0,
             stream>>>(
              s, grad_in, channel_fastest, count, entry_begin.const_data_ptr<int64_t>(),
              order.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
              grad_columns.const_data_ptr<acc_t>(), grad_image);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if constexpr (!kSameType) grad_input[b].copy_(grad_image_buffer);
  }
  if constexpr (!kSameType) grad_weight.copy_(grad_weight_acc.view(grad_weight.sizes()));
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
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  const at::Tensor input = kernel_input(input_in);
  const at::Tensor grad_output = grad_output_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach();
  const at::Tensor offset = offset_in.detach().contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->detach().contiguous() : at::Tensor();
  // grad_input has the layout the kernels read the input in (channels_last stays channels_last);
  // the other gradients are contiguous. Every offset (and mask) element is written by step 4.
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  // Without a mask there is no mask gradient: an empty tensor stands in for it.
  at::Tensor grad_mask =
      mask.defined() ? at::zeros(mask.sizes(), mask.options()) : at::empty({0}, input.options());
  // grad_bias: a fixed-order reduction by ATen, accumulated in fp32 for half inputs.
  at::Tensor grad_bias =
      grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(input.scalar_type()))
          .to(input.scalar_type());
  if (s.batch == 0) return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
        deform_conv2d_backward_impl<scalar_t>(
            s, grad_output, input, weight, offset, mask, grad_input, grad_weight, grad_offset,
            grad_mask);
      });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace pem_kernels

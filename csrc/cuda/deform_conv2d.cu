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
// product runs. fp32 and bf16 inputs whose channels per group and per offset group are multiples
// of 32 (PEM's 128) take a tensor-core variant on compute capability 8.0 and newer: for fp32 WMMA
// TF32 products, 3xTF32 (fp32 accuracy) at PyTorch's default precision, TF32 where PyTorch allows
// it for its own matmuls, IEEE FMAs (the kernel above) with PEM_KERNELS_FP32_DOT=ieee (see
// fp32_products()); for bf16 bf16 products of split samples (deform_conv2d_forward_mma_kernel).
//
// Backward: the structure of the CPU backward, one image and one block of output pixels at a
// time (the block size depends on the shape only), each step parallel over the block:
//   1. the modulated column tile [C_in * taps, pixels] in acc_t (one thread per offset group, tap
//      and pixel computes the sample position once for all channels of its offset group);
//   2. grad_weight_g += grad_out_g @ columns_g^T and 3. grad_columns_g = W_g^T @ grad_out_g,
//      cuBLAS GEMMs in acc_t; with fp32 accumulation they are 3xTF32 under the forward's rules
//      (three TF32 tensor-core GEMMs on operands split into TF32 parts and remainders, see
//      row_major_3xtf32_gemm), IEEE with PEM_KERNELS_FP32_DOT=ieee, TF32 where torch allows it;
//   4. offset and mask gradients: one thread per (offset group, tap, pixel) sums its channels in
//      order;
//   5. grad_input, the scatter of the column gradient through the bilinear weights. By default
//      (as torchvision) one thread per (channel chunk, tap, pixel) adds its shares to the four
//      corners with atomics: fast, but the order of the additions, and so the last bits of
//      grad_input, vary from run to run. With fp32 accumulation on compute capability 9.0 and
//      channels per offset group a multiple of 4, the input gradient accumulates in NHWC and
//      each atomic adds 4 channels (a float4 atomic, one L2 operation instead of four); an NCHW
//      gradient is transposed once at the end. Under torch.use_deterministic_algorithms(True)
//      the scatter is turned into a gather instead: every (offset group, tap, pixel, corner) of
//      the block is listed with the corner's input pixel as a sort key; a stable sort and a
//      searchsorted give each (offset group, input pixel) its list of entries in entry order, and
//      one thread per (channel, input pixel) adds them up in that order (the order in which the
//      CPU kernel adds them) onto grad_input.
// Every other gradient element is written by one thread per launch with a fixed order of
// additions, so in deterministic mode the whole backward is bit-identical from run to run (its
// cuBLAS calls follow torch's rules there, i.e. CUBLAS_WORKSPACE_CONFIG must be set as for any
// CUDA matmul). fp16/bf16 gradients are computed in fp32 and rounded once. Extra memory: two
// column tiles of at most kBackwardTileBytes each, in deterministic mode the entry list (about
// 30 bytes per (offset group, tap, pixel, corner) of a block), for fp16/bf16 fp32 copies of one
// image's input gradient and of the weight gradient, and for an NCHW fp32 input gradient
// accumulated in NHWC (step 5's float4 atomics) its transposed copy, made after the column tiles
// are freed (so the peak stays that of the loop).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pem_kernels/check.h"
#include "pem_kernels/deform_conv_checks.h"
#include "pem_kernels/deform_conv_common.h"
#include "pem_kernels/fp32_products.h"
#include "pem_kernels/tensor_cores.h"

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
// From the offsets already loaded:
template <typename acc_t>
__device__ BilinearSample<acc_t> sample_from(
    const ConvShape& s, int64_t row, int64_t pixel, acc_t offset_y, acc_t offset_x,
    int64_t stride_y, int64_t stride_x) {
  const int64_t tap = row % s.taps();
  const int64_t oy = pixel / s.out_w, ox = pixel % s.out_w;
  const acc_t y =
      sample_coordinate<acc_t>(oy, tap / s.kernel_w, s.stride_h, s.pad_h, s.dilation_h, offset_y);
  const acc_t x =
      sample_coordinate<acc_t>(ox, tap % s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, offset_x);
  return bilinear_sample<acc_t>(y, x, s.height, s.width, stride_y, stride_x);
}

template <typename scalar_t, typename acc_t>
__device__ BilinearSample<acc_t> sample_at(
    const ConvShape& s, const scalar_t* offset, int64_t b, int64_t row, int64_t pixel,
    int64_t stride_y, int64_t stride_x) {
  const scalar_t* offset_yx = offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  return sample_from<acc_t>(s, row, pixel, static_cast<acc_t>(offset_yx[0]),
                            static_cast<acc_t>(offset_yx[s.out_pixels()]), stride_y, stride_x);
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

// The samples of a forward block's kTileM output pixels for one (offset group, tap) row, shared by
// all channels of that offset group: corner element offsets from the input's start (image
// included), bilinear weights, the modulation and inside flags (0 past the last pixel). The
// modulation multiplies the blended sample, not each corner weight, as in torchvision: a NaN mask
// then gives NaN for a sample outside the image too, and an inf mask times a zero corner weight
// gives no NaN.
template <typename acc_t>
struct SampleTables {
  int64_t corner_offset[kTileM][kBilinearCorners];
  acc_t corner_weight[kTileM][kBilinearCorners];
  acc_t modulation[kTileM];
  uint8_t inside[kTileM];
};

// The (offset group, tap) row of the forward's K-stage starting at k0 of convolution group
// `group` (k = tap * group_channels + channel within the group).
__device__ __forceinline__ int64_t stage_sample_row(const ConvShape& s, int64_t group, int64_t k0) {
  const int64_t c0 = group * s.group_channels() + k0 % s.group_channels();
  return (c0 / s.offset_group_channels()) * s.taps() + k0 / s.group_channels();
}

// What one entry of the sample tables is computed from: the offsets and the modulation of
// pixel m0 + threadIdx.x for `row` (row -1: none loaded).
template <typename acc_t>
struct SampleInputs {
  int64_t row;
  acc_t offset_y, offset_x, modulation;
};

// Threads 0..kTileM-1 load their pixel's SampleInputs of `row` (0 past the last pixel).
template <typename scalar_t, typename acc_t>
__device__ SampleInputs<acc_t> load_sample_inputs(
    const ConvShape& s, const scalar_t* offset, const scalar_t* mask, int64_t m0, int64_t row) {
  SampleInputs<acc_t> inputs{row, acc_t(0), acc_t(0), acc_t(0)};
  const int64_t m = m0 + threadIdx.x;
  if (threadIdx.x >= kTileM || m >= s.batch * s.out_pixels()) return inputs;
  const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
  const scalar_t* offset_yx = offset + (b * 2 * s.sample_rows() + 2 * row) * s.out_pixels() + pixel;
  inputs.offset_y = static_cast<acc_t>(offset_yx[0]);
  inputs.offset_x = static_cast<acc_t>(offset_yx[s.out_pixels()]);
  inputs.modulation = modulation_at<scalar_t, acc_t>(s, mask, b, row, pixel);
  return inputs;
}

// Threads 0..kTileM-1 of the block fill `tables` from their SampleInputs, for pixels
// m0 + threadIdx.x (of all images, flattened); the caller synchronizes before reading them.
template <typename acc_t>
__device__ void fill_sample_tables(
    SampleTables<acc_t>& tables, const ConvShape& s, const Strides4& in, int64_t m0,
    const SampleInputs<acc_t>& inputs) {
  if (threadIdx.x >= kTileM) return;
  const int64_t m = m0 + threadIdx.x;
  uint8_t inside = 0;
  acc_t modulation = 0;
  if (m < s.batch * s.out_pixels()) {
    const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
    const BilinearSample<acc_t> sample = sample_from<acc_t>(
        s, inputs.row, pixel, inputs.offset_y, inputs.offset_x, in.row, in.col);
    modulation = inputs.modulation;
    for (int corner = 0; corner < kBilinearCorners; ++corner) {
      tables.corner_offset[threadIdx.x][corner] = b * in.image + sample.offset[corner];
      tables.corner_weight[threadIdx.x][corner] = sample.weight[corner];
    }
    inside = sample.inside;
  }
  tables.modulation[threadIdx.x] = modulation;
  tables.inside[threadIdx.x] = inside;
}

// Makes `tables` hold the row of the K-stage at k0 of convolution group `group` (`tables_row`
// tracks the row they hold): the same decision in every thread, and a barrier after a rewrite.
// Call only where no thread reads the tables. `next` (kept by the caller from call to call)
// receives the inputs of the following row when a row is written: loaded one or more K-stages
// (of `stage_k`) before they are needed, so that their latency hides behind those stages' work
// instead of stalling the block at the barrier.
template <typename scalar_t, typename acc_t>
__device__ void prepare_sample_tables(
    SampleTables<acc_t>& tables, int64_t& tables_row, const ConvShape& s, const Strides4& in,
    const scalar_t* offset, const scalar_t* mask, int64_t m0, int64_t group, int64_t k0,
    int64_t stage_k, SampleInputs<acc_t>& next) {
  const int64_t row = stage_sample_row(s, group, k0);
  if (row == tables_row) return;
  const SampleInputs<acc_t> inputs =
      next.row == row ? next : load_sample_inputs<scalar_t, acc_t>(s, offset, mask, m0, row);
  fill_sample_tables<acc_t>(tables, s, in, m0, inputs);
  tables_row = row;
  int64_t next_k = k0 + stage_k;
  while (next_k < s.group_rows() && stage_sample_row(s, group, next_k) == row) next_k += stage_k;
  next.row = -1;
  if (next_k < s.group_rows()) {
    next = load_sample_inputs<scalar_t, acc_t>(s, offset, mask, m0,
                                               stage_sample_row(s, group, next_k));
  }
  __syncthreads();
}

// The modulated sample of one channel from its loaded corner values and the tables' entry `mm`.
template <typename acc_t>
__device__ __forceinline__ acc_t blend_corners(
    const SampleTables<acc_t>& tables, int mm, const acc_t corner_values[kBilinearCorners]) {
  const uint8_t inside = tables.inside[mm];
  acc_t value = 0;
#pragma unroll
  for (int corner = 0; corner < kBilinearCorners; ++corner) {
    if (inside & (1u << corner)) value += tables.corner_weight[mm][corner] * corner_values[corner];
  }
  return value * tables.modulation[mm];
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

template <typename scalar_t, int kElements = kVectorChannels>
struct alignas(sizeof(scalar_t) * kElements) ChannelVector {
  scalar_t value[kElements];
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
  __shared__ SampleTables<acc_t> tables;  // kSharedSamples and kVectorizedChannels
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
  SampleInputs<acc_t> next_inputs{-1, acc_t(0), acc_t(0), acc_t(0)};  // of the next row

  const auto prepare_tables = [&](int64_t k0) {
    prepare_sample_tables<scalar_t, acc_t>(tables, tables_row, s, in, offset, mask, m0, group, k0,
                                           kTileK, next_inputs);
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
      const uint8_t inside = tables.inside[mm];
#pragma unroll
      for (int corner = 0; corner < kBilinearCorners; ++corner) {
        const bool read = inside & (1u << corner);
        if constexpr (kGather == Gather::kSharedSamples) {
#pragma unroll
          for (int r = 0; r < kPerThread; ++r) {
            corner_values[r][corner] = read
                ? static_cast<acc_t>(
                      stage_input[tile_row(r) * in.channel + tables.corner_offset[mm][corner]])
                : acc_t(0);
          }
        } else {
          ChannelVector<scalar_t> v{};
          if (read) {
            v = *reinterpret_cast<const ChannelVector<scalar_t>*>(
                stage_input + tile_row(0) + tables.corner_offset[mm][corner]);  // channel stride 1
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
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        column_tile[tile_row(r)][mm] = blend_corners(tables, mm, corner_values[r]);
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

// Tensor-core forward (compute capability 8.0 and newer) for fp32 and bf16 inputs: the same
// implicit GEMM on WMMA fragments, for the shapes whose K-stages of kMmaTileK lie within one tap
// and one offset group (channels per group and per offset group multiples of 32: PEM's 128).
// Each block computes kTileM output pixels x kMmaTileN output channels, all of PEM's 128, so that
// every sample is gathered once (the 64 x 64 kernel above gathers it once per channel block).
//   * fp32, m16n16k8 TF32 fragments. fp32 accuracy ("tf32x3", kPasses = 3): each operand x is
//     split into big = tf32(x) and small = tf32(x - big) and the products big * big, big * small
//     and small * big are summed in fp32 (the dropped small * small is below fp32's rounding),
//     at most about 5e-7 relative error per product against IEEE's 6e-8. Where PyTorch allows
//     TF32 (kPasses = 1) only big * big is summed, as cuBLAS does then.
//   * bf16, m16n16k16 bf16 fragments (kPasses = 2). The weights are bf16 already; each sample
//     (blended and modulated in fp32, as the kernel above keeps it) is stored as big = bf16(x)
//     and small = bf16(x - big), and both are multiplied by the weight: 16 significant bits per
//     sample (the FMA kernel keeps fp32's 24), errors of about 2^-17 of each product, below the
//     output's own bf16 rounding unless the sum cancels to far less than its terms; one bf16
//     product would round every sample to 8 bits. (fp16 stays on the kernel above: a sample
//     beyond fp16's range would become inf here.)
// The cross terms go to accumulators of their own whose NaNs are dropped before they are added:
// an inf operand has a NaN remainder (inf - inf) whose NaN would replace the inf that big * big
// carries, and torchvision gives inf there.
constexpr int kMmaTileN = 128;  // output channels per block
constexpr int kMmaTileK = 32;   // (tap, channel) pairs per stage
constexpr int kFragment = 16;   // rows and columns of a WMMA fragment
// 8 warps: 2 along M x 4 along N, each a 32 x 32 output tile of 2 x 2 fragments.
// Occupancy (`python -m benchmarks ptxas-stats deform_conv2d`: CUDA 13.0, sm_90, 2026-11-27): the
// fp32 variants take 232-248 registers per thread and the bf16 ones 195-199, so one block
// (8 warps) runs per SM. That fits the H200's forward times: a flat 0.18-0.19 ms up to 132
// blocks (one wave, 36 K-stages of about 5 us each) and 0.745 ms for 512 blocks at
// (1,128,128,256) (four waves). Two blocks per SM (a launch bound of 2: 128 registers, 580-650
// bytes of spills per thread in the 3xTF32 variants) were slower at every shape on the H200 on
// 2026-11-27 (0.18 -> 0.30 ms at (1,128,16,16), 0.74 -> 0.88 at (1,128,128,256)).
// Hence the split over K below: a map of fewer blocks than SMs runs each block's K-stages on
// several blocks.
constexpr int kMmaThreads = 256;
constexpr int kWarpTile = 32;
constexpr int kWarpFragments = kWarpTile / kFragment;
constexpr int kMmaGatherThreadsPerPixel = 4;  // kMmaThreads / kTileM: 8 k of a stage each
constexpr int kMmaPerThread = kMmaTileK * kTileM / kMmaThreads;

#ifdef PEM_TENSOR_CORES
// The WMMA operands per input dtype: shared-memory element, fragment element, fragment k.
template <typename scalar_t>
struct MmaTraits;
template <>
struct MmaTraits<float> {
  using Operand = float;
  using FragmentElement = wmma::precision::tf32;
  static constexpr int kFragmentK = 8;
  __device__ static const float* fragment_pointer(const float* p) { return p; }
};
template <>
struct MmaTraits<at::BFloat16> {
  using Operand = at::BFloat16;
  using FragmentElement = __nv_bfloat16;
  static constexpr int kFragmentK = 16;
  __device__ static const __nv_bfloat16* fragment_pointer(const at::BFloat16* p) {
    return reinterpret_cast<const __nv_bfloat16*>(p);  // the same 16 bits
  }
};
#endif  // PEM_TENSOR_CORES

// Shared memory of the tensor-core forward. Every row is padded by 16 bytes: consecutive rows
// start 4 banks apart, and the leading dimensions stay multiples of 16 bytes with every
// fragment at a multiple of 32 bytes, as WMMA loads and stores need. The column tile is
// [pixel][k] (row-major A) for the channels_last gather, whose threads each store 8
// consecutive k of one pixel, and [k][pixel] (column-major A) otherwise, where consecutive
// threads store consecutive pixels: both without bank conflicts. bf16 keeps the samples' bf16
// remainders in column_small. The output staging of the epilogue reuses the stage tiles.
template <typename Operand, bool kRowMajorColumns, bool kSplitColumns>
struct MmaStageTiles {
  static constexpr int kPad = 16 / sizeof(Operand);
  static constexpr int kColumnRows = kRowMajorColumns ? kTileM : kMmaTileK;
  static constexpr int kColumnLd = (kRowMajorColumns ? kMmaTileK : kTileM) + kPad;
  static constexpr int kWeightLd = kMmaTileK + kPad;
  Operand column[kColumnRows][kColumnLd];
  Operand weight[kMmaTileN][kWeightLd];  // [n][k]: a column-major K x N operand
  Operand column_small[kSplitColumns ? kColumnRows : 1][kSplitColumns ? kColumnLd : 1];
  static_assert(sizeof(column) % 32 == 0 && sizeof(weight) % 32 == 0 &&
                kColumnLd * sizeof(Operand) * 8 % 32 == 0 && kWeightLd * sizeof(Operand) * 16 % 32 == 0);
};

constexpr int kMmaOutputLd = kTileM + 4;  // floats
static_assert(kMmaOutputLd * sizeof(float) * kFragment % 32 == 0);

template <typename Operand, bool kRowMajorColumns, bool kSplitColumns>
union MmaTiles {
  MmaStageTiles<Operand, kRowMajorColumns, kSplitColumns> stage;
  float output[kMmaTileN][kMmaOutputLd];  // [n][pixel]: column-major, stores along pixels
};

// A type as a value, to pick a kernel's template arguments in a generic lambda.
template <typename T>
struct TypeTag {
  using type = T;
};

// Grid (M tiles, N tiles, groups * splits); `weight` is [C_out, kh, kw, C_in / groups] as for
// the kernel above. Each thread gathers 8 (channel, pixel) samples per stage: on channels_last 8
// consecutive channels of one pixel (16-byte vector loads per corner), otherwise one pixel and
// every 4th channel. Software-pipelined like the kernel above: the next stage's global loads are
// in flight while the current stage's products run.
//
// Split over K (fp32 only): a block runs the `split_rows` rows of k from split * split_rows of
// its tile, and with more than one split adds its partial sums (the first split with the bias)
// to the zero-filled output with fp32 atomics. The splits' order of addition varies from run to
// run, so the output may differ in its last bits between runs; the host splits nothing under
// torch.use_deterministic_algorithms.
template <typename scalar_t, int kPasses, bool kVectorized>
__global__ void __launch_bounds__(kMmaThreads)
deform_conv2d_forward_mma_kernel(
    ConvShape s, Strides4 in, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, const scalar_t* __restrict__ bias, int64_t split_rows,
    bool accumulate, scalar_t* __restrict__ output) {
#ifdef PEM_TENSOR_CORES
  using Traits = MmaTraits<scalar_t>;
  using Operand = typename Traits::Operand;
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  static_assert(kBf16 ? kPasses == 2 : (kPasses == 1 || kPasses == 3));
  constexpr int kFragmentK = Traits::kFragmentK;
  constexpr int kVectorElements = 16 / sizeof(scalar_t);  // per 16-byte load
  using Vector = ChannelVector<scalar_t, kVectorElements>;
  constexpr int kWeightVectors = kMmaTileN * kMmaTileK / kVectorElements / kMmaThreads;
  constexpr int kVectorsPerWeightRow = kMmaTileK / kVectorElements;
  static_assert(kMmaPerThread % kVectorElements == 0 &&
                kTileM * kMmaGatherThreadsPerPixel == kMmaThreads);
  using Tiles = MmaTiles<Operand, kVectorized, kBf16>;
  using StageTiles = MmaStageTiles<Operand, kVectorized, kBf16>;
  using ColumnLayout = std::conditional_t<kVectorized, wmma::row_major, wmma::col_major>;
  using FragmentA = wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragmentK,
                                   typename Traits::FragmentElement, ColumnLayout>;
  using FragmentB = wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragmentK,
                                   typename Traits::FragmentElement, wmma::col_major>;
  using Accumulator =
      wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragmentK, float>;
  // WMMA loads and stores need 32-byte aligned addresses: every fragment's offset in the tiles is
  // a multiple of 32 bytes.
  __shared__ __align__(128) Tiles tiles;
  __shared__ SampleTables<float> tables;
  const int64_t group = blockIdx.z % s.groups, split = blockIdx.z / s.groups;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMmaTileN;
  const int64_t group_rows = s.group_rows(), out_per_group = s.group_out_channels();
  const int64_t k_begin = split * split_rows;
  const int64_t k_end = std::min(group_rows, k_begin + split_rows);
  const int64_t group_channels = s.group_channels();
  // The thread's pixel and its rows of the stage's column tile.
  const int mm = kVectorized ? threadIdx.x / kMmaGatherThreadsPerPixel : threadIdx.x % kTileM;
  const auto tile_row = [&](int r) {
    return kVectorized
        ? static_cast<int>(threadIdx.x % kMmaGatherThreadsPerPixel) * kMmaPerThread + r
        : static_cast<int>(threadIdx.x / kTileM) + kMmaGatherThreadsPerPixel * r;
  };
  const int warp = threadIdx.x / 32;
  const int warp_m = (warp % 2) * kWarpTile, warp_n = (warp / 2) * kWarpTile;
  float corner_values[kMmaPerThread][kBilinearCorners];
  Vector weight_values[kWeightVectors];
  Accumulator acc[kWarpFragments][kWarpFragments];
  Accumulator acc_cross[kWarpFragments][kWarpFragments];  // kPasses > 1 only
#pragma unroll
  for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
    for (int j = 0; j < kWarpFragments; ++j) {
      wmma::fill_fragment(acc[i][j], 0.0f);
      if constexpr (kPasses > 1) wmma::fill_fragment(acc_cross[i][j], 0.0f);
    }
  }
  int64_t tables_row = -1;
  SampleInputs<float> next_inputs{-1, 0.0f, 0.0f, 0.0f};  // of the next row, loaded ahead

  const auto prepare_tables = [&](int64_t k0) {
    prepare_sample_tables<scalar_t, float>(tables, tables_row, s, in, offset, mask, m0, group,
                                           k0, kMmaTileK, next_inputs);
  };

  const auto load_stage = [&](int64_t k0) {
    const scalar_t* stage_input =
        input + (group * group_channels + k0 % group_channels) * in.channel;
    const uint8_t inside = tables.inside[mm];
#pragma unroll
    for (int corner = 0; corner < kBilinearCorners; ++corner) {
      const bool read = inside & (1u << corner);
      const int64_t corner_offset = tables.corner_offset[mm][corner];
      if constexpr (kVectorized) {
#pragma unroll
        for (int v = 0; v < kMmaPerThread / kVectorElements; ++v) {
          Vector values{};
          if (read) {
            values = *reinterpret_cast<const Vector*>(
                stage_input + tile_row(v * kVectorElements) + corner_offset);
          }
#pragma unroll
          for (int e = 0; e < kVectorElements; ++e) {
            corner_values[v * kVectorElements + e][corner] = static_cast<float>(values.value[e]);
          }
        }
      } else {
#pragma unroll
        for (int r = 0; r < kMmaPerThread; ++r) {
          corner_values[r][corner] = read
              ? static_cast<float>(stage_input[tile_row(r) * in.channel + corner_offset])
              : 0.0f;
        }
      }
    }
    // Consecutive threads load consecutive 16-byte vectors of a weight row (contiguous in k).
#pragma unroll
    for (int r = 0; r < kWeightVectors; ++r) {
      const int i = threadIdx.x + r * kMmaThreads;
      const int64_t n = n0 + i / kVectorsPerWeightRow;
      const int64_t k = k0 + (i % kVectorsPerWeightRow) * kVectorElements;
      weight_values[r] = n < out_per_group
          ? *reinterpret_cast<const Vector*>(weight + (group * out_per_group + n) * group_rows + k)
          : Vector{};
    }
  };

  const auto store_stage = [&]() {
#pragma unroll
    for (int r = 0; r < kMmaPerThread; ++r) {
      const float value = blend_corners(tables, mm, corner_values[r]);
      Operand& big = kVectorized ? tiles.stage.column[mm][tile_row(r)]
                                 : tiles.stage.column[tile_row(r)][mm];
      big = static_cast<Operand>(value);
      if constexpr (kBf16) {
        Operand& small = kVectorized ? tiles.stage.column_small[mm][tile_row(r)]
                                     : tiles.stage.column_small[tile_row(r)][mm];
        small = static_cast<Operand>(value - static_cast<float>(big));
      }
    }
#pragma unroll
    for (int r = 0; r < kWeightVectors; ++r) {
      const int i = threadIdx.x + r * kMmaThreads;
      *reinterpret_cast<Vector*>(&tiles.stage.weight[i / kVectorsPerWeightRow]
                                                    [(i % kVectorsPerWeightRow) *
                                                     kVectorElements]) = weight_values[r];
    }
  };

  const auto load_a = [&](FragmentA& a, const Operand (*column)[StageTiles::kColumnLd], int m,
                          int kk) {
    if constexpr (kVectorized) {
      wmma::load_matrix_sync(a, Traits::fragment_pointer(&column[m][kk]), StageTiles::kColumnLd);
    } else {
      wmma::load_matrix_sync(a, Traits::fragment_pointer(&column[kk][m]), StageTiles::kColumnLd);
    }
  };

  const auto multiply_stage = [&]() {
#pragma unroll
    for (int kk = 0; kk < kMmaTileK; kk += kFragmentK) {
      FragmentA a[kWarpFragments], a_small[kWarpFragments];
      FragmentB b[kWarpFragments], b_small[kWarpFragments];
#pragma unroll
      for (int i = 0; i < kWarpFragments; ++i) {
        load_a(a[i], tiles.stage.column, warp_m + i * kFragment, kk);
        if constexpr (kBf16) {
          load_a(a_small[i], tiles.stage.column_small, warp_m + i * kFragment, kk);
        } else {
          split_tf32<kPasses>(a[i], a_small[i]);
        }
      }
#pragma unroll
      for (int j = 0; j < kWarpFragments; ++j) {
        wmma::load_matrix_sync(
            b[j], Traits::fragment_pointer(&tiles.stage.weight[warp_n + j * kFragment][kk]),
            StageTiles::kWeightLd);
        if constexpr (!kBf16) split_tf32<kPasses>(b[j], b_small[j]);
      }
#pragma unroll
      for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
        for (int j = 0; j < kWarpFragments; ++j) {
          if constexpr (kPasses > 1) {
            wmma::mma_sync(acc_cross[i][j], a_small[i], b[j], acc_cross[i][j]);
          }
          if constexpr (kPasses == 3) {
            wmma::mma_sync(acc_cross[i][j], a[i], b_small[j], acc_cross[i][j]);
          }
          wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
  };

  prepare_tables(k_begin);
  load_stage(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaTileK) {
    store_stage();
    __syncthreads();
    if (k0 + kMmaTileK < k_end) {
      prepare_tables(k0 + kMmaTileK);
      load_stage(k0 + kMmaTileK);
    }
    multiply_stage();
    __syncthreads();  // before the next store_stage (or the epilogue) overwrites the tiles
  }

  // Epilogue: the fragments through shared memory, so that consecutive threads write consecutive
  // pixels of an output channel.
#pragma unroll
  for (int i = 0; i < kWarpFragments; ++i) {
#pragma unroll
    for (int j = 0; j < kWarpFragments; ++j) {
      if constexpr (kPasses > 1) {
#pragma unroll
        for (int e = 0; e < Accumulator::num_elements; ++e) {
          // The cross terms correct a finite sum only. Where the big products are inf or NaN,
          // so is the exact sum, and a cross term may be the opposite inf (an inf weight times
          // a negative bf16 remainder): inf + -inf would turn the right inf into NaN. A NaN
          // cross term (3xTF32: an inf operand's remainder is NaN) comes with such a sum too.
          const float sum = acc[i][j].x[e];
          if (std::isfinite(sum)) acc[i][j].x[e] = sum + acc_cross[i][j].x[e];
        }
      }
      wmma::store_matrix_sync(&tiles.output[warp_n + j * kFragment][warp_m + i * kFragment],
                              acc[i][j], kMmaOutputLd, wmma::mem_col_major);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTileM * kMmaTileN; e += kMmaThreads) {
    const int64_t m = m0 + e % kTileM, n = n0 + e / kTileM;
    if (m >= s.batch * s.out_pixels() || n >= out_per_group) continue;
    const int64_t b = m / s.out_pixels(), pixel = m % s.out_pixels();
    const int64_t channel = group * out_per_group + n;
    const float add = bias == nullptr || split > 0 ? 0.0f : static_cast<float>(bias[channel]);
    scalar_t& out = output[(b * s.out_channels + channel) * s.out_pixels() + pixel];
    const float value = tiles.output[e / kTileM][e % kTileM] + add;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (accumulate) {
        atomicAdd(&out, value);
        continue;
      }
    }
    out = static_cast<scalar_t>(value);
  }
#else
  __trap();  // never launched: the host takes the kernel above (see tensor_core_code)
#endif
}

// The rows of k per block of the tensor-core forward: all of a tile's, unless `may_split` and its
// `tiles` leave SMs idle (one block runs per SM, see kMmaThreads). Then its K-stages are shared
// among up to SMs / tiles blocks, so that one wave fills the GPU: each block's serial loop over
// its stages, not the products, sets the time of a small map (0.18 ms from (1,128,16,16) to
// (1,128,64,128) on the H200, 36 stages at C_in = 128 with a 3x3 kernel).
int64_t forward_split_rows(const ConvShape& s, int64_t tiles, bool may_split) {
  const int64_t stages = s.group_rows() / kMmaTileK;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = may_split ? std::min(stages, sms / tiles) : 1;
  return splits > 1 ? blocks_for(stages, static_cast<int>(splits)) * kMmaTileK : s.group_rows();
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
  // The tensor-core kernel: fp32 unless PEM_KERNELS_FP32_DOT=ieee, and bf16, on compute
  // capability 8.0 and newer (code built for it: tensor_core_code), with K-stages within one tap
  // and offset group. It reads the weight rows as 16-byte vectors (a weight given as a view can
  // stay a view through the permute and contiguous above), and a channels_last input as 16-byte
  // vectors where aligned.
  const Fp32Products products =
      input.scalar_type() == at::kFloat ? fp32_products() : Fp32Products::kIeee;
  const bool mma_dtype = (input.scalar_type() == at::kFloat && products != Fp32Products::kIeee) ||
      input.scalar_type() == at::kBFloat16;
  if (mma_dtype && s.group_channels() % kMmaTileK == 0 &&
      s.offset_group_channels() % kMmaTileK == 0 &&
      reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0 &&
      tensor_core_code(deform_conv2d_forward_mma_kernel<float, 3, false>)) {
    const bool vector_loads = in.channel == 1 &&
        s.in_channels * input.element_size() % 16 == 0 &&
        reinterpret_cast<uintptr_t>(input.const_data_ptr()) % 16 == 0;
    const int64_t tiles = pixel_blocks * blocks_for(s.group_out_channels(), kMmaTileN) * s.groups;
    const int64_t split_rows = forward_split_rows(
        s, tiles, input.scalar_type() == at::kFloat &&
                      !at::globalContext().deterministicAlgorithms());
    const int64_t splits = blocks_for(s.group_rows(), split_rows);
    PEM_CHECK(s.groups * splits <= 65535, "deform_conv2d (cuda): ", s.groups,
              " groups are too many for one launch");
    if (splits > 1) output.zero_();
    const dim3 mma_grid(pixel_blocks, blocks_for(s.group_out_channels(), kMmaTileN),
                        s.groups * splits);
    const auto launch = [&](auto type, auto passes, auto vectors) {
      using scalar_t = typename decltype(type)::type;
      deform_conv2d_forward_mma_kernel<scalar_t, decltype(passes)::value, decltype(vectors)::value>
          <<<mma_grid, kMmaThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              s, in, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
              offset.const_data_ptr<scalar_t>(),
              mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr,
              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, split_rows,
              splits > 1, output.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using Float = TypeTag<float>;
    using BFloat16 = TypeTag<at::BFloat16>;
    using OnePass = std::integral_constant<int, 1>;
    using TwoPasses = std::integral_constant<int, 2>;
    using ThreePasses = std::integral_constant<int, 3>;
    if (input.scalar_type() == at::kBFloat16) {
      vector_loads ? launch(BFloat16{}, TwoPasses{}, std::true_type{})
                   : launch(BFloat16{}, TwoPasses{}, std::false_type{});
    } else if (products == Fp32Products::kTf32) {
      vector_loads ? launch(Float{}, OnePass{}, std::true_type{})
                   : launch(Float{}, OnePass{}, std::false_type{});
    } else {
      vector_loads ? launch(Float{}, ThreePasses{}, std::true_type{})
                   : launch(Float{}, ThreePasses{}, std::false_type{});
    }
    return output;
  }
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
// GEMMs over a tile fill the GPU, small enough that the backward's peak stays under half of
// torchvision's (whose im2col buffer holds a whole image's columns). PEM at (1,128,128,256) fp32:
// 7 blocks of 4736 pixels, 20.8 MiB per tile, and a backward peak of 67.8 MiB with the 3xTF32
// split of grad_output; 32 MiB gave 5 blocks of 6656 pixels and 86.6 MiB (measured through
// tests/cuda_emulation), which with the forward's 16 MiB output made a forward+backward peak of
// about 0.53x torchvision's 192 MiB.
constexpr int64_t kBackwardTileBytes = 24 << 20;
// Pixel blocks are multiples of this (except the last block of an image).
constexpr int64_t kPixelAlign = 128;

// Output pixels per backward block: a function of the shape only, so that grad_weight is always
// accumulated in the same order. An image's pixels are split into as many blocks as the tile
// bound needs, of equal size up to kPixelAlign: the tiles (the largest part of the backward's
// memory) then hold one even share, not the bound with a short remainder block (PEM at
// (1,128,128,256) fp32: 7 blocks of up to 4736 pixels, 20.8 MiB per tile, instead of 6 of 5376
// and one of 512, 23.6 MiB per tile).
int64_t backward_block_pixels(const ConvShape& s, int64_t element_size) {
  const int64_t column_bytes = s.in_channels * s.taps() * element_size;
  const int64_t by_size =
      std::max(kBackwardTileBytes / column_bytes / kPixelAlign * kPixelAlign, kPixelAlign);
  const int64_t pixels = s.out_pixels();
  if (pixels <= by_size) return pixels;
  const int64_t blocks = (pixels + by_size - 1) / by_size;
  const int64_t even_share = (pixels + blocks - 1) / blocks;
  return (even_share + kPixelAlign - 1) / kPixelAlign * kPixelAlign;  // <= by_size
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

// With `columns_small` (3xTF32 GEMMs, acc_t = float) the column is written split: its TF32 part
// to `columns` and the TF32 remainder to `columns_small`.
template <typename scalar_t, typename acc_t>
__global__ void fill_columns_kernel(
    ConvShape s, Strides4 in, const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t b,
    int64_t pixel0, int64_t count, acc_t* __restrict__ columns,
    acc_t* __restrict__ columns_small) {
  const ChunkItem item =
      chunk_item(s, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, count);
  if (!item.valid) return;
  const int64_t j = item.j;
  const BilinearSample<acc_t> sample =
      sample_at<scalar_t, acc_t>(s, offset, b, item.row, pixel0 + j, in.row, in.col);
  const acc_t modulation = modulation_at<scalar_t, acc_t>(s, mask, b, item.row, pixel0 + j);
  for (int64_t c = item.c_begin; c < item.c_end; ++c) {
    const acc_t value =
        modulation *
        bilinear_interpolate<scalar_t, acc_t>(input + b * in.image + c * in.channel, sample);
    const int64_t index = (c * s.taps() + item.tap) * count + j;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (columns_small != nullptr) {
        columns[index] = round_to_tf32(value);
        columns_small[index] = round_to_tf32(value - columns[index]);
        continue;
      }
    }
    columns[index] = value;
  }
}

// 3xTF32 GEMMs of the backward (cuBLAS's TF32 tensor-core GEMMs on split operands; the forward's
// tensor-core kernel explains the split and why the cross terms are summed apart).

// big[r, c] = tf32(x[r, c]), small[r, c] = tf32(x[r, c] - big[r, c]) for a rows x cols matrix x
// with row stride x_stride, into contiguous rows x cols matrices.
template <typename scalar_t>
__global__ void split_tf32_kernel(
    const scalar_t* __restrict__ x, int64_t rows, int64_t cols, int64_t x_stride,
    float* __restrict__ big, float* __restrict__ small) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * cols) return;
  const float value = static_cast<float>(x[(index / cols) * x_stride + index % cols]);
  big[index] = round_to_tf32(value);
  small[index] = round_to_tf32(value - big[index]);
}

// out += cross with NaNs dropped (n contiguous elements): the NaN remainders of inf operands.
__global__ void add_cross_terms_kernel(
    float* __restrict__ out, const float* __restrict__ cross, int64_t n) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n) return;
  const float value = cross[index];
  if (!std::isnan(value)) out[index] += value;
}

// One row-major TF32 GEMM on cuBLAS: c[m x n] = op(a)[m x k] @ op(b)[k x n] + beta * c, op(x)
// = x^T where `x_transposed`, leading dimensions in elements. (cuBLAS is column-major: a
// row-major matrix is its transpose there, so it computes c^T = op(b)^T @ op(a)^T.) The operands
// are TF32 values already, so the tensor cores multiply them exactly.
void row_major_tf32_gemm(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, bool a_transposed,
    const float* b, int64_t ldb, bool b_transposed, float beta, float* c, int64_t ldc) {
  PEM_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max(),
            "deform_conv2d backward (cuda): GEMM of ", m, " x ", n, " x ", k,
            " exceeds cuBLAS's int sizes");
  const float alpha = 1.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      a_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
      static_cast<int>(k), &alpha, b, CUDA_R_32F, static_cast<int>(ldb), a, CUDA_R_32F,
      static_cast<int>(lda), &beta, c, CUDA_R_32F, static_cast<int>(ldc),
      CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

// A TF32-split operand: big + small = the fp32 matrix; row-major, `ld` elements per row.
struct SplitMatrix {
  const float* big;
  const float* small;
  int64_t ld;
  bool transposed;
};

// c[m x n] = beta * c + op(a) @ op(b) in 3xTF32: the cross terms small @ big + big @ small into
// `cross` (m x n, contiguous, as c must be), then c = beta * c + big @ big, then c += the cross
// terms without their NaNs. Where the parts lie one after the other along k in memory (op(a) =
// a^T with a's small rows right above its big ones, b's big rows right above its small ones),
// both cross terms are one GEMM over 2k, [a_small^T | a_big^T] @ [b_big; b_small]: cross is then
// written once instead of written, read and written again (at PEM's size 62 MB less traffic per
// backward block in the column gradient's GEMM).
void row_major_3xtf32_gemm(
    int64_t m, int64_t n, int64_t k, const SplitMatrix& a, const SplitMatrix& b, float beta,
    float* c, float* cross, cudaStream_t stream) {
  const bool stacked = a.transposed && !b.transposed && a.big == a.small + k * a.ld &&
      b.small == b.big + k * b.ld;
  if (stacked) {
    row_major_tf32_gemm(m, n, 2 * k, a.small, a.ld, true, b.big, b.ld, false, 0.0f, cross, n);
  } else {
    row_major_tf32_gemm(m, n, k, a.small, a.ld, a.transposed, b.big, b.ld, b.transposed, 0.0f,
                        cross, n);
    row_major_tf32_gemm(m, n, k, a.big, a.ld, a.transposed, b.small, b.ld, b.transposed, 1.0f,
                        cross, n);
  }
  row_major_tf32_gemm(m, n, k, a.big, a.ld, a.transposed, b.big, b.ld, b.transposed, beta, c, n);
  add_cross_terms_kernel<<<blocks_for(m * n, kElementThreads), kElementThreads, 0, stream>>>(
      c, cross, m * n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Channels whose shares step 5 adds with one atomic where the image gradient is fp32 with its
// channels adjacent (NHWC): a float4 atomic (compute capability 9.0) is one L2 operation where
// four scalar ones are four, and the scatter is bound by those operations (1.55 of the 3.77 ms
// forward+backward at (1,128,128,256) on the H200 of 2026-11-26 with scalar atomics on NCHW).
constexpr int kAtomicChannels = 4;

// Adds four consecutive channels' shares at `address` (16-byte aligned). The host takes this
// path on compute capability 9.0 and newer only; the sm_80 build compiles four scalar atomics.
__device__ __forceinline__ void atomic_add_channels(float* address, float4 value) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(address), value);
#else
  atomicAdd(address, value.x);
  atomicAdd(address + 1, value.y);
  atomicAdd(address + 2, value.z);
  atomicAdd(address + 3, value.w);
#endif
}

// Step 5 outside deterministic mode. One thread per (channel chunk, row, pixel of the block), as
// in step 1, consecutive threads on consecutive pixels: for each of up to kFillChannels channels
// of the offset group it adds grad_columns times the modulation and each corner's bilinear
// weight onto grad_image with atomics (fp32, or fp64 for fp64 inputs). The sample is computed
// once per chunk (it was once per channel: one thread per (channel * taps + tap, pixel)).
// kVector: kAtomicChannels channels per atomic (acc_t float, grad_image NHWC with 16-byte
// aligned pixels, chunks of multiples of kAtomicChannels channels).
template <typename scalar_t, typename acc_t, bool kVector>
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
  // grad_columns element of channel c at this thread's tap and pixel
  const acc_t* column = grad_columns + item.tap * count + j;
  const int64_t channel_step = s.taps() * count;
  if constexpr (kVector) {
    static_assert(std::is_same_v<acc_t, float> && kFillChannels % kAtomicChannels == 0);
    for (int64_t c = item.c_begin; c < item.c_end; c += kAtomicChannels) {
      const float v0 = column[c * channel_step] * modulation;
      const float v1 = column[(c + 1) * channel_step] * modulation;
      const float v2 = column[(c + 2) * channel_step] * modulation;
      const float v3 = column[(c + 3) * channel_step] * modulation;
      for (int corner = 0; corner < kBilinearCorners; ++corner) {
        if (sample.inside & (1u << corner)) {
          const float w = sample.weight[corner];
          atomic_add_channels(grad_image + c + sample.offset[corner],
                              make_float4(w * v0, w * v1, w * v2, w * v3));
        }
      }
    }
  } else {
    for (int64_t c = item.c_begin; c < item.c_end; ++c) {
      const acc_t value = column[c * channel_step] * modulation;
      acc_t* channel = grad_image + c * grad_in.channel;
      for (int corner = 0; corner < kBilinearCorners; ++corner) {
        if (sample.inside & (1u << corner)) {
          atomicAdd(channel + sample.offset[corner], sample.weight[corner] * value);
        }
      }
    }
  }
}

// The layout the kernels read `input` in (see reads_channels_last), and write its gradient in.
at::MemoryFormat input_format(const at::Tensor& input) {
  return reads_channels_last(input) ? at::MemoryFormat::ChannelsLast
                                    : at::MemoryFormat::Contiguous;
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
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  // Step 5 adds kAtomicChannels channels per float4 atomic where the device has them, the
  // accumulation is fp32 and every channel chunk starts at a multiple of kAtomicChannels; the
  // input gradient then accumulates with its channels adjacent (NHWC).
  bool vector_atomics = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    vector_atomics = !deterministic && s.offset_group_channels() % kAtomicChannels == 0 &&
        at::cuda::getCurrentDeviceProperties()->major >= 9;
  }
  // grad_input accumulates in acc_t in the layout the input is read in, or in NHWC for vector
  // atomics (the caller converts it to the input's layout after the column tiles are freed):
  // grad_input itself for fp32/fp64, a one-image fp32 buffer for fp16/bf16, copied into
  // grad_input after each image.
  const at::MemoryFormat accumulation_format =
      vector_atomics ? at::MemoryFormat::ChannelsLast : input_format(input);
  grad_input = kSameType
      ? at::empty(input.sizes(), input.options(), accumulation_format).zero_()
      : at::empty_like(input);
  const at::Tensor grad_image_buffer = kSameType
      ? at::Tensor()
      : at::empty({1, s.in_channels, s.height, s.width}, acc_options, accumulation_format);
  const Strides4 grad_in = strides_of(kSameType ? grad_input : grad_image_buffer);
  const bool channel_fastest = grad_in.channel == 1 && s.in_channels > 1;
  TORCH_INTERNAL_ASSERT(!vector_atomics || channel_fastest);

  const at::Tensor columns_storage = at::empty({s.in_channels * taps * block}, acc_options);
  const at::Tensor grad_columns_storage = at::empty({s.in_channels * taps * block}, acc_options);
  // 3xTF32 GEMMs (fp32 accumulation, PyTorch's "highest" precision, tensor cores). Without extra
  // column tiles: the fill writes the columns' TF32 remainder into the grad_columns tile (step 3
  // overwrites it after step 2 has read it), and step 3's cross terms go to the columns tile
  // (which step 2 no longer needs). grad_output and the weight are split into buffers of their
  // own (block x C_out and C_out x C_in / groups x taps, twice each).
  bool split_products = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    // The split kernels round with cvt.rna.tf32, compiled only in code for 8.0 and newer.
    split_products = fp32_products() == Fp32Products::kTf32x3 &&
        tensor_core_code(split_tf32_kernel<float>);
  }
  // Each split keeps its two parts one after the other (the weight's small part first,
  // grad_output's big part first), so that with one convolution group the column gradient's
  // cross terms are one GEMM (row_major_3xtf32_gemm).
  const at::Tensor grad_out_parts =
      split_products ? at::empty({2 * s.out_channels * block}, acc_options) : at::Tensor();
  const at::Tensor weight_parts =
      split_products ? at::empty({2, s.out_channels, group_rows}, acc_options) : at::Tensor();
  const at::Tensor weight_small = split_products ? weight_parts[0] : at::Tensor();
  const at::Tensor weight_big = split_products ? weight_parts[1] : at::Tensor();
  const at::Tensor grad_weight_cross =
      split_products ? at::empty({group_out, group_rows}, acc_options) : at::Tensor();
  if constexpr (std::is_same_v<acc_t, float>) {
    if (split_products) {
      split_tf32_kernel<float>
          <<<blocks_for(weight_acc.numel(), kElementThreads), kElementThreads, 0, stream>>>(
              weight_acc.const_data_ptr<float>(), s.out_channels, group_rows, group_rows,
              weight_big.data_ptr<float>(), weight_small.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  // The sorted gather of step 5 (deterministic mode only): the entry list and the boundaries of
  // its lists, one per (offset group, input pixel): list l holds the sorted entries
  // [entry_begin[l], entry_begin[l + 1]).
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
          s, in, input_data, offset_data, mask_data, b, pixel0, count, columns.data_ptr<acc_t>(),
          split_products ? grad_columns.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      // 2., 3. grad_weight_g += grad_out_g @ columns_g^T; grad_columns_g = W_g^T @ grad_out_g.
      if constexpr (std::is_same_v<acc_t, float>) {
        if (split_products) {
          // [C_out, count] each, the small part right after the big one
          float* const grad_out_big = grad_out_parts.data_ptr<float>();
          float* const grad_out_small = grad_out_big + s.out_channels * count;
          split_tf32_kernel<scalar_t>
              <<<blocks_for(s.out_channels * count, kElementThreads), kElementThreads, 0,
                 stream>>>(
                  grad_output.const_data_ptr<scalar_t>() + b * s.out_channels * pixels + pixel0,
                  s.out_channels, count, pixels, grad_out_big, grad_out_small);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          for (int64_t g = 0; g < s.groups; ++g) {
            const int64_t out0 = g * group_out * count, row0 = g * group_rows * count;
            const SplitMatrix grad_out_g{grad_out_big + out0, grad_out_small + out0, count,
                                         false};
            const SplitMatrix columns_g_t{columns.const_data_ptr<float>() + row0,
                                          grad_columns.const_data_ptr<float>() + row0, count,
                                          true};
            row_major_3xtf32_gemm(
                group_out, group_rows, count, grad_out_g, columns_g_t, 1.0f,
                grad_weight_acc.data_ptr<float>() + g * group_out * group_rows,
                grad_weight_cross.data_ptr<float>(), stream);
            const int64_t weight0 = g * group_out * group_rows;
            const SplitMatrix weight_g_t{weight_big.const_data_ptr<float>() + weight0,
                                         weight_small.const_data_ptr<float>() + weight0,
                                         group_rows, true};
            row_major_3xtf32_gemm(
                group_rows, count, group_out, weight_g_t, grad_out_g, 0.0f,
                grad_columns.data_ptr<float>() + row0, columns.data_ptr<float>() + row0, stream);
          }
        }
      }
      at::Tensor grad_out_block = grad_output_rows[b].narrow(1, pixel0, count);
      if constexpr (!kSameType) {
        if (!split_products) grad_out_block = grad_out_block.to(acc_options.dtype());
      }
      for (int64_t g = 0; g < s.groups && !split_products; ++g) {
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
        const unsigned atomic_blocks =
            blocks_for(fill_channel_chunks(s) * sample_threads, kElementThreads);
        bool launched = false;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (vector_atomics) {
            input_grad_atomic_kernel<scalar_t, float, true>
                <<<atomic_blocks, kElementThreads, 0, stream>>>(
                    s, grad_in, offset_data, mask_data, b, pixel0, count,
                    grad_columns.const_data_ptr<float>(), grad_image);
            launched = true;
          }
        }
        if (!launched) {
          input_grad_atomic_kernel<scalar_t, acc_t, false>
              <<<atomic_blocks, kElementThreads, 0, stream>>>(
                  s, grad_in, offset_data, mask_data, b, pixel0, count,
                  grad_columns.const_data_ptr<acc_t>(), grad_image);
        }
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
    if constexpr (!kSameType) grad_input[b].copy_(grad_image_buffer[0]);
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
  at::Tensor grad_input;  // allocated by the impl, in the layout it accumulates in
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  // Without a mask there is no mask gradient: an empty tensor stands in for it.
  at::Tensor grad_mask =
      mask.defined() ? at::zeros(mask.sizes(), mask.options()) : at::empty({0}, input.options());
  // grad_bias: a fixed-order reduction by ATen, accumulated in fp32 for half inputs.
  at::Tensor grad_bias =
      grad_output.sum({0, 2, 3}, /*keepdim=*/false, at::toOpMathType(input.scalar_type()))
          .to(input.scalar_type());
  if (s.batch == 0) return {at::zeros_like(input), grad_weight, grad_offset, grad_mask, grad_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
        deform_conv2d_backward_impl<scalar_t>(
            s, grad_output, input, weight, offset, mask, grad_input, grad_weight, grad_offset,
            grad_mask);
      });
  // NHWC where step 5 used vector atomics: into the input's layout now that the impl's column
  // tiles are freed (a no-op where it is already).
  grad_input = grad_input.contiguous(input_format(input));
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace pem_kernels

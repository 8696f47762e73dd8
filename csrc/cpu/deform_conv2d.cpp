// deform_conv2d on the CPU: modulated deformable convolution (DCNv2) as a blocked implicit GEMM.
//
// The output of one image is produced a block of output pixels at a time. For a block, the
// modulated bilinear samples of every (input channel, kernel tap, pixel) form a bounded column
// tile, and one GEMM per convolution group multiplies the weight with it into the output. The full
// [C_in * kh * kw, out_h * out_w] im2col matrix that torchvision builds never exists: a thread's
// tile holds at most about kForwardTileBytes. The blocks of the whole batch are handed to the
// threads one at a time (run_workers), so a thread slowed down on a shared machine takes fewer.
//
// Memory formats. The output is always contiguous NCHW (as torchvision's and the reference's).
// An NCHW input is gathered a few channels at a time into a [C_in * taps, pixels] tile. A
// channels_last input is read in place (no NCHW copy): it is gathered pixel by pixel into a
// [pixels, taps * C_in] tile whose inner loop runs over contiguous channels, multiplied with the
// weight permuted to (C_out, kh, kw, C_in / groups), and the GEMM writes the transposed output
// block straight into the NCHW output. Any other layout is made contiguous NCHW first. offset and
// mask are made contiguous (they are 2 * offset_groups * taps / C_in and offset_groups * taps /
// C_in of the input's size).
//
// Backward runs one image and one pixel block at a time, each step parallel inside the block,
// with a split of work that does not depend on the thread count, so that all five gradients are
// bit-identical from run to run: grad_weight is accumulated block after block by GEMMs over fixed
// row chunks, grad_input is scattered with each input channel owned by one task (taps and pixels
// in a fixed order), and the offset and mask gradients of a (group, tap, pixel) sum their
// channels in order, at a given number of threads. Across thread counts the GEMMs' last bits
// may differ: MKL splits a long reduction by the process's thread count even inside ATen's
// parallel region (grad_weight, whose GEMMs reduce over the pixels, rounds four ways with 1, 2,
// 3 and 4 threads at input [1, 16, 33, 29]).
// fp16/bf16 are computed in fp32
// (at::opmath_type) throughout and rounded once at the end.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "pem_kernels/deform_conv_checks.h"
#include "pem_kernels/deform_conv_common.h"
#include "pem_kernels/parallel.h"

namespace pem_kernels {
namespace {

// Upper bound of one thread's forward column tile: large enough that the GEMM over the tile runs
// near peak, small enough that the tile stays in L2 while it is built and multiplied.
constexpr int64_t kForwardTileBytes = 512 * 1024;
// Backward tiles (the columns and their gradient) are shared by all threads, so they may be
// larger: fewer blocks mean fewer parallel regions and larger GEMMs.
constexpr int64_t kBackwardTileBytes = 2 * 1024 * 1024;
// Pixel blocks are multiples of this, so GEMM operands start at 64-byte boundaries.
constexpr int64_t kPixelAlign = 16;
constexpr int64_t kMaxBlockPixels = 2048;
// Channels gathered per pass over a tap's samples in the by-channel tile: the samples are loaded
// once for all of them, and their corner rows still fit in L1 together (8 measured best).
constexpr int64_t kFillChannels = 8;
// Fixed GEMM row chunks of the backward pass: fixed (not derived from the thread count) so that
// every gradient element is computed by the same GEMM call shape in every run.
constexpr int64_t kWeightGradRows = 32;
constexpr int64_t kColumnGradRows = 64;
// Pixels per task when the offset and mask gradients are reduced over channels.
constexpr int64_t kCoordinateGradPixels = 64;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

int64_t divide_up(int64_t value, int64_t divisor) {
  return (value + divisor - 1) / divisor;
}

// Task indices [0, count), handed out one at a time to whichever thread asks next.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t count) : count_(count) {}
  // The next task, or -1 when every task is taken.
  int64_t next() {
    const int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < count_ ? task : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t count_;
};

// Runs worker() once on each of ATen's threads; workers take their tasks from a shared TaskQueue,
// so a thread that is slowed down (the machine is shared, or its tasks cost more) simply takes
// fewer. Which thread runs a task never changes its result. The region always spans every
// thread, even for fewer tasks than threads, so that the tasks' GEMMs run inside a parallel
// region, where OpenMP does not nest: no BLAS threads on top of ATen's.
template <typename Worker>
void run_workers(const Worker& worker) {
  pem_kernels::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { worker(); });
}

// Runs task(i) for every i in [0, count) on all threads (see run_workers).
template <typename Task>
void run_tasks(int64_t count, const Task& task) {
  TaskQueue queue(count);
  run_workers([&] {
    for (int64_t i = queue.next(); i >= 0; i = queue.next()) task(i);
  });
}

// Output pixels per block: as many as fit `tile_bytes` of columns, but no more than gives the
// batch `wanted_blocks` blocks in all (so every thread gets several).
int64_t block_pixels(
    const ConvShape& s, int64_t element_size, int64_t tile_bytes, int64_t wanted_blocks) {
  const int64_t column_bytes = s.in_channels * s.taps() * element_size;
  const int64_t by_size = tile_bytes / column_bytes / kPixelAlign * kPixelAlign;
  const int64_t blocks_per_image = divide_up(wanted_blocks, std::max<int64_t>(s.batch, 1));
  const int64_t by_parallelism = round_up(divide_up(s.out_pixels(), blocks_per_image), kPixelAlign);
  return std::clamp<int64_t>(std::min(by_size, by_parallelism), kPixelAlign, kMaxBlockPixels);
}

// One image's inputs as raw pointers, plus the element strides of its input image.
template <typename scalar_t>
struct ImageData {
  const scalar_t* input;  // (c, y, x) at c * channel_stride + y * row_stride + x * col_stride
  int64_t channel_stride, row_stride, col_stride;
  const scalar_t* offset;  // [2 * offset_groups * taps, out_pixels]
  const scalar_t* mask;    // [offset_groups * taps, out_pixels], or null
};

template <typename scalar_t>
ImageData<scalar_t> image_data(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t b) {
  ImageData<scalar_t> d;
  d.input = input.const_data_ptr<scalar_t>() + b * input.stride(0);
  d.channel_stride = input.stride(1);
  d.row_stride = input.stride(2);
  d.col_stride = input.stride(3);
  d.offset = offset.const_data_ptr<scalar_t>() + b * offset.stride(0);
  d.mask = mask.defined() ? mask.const_data_ptr<scalar_t>() + b * mask.stride(0) : nullptr;
  return d;
}

// The sample tables of one pixel block: samples and modulation of (offset group, tap) row `r` and
// block pixel j at [r * block + j].
template <typename acc_t>
struct SampleTables {
  BilinearSample<acc_t>* samples;
  acc_t* modulation;

  static int64_t samples_bytes(const ConvShape& s, int64_t block) {
    return round_up(s.sample_rows() * block * int64_t(sizeof(BilinearSample<acc_t>)), 64);
  }
  static int64_t bytes(const ConvShape& s, int64_t block) {
    return samples_bytes(s, block) + round_up(s.sample_rows() * block * int64_t(sizeof(acc_t)), 64);
  }
  // Tables laid out in `bytes(s, block)` bytes of 64-byte aligned scratch.
  static SampleTables at(uint8_t* scratch, const ConvShape& s, int64_t block) {
    return {
        reinterpret_cast<BilinearSample<acc_t>*>(scratch),
        reinterpret_cast<acc_t*>(scratch + samples_bytes(s, block))};
  }
};

// Fills rows [row_begin, row_end) of the sample tables for the block pixels
// [pixel0, pixel0 + count) of one image.
template <typename scalar_t, typename acc_t>
void compute_samples(
    const ConvShape& s, const ImageData<scalar_t>& d, int64_t pixel0, int64_t count,
    int64_t block, int64_t row_begin, int64_t row_end, const SampleTables<acc_t>& tables) {
  const int64_t taps = s.taps(), pixels = s.out_pixels();
  for (int64_t row = row_begin; row < row_end; ++row) {  // row = offset group * taps + tap
    const int64_t tap = row % taps;
    const int64_t tap_y = tap / s.kernel_w, tap_x = tap % s.kernel_w;
    const scalar_t* offset_y = d.offset + (2 * row) * pixels;
    const scalar_t* offset_x = offset_y + pixels;
    const scalar_t* mask_row = d.mask == nullptr ? nullptr : d.mask + row * pixels;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t p = pixel0 + j;
      const int64_t out_y = p / s.out_w, out_x = p % s.out_w;
      const acc_t y = sample_coordinate<acc_t>(
          out_y, tap_y, s.stride_h, s.pad_h, s.dilation_h, static_cast<acc_t>(offset_y[p]));
      const acc_t x = sample_coordinate<acc_t>(
          out_x, tap_x, s.stride_w, s.pad_w, s.dilation_w, static_cast<acc_t>(offset_x[p]));
      tables.samples[row * block + j] =
          bilinear_sample<acc_t>(y, x, s.height, s.width, d.row_stride, d.col_stride);
      tables.modulation[row * block + j] =
          mask_row == nullptr ? acc_t(1) : static_cast<acc_t>(mask_row[p]);
    }
  }
}

// Column tile [C_in * taps, block] (row c * taps + tap: the order of weight.view(C_out, -1)) of
// input channels [channel_begin, channel_end), for images whose channel planes are contiguous.
// Each sample's corners and weights are loaded once for kFillChannels channels.
template <typename scalar_t, typename acc_t>
void fill_columns_by_channel(
    const ConvShape& s, const ImageData<scalar_t>& d, const SampleTables<acc_t>& tables,
    int64_t count, int64_t block, int64_t channel_begin, int64_t channel_end, acc_t* columns) {
  const int64_t taps = s.taps(), per_offset_group = s.offset_group_channels();
  const int64_t channel_rows = taps * block;  // tile distance between consecutive channels
  for (int64_t c0 = channel_begin; c0 < channel_end;) {
    const int64_t og = c0 / per_offset_group;
    const int64_t n =
        std::min({kFillChannels, channel_end - c0, (og + 1) * per_offset_group - c0});
    const scalar_t* channel0 = d.input + c0 * d.channel_stride;
    for (int64_t tap = 0; tap < taps; ++tap) {
      const BilinearSample<acc_t>* row = tables.samples + (og * taps + tap) * block;
      const acc_t* row_modulation = tables.modulation + (og * taps + tap) * block;
      acc_t* out = columns + (c0 * taps + tap) * block;
      for (int64_t j = 0; j < count; ++j) {
        const BilinearSample<acc_t>& sample = row[j];
        const acc_t m = row_modulation[j];
        if (sample.inside == kAllCornersInside) {
          const scalar_t* in0 = channel0 + sample.offset[0];
          const scalar_t* in1 = channel0 + sample.offset[1];
          const scalar_t* in2 = channel0 + sample.offset[2];
          const scalar_t* in3 = channel0 + sample.offset[3];
          for (int64_t i = 0; i < n; ++i) {
            const int64_t at = i * d.channel_stride;
            out[i * channel_rows + j] = m *
                (sample.weight[0] * static_cast<acc_t>(in0[at]) +
                 sample.weight[1] * static_cast<acc_t>(in1[at]) +
                 sample.weight[2] * static_cast<acc_t>(in2[at]) +
                 sample.weight[3] * static_cast<acc_t>(in3[at]));
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            out[i * channel_rows + j] =
                m * bilinear_interpolate(channel0 + i * d.channel_stride, sample);
          }
        }
      }
    }
    c0 += n;
  }
}

// Transposed column tile [block, C_in * taps] (row j; column (group, tap, channel in group): the
// order of the weight permuted to (C_out, kh, kw, C_in / groups)) of the block pixels
// [pixel_begin, pixel_end) of a channels_last image, whose inner loop reads and writes contiguous
// channels.
template <typename scalar_t, typename acc_t>
void fill_columns_by_pixel(
    const ConvShape& s, const ImageData<scalar_t>& d, const SampleTables<acc_t>& tables,
    int64_t block, int64_t pixel_begin, int64_t pixel_end, acc_t* columns_t) {
  const int64_t taps = s.taps(), group_channels = s.group_channels();
  const int64_t per_offset_group = s.offset_group_channels();
  for (int64_t j = pixel_begin; j < pixel_end; ++j) {
    acc_t* out_row = columns_t + j * s.in_channels * taps;
    for (int64_t og = 0; og < s.offset_groups; ++og) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const BilinearSample<acc_t>& sample = tables.samples[(og * taps + tap) * block + j];
        const acc_t m = tables.modulation[(og * taps + tap) * block + j];
        // The channels of one offset group may span several convolution groups; each run of
        // channels inside one convolution group is contiguous in the tile.
        const int64_t c_end = (og + 1) * per_offset_group;
        for (int64_t c = og * per_offset_group; c < c_end;) {
          const int64_t group = c / group_channels;
          const int64_t run_end = std::min(c_end, (group + 1) * group_channels);
          // Tile column of channel k: group * taps * group_channels + tap * group_channels + k
          // - group * group_channels.
          acc_t* out = out_row + (group * (taps - 1) + tap) * group_channels;
          if (sample.inside == kAllCornersInside) {
            const scalar_t* in0 = d.input + sample.offset[0];
            const scalar_t* in1 = d.input + sample.offset[1];
            const scalar_t* in2 = d.input + sample.offset[2];
            const scalar_t* in3 = d.input + sample.offset[3];
            const acc_t w0 = sample.weight[0], w1 = sample.weight[1];
            const acc_t w2 = sample.weight[2], w3 = sample.weight[3];
            for (int64_t k = c; k < run_end; ++k) {
              out[k] = m *
                  (w0 * static_cast<acc_t>(in0[k]) + w1 * static_cast<acc_t>(in1[k]) +
                   w2 * static_cast<acc_t>(in2[k]) + w3 * static_cast<acc_t>(in3[k]));
            }
          } else {
            for (int64_t k = c; k < run_end; ++k) {
              out[k] = m * bilinear_interpolate(d.input + k, sample);  // channel stride 1
            }
          }
          c = run_end;
        }
      }
    }
  }
}

template <typename scalar_t>
void deform_conv2d_forward_impl(
    const ConvShape& s, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& bias, bool by_pixel,
    at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  // fp32/fp64 GEMMs write the output directly; fp16/bf16 go through an fp32 tile.
  constexpr bool kDirectOutput = std::is_same_v<scalar_t, acc_t>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto byte_options = input.options().dtype(at::kByte);
  const int64_t taps = s.taps(), pixels = s.out_pixels();
  const int64_t group_rows = s.group_rows(), group_out = s.group_out_channels();
  const int64_t block =
      block_pixels(s, sizeof(acc_t), kForwardTileBytes, 4 * int64_t(at::get_num_threads()));
  const int64_t blocks_per_image = divide_up(pixels, block);

  // GEMM weight in acc_t, [C_out, C_in / groups * taps]: (channel, tap) columns for the
  // by-channel tile, (tap, channel) columns for the by-pixel tile.
  at::Tensor gemm_weight = weight.to(acc_options.dtype());
  gemm_weight = by_pixel ? gemm_weight.permute({0, 2, 3, 1}).contiguous()
                         : gemm_weight.contiguous();
  gemm_weight = gemm_weight.view({s.out_channels, group_rows});
  const at::Tensor bias_acc =
      bias.defined() ? bias.to(acc_options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const at::Tensor output_rows = output.view({s.batch, s.out_channels, pixels});

  // One thread's scratch: sample tables, the column tile, and (fp16/bf16) the fp32 output tile.
  const int64_t tables_bytes = SampleTables<acc_t>::bytes(s, block);
  const int64_t columns_bytes = round_up(s.in_channels * taps * block * int64_t(sizeof(acc_t)), 64);
  const int64_t out_tile_bytes =
      kDirectOutput ? 0 : s.out_channels * block * int64_t(sizeof(acc_t));

  TaskQueue queue(s.batch * blocks_per_image);
  run_workers([&] {
    // Allocated through ATen (so memory profilers see it), once per thread and call.
    const at::Tensor scratch =
        at::empty({tables_bytes + columns_bytes + out_tile_bytes}, byte_options);
    uint8_t* base = scratch.data_ptr<uint8_t>();
    const SampleTables<acc_t> tables = SampleTables<acc_t>::at(base, s, block);
    const at::Tensor columns = by_pixel
        ? at::from_blob(base + tables_bytes, {block, s.in_channels * taps}, acc_options)
        : at::from_blob(base + tables_bytes, {s.in_channels * taps, block}, acc_options);
    const at::Tensor out_tile = kDirectOutput
        ? at::Tensor()
        : at::from_blob(base + tables_bytes + columns_bytes, {s.out_channels, block}, acc_options);
    acc_t* columns_data = columns.data_ptr<acc_t>();

    for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
      const int64_t b = task / blocks_per_image;
      const int64_t pixel0 = (task % blocks_per_image) * block;
      const int64_t count = std::min(block, pixels - pixel0);
      const ImageData<scalar_t> d = image_data<scalar_t>(input, offset, mask, b);
      compute_samples(s, d, pixel0, count, block, 0, s.sample_rows(), tables);
      if (by_pixel) {
        fill_columns_by_pixel(s, d, tables, block, 0, count, columns_data);
      } else {
        fill_columns_by_channel(s, d, tables, count, block, 0, s.in_channels, columns_data);
      }
      // [C_out, count]: the output block itself when it is acc_t, else the fp32 tile.
      const at::Tensor destination = kDirectOutput ? output_rows[b].narrow(1, pixel0, count)
                                                   : out_tile.narrow(1, 0, count);
      for (int64_t g = 0; g < s.groups; ++g) {
        at::Tensor out_g = destination.narrow(0, g * group_out, group_out);
        const at::Tensor weight_g = gemm_weight.narrow(0, g * group_out, group_out);
        if (by_pixel) {
          // out_g^T [count, group_out] = columns_t_g [count, group_rows] @ weight_g^T; BLAS
          // writes the transposed (column-major) view of the NCHW block directly.
          at::Tensor out_g_t = out_g.t();
          at::mm_out(
              out_g_t, columns.narrow(0, 0, count).narrow(1, g * group_rows, group_rows),
              weight_g.t());
        } else {
          at::mm_out(
              out_g, weight_g, columns.narrow(0, g * group_rows, group_rows).narrow(1, 0, count));
        }
      }
      scalar_t* out = output_rows.data_ptr<scalar_t>() + b * s.out_channels * pixels + pixel0;
      if constexpr (kDirectOutput) {
        if (bias_data != nullptr) {
          for (int64_t o = 0; o < s.out_channels; ++o) {
            for (int64_t j = 0; j < count; ++j) out[o * pixels + j] += bias_data[o];
          }
        }
      } else {
        const acc_t* tile = out_tile.const_data_ptr<acc_t>();
        for (int64_t o = 0; o < s.out_channels; ++o) {
          const acc_t add = bias_data == nullptr ? acc_t(0) : bias_data[o];
          for (int64_t j = 0; j < count; ++j) {
            out[o * pixels + j] = static_cast<scalar_t>(tile[o * block + j] + add);
          }
        }
      }
    }
  });
}

at::Tensor deform_conv2d_cpu(
    const at::Tensor& input_in, const at::Tensor& weight_in, const at::Tensor& offset_in,
    const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& bias_in,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
    int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_inputs(
      "deform_conv2d", input_in, weight_in, offset_in, mask_in, bias_in, stride_h, stride_w,
      pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups);
  const at::Tensor input = kernel_input(input_in);
  const bool by_pixel = reads_channels_last(input);
  const at::Tensor weight = weight_in.detach();
  const at::Tensor offset = offset_in.detach().contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->detach().contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->detach() : at::Tensor();
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_cpu", [&] {
        deform_conv2d_forward_impl<scalar_t>(
            s, input, weight, offset, mask, bias, by_pixel, output);
      });
  return output;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void deform_conv2d_backward_impl(
    const ConvShape& s, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& offset, const at::Tensor& mask,
    at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_offset,
    at::Tensor& grad_mask, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  // fp32/fp64 gradients are accumulated in place; fp16/bf16 ones in fp32 buffers.
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t taps = s.taps(), pixels = s.out_pixels();
  const int64_t group_rows = s.group_rows(), group_out = s.group_out_channels();
  const int64_t per_offset_group = s.offset_group_channels();
  // The block size depends on the shape only, never on the thread count: it fixes the order in
  // which grad_weight is accumulated.
  const int64_t block = block_pixels(s, sizeof(acc_t), kBackwardTileBytes, 1);
  const int64_t blocks_per_image = divide_up(pixels, block);

  const at::Tensor weight_acc =
      weight.to(acc_options.dtype()).contiguous().view({s.out_channels, group_rows});
  at::Tensor grad_weight_acc = kSameType ? grad_weight.view({s.out_channels, group_rows})
                                         : at::zeros({s.out_channels, group_rows}, acc_options);
  // grad_input of the current image in acc_t, with the input's own strides so that the sample
  // offsets address it too: grad_input itself, or a one-image fp32 buffer.
  const at::Tensor grad_image_buffer =
      kSameType ? at::Tensor() : at::empty_like(grad_input[0], acc_options);

  const at::Tensor columns = at::empty({s.in_channels * taps, block}, acc_options);
  const at::Tensor grad_columns = at::empty({s.in_channels * taps, block}, acc_options);
  const at::Tensor grad_out_tile =
      kSameType ? at::Tensor() : at::empty({s.out_channels, block}, acc_options);
  const at::Tensor tables_scratch =
      at::empty({SampleTables<acc_t>::bytes(s, block)}, input.options().dtype(at::kByte));
  const SampleTables<acc_t> tables =
      SampleTables<acc_t>::at(tables_scratch.data_ptr<uint8_t>(), s, block);
  acc_t* columns_data = columns.data_ptr<acc_t>();
  const acc_t* grad_columns_data = grad_columns.const_data_ptr<acc_t>();
  const at::Tensor grad_output_rows = grad_output.view({s.batch, s.out_channels, pixels});
  const int64_t weight_chunks = divide_up(group_out, kWeightGradRows);
  const int64_t column_chunks = divide_up(group_rows, kColumnGradRows);

  for (int64_t b = 0; b < s.batch; ++b) {
    const ImageData<scalar_t> d = image_data<scalar_t>(input, offset, mask, b);
    acc_t* grad_image;
    if constexpr (kSameType) {
      grad_image = grad_input.data_ptr<acc_t>() + b * grad_input.stride(0);
    } else {
      grad_image_buffer.zero_();
      grad_image = grad_image_buffer.data_ptr<acc_t>();
    }
    scalar_t* grad_offset_image = grad_offset.data_ptr<scalar_t>() + b * grad_offset.stride(0);
    scalar_t* grad_mask_image =
        mask.defined() ? grad_mask.data_ptr<scalar_t>() + b * grad_mask.stride(0) : nullptr;

    for (int64_t block_index = 0; block_index < blocks_per_image; ++block_index) {
      const int64_t pixel0 = block_index * block;
      const int64_t count = std::min(block, pixels - pixel0);

      // 1. Samples and the (modulated) column tile, as in the forward pass.
      run_tasks(s.sample_rows(), [&](int64_t row) {
        compute_samples(s, d, pixel0, count, block, row, row + 1, tables);
      });
      run_tasks(divide_up(s.in_channels, kFillChannels), [&](int64_t task) {
        const int64_t c0 = task * kFillChannels;
        const int64_t c1 = std::min(c0 + kFillChannels, s.in_channels);
        fill_columns_by_channel(s, d, tables, count, block, c0, c1, columns_data);
      });
      at::Tensor grad_out_block = grad_output_rows[b].narrow(1, pixel0, count);
      if constexpr (!kSameType) {
        at::Tensor converted = grad_out_tile.narrow(1, 0, count);
        converted.copy_(grad_out_block);
        grad_out_block = converted;
      }

      // 2. grad_weight_g += grad_out_g [group_out, count] @ columns_g^T, in fixed row chunks.
      run_tasks(s.groups * weight_chunks, [&](int64_t task) {
        const int64_t g = task / weight_chunks;
        const int64_t row0 = g * group_out + (task % weight_chunks) * kWeightGradRows;
        const int64_t rows = std::min(kWeightGradRows, (g + 1) * group_out - row0);
        grad_weight_acc.narrow(0, row0, rows)
            .addmm_(
                grad_out_block.narrow(0, row0, rows),
                columns.narrow(0, g * group_rows, group_rows).narrow(1, 0, count).t());
      });
      // 3. grad_columns_g = weight_g^T [group_rows, group_out] @ grad_out_g, in fixed row chunks.
      run_tasks(s.groups * column_chunks, [&](int64_t task) {
        const int64_t g = task / column_chunks;
        const int64_t row0 = (task % column_chunks) * kColumnGradRows;
        const int64_t rows = std::min(kColumnGradRows, group_rows - row0);
        at::Tensor out = grad_columns.narrow(0, g * group_rows + row0, rows).narrow(1, 0, count);
        at::mm_out(
            out, weight_acc.narrow(0, g * group_out, group_out).t().narrow(0, row0, rows),
            grad_out_block.narrow(0, g * group_out, group_out));
      });

      // 4. Offset and mask gradients: per (offset group, tap, pixel) a sum over the group's
      //    channels, in channel order. The column's gradient reaches the unmodulated sample
      //    times the modulation m, and the modulation times the sample.
      const int64_t pixel_chunks = divide_up(count, kCoordinateGradPixels);
      run_tasks(s.sample_rows() * pixel_chunks, [&](int64_t task) {
        acc_t sum_value[kCoordinateGradPixels], sum_dy[kCoordinateGradPixels],
            sum_dx[kCoordinateGradPixels];
        const int64_t row = task / pixel_chunks;  // offset group * taps + tap
        const int64_t og = row / taps, tap = row % taps;
        const int64_t j0 = (task % pixel_chunks) * kCoordinateGradPixels;
        const int64_t n = std::min(kCoordinateGradPixels, count - j0);
        std::fill(sum_value, sum_value + n, acc_t(0));
        std::fill(sum_dy, sum_dy + n, acc_t(0));
        std::fill(sum_dx, sum_dx + n, acc_t(0));
        const BilinearSample<acc_t>* row_samples = tables.samples + row * block + j0;
        for (int64_t c = og * per_offset_group; c < (og + 1) * per_offset_group; ++c) {
          const scalar_t* channel = d.input + c * d.channel_stride;
          const acc_t* grad_sampled = grad_columns_data + (c * taps + tap) * block + j0;
          for (int64_t j = 0; j < n; ++j) {
            accumulate_sample_grads(
                channel, row_samples[j], grad_sampled[j], &sum_value[j], &sum_dy[j],
                &sum_dx[j]);
          }
        }
        const acc_t* row_modulation = tables.modulation + row * block + j0;
        scalar_t* grad_y = grad_offset_image + (2 * row) * pixels + pixel0 + j0;
        scalar_t* grad_x = grad_y + pixels;
        for (int64_t j = 0; j < n; ++j) {
          grad_y[j] = static_cast<scalar_t>(row_modulation[j] * sum_dy[j]);
          grad_x[j] = static_cast<scalar_t>(row_modulation[j] * sum_dx[j]);
        }
        if (grad_mask_image != nullptr) {
          scalar_t* grad_m = grad_mask_image + row * pixels + pixel0 + j0;
          for (int64_t j = 0; j < n; ++j) grad_m[j] = static_cast<scalar_t>(sum_value[j]);
        }
      });

      // 5. grad_input: each channel is scattered by exactly one task, taps and pixels in order.
      run_tasks(s.in_channels, [&](int64_t c) {
        acc_t* grad_channel = grad_image + c * d.channel_stride;
        const int64_t row0 = (c / per_offset_group) * taps;
        for (int64_t tap = 0; tap < taps; ++tap) {
          const BilinearSample<acc_t>* row_samples = tables.samples + (row0 + tap) * block;
          const acc_t* row_modulation = tables.modulation + (row0 + tap) * block;
          const acc_t* grad_sampled = grad_columns_data + (c * taps + tap) * block;
          for (int64_t j = 0; j < count; ++j) {
            const BilinearSample<acc_t>& sample = row_samples[j];
            const acc_t grad = row_modulation[j] * grad_sampled[j];
            if (sample.inside == kAllCornersInside) {
              for (int corner = 0; corner < kBilinearCorners; ++corner) {
                grad_channel[sample.offset[corner]] += sample.weight[corner] * grad;
              }
            } else {
              for (int corner = 0; corner < kBilinearCorners; ++corner) {
                if (sample.inside & (1u << corner)) {
                  grad_channel[sample.offset[corner]] += sample.weight[corner] * grad;
                }
              }
            }
          }
        }
      });
    }
    if constexpr (!kSameType) grad_input[b].copy_(grad_image_buffer);
  }
  if constexpr (!kSameType) grad_weight.copy_(grad_weight_acc.view(grad_weight.sizes()));

  // grad_bias: per output channel the sum over images and pixels, in a fixed order, in double.
  const scalar_t* grad_out_data = grad_output.const_data_ptr<scalar_t>();
  scalar_t* grad_bias_data = grad_bias.data_ptr<scalar_t>();
  run_tasks(s.out_channels, [&](int64_t o) {
    double sum = 0;
    for (int64_t b = 0; b < s.batch; ++b) {
      const scalar_t* row = grad_out_data + (b * s.out_channels + o) * pixels;
      for (int64_t p = 0; p < pixels; ++p) sum += static_cast<double>(row[p]);
    }
    grad_bias_data[o] = static_cast<scalar_t>(sum);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& input_in, const at::Tensor& weight_in,
    const at::Tensor& offset_in, const std::optional<at::Tensor>& mask_in, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_backward_inputs(
      grad_output_in, input_in, weight_in, offset_in, mask_in, stride_h, stride_w, pad_h, pad_w,
      dilation_h, dilation_w, groups, offset_groups);

  const at::Tensor input = kernel_input(input_in);
  const at::Tensor grad_output = grad_output_in.detach().contiguous();
  const at::Tensor weight = weight_in.detach();
  const at::Tensor offset = offset_in.detach().contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->detach().contiguous() : at::Tensor();
  // grad_input has the layout the kernel reads the input in (channels_last stays channels_last);
  // the other gradients are contiguous.
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  // Without a mask there is no mask gradient: an empty tensor stands in for it.
  at::Tensor grad_mask =
      mask.defined() ? at::empty(mask.sizes(), mask.options()) : at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({s.out_channels}, input.options());
  if (s.batch == 0) {
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
        deform_conv2d_backward_impl<scalar_t>(
            s, grad_output, input, weight, offset, mask, grad_input, grad_weight, grad_offset,
            grad_mask, grad_bias);
      });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace pem_kernels

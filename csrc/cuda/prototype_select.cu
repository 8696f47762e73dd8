// prototype_select on CUDA: the same semantics as csrc/cpu/prototype_select.cpp.
//
// Forward, two kernels (three with normalize_keys), none of which materializes the
// [B, heads, HW, N] similarity or the normalized keys:
//
// 1. key_norm_divisors_kernel (normalize_keys only): max(||keys[b, p, :]||, eps) per pixel.
// 2. prototype_select_tile_kernel, grid (pixel splits, query blocks, B * heads): a block owns
//    kTileQueries queries of one (image, head) and a contiguous range of kTilePixels-pixel tiles.
//    Per tile it stages keys (and queries, unless the head's channels fit one kTileDim chunk, as
//    PEM's 32 do: then the queries are staged once) in shared memory kTileDim channels at a time;
//    the next chunk's keys and the tile's mask (bool bytes, or the mask logits themselves: see
//    MaskRows) are loaded into registers before the current chunk's products, so their latency
//    overlaps the FMAs. Every thread accumulates a kMicro x
//    kMicro (pixel x query) block of scores in registers (16-byte shared-memory loads), then folds
//    its pixels into one running argmax per query that ranks allowed pixels first
//    (AllowedFirstArgmax: the masked argmax once an allowed pixel was seen, the unmasked one, an
//    empty query's fallback, until then). Each thread sees its pixels in increasing order, so the
//    visit rule holds; at the end the 16 threads that share a query are merged (warp shuffles)
//    and the block writes one partial per (split, image, head, query). Splitting the pixel axis
//    keeps the GPU busy at batch 1 (B * heads * query blocks = 16 blocks for PEM). With
//    normalize_keys the keys are divided by their norms as they are staged, so the scores are
//    those of the normalized keys.
// 3. merge_and_gather_kernel, grid (N, B): merges the partials of every head of its query, 16
//    lanes per head (argmax_merge is associative and commutative: the result is deterministic and
//    independent of block timing), applies the empty-mask rule (which needs to know whether any
//    query of the image has an allowed pixel), writes the indices, then copies (and normalizes)
//    the selected key rows.
//
// The tie and NaN rules (score_beats, argmax_merge, empty_query_choice) are the host + device
// helpers the CPU kernel uses. Scores are accumulated in fp32 (fp64 for fp64 inputs). On compute
// capability 8.0 and newer the fp32-accumulated scores come from tensor cores (WMMA TF32
// fragments, each warp 16 pixels x 32 queries of the tile, through shared memory to the threads'
// argmax folds) under the rules of pem_kernels/fp32_products.h: 3xTF32 for fp32 at PyTorch's
// default precision (the NaN remainders of inf operands dropped, as in the deform kernel), TF32
// where PyTorch allows it, FMAs with PEM_KERNELS_FP32_DOT=ieee. fp16 and bf16 keys and queries
// are TF32 values already, so one TF32 product is exact for them (three with normalize_keys, whose
// divided keys are not). fp64 uses FMAs.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pem_kernels/check.h"
#include "pem_kernels/prototype_select_checks.h"
#include "pem_kernels/fp32_products.h"
#include "pem_kernels/prototype_select_common.h"
#include "pem_kernels/tensor_cores.h"

namespace pem_kernels {
namespace {

// Score tile of one block: kTilePixels x kTileQueries, kMicro x kMicro per thread.
constexpr int kTilePixels = 64;
constexpr int kTileQueries = 64;
constexpr int kTileDim = 32;  // channels staged in shared memory per step (PEM: head_dim 32)
constexpr int kMicro = 4;
constexpr int kPixelLanes = kTilePixels / kMicro;  // threads that share a query: 16 lanes of a warp
constexpr int kTileThreads = kPixelLanes * (kTileQueries / kMicro);
static_assert(kTileThreads == 256, "the tile kernel is launched with 256 threads");
static_assert(32 % kPixelLanes == 0, "the lanes sharing a query must lie in one warp");
// Blocks per SM the split heuristic aims for (several waves hide the tail of the last one). The
// fp32-accumulating tile kernels use 124-128 registers per thread (`python -m benchmarks
// ptxas-stats prototype_select`: CUDA 13.0, sm_90), so two blocks of 256 threads are resident
// per SM at a time: four per SM means two waves.
constexpr int64_t kBlocksPerSM = 4;
constexpr int kMergeThreads = 256;
constexpr int kGatherThreads = 256;

struct Problem {
  int64_t batch, pixels, channels, queries, heads, head_dim;
};

template <typename scalar_t, typename acc_t>
__global__ void key_norm_divisors_kernel(const scalar_t* keys, acc_t* divisors, int64_t rows, int64_t channels) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (row >= rows) return;
  acc_t sum_sq = 0;
  for (int64_t c = threadIdx.x; c < channels; c += 32) {
    const acc_t v = static_cast<acc_t>(keys[row * channels + c]);
    sum_sq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  // Not max(): CUDA's fmax returns eps for a NaN norm, where std::max (the CPU kernel) and
  // F.normalize keep the NaN, so a NaN key must make every head's score at its pixel NaN.
  const acc_t norm = sqrt(sum_sq);
  if (threadIdx.x == 0) divisors[row] = norm < static_cast<acc_t>(kKeyNormEps) ? static_cast<acc_t>(kKeyNormEps) : norm;
}

// The running argmax of one (image, head, query) over the pixels seen so far, allowed pixels
// ranked above all others: while no allowed pixel has been seen it is the argmax over every seen
// pixel (what an empty query falls back to), afterwards the argmax over the allowed ones. One
// state does the work of a masked and an unmasked argmax. Pixel indices fit in int32 (checked).
template <typename acc_t>
struct AllowedFirstArgmax {
  acc_t score;
  int32_t index;    // -1 until a pixel is seen
  int32_t allowed;  // whether `index` is an allowed pixel (an int: it travels through shuffles)
};

// Visits pixel `index`, larger than every pixel the state has seen. Within each class the first
// pixel is taken whatever its score (an all -inf row still selects its first allowed pixel), then
// score_beats decides: NaN wins and is never replaced, ties keep the lower index.
template <typename acc_t>
__device__ __forceinline__ void allowed_first_visit(
    AllowedFirstArgmax<acc_t>& state, acc_t score, int32_t index, bool allowed) {
  const bool replace = allowed
      ? !state.allowed || score_beats(score, state.score)
      : !state.allowed && (state.index < 0 || score_beats(score, state.score));
  if (replace) state = AllowedFirstArgmax<acc_t>{score, index, allowed};
}

// Merges two states over disjoint pixel sets: associative and commutative (a lexicographic max
// of (allowed, score, -index) under argmax_merge's rules), so any reduction order gives the same,
// deterministic result.
template <typename acc_t>
__device__ __forceinline__ AllowedFirstArgmax<acc_t> allowed_first_merge(
    AllowedFirstArgmax<acc_t> a, AllowedFirstArgmax<acc_t> b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (a.allowed != b.allowed) return a.allowed ? a : b;
  const ArgmaxState<acc_t> best =
      argmax_merge(ArgmaxState<acc_t>{a.score, a.index}, ArgmaxState<acc_t>{b.score, b.index});
  return AllowedFirstArgmax<acc_t>{best.score, static_cast<int32_t>(best.index), a.allowed};
}

// Merges the states of the kPixelLanes consecutive lanes that hold the same query; every one of
// them gets the result.
template <typename acc_t>
__device__ AllowedFirstArgmax<acc_t> merge_pixel_lanes(AllowedFirstArgmax<acc_t> state) {
  for (int offset = kPixelLanes / 2; offset > 0; offset /= 2) {
    const AllowedFirstArgmax<acc_t> other{
        __shfl_xor_sync(0xffffffffu, state.score, offset),
        __shfl_xor_sync(0xffffffffu, state.index, offset),
        __shfl_xor_sync(0xffffffffu, state.allowed, offset)};
    state = allowed_first_merge(state, other);
  }
  return state;
}

// tile[d][r] = matrix[row0 + r][dim0 + d] (row-major, `row_stride` elements per row) in acc_t,
// zero outside [0, rows) x [0, dims). Consecutive threads load consecutive channels of a row:
// coalesced.
template <int kRows, typename scalar_t, typename acc_t>
__device__ void stage_transposed(
    acc_t (*tile)[kRows + 4], const scalar_t* matrix, int64_t row0, int64_t rows, int64_t dim0,
    int64_t dims, int64_t row_stride) {
  for (int e = threadIdx.x; e < kTileDim * kRows; e += kTileThreads) {
    const int r = e / kTileDim, d = e % kTileDim;
    const int64_t row = row0 + r, dim = dim0 + d;
    tile[d][r] = row < rows && dim < dims ? static_cast<acc_t>(matrix[row * row_stride + dim]) : acc_t(0);
  }
}

// One thread's share of a key chunk (kTileDim channels of kTilePixels pixels), held in registers
// from the moment its loads are issued (before the previous chunk's products) until it is stored
// to shared memory (after them): the loads' latency overlaps the FMAs. Thread t holds channel
// t % kTileDim of pixels t / kTileDim + k * kKeyRowsPerPass, so a warp reads kTileDim
// consecutive channels of a pixel (coalesced). With kDivide (normalize_keys) the pixels' norm
// divisors travel along; padding elements are 0 (divisor 1), never 0 / NaN.
constexpr int kKeyRowsPerPass = kTileThreads / kTileDim;
constexpr int kKeyLoads = kTilePixels / kKeyRowsPerPass;
static_assert(kTileThreads % kTileDim == 0 && kTilePixels % kKeyRowsPerPass == 0, "key chunk split");

template <typename acc_t, bool kDivide>
struct KeyChunk {
  acc_t value[kKeyLoads];
  acc_t divisor[kDivide ? kKeyLoads : 1];
};

template <bool kDivide, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_key_chunk(
    KeyChunk<acc_t, kDivide>& chunk, const scalar_t* key_base, int64_t pixel0, int64_t pixels,
    int64_t dim0, int64_t head_dim, int64_t channels, const acc_t* divisors) {
  const int64_t dim = dim0 + threadIdx.x % kTileDim;
#pragma unroll
  for (int k = 0; k < kKeyLoads; ++k) {
    const int64_t pixel = pixel0 + threadIdx.x / kTileDim + k * kKeyRowsPerPass;
    const bool inside = pixel < pixels && dim < head_dim;
    chunk.value[k] = inside ? static_cast<acc_t>(key_base[pixel * channels + dim]) : acc_t(0);
    if constexpr (kDivide) chunk.divisor[k] = inside ? divisors[pixel] : acc_t(1);
  }
}

// normalize_keys: the keys are divided as they are staged (what F.normalize does before the
// reference's product; one division per key element instead of one per score).
template <bool kDivide, typename acc_t>
__device__ __forceinline__ void store_key_chunk(
    acc_t (*tile)[kTilePixels + 4], const KeyChunk<acc_t, kDivide>& chunk) {
  const int d = threadIdx.x % kTileDim;
#pragma unroll
  for (int k = 0; k < kKeyLoads; ++k) {
    const int r = threadIdx.x / kTileDim + k * kKeyRowsPerPass;
    tile[d][r] = kDivide ? chunk.value[k] / chunk.divisor[k] : chunk.value[k];
  }
}

// kMicro consecutive acc_t of a shared-memory row, read as one 16-byte load (two for double):
// the tiles' rows and each thread's offsets are multiples of kMicro elements and the tiles are
// 32-byte aligned. Scalar loads made the product loop shared-memory bound (8 loads per 16 FMAs).
template <typename acc_t>
struct alignas(kMicro * sizeof(acc_t)) MicroVector {
  acc_t v[kMicro];
};

template <typename acc_t>
__device__ __forceinline__ MicroVector<acc_t> load_micro(const acc_t* row) {
  return *reinterpret_cast<const MicroVector<acc_t>*>(row);
}

// The mask as the tile kernel reads it: bool bytes (True = allowed) or the mask logits themselves
// (allowed where a logit is not < 0, the PEM code's rule: NaN allows), so that PEM-CA need not
// write a bool copy first. The kind is uniform over the launch: its branches never diverge.
enum class MaskKind : int32_t { kNone, kBool, kFloat, kHalf, kBFloat16 };
struct MaskRows {
  const void* data;  // [B, N, HW], contiguous
  MaskKind kind;
};

// kMicro consecutive mask elements of one row, read as one load (16 bytes of fp32 logits, 8 of
// fp16/bf16, 4 of bools) where every row starts aligned to that size (see mask_vector_loads).
template <typename element_t>
struct alignas(kMicro * sizeof(element_t)) MaskVector {
  element_t v[kMicro];
};

template <typename logit_t>
__device__ __forceinline__ uint32_t allowed_logit_bits(
    const logit_t* row, int64_t pixel_first, int64_t pixels, int shift, bool vector_loads) {
  uint32_t bits = 0;
  if (vector_loads) {  // pixels % kMicro == 0: the thread's kMicro pixels are all inside
    const MaskVector<logit_t> logits = *reinterpret_cast<const MaskVector<logit_t>*>(row + pixel_first);
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
      bits |= static_cast<uint32_t>(!(static_cast<float>(logits.v[i]) < 0.0f)) << (shift + i);
    return bits;
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
    if (pixel_first + i < pixels)
      bits |= static_cast<uint32_t>(!(static_cast<float>(row[pixel_first + i]) < 0.0f)) << (shift + i);
  return bits;
}

// Whether load_allowed_bits may read a thread's kMicro mask elements of a row as one vector: the
// rows are whole vectors (HW % kMicro == 0) and the data is aligned to one. A thread's first pixel
// is a multiple of kMicro, so its vector then never straddles a row's end. Scalar loads were
// 16 of the tile loop's load instructions per thread for mask logits, the tile's largest read.
__device__ __forceinline__ bool mask_vector_loads(const MaskRows& mask, int64_t pixels) {
  int64_t element_bytes = 0;
  switch (mask.kind) {
    case MaskKind::kBool: element_bytes = 1; break;
    case MaskKind::kFloat: element_bytes = 4; break;
    case MaskKind::kHalf:
    case MaskKind::kBFloat16: element_bytes = 2; break;
    default: return false;
  }
  return pixels % kMicro == 0 && reinterpret_cast<uintptr_t>(mask.data) % (kMicro * element_bytes) == 0;
}

// Bit (j * kMicro + i) of the result: whether the thread's pixel i may be selected by its query
// j (1 where there is no mask). Issued before the tile's products so that the mask's latency
// overlaps them. With vector_loads (mask_vector_loads) a query's kMicro elements are one load.
// A bool mask is read as bytes, any nonzero byte allowing (a bool tensor viewed from a 0/255
// uint8 mask holds 255).
__device__ __forceinline__ uint32_t load_allowed_bits(
    MaskRows mask, int64_t row0, int64_t queries, int64_t query_first, int64_t pixels,
    int64_t pixel_first, bool vector_loads) {
  static_assert(kMicro == 4, "one 32-bit mask word per query");
  if (mask.kind == MaskKind::kNone) return 0xffffu;
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    const int64_t query = query_first + j;
    if (query >= queries || pixel_first >= pixels) break;
    const int64_t row_start = (row0 + query) * pixels;
    switch (mask.kind) {
      case MaskKind::kFloat:
        bits |= allowed_logit_bits(static_cast<const float*>(mask.data) + row_start, pixel_first,
                                   pixels, j * kMicro, vector_loads);
        break;
      case MaskKind::kHalf:
        bits |= allowed_logit_bits(static_cast<const at::Half*>(mask.data) + row_start,
                                   pixel_first, pixels, j * kMicro, vector_loads);
        break;
      case MaskKind::kBFloat16:
        bits |= allowed_logit_bits(static_cast<const at::BFloat16*>(mask.data) + row_start,
                                   pixel_first, pixels, j * kMicro, vector_loads);
        break;
      default: {
        // Bytes, not bool: a bool tensor viewed from other bytes (a 0/255 uint8 mask) may hold
        // any nonzero value, which allows, as on the CPU kernel.
        const uint8_t* row = static_cast<const uint8_t*>(mask.data) + row_start;
        if (vector_loads) {
          const uint32_t word = *reinterpret_cast<const uint32_t*>(row + pixel_first);
#pragma unroll
          for (int i = 0; i < kMicro; ++i) bits |= static_cast<uint32_t>(((word >> (8 * i)) & 0xffu) != 0) << (j * kMicro + i);
        } else {
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
            if (pixel_first + i < pixels) bits |= static_cast<uint32_t>(row[pixel_first + i] != 0) << (j * kMicro + i);
        }
      }
    }
  }
  return bits;
}

// The tensor-core scores of one tile (kPasses = 1 or 3, acc_t = float): warp w holds pixels
// 16 * (w % 4) + [0, 16) x queries 32 * (w / 4) + [0, 32) as two accumulator fragments, and
// 3xTF32's cross terms in two more.
constexpr int kScoreWarpPixels = 16;
constexpr int kScoreWarpQueries = 32;
static_assert(kTileThreads / 32 == (kTilePixels / kScoreWarpPixels) *
                                       (kTileQueries / kScoreWarpQueries));

#ifdef PEM_TENSOR_CORES
struct ScoreFragments {
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  Accumulator acc[2], cross[2];
};

__device__ __forceinline__ void clear_scores(ScoreFragments& f) {
  for (int j = 0; j < 2; ++j) {
    wmma::fill_fragment(f.acc[j], 0.0f);
    wmma::fill_fragment(f.cross[j], 0.0f);
  }
}

// Adds the staged chunk's products: key_tile[d][pixel] is the column-major A (pixels x
// channels), query_tile[d][query] the row-major B (channels x queries).
template <int kPasses, int kLd>
__device__ __forceinline__ void multiply_chunk(
    ScoreFragments& f, const float (*key_tile)[kLd], const float (*query_tile)[kLd]) {
  const int warp = threadIdx.x / 32;
  const int pixel0 = (warp % 4) * kScoreWarpPixels, query0 = (warp / 4) * kScoreWarpQueries;
#pragma unroll
  for (int kk = 0; kk < kTileDim; kk += 8) {
    using FragmentA =
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
    using FragmentB =
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
    FragmentA a, a_small;
    wmma::load_matrix_sync(a, &key_tile[kk][pixel0], kLd);
    split_tf32<kPasses>(a, a_small);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      FragmentB b, b_small;
      wmma::load_matrix_sync(b, &query_tile[kk][query0 + 16 * j], kLd);
      split_tf32<kPasses>(b, b_small);
      if constexpr (kPasses == 3) {
        wmma::mma_sync(f.cross[j], a_small, b, f.cross[j]);
        wmma::mma_sync(f.cross[j], a, b_small, f.cross[j]);
      }
      wmma::mma_sync(f.acc[j], a, b, f.acc[j]);
    }
  }
}

// Writes the warp's scores to score_tile[pixel][query] (the cross terms without their NaNs).
template <int kPasses, int kLd>
__device__ __forceinline__ void store_scores(ScoreFragments& f, float (*score_tile)[kLd]) {
  const int warp = threadIdx.x / 32;
  const int pixel0 = (warp % 4) * kScoreWarpPixels, query0 = (warp / 4) * kScoreWarpQueries;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if constexpr (kPasses == 3) {
#pragma unroll
      for (int e = 0; e < ScoreFragments::Accumulator::num_elements; ++e) {
        const float cross = f.cross[j].x[e];
        f.acc[j].x[e] += std::isnan(cross) ? 0.0f : cross;
      }
    }
    wmma::store_matrix_sync(&score_tile[pixel0][query0 + 16 * j], f.acc[j], kLd,
                            wmma::mem_row_major);
  }
}
#endif  // PEM_TENSOR_CORES

// kPasses = 0: FMAs; 1 or 3: tensor cores (see the top of the file), fp32 accumulation only.
template <typename scalar_t, typename acc_t, bool kDivide, int kPasses>
__global__ void __launch_bounds__(kTileThreads) prototype_select_tile_kernel(
    Problem pr, int64_t tiles, const scalar_t* __restrict__ keys, const scalar_t* __restrict__ queries,
    MaskRows mask, const acc_t* __restrict__ divisors, AllowedFirstArgmax<acc_t>* partials) {
  const int64_t split = blockIdx.x, splits = gridDim.x;
  const int64_t query0 = blockIdx.y * static_cast<int64_t>(kTileQueries);
  const int64_t bh = blockIdx.z, b = bh / pr.heads, h = bh % pr.heads;
  const int pixel_lane = threadIdx.x % kPixelLanes, query_lane = threadIdx.x / kPixelLanes;
  // Transposed ([channel][pixel or query]) so the inner loop reads kMicro neighbours; the padding
  // keeps every row 16-byte aligned (for load_micro) and every WMMA fragment 32-byte aligned.
  constexpr int kLd = kTilePixels + 4;
  static_assert(kTileQueries + 4 == kLd && kLd * sizeof(float) * 8 % 32 == 0);
  static_assert(kPasses == 0 || std::is_same_v<acc_t, float>);
  __shared__ __align__(128) acc_t key_tile[kTileDim][kLd];
  __shared__ __align__(128) acc_t query_tile[kTileDim][kLd];
  // kPasses > 0: the tile's scores, from the warps' fragments to the threads' folds.
  __shared__ __align__(128) float score_tile[kPasses > 0 ? kTilePixels : 1][kLd];
#ifdef PEM_TENSOR_CORES
  ScoreFragments fragments;
#else
  if constexpr (kPasses > 0) __trap();  // never launched: see select_passes
#endif

  const scalar_t* key_base = keys + b * pr.pixels * pr.channels + h * pr.head_dim;
  const acc_t* image_divisors = divisors == nullptr ? nullptr : divisors + b * pr.pixels;
  const scalar_t* query_base = queries + b * pr.queries * pr.channels + h * pr.head_dim;
  const int64_t query_first = query0 + query_lane * kMicro;
  const bool vector_loads = mask_vector_loads(mask, pr.pixels);
  AllowedFirstArgmax<acc_t> best[kMicro];
  for (int j = 0; j < kMicro; ++j) best[j] = AllowedFirstArgmax<acc_t>{0, -1, 0};

  const int64_t tile_begin = split * tiles / splits, tile_end = (split + 1) * tiles / splits;
  const int64_t chunks = (pr.head_dim + kTileDim - 1) / kTileDim;
  // PEM's head_dim (32) is one chunk: the block's queries are staged once, not once per tile.
  const bool queries_resident = chunks == 1;
  if (queries_resident) {
    stage_transposed<kTileQueries>(
        query_tile, query_base, query0, pr.queries, 0, pr.head_dim, pr.channels);
  }
  KeyChunk<acc_t, kDivide> next;
  if (tile_begin < tile_end) {
    load_key_chunk<kDivide>(next, key_base, tile_begin * kTilePixels, pr.pixels, 0, pr.head_dim,
                            pr.channels, image_divisors);
  }
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t pixel0 = tile * kTilePixels, pixel_first = pixel0 + pixel_lane * kMicro;
    const uint32_t allowed_bits = load_allowed_bits(
        mask, b * pr.queries, pr.queries, query_first, pr.pixels, pixel_first, vector_loads);
    acc_t scores[kMicro][kMicro] = {};
#ifdef PEM_TENSOR_CORES
    if constexpr (kPasses > 0) clear_scores(fragments);
#endif
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      store_key_chunk<kDivide>(key_tile, next);
      if (!queries_resident) {
        stage_transposed<kTileQueries>(
            query_tile, query_base, query0, pr.queries, chunk * kTileDim, pr.head_dim, pr.channels);
      }
      __syncthreads();
      // The next chunk's loads, in flight during this chunk's products (block-uniform condition).
      const bool last_chunk = chunk + 1 == chunks;
      if (!last_chunk || tile + 1 < tile_end) {
        load_key_chunk<kDivide>(next, key_base, last_chunk ? pixel0 + kTilePixels : pixel0,
                                pr.pixels, last_chunk ? 0 : (chunk + 1) * kTileDim, pr.head_dim,
                                pr.channels, image_divisors);
      }
      if constexpr (kPasses > 0) {
#ifdef PEM_TENSOR_CORES
        multiply_chunk<kPasses, kLd>(fragments, key_tile, query_tile);
#endif
      } else {
#pragma unroll
        for (int d = 0; d < kTileDim; ++d) {
          const MicroVector<acc_t> key_values = load_micro(&key_tile[d][pixel_lane * kMicro]);
          const MicroVector<acc_t> query_values = load_micro(&query_tile[d][query_lane * kMicro]);
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) scores[i][j] += key_values.v[i] * query_values.v[j];
        }
      }
      __syncthreads();
    }
    if constexpr (kPasses > 0) {
#ifdef PEM_TENSOR_CORES
      // The next tile writes score_tile only after its chunk loop's barriers.
      store_scores<kPasses, kLd>(fragments, score_tile);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j)
          scores[i][j] = score_tile[pixel_lane * kMicro + i][query_lane * kMicro + j];
#endif
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t pixel = pixel_first + i;
      if (pixel >= pr.pixels) break;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        if (query_first + j >= pr.queries) break;
        const bool allowed = (allowed_bits >> (j * kMicro + i)) & 1u;
        allowed_first_visit(best[j], scores[i][j], static_cast<int32_t>(pixel), allowed);
      }
    }
  }
  // Every thread reaches the shuffles: the loops above have block-uniform trip counts.
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    best[j] = merge_pixel_lanes(best[j]);
    const int64_t query = query_first + j;
    if (pixel_lane == 0 && query < pr.queries)
      partials[(split * pr.batch * pr.heads + bh) * pr.queries + query] = best[j];
  }
}

// Grid (N, B): block (n, b) merges the partials of query n of image b in every head, writes its
// indices, then copies (and normalizes) the selected key rows into its prototype row. One launch
// for both: at PEM's size the selection's kernels take tens of microseconds, so a launch (and the
// host's work for it) is a visible part of a call.
//   * Merge: kMergeSlots heads at a time, kPixelLanes lanes per head; the lanes merge every
//     kPixelLanes-th split and then each other (warp shuffles), so the splits' loads run in
//     parallel (one thread per (head, query) took 38 us for PEM's 800 and 33 splits on an H100).
//     allowed_first_merge is associative and commutative: the result does not depend on timing.
//   * The empty-mask rule needs to know whether any query of the image has an allowed pixel:
//     every block finds out (a query has one iff some split saw one; head 0's partials tell),
//     stopping at the first it sees.
//   * Gather: threads over the channels read the indices the merge wrote (global writes are
//     visible to the block after __syncthreads).
constexpr int kMergeSlots = kMergeThreads / kPixelLanes;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads) merge_and_gather_kernel(
    Problem pr, int64_t splits, const AllowedFirstArgmax<acc_t>* __restrict__ partials,
    bool official_empty, const scalar_t* __restrict__ keys, const acc_t* __restrict__ divisors,
    int64_t* indices, scalar_t* prototypes) {
  const int64_t n = blockIdx.x, b = blockIdx.y;
  const int64_t slots = pr.heads * pr.queries, stride = pr.batch * slots;
  const AllowedFirstArgmax<acc_t>* image = partials + b * slots;  // slot h * N + n
  int has_allowed = 0;
  for (int64_t e = threadIdx.x; e < pr.queries * splits && !has_allowed; e += blockDim.x)
    has_allowed = image[(e % splits) * stride + e / splits].allowed;
  const bool image_all_empty = __syncthreads_or(has_allowed) == 0;
  for (int64_t h0 = 0; h0 < pr.heads; h0 += kMergeSlots) {
    // Every lane of a slot reaches the shuffles: heads past the end merge nothing.
    const int64_t h = h0 + threadIdx.x / kPixelLanes;
    const int64_t slot = h * pr.queries + n;
    AllowedFirstArgmax<acc_t> best{0, -1, 0};
    if (h < pr.heads) {
      for (int64_t s = threadIdx.x % kPixelLanes; s < splits; s += kPixelLanes)
        best = allowed_first_merge(best, image[s * stride + slot]);
    }
    best = merge_pixel_lanes(best);
    if (h < pr.heads && threadIdx.x % kPixelLanes == 0) {
      // Not allowed: the query is empty, and `best` is its argmax over every pixel.
      int64_t index = best.index;
      if (!best.allowed &&
          empty_query_choice(official_empty, image_all_empty) == EmptyQueryChoice::kPixelZero) {
        index = 0;
      }
      indices[b * slots + slot] = index;
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const int64_t h = c / pr.head_dim;
    const int64_t row = b * pr.pixels + indices[(b * pr.heads + h) * pr.queries + n];
    acc_t value = static_cast<acc_t>(keys[row * pr.channels + c]);
    if (divisors != nullptr) value /= divisors[row];
    prototypes[(b * pr.queries + n) * pr.channels + c] = static_cast<scalar_t>(value);
  }
}

// The tile kernel's products for fp32-accumulated scores: 0 (FMAs), 1 (TF32) or 3 (3xTF32).
int select_passes(at::ScalarType dtype, bool normalize_keys) {
  // (every instantiation of the tile kernel comes from the same code, built for the same targets)
  if (!tensor_core_code(prototype_select_tile_kernel<float, float, false, 3>)) return 0;
  const Fp32Products products = fp32_products();
  if (products == Fp32Products::kIeee) return 0;
  if (products == Fp32Products::kTf32) return 1;
  // fp16 and bf16 values are TF32 values: one product is exact, unless divided by their norms.
  return dtype != at::kFloat && !normalize_keys ? 1 : 3;
}

template <typename scalar_t, typename acc_t>
void launch_tile_kernel(
    int passes, bool normalize_keys, dim3 grid, cudaStream_t stream, const Problem& pr,
    int64_t tiles, const scalar_t* keys, const scalar_t* queries, MaskRows mask,
    const acc_t* divisors, AllowedFirstArgmax<acc_t>* partials) {
  const auto launch = [&](auto divide, auto kernel_passes) {
    prototype_select_tile_kernel<scalar_t, acc_t, decltype(divide)::value,
                                 decltype(kernel_passes)::value>
        <<<grid, kTileThreads, 0, stream>>>(pr, tiles, keys, queries, mask, divisors, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto launch_with = [&](auto kernel_passes) {
    normalize_keys ? launch(std::true_type{}, kernel_passes)
                   : launch(std::false_type{}, kernel_passes);
  };
  if constexpr (std::is_same_v<acc_t, float>) {
    if (passes == 1) return launch_with(std::integral_constant<int, 1>{});
    if (passes == 3) return launch_with(std::integral_constant<int, 3>{});
  }
  launch_with(std::integral_constant<int, 0>{});
}

MaskKind mask_kind(const at::Tensor& mask) {
  if (!mask.defined()) return MaskKind::kNone;
  switch (mask.scalar_type()) {
    case at::kFloat: return MaskKind::kFloat;
    case at::kHalf: return MaskKind::kHalf;
    case at::kBFloat16: return MaskKind::kBFloat16;
    default: return MaskKind::kBool;  // the argument checks let nothing else through
  }
}

std::tuple<at::Tensor, at::Tensor> prototype_select_cuda(
    const at::Tensor& keys_in, const at::Tensor& queries_in, const std::optional<at::Tensor>& mask_in,
    int64_t num_heads, bool official_empty, bool normalize_keys) {
  check_prototype_select_inputs(
      keys_in, queries_in, mask_in, num_heads, {at::kFloat, at::kHalf, at::kBFloat16});
  const c10::cuda::CUDAGuard device_guard(keys_in.device());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const Problem pr{keys.size(0), keys.size(1), keys.size(2), queries.size(1), num_heads,
                   keys.size(2) / num_heads};
  const int64_t query_blocks = (pr.queries + kTileQueries - 1) / kTileQueries;
  PEM_CHECK(
      pr.batch * pr.heads <= 65535 && query_blocks <= 65535,
      "prototype_select (cuda): B * num_heads must be <= 65535 and N <= ", 65535 * kTileQueries,
      ", got B = ", pr.batch, ", num_heads = ", pr.heads, ", N = ", pr.queries);
  at::Tensor prototypes = at::empty({pr.batch, pr.queries, pr.channels}, keys.options());
  at::Tensor indices = at::empty({pr.batch, pr.heads, pr.queries}, keys.options().dtype(at::kLong));
  if (indices.numel() == 0) return {prototypes, indices};
  PEM_CHECK(
      pr.pixels <= std::numeric_limits<int32_t>::max(),
      "prototype_select (cuda): HW must be < 2^31 (pixel indices are int32), got ", pr.pixels);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Enough pixel splits for kBlocksPerSM blocks per SM, never more than there are tiles.
  const int64_t tiles = (pr.pixels + kTilePixels - 1) / kTilePixels;
  const int64_t blocks_wanted = kBlocksPerSM * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t other_blocks = pr.batch * pr.heads * query_blocks;
  const int64_t splits = std::clamp<int64_t>((blocks_wanted + other_blocks - 1) / other_blocks, 1, std::min<int64_t>(tiles, 65535));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, keys.scalar_type(), "prototype_select_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor divisors;
        if (normalize_keys) {
          divisors = at::empty({pr.batch * pr.pixels}, keys.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
          const dim3 block(32, 8);
          const int64_t rows = pr.batch * pr.pixels;
          key_norm_divisors_kernel<scalar_t, acc_t><<<(rows + 7) / 8, block, 0, stream>>>(
              keys.data_ptr<scalar_t>(), divisors.data_ptr<acc_t>(), rows, pr.channels);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const acc_t* divisor_ptr = normalize_keys ? divisors.data_ptr<acc_t>() : nullptr;
        // Every (split, image, head, query) partial is written by the tile kernel.
        at::Tensor partials = at::empty(
            {splits * static_cast<int64_t>(indices.numel() * sizeof(AllowedFirstArgmax<acc_t>))},
            keys.options().dtype(at::kByte));
        auto* partial_ptr =
            reinterpret_cast<AllowedFirstArgmax<acc_t>*>(partials.data_ptr<uint8_t>());
        const dim3 tile_grid(splits, query_blocks, pr.batch * pr.heads);
        const MaskRows mask_rows{mask.defined() ? mask.data_ptr() : nullptr, mask_kind(mask)};
        // Heads without channels score 0 everywhere: the FMA kernel, whose empty chunk loop
        // touches no shared memory (the tensor-core one would write and read its score tile with
        // no barrier between tiles: a race, if only of zeros).
        const bool tensor_cores = std::is_same_v<acc_t, float> && pr.head_dim > 0;
        launch_tile_kernel<scalar_t, acc_t>(
            tensor_cores ? select_passes(keys.scalar_type(), normalize_keys) : 0,
            normalize_keys, tile_grid, stream, pr, tiles, keys.data_ptr<scalar_t>(),
            queries.data_ptr<scalar_t>(), mask_rows, divisor_ptr, partial_ptr);
        merge_and_gather_kernel<scalar_t, acc_t>
            <<<dim3(pr.queries, pr.batch), kMergeThreads, 0, stream>>>(
                pr, splits, partial_ptr, official_empty, keys.data_ptr<scalar_t>(), divisor_ptr,
                indices.data_ptr<int64_t>(), prototypes.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {prototypes, indices};
}

// The backward's blocks ask which (head, query) slots selected their pixel: an earlier slot's
// block owns the pixel, and the gradient sums over the slots that chose it. The block's threads
// compare the slots' indices at once, into shared-memory flags (up to kFlaggedSlots slots; beyond,
// each question reads the index again). Every thread scanning the indices itself, one dependent
// load after another (up to heads * N = 800 for PEM), was most of the normalized scatter's 0.12
// ms on an H100.
constexpr int64_t kFlaggedSlots = 4096;

// Flags slots [0, count) of `slot_indices` that hold `pixel` (where count <= kFlaggedSlots) and
// returns, to every thread of the block, whether one of the slots before `slot` does. Contains a
// barrier: call from every thread.
__device__ bool flag_selecting_slots(
    const int64_t* slot_indices, int64_t count, int64_t pixel, int64_t slot, bool* flags) {
  int earlier = 0;
  for (int64_t s = threadIdx.x; s < count; s += blockDim.x) {
    const bool selects = slot_indices[s] == pixel;
    if (count <= kFlaggedSlots) flags[s] = selects;
    earlier |= selects && s < slot;
  }
  return __syncthreads_or(earlier) != 0;  // also makes the flags visible to the block
}

// Grid (heads * N, B), threads over the head's channels. Each distinct selected pixel of a head is
// written once, by the block of the first query (in order) that selected it, with the fp32 sum
// over all queries that did (in query order): deterministic and free of atomics.
template <typename scalar_t, typename acc_t>
__global__ void prototype_select_scatter_kernel(
    Problem pr, const scalar_t* __restrict__ grad, const int64_t* __restrict__ indices,
    scalar_t* grad_keys) {
  __shared__ bool selected[kFlaggedSlots];  // query n' of this head selected the pixel
  const int64_t slot = blockIdx.x, b = blockIdx.y;
  const int64_t h = slot / pr.queries, n = slot % pr.queries;
  const int64_t* head_indices = indices + (b * pr.heads + h) * pr.queries;
  const int64_t pixel = head_indices[n];
  // A bad index would be a write out of bounds: stop with a device-side assert, as ATen's index ops
  // do (checking on the host would synchronize every backward).
  CUDA_KERNEL_ASSERT(pixel >= 0 && pixel < pr.pixels);
  if (flag_selecting_slots(head_indices, pr.queries, pixel, n, selected)) return;
  const bool flagged = pr.queries <= kFlaggedSlots;
  for (int64_t d = threadIdx.x; d < pr.head_dim; d += blockDim.x) {
    const int64_t c = h * pr.head_dim + d;
    acc_t sum = 0;
    for (int64_t later = n; later < pr.queries; ++later)
      if (flagged ? selected[later] : head_indices[later] == pixel)
        sum += static_cast<acc_t>(grad[(b * pr.queries + later) * pr.channels + c]);
    grad_keys[(b * pr.pixels + pixel) * pr.channels + c] = static_cast<scalar_t>(sum);
  }
}

// Grid (heads * N, B), threads over channels; with normalize_keys this replaces the scatter. The
// block of the first (head, query) slot that selected a pixel owns the pixel's whole row: per
// channel it sums, in fp32, the grads of the queries whose head selected the pixel, pulls the sum
// back through k / max(||k||, eps) and writes the row once (half-precision grads are rounded once).
template <typename scalar_t, typename acc_t>
__global__ void normalized_scatter_kernel(
    Problem pr, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ keys,
    const int64_t* __restrict__ indices, scalar_t* grad_keys) {
  __shared__ bool selected[kFlaggedSlots];  // slot h * N + n of this image selected the pixel
  const int64_t slot = blockIdx.x, b = blockIdx.y;
  const int64_t slots = pr.heads * pr.queries;
  const int64_t* image_indices = indices + b * slots;
  const int64_t pixel = image_indices[slot];
  CUDA_KERNEL_ASSERT(pixel >= 0 && pixel < pr.pixels);
  if (flag_selecting_slots(image_indices, slots, pixel, slot, selected)) return;
  const bool flagged = slots <= kFlaggedSlots;
  // The summed gradient of channel c: every query n whose head (c's head) selected this pixel.
  const auto summed_grad = [&](int64_t c) {
    const int64_t head_slots = (c / pr.head_dim) * pr.queries;
    acc_t sum = 0;
    for (int64_t n = 0; n < pr.queries; ++n)
      if (flagged ? selected[head_slots + n] : image_indices[head_slots + n] == pixel)
        sum += static_cast<acc_t>(grad[(b * pr.queries + n) * pr.channels + c]);
    return sum;
  };
  __shared__ acc_t partial[2][kGatherThreads];
  acc_t sum_sq = 0, key_dot_grad = 0;
  const scalar_t* key = keys + (b * pr.pixels + pixel) * pr.channels;
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const acc_t k = static_cast<acc_t>(key[c]);
    sum_sq += k * k;
    key_dot_grad += k * summed_grad(c);
  }
  partial[0][threadIdx.x] = sum_sq;
  partial[1][threadIdx.x] = key_dot_grad;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[0][threadIdx.x] += partial[0][threadIdx.x + stride];
      partial[1][threadIdx.x] += partial[1][threadIdx.x + stride];
    }
    __syncthreads();
  }
  const acc_t norm = sqrt(partial[0][0]);
  const acc_t projection = partial[1][0] / (norm * norm);
  scalar_t* out_row = grad_keys + (b * pr.pixels + pixel) * pr.channels;
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const acc_t grad_c = summed_grad(c);
    const acc_t out = key_norm_is_clamped(norm)
        ? grad_c / static_cast<acc_t>(kKeyNormEps)
        : (grad_c - static_cast<acc_t>(key[c]) * projection) / norm;
    out_row[c] = static_cast<scalar_t>(out);
  }
}

at::Tensor prototype_select_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& keys_in, const at::Tensor& indices_in,
    bool normalize_keys) {
  check_prototype_select_backward_inputs(grad_in, keys_in, indices_in);
  const c10::cuda::CUDAGuard device_guard(keys_in.device());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor grad = grad_in.to(keys.scalar_type()).contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t heads = indices.size(1);
  const Problem pr{keys.size(0), keys.size(1), keys.size(2), indices.size(2), heads,
                   keys.size(2) / heads};
  PEM_CHECK(
      pr.batch <= 65535, "_prototype_select_backward (cuda): B must be <= 65535, got ", pr.batch);
  at::Tensor grad_keys = at::zeros_like(keys);
  if (grad.numel() == 0) return grad_keys;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, keys.scalar_type(), "prototype_select_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const dim3 grid(pr.heads * pr.queries, pr.batch);
        if (normalize_keys) {
          normalized_scatter_kernel<scalar_t, acc_t><<<grid, kGatherThreads, 0, stream>>>(
              pr, grad.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
              grad_keys.data_ptr<scalar_t>());
        } else {
          const int threads = static_cast<int>(std::min<int64_t>(256, ((pr.head_dim + 31) / 32) * 32));
          prototype_select_scatter_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
              pr, grad.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), grad_keys.data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("prototype_select", &prototype_select_cuda);
  m.impl("_prototype_select_backward", &prototype_select_backward_cuda);
}

}  // namespace pem_kernels

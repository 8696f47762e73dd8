// prototype_select on CUDA: the same semantics as csrc/cpu/prototype_select.cpp.
//
// A straightforward first version: one thread block per (query, head, image) streams over all
// pixels with a per-thread running argmax (masked and unmasked) and reduces them with the shared
// argmax_merge rule; a second kernel applies the empty-mask rule and gathers the prototypes. The
// similarity tensor is never materialized. The tiled tensor-core kernel is future work.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pem_kernels/prototype_select_checks.h"
#include "pem_kernels/prototype_select_common.h"

namespace pem_kernels {
namespace {

constexpr int kScanThreads = 256;
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
  if (threadIdx.x == 0) divisors[row] = max(sqrt(sum_sq), static_cast<acc_t>(kKeyNormEps));
}

template <typename acc_t>
__device__ ArgmaxState<acc_t> block_argmax(ArgmaxState<acc_t> state, ArgmaxState<acc_t>* shared) {
  shared[threadIdx.x] = state;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] = argmax_merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const ArgmaxState<acc_t> result = shared[0];
  __syncthreads();
  return result;
}

// Grid (N, heads, B). Writes, per (b, h, n): the argmax over allowed pixels (-1 if none), the
// argmax over all pixels, and per (b, n) whether the query has any allowed pixel.
template <typename scalar_t, typename acc_t>
__global__ void prototype_select_scan_kernel(
    Problem pr, const scalar_t* __restrict__ keys, const scalar_t* __restrict__ queries,
    const bool* __restrict__ mask, const acc_t* __restrict__ divisors, int64_t* masked_index,
    int64_t* unmasked_index, bool* query_has_allowed) {
  const int64_t n = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* query = reinterpret_cast<acc_t*>(shared_bytes);
  ArgmaxState<acc_t>* reduce = reinterpret_cast<ArgmaxState<acc_t>*>(query + pr.head_dim);
  __shared__ int any_allowed;
  if (threadIdx.x == 0) any_allowed = 0;
  for (int64_t d = threadIdx.x; d < pr.head_dim; d += blockDim.x)
    query[d] = static_cast<acc_t>(queries[(b * pr.queries + n) * pr.channels + h * pr.head_dim + d]);
  __syncthreads();

  ArgmaxState<acc_t> masked{0, -1}, unmasked{0, -1};
  bool saw_allowed = false;
  const bool* mask_row = mask == nullptr ? nullptr : mask + (b * pr.queries + n) * pr.pixels;
  for (int64_t p = threadIdx.x; p < pr.pixels; p += blockDim.x) {
    const scalar_t* key = keys + (b * pr.pixels + p) * pr.channels + h * pr.head_dim;
    acc_t score = 0;
    for (int64_t d = 0; d < pr.head_dim; ++d) score += static_cast<acc_t>(key[d]) * query[d];
    if (divisors != nullptr) score /= divisors[b * pr.pixels + p];
    argmax_visit(unmasked, score, p);
    if (mask_row == nullptr || mask_row[p]) {
      saw_allowed = true;
      argmax_visit(masked, score, p);
    }
  }
  if (saw_allowed) atomicOr(&any_allowed, 1);  // a flag, so the result is order-independent
  masked = block_argmax(masked, reduce);
  unmasked = block_argmax(unmasked, reduce);
  if (threadIdx.x == 0) {
    const int64_t at = (b * pr.heads + h) * pr.queries + n;
    masked_index[at] = masked.index;
    unmasked_index[at] = unmasked.index;
    if (h == 0) query_has_allowed[b * pr.queries + n] = any_allowed != 0;
  }
}

// Grid (N, B), threads over channels: applies the empty-mask rule and gathers the prototype.
template <typename scalar_t, typename acc_t>
__global__ void prototype_select_gather_kernel(
    Problem pr, const scalar_t* __restrict__ keys, const acc_t* __restrict__ divisors,
    const int64_t* masked_index, const int64_t* unmasked_index, const bool* query_has_allowed,
    bool official_empty, scalar_t* prototypes, int64_t* indices) {
  const int64_t n = blockIdx.x, b = blockIdx.y;
  __shared__ int image_all_empty;
  if (threadIdx.x == 0) {
    int all_empty = 1;
    for (int64_t q = 0; q < pr.queries && all_empty; ++q) all_empty = !query_has_allowed[b * pr.queries + q];
    image_all_empty = all_empty;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const int64_t h = c / pr.head_dim;
    const int64_t at = (b * pr.heads + h) * pr.queries + n;
    int64_t index = masked_index[at];
    if (index < 0) {
      index = empty_query_choice(official_empty, image_all_empty != 0) == EmptyQueryChoice::kPixelZero
          ? 0
          : unmasked_index[at];
    }
    if (c % pr.head_dim == 0) indices[at] = index;
    const int64_t row = b * pr.pixels + index;
    acc_t value = static_cast<acc_t>(keys[row * pr.channels + c]);
    if (divisors != nullptr) value /= divisors[row];
    prototypes[(b * pr.queries + n) * pr.channels + c] = static_cast<scalar_t>(value);
  }
}

std::tuple<at::Tensor, at::Tensor> prototype_select_cuda(
    const at::Tensor& keys_in, const at::Tensor& queries_in, const std::optional<at::Tensor>& mask_in,
    int64_t num_heads, bool official_empty, bool normalize_keys) {
  check_prototype_select_inputs(keys_in, queries_in, mask_in, num_heads);
  const c10::cuda::CUDAGuard device_guard(keys_in.device());
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const Problem pr{keys.size(0), keys.size(1), keys.size(2), queries.size(1), num_heads,
                   keys.size(2) / num_heads};
  TORCH_CHECK(
      pr.queries <= 65535 && pr.heads <= 65535 && pr.batch <= 65535,
      "prototype_select (cuda): B, num_heads and N must each be <= 65535, got ", pr.batch, ", ",
      pr.heads, ", ", pr.queries);
  at::Tensor prototypes = at::empty({pr.batch, pr.queries, pr.channels}, keys.options());
  at::Tensor indices = at::empty({pr.batch, pr.heads, pr.queries}, keys.options().dtype(at::kLong));
  if (prototypes.numel() == 0) return {prototypes, indices};
  at::Tensor masked_index = at::empty_like(indices);
  at::Tensor unmasked_index = at::empty_like(indices);
  at::Tensor query_has_allowed = at::empty({pr.batch, pr.queries}, keys.options().dtype(at::kBool));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

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
        const size_t shared = pr.head_dim * sizeof(acc_t) + kScanThreads * sizeof(ArgmaxState<acc_t>);
        const dim3 scan_grid(pr.queries, pr.heads, pr.batch);
        prototype_select_scan_kernel<scalar_t, acc_t><<<scan_grid, kScanThreads, shared, stream>>>(
            pr, keys.data_ptr<scalar_t>(), queries.data_ptr<scalar_t>(),
            mask.defined() ? mask.data_ptr<bool>() : nullptr, divisor_ptr,
            masked_index.data_ptr<int64_t>(), unmasked_index.data_ptr<int64_t>(),
            query_has_allowed.data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 gather_grid(pr.queries, pr.batch);
        prototype_select_gather_kernel<scalar_t, acc_t><<<gather_grid, kGatherThreads, 0, stream>>>(
            pr, keys.data_ptr<scalar_t>(), divisor_ptr, masked_index.data_ptr<int64_t>(),
            unmasked_index.data_ptr<int64_t>(), query_has_allowed.data_ptr<bool>(), official_empty,
            prototypes.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {prototypes, indices};
}

// Grid (heads, B), threads over the head's channels. Each distinct selected pixel is written once,
// by the first query (in order) that selected it, with the fp32 sum over all queries that did:
// deterministic and free of atomics.
template <typename scalar_t, typename acc_t>
__global__ void prototype_select_scatter_kernel(
    Problem pr, const scalar_t* __restrict__ grad, const int64_t* __restrict__ indices,
    scalar_t* grad_keys) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const int64_t* head_indices = indices + (b * pr.heads + h) * pr.queries;
  for (int64_t n = 0; n < pr.queries; ++n) {
    const int64_t pixel = head_indices[n];
    bool seen_before = false;
    for (int64_t earlier = 0; earlier < n && !seen_before; ++earlier) seen_before = head_indices[earlier] == pixel;
    if (seen_before) continue;
    for (int64_t d = threadIdx.x; d < pr.head_dim; d += blockDim.x) {
      const int64_t c = h * pr.head_dim + d;
      acc_t sum = 0;
      for (int64_t later = n; later < pr.queries; ++later)
        if (head_indices[later] == pixel) sum += static_cast<acc_t>(grad[(b * pr.queries + later) * pr.channels + c]);
      grad_keys[(b * pr.pixels + pixel) * pr.channels + c] = static_cast<scalar_t>(sum);
    }
  }
}

// Grid (heads * N, B), threads over channels: pulls the accumulated gradient of each distinct
// selected pixel back through k / max(||k||, eps), in place.
template <typename scalar_t, typename acc_t>
__global__ void normalize_backward_kernel(
    Problem pr, const scalar_t* __restrict__ keys, const int64_t* __restrict__ indices, scalar_t* grad_keys) {
  const int64_t slot = blockIdx.x, b = blockIdx.y;
  const int64_t* image_indices = indices + b * pr.heads * pr.queries;
  const int64_t pixel = image_indices[slot];
  for (int64_t earlier = 0; earlier < slot; ++earlier)
    if (image_indices[earlier] == pixel) return;  // block-uniform: another block owns this pixel
  __shared__ acc_t partial[2][kGatherThreads];
  acc_t sum_sq = 0, key_dot_grad = 0;
  const scalar_t* key = keys + (b * pr.pixels + pixel) * pr.channels;
  scalar_t* g = grad_keys + (b * pr.pixels + pixel) * pr.channels;
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const acc_t k = static_cast<acc_t>(key[c]);
    sum_sq += k * k;
    key_dot_grad += k * static_cast<acc_t>(g[c]);
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
  for (int64_t c = threadIdx.x; c < pr.channels; c += blockDim.x) {
    const acc_t grad_c = static_cast<acc_t>(g[c]);
    const acc_t out = norm > static_cast<acc_t>(kKeyNormEps)
        ? (grad_c - static_cast<acc_t>(key[c]) * projection) / norm
        : grad_c / static_cast<acc_t>(kKeyNormEps);
    g[c] = static_cast<scalar_t>(out);
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
  at::Tensor grad_keys = at::zeros_like(keys);
  if (grad.numel() == 0) return grad_keys;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, keys.scalar_type(), "prototype_select_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int threads = static_cast<int>(std::min<int64_t>(256, ((pr.head_dim + 31) / 32) * 32));
        prototype_select_scatter_kernel<scalar_t, acc_t><<<dim3(pr.heads, pr.batch), threads, 0, stream>>>(
            pr, grad.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), grad_keys.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (normalize_keys) {
          normalize_backward_kernel<scalar_t, acc_t>
              <<<dim3(pr.heads * pr.queries, pr.batch), kGatherThreads, 0, stream>>>(
                  pr, keys.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), grad_keys.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return grad_keys;
}

}  // namespace

TORCH_LIBRARY_IMPL(pem_kernels, CUDA, m) {
  m.impl("prototype_select", &prototype_select_cuda);
  m.impl("_prototype_select_backward", &prototype_select_backward_cuda);
}

}  // namespace pem_kernels

// Runs the extension's CUDA sources on the CPU, for tests on machines without a GPU.
//
// tests/cuda_emulation.py compiles csrc/cuda/*.cu as plain C++ after including this header in
// place of the CUDA headers and rewriting each `kernel<<<grid, block, smem, stream>>>(args)` into
// `pem_emulation::launch(kernel, grid, block, smem, stream)(args)`. Every thread of a block is a
// std::thread, so __syncthreads is a real barrier and the threads of a block run concurrently
// (races can show); the blocks of a grid run one after another on the same threads, which is
// one legal schedule of a CUDA grid, and `__shared__` variables become function statics shared
// by the threads of the block being run. Warp shuffles exchange values through per-warp slots
// between two warp barriers, atomics are std::atomic_ref, and launches check the limits CUDA
// would reject (empty grids, more than 1024 threads, grid.y or grid.z over 65535).
//
// What it cannot show: timing, memory coalescing, bank conflicts, register or shared-memory
// limits, and warp-synchronous code without a __syncwarp (threads here have no lockstep). It
// tests the kernels' indexing, bounds, barriers and arithmetic against the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
// A failed device-side assert stops the launch; here it raises from the launch instead.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  TORCH_CHECK((cond), "CUDA emulation: device-side assert failed: " #cond)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
struct cudaDeviceProp {
  int multiProcessorCount;
};

namespace pem_emulation {

constexpr int kWarpSize = 32;

// The synchronization state of the block being run.
struct BlockContext {
  explicit BlockContext(int threads_)
      : threads(threads_), warps((threads_ + kWarpSize - 1) / kWarpSize), slots(threads_) {
    reset();
  }
  // New barriers for the next block: threads that returned early from a block drop out of its
  // barriers (CUDA counts exited threads as arrived) and must count again in the next one.
  void reset() {
    sync.emplace(threads);
    for (int first = 0, w = 0; first < threads; first += kWarpSize, ++w) {
      warps[w] = std::make_unique<std::barrier<>>(std::min(kWarpSize, threads - first));
    }
    or_flag.store(0);
  }
  int threads;
  std::optional<std::barrier<>> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::atomic<int> or_flag{0};
};

inline thread_local dim3 thread_index, block_index;
inline thread_local int linear_thread = 0;
inline thread_local BlockContext* block_context = nullptr;
inline dim3 block_dim, grid_dim;  // of the launch being run (one launch at a time)

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(int64_t n) {
  TORCH_CHECK(n >= 1 && n < (int64_t{1} << 31), "CUDA emulation: invalid launch size ", n);
  return dim3(static_cast<unsigned>(n));
}

inline void check_launch(dim3 grid, dim3 block) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "CUDA emulation: empty grid (", grid.x,
              ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "CUDA emulation: grid (", grid.x, ", ", grid.y,
              ", ", grid.z, ") exceeds 65535 in y or z");
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64,
              "CUDA emulation: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
}

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block) : kernel_(kernel), grid_(grid),
                                                             block_(block) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    check_launch(grid_, block_);
    // As on a GPU, the kernel gets copies of its arguments, converted to the parameter types.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const int threads = static_cast<int>(block_.x * block_.y * block_.z);
    block_dim = block_;
    grid_dim = grid_;
    BlockContext context(threads);
    std::barrier<> block_end(threads);
    std::exception_ptr error;
    std::mutex error_mutex;
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        linear_thread = t;
        thread_index = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
        block_context = &context;
        for (unsigned z = 0; z < grid_.z; ++z) {
          for (unsigned y = 0; y < grid_.y; ++y) {
            for (unsigned x = 0; x < grid_.x; ++x) {
              block_index = dim3(x, y, z);
              try {
                std::apply(kernel_, params);
              } catch (...) {
                const std::lock_guard<std::mutex> lock(error_mutex);
                if (!error) error = std::current_exception();
              }
              // Done with this block: stop counting in its barriers, wait for the others, and
              // let thread 0 set up the barriers of the next block.
              context.sync->arrive_and_drop();
              context.warps[t / kWarpSize]->arrive_and_drop();
              block_end.arrive_and_wait();
              if (t == 0) context.reset();
              block_end.arrive_and_wait();
            }
          }
        }
      });
    }
    for (std::thread& worker : workers) worker.join();
    if (error) std::rethrow_exception(error);
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
};

template <typename... Params, typename Grid, typename Block>
Launch<Params...> launch(void (*kernel)(Params...), Grid grid, Block block, size_t shared_bytes,
                         cudaStream_t) {
  TORCH_CHECK(shared_bytes == 0, "CUDA emulation: dynamic shared memory is not emulated");
  return Launch<Params...>(kernel, as_dim3(grid), as_dim3(block));
}

}  // namespace pem_emulation

#define threadIdx ::pem_emulation::thread_index
#define blockIdx ::pem_emulation::block_index
#define blockDim ::pem_emulation::block_dim
#define gridDim ::pem_emulation::grid_dim

inline void __syncthreads() { ::pem_emulation::block_context->sync->arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  auto& context = *::pem_emulation::block_context;
  if (predicate) context.or_flag.store(1);
  context.sync->arrive_and_wait();
  const int any = context.or_flag.load();
  context.sync->arrive_and_wait();  // everyone has read the flag before it is cleared
  if (::pem_emulation::linear_thread == 0) context.or_flag.store(0);
  context.sync->arrive_and_wait();
  return any;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = ::pem_emulation::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  TORCH_CHECK(mask == 0xffffffffu && width == ::pem_emulation::kWarpSize,
              "CUDA emulation: only full-warp shuffles are emulated");
  auto& context = *::pem_emulation::block_context;
  const int t = ::pem_emulation::linear_thread;
  const int warp_first = t - t % ::pem_emulation::kWarpSize;
  std::memcpy(&context.slots[t], &value, sizeof(T));
  context.warps[t / ::pem_emulation::kWarpSize]->arrive_and_wait();
  const int source = warp_first + ((t % ::pem_emulation::kWarpSize) ^ lane_mask);
  T result = value;  // a lane outside the block's last, partial warp: the caller's own value
  if (source < context.threads) std::memcpy(&result, &context.slots[source], sizeof(T));
  context.warps[t / ::pem_emulation::kWarpSize]->arrive_and_wait();
  return result;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
// An H100's SM count, so that the host code takes the decisions it takes there; a test may set
// PEM_EMULATION_SM_COUNT to take those of a smaller GPU (fewer blocks to emulate for the same
// launch shape).
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp properties{132};
  const char* sm_count = std::getenv("PEM_EMULATION_SM_COUNT");
  properties.multiProcessorCount = sm_count != nullptr ? std::atoi(sm_count) : 132;
  return &properties;
}
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

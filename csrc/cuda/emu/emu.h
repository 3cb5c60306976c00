// CPU emulation of the CUDA execution model, for checking the kernels' logic
// on machines without a GPU (see emulate.py): one OS thread per CUDA thread,
// std::barrier for __syncthreads and for warp shuffles, blocks run one after
// another so that `static` stands in for __shared__. It checks indexing, lane
// geometry, shuffles and merges; it cannot check timing, the memory model of a
// real GPU, or 16-byte alignment (x86 tolerates misaligned vector loads).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
using std::max;
using std::min;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// The split planner's occupancy query: the figure the kernels are built for.
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = 4;
  return cudaSuccess;
}
namespace emu {
struct BlockState {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
  std::vector<unsigned char> smem;
};
inline BlockState* g_block = nullptr;
}  // namespace emu
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline void __syncthreads() { emu::g_block->block->arrive_and_wait(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8, "");
  auto* B = emu::g_block;
  const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B->warps[w]->arrive_and_wait();  // earlier readers are done with the slots
  B->slots[t] = bits;
  B->warps[w]->arrive_and_wait();
  const uint64_t ob = B->slots[w * 32 + (lane ^ o)];
  T r;
  std::memcpy(&r, &ob, sizeof(T));
  return r;
}
namespace emu {
struct L {
  dim3 g, b;
  size_t smem;
  L(dim3 g_, dim3 b_, size_t s = 0, cudaStream_t = nullptr) : g(g_), b(b_), smem(s) {}
  template <class K, class... Args>
  void run(K kernel, Args... args) {
    gridDim = g;
    blockDim = b;
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) {
          BlockState st;
          st.block = std::make_unique<std::barrier<>>(b.x);
          for (unsigned w = 0; w < (b.x + 31) / 32; ++w)
            st.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, b.x - w * 32)));
          st.slots.assign(b.x, 0);
          st.smem.assign(smem + 16, 0xFF);  // garbage, like real shared memory
          g_block = &st;
          std::vector<std::thread> ts;
          for (unsigned t = 0; t < b.x; ++t)
            ts.emplace_back([=] {
              threadIdx = dim3(t, 0, 0);
              blockIdx = dim3(x, y, z);
              kernel(args...);
            });
          for (auto& th : ts) th.join();
        }
  }
};
inline unsigned char* dyn_smem() { return g_block->smem.data(); }
struct Guard {
  template <class D>
  explicit Guard(const D&) {}
};
inline cudaStream_t Stream() { return nullptr; }
}  // namespace emu

// Shared pieces of the CUDA kernels: how a warp's lanes map onto slots and
// columns, 16-byte tile loads, deterministic reductions, and the host-side
// launch planning (split count, lane groups) and argument checks.
//
// Lane geometry (the core idea every streaming kernel uses)
// ----------------------------------------------------------
// A slot row of D values is read by a group of G lanes (G a power of two,
// 1..32). Each lane owns kCPL = 8 columns of a "tile" of G*8 columns, loaded as
// 16-byte vectors (4 floats, 2 doubles, 8 halves); the G lanes of a group read
// adjacent 16-byte units, so the 32/G groups of a warp, which take consecutive
// slots, read one contiguous stretch of memory. G is the smallest power of two
// with G*8 >= D (so D=64 uses 8 lanes and a warp streams 4 slots at once), and
// a row wider than 256 columns is covered by several tiles. A group is called
// a "stream": it walks its own slots with its own running softmax statistics
// and accumulators, which live in registers; streams are merged once, at the
// end of a block, in a fixed order. Row-wide sums (norms, dot products) are
// xor-butterfly shuffles inside a group, which give every lane the same bits.
//
// All lanes of a block run the same number of loop iterations (a stream whose
// slot is past the end works on zeros and skips its updates), so shuffles and
// barriers are never divergent.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>

namespace neuralmem {
namespace cuda {

constexpr int kThreads = 128;            // threads per block of every streaming kernel
constexpr int kWarps = kThreads / 32;
constexpr int kCPL = 8;                  // columns per lane per tile
constexpr int kMaxTile = 32 * kCPL;      // widest tile: 256 columns
constexpr int kHP = 4;                   // heads handled together (registers per head: 8..24)
constexpr int64_t kMinChunk = 1024;      // fewest slots worth a split of their own
constexpr int kMaxSplits = 4096;         // bounds the combine kernels' shared scale table
constexpr int kBlocksPerSM = 4;          // resident blocks per SM when the runtime cannot tell (see occupancy)
// Bytes of memory a lane of the content streaming kernels (content_read's
// forward, content_write_) loads before it uses the first row: the loads of
// unroll_rows<T>() rows are issued back to back, kept as loaded (not yet
// widened), then the rows are used in slot order, so the arithmetic (and
// every result bit) is that of one row at a time while a block keeps
// kThreads * kUnrollBytes = 16 KB in flight in every dtype. At the two
// resident blocks these kernels are built for that is 32 KB per SM, about
// what HBM3e needs to run at its bandwidth (bandwidth x latency / SMs).
constexpr int kUnrollBytes = 128;
template <typename T>
constexpr int unroll_rows() {  // 4 rows of float, 8 of half or bfloat16, 2 of double
  return kUnrollBytes / (kCPL * static_cast<int>(sizeof(T)));
}

// Fewest resident blocks per SM a kernel of kThreads threads is built for:
// __launch_bounds__(kThreads, min_blocks<T>(weight)) caps its registers at
// 65536 / (blocks * kThreads). Light kernels 4 (128 registers), heavy
// float/half kernels 3 (168), double and the heaviest kernels 2 (255, no cap
// below the hardware's). The split planner does not assume this figure: it
// asks the runtime for the kernel's real occupancy (occupancy below), and
// tests/test_kernel_resources.py checks the cubins' registers against it.
enum KernelWeight : int { kLight = 0, kHeavy = 1, kHeaviest = 2 };
template <typename T>
constexpr int min_blocks(int weight) {
  return weight == kLight ? 4 : (weight == kHeavy && sizeof(T) != 8) ? 3 : 2;
}

template <typename T>
using acc_t = at::opmath_type<T>;        // float for half/bfloat16/float, double for double

// 16-byte vectors: VEC elements per load, UPL loads per lane per tile.
template <typename T>
struct Vec {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int UPL = kCPL / VEC;
  static_assert(UPL * VEC == kCPL, "kCPL must be a multiple of the vector width");
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// ---------------------------------------------------------------------------
// device math (overloads so that float stays float and double stays double)
// ---------------------------------------------------------------------------
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }
// a * b rounded on its own: never contracted into a multiply-add.
__device__ __forceinline__ float dmul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float dabs(float x) { return fabsf(x); }
__device__ __forceinline__ double dabs(double x) { return fabs(x); }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// exp(m - M) for merging running softmax statistics; an empty stream
// (m = -inf) contributes nothing, also when every stream is empty.
template <typename A>
__device__ __forceinline__ A merge_scale(A m, A M) {
  return m == neg_inf<A>() ? A(0) : dexp(m - M);
}

// ---------------------------------------------------------------------------
// lane geometry
// ---------------------------------------------------------------------------
struct Lanes {
  int G;          // lanes per stream
  int lig;        // lane in group
  int lane, warp;
  int stream;     // stream index within the block
  int tile_cols;  // G * kCPL
  int ntiles;     // tiles per row

  __device__ Lanes(int G_, int D) : G(G_) {
    lane = threadIdx.x & 31;
    warp = threadIdx.x >> 5;
    lig = lane & (G - 1);
    stream = threadIdx.x / G;
    tile_cols = G * kCPL;
    ntiles = (D + tile_cols - 1) / tile_cols;
  }
  __device__ int nstreams() const { return kThreads / G; }
  // Column, within its tile, of this lane's register i.
  template <int VEC>
  __device__ int lcol(int i) const {
    return (lig + (i / VEC) * G) * VEC + (i % VEC);
  }
};

// Loads this lane's 8 columns of tile t of a row (zeros past D or when !valid).
// vec_ok: every row base is 16-byte aligned and D is a multiple of VEC, so a
// unit is either wholly inside the row or wholly past its end.
template <typename T, typename A>
__device__ __forceinline__ void load_tile(const T* __restrict__ row, int D, int t, const Lanes& L, bool vec_ok,
                                          bool valid, A (&x)[kCPL]) {
  constexpr int VEC = Vec<T>::VEC;
#pragma unroll
  for (int j = 0; j < Vec<T>::UPL; ++j) {
    const int c0 = t * L.tile_cols + (L.lig + j * L.G) * VEC;
    if (valid && vec_ok && c0 + VEC <= D) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[j * VEC + k] = static_cast<A>(p.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) x[j * VEC + k] = (valid && c0 + k < D) ? static_cast<A>(row[c0 + k]) : A(0);
    }
  }
}

// This lane's kCPL elements of a tile, as loaded (T, not yet widened).
template <typename T>
struct RawTile {
  Pack<T, Vec<T>::VEC> p[Vec<T>::UPL];
};

// load_tile's loads into a RawTile, with the vector-or-scalar choice made at
// compile time: the unrolled streaming loops are instantiated for both and
// pick one per block, so each of their loads is one predicated instruction
// (VEC_OK: a 16-byte load or zeros) instead of a branch between the two
// kinds. widen_tile(load_raw_tile<vec_ok>(...)) gives load_tile's values.
template <bool VEC_OK, typename T>
__device__ __forceinline__ void load_raw_tile(const T* __restrict__ row, int D, int t, const Lanes& L, bool valid,
                                              RawTile<T>& r) {
  constexpr int VEC = Vec<T>::VEC;
#pragma unroll
  for (int j = 0; j < Vec<T>::UPL; ++j) {
    const int c0 = t * L.tile_cols + (L.lig + j * L.G) * VEC;
    if constexpr (VEC_OK) {
      if (valid && c0 + VEC <= D) {
        r.p[j] = *reinterpret_cast<const Pack<T, VEC>*>(row + c0);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) r.p[j].v[k] = T(0);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) r.p[j].v[k] = (valid && c0 + k < D) ? row[c0 + k] : T(0);
    }
  }
}

// The U one-tile rows n_begin + (it + u) * S + stream (u < U) of a stream,
// each loaded as load_raw_tile does (zeros from n_end on), loads only.
template <bool VEC_OK, int U, typename T>
__device__ __forceinline__ void load_raw_rows(const T* mem_b, int64_t n_begin, int64_t it, int S, int64_t n_end,
                                              int D, const Lanes& L, RawTile<T> (&raw)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t n = n_begin + (it + u) * S + L.stream;
    load_raw_tile<VEC_OK>(mem_b + n * D, D, 0, L, n < n_end, raw[u]);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void widen_tile(const RawTile<T>& r, A (&x)[kCPL]) {
  constexpr int VEC = Vec<T>::VEC;
#pragma unroll
  for (int j = 0; j < Vec<T>::UPL; ++j)
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[j * VEC + k] = static_cast<A>(r.p[j].v[k]);
}

// Adds one tile of a slot row (this lane's columns v) to its squared norm
// and its dot products with the head vectors q.
template <typename A>
__device__ __forceinline__ void tile_dots(const A (&v)[kCPL], const A (&q)[kHP][kCPL], A& sq, A (&dot)[kHP]) {
#pragma unroll
  for (int i = 0; i < kCPL; ++i) {
    sq += v[i] * v[i];
#pragma unroll
    for (int h = 0; h < kHP; ++h) dot[h] += q[h][i] * v[i];
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store_tile(T* __restrict__ row, int D, int t, const Lanes& L, bool vec_ok, bool valid,
                                           const A (&x)[kCPL]) {
  constexpr int VEC = Vec<T>::VEC;
  if (!valid) return;
#pragma unroll
  for (int j = 0; j < Vec<T>::UPL; ++j) {
    const int c0 = t * L.tile_cols + (L.lig + j * L.G) * VEC;
    if (vec_ok && c0 + VEC <= D) {
      Pack<T, VEC> p;
#pragma unroll
      for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<T>(x[j * VEC + k]);
      *reinterpret_cast<Pack<T, VEC>*>(row + c0) = p;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (c0 + k < D) row[c0 + k] = static_cast<T>(x[j * VEC + k]);
    }
  }
}

// One 16-byte unit (VEC columns from c0) of a row, for the elementwise kernels.
template <typename T, typename A>
__device__ __forceinline__ void load_unit(const T* __restrict__ row, int c0, int D, bool vec_ok,
                                          A (&x)[Vec<T>::VEC]) {
  constexpr int VEC = Vec<T>::VEC;
  if (vec_ok && c0 + VEC <= D) {
    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(row + c0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = static_cast<A>(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = c0 + k < D ? static_cast<A>(row[c0 + k]) : A(0);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store_unit(T* __restrict__ row, int c0, int D, bool vec_ok,
                                           const A (&x)[Vec<T>::VEC]) {
  constexpr int VEC = Vec<T>::VEC;
  if (vec_ok && c0 + VEC <= D) {
    Pack<T, VEC> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<T>(x[k]);
    *reinterpret_cast<Pack<T, VEC>*>(row + c0) = p;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (c0 + k < D) row[c0 + k] = static_cast<T>(x[k]);
  }
}

// Sum over the G lanes of a stream; every lane gets the same bits.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum / max over the streams of a warp (lanes that share a lane-in-group).
template <typename A>
__device__ __forceinline__ A streams_sum(A v, int G) {
  for (int o = G; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A>
__device__ __forceinline__ A streams_max(A v, int G) {
  for (int o = G; o < 32; o <<= 1) v = dmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Deterministic block-wide sum of one value per thread (fixed tree); every
// thread gets the result. `sh` holds kWarps values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // sh may still be read from a previous call
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += sh[w];
  return s;
}
template <typename A>
__device__ __forceinline__ A block_max(A v, A* sh) {
  for (int o = 16; o > 0; o >>= 1) v = dmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) s = dmax(s, sh[w]);
  return s;
}

// Merges the per-stream tile accumulators acc[h][i] of a block into
// sh[w][h][c] (one row per warp, summed over that warp's streams); the caller
// adds the kWarps rows in order after the barrier this function ends with.
template <typename A>
__device__ __forceinline__ void warp_rows_of_tile(A (&acc)[kHP][kCPL], const Lanes& L, A (*sh)[kHP][kMaxTile],
                                                  int vec) {
#pragma unroll
  for (int h = 0; h < kHP; ++h)
#pragma unroll
    for (int i = 0; i < kCPL; ++i) acc[h][i] = streams_sum(acc[h][i], L.G);
  __syncthreads();  // sh may still be read from a previous call
  if (L.lane < L.G) {
#pragma unroll
    for (int h = 0; h < kHP; ++h)
#pragma unroll
      for (int i = 0; i < kCPL; ++i) sh[L.warp][h][(L.lig + (i / vec) * L.G) * vec + (i % vec)] = acc[h][i];
  }
  __syncthreads();
}

// Non-finite strengths and keys. The reference formula gives a head whose
// strength is inf or NaN, or whose key has an inf or NaN element, NaN
// weights, hence NaN reads, lse and gradients (the memory gradient of every
// slot of that memory included), where the kernels' arithmetic would not. The
// kernels follow the reference: such a head is computed as a zero key of
// strength 0, so that nothing non-finite reaches the heads that share its
// block, and its outputs are then made NaN. One check per (memory, head),
// nothing per slot; nothing raises (that would need a synchronisation).
//
// Whether every element of a (B,H,D) row is finite (x * 0 is NaN exactly for
// inf and NaN); the same answer in every lane of the stream.
template <typename T, typename A>
__device__ __forceinline__ bool row_finite(const T* row, int D, const Lanes& L, bool vec_ok, bool valid) {
  A z = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A v[kCPL];
    load_tile(row, D, t, L, vec_ok, valid, v);
#pragma unroll
    for (int i = 0; i < kCPL; ++i) z += v[i] * A(0);
  }
  return group_sum(z, L.G) == A(0);
}

template <typename A>
__device__ __forceinline__ bool finite_value(A x) {
  return x * A(0) == A(0);
}

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(NAN);
}

// decay * u + sw (sw: the heads' weights summed in head order) with the
// product rounded on its own, as the reference and the CPU kernels compute
// it, so that the fused write and usage_update give the same usage, ties
// included.
template <typename A>
__device__ __forceinline__ A usage_step(A decay, A u, A sw) {
  return dmul_rn(decay, u) + sw;
}

// Argmin with ties to the lowest index and NaN counted as the least value,
// which is what torch.argmin returns; the result does not depend on the order
// in which candidates are merged.
template <typename A>
__device__ __forceinline__ bool arg_better(A v1, int64_t i1, A v2, int64_t i2) {
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 < v2;
  return i1 < i2;
}

// ---------------------------------------------------------------------------
// host helpers
// ---------------------------------------------------------------------------
inline int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline int lanes_per_slot(int64_t D) {
  const int64_t need = (D + kCPL - 1) / kCPL;
  int G = 1;
  while (G < need && G < 32) G <<= 1;
  return G;
}

inline int tiles_per_row(int64_t D, int G) {
  const int64_t tc = int64_t(G) * kCPL;
  return static_cast<int>((D + tc - 1) / tc);
}

// How many blocks share the slots of one memory: enough blocks in total to
// fill the SMs (groups = independent blocks per split), never splits smaller
// than kMinChunk slots, so small memories get one block each.
struct Split {
  int n;          // number of splits
  int64_t chunk;  // slots per split (the last one may have fewer)
};

// Resident blocks per SM of Kernel at kThreads threads without dynamic shared
// memory, as the runtime computes it from the kernel's registers and shared
// memory (cached per kernel; one GPU model per process).
template <auto Kernel>
inline int occupancy() {
  static std::atomic<int> cache{0};
  int v = cache.load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, Kernel, kThreads, 0) != cudaSuccess || v < 1) {
      (void)cudaGetLastError();
      v = kBlocksPerSM;
    }
    cache.store(v, std::memory_order_relaxed);
  }
  return v;
}

// occupancy of the instance of a kernel template for a tensor's dtype:
// f(T{}) returns it for T (a lambda calling occupancy<&kernel<T, ...>>()).
template <typename F>
inline int occupancy_for(at::ScalarType t, F f) {
  switch (t) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return kBlocksPerSM;
  }
}

// per_sm: resident blocks per SM of the kernel the split feeds (occupancy).
inline Split plan_split(int64_t N, int64_t groups, int device, int per_sm = kBlocksPerSM) {
  const int64_t target = int64_t(std::max(per_sm, 1)) * sm_count(device);
  const int64_t want = (target + groups - 1) / std::max<int64_t>(groups, 1);
  const int64_t most = std::max<int64_t>(1, N / kMinChunk);
  int64_t s = std::max<int64_t>(1, std::min<int64_t>({want, most, int64_t(kMaxSplits)}));
  const int64_t chunk = (N + s - 1) / s;
  s = (N + chunk - 1) / chunk;  // no empty split
  return Split{static_cast<int>(s), chunk};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline bool rows_vectorizable(int64_t D, int64_t elem_size, std::initializer_list<const void*> ptrs) {
  if ((D * elem_size) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

inline dim3 grid_1d(int64_t work, int device) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, int64_t(sm_count(device)) * 8));
  return dim3(static_cast<unsigned>(blocks));
}

// Argument checks; messages name the argument and what was expected.
inline void check_on(const at::Tensor& t, const char* name, const at::Tensor& memory) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == memory.device(), name, " must be on ", memory.device(), " (the device of memory), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == memory.scalar_type(), name, " must have dtype ", memory.scalar_type(),
              " (the dtype of memory), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                        const char* hint) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  if (ok) {
    int64_t i = 0;
    for (int64_t s : shape) {
      ok = ok && (s < 0 || t.size(i) == s);
      ++i;
    }
  }
  TORCH_CHECK(ok, name, " must have shape ", hint, " = ", c10::IntArrayRef(shape), " (-1: any), got ", t.sizes());
}

inline void check_memory(const at::Tensor& memory) {
  TORCH_CHECK(memory.is_cuda(), "memory must be a CUDA tensor, got a tensor on ", memory.device());
  TORCH_CHECK(memory.dim() == 3, "memory must have shape (B, N, D), got ", memory.sizes());
  TORCH_CHECK(at::isFloatingType(memory.scalar_type()),
              "memory must be float16, bfloat16, float32 or float64, got ", memory.scalar_type());
  TORCH_CHECK(memory.size(1) >= 1 && memory.size(2) >= 1,
              "memory must have at least one slot and one column, got shape ", memory.sizes());
  TORCH_CHECK(memory.size(2) <= (int64_t(1) << 23), "memory rows wider than 2^23 columns are not supported, got D=",
              memory.size(2));
}

// Defined in read_kernels.cu; content_write_ falls back to it for many heads.
at::Tensor content_addressing_cuda(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                   double eps);

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cuda
}  // namespace neuralmem

// CUDA kernels for the write side: memory_write (+ backward), memory_write_,
// usage_update and content_write_ (TORCH_LIBRARY_IMPL(neuralmem, CUDA)).
//
// Design (lane geometry and reductions: common.cuh; regimes: read_kernels.cu).
//  * memory_write / memory_write_ / usage_update are elementwise: one thread
//    per 16-byte unit of a row (per slot for usage) loops over the W heads,
//    new = m * prod_w (1 - w e) + sum_w w a. In place is safe because every
//    element is read and written by the same thread.
//  * memory_write backward streams the slots like the read kernels: per slot,
//    dm = g * keep (elementwise), dw[v] = sum_col g (a_v - m e_v excl_v) (a row
//    sum inside the lane group), and de, da accumulate over the slots in
//    registers, per split, merged in split order (no atomics). excl_v, the
//    product of (1 - w e) over the other heads, comes from prefix and suffix
//    products, never from a division (which fails when a factor is 0).
//  * content_write_ needs the softmax normaliser of the OLD memory before any
//    row changes. Small N (one split): ONE launch; the block computes the
//    per-head logsumexp over all slots, synchronises, then recomputes each
//    row's weights, rewrites the row, updates usage and finds the least-used
//    slot, so a read-then-write step is two launches. Large N: launch 1 leaves
//    per-split (max, sum); launch 2 merges them in split order (every block the
//    same way), updates its rows and leaves a per-split argmin; launch 3 merges
//    the argmins. The argmin is a reduction (ties to the lowest index, NaN
//    first, like torch.argmin), never a sort. Weights are rounded to the
//    memory dtype before use, exactly as the unfused composition
//    content_addressing -> memory_write_ -> usage_update would. More than
//    kHP write heads take that composition itself.
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common.cuh"
#include "inplace_checks.h"

namespace neuralmem {
namespace cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// elementwise kernels
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256)
    write_kernel(const T* mem, const T* w, const T* e, const T* ad, int64_t B, int64_t N, int D, int W, bool vec_ok,
                 T* out) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::VEC;
  const int64_t U = (D + VEC - 1) / VEC;
  const int64_t total = B * N * U;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / (N * U), rem = u % (N * U);
    const int64_t n = rem / U;
    const int c0 = static_cast<int>(rem % U) * VEC;
    A x[VEC], keep[VEC], add[VEC], ev[VEC], av[VEC];
    load_unit<T, A>(mem + (b * N + n) * D, c0, D, vec_ok, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      keep[k] = 1;
      add[k] = 0;
    }
    for (int v = 0; v < W; ++v) {
      const A wv = static_cast<A>(w[(b * W + v) * N + n]);
      load_unit<T, A>(e + (b * W + v) * D, c0, D, vec_ok, ev);
      load_unit<T, A>(ad + (b * W + v) * D, c0, D, vec_ok, av);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        keep[k] *= A(1) - wv * ev[k];
        add[k] += wv * av[k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = x[k] * keep[k] + add[k];
    store_unit<T, A>(out + (b * N + n) * D, c0, D, vec_ok, x);
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    usage_kernel(const T* usage, const T* w, int64_t B, int64_t N, int W, acc_t<T> decay, T* out) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, n = i % N;
    A s = 0;
    for (int v = 0; v < W; ++v) s += static_cast<A>(w[(b * W + v) * N + n]);
    out[i] = static_cast<T>(usage_step(decay, static_cast<A>(usage[i]), s));
  }
}

// ---------------------------------------------------------------------------
// argmin reductions
// ---------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ void argmin_merge(A& v, int64_t& i, A ov, int64_t oi) {
  if (arg_better(ov, oi, v, i)) {
    v = ov;
    i = oi;
  }
}

// Block-wide argmin; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_argmin(A& v, int64_t& i) {
  __shared__ A sv[kWarps];
  __shared__ int64_t si[kWarps];
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    argmin_merge(v, i, ov, oi);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    sv[threadIdx.x >> 5] = v;
    si[threadIdx.x >> 5] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) argmin_merge(v, i, sv[w], si[w]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kLight))
    argmin_partial_kernel(const T* usage, int64_t N, int64_t chunk, int nsplit, acc_t<T>* pv, int64_t* pi) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t begin = int64_t(split) * chunk, end = min(N, begin + chunk);
  A v = static_cast<A>(INFINITY);
  int64_t i = std::numeric_limits<int64_t>::max();
  for (int64_t n = begin + threadIdx.x; n < end; n += kThreads) argmin_merge(v, i, static_cast<A>(usage[b * N + n]), n);
  block_argmin(v, i);
  if (threadIdx.x == 0) {
    pv[b * nsplit + split] = v;
    pi[b * nsplit + split] = i;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads, min_blocks<A>(kLight))
    argmin_combine_kernel(const A* pv, const int64_t* pi, int nsplit, int64_t* least) {
  const int64_t b = blockIdx.x;
  A v = static_cast<A>(INFINITY);
  int64_t i = std::numeric_limits<int64_t>::max();
  for (int s = threadIdx.x; s < nsplit; s += kThreads) argmin_merge(v, i, pv[b * nsplit + s], pi[b * nsplit + s]);
  block_argmin(v, i);
  if (threadIdx.x == 0) least[b] = i;
}

// ---------------------------------------------------------------------------
// memory_write backward
// ---------------------------------------------------------------------------
template <typename T>
struct WriteBwdArgs {
  const T* grad = nullptr;  // (B,N,D)
  const T* mem = nullptr;   // (B,N,D)
  const T* w = nullptr;     // (B,W,N)
  const T* e = nullptr;     // (B,W,D)
  const T* ad = nullptr;    // (B,W,D)
  T* dm = nullptr;
  T* dw = nullptr;
  T* de = nullptr;  // final de/da when nsplit == 1
  T* da = nullptr;
  acc_t<T>* part_de = nullptr;  // [B*W][nsplit][D] otherwise
  acc_t<T>* part_da = nullptr;
  int64_t N = 0, chunk = 0;
  int D = 0, W = 0, hgroups = 1, G = 1, nsplit = 1;
  bool vec_ok = false;
};

template <typename T, typename A>
__device__ __forceinline__ void load_rows(const T* rows, int D, int t, const Lanes& L, bool vec_ok, int hc,
                                          A (&r)[kHP][kCPL]) {
#pragma unroll
  for (int h = 0; h < kHP; ++h) load_tile(rows + int64_t(h) * D, D, t, L, vec_ok, h < hc, r[h]);
}

// Block sum of per-stream tile accumulators, written as the final gradient
// (one split) or as this split's partial.
template <typename T, typename A>
__device__ __forceinline__ void emit_tile_sums(A (&acc)[kHP][kCPL], const Lanes& L, A (*sh)[kHP][kMaxTile], int vec,
                                               int hc, int ctile, int D, int64_t row0, int split, int nsplit, T* out,
                                               A* part) {
  warp_rows_of_tile(acc, L, sh, vec);
  for (int e = threadIdx.x; e < hc * L.tile_cols; e += kThreads) {
    const int h = e / L.tile_cols, c = e % L.tile_cols;
    const int col = ctile * L.tile_cols + c;
    if (col >= D) continue;
    A s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sh[w][h][c];
    if (nsplit == 1) {
      out[(row0 + h) * D + col] = static_cast<T>(s);
    } else {
      part[((row0 + h) * nsplit + split) * D + col] = s;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kHeaviest)) write_bwd_kernel(const WriteBwdArgs<T> a) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::VEC;
  const int b = blockIdx.x / a.hgroups, hgi = blockIdx.x % a.hgroups;
  const int h0 = hgi * kHP, hc = min(kHP, a.W - h0);
  const int split = blockIdx.y, ctile = blockIdx.z;
  const int D = a.D, W = a.W;
  const Lanes L(a.G, D);
  const int64_t bw0 = int64_t(b) * W + h0;
  const T* e_h = a.e + bw0 * D;
  const T* a_h = a.ad + bw0 * D;
  const T* e_b = a.e + int64_t(b) * W * D;
  const T* w_b = a.w + int64_t(b) * W * a.N;

  A E[kHP][kCPL], Ad[kHP][kCPL], de[kHP][kCPL], da[kHP][kCPL];
#pragma unroll
  for (int h = 0; h < kHP; ++h)
#pragma unroll
    for (int i = 0; i < kCPL; ++i) E[h][i] = Ad[h][i] = de[h][i] = da[h][i] = 0;
  if (L.ntiles == 1) {
    load_rows(e_h, D, 0, L, a.vec_ok, hc, E);
    load_rows(a_h, D, 0, L, a.vec_ok, hc, Ad);
  }

  const int64_t n_begin = int64_t(split) * a.chunk;
  const int64_t n_end = min(a.N, n_begin + a.chunk);
  const int S = L.nstreams();
  const int64_t iters = n_end > n_begin ? (n_end - n_begin + S - 1) / S : 0;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t n = n_begin + it * S + L.stream;
    const bool valid = n < n_end;
    const int64_t row_off = (int64_t(b) * a.N + n) * D;
    A wv[kHP], dwp[kHP];
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      wv[h] = (valid && h < hc) ? static_cast<A>(w_b[int64_t(h0 + h) * a.N + n]) : A(0);
      dwp[h] = 0;
    }
    for (int t = 0; t < L.ntiles; ++t) {
      if (L.ntiles > 1) {
        load_rows(e_h, D, t, L, a.vec_ok, hc, E);
        load_rows(a_h, D, t, L, a.vec_ok, hc, Ad);
      }
      A gx[kCPL], x[kCPL], dmv[kCPL];
      load_tile(a.grad + row_off, D, t, L, a.vec_ok, valid, gx);
      load_tile(a.mem + row_off, D, t, L, a.vec_ok, valid, x);
#pragma unroll
      for (int i = 0; i < kCPL; ++i) {
        // Product of (1 - w e) over the heads outside this block's group.
        A pout = 1;
        if (W > kHP && valid) {
          const int col = t * L.tile_cols + L.lcol<VEC>(i);
          if (col < D) {
            for (int u = 0; u < W; ++u) {
              if (u >= h0 && u < h0 + hc) continue;
              pout *= A(1) - static_cast<A>(w_b[int64_t(u) * a.N + n]) * static_cast<A>(e_b[int64_t(u) * D + col]);
            }
          }
        }
        A f[kHP], pre[kHP];
        A run = 1;
#pragma unroll
        for (int h = 0; h < kHP; ++h) {
          f[h] = A(1) - wv[h] * E[h][i];
          pre[h] = run;
          run *= f[h];
        }
        dmv[i] = gx[i] * (pout * run);
        A suf = 1;
#pragma unroll
        for (int h = kHP - 1; h >= 0; --h) {
          const A excl = pre[h] * suf * pout;
          suf *= f[h];
          dwp[h] += gx[i] * (Ad[h][i] - x[i] * E[h][i] * excl);
          if (t == ctile) {
            de[h][i] -= gx[i] * x[i] * wv[h] * excl;
            da[h][i] += gx[i] * wv[h];
          }
        }
      }
      if (t == ctile && hgi == 0) store_tile(a.dm + row_off, D, t, L, a.vec_ok, valid, dmv);
    }
#pragma unroll
    for (int h = 0; h < kHP; ++h) dwp[h] = group_sum(dwp[h], L.G);
    if (valid && L.lig == 0 && ctile == 0) {
#pragma unroll
      for (int h = 0; h < kHP; ++h)
        if (h < hc) a.dw[(bw0 + h) * a.N + n] = static_cast<T>(dwp[h]);
    }
  }

  __shared__ A sh_acc[kWarps][kHP][kMaxTile];
  emit_tile_sums(de, L, sh_acc, VEC, hc, ctile, D, bw0, split, a.nsplit, a.de, a.part_de);
  emit_tile_sums(da, L, sh_acc, VEC, hc, ctile, D, bw0, split, a.nsplit, a.da, a.part_da);
}

// Plain sum of per-split partials [R][nsplit][D] in split order.
template <typename T>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const acc_t<T>* part, int64_t R, int nsplit, int D, T* out) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < R * D; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / D;
    const int col = static_cast<int>(i % D);
    A s = 0;
    for (int sp = 0; sp < nsplit; ++sp) s += part[(r * nsplit + sp) * D + col];
    out[i] = static_cast<T>(s);
  }
}

// ---------------------------------------------------------------------------
// content_write_
// ---------------------------------------------------------------------------
enum CwPhase : int { kFused = 0, kStats = 1, kUpdate = 2 };

template <typename T>
struct CwArgs {
  T* mem = nullptr;
  T* usage = nullptr;  // may be null
  const T* keys = nullptr;
  const T* str = nullptr;
  const T* erase = nullptr;
  const T* add = nullptr;
  acc_t<T>* part_m = nullptr;    // [B*W][nsplit]
  acc_t<T>* part_l = nullptr;
  acc_t<T>* part_min = nullptr;  // [B][nsplit]
  int64_t* part_idx = nullptr;
  int64_t* least = nullptr;      // (B,)
  int64_t N = 0, chunk = 0;
  int D = 0, W = 0, G = 1, nsplit = 1, phase = kFused;
  acc_t<T> eps = 0, decay = 0;
  bool vec_ok = false;
};

// q of the heads in the bit mask vm (zeros for the others), tile 0.
template <typename T, typename A>
__device__ __forceinline__ void norm_heads(const T* heads, int D, const Lanes& L, bool vec_ok, unsigned vm,
                                           A (&q)[kHP][kCPL], const A (&den)[kHP]) {
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    load_tile(heads + int64_t(h) * D, D, 0, L, vec_ok, ((vm >> h) & 1u) != 0, q[h]);
#pragma unroll
    for (int i = 0; i < kCPL; ++i) q[h][i] = q[h][i] / den[h];
  }
}

// The logits of one slot from its squared norm and dot products (this lane's share).
template <typename A>
__device__ __forceinline__ void cw_scores(A sq, A (&dot)[kHP], const Lanes& L, const A (&beta)[kHP], A eps,
                                          A (&s)[kHP]) {
  sq = group_sum(sq, L.G);
  const A mden = dmax(dsqrt(sq), eps);
#pragma unroll
  for (int h = 0; h < kHP; ++h) s[h] = beta[h] * (group_sum(dot[h], L.G) / mden);
}

// Logits of one slot for the kHP write heads; identical arithmetic in both
// passes, so the weights are normalised by exactly the sums they came from.
template <typename T, typename A>
__device__ __forceinline__ void cw_logits(const T* row, bool valid, int D, const Lanes& L, bool vec_ok, const T* keys_h,
                                          unsigned vm, const A (&den)[kHP], const A (&beta)[kHP], A eps,
                                          A (&q)[kHP][kCPL], A (&x)[kCPL], A (&s)[kHP]) {
  A sq = 0, dot[kHP];
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A v[kCPL];
    load_tile(row, D, t, L, vec_ok, valid, v);
    if (L.ntiles > 1) {
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        load_tile(keys_h + int64_t(h) * D, D, t, L, vec_ok, ((vm >> h) & 1u) != 0, q[h]);
#pragma unroll
        for (int i = 0; i < kCPL; ++i) q[h][i] = q[h][i] / den[h];
      }
    }
    tile_dots(v, q, sq, dot);
    if (t == 0) {
#pragma unroll
      for (int i = 0; i < kCPL; ++i) x[i] = v[i];
    }
  }
  cw_scores(sq, dot, L, beta, eps, s);
}

// cw_logits of a one-tile row already loaded into x (the unrolled loops).
template <typename A>
__device__ __forceinline__ void cw_loaded_logits(const A (&x)[kCPL], const Lanes& L, const A (&beta)[kHP], A eps,
                                                 const A (&q)[kHP][kCPL], A (&s)[kHP]) {
  A sq = 0, dot[kHP];
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = 0;
  tile_dots(x, q, sq, dot);
  cw_scores(sq, dot, L, beta, eps, s);
}

// Walks a stream's one-tile rows unroll_rows<T>() at a time (kUnrollBytes,
// common.cuh): the loads of those rows first, then use(n, valid, x, s) on
// each in slot order, with its logits s; VEC_OK chooses the kind of load at
// compile time.
template <bool VEC_OK, typename T, typename A, typename F>
__device__ __forceinline__ void cw_unrolled(const T* mem_b, int64_t n_begin, int64_t n_end, int64_t iters, int S,
                                            int D, const Lanes& L, const A (&beta)[kHP], A eps,
                                            const A (&q)[kHP][kCPL], F&& use) {
  constexpr int U = unroll_rows<T>();
  for (int64_t it = 0; it < iters; it += U) {
    RawTile<T> raw[U];
    load_raw_rows<VEC_OK, U>(mem_b, n_begin, it, S, n_end, D, L, raw);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t n = n_begin + (it + u) * S + L.stream;
      A x[kCPL], s[kHP];
      widen_tile(raw[u], x);
      cw_loaded_logits(x, L, beta, eps, q, s);
      use(n, n < n_end, x, s);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kHeaviest)) content_write_kernel(const CwArgs<T> a) {
  using A = acc_t<T>;
  const int b = blockIdx.x, split = blockIdx.y;
  const int D = a.D, hc = a.W;  // hc <= kHP (host guarantees)
  const Lanes L(a.G, D);
  const int64_t bw0 = int64_t(b) * a.W;
  T* mem_b = a.mem + int64_t(b) * a.N * D;
  const T* keys_h = a.keys + bw0 * D;

  // vm: the finite heads. A non-finite one (see common.cuh) is computed as a
  // zero key of strength 0 in the statistics, and its weights are NaN: every
  // row it writes, and the usage, become NaN, as in the reference.
  A den[kHP], beta[kHP];
  unsigned vm = 0;
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    A s = 0, z = 0;
    for (int t = 0; t < L.ntiles; ++t) {
      A v[kCPL];
      load_tile(keys_h + int64_t(h) * D, D, t, L, a.vec_ok, h < hc, v);
#pragma unroll
      for (int i = 0; i < kCPL; ++i) {
        s += v[i] * v[i];
        z += v[i] * A(0);
      }
    }
    s = group_sum(s, L.G);
    z = group_sum(z, L.G);
    const A bt = h < hc ? static_cast<A>(a.str[bw0 + h]) : A(0);
    const bool ok = h < hc && z == A(0) && finite_value(bt);
    if (ok) vm |= 1u << h;
    den[h] = ok ? dmax(dsqrt(s), a.eps) : A(1);
    beta[h] = ok ? bt : A(0);
  }
  A q[kHP][kCPL];
#pragma unroll
  for (int h = 0; h < kHP; ++h)
#pragma unroll
    for (int i = 0; i < kCPL; ++i) q[h][i] = 0;
  if (L.ntiles == 1) norm_heads(keys_h, D, L, a.vec_ok, vm, q, den);

  const int64_t n_begin = int64_t(split) * a.chunk;
  const int64_t n_end = min(a.N, n_begin + a.chunk);
  const int S = L.nstreams();
  const int64_t iters = n_end > n_begin ? (n_end - n_begin + S - 1) / S : 0;

  // Every row of this split, in slot order, to use(n, valid, x, s): x the
  // row's first tile, s its logits (both passes run the same arithmetic).
  auto for_rows = [&](auto&& use) {
    if (L.ntiles == 1 && a.vec_ok) {
      cw_unrolled<true>(mem_b, n_begin, n_end, iters, S, D, L, beta, a.eps, q, use);
    } else if (L.ntiles == 1) {
      cw_unrolled<false>(mem_b, n_begin, n_end, iters, S, D, L, beta, a.eps, q, use);
    } else {
      for (int64_t it = 0; it < iters; ++it) {
        const int64_t n = n_begin + it * S + L.stream;
        const bool valid = n < n_end;
        A x[kCPL], s[kHP];
        cw_logits(mem_b + n * D, valid, D, L, a.vec_ok, keys_h, vm, den, beta, a.eps, q, x, s);
        use(n, valid, x, s);
      }
    }
  };

  __shared__ A sh_stat[kWarps][kHP];
  __shared__ A sh_lse[kHP];
  if (a.phase != kUpdate) {
    // Pass 1: softmax statistics of the write logits over the old memory.
    A m_run[kHP], l_run[kHP];
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      m_run[h] = neg_inf<A>();
      l_run[h] = 0;
    }
    auto stat_row = [&](int64_t, bool valid, const A (&)[kCPL], const A (&s)[kHP]) {
      if (!valid) return;
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        if (h >= hc) continue;
        if (s[h] > m_run[h]) {
          l_run[h] = l_run[h] * dexp(m_run[h] - s[h]) + A(1);
          m_run[h] = s[h];
        } else {
          l_run[h] += dexp(s[h] - m_run[h]);
        }
      }
    };
    for_rows(stat_row);
    A M[kHP];
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      const A mw = streams_max(m_run[h], L.G);
      if (L.lane == 0) sh_stat[L.warp][h] = mw;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      M[h] = sh_stat[0][h];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) M[h] = dmax(M[h], sh_stat[w][h]);
      l_run[h] *= merge_scale(m_run[h], M[h]);
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      const A lw = streams_sum(l_run[h], L.G);
      if (L.lane == 0) sh_stat[L.warp][h] = lw;
    }
    __syncthreads();
    if (threadIdx.x < hc) {
      const int h = threadIdx.x;
      A l = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) l += sh_stat[w][h];
      A mh = M[0];
#pragma unroll
      for (int k = 1; k < kHP; ++k)
        if (k == h) mh = M[k];
      if (a.phase == kStats) {
        a.part_m[(bw0 + h) * a.nsplit + split] = mh;
        a.part_l[(bw0 + h) * a.nsplit + split] = l;
      } else {
        sh_lse[h] = mh + dlog(l);
      }
    }
    if (a.phase == kStats) return;  // uniform across the block
  } else if (threadIdx.x < hc) {
    // Merge the per-split statistics in split order (the same in every block).
    const int h = threadIdx.x;
    const A* pm = a.part_m + (bw0 + h) * a.nsplit;
    const A* pl = a.part_l + (bw0 + h) * a.nsplit;
    A M = neg_inf<A>();
    for (int sp = 0; sp < a.nsplit; ++sp) M = dmax(M, pm[sp]);
    A l = 0;
    for (int sp = 0; sp < a.nsplit; ++sp) l += pl[sp] * merge_scale(pm[sp], M);
    sh_lse[h] = M + dlog(l);
  }
  __syncthreads();  // every row of this memory was read before any is written
  A lse[kHP];
#pragma unroll
  for (int h = 0; h < kHP; ++h) lse[h] = h < hc ? sh_lse[h] : A(0);

  // Pass 2: recompute the weights of each row from its old values, rewrite it.
  A E[kHP][kCPL], Ad[kHP][kCPL];
#pragma unroll
  for (int h = 0; h < kHP; ++h)
#pragma unroll
    for (int i = 0; i < kCPL; ++i) E[h][i] = Ad[h][i] = 0;
  const T* e_h = a.erase + bw0 * D;
  const T* a_h = a.add + bw0 * D;
  if (L.ntiles == 1) {
    load_rows(e_h, D, 0, L, a.vec_ok, hc, E);
    load_rows(a_h, D, 0, L, a.vec_ok, hc, Ad);
  }
  A best_v = static_cast<A>(INFINITY);
  int64_t best_i = std::numeric_limits<int64_t>::max();
  // Rewrites row n from its old values (x: its first tile) and its logits s.
  auto write_row = [&](int64_t n, bool valid, const A (&x)[kCPL], const A (&s)[kHP]) {
    T* row = mem_b + n * D;
    A wv[kHP];
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      wv[h] = (valid && h < hc) ? static_cast<A>(static_cast<T>(dexp(s[h] - lse[h]))) : A(0);
      if (valid && h < hc && ((vm >> h) & 1u) == 0) wv[h] = quiet_nan<A>();
    }
    for (int t = 0; t < L.ntiles; ++t) {
      A v[kCPL];
      if (L.ntiles == 1) {
#pragma unroll
        for (int i = 0; i < kCPL; ++i) v[i] = x[i];
      } else {
        load_tile(row, D, t, L, a.vec_ok, valid, v);
        load_rows(e_h, D, t, L, a.vec_ok, hc, E);
        load_rows(a_h, D, t, L, a.vec_ok, hc, Ad);
      }
#pragma unroll
      for (int i = 0; i < kCPL; ++i) {
        A keep = 1, add = 0;
#pragma unroll
        for (int h = 0; h < kHP; ++h) {
          keep *= A(1) - wv[h] * E[h][i];
          add += wv[h] * Ad[h][i];
        }
        v[i] = v[i] * keep + add;
      }
      store_tile(row, D, t, L, a.vec_ok, valid, v);
    }
    // One lane per stream owns the slot's usage (read, update, argmin), so no
    // lane can see a value another lane has already updated.
    if (a.usage != nullptr && valid && L.lig == 0) {
      A sw = 0;
#pragma unroll
      for (int h = 0; h < kHP; ++h) sw += wv[h];
      T* up = a.usage + int64_t(b) * a.N + n;
      const T un = static_cast<T>(usage_step(a.decay, static_cast<A>(*up), sw));
      *up = un;
      argmin_merge(best_v, best_i, static_cast<A>(un), n);
    }
  };
  for_rows(write_row);
  if (a.usage != nullptr) {
    block_argmin(best_v, best_i);
    if (threadIdx.x == 0) {
      if (a.phase == kFused) {
        a.least[b] = best_i;
      } else {
        a.part_min[int64_t(b) * a.nsplit + split] = best_v;
        a.part_idx[int64_t(b) * a.nsplit + split] = best_i;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------
struct WriteShapes {
  int64_t B, N, D, W;
};

WriteShapes check_write(const Tensor& memory, const Tensor& weights, const Tensor& erase, const Tensor& add) {
  check_memory(memory);
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  check_on(weights, "weights", memory);
  check_shape(weights, "weights", {B, -1, N}, "(B, W, N)");
  const int64_t W = weights.size(1);
  check_on(erase, "erase", memory);
  check_shape(erase, "erase", {B, W, D}, "(B, W, D)");
  check_on(add, "add", memory);
  check_shape(add, "add", {B, W, D}, "(B, W, D)");
  return {B, N, D, W};
}

void launch_write(const Tensor& memory, const Tensor& weights, const Tensor& erase, const Tensor& add,
                  const Tensor& out) {
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), W = weights.size(1);
  if (memory.numel() == 0) return;
  const int dev = memory.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_write_cuda", [&] {
    const scalar_t* m = memory.data_ptr<scalar_t>();
    const scalar_t* e = erase.data_ptr<scalar_t>();
    const scalar_t* ad = add.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool vec_ok = rows_vectorizable(D, sizeof(scalar_t), {m, e, ad, o});
    const int64_t units = B * N * ((D + Vec<scalar_t>::VEC - 1) / Vec<scalar_t>::VEC);
    write_kernel<scalar_t><<<grid_1d(units, dev), 256, 0, stream>>>(m, weights.data_ptr<scalar_t>(), e, ad, B, N,
                                                                     static_cast<int>(D), static_cast<int>(W),
                                                                     vec_ok, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_usage(const Tensor& usage, const Tensor& weights, double decay, const Tensor& out) {
  const int64_t B = weights.size(0), W = weights.size(1), N = weights.size(2);
  if (usage.numel() == 0) return;
  const int dev = usage.get_device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "usage_update_cuda", [&] {
    usage_kernel<scalar_t><<<grid_1d(B * N, dev), 256, 0, stream>>>(
        usage.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), B, N, static_cast<int>(W),
        static_cast<acc_t<scalar_t>>(decay), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_argmin(const Tensor& usage, const Tensor& least) {
  const int64_t B = usage.size(0), N = usage.size(1);
  if (B == 0) return;
  const int dev = usage.get_device();
  const Split sp = plan_split(N, B, dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, usage.scalar_type(), "usage_argmin_cuda", [&] {
    using A = acc_t<scalar_t>;
    Tensor pv = at::empty({B, sp.n}, usage.options().dtype(acc_type(usage.scalar_type())));
    Tensor pi = at::empty({B, sp.n}, usage.options().dtype(at::kLong));
    argmin_partial_kernel<scalar_t><<<dim3(static_cast<unsigned>(B), sp.n), kThreads, 0, stream>>>(
        usage.data_ptr<scalar_t>(), N, sp.chunk, sp.n, pv.data_ptr<A>(), pi.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    argmin_combine_kernel<A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        pv.data_ptr<A>(), pi.data_ptr<int64_t>(), sp.n, least.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor memory_write_cuda(const Tensor& memory_, const Tensor& weights_, const Tensor& erase_, const Tensor& add_) {
  check_write(memory_, weights_, erase_, add_);
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), weights = weights_.contiguous();
  const Tensor erase = erase_.contiguous(), add = add_.contiguous();
  Tensor out = at::empty_like(memory);
  launch_write(memory, weights, erase, add, out);
  return out;
}

void memory_write_inplace_cuda(Tensor& memory, const Tensor& weights_, const Tensor& erase_,
                               const Tensor& add_) {
  check_write(memory, weights_, erase_, add_);
  TORCH_CHECK(memory.is_contiguous(), "memory must be contiguous for the in-place write (call .contiguous() first)");
  check_no_overlap("memory_write_", memory, "memory", {{"weights", &weights_}, {"erase", &erase_}, {"add", &add_}});
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor weights = weights_.contiguous(), erase = erase_.contiguous(), add = add_.contiguous();
  launch_write(memory, weights, erase, add, memory);
}

Tensor usage_update_cuda(const Tensor& usage_, const Tensor& weights_, double decay) {
  TORCH_CHECK(weights_.is_cuda(), "weights must be a CUDA tensor, got a tensor on ", weights_.device());
  TORCH_CHECK(weights_.dim() == 3, "weights must have shape (B, W, N), got ", weights_.sizes());
  TORCH_CHECK(at::isFloatingType(weights_.scalar_type()), "weights must be a floating tensor, got ",
              weights_.scalar_type());
  check_on(usage_, "usage", weights_);
  check_shape(usage_, "usage", {weights_.size(0), weights_.size(2)}, "(B, N)");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "decay must be in [0, 1], got ", decay);
  const c10::cuda::CUDAGuard guard(usage_.device());
  const Tensor usage = usage_.contiguous(), weights = weights_.contiguous();
  Tensor out = at::empty_like(usage);
  launch_usage(usage, weights, decay, out);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> memory_write_backward_cuda(const Tensor& grad_out_, const Tensor& memory_,
                                                                      const Tensor& weights_, const Tensor& erase_,
                                                                      const Tensor& add_) {
  const auto s = check_write(memory_, weights_, erase_, add_);
  check_on(grad_out_, "grad_out", memory_);
  check_shape(grad_out_, "grad_out", {s.B, s.N, s.D}, "(B, N, D)");
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor g = grad_out_.contiguous(), memory = memory_.contiguous(), weights = weights_.contiguous();
  const Tensor erase = erase_.contiguous(), add = add_.contiguous();
  Tensor dm = at::empty_like(memory), dw = at::empty_like(weights);
  Tensor de = at::empty_like(erase), da = at::empty_like(add);
  if (s.B == 0) return {dm, dw, de, da};
  if (s.W == 0) return {dm.copy_(g), dw, de, da};
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), nt = tiles_per_row(s.D, G);
  const int hg = static_cast<int>((s.W + kHP - 1) / kHP);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&write_bwd_kernel<decltype(t)>>();
  });
  const Split sp = plan_split(s.N, s.B * hg * nt, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_write_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    WriteBwdArgs<scalar_t> a;
    a.grad = g.data_ptr<scalar_t>();
    a.mem = memory.data_ptr<scalar_t>();
    a.w = weights.data_ptr<scalar_t>();
    a.e = erase.data_ptr<scalar_t>();
    a.ad = add.data_ptr<scalar_t>();
    a.dm = dm.data_ptr<scalar_t>();
    a.dw = dw.data_ptr<scalar_t>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.W = static_cast<int>(s.W);
    a.hgroups = hg;
    a.G = G;
    a.nsplit = sp.n;
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.grad, a.mem, a.e, a.ad, a.dm});
    Tensor pde, pda;
    if (sp.n > 1) {
      const auto opts = memory.options().dtype(acc_type(memory.scalar_type()));
      pde = at::empty({s.B * s.W, sp.n, s.D}, opts);
      pda = at::empty({s.B * s.W, sp.n, s.D}, opts);
      a.part_de = pde.data_ptr<A>();
      a.part_da = pda.data_ptr<A>();
    } else {
      a.de = de.data_ptr<scalar_t>();
      a.da = da.data_ptr<scalar_t>();
    }
    write_bwd_kernel<scalar_t><<<dim3(static_cast<unsigned>(s.B * hg), sp.n, nt), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sp.n > 1) {
      const dim3 grid = grid_1d(s.B * s.W * s.D, dev);
      sum_partials_kernel<scalar_t><<<grid, 256, 0, stream>>>(a.part_de, s.B * s.W, sp.n, a.D,
                                                               de.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t><<<grid, 256, 0, stream>>>(a.part_da, s.B * s.W, sp.n, a.D,
                                                               da.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dm, dw, de, da};
}

Tensor content_write_cuda(Tensor& memory, const std::optional<Tensor>& usage, const Tensor& keys_,
                          const Tensor& strengths_, const Tensor& erase_, const Tensor& add_, double eps,
                          double decay) {
  check_memory(memory);
  TORCH_CHECK(memory.is_contiguous(), "memory must be contiguous for the in-place write (call .contiguous() first)");
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  check_on(keys_, "keys", memory);
  check_shape(keys_, "keys", {B, -1, D}, "(B, W, D)");
  const int64_t W = keys_.size(1);
  check_on(strengths_, "strengths", memory);
  check_shape(strengths_, "strengths", {B, W}, "(B, W)");
  check_on(erase_, "erase", memory);
  check_shape(erase_, "erase", {B, W, D}, "(B, W, D)");
  check_on(add_, "add", memory);
  check_shape(add_, "add", {B, W, D}, "(B, W, D)");
  const bool has_usage = usage.has_value() && usage->defined();
  if (has_usage) {
    check_on(*usage, "usage", memory);
    check_shape(*usage, "usage", {B, N}, "(B, N)");
    TORCH_CHECK(usage->is_contiguous(), "usage must be contiguous for the in-place write");
  }
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "decay must be in [0, 1], got ", decay);
  const Tensor no_usage;
  const Tensor& u = has_usage ? *usage : no_usage;
  check_no_overlap("content_write_", memory, u,
                   {{"keys", &keys_}, {"strengths", &strengths_}, {"erase", &erase_}, {"add", &add_}});
  const c10::cuda::CUDAGuard guard(memory.device());
  const Tensor keys = keys_.contiguous(), strengths = strengths_.contiguous();
  const Tensor erase = erase_.contiguous(), add = add_.contiguous();
  Tensor least = at::empty({has_usage ? B : 0}, memory.options().dtype(at::kLong));
  if (B == 0) return least;

  if (W == 0 || W > kHP) {
    // The unfused composition (weights materialised), same semantics.
    const Tensor w = content_addressing_cuda(memory, keys, strengths, eps);
    launch_write(memory, w, erase, add, memory);
    if (has_usage) {
      launch_usage(*usage, w, decay, *usage);
      launch_argmin(*usage, least);
    }
    return least;
  }

  const int dev = memory.get_device();
  const int G = lanes_per_slot(D);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&content_write_kernel<decltype(t)>>();
  });
  const Split sp = plan_split(N, B, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_write_cuda", [&] {
    using A = acc_t<scalar_t>;
    CwArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.usage = has_usage ? usage->data_ptr<scalar_t>() : nullptr;
    a.keys = keys.data_ptr<scalar_t>();
    a.str = strengths.data_ptr<scalar_t>();
    a.erase = erase.data_ptr<scalar_t>();
    a.add = add.data_ptr<scalar_t>();
    a.least = has_usage ? least.data_ptr<int64_t>() : nullptr;
    a.N = N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(D);
    a.W = static_cast<int>(W);
    a.G = G;
    a.nsplit = sp.n;
    a.eps = static_cast<A>(eps);
    a.decay = static_cast<A>(decay);
    a.vec_ok = rows_vectorizable(D, sizeof(scalar_t), {a.mem, a.keys, a.erase, a.add});
    const dim3 grid(static_cast<unsigned>(B), sp.n);
    if (sp.n == 1) {
      a.phase = kFused;
      content_write_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const auto acc_opts = memory.options().dtype(acc_type(memory.scalar_type()));
    Tensor pm = at::empty({B * W, sp.n}, acc_opts), pl = at::empty({B * W, sp.n}, acc_opts);
    Tensor pv, pi;
    a.part_m = pm.data_ptr<A>();
    a.part_l = pl.data_ptr<A>();
    if (has_usage) {
      pv = at::empty({B, sp.n}, acc_opts);
      pi = at::empty({B, sp.n}, memory.options().dtype(at::kLong));
      a.part_min = pv.data_ptr<A>();
      a.part_idx = pi.data_ptr<int64_t>();
    }
    a.phase = kStats;
    content_write_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.phase = kUpdate;
    content_write_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (has_usage) {
      argmin_combine_kernel<A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(a.part_min, a.part_idx, sp.n,
                                                                                   a.least);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return least;
}

// The fused read-then-write step has no kernel of its own on the GPU: the
// read (one launch at small N) and the in-place write, through the
// dispatcher, so that CUDA tensors run the same op as CPU ones.
std::tuple<Tensor, Tensor, Tensor> content_read_write_cuda(Tensor& memory, const std::optional<Tensor>& usage,
                                                           const Tensor& read_keys, const Tensor& read_strengths,
                                                           const Tensor& write_keys, const Tensor& write_strengths,
                                                           const Tensor& erase, const Tensor& add, double eps,
                                                           double decay) {
  static const auto read = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("neuralmem::content_read", "")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>();
  // The read runs before the write here, but aliasing is refused as on the CPU.
  const Tensor no_usage;
  const Tensor& u = usage.has_value() && usage->defined() ? *usage : no_usage;
  check_no_overlap("content_read_write_", memory, u, {{"read_keys", &read_keys}, {"read_strengths", &read_strengths}});
  auto out = read.call(memory, read_keys, read_strengths, eps);
  Tensor least = content_write_cuda(memory, usage, write_keys, write_strengths, erase, add, eps, decay);
  return {std::get<0>(out), std::get<1>(out), least};
}

}  // namespace

TORCH_LIBRARY_IMPL(neuralmem, CUDA, m) {
  m.impl("content_read_write_", &content_read_write_cuda);
  m.impl("memory_write", &memory_write_cuda);
  m.impl("memory_write_backward", &memory_write_backward_cuda);
  m.impl("memory_write_", &memory_write_inplace_cuda);
  m.impl("usage_update", &usage_update_cuda);
  m.impl("content_write_", &content_write_cuda);
}

}  // namespace cuda
}  // namespace neuralmem

// The backward streaming kernels of the read side (included once, by
// read_kernels.cu, after its device building blocks): bwd_kernel for
// content_read and content_addressing, the per-head finish of the key and
// strength gradients, the dot of weights and gradient per split, and
// memory_read's memory gradient. The design and the gradient formulas are in
// read_kernels.cu's header.
#pragma once

namespace neuralmem {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// backward streaming kernel (content_read, or content_addressing when ADDR)
// ---------------------------------------------------------------------------
// delta = sum_n w_n dw_n is a difference of near-equal numbers wherever the
// softmax is peaked, and every gradient carries ds_n = w_n (dw_n - delta)
// times the strength. content_read's backward is defined for any reads and
// lse it is given (w_n = exp(s_n - lse), delta = g . reads: a sharded memory
// passes its global ones), but from the half-rounded reads of the forward
// (or the half weights of content_addressing) the rounding, times the
// strength, lands in every gradient. So with `stats` set the kernel
// recomputes the softmax's max M, sum L and T = sum_n exp(s_n - M) dw_n in
// float, and uses w_n = exp(s_n - M) / L and delta = T / L: for
// content_addressing (half inputs: its given weights are not read), and for
// the content_read heads whose given lse is M + log L to within lse_tol
// (relative), the others keeping the given lse and reads. The statistics
// come from a first loop of the same kernel over its slots (one split,
// kStatsFused), or from per-split partials left by a kStatsOnly launch and
// merged in split order by every block (kStatsMerged). Half inputs always
// take this form; float/double content_read over a small memory (one split
// of at most kMinChunk slots, where the second loop reads rows still in
// cache) too, which makes the one-slot gradient exactly 0 (w = 1, delta = dw).
enum BwdStats : int { kStatsNone = 0, kStatsFused = 1, kStatsMerged = 2, kStatsOnly = 3 };

template <typename T>
struct BwdArgs {
  const T* mem = nullptr;
  const T* keys = nullptr;
  const T* str = nullptr;
  const T* grad_reads = nullptr;  // (B,H,D)              content_read
  const T* reads = nullptr;       // (B,H,D)              content_read
  const acc_t<T>* lse = nullptr;  // (B,H)                content_read
  const T* weights = nullptr;     // (B,H,N)              content_addressing
  const T* grad_w = nullptr;      // (B,H,N)              content_addressing
  const acc_t<T>* delta_part = nullptr;  // [B*H][dsplit] content_addressing
  int dsplit = 1;
  T* dm_out = nullptr;             // final memory gradient (last head group)
  acc_t<T>* dm_acc = nullptr;      // running memory gradient (all but the last head group)
  const acc_t<T>* dm_prev = nullptr;  // running memory gradient of the earlier head groups
  acc_t<T>* part_dq = nullptr;     // [B*H][nsplit][D]
  acc_t<T>* part_db = nullptr;     // [B*H][nsplit]
  acc_t<T>* stat_m = nullptr;      // [B*H][nsplit] each: kStatsOnly writes, kStatsMerged reads
  acc_t<T>* stat_l = nullptr;
  acc_t<T>* stat_t = nullptr;
  int64_t N = 0, chunk = 0;
  int D = 0, H = 0, h0 = 0, G = 1, nsplit = 1, stats = kStatsNone;
  acc_t<T> eps = 0, lse_tol = 0;
  bool vec_ok = false;
};

template <typename T, bool ADDR>
__device__ __forceinline__ void load_qg(const BwdArgs<T>& a, const T* keys_h, const T* g_h, int t, const Lanes& L,
                                        unsigned vm, int hc, const acc_t<T> (&den)[kHP], acc_t<T> (&q)[kHP][kCPL],
                                        acc_t<T> (&g)[kHP][kCPL]) {
  load_heads<T, acc_t<T>, true>(keys_h, a.D, t, L, a.vec_ok, vm, den, q);
  if (!ADDR) load_heads<T, acc_t<T>, false>(g_h, a.D, t, L, a.vec_ok, (1u << hc) - 1u, den, g);
}

// One slot row: its squared norm, its dots with q (and, content_read, with
// g), and this lane's columns of tile ctile in x; q and g hold tile ctile
// afterwards.
template <typename T, bool ADDR>
__device__ __forceinline__ void bwd_scan_row(const BwdArgs<T>& a, const T* row, bool valid, const Lanes& L, int ctile,
                                             const T* keys_h, const T* g_h, unsigned vm, int hc,
                                             const acc_t<T> (&den)[kHP], acc_t<T> (&q)[kHP][kCPL],
                                             acc_t<T> (&g)[kHP][kCPL], acc_t<T> (&x)[kCPL], acc_t<T>& sq,
                                             acc_t<T> (&dot)[kHP], acc_t<T> (&gd)[kHP]) {
  using A = acc_t<T>;
  sq = 0;
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = gd[h] = 0;
#pragma unroll
  for (int i = 0; i < kCPL; ++i) x[i] = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A v[kCPL];
    load_tile(row, a.D, t, L, a.vec_ok, valid, v);
    if (L.ntiles > 1) load_qg<T, ADDR>(a, keys_h, g_h, t, L, vm, hc, den, q, g);
#pragma unroll
    for (int i = 0; i < kCPL; ++i) {
      sq += v[i] * v[i];
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        dot[h] += q[h][i] * v[i];
        if (!ADDR) gd[h] += g[h][i] * v[i];
      }
    }
    if (t == ctile) {
#pragma unroll
      for (int i = 0; i < kCPL; ++i) x[i] = v[i];
    }
  }
  sq = group_sum(sq, L.G);
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    dot[h] = group_sum(dot[h], L.G);
    if (!ADDR) gd[h] = group_sum(gd[h], L.G);
  }
  if (L.ntiles > 1) load_qg<T, ADDR>(a, keys_h, g_h, ctile, L, vm, hc, den, q, g);
}

template <typename T, bool ADDR>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kHeaviest)) bwd_kernel(const BwdArgs<T> a) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::VEC;
  const int b = blockIdx.x, split = blockIdx.y, ctile = blockIdx.z;
  const int hc = min(kHP, a.H - a.h0);
  const int D = a.D;
  const Lanes L(a.G, D);
  const int64_t bh0 = int64_t(b) * a.H + a.h0;
  const T* mem_b = a.mem + int64_t(b) * a.N * D;
  const T* keys_h = a.keys + bh0 * D;
  const T* g_h = ADDR ? nullptr : a.grad_reads + bh0 * D;

  // vm: the finite heads (see common.cuh); the others are computed as a zero
  // key of strength 0 and their gradients made NaN at the end.
  // The key norms (read only where q is loaded) and the softmax scales (one
  // broadcast read per head and row) live in shared memory: float32
  // content_read spilled at the 255-register limit with them in registers.
  __shared__ A den[kHP], wscale[kHP];
  A beta[kHP], lse[kHP], delta[kHP];
  unsigned vm = 0;
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    const bool hv = h < hc;
    const A nrm = row_norm<T, A>(keys_h + int64_t(h) * D, D, L, a.vec_ok, hv);
    const bool fin = row_finite<T, A>(keys_h + int64_t(h) * D, D, L, a.vec_ok, hv);
    const A bt = hv ? static_cast<A>(a.str[bh0 + h]) : A(0);
    const bool ok = hv && fin && finite_value(bt);
    if (ok) vm |= 1u << h;
    if (threadIdx.x == 0) {
      den[h] = ok ? dmax(nrm, a.eps) : A(1);
      wscale[h] = 1;
    }
    beta[h] = ok ? bt : A(0);
    if constexpr (ADDR) {
      lse[h] = 0;
      A s = 0;
      if (hv && a.stats == kStatsNone)
        for (int sp = 0; sp < a.dsplit; ++sp) s += a.delta_part[(bh0 + h) * a.dsplit + sp];
      delta[h] = s;
    } else {
      lse[h] = hv ? a.lse[bh0 + h] : A(0);
      delta[h] = row_dot<T, A>(g_h + int64_t(h) * D, a.reads + (bh0 + h) * D, D, L, a.vec_ok, hv);
    }
  }
  const bool all_ok = vm == (1u << hc) - 1u;
  __syncthreads();  // den, wscale

  A q[kHP][kCPL], g[kHP][kCPL], dq[kHP][kCPL], db[kHP];
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    db[h] = 0;
#pragma unroll
    for (int i = 0; i < kCPL; ++i) q[h][i] = g[h][i] = dq[h][i] = 0;
  }
  if (L.ntiles == 1) load_qg<T, ADDR>(a, keys_h, g_h, 0, L, vm, hc, den, q, g);

  const int64_t n_begin = int64_t(split) * a.chunk;
  const int64_t n_end = min(a.N, n_begin + a.chunk);
  const int S = L.nstreams();
  const int64_t iters = n_end > n_begin ? (n_end - n_begin + S - 1) / S : 0;

  if (a.stats != kStatsNone) {
    __shared__ A sh_mlt[kWarps][kHP];
    __shared__ A sh_fin[3][kHP];  // merged M, L, T per head
    if (a.stats != kStatsMerged) {
      // First loop: running (max, sum of exp, sum of exp * dw) per stream.
      A m_run[kHP], l_run[kHP], t_run[kHP];
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        m_run[h] = neg_inf<A>();
        l_run[h] = t_run[h] = 0;
      }
      for (int64_t it = 0; it < iters; ++it) {
        const int64_t n = n_begin + it * S + L.stream;
        const bool valid = n < n_end;
        A x[kCPL], sq, dot[kHP], gd[kHP];
        bwd_scan_row<T, ADDR>(a, mem_b + n * D, valid, L, ctile, keys_h, g_h, vm, hc, den, q, g, x, sq, dot, gd);
        if (!valid) continue;
        const A mden = dmax(dsqrt(sq), a.eps);
#pragma unroll
        for (int h = 0; h < kHP; ++h) {
          if (h >= hc) continue;
          const A s = beta[h] * (dot[h] / mden);
          const A dw = ADDR ? static_cast<A>(a.grad_w[(bh0 + h) * a.N + n]) : gd[h];
          if (s > m_run[h]) {
            const A sc = dexp(m_run[h] - s);
            l_run[h] = l_run[h] * sc + A(1);
            t_run[h] = t_run[h] * sc + dw;
            m_run[h] = s;
          } else {
            const A e = dexp(s - m_run[h]);
            l_run[h] += e;
            t_run[h] += e * dw;
          }
        }
      }
      // Merge the streams of the block: common max, rescaled sums, fixed order.
      A M[kHP];
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        const A mw = streams_max(m_run[h], L.G);
        if (L.lane == 0) sh_mlt[L.warp][h] = mw;
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        M[h] = sh_mlt[0][h];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) M[h] = dmax(M[h], sh_mlt[w][h]);
        const A sc = merge_scale(m_run[h], M[h]);
        l_run[h] *= sc;
        t_run[h] *= sc;
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        const A lw = streams_sum(l_run[h], L.G);
        if (L.lane == 0) sh_mlt[L.warp][h] = lw;
      }
      __syncthreads();
      if (threadIdx.x < kHP) {
        A s = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += sh_mlt[w][threadIdx.x];
        sh_fin[1][threadIdx.x] = s;
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        const A tw = streams_sum(t_run[h], L.G);
        if (L.lane == 0) sh_mlt[L.warp][h] = tw;
      }
      __syncthreads();
      if (threadIdx.x < kHP) {
        const int h = threadIdx.x;
        A s = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += sh_mlt[w][h];
        A mh = M[0];
#pragma unroll
        for (int k = 1; k < kHP; ++k)
          if (k == h) mh = M[k];
        sh_fin[0][h] = mh;
        sh_fin[2][h] = s;
        if (a.stats == kStatsOnly && ctile == 0 && h < hc) {
          a.stat_m[(bh0 + h) * a.nsplit + split] = mh;
          a.stat_l[(bh0 + h) * a.nsplit + split] = sh_fin[1][h];
          a.stat_t[(bh0 + h) * a.nsplit + split] = s;
        }
      }
      if (a.stats == kStatsOnly) return;  // uniform across the block
    } else if (threadIdx.x < hc) {
      // Merge the per-split statistics in split order (the same in every block).
      const int h = threadIdx.x;
      const int64_t r = (bh0 + h) * a.nsplit;
      A M = neg_inf<A>();
      for (int sp = 0; sp < a.nsplit; ++sp) M = dmax(M, a.stat_m[r + sp]);
      A l = 0, t = 0;
      for (int sp = 0; sp < a.nsplit; ++sp) {
        const A sc = merge_scale(a.stat_m[r + sp], M);
        l += a.stat_l[r + sp] * sc;
        t += a.stat_t[r + sp] * sc;
      }
      sh_fin[0][h] = M;
      sh_fin[1][h] = l;
      sh_fin[2][h] = t;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kHP; ++h) {
      if (h >= hc) continue;
      const A M = sh_fin[0][h], l = sh_fin[1][h];
      const A mine = M + dlog(l);
      // content_read: only where the given lse is this memory's own.
      if (ADDR || dabs(lse[h] - mine) <= a.lse_tol * (A(1) + dabs(mine))) {
        const A inv = A(1) / l;
        lse[h] = M;
        delta[h] = sh_fin[2][h] * inv;
        if (threadIdx.x == 0) wscale[h] = inv;
      }
    }
    __syncthreads();  // wscale
  }

  for (int64_t it = 0; it < iters; ++it) {
    const int64_t n = n_begin + it * S + L.stream;
    const bool valid = n < n_end;
    A x[kCPL], sq, dot[kHP], gd[kHP];
    bwd_scan_row<T, ADDR>(a, mem_b + n * D, valid, L, ctile, keys_h, g_h, vm, hc, den, q, g, x, sq, dot, gd);

    const A nm = dsqrt(sq);
    const A mden = dmax(nm, a.eps);
    const bool unclamped = nm > a.eps;
    A dmv[kCPL];
#pragma unroll
    for (int i = 0; i < kCPL; ++i) dmv[i] = 0;
    if (valid) {
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        if (h >= hc) continue;
        const A c = dot[h] / mden;
        A w, dw;
        if constexpr (ADDR) {
          w = a.stats != kStatsNone ? dexp(beta[h] * c - lse[h]) * wscale[h]
                                    : static_cast<A>(a.weights[(bh0 + h) * a.N + n]);
          dw = static_cast<A>(a.grad_w[(bh0 + h) * a.N + n]);
        } else {
          w = dexp(beta[h] * c - lse[h]) * wscale[h];
          dw = gd[h];
        }
        const A ds = w * (dw - delta[h]);
        db[h] += ds * c;
        const A r = beta[h] * ds / mden;  // dc / den
#pragma unroll
        for (int i = 0; i < kCPL; ++i) {
          if (!ADDR) dmv[i] += w * g[h][i];
          dmv[i] += r * (unclamped ? q[h][i] - c * x[i] / mden : q[h][i]);
          dq[h][i] += r * x[i];
        }
      }
      // A non-finite head's NaN weights reach every slot of its memory.
      if (!all_ok) {
#pragma unroll
        for (int i = 0; i < kCPL; ++i) dmv[i] = quiet_nan<A>();
      }
    }
    T* dm_row = a.dm_out != nullptr ? a.dm_out + (int64_t(b) * a.N + n) * D : nullptr;
    if (a.dm_prev == nullptr && a.dm_acc == nullptr) {
      store_tile(dm_row, D, ctile, L, a.vec_ok, valid, dmv);
    } else if (valid) {
#pragma unroll
      for (int i = 0; i < kCPL; ++i) {
        const int col = ctile * L.tile_cols + L.lcol<VEC>(i);
        if (col >= D) continue;
        const int64_t idx = (int64_t(b) * a.N + n) * D + col;
        const A v = dmv[i] + (a.dm_prev != nullptr ? a.dm_prev[idx] : A(0));
        if (a.dm_acc != nullptr) a.dm_acc[idx] = v;
        if (dm_row != nullptr) dm_row[col] = static_cast<T>(v);
      }
    }
  }

  // Per-split key and strength gradients, merged in a fixed order (NaN for a
  // non-finite head).
  __shared__ A sh_acc[kWarps][kHP][kMaxTile];
  __shared__ A sh_db[kWarps][kHP];
  warp_rows_of_tile(dq, L, sh_acc, VEC);
  for (int e = threadIdx.x; e < hc * L.tile_cols; e += kThreads) {
    const int h = e / L.tile_cols, c = e % L.tile_cols;
    const int col = ctile * L.tile_cols + c;
    if (col >= D) continue;
    A s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sh_acc[w][h][c];
    a.part_dq[((bh0 + h) * a.nsplit + split) * D + col] = ((vm >> h) & 1u) != 0 ? s : quiet_nan<A>();
  }
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    const A v = streams_sum(db[h], L.G);
    if (L.lane == 0) sh_db[L.warp][h] = v;
  }
  __syncthreads();
  if (ctile == 0 && threadIdx.x < hc) {
    A s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sh_db[w][threadIdx.x];
    a.part_db[(bh0 + threadIdx.x) * a.nsplit + split] = ((vm >> threadIdx.x) & 1u) != 0 ? s : quiet_nan<A>();
  }
}

// Per (b, h): sums the split partials of dq and dbeta in split order and maps
// dq through the key normalisation.
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kLight))
    bwd_finish_kernel(const T* keys, const acc_t<T>* part_dq, const acc_t<T>* part_db, int nsplit, int D,
                      acc_t<T> eps, T* dk, T* dbeta) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int64_t r = blockIdx.x;
  const T* k = keys + r * D;
  A kk = 0, dqk = 0;
  for (int col = threadIdx.x; col < D; col += kThreads) {
    A dq = 0;
    for (int s = 0; s < nsplit; ++s) dq += part_dq[(r * nsplit + s) * D + col];
    const A kv = static_cast<A>(k[col]);
    kk += kv * kv;
    dqk += dq * kv;
  }
  kk = block_sum(kk, red);
  dqk = block_sum(dqk, red);
  const A nk = dsqrt(kk);
  for (int col = threadIdx.x; col < D; col += kThreads) {
    A dq = 0;
    for (int s = 0; s < nsplit; ++s) dq += part_dq[(r * nsplit + s) * D + col];
    const A kv = static_cast<A>(k[col]);
    dk[r * D + col] = static_cast<T>(nk > eps ? (dq - dqk * kv / kk) / nk : dq / eps);
  }
  if (threadIdx.x == 0) {
    A s = 0;
    for (int sp = 0; sp < nsplit; ++sp) s += part_db[r * nsplit + sp];
    dbeta[r] = static_cast<T>(s);
  }
}

// delta[b,h] = sum_n weights * grad_weights, per split (content_addressing backward).
template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kLight))
    wdot_partial_kernel(const T* w, const T* gw, int64_t N, int64_t chunk, int nsplit, acc_t<T>* out) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int64_t r = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t begin = int64_t(split) * chunk, end = min(N, begin + chunk);
  A s = 0;
  for (int64_t n = begin + threadIdx.x; n < end; n += kThreads)
    s += static_cast<A>(w[r * N + n]) * static_cast<A>(gw[r * N + n]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[r * nsplit + split] = s;
}

// memory_read backward, memory part: dm[b,n,:] = sum_h w[b,h,n] g[b,h,:]
// (elementwise over 16-byte units of the rows).
template <typename T>
__global__ void __launch_bounds__(256)
    read_bwd_dm_kernel(const T* g, const T* w, int64_t B, int64_t N, int D, int H, bool vec_ok, T* dm) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::VEC;
  const int64_t U = (D + VEC - 1) / VEC;
  const int64_t total = B * N * U;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / (N * U), rem = u % (N * U);
    const int64_t n = rem / U;
    const int c0 = static_cast<int>(rem % U) * VEC;
    A acc[VEC], gv[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0;
    for (int h = 0; h < H; ++h) {
      const A wv = static_cast<A>(w[(b * H + h) * N + n]);
      load_unit<T, A>(g + (b * H + h) * D, c0, D, vec_ok, gv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += wv * gv[k];
    }
    store_unit<T, A>(dm + (b * N + n) * D, c0, D, vec_ok, acc);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace neuralmem

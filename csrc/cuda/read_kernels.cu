// CUDA kernels for the read side: content_addressing, memory_read,
// content_read, and their backwards (TORCH_LIBRARY_IMPL(neuralmem, CUDA)); the
// backward streaming kernels are in read_backward.cuh.
//
// Design. Addressing + read is single-query attention with L2-normalised keys,
// values = raw memory rows and a per-head temperature, so the kernels follow
// the Flash-Decoding recipe: one pass over memory with an online softmax
// (running max m, running sum l, running weighted row sum acc per head),
// memory read once for all heads of a block, weights never materialised by
// content_read. Lane geometry, 16-byte tile loads and reductions: common.cuh.
//
// Grid of every streaming kernel: x = (memory, group of kHP=4 heads),
// y = split of the slots, z = column tile (rows wider than 256 columns only).
//
// Two regimes, one code path, chosen by plan_split():
//  * small N (e.g. 128 slots, B 1..256): a split never has fewer than 1024
//    slots, so each memory (and head group) gets one block that walks all of
//    its slots and writes the final reads and logsumexp itself: content_read
//    is ONE launch, its backward two (the stream kernel, then the tiny
//    per-head key-gradient kernel). The write of the same step is one more
//    launch (write_kernels.cu), so read-then-write is two launches.
//  * large N (1e6..1e8): the slots are split across blocks, as many as fill
//    the SMs (kBlocksPerSM blocks per SM over all memories and head groups);
//    each block leaves a partial (max, sum, acc) and combine_kernel merges the
//    partials of a head in a fixed order. Loads are 16-byte vectors when every
//    row is aligned. The backward never uses float atomics: every block writes
//    its own partial key/strength gradients, reduced in split order by
//    bwd_finish_kernel, so gradients are bitwise reproducible; memory
//    gradients are per slot and written exactly once.
//
// Backward of content_read (content_addressing is the same with dw given and
// delta = sum_n w_n dw_n): q = k / max(|k|, eps), den_n = max(|m_n|, eps),
// c_n = q.m_n / den_n, s_n = beta c_n, w_n = exp(s_n - lse) (recomputed, never
// stored); dw_n = g.m_n, delta = g.r, ds_n = w_n (dw_n - delta);
// dbeta = sum_n ds_n c_n; dc_n = beta ds_n; dm_n = w_n g + dc_n / den_n *
// (q - c_n m_n / den_n) (just q when |m_n| <= eps, where the norm is clamped);
// dq = sum_n dc_n m_n / den_n; dk = (dq - (dq.q) q) / |k| (dq / eps when
// |k| <= eps). Heads beyond the first four are handled by further launches that
// add to the memory gradient in launch order (still deterministic). Half
// inputs (and small float memories) recompute the softmax's statistics and
// delta in float instead of taking them from the half reads or weights, see
// BwdStats; a head with a non-finite strength or key gets NaN outputs and
// gradients, as the reference formula gives (common.cuh).
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace neuralmem {
namespace cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// device building blocks
// ---------------------------------------------------------------------------

// |v| of a (B,H,D) row, the same value in every lane of the stream.
template <typename T, typename A>
__device__ __forceinline__ A row_norm(const T* row, int D, const Lanes& L, bool vec_ok, bool valid) {
  A s = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A v[kCPL];
    load_tile(row, D, t, L, vec_ok, valid, v);
#pragma unroll
    for (int i = 0; i < kCPL; ++i) s += v[i] * v[i];
  }
  return dsqrt(group_sum(s, L.G));
}

template <typename T, typename A>
__device__ __forceinline__ A row_dot(const T* r1, const T* r2, int D, const Lanes& L, bool vec_ok, bool valid) {
  A s = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A u[kCPL], v[kCPL];
    load_tile(r1, D, t, L, vec_ok, valid, u);
    load_tile(r2, D, t, L, vec_ok, valid, v);
#pragma unroll
    for (int i = 0; i < kCPL; ++i) s += u[i] * v[i];
  }
  return group_sum(s, L.G);
}

// Tile t of the block's head vectors (rows h0.. of a (B,H,D) tensor; zeros
// for the heads not in the bit mask vm), divided by den[h] when NORMALIZE
// (q = k / max(|k|, eps), as F.normalize).
template <typename T, typename A, bool NORMALIZE>
__device__ __forceinline__ void load_heads(const T* heads, int D, int t, const Lanes& L, bool vec_ok, unsigned vm,
                                           const A (&den)[kHP], A (&q)[kHP][kCPL]) {
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    load_tile(heads + int64_t(h) * D, D, t, L, vec_ok, ((vm >> h) & 1u) != 0, q[h]);
    if (NORMALIZE) {
#pragma unroll
      for (int i = 0; i < kCPL; ++i) q[h][i] = q[h][i] / den[h];
    }
  }
}

// One slot row: its squared norm, its dot products with the head vectors q,
// and this lane's columns of tile `keep` in x. For rows of several tiles q is
// reloaded per tile and holds the last tile afterwards.
template <typename T, typename A, bool NORMALIZE>
__device__ __forceinline__ void scan_row(const T* row, bool valid, int D, const Lanes& L, bool vec_ok, int keep,
                                         const T* heads, unsigned vm, const A (&den)[kHP], A (&q)[kHP][kCPL],
                                         A (&x)[kCPL], A& sq, A (&dot)[kHP]) {
  sq = 0;
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = 0;
#pragma unroll
  for (int i = 0; i < kCPL; ++i) x[i] = 0;
  for (int t = 0; t < L.ntiles; ++t) {
    A v[kCPL];
    load_tile(row, D, t, L, vec_ok, valid, v);
    if (L.ntiles > 1) load_heads<T, A, NORMALIZE>(heads, D, t, L, vec_ok, vm, den, q);
    tile_dots(v, q, sq, dot);
    if (t == keep) {
#pragma unroll
      for (int i = 0; i < kCPL; ++i) x[i] = v[i];
    }
  }
  sq = group_sum(sq, L.G);
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = group_sum(dot[h], L.G);
}

// scan_row of a one-tile row already loaded into x (the unrolled loops).
template <typename A>
__device__ __forceinline__ void scan_loaded_row(const A (&x)[kCPL], const Lanes& L, const A (&q)[kHP][kCPL], A& sq,
                                                A (&dot)[kHP]) {
  sq = 0;
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = 0;
  tile_dots(x, q, sq, dot);
  sq = group_sum(sq, L.G);
#pragma unroll
  for (int h = 0; h < kHP; ++h) dot[h] = group_sum(dot[h], L.G);
}

// ---------------------------------------------------------------------------
// forward streaming kernel
// ---------------------------------------------------------------------------
enum FwdMode : int {
  kContentRead = 0,  // online softmax of the content logits + weighted row sum -> reads, lse
  kLse = 1,          // online softmax statistics only -> lse
  kWeights = 2,      // exp(logit - lse) written to (B,H,N)
  kMemoryRead = 3,   // weighted row sum with given weights -> reads
  kDots = 4,         // raw dot products with given (B,H,D) vectors -> (B,H,N)
};

template <typename T>
struct FwdArgs {
  const T* mem = nullptr;      // (B,N,D)
  const T* vecs = nullptr;     // keys (content modes) or grad_reads (kDots), (B,H,D)
  const T* str = nullptr;      // (B,H)
  const T* weights = nullptr;  // (B,H,N), kMemoryRead
  const acc_t<T>* lse_in = nullptr;  // (B,H), kWeights
  T* out = nullptr;            // reads (B,H,D) when nsplit == 1, or weights/dots (B,H,N)
  acc_t<T>* lse_out = nullptr;  // (B,H) when nsplit == 1
  acc_t<T>* part_m = nullptr;   // [B*H][nsplit]
  acc_t<T>* part_l = nullptr;   // [B*H][nsplit]
  acc_t<T>* part_acc = nullptr;  // [B*H][nsplit][D]
  int64_t N = 0, chunk = 0;
  int D = 0, H = 0, hgroups = 1, G = 1, nsplit = 1;
  acc_t<T> eps = 0;
  bool vec_ok = false;
};

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kHeaviest)) fwd_kernel(const FwdArgs<T> a) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::VEC;
  constexpr bool kNorm = MODE == kContentRead || MODE == kLse || MODE == kWeights;
  constexpr bool kNeedDots = MODE != kMemoryRead;
  constexpr bool kSoftmax = MODE == kContentRead || MODE == kLse;
  constexpr bool kAcc = MODE == kContentRead || MODE == kMemoryRead;

  const int b = blockIdx.x / a.hgroups;
  const int h0 = (blockIdx.x % a.hgroups) * kHP;
  const int hc = min(kHP, a.H - h0);
  const int split = blockIdx.y, ctile = blockIdx.z;
  const int D = a.D;
  const Lanes L(a.G, D);
  const int64_t bh0 = int64_t(b) * a.H + h0;
  const T* mem_b = a.mem + int64_t(b) * a.N * D;
  const T* heads = kNeedDots ? a.vecs + bh0 * D : nullptr;

  A den[kHP], beta[kHP], lse[kHP];
  // vm: the heads whose vectors are loaded; with keys, only the finite heads
  // (the others are computed as a zero key of strength 0, see common.cuh).
  unsigned vm = (1u << hc) - 1u;
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    den[h] = 1;
    beta[h] = 0;
    lse[h] = 0;
    if (kNorm) {
      const A nrm = row_norm<T, A>(heads + int64_t(h) * D, D, L, a.vec_ok, h < hc);
      const bool fin = row_finite<T, A>(heads + int64_t(h) * D, D, L, a.vec_ok, h < hc);
      const A b = h < hc ? static_cast<A>(a.str[bh0 + h]) : A(0);
      if (h < hc && fin && finite_value(b)) {
        den[h] = dmax(nrm, a.eps);
        beta[h] = b;
      } else {
        vm &= ~(1u << h);
      }
    }
    if (MODE == kWeights && h < hc) lse[h] = a.lse_in[bh0 + h];
  }

  A q[kHP][kCPL];
#pragma unroll
  for (int h = 0; h < kHP; ++h)
#pragma unroll
    for (int i = 0; i < kCPL; ++i) q[h][i] = 0;
  if (kNeedDots && L.ntiles == 1) load_heads<T, A, kNorm>(heads, D, 0, L, a.vec_ok, vm, den, q);

  A m_run[kHP], l_run[kHP], acc[kHP][kCPL];
#pragma unroll
  for (int h = 0; h < kHP; ++h) {
    m_run[h] = kSoftmax ? neg_inf<A>() : A(0);
    l_run[h] = 0;
#pragma unroll
    for (int i = 0; i < kCPL; ++i) acc[h][i] = 0;
  }

  const int64_t n_begin = int64_t(split) * a.chunk;
  const int64_t n_end = min(a.N, n_begin + a.chunk);
  const int S = L.nstreams();
  const int64_t iters = n_end > n_begin ? (n_end - n_begin + S - 1) / S : 0;
  // What one row adds, rows in slot order: x its kept tile, sq and dot its
  // squared norm and dot products (content modes).
  auto use_row = [&](int64_t n, bool valid, const A (&x)[kCPL], A sq, const A (&dot)[kHP]) {
    if constexpr (kSoftmax) {
      const A mden = dmax(dsqrt(sq), a.eps);
      if (valid) {
#pragma unroll
        for (int h = 0; h < kHP; ++h) {
          if (h >= hc) continue;
          const A s = beta[h] * (dot[h] / mden);
          if (s > m_run[h]) {  // new running max: rescale what was summed so far
            const A sc = dexp(m_run[h] - s);
            l_run[h] = l_run[h] * sc + A(1);
            if (kAcc) {
#pragma unroll
              for (int i = 0; i < kCPL; ++i) acc[h][i] = acc[h][i] * sc + x[i];
            }
            m_run[h] = s;
          } else {
            const A e = dexp(s - m_run[h]);
            l_run[h] += e;
            if (kAcc) {
#pragma unroll
              for (int i = 0; i < kCPL; ++i) acc[h][i] += e * x[i];
            }
          }
        }
      }
    } else if constexpr (MODE == kWeights) {
      const A mden = dmax(dsqrt(sq), a.eps);
      if (valid && L.lig == 0) {
#pragma unroll
        for (int h = 0; h < kHP; ++h)
          if (h < hc) a.out[(bh0 + h) * a.N + n] = static_cast<T>(dexp(beta[h] * (dot[h] / mden) - lse[h]));
      }
    } else if constexpr (MODE == kDots) {
      if (valid && L.lig == 0) {
#pragma unroll
        for (int h = 0; h < kHP; ++h)
          if (h < hc) a.out[(bh0 + h) * a.N + n] = static_cast<T>(dot[h]);
      }
    } else {  // kMemoryRead
      if (valid) {
#pragma unroll
        for (int h = 0; h < kHP; ++h) {
          if (h >= hc) continue;
          const A w = static_cast<A>(a.weights[(bh0 + h) * a.N + n]);
#pragma unroll
          for (int i = 0; i < kCPL; ++i) acc[h][i] += w * x[i];
        }
      }
    }
  };
  // unroll_rows<T>() rows per stream in flight (kUnrollBytes, common.cuh):
  // their loads first, then their use in slot order; VEC_OK chooses the
  // kind of load at compile time.
  auto unrolled = [&](auto vec_ok) {
    constexpr int U = unroll_rows<T>();
    for (int64_t it = 0; it < iters; it += U) {
      RawTile<T> raw[U];
      load_raw_rows<decltype(vec_ok)::value, U>(mem_b, n_begin, it, S, n_end, D, L, raw);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t n = n_begin + (it + u) * S + L.stream;
        A x[kCPL], sq = 0, dot[kHP] = {};
        widen_tile(raw[u], x);
        if constexpr (kNeedDots) scan_loaded_row(x, L, q, sq, dot);
        use_row(n, n < n_end, x, sq, dot);
      }
    }
  };
  if (L.ntiles == 1) {
    if (a.vec_ok) {
      unrolled(std::true_type{});
    } else {
      unrolled(std::false_type{});
    }
  } else {
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t n = n_begin + it * S + L.stream;
      const bool valid = n < n_end;
      const T* row = mem_b + n * D;
      A x[kCPL], sq = 0, dot[kHP] = {};
      if constexpr (kNeedDots) {
        scan_row<T, A, kNorm>(row, valid, D, L, a.vec_ok, ctile, heads, vm, den, q, x, sq, dot);
      } else {
        load_tile(row, D, ctile, L, a.vec_ok, valid, x);
      }
      use_row(n, valid, x, sq, dot);
    }
  }

  if constexpr (kSoftmax || kAcc) {
    // Merge the streams of the block: common max, rescaled sums, fixed order.
    __shared__ A sh_stat[kWarps][kHP];
    __shared__ A sh_res[2][kHP];  // block max and sum per head
    if constexpr (kSoftmax) {
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        const A mw = streams_max(m_run[h], L.G);
        if (L.lane == 0) sh_stat[L.warp][h] = mw;
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        A M = sh_stat[0][h];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) M = dmax(M, sh_stat[w][h]);
        const A sc = merge_scale(m_run[h], M);
        l_run[h] *= sc;
        if (kAcc) {
#pragma unroll
          for (int i = 0; i < kCPL; ++i) acc[h][i] *= sc;
        }
        if (threadIdx.x == 0) sh_res[0][h] = M;
      }
      __syncthreads();  // sh_stat is reused below
#pragma unroll
      for (int h = 0; h < kHP; ++h) {
        const A lw = streams_sum(l_run[h], L.G);
        if (L.lane == 0) sh_stat[L.warp][h] = lw;
      }
      __syncthreads();
      if (threadIdx.x < kHP) {
        A s = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += sh_stat[w][threadIdx.x];
        // A non-finite head: a NaN sum makes its reads and lse NaN, here or
        // after the combine (and its weights, through the lse).
        sh_res[1][threadIdx.x] = ((vm >> threadIdx.x) & 1u) != 0 ? s : quiet_nan<A>();
      }
      __syncthreads();
    }
    if constexpr (kAcc) {
      __shared__ A sh_acc[kWarps][kHP][kMaxTile];
      warp_rows_of_tile(acc, L, sh_acc, VEC);
      for (int e = threadIdx.x; e < hc * L.tile_cols; e += kThreads) {
        const int h = e / L.tile_cols, c = e % L.tile_cols;
        const int col = ctile * L.tile_cols + c;
        if (col >= D) continue;
        A s = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += sh_acc[w][h][c];
        if (a.nsplit == 1) {
          a.out[(bh0 + h) * D + col] = static_cast<T>(kSoftmax ? s / sh_res[1][h] : s);
        } else {
          a.part_acc[((bh0 + h) * a.nsplit + split) * D + col] = s;
        }
      }
    }
    if constexpr (kSoftmax) {
      if (ctile == 0 && threadIdx.x < hc) {
        const int h = threadIdx.x;
        if (a.nsplit == 1) {
          a.lse_out[bh0 + h] = sh_res[0][h] + dlog(sh_res[1][h]);
        } else {
          a.part_m[(bh0 + h) * a.nsplit + split] = sh_res[0][h];
          a.part_l[(bh0 + h) * a.nsplit + split] = sh_res[1][h];
        }
      }
    }
  }
}

// Second Flash-Decoding step: merges the per-split partials of one (b, h) in
// split order. SOFTMAX: rescale by exp(m_s - M), divide by the merged sum and
// write lse; otherwise a plain sum (memory_read). out may be null (lse only).
template <typename T, bool SOFTMAX>
__global__ void __launch_bounds__(kThreads, min_blocks<T>(kLight))
    combine_kernel(const acc_t<T>* pm, const acc_t<T>* pl, const acc_t<T>* pacc, int nsplit, int D, T* out,
                   acc_t<T>* lse_out) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* scale = reinterpret_cast<A*>(smem_raw);  // nsplit entries (SOFTMAX only)
  __shared__ A red[kWarps];
  const int64_t r = blockIdx.x;
  A L = 1;
  if constexpr (SOFTMAX) {
    A m = neg_inf<A>();
    for (int s = threadIdx.x; s < nsplit; s += kThreads) m = dmax(m, pm[r * nsplit + s]);
    const A M = block_max(m, red);
    for (int s = threadIdx.x; s < nsplit; s += kThreads) scale[s] = merge_scale(pm[r * nsplit + s], M);
    __syncthreads();
    L = 0;
    for (int s = 0; s < nsplit; ++s) L += pl[r * nsplit + s] * scale[s];
    if (threadIdx.x == 0) lse_out[r] = M + dlog(L);
  }
  if (out == nullptr) return;
  for (int col = threadIdx.x; col < D; col += kThreads) {
    A s = 0;
    for (int sp = 0; sp < nsplit; ++sp) {
      const A v = pacc[(r * nsplit + sp) * D + col];
      s += SOFTMAX ? v * scale[sp] : v;
    }
    out[r * D + col] = static_cast<T>(SOFTMAX ? s / L : s);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace neuralmem

#include "read_backward.cuh"

namespace neuralmem {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------
struct KeyShapes {
  int64_t B, N, D, H;
};

KeyShapes check_keys(const Tensor& memory, const Tensor& keys, const Tensor& strengths, double eps) {
  check_memory(memory);
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  check_on(keys, "keys", memory);
  check_shape(keys, "keys", {B, -1, D}, "(B, H, D)");
  const int64_t H = keys.size(1);
  check_on(strengths, "strengths", memory);
  check_shape(strengths, "strengths", {B, H}, "(B, H)");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  return {B, N, D, H};
}

int head_groups(int64_t H) { return static_cast<int>((H + kHP - 1) / kHP); }

}  // namespace

Tensor content_addressing_cuda(const Tensor& memory_, const Tensor& keys_, const Tensor& strengths_, double eps) {
  const auto s = check_keys(memory_, keys_, strengths_, eps);
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), keys = keys_.contiguous(), strengths = strengths_.contiguous();
  Tensor weights = at::empty({s.B, s.H, s.N}, memory.options());
  if (weights.numel() == 0) return weights;
  Tensor lse = at::empty({s.B, s.H}, memory.options().dtype(acc_type(memory.scalar_type())));
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), hg = head_groups(s.H);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    using T = decltype(t);
    return std::min(occupancy<&fwd_kernel<T, kLse>>(), occupancy<&fwd_kernel<T, kWeights>>());
  });
  const Split sp = plan_split(s.N, s.B * hg, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_addressing_cuda", [&] {
    using A = acc_t<scalar_t>;
    FwdArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.vecs = keys.data_ptr<scalar_t>();
    a.str = strengths.data_ptr<scalar_t>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.H = static_cast<int>(s.H);
    a.hgroups = hg;
    a.G = G;
    a.nsplit = sp.n;
    a.eps = static_cast<A>(eps);
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.mem, a.vecs});
    Tensor pm, pl;
    if (sp.n > 1) {
      pm = at::empty({s.B * s.H, sp.n}, lse.options());
      pl = at::empty({s.B * s.H, sp.n}, lse.options());
      a.part_m = pm.data_ptr<A>();
      a.part_l = pl.data_ptr<A>();
    } else {
      a.lse_out = lse.data_ptr<A>();
    }
    const dim3 grid(static_cast<unsigned>(s.B * hg), sp.n, 1);
    fwd_kernel<scalar_t, kLse><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sp.n > 1) {
      combine_kernel<scalar_t, true><<<static_cast<unsigned>(s.B * s.H), kThreads, sp.n * sizeof(A), stream>>>(
          a.part_m, a.part_l, nullptr, sp.n, a.D, nullptr, lse.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    FwdArgs<scalar_t> w = a;
    w.lse_in = lse.data_ptr<A>();
    w.out = weights.data_ptr<scalar_t>();
    fwd_kernel<scalar_t, kWeights><<<grid, kThreads, 0, stream>>>(w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return weights;
}

namespace {

std::tuple<Tensor, Tensor> content_read_cuda(const Tensor& memory_, const Tensor& keys_, const Tensor& strengths_,
                                             double eps) {
  const auto s = check_keys(memory_, keys_, strengths_, eps);
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), keys = keys_.contiguous(), strengths = strengths_.contiguous();
  Tensor reads = at::empty({s.B, s.H, s.D}, memory.options());
  Tensor lse = at::empty({s.B, s.H}, memory.options().dtype(acc_type(memory.scalar_type())));
  if (reads.numel() == 0) return {reads, lse};
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), hg = head_groups(s.H), nt = tiles_per_row(s.D, G);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&fwd_kernel<decltype(t), kContentRead>>();
  });
  const Split sp = plan_split(s.N, s.B * hg * nt, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_read_cuda", [&] {
    using A = acc_t<scalar_t>;
    FwdArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.vecs = keys.data_ptr<scalar_t>();
    a.str = strengths.data_ptr<scalar_t>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.H = static_cast<int>(s.H);
    a.hgroups = hg;
    a.G = G;
    a.nsplit = sp.n;
    a.eps = static_cast<A>(eps);
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.mem, a.vecs});
    Tensor pm, pl, pacc;
    if (sp.n > 1) {
      pm = at::empty({s.B * s.H, sp.n}, lse.options());
      pl = at::empty({s.B * s.H, sp.n}, lse.options());
      pacc = at::empty({s.B * s.H, sp.n, s.D}, lse.options());
      a.part_m = pm.data_ptr<A>();
      a.part_l = pl.data_ptr<A>();
      a.part_acc = pacc.data_ptr<A>();
    } else {
      a.out = reads.data_ptr<scalar_t>();
      a.lse_out = lse.data_ptr<A>();
    }
    const dim3 grid(static_cast<unsigned>(s.B * hg), sp.n, nt);
    fwd_kernel<scalar_t, kContentRead><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sp.n > 1) {
      combine_kernel<scalar_t, true><<<static_cast<unsigned>(s.B * s.H), kThreads, sp.n * sizeof(A), stream>>>(
          a.part_m, a.part_l, a.part_acc, sp.n, a.D, reads.data_ptr<scalar_t>(), lse.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {reads, lse};
}

// Whether a backward recomputes the softmax statistics (see BwdStats): half
// inputs always; float/double content_read over one split of at most
// kMinChunk slots. Returns the kStats* mode.
int backward_stats(at::ScalarType st, bool addr, int64_t N, int nsplit) {
  const bool half = st == at::kHalf || st == at::kBFloat16;
  if (!half && (addr || nsplit > 1 || N > kMinChunk)) return kStatsNone;
  return nsplit == 1 ? kStatsFused : kStatsMerged;
}

// Shared tail of both backwards: the stream kernel per head group (memory
// gradient accumulated across groups in launch order; with merged statistics
// a statistics launch first), then the finish kernel.
template <typename scalar_t, bool ADDR>
void launch_backward(BwdArgs<scalar_t> a, const KeyShapes& s, int nt, const Tensor& memory, const Tensor& keys,
                     const Tensor& dm, const Tensor& dk, const Tensor& dbeta, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  const auto acc_opts = memory.options().dtype(acc_type(memory.scalar_type()));
  Tensor part_dq = at::empty({s.B * s.H, a.nsplit, s.D}, acc_opts);
  Tensor part_db = at::empty({s.B * s.H, a.nsplit}, acc_opts);
  a.part_dq = part_dq.data_ptr<A>();
  a.part_db = part_db.data_ptr<A>();
  a.lse_tol = static_cast<A>(std::is_same_v<A, double> ? 0x1p-44 : 0x1p-19);
  Tensor stats;
  if (a.stats == kStatsMerged) {
    stats = at::empty({3, s.B * s.H, a.nsplit}, acc_opts);
    a.stat_m = stats[0].data_ptr<A>();
    a.stat_l = stats[1].data_ptr<A>();
    a.stat_t = stats[2].data_ptr<A>();
  }
  const int hg = head_groups(s.H);
  Tensor running;
  if (hg > 1) running = at::empty({s.B, s.N, s.D}, acc_opts);
  const dim3 grid(static_cast<unsigned>(s.B), a.nsplit, nt);
  for (int g = 0; g < hg; ++g) {
    BwdArgs<scalar_t> ag = a;
    ag.h0 = g * kHP;
    ag.dm_prev = g > 0 ? running.data_ptr<A>() : nullptr;
    ag.dm_acc = g < hg - 1 ? running.data_ptr<A>() : nullptr;
    ag.dm_out = g == hg - 1 ? dm.data_ptr<scalar_t>() : nullptr;
    if (a.stats == kStatsMerged) {
      BwdArgs<scalar_t> st = ag;
      st.stats = kStatsOnly;
      bwd_kernel<scalar_t, ADDR><<<dim3(static_cast<unsigned>(s.B), a.nsplit, 1), kThreads, 0, stream>>>(st);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    bwd_kernel<scalar_t, ADDR><<<grid, kThreads, 0, stream>>>(ag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bwd_finish_kernel<scalar_t><<<static_cast<unsigned>(s.B * s.H), kThreads, 0, stream>>>(
      keys.data_ptr<scalar_t>(), a.part_dq, a.part_db, a.nsplit, a.D, a.eps, dk.data_ptr<scalar_t>(),
      dbeta.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> content_read_backward_cuda(const Tensor& grad_reads_, const Tensor& reads_,
                                                              const Tensor& lse_, const Tensor& memory_,
                                                              const Tensor& keys_, const Tensor& strengths_,
                                                              double eps) {
  const auto s = check_keys(memory_, keys_, strengths_, eps);
  check_on(grad_reads_, "grad_reads", memory_);
  check_shape(grad_reads_, "grad_reads", {s.B, s.H, s.D}, "(B, H, D)");
  check_on(reads_, "reads", memory_);
  check_shape(reads_, "reads", {s.B, s.H, s.D}, "(B, H, D)");
  TORCH_CHECK(lse_.is_cuda() && lse_.device() == memory_.device(), "lse must be on ", memory_.device(), ", got ",
              lse_.device());
  check_shape(lse_, "lse", {s.B, s.H}, "(B, H)");
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), keys = keys_.contiguous(), strengths = strengths_.contiguous();
  const Tensor grad_reads = grad_reads_.contiguous(), reads = reads_.contiguous();
  const Tensor lse = lse_.to(acc_type(memory.scalar_type())).contiguous();
  Tensor dm = at::empty_like(memory), dk = at::empty_like(keys), dbeta = at::empty_like(strengths);
  if (s.B == 0) return {dm, dk, dbeta};
  if (s.H == 0) return {dm.zero_(), dk, dbeta};
  const int G = lanes_per_slot(s.D), nt = tiles_per_row(s.D, G);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&bwd_kernel<decltype(t), false>>();
  });
  const Split sp = plan_split(s.N, s.B * nt, memory.get_device(), per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "content_read_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    BwdArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.keys = keys.data_ptr<scalar_t>();
    a.str = strengths.data_ptr<scalar_t>();
    a.grad_reads = grad_reads.data_ptr<scalar_t>();
    a.reads = reads.data_ptr<scalar_t>();
    a.lse = lse.data_ptr<A>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.H = static_cast<int>(s.H);
    a.G = G;
    a.nsplit = sp.n;
    a.eps = static_cast<A>(eps);
    a.stats = backward_stats(memory.scalar_type(), false, s.N, sp.n);
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t),
                                 {a.mem, a.keys, a.grad_reads, a.reads, dm.data_ptr<scalar_t>()});
    launch_backward<scalar_t, false>(a, s, nt, memory, keys, dm, dk, dbeta, stream);
  });
  return {dm, dk, dbeta};
}

std::tuple<Tensor, Tensor, Tensor> content_addressing_backward_cuda(const Tensor& grad_weights_,
                                                                    const Tensor& weights_, const Tensor& memory_,
                                                                    const Tensor& keys_, const Tensor& strengths_,
                                                                    double eps) {
  const auto s = check_keys(memory_, keys_, strengths_, eps);
  check_on(grad_weights_, "grad_weights", memory_);
  check_shape(grad_weights_, "grad_weights", {s.B, s.H, s.N}, "(B, H, N)");
  check_on(weights_, "weights", memory_);
  check_shape(weights_, "weights", {s.B, s.H, s.N}, "(B, H, N)");
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), keys = keys_.contiguous(), strengths = strengths_.contiguous();
  const Tensor grad_w = grad_weights_.contiguous(), weights = weights_.contiguous();
  Tensor dm = at::empty_like(memory), dk = at::empty_like(keys), dbeta = at::empty_like(strengths);
  if (s.B == 0) return {dm, dk, dbeta};
  if (s.H == 0) return {dm.zero_(), dk, dbeta};
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), nt = tiles_per_row(s.D, G);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&bwd_kernel<decltype(t), true>>();
  });
  const Split sp = plan_split(s.N, s.B * nt, dev, per_sm);
  const Split dsp = plan_split(s.N, s.B * s.H, dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, memory.scalar_type(), "content_addressing_backward_cuda", [&] {
        using A = acc_t<scalar_t>;
        const int stats = backward_stats(memory.scalar_type(), true, s.N, sp.n);
        Tensor delta_part = at::empty({s.B * s.H, dsp.n}, memory.options().dtype(acc_type(memory.scalar_type())));
        if (stats == kStatsNone) {  // else delta comes with the recomputed weights
          wdot_partial_kernel<scalar_t><<<dim3(static_cast<unsigned>(s.B * s.H), dsp.n), kThreads, 0, stream>>>(
              weights.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), s.N, dsp.chunk, dsp.n,
              delta_part.data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        BwdArgs<scalar_t> a;
        a.stats = stats;
        a.mem = memory.data_ptr<scalar_t>();
        a.keys = keys.data_ptr<scalar_t>();
        a.str = strengths.data_ptr<scalar_t>();
        a.weights = weights.data_ptr<scalar_t>();
        a.grad_w = grad_w.data_ptr<scalar_t>();
        a.delta_part = delta_part.data_ptr<A>();
        a.dsplit = dsp.n;
        a.N = s.N;
        a.chunk = sp.chunk;
        a.D = static_cast<int>(s.D);
        a.H = static_cast<int>(s.H);
        a.G = G;
        a.nsplit = sp.n;
        a.eps = static_cast<A>(eps);
        a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.mem, a.keys, dm.data_ptr<scalar_t>()});
        launch_backward<scalar_t, true>(a, s, nt, memory, keys, dm, dk, dbeta, stream);
      });
  return {dm, dk, dbeta};
}

struct WeightShapes {
  int64_t B, N, D, H;
};

WeightShapes check_read(const Tensor& memory, const Tensor& weights) {
  check_memory(memory);
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  check_on(weights, "weights", memory);
  check_shape(weights, "weights", {B, -1, N}, "(B, H, N)");
  return {B, N, D, weights.size(1)};
}

Tensor memory_read_cuda(const Tensor& memory_, const Tensor& weights_) {
  const auto s = check_read(memory_, weights_);
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), weights = weights_.contiguous();
  Tensor reads = at::empty({s.B, s.H, s.D}, memory.options());
  if (reads.numel() == 0) return reads;
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), hg = head_groups(s.H), nt = tiles_per_row(s.D, G);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&fwd_kernel<decltype(t), kMemoryRead>>();
  });
  const Split sp = plan_split(s.N, s.B * hg * nt, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_read_cuda", [&] {
    using A = acc_t<scalar_t>;
    FwdArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.weights = weights.data_ptr<scalar_t>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.H = static_cast<int>(s.H);
    a.hgroups = hg;
    a.G = G;
    a.nsplit = sp.n;
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.mem});
    Tensor pacc;
    if (sp.n > 1) {
      pacc = at::empty({s.B * s.H, sp.n, s.D}, memory.options().dtype(acc_type(memory.scalar_type())));
      a.part_acc = pacc.data_ptr<A>();
    } else {
      a.out = reads.data_ptr<scalar_t>();
    }
    const dim3 grid(static_cast<unsigned>(s.B * hg), sp.n, nt);
    fwd_kernel<scalar_t, kMemoryRead><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sp.n > 1) {
      combine_kernel<scalar_t, false><<<static_cast<unsigned>(s.B * s.H), kThreads, 0, stream>>>(
          nullptr, nullptr, a.part_acc, sp.n, a.D, reads.data_ptr<scalar_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return reads;
}

std::tuple<Tensor, Tensor> memory_read_backward_cuda(const Tensor& grad_reads_, const Tensor& memory_,
                                                     const Tensor& weights_) {
  const auto s = check_read(memory_, weights_);
  check_on(grad_reads_, "grad_reads", memory_);
  check_shape(grad_reads_, "grad_reads", {s.B, s.H, s.D}, "(B, H, D)");
  const c10::cuda::CUDAGuard guard(memory_.device());
  const Tensor memory = memory_.contiguous(), weights = weights_.contiguous(), g = grad_reads_.contiguous();
  Tensor dm = at::empty_like(memory), dw = at::empty_like(weights);
  if (s.B == 0) return {dm, dw};
  if (s.H == 0) return {dm.zero_(), dw};
  const int dev = memory.get_device();
  const int G = lanes_per_slot(s.D), hg = head_groups(s.H);
  const int per_sm = occupancy_for(memory.scalar_type(), [](auto t) {
    return occupancy<&fwd_kernel<decltype(t), kDots>>();
  });
  const Split sp = plan_split(s.N, s.B * hg, dev, per_sm);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_read_backward_cuda", [&] {
    FwdArgs<scalar_t> a;
    a.mem = memory.data_ptr<scalar_t>();
    a.vecs = g.data_ptr<scalar_t>();
    a.out = dw.data_ptr<scalar_t>();
    a.N = s.N;
    a.chunk = sp.chunk;
    a.D = static_cast<int>(s.D);
    a.H = static_cast<int>(s.H);
    a.hgroups = hg;
    a.G = G;
    a.nsplit = sp.n;
    a.vec_ok = rows_vectorizable(s.D, sizeof(scalar_t), {a.mem, a.vecs});
    fwd_kernel<scalar_t, kDots><<<dim3(static_cast<unsigned>(s.B * hg), sp.n, 1), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const bool vec_dm = rows_vectorizable(s.D, sizeof(scalar_t), {a.vecs, dm.data_ptr<scalar_t>()});
    const int64_t units = s.B * s.N * ((s.D + Vec<scalar_t>::VEC - 1) / Vec<scalar_t>::VEC);
    read_bwd_dm_kernel<scalar_t><<<grid_1d(units, dev), 256, 0, stream>>>(
        a.vecs, weights.data_ptr<scalar_t>(), s.B, s.N, a.D, a.H, vec_dm, dm.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dm, dw};
}

// grad_memory=false: the CUDA kernels still compute the memory's gradient
// (one pass either way) and return an empty tensor in its place, as the CPU
// kernel does.
std::tuple<Tensor, Tensor, Tensor> content_read_backward_masked_cuda(const Tensor& grad_reads, const Tensor& reads,
                                                                     const Tensor& lse, const Tensor& memory,
                                                                     const Tensor& keys, const Tensor& strengths,
                                                                     double eps, bool grad_memory) {
  auto out = content_read_backward_cuda(grad_reads, reads, lse, memory, keys, strengths, eps);
  if (!grad_memory) std::get<0>(out) = at::empty({0}, memory.options());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neuralmem, CUDA, m) {
  m.impl("content_addressing", &content_addressing_cuda);
  m.impl("content_addressing_backward", &content_addressing_backward_cuda);
  m.impl("memory_read", &memory_read_cuda);
  m.impl("memory_read_backward", &memory_read_backward_cuda);
  m.impl("content_read", &content_read_cuda);
  m.impl("content_read_backward", &content_read_backward_masked_cuda);
}

}  // namespace cuda
}  // namespace neuralmem

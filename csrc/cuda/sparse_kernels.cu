// CUDA kernels of the neuralmem_sparse ops (schemas: csrc/sparse/sparse_ops.cpp;
// semantics: neuralmem_fast/ops/sparse.py). Accumulation in float for
// float16/bfloat16/float32, in double for float64.
//
//   sparse_read / sparse_read_backward: one block of kThreads per (b, h). A
//     warp takes the K rows in turn (lanes stride the D columns, butterfly
//     sums), warp 0 does the softmax over K <= 64 (two candidates per lane),
//     then the block's threads stride the D columns (reads, grad_keys) or the
//     K*D elements (grad_rows). D is looped, so any width works.
//   cosine_topk: grid (memory b x group of kHG heads, split of the slots). A
//     warp scores one slot at a time against the group's heads (one read of
//     the row for all of them) and keeps a sorted top-k list per head in
//     shared memory (lane 0 tests the threshold, which skips almost every
//     slot, and inserts); the block merges its warps' lists into one list per
//     (b, h, split), and a second kernel merges the splits, a warp per (b, h)
//     (each lane scans a stride of the split lists, a shuffle argmax picks
//     the next best). k <= 64.
//   lru_touch_ / lru_oldest: one thread per memory (the moves are sequential).
//     Slots outside [-1, N) are skipped and a walk that meets a link outside
//     [0, N] stops, so that a direct call cannot write out of bounds; the
//     Python layer refuses such indices with an error before the call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "sparse/lru_list.h"
#include "sparse/sparse_checks.h"

namespace neuralmem {
namespace sparse {
namespace cuda {

constexpr int kThreads = 128;        // sparse_read blocks
constexpr int kTopkThreads = 256;    // cosine_topk blocks (its __launch_bounds__ spells the number)
constexpr int kTopkWarps = kTopkThreads / 32;
constexpr int kMaxK = 64;            // candidates per head of sparse_read; k of cosine_topk
constexpr int kHG = 4;               // heads per cosine_topk block
constexpr int kMaxSplits = 1024;
constexpr unsigned kFull = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// The sum of v over the block, in a fixed order, for every thread; sh holds
// one value per warp.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A s = 0;
  for (int w = 0; w < nw; ++w) s += sh[w];
  __syncthreads();
  return s;
}

// ---------------------------------------------------------------------------
// sparse_read
// ---------------------------------------------------------------------------
// Cosines (and, with grad, gw_k = grad_weights_k + grad_reads . row_k) of the
// K rows and softmax weights, into shared memory. Ends with a barrier.
template <typename T, typename A>
__device__ void read_head(const T* __restrict__ r, const T* __restrict__ key, const T* __restrict__ g,
                          const T* __restrict__ gwt, A s, int K, int D, A eps, A* s_cos, A* s_ir, A* s_w, A* s_gw,
                          bool* s_rc, A* s_red, A& nk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  A q = 0;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const A v = static_cast<A>(key[d]);
    q += v * v;
  }
  nk = sqrt(block_sum(q, s_red));
  for (int j = warp; j < K; j += nw) {
    const T* row = r + int64_t(j) * D;
    A dot = 0, nr = 0, gd = 0;
    for (int d = lane; d < D; d += 32) {
      const A v = static_cast<A>(row[d]);
      dot += static_cast<A>(key[d]) * v;
      nr += v * v;
      if (g != nullptr) gd += static_cast<A>(g[d]) * v;
    }
    dot = warp_sum(dot);
    nr = warp_sum(nr);
    if (g != nullptr) gd = warp_sum(gd);
    if (lane == 0) {
      const A n = sqrt(nr);
      s_rc[j] = n < eps;
      s_ir[j] = A(1) / max(n, eps);
      s_cos[j] = dot / (max(nk, eps) * max(n, eps));
      if (g != nullptr) s_gw[j] = gd + static_cast<A>(gwt[j]);
    }
  }
  __syncthreads();
  if (warp == 0) {
    const bool v0 = lane < K, v1 = lane + 32 < K;
    const A ninf = -static_cast<A>(INFINITY);
    const A l0 = v0 ? s * s_cos[lane] : ninf, l1 = v1 ? s * s_cos[lane + 32] : ninf;
    const A mx = warp_max(max(l0, l1));
    const A e0 = v0 ? exp(l0 - mx) : A(0), e1 = v1 ? exp(l1 - mx) : A(0);
    const A sum = warp_sum(e0 + e1);
    if (v0) s_w[lane] = e0 / sum;
    if (v1) s_w[lane + 32] = e1 / sum;
  }
  __syncthreads();
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) sparse_read_kernel(const T* __restrict__ rows, const T* __restrict__ keys,
                                                               const T* __restrict__ strengths, int K, int D, A eps,
                                                               T* __restrict__ reads, T* __restrict__ weights) {
  __shared__ A s_cos[kMaxK], s_ir[kMaxK], s_w[kMaxK], s_red[kThreads / 32];
  __shared__ bool s_rc[kMaxK];
  const int64_t t = blockIdx.x;
  const T* r = rows + t * K * D;
  A nk;
  read_head<T, A>(r, keys + t * D, nullptr, nullptr, static_cast<A>(strengths[t]), K, D, eps, s_cos, s_ir, s_w,
                  nullptr, s_rc, s_red, nk);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    A acc = 0;
    for (int j = 0; j < K; ++j) acc += s_w[j] * static_cast<A>(r[int64_t(j) * D + d]);
    reads[t * D + d] = static_cast<T>(acc);
  }
  for (int j = threadIdx.x; j < K; j += blockDim.x) weights[t * K + j] = static_cast<T>(s_w[j]);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) sparse_read_backward_kernel(
    const T* __restrict__ grad_reads, const T* __restrict__ grad_weights, const T* __restrict__ rows,
    const T* __restrict__ keys, const T* __restrict__ strengths, int K, int D, A eps, T* __restrict__ grad_rows,
    T* __restrict__ grad_keys, T* __restrict__ grad_strengths) {
  __shared__ A s_cos[kMaxK], s_ir[kMaxK], s_w[kMaxK], s_gw[kMaxK], s_red[kThreads / 32];
  __shared__ bool s_rc[kMaxK];
  __shared__ A s_zc;
  const int64_t t = blockIdx.x;
  const T* r = rows + t * K * D;
  const T* key = keys + t * D;
  const T* g = grad_reads + t * D;
  const A s = static_cast<A>(strengths[t]);
  A nk;
  read_head<T, A>(r, key, g, grad_weights + t * K, s, K, D, eps, s_cos, s_ir, s_w, s_gw, s_rc, s_red, nk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 0) {  // dz_k = w_k (gw_k - sum_j w_j gw_j), overwriting gw; sum_k dz_k cos_k
    const bool v0 = lane < K, v1 = lane + 32 < K;
    const A w0 = v0 ? s_w[lane] : A(0), w1 = v1 ? s_w[lane + 32] : A(0);
    const A g0 = v0 ? s_gw[lane] : A(0), g1 = v1 ? s_gw[lane + 32] : A(0);
    const A wbar = warp_sum(w0 * g0 + w1 * g1);
    const A z0 = w0 * (g0 - wbar), z1 = w1 * (g1 - wbar);
    const A zc = warp_sum((v0 ? z0 * s_cos[lane] : A(0)) + (v1 ? z1 * s_cos[lane + 32] : A(0)));
    __syncwarp();
    if (v0) s_gw[lane] = z0;
    if (v1) s_gw[lane + 32] = z1;
    if (lane == 0) {
      s_zc = zc;
      grad_strengths[t] = static_cast<T>(zc);
    }
  }
  __syncthreads();
  const A ik = A(1) / max(nk, eps);
  for (int64_t e = threadIdx.x; e < int64_t(K) * D; e += blockDim.x) {
    const int j = static_cast<int>(e / D), d = static_cast<int>(e % D);
    const A v = static_cast<A>(r[e]);
    const A a = s_gw[j] * s * s_ir[j];
    const A c = s_rc[j] ? A(0) : s_gw[j] * s * s_cos[j] * s_ir[j] * s_ir[j];
    const A kn = static_cast<A>(key[d]) * ik;
    grad_rows[t * K * D + e] = static_cast<T>(s_w[j] * static_cast<A>(g[d]) + a * kn - c * v);
  }
  const A kc = nk < eps ? A(0) : s * s_zc * ik * ik;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    A acc = 0;
    for (int j = 0; j < K; ++j) acc += s_gw[j] * s * s_ir[j] * static_cast<A>(r[int64_t(j) * D + d]);
    grad_keys[t * D + d] = static_cast<T>(acc * ik - kc * static_cast<A>(key[d]));
  }
}

// ---------------------------------------------------------------------------
// cosine_topk
// ---------------------------------------------------------------------------
// Larger score first, equal scores in slot order, NaN above every number.
template <typename A>
__device__ __forceinline__ bool better(A a, int64_t ai, A b, int64_t bi) {
  const bool an = isnan(a), bn = isnan(b);
  if (an || bn) return an && (!bn || ai < bi);
  return a > b || (a == b && ai < bi);
}

// memory (B,N,D) T, kn (B,H,D) A normalized keys; part_s/part_i (B,H,S,k),
// index -1 past a split's count.
template <typename T, typename A>
__global__ void __launch_bounds__(256) topk_split_kernel(const T* __restrict__ memory,
                                                                  const A* __restrict__ kn, int64_t N, int D, int H,
                                                                  int k, int64_t chunk, A eps, A* __restrict__ part_s,
                                                                  int64_t* __restrict__ part_i) {
  __shared__ A l_s[kTopkWarps][kHG][kMaxK];
  __shared__ int64_t l_i[kTopkWarps][kHG][kMaxK];
  const int groups = (H + kHG - 1) / kHG;
  const int b = blockIdx.x / groups, h0 = (blockIdx.x % groups) * kHG, hg = min(kHG, H - h0);
  const int S = gridDim.y, sp = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = int64_t(sp) * chunk, n1 = min(N, n0 + chunk);
  const A* kb = kn + (int64_t(b) * H + h0) * D;
  int cnt[kHG];
#pragma unroll
  for (int h = 0; h < kHG; ++h) cnt[h] = 0;
  for (int64_t n = n0 + warp; n < n1; n += kTopkWarps) {
    const T* row = memory + (int64_t(b) * N + n) * D;
    A nr = 0, p[kHG];
#pragma unroll
    for (int h = 0; h < kHG; ++h) p[h] = 0;
    for (int d = lane; d < D; d += 32) {
      const A v = static_cast<A>(row[d]);
      nr += v * v;
#pragma unroll
      for (int h = 0; h < kHG; ++h)
        if (h < hg) p[h] += kb[h * D + d] * v;
    }
    const A den = max(sqrt(warp_sum(nr)), eps);
#pragma unroll
    for (int h = 0; h < kHG; ++h) {
      if (h >= hg) break;
      const A sc = warp_sum(p[h]) / den;  // the same bits on every lane
      // Only lane 0 reads or writes the warp's lists until the block merge;
      // it decides, and the warp follows, so that the counts stay uniform.
      bool take = false;
      if (lane == 0) {
        take = cnt[h] < k || better(sc, n, l_s[warp][h][k - 1], l_i[warp][h][k - 1]);
        if (take) {
          int j = min(cnt[h], k - 1);
          while (j > 0 && better(sc, n, l_s[warp][h][j - 1], l_i[warp][h][j - 1])) {
            l_s[warp][h][j] = l_s[warp][h][j - 1];
            l_i[warp][h][j] = l_i[warp][h][j - 1];
            --j;
          }
          l_s[warp][h][j] = sc;
          l_i[warp][h][j] = n;
        }
      }
      if (__shfl_sync(kFull, take, 0)) cnt[h] = min(cnt[h] + 1, k);
    }
  }
  // every warp's counts, then warp h merges the kTopkWarps lists of head h
  __shared__ int s_cnt[kTopkWarps][kHG];
  if (lane == 0)
    for (int h = 0; h < kHG; ++h) s_cnt[warp][h] = cnt[h];
  __syncthreads();
  if (warp < hg && lane == 0) {
    const int h = warp;
    int pos[kTopkWarps];
    for (int w = 0; w < kTopkWarps; ++w) pos[w] = 0;
    const int64_t base = ((int64_t(b) * H + h0 + h) * S + sp) * k;
    for (int j = 0; j < k; ++j) {
      int bw = -1;
      for (int w = 0; w < kTopkWarps; ++w) {
        if (pos[w] >= s_cnt[w][h]) continue;
        if (bw < 0 || better(l_s[w][h][pos[w]], l_i[w][h][pos[w]], l_s[bw][h][pos[bw]], l_i[bw][h][pos[bw]])) bw = w;
      }
      if (bw < 0) {
        part_i[base + j] = -1;
        part_s[base + j] = 0;
      } else {
        part_s[base + j] = l_s[bw][h][pos[bw]];
        part_i[base + j] = l_i[bw][h][pos[bw]];
        ++pos[bw];
      }
    }
  }
}

// One warp per (b, h): merges the S sorted split lists into the k best.
template <typename T, typename A>
__global__ void __launch_bounds__(32) topk_merge_kernel(const A* __restrict__ part_s,
                                                        const int64_t* __restrict__ part_i, int S, int k,
                                                        T* __restrict__ scores, int64_t* __restrict__ indices) {
  __shared__ int pos[kMaxSplits];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  for (int c = lane; c < S; c += 32) pos[c] = 0;
  __syncwarp();
  const A* ps = part_s + t * S * k;
  const int64_t* pi = part_i + t * S * k;
  for (int j = 0; j < k; ++j) {
    A bs = 0;
    int64_t bi = -1;
    int bc = -1;
    for (int c = lane; c < S; c += 32) {
      if (pos[c] >= k) continue;
      const int64_t e = int64_t(c) * k + pos[c];
      if (pi[e] < 0) continue;
      if (bc < 0 || better(ps[e], pi[e], bs, bi)) {
        bs = ps[e];
        bi = pi[e];
        bc = c;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {  // argmax over lanes by `better` (no candidate: bc = -1)
      const A os = __shfl_xor_sync(kFull, bs, o);
      const int64_t oi = __shfl_xor_sync(kFull, bi, o);
      const int oc = __shfl_xor_sync(kFull, bc, o);
      if (oc >= 0 && (bc < 0 || better(os, oi, bs, bi))) {
        bs = os;
        bi = oi;
        bc = oc;
      }
    }
    if (lane == 0) {
      scores[t * k + j] = static_cast<T>(bs);
      indices[t * k + j] = bi;
      if (bc >= 0) ++pos[bc];
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------
// LRU
// ---------------------------------------------------------------------------
__global__ void lru_touch_kernel(int64_t* __restrict__ links, const int64_t* __restrict__ idx, int64_t B, int64_t N,
                                 int64_t M) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  int64_t* L = links + b * (N + 1) * 2;
  auto ok = [N](int64_t v) { return v >= 0 && v <= N; };
  for (int64_t m = 0; m < M; ++m) {
    const int64_t s = idx[b * M + m];
    if (s < 0 || s >= N) continue;
    const int64_t p = L[2 * s], q = L[2 * s + 1], tail0 = L[2 * N];
    if (!ok(p) || !ok(q) || !ok(tail0)) return;  // corrupted links: stop rather than write out of bounds
    lru_move_to_tail(L, N, s);
  }
}

__global__ void lru_oldest_kernel(const int64_t* __restrict__ links, const bool* __restrict__ skip, int64_t B,
                                  int64_t N, int64_t count, int64_t* __restrict__ out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t* L = links + b * (N + 1) * 2;
  int64_t cur = L[2 * N + 1], got = 0, steps = 0;
  while (got < count && cur >= 0 && cur < N && steps < N) {
    if (skip == nullptr || !skip[b * N + cur]) out[b * count + got++] = cur;
    cur = L[2 * cur + 1];
    ++steps;
  }
}

// ---------------------------------------------------------------------------
// host
// ---------------------------------------------------------------------------
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels, got a tensor on ", t.device());
}

void check_k_read(int64_t K) {
  TORCH_CHECK_VALUE(K <= kMaxK, "rows: the CUDA sparse_read takes at most ", kMaxK, " candidates per head, got K=",
                    K);
}

std::tuple<at::Tensor, at::Tensor> sparse_read_cuda(const at::Tensor& rows, const at::Tensor& keys,
                                                    const at::Tensor& strengths, double eps) {
  check_read(rows, keys, strengths, eps);
  check_cuda(rows, "rows");
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  check_k_read(K);
  const c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor reads = at::empty({B, H, D}, rows.options());
  at::Tensor weights = at::empty({B, H, K}, rows.options());
  if (B * H == 0) return {reads, weights};
  const at::Tensor r = rows.contiguous(), k = keys.contiguous(), s = strengths.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NEURALMEM_SPARSE_DISPATCH(rows.scalar_type(), "sparse_read_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    sparse_read_kernel<scalar_t, A><<<static_cast<unsigned>(B * H), kThreads, 0, stream>>>(
        r.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), int(K), int(D),
        static_cast<A>(eps), reads.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {reads, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_read_backward_cuda(
    const at::Tensor& grad_reads, const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& rows,
    const at::Tensor& keys, const at::Tensor& strengths, double eps) {
  check_read_backward(grad_reads, grad_weights, weights, rows, keys, strengths, eps);
  check_cuda(rows, "rows");
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  check_k_read(K);
  const c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor gr = at::empty(rows.sizes(), rows.options());
  at::Tensor gk = at::empty(keys.sizes(), keys.options());
  at::Tensor gs = at::empty(strengths.sizes(), strengths.options());
  if (B * H == 0) return {gr, gk, gs};
  const at::Tensor g = grad_reads.contiguous(), gw = grad_weights.contiguous(), r = rows.contiguous(),
                   k = keys.contiguous(), s = strengths.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NEURALMEM_SPARSE_DISPATCH(rows.scalar_type(), "sparse_read_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    sparse_read_backward_kernel<scalar_t, A><<<static_cast<unsigned>(B * H), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), gw.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
        k.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), int(K), int(D), static_cast<A>(eps),
        gr.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gr, gk, gs};
}

int sm_count(const at::Tensor& t) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, t.device().index()));
  return std::max(v, 1);
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cuda(const at::Tensor& memory, const at::Tensor& keys, int64_t k,
                                                    double eps) {
  check_topk(memory, keys, k, eps);
  check_cuda(memory, "memory");
  TORCH_CHECK_VALUE(k <= kMaxK, "k: the CUDA cosine_topk takes k <= ", kMaxK, ", got k=", k);
  const c10::cuda::CUDAGuard guard(memory.device());
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), H = keys.size(1);
  TORCH_CHECK_VALUE(D <= (int64_t(1) << 30), "memory: rows wider than 2^30 columns are not supported, got D=", D);
  at::Tensor scores = at::empty({B, H, k}, memory.options());
  at::Tensor indices = at::empty({B, H, k}, memory.options().dtype(at::kLong));
  if (B * H == 0) return {scores, indices};
  const at::Tensor m = memory.contiguous();
  const at::Tensor ka = keys.to(acc_type(keys.scalar_type()));
  const at::Tensor kn = (ka / ka.norm(2, -1, true).clamp_min(eps)).contiguous();
  const int64_t groups = B * ((H + kHG - 1) / kHG);
  const int64_t want = (int64_t(4) * sm_count(memory) + groups - 1) / groups;
  const int64_t most = std::max<int64_t>(1, N / std::max<int64_t>(1024, k));
  int64_t S = std::max<int64_t>(1, std::min<int64_t>({want, most, int64_t(kMaxSplits)}));
  const int64_t chunk = (N + S - 1) / S;
  S = (N + chunk - 1) / chunk;
  TORCH_CHECK(groups <= int64_t(INT32_MAX) && B * H <= int64_t(INT32_MAX), "cosine_topk: too many memories x heads");
  at::Tensor part_s = at::empty({B, H, S, k}, kn.options());
  at::Tensor part_i = at::empty({B, H, S, k}, indices.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  NEURALMEM_SPARSE_DISPATCH(memory.scalar_type(), "cosine_topk_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    topk_split_kernel<scalar_t, A><<<dim3(unsigned(groups), unsigned(S)), kTopkThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), kn.const_data_ptr<A>(), N, int(D), int(H), int(k), chunk, static_cast<A>(eps),
        part_s.data_ptr<A>(), part_i.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    topk_merge_kernel<scalar_t, A><<<static_cast<unsigned>(B * H), 32, 0, stream>>>(
        part_s.const_data_ptr<A>(), part_i.const_data_ptr<int64_t>(), int(S), int(k), scores.data_ptr<scalar_t>(),
        indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, indices};
}

void lru_touch_cuda(at::Tensor& links, const at::Tensor& indices) {
  const int64_t N = check_links(links);
  check_index_tensor(indices, "indices", links);
  check_cuda(links, "links");
  const c10::cuda::CUDAGuard guard(links.device());
  const int64_t B = links.size(0);
  const at::Tensor idx = indices.contiguous();
  if (B == 0 || idx.size(1) == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  lru_touch_kernel<<<static_cast<unsigned>((B + 63) / 64), 64, 0, stream>>>(links.data_ptr<int64_t>(),
                                                                            idx.const_data_ptr<int64_t>(), B, N,
                                                                            idx.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lru_oldest_cuda(const at::Tensor& links, int64_t count, const c10::optional<at::Tensor>& skip) {
  const int64_t N = check_links(links);
  check_count(count);
  check_skip(skip, links, N);
  check_cuda(links, "links");
  const c10::cuda::CUDAGuard guard(links.device());
  const int64_t B = links.size(0);
  at::Tensor out = at::full({B, count}, -1, links.options());
  if (B == 0 || count == 0) return out;
  at::Tensor sk = skip.has_value() && skip->defined() ? skip->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  lru_oldest_kernel<<<static_cast<unsigned>((B + 63) / 64), 64, 0, stream>>>(
      links.const_data_ptr<int64_t>(), sk.defined() ? sk.const_data_ptr<bool>() : nullptr, B, N, count,
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(neuralmem_sparse, CUDA, m) {
  m.impl("sparse_read", &sparse_read_cuda);
  m.impl("sparse_read_backward", &sparse_read_backward_cuda);
  m.impl("cosine_topk", &cosine_topk_cuda);
  m.impl("lru_touch_", &lru_touch_cuda);
  m.impl("lru_oldest", &lru_oldest_cuda);
}

}  // namespace cuda
}  // namespace sparse
}  // namespace neuralmem

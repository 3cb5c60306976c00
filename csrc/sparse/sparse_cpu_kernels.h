// CPU arithmetic of the neuralmem_sparse ops (host code and checks:
// sparse_ops.cpp). T is the storage dtype, A the accumulation dtype (float for
// float16/bfloat16/float32, double for float64).
//
// cosine_topk streams the memory once: tasks are (memory b, chunk of slots);
// a task scores a block of slots against every head at once (the row is read
// once, the normalized keys stay in L1) and keeps one bounded heap per head,
// then the per-chunk lists of each (b, h) are merged. The dot products use 8
// independent partial sums (lanes) so that the compiler vectorizes them
// without reassociating a reduction; an AVX2+FMA copy of the scoring loop is
// chosen at run time when the processor has it (and NEURALMEM_CPU_CAPABILITY
// allows it, as for the other CPU kernels).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "sparse/lru_list.h"

#include "common/isa.h"
#include <type_traits>

namespace neuralmem {
namespace sparse {
namespace cpu {

constexpr int kLanes = 8;

// A slot and its score; `better` is the order of the result: larger score
// first, equal scores in increasing slot order, NaN above every number (as
// torch.sort(descending=True) places it), NaNs in slot order.
template <typename A>
struct Cand {
  A s;
  int64_t i;
};

template <typename A>
inline bool better(const Cand<A>& a, const Cand<A>& b) {
  const bool an = std::isnan(a.s), bn = std::isnan(b.s);
  if (an || bn) return an && (!bn || a.i < b.i);
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

template <typename A>
struct Better {
  bool operator()(const Cand<A>& a, const Cand<A>& b) const { return better(a, b); }
};

// Scores of rows [0, n) of `rows` (n x D, storage A) against Hp normalized keys
// kn (Hp x D, Hp a multiple of kHG, zero-padded): out[h * n + j] =
// (kn[h] . row_j) / max(|row_j|, eps). kHG heads and the row's norm are
// accumulated together, in independent chains of kLanes lanes (a single
// chain would wait on the latency of every multiply-add).
constexpr int kHG = 4;

// kLanes-wide vectors (GCC vector extensions: one ymm of floats, two of
// doubles with AVX2; pairs of xmm in the baseline build), so that the dot
// products vectorize without reassociating a reduction.
template <typename A>
struct LaneVec;
template <>
struct LaneVec<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LaneVec<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};

#define NEURALMEM_SPARSE_HSUM(x) ((((x)[0] + (x)[1]) + ((x)[2] + (x)[3])) + (((x)[4] + (x)[5]) + ((x)[6] + (x)[7])))
// Two rows at a time: ten independent chains (four heads and the norm, per row).
#define NEURALMEM_SPARSE_SCORE_BODY                                                              \
  typedef typename LaneVec<A>::type V;                                                           \
  for (int64_t j = 0; j < n; j += 2) {                                                           \
    const bool two = j + 1 < n;                                                                  \
    const A* r0 = rows + j * D;                                                                  \
    const A* r1 = two ? r0 + D : r0;                                                             \
    A den0 = 0, den1 = 0;                                                                        \
    for (int64_t h0 = 0; h0 < Hp; h0 += kHG) {                                                   \
      const A* k0 = kn + h0 * D;                                                                 \
      const A* k1 = k0 + D;                                                                      \
      const A* k2 = k1 + D;                                                                      \
      const A* k3 = k2 + D;                                                                      \
      V q0 = {}, p00 = {}, p01 = {}, p02 = {}, p03 = {};                                         \
      V q1 = {}, p10 = {}, p11 = {}, p12 = {}, p13 = {};                                         \
      int64_t d = 0;                                                                             \
      for (; d + kLanes <= D; d += kLanes) {                                                     \
        V v0, v1, a;                                                                             \
        __builtin_memcpy(&v0, r0 + d, sizeof(V));                                                \
        __builtin_memcpy(&v1, r1 + d, sizeof(V));                                                \
        q0 += v0 * v0;                                                                           \
        q1 += v1 * v1;                                                                           \
        __builtin_memcpy(&a, k0 + d, sizeof(V));                                                 \
        p00 += a * v0;                                                                           \
        p10 += a * v1;                                                                           \
        __builtin_memcpy(&a, k1 + d, sizeof(V));                                                 \
        p01 += a * v0;                                                                           \
        p11 += a * v1;                                                                           \
        __builtin_memcpy(&a, k2 + d, sizeof(V));                                                 \
        p02 += a * v0;                                                                           \
        p12 += a * v1;                                                                           \
        __builtin_memcpy(&a, k3 + d, sizeof(V));                                                 \
        p03 += a * v0;                                                                           \
        p13 += a * v1;                                                                           \
      }                                                                                          \
      A tq0 = 0, t00 = 0, t01 = 0, t02 = 0, t03 = 0;                                             \
      A tq1 = 0, t10 = 0, t11 = 0, t12 = 0, t13 = 0;                                             \
      for (; d < D; ++d) {                                                                       \
        const A v0 = r0[d], v1 = r1[d];                                                          \
        tq0 += v0 * v0;                                                                          \
        tq1 += v1 * v1;                                                                          \
        t00 += k0[d] * v0;                                                                       \
        t01 += k1[d] * v0;                                                                       \
        t02 += k2[d] * v0;                                                                       \
        t03 += k3[d] * v0;                                                                       \
        t10 += k0[d] * v1;                                                                       \
        t11 += k1[d] * v1;                                                                       \
        t12 += k2[d] * v1;                                                                       \
        t13 += k3[d] * v1;                                                                       \
      }                                                                                          \
      if (h0 == 0) {                                                                             \
        den0 = std::max(std::sqrt(NEURALMEM_SPARSE_HSUM(q0) + tq0), eps);                        \
        den1 = std::max(std::sqrt(NEURALMEM_SPARSE_HSUM(q1) + tq1), eps);                        \
      }                                                                                          \
      out[(h0 + 0) * n + j] = (NEURALMEM_SPARSE_HSUM(p00) + t00) / den0;                         \
      out[(h0 + 1) * n + j] = (NEURALMEM_SPARSE_HSUM(p01) + t01) / den0;                         \
      out[(h0 + 2) * n + j] = (NEURALMEM_SPARSE_HSUM(p02) + t02) / den0;                         \
      out[(h0 + 3) * n + j] = (NEURALMEM_SPARSE_HSUM(p03) + t03) / den0;                         \
      if (two) {                                                                                 \
        out[(h0 + 0) * n + j + 1] = (NEURALMEM_SPARSE_HSUM(p10) + t10) / den1;                   \
        out[(h0 + 1) * n + j + 1] = (NEURALMEM_SPARSE_HSUM(p11) + t11) / den1;                   \
        out[(h0 + 2) * n + j + 1] = (NEURALMEM_SPARSE_HSUM(p12) + t12) / den1;                   \
        out[(h0 + 3) * n + j + 1] = (NEURALMEM_SPARSE_HSUM(p13) + t13) / den1;                   \
      }                                                                                          \
    }                                                                                            \
  }

template <typename A>
void score_rows_default(const A* __restrict rows, const A* __restrict kn, int64_t n, int64_t Hp, int64_t D, A eps,
                        A* __restrict out) {
  NEURALMEM_SPARSE_SCORE_BODY
}

#if defined(__GNUC__) && defined(__x86_64__)
template <typename A>
__attribute__((target("avx2,fma"))) void score_rows_avx2(const A* __restrict rows, const A* __restrict kn,
                                                          int64_t n, int64_t Hp, int64_t D, A eps,
                                                          A* __restrict out) {
  NEURALMEM_SPARSE_SCORE_BODY
}

// AVX2 + FMA when the processor has it, unless NEURALMEM_CPU_CAPABILITY (or
// ATEN_CPU_CAPABILITY) caps the extension at "default" (common/isa.h).
inline bool has_avx2() {
  static const bool v = isa_level() >= 1;
  return v;
}
#endif
#undef NEURALMEM_SPARSE_SCORE_BODY
#undef NEURALMEM_SPARSE_HSUM

template <typename A>
inline void score_rows(const A* rows, const A* kn, int64_t n, int64_t Hp, int64_t D, A eps, A* out) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (has_avx2()) return score_rows_avx2<A>(rows, kn, n, Hp, D, eps, out);
#endif
  score_rows_default<A>(rows, kn, n, Hp, D, eps, out);
}

// keys (H x D) in A, each divided by max(|key|, eps).
template <typename T, typename A>
void normalize_keys(const T* keys, int64_t H, int64_t D, A eps, A* out) {
  for (int64_t h = 0; h < H; ++h) {
    A s = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A v = static_cast<A>(keys[h * D + d]);
      s += v * v;
    }
    const A den = std::max(std::sqrt(s), eps);
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<A>(keys[h * D + d]) / den;
  }
}

// memory (B,N,D), keys (B,H,D) contiguous; scores (B,H,k) T, indices (B,H,k) int64.
template <typename T>
void cosine_topk(const at::Tensor& memory, const at::Tensor& keys, int64_t k, double eps_d, at::Tensor& scores,
                 at::Tensor& indices) {
  using A = at::opmath_type<T>;
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), H = keys.size(1);
  if (B == 0 || H == 0) return;
  const A eps = static_cast<A>(eps_d);
  const T* mem = memory.const_data_ptr<T>();
  const T* key = keys.const_data_ptr<T>();
  // Chunks of at least k slots, so that the lists to merge hold at most ~2N entries.
  const int64_t L = std::max<int64_t>(k, 4096);
  const int64_t C = (N + L - 1) / L;
  const int64_t Hp = (H + kHG - 1) / kHG * kHG;  // heads padded with zero keys to whole groups
  std::vector<A> kn(B * Hp * D, A(0));
  for (int64_t b = 0; b < B; ++b) normalize_keys<T, A>(key + b * H * D, H, D, eps, kn.data() + b * Hp * D);
  // lists[((b * C + c) * H + h) * k + j], counts[(b * C + c)] (every head of a chunk has the same count).
  std::vector<Cand<A>> lists(B * C * H * k);
  std::vector<int64_t> counts(B * C);
  constexpr int64_t kBlock = 64;  // slots scored at once (and converted from T when T != A)
  at::parallel_for(0, B * C, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> sc(Hp * kBlock);
    std::vector<A> conv(std::is_same<T, A>::value ? 0 : kBlock * D);
    std::vector<std::vector<Cand<A>>> heaps(H);
    for (auto& hp : heaps) hp.reserve(k);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * L, n1 = std::min(N, n0 + L);
      for (auto& hp : heaps) hp.clear();
      const A* knb = kn.data() + b * Hp * D;
      for (int64_t j0 = n0; j0 < n1; j0 += kBlock) {
        const int64_t n = std::min(kBlock, n1 - j0);
        const T* src = mem + (b * N + j0) * D;
        const A* rows;
        if constexpr (std::is_same<T, A>::value) {
          rows = src;
        } else {
          for (int64_t e = 0; e < n * D; ++e) conv[e] = static_cast<A>(src[e]);
          rows = conv.data();
        }
        score_rows<A>(rows, knb, n, Hp, D, eps, sc.data());
        for (int64_t h = 0; h < H; ++h) {
          auto& hp = heaps[h];
          const A* s = sc.data() + h * n;
          // thr: the worst kept score once the heap is full; a score below it
          // cannot enter (NaN compares false and takes the full test).
          A thr = static_cast<int64_t>(hp.size()) < k ? -std::numeric_limits<A>::infinity() : hp.front().s;
          for (int64_t j = 0; j < n; ++j) {
            if (s[j] < thr) continue;
            const Cand<A> cd{s[j], j0 + j};
            if (static_cast<int64_t>(hp.size()) < k) {
              hp.push_back(cd);
              std::push_heap(hp.begin(), hp.end(), Better<A>());  // the worst on top
              if (static_cast<int64_t>(hp.size()) == k) thr = hp.front().s;
            } else if (better(cd, hp.front())) {
              std::pop_heap(hp.begin(), hp.end(), Better<A>());
              hp.back() = cd;
              std::push_heap(hp.begin(), hp.end(), Better<A>());
              thr = hp.front().s;
            }
          }
        }
      }
      counts[t] = static_cast<int64_t>(heaps[0].size());
      for (int64_t h = 0; h < H; ++h) {
        std::sort_heap(heaps[h].begin(), heaps[h].end(), Better<A>());  // best first
        std::copy(heaps[h].begin(), heaps[h].end(), lists.begin() + (t * H + h) * k);
      }
    }
  });
  T* out_s = scores.data_ptr<T>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Cand<A>> all;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      const Cand<A>* res;
      if (C == 1) {
        res = lists.data() + (b * C * H + h) * k;
      } else {
        all.clear();
        for (int64_t c = 0; c < C; ++c) {
          const Cand<A>* l = lists.data() + ((b * C + c) * H + h) * k;
          all.insert(all.end(), l, l + counts[b * C + c]);
        }
        std::partial_sort(all.begin(), all.begin() + k, all.end(), Better<A>());
        res = all.data();
      }
      for (int64_t j = 0; j < k; ++j) {
        out_s[t * k + j] = static_cast<T>(res[j].s);
        out_i[t * k + j] = res[j].i;
      }
    }
  });
}

// Per (b, h): norms, cosines and softmax weights of the K rows, in A.
template <typename T, typename A>
struct ReadHead {
  A nk, ik;                 // |key|, 1 / max(|key|, eps)
  std::vector<A> ir, cos, w;  // per row: 1 / max(|row|, eps), cosine, weight
  std::vector<char> rclamp;   // |row| < eps

  void compute(const T* r, const T* key, A s, int64_t K, int64_t D, A eps) {
    ir.resize(K);
    cos.resize(K);
    w.resize(K);
    rclamp.resize(K);
    A q = 0;
    for (int64_t d = 0; d < D; ++d) q += static_cast<A>(key[d]) * static_cast<A>(key[d]);
    nk = std::sqrt(q);
    ik = A(1) / std::max(nk, eps);
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < K; ++j) {
      const T* row = r + j * D;
      A dot = 0, nr = 0;
      for (int64_t d = 0; d < D; ++d) {
        const A v = static_cast<A>(row[d]);
        dot += static_cast<A>(key[d]) * v;
        nr += v * v;
      }
      const A n = std::sqrt(nr);
      rclamp[j] = n < eps;
      ir[j] = A(1) / std::max(n, eps);
      cos[j] = dot / (std::max(nk, eps) * std::max(n, eps));
      mx = std::max(mx, s * cos[j]);
    }
    A sum = 0;
    for (int64_t j = 0; j < K; ++j) {
      w[j] = std::exp(s * cos[j] - mx);
      sum += w[j];
    }
    for (int64_t j = 0; j < K; ++j) w[j] /= sum;
  }
};

template <typename T>
void sparse_read(const at::Tensor& rows, const at::Tensor& keys, const at::Tensor& strengths, double eps_d,
                 at::Tensor& reads, at::Tensor& weights) {
  using A = at::opmath_type<T>;
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  const A eps = static_cast<A>(eps_d);
  const T* R = rows.const_data_ptr<T>();
  const T* Kp = keys.const_data_ptr<T>();
  const T* S = strengths.const_data_ptr<T>();
  T* out = reads.data_ptr<T>();
  T* W = weights.data_ptr<T>();
  at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / (K * D)), [&](int64_t t0, int64_t t1) {
    ReadHead<T, A> rh;
    std::vector<A> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const T* r = R + t * K * D;
      rh.compute(r, Kp + t * D, static_cast<A>(S[t]), K, D, eps);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = 0; j < K; ++j)
        for (int64_t d = 0; d < D; ++d) acc[d] += rh.w[j] * static_cast<A>(r[j * D + d]);
      for (int64_t d = 0; d < D; ++d) out[t * D + d] = static_cast<T>(acc[d]);
      for (int64_t j = 0; j < K; ++j) W[t * K + j] = static_cast<T>(rh.w[j]);
    }
  });
}

// The weights are recomputed in A from rows, keys and strengths (for half
// inputs, more accurate than the stored half weights; for float32/float64 the
// same numbers the forward stored).
template <typename T>
void sparse_read_backward(const at::Tensor& grad_reads, const at::Tensor& grad_weights, const at::Tensor& rows,
                          const at::Tensor& keys, const at::Tensor& strengths, double eps_d, at::Tensor& grad_rows,
                          at::Tensor& grad_keys, at::Tensor& grad_strengths) {
  using A = at::opmath_type<T>;
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  const A eps = static_cast<A>(eps_d);
  const T* R = rows.const_data_ptr<T>();
  const T* Kp = keys.const_data_ptr<T>();
  const T* S = strengths.const_data_ptr<T>();
  const T* G = grad_reads.const_data_ptr<T>();
  const T* GW = grad_weights.const_data_ptr<T>();
  T* gR = grad_rows.data_ptr<T>();
  T* gK = grad_keys.data_ptr<T>();
  T* gS = grad_strengths.data_ptr<T>();
  at::parallel_for(0, B * H, std::max<int64_t>(1, 2048 / (K * D)), [&](int64_t t0, int64_t t1) {
    ReadHead<T, A> rh;
    std::vector<A> dz(K), gk(D);
    for (int64_t t = t0; t < t1; ++t) {
      const T* r = R + t * K * D;
      const T* key = Kp + t * D;
      const T* g = G + t * D;
      const A s = static_cast<A>(S[t]);
      rh.compute(r, key, s, K, D, eps);
      A wbar = 0;
      for (int64_t j = 0; j < K; ++j) {
        A gw = static_cast<A>(GW[t * K + j]);
        for (int64_t d = 0; d < D; ++d) gw += static_cast<A>(g[d]) * static_cast<A>(r[j * D + d]);
        dz[j] = gw;
        wbar += rh.w[j] * gw;
      }
      A gs = 0, zc = 0;
      for (int64_t j = 0; j < K; ++j) {
        dz[j] = rh.w[j] * (dz[j] - wbar);
        gs += dz[j] * rh.cos[j];
      }
      zc = gs;  // sum_k dz_k cos_k
      std::fill(gk.begin(), gk.end(), A(0));
      for (int64_t j = 0; j < K; ++j) {
        const T* row = r + j * D;
        const A a = dz[j] * s * rh.ir[j];                               // times kn[d] (and, for keys, row[d])
        const A c = rh.rclamp[j] ? A(0) : dz[j] * s * rh.cos[j] * rh.ir[j] * rh.ir[j];  // times row[d]
        T* out = gR + (t * K + j) * D;
        for (int64_t d = 0; d < D; ++d) {
          const A v = static_cast<A>(row[d]);
          const A kn = static_cast<A>(key[d]) * rh.ik;
          out[d] = static_cast<T>(rh.w[j] * static_cast<A>(g[d]) + a * kn - c * v);
          gk[d] += a * v;
        }
      }
      const bool kclamp = rh.nk < eps;
      const A kc = kclamp ? A(0) : s * zc * rh.ik * rh.ik;
      for (int64_t d = 0; d < D; ++d) {
        const A kv = static_cast<A>(key[d]);
        gK[t * D + d] = static_cast<T>(gk[d] * rh.ik - kc * kv);
      }
      gS[t] = static_cast<T>(gs);
    }
  });
}

// links (B, N+1, 2): moves each index of row b to the most recent end. The
// indices and the links they reach were checked by the caller.
inline void lru_touch(int64_t* links, const int64_t* idx, int64_t B, int64_t N, int64_t M) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* L = links + b * (N + 1) * 2;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t s = idx[b * M + m];
        if (s >= 0) lru_move_to_tail(L, N, s);
      }
    }
  });
}

}  // namespace cpu
}  // namespace sparse
}  // namespace neuralmem

// What every CPU kernel of the memory ops shares: work partitioning, vector
// primitives and the preparation of heads. Part of memory_kernels.h (see its
// header for the design); compiled once per instruction set.
#pragma once
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/kernel_common.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
template <typename T>
using acc_t = at::opmath_type<T>;

// ---------------------------------------------------------------------------
// work partitioning
// ---------------------------------------------------------------------------
// Below ~256K multiply-adds (tens of microseconds) per task a second thread
// does not pay for its wake-up, least of all on a busy machine; above 64
// chunks per memory the partial records stop being free.
constexpr int64_t kMinTaskWork = int64_t(1) << 18;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kBlockElems = 4096;
constexpr int64_t kMaxBlock = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Chunks {
  int64_t size;   // slots per chunk
  int64_t count;  // chunks per memory
};

// cost: multiply-adds per slot.
inline Chunks make_chunks(int64_t n, int64_t cost) {
  cost = std::max<int64_t>(cost, 1);
  const int64_t min_slots = std::max<int64_t>(1, kMinTaskWork / cost);
  int64_t size = std::max(min_slots, ceil_div(n, kMaxChunks));
  size = std::max<int64_t>(1, std::min(size, n));
  return {size, n > 0 ? ceil_div(n, size) : 0};
}

// Grain for at::parallel_for over tasks of `work` multiply-adds each.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(work, 1));
}

inline int64_t block_slots(int64_t D) {
  return std::clamp<int64_t>(kBlockElems / std::max<int64_t>(D, 1), 1, kMaxBlock);
}

// A per-task buffer: on the stack when small, else on the heap.
template <typename A>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n > kInline) {
      heap_.reset(new A[n]);
      p_ = heap_.get();
    } else {
      p_ = inline_;
    }
  }
  A* data() { return p_; }
  A& operator[](int64_t i) { return p_[i]; }

 private:
  static constexpr int64_t kInline = 1024;
  alignas(64) A inline_[kInline];
  std::unique_ptr<A[]> heap_;
  A* p_;
};

// ---------------------------------------------------------------------------
// vector primitives (A: float or double)
// ---------------------------------------------------------------------------
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> load_n(const A* p, int64_t n) {
  // Partial loads zero the missing lanes, so a tail adds nothing to a dot.
  return n >= Vectorized<A>::size() ? Vectorized<A>::loadu(p) : Vectorized<A>::loadu(p, n);
}

template <typename A>
C10_ALWAYS_INLINE void store_n(const Vectorized<A>& v, A* p, int64_t n) {
  if (n >= Vectorized<A>::size()) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}

template <typename A>
C10_ALWAYS_INLINE A hsum(const Vectorized<A>& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return at::vec::vec_reduce_all<float>(
        [](const Vectorized<float>& a, const Vectorized<float>& b) { return a + b; }, v);
  }
#endif
  __at_align__ A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A s = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) s += tmp[i];
  return s;
}

// out[0..3] = the sums of a, b, c, d. A transposing reduction: about a
// quarter of the shuffles of four separate horizontal sums.
template <typename A>
C10_ALWAYS_INLINE void hsum4(const Vectorized<A>& a, const Vectorized<A>& b, const Vectorized<A>& c,
                             const Vectorized<A>& d, A* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512 va = a, vb = b, vc = c, vd = d;
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(va, vb, 0x44), _mm512_shuffle_f32x4(va, vb, 0xEE));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(vc, vd, 0x44), _mm512_shuffle_f32x4(vc, vd, 0xEE));
    // 128-bit block k now holds four partial sums of input k.
    __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
    const __m512 lanes = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12), u);
    _mm_storeu_ps(out, _mm512_castps512_ps128(lanes));
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256 t0 = _mm256_hadd_ps(a, b);
    const __m256 t1 = _mm256_hadd_ps(c, d);
    const __m256 u = _mm256_hadd_ps(t0, t1);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    return;
  }
#endif
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
}

template <typename A>
inline A max_of(const A* x, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  A m = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  if (n >= V) {
    Vec acc = Vec::loadu(x);
    for (j = V; j + V <= n; j += V) acc = at::vec::maximum(acc, Vec::loadu(x + j));
    __at_align__ A tmp[V];
    acc.store(tmp);
    for (int64_t i = 0; i < V; ++i) m = std::max(m, tmp[i]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// The sum of e_j = exp(in[j] - shift) * scale over j < n; with STORE also
// out[j] = e_j (out may be in).
template <bool STORE, typename A>
inline A exp_shift_sum(const A* in, A* out, int64_t n, A shift, A scale) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vs(shift), vc(scale);
  Vec acc(A(0));
  for (int64_t j = 0; j < n; j += V) {
    const int64_t m = std::min<int64_t>(V, n - j);
    Vec e = (load_n(in + j, m) - vs).exp() * vc;
    // Padded lanes hold exp(-shift): keep them out of the sum.
    if (m < V) e = Vec::set(Vec(A(0)), e, m);
    if constexpr (STORE) store_n(e, out + j, m);
    acc = acc + e;
  }
  return hsum(acc);
}

// x[j] = exp(x[j] - shift) * scale; returns the sum of the new x.
template <typename A>
inline A exp_shift(A* x, int64_t n, A shift, A scale = A(1)) {
  return exp_shift_sum<true>(x, x, n, shift, scale);
}

// The sum of exp(x[j] - shift), x unchanged.
template <typename A>
inline A exp_sum(const A* x, int64_t n, A shift) {
  return exp_shift_sum<false>(x, static_cast<A*>(nullptr), n, shift, A(1));
}

template <typename A>
inline void scale_(A* x, int64_t n, A s) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t d = 0; d < n; d += V) {
    const int64_t m = std::min<int64_t>(V, n - d);
    store_n(load_n(x + d, m) * Vec(s), x + d, m);
  }
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec acc(A(0));
  for (int64_t d = 0; d < n; d += V) {
    const int64_t m = std::min<int64_t>(V, n - d);
    acc = at::vec::fmadd(load_n(a + d, m), load_n(b + d, m), acc);
  }
  return hsum(acc);
}

template <typename A>
inline A clamp_finite(A x) {
  constexpr A big = std::numeric_limits<A>::max();
  return std::min(std::max(x, -big), big);
}

// Widen n elements to the accumulation type; a no-op pointer for float/double.
template <typename T, typename A>
inline const A* widen(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename T, typename A>
inline void narrow(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (src != dst) std::memcpy(dst, src, sizeof(A) * n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Combines per-chunk softmax partials laid out [b][chunk][k] as (max, sum of
// exp) into per-(b, k) (max, 1/sum), in chunk order so that the result does
// not depend on the thread count. Shared by the addressing and write passes.
template <typename A>
std::vector<A> combine_max_sum(const std::vector<A>& part, int64_t B, int64_t C, int64_t K) {
  std::vector<A> stats(B * K * 2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      A m = -std::numeric_limits<A>::infinity();
      for (int64_t c = 0; c < C; ++c) m = std::max(m, part[((b * C + c) * K + k) * 2]);
      A l = 0;
      for (int64_t c = 0; c < C; ++c) {
        const A* p = &part[((b * C + c) * K + k) * 2];
        l += p[1] * std::exp(p[0] - m);
      }
      stats[(b * K + k) * 2] = m;
      stats[(b * K + k) * 2 + 1] = A(1) / l;
    }
  }
  return stats;
}

// Folds a block of logits x[0..n) into a running softmax record p = (max,
// sum of exp(x - max)); x is overwritten with exp(x - max).
template <typename A>
inline void softmax_stats_update(A* x, int64_t n, A* p) {
  const A bm = max_of(x, n);
  if (bm > p[0]) {
    p[1] *= std::exp(p[0] - bm);
    p[0] = bm;
  }
  p[1] += exp_shift(x, n, p[0]);
}

// Calls f(std::integral_constant<int, G>, h0) for head groups of up to 4:
// four heads plus the slot norm keep the dot-product accumulators in
// registers on every instruction set.
template <typename F>
C10_ALWAYS_INLINE void for_head_groups(int64_t H, const F& f) {
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    switch (std::min<int64_t>(4, H - h0)) {
      case 4: f(std::integral_constant<int, 4>{}, h0); break;
      case 3: f(std::integral_constant<int, 3>{}, h0); break;
      case 2: f(std::integral_constant<int, 2>{}, h0); break;
      default: f(std::integral_constant<int, 1>{}, h0); break;
    }
  }
}

// Below this many bytes a memory is taken as cache-resident (dots_rows_impl): a quarter of the
// 32 MiB L3 of the machines this was measured on.
constexpr int64_t kHotBytes = int64_t(8) << 20;

template <typename A>
constexpr int64_t kLineElems = 64 / sizeof(A);
template <typename A>
constexpr int64_t kPrefetchAhead = 16384 / sizeof(A);

// out[k * ldo + j] = <vecs[k], row_j> for k < K, j < nj (rows of stride D);
// with NORM also nrm2[j] = |row_j|^2. Each row element is loaded once for
// all K dots; the horizontal sums go four at a time (four heads of a slot,
// or the norms of four slots).
// Vector registers of the instruction set: whether a head group's keys (or
// accumulators) can stay in registers across the rows of a block.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

// DC > 0: rows of exactly DC full vectors (D = 64), the loop over them unrolled: no lane count
// to test and no tail per vector. With HOLD (D = 64 in float on AVX-512) the K keys are also held
// in registers for the whole block instead of reloaded for every row; with the row's DC loads that
// halves the loads per multiply-add. Without it (every head group on AVX2, whose 16 registers hold
// no group's keys beside the row) each key vector is an operand from L1: faster on rows in cache
// (write_read's logits of the rows it has just written: 850 -> 780 us a call at B = 16, N = 1,024;
// content addressing over a memory in L3: 210 -> 150 us), slower on rows streamed from DRAM
// (content addressing at N = 10^6: 25 -> 29 ms with four heads), so only where the caller says the
// rows are hot. The arithmetic, and so every bit of the result, is that of DC = 0.
template <int K, bool NORM, int DC, bool HOLD, typename A>
inline void dots_rows_impl(const A* const* vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo,
                           A* nrm2) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec kq[HOLD ? K : 1][HOLD ? DC : 1];
  if constexpr (HOLD) {
    for (int k = 0; k < K; ++k)
      for (int c = 0; c < DC; ++c) kq[k][c] = Vec::loadu(vecs[k] + c * V);
  }
  Vec accn[4];
  // Fewer than four heads: each head's dots of four consecutive rows are
  // reduced together (one transposing hsum4 instead of four full horizontal
  // sums; measured alike at N = 20000 and 10^7, kept as the cheaper form).
  Vec pend[K == 4 ? 1 : K][4];
  for (int64_t j = 0; j < nj; ++j) {
    const A* r = rows + j * D;
    // The first touch of a row streams it from DRAM: ask for the rows 16 KiB
    // ahead now (a prefetch past the end of the tensor cannot fault). At
    // N = 10^7 with the machine's bandwidth at its best, 16 KiB made the
    // read 58 -> 49 ms and the fused step 155 -> 138 ms against 4 KiB; 1 KiB
    // and 64 KiB were slower.
    for (int64_t d = 0; d < D; d += kLineElems<A>) __builtin_prefetch(r + kPrefetchAhead<A> + d);
    Vec acc[K];
    for (int k = 0; k < K; ++k) acc[k] = Vec(A(0));
    Vec an(A(0));
    if constexpr (DC > 0) {
      for (int c = 0; c < DC; ++c) {
        const Vec x = Vec::loadu(r + c * V);
        if constexpr (NORM) an = at::vec::fmadd(x, x, an);
        for (int k = 0; k < K; ++k) {
          if constexpr (HOLD) {
            acc[k] = at::vec::fmadd(x, kq[k][c], acc[k]);
          } else {
            acc[k] = at::vec::fmadd(x, Vec::loadu(vecs[k] + c * V), acc[k]);
          }
        }
      }
    } else {
      for (int64_t d = 0; d < D; d += V) {
        const int64_t m = std::min<int64_t>(V, D - d);
        const Vec x = load_n(r + d, m);
        if constexpr (NORM) an = at::vec::fmadd(x, x, an);
        for (int k = 0; k < K; ++k) acc[k] = at::vec::fmadd(x, load_n(vecs[k] + d, m), acc[k]);
      }
    }
    if constexpr (K == 4) {
      A t[4];
      hsum4(acc[0], acc[1], acc[2], acc[3], t);
      for (int k = 0; k < 4; ++k) out[k * ldo + j] = t[k];
    } else {
      for (int k = 0; k < K; ++k) pend[k][j & 3] = acc[k];
      if ((j & 3) == 3) {
        for (int k = 0; k < K; ++k) {
          A t[4];
          hsum4(pend[k][0], pend[k][1], pend[k][2], pend[k][3], t);
          for (int i = 0; i < 4; ++i) out[k * ldo + j - 3 + i] = t[i];
        }
      }
    }
    if constexpr (NORM) {
      accn[j & 3] = an;
      if ((j & 3) == 3) {
        hsum4(accn[0], accn[1], accn[2], accn[3], nrm2 + j - 3);
      }
    }
  }
  // The last (nj mod 4) rows go through hsum4 as well, beside zero vectors: its order of the additions
  // is not hsum's (AVX2: hadd pairs against halves first), and a slot's score must not depend on its
  // place in a group of four, or identical rows would get different weights.
  const int64_t j0 = nj & ~int64_t(3), rem = nj - j0;
  if (rem > 0) {
    A t[4];
    if constexpr (K != 4) {
      for (int k = 0; k < K; ++k) {
        for (int64_t i = rem; i < 4; ++i) pend[k][i] = Vec(A(0));
        hsum4(pend[k][0], pend[k][1], pend[k][2], pend[k][3], t);
        for (int64_t i = 0; i < rem; ++i) out[k * ldo + j0 + i] = t[i];
      }
    }
    if constexpr (NORM) {
      for (int64_t i = rem; i < 4; ++i) accn[i] = Vec(A(0));
      hsum4(accn[0], accn[1], accn[2], accn[3], t);
      for (int64_t i = 0; i < rem; ++i) nrm2[j0 + i] = t[i];
    }
  }
}

template <int K, bool NORM, typename A>
inline void dots_rows(const A* const* vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo, A* nrm2,
                      bool hot) {
  constexpr int64_t V = Vectorized<A>::size();
  constexpr int DC = static_cast<int>(64 / V);
  if constexpr (64 % V == 0) {
    // keys K*DC, accumulators K + 1, the row DC
    if constexpr (K * DC + K + 1 + DC <= kVecRegs) {
      if (D == 64) return dots_rows_impl<K, NORM, DC, true>(vecs, rows, nj, D, out, ldo, nrm2);
    } else {
      if (D == 64 && hot) return dots_rows_impl<K, NORM, DC, false>(vecs, rows, nj, D, out, ldo, nrm2);
    }
  }
  dots_rows_impl<K, NORM, 0, false>(vecs, rows, nj, D, out, ldo, nrm2);
}

// Dots of every row of the block with n_vecs vectors (vecs[i] at base + i*D),
// the first group also giving the squared row norms unless nrm2 is null. `hot`: the rows are in cache
// (dots_rows_impl). Each dot's value does not depend on the group it falls in, nor on the norms.
template <typename A>
inline void dots_block(const A* base, int64_t n_vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo,
                       A* nrm2, bool hot = false) {
  for_head_groups(n_vecs, [&](auto G, int64_t h0) {
    constexpr int K = decltype(G)::value;
    const A* v[K];
    for (int k = 0; k < K; ++k) v[k] = base + (h0 + k) * D;
    if (h0 == 0 && nrm2 != nullptr) {
      dots_rows<K, true>(v, rows, nj, D, out, ldo, nrm2, hot);
    } else {
      dots_rows<K, false>(v, rows, nj, D, out + h0 * ldo, ldo, static_cast<A*>(nullptr), hot);
    }
  });
}

// acc[k][:] += sum_j p[k * ldp + j] * row_j for k < K, j < nj.
template <int K, typename A>
inline void accumulate_rows(A* const* acc, const A* p, int64_t ldp, const A* rows, int64_t nj, int64_t D) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  constexpr int DC = static_cast<int>(64 / V);
  // Where the K accumulators of a 64-lane stretch of the row fit in the registers beside a broadcast and
  // one row vector (one head on AVX2, up to four on AVX-512): every accumulator in a register for the whole
  // block, 64 lanes a pass, so a row costs its loads and K broadcasts a pass, not K broadcasts per vector
  // (memory_read of one head at N = 10^6: 26 -> 16 ms on AVX2). Same sums in the same order. Two vectors a
  // pass for four heads on AVX2 measured no faster on rows in cache and 5-10% slower from DRAM.
  if constexpr (64 % V == 0 && K * DC + 2 <= kVecRegs) {
    if (D % 64 == 0) {
      for (int64_t d = 0; d < D; d += 64) {
        Vec a[K][DC];
        for (int k = 0; k < K; ++k)
          for (int c = 0; c < DC; ++c) a[k][c] = Vec::loadu(acc[k] + d + c * V);
        for (int64_t j = 0; j < nj; ++j) {
          Vec x[DC];
          for (int c = 0; c < DC; ++c) x[c] = Vec::loadu(rows + j * D + d + c * V);
          for (int k = 0; k < K; ++k) {
            const Vec pk(p[k * ldp + j]);
            for (int c = 0; c < DC; ++c) a[k][c] = at::vec::fmadd(pk, x[c], a[k][c]);
          }
        }
        for (int k = 0; k < K; ++k)
          for (int c = 0; c < DC; ++c) a[k][c].store(acc[k] + d + c * V);
      }
      return;
    }
  }
  for (int64_t d = 0; d < D; d += V) {
    const int64_t m = std::min<int64_t>(V, D - d);
    Vec a[K];
    for (int k = 0; k < K; ++k) a[k] = load_n(acc[k] + d, m);
    for (int64_t j = 0; j < nj; ++j) {
      const Vec x = load_n(rows + j * D + d, m);
      for (int k = 0; k < K; ++k) a[k] = at::vec::fmadd(Vec(p[k * ldp + j]), x, a[k]);
    }
    for (int k = 0; k < K; ++k) store_n(a[k], acc[k] + d, m);
  }
}

// The rows of a block go to accumulate_rows and combine_rows kSubRows at a time: their loops take the D
// lanes outermost, so each row (and its output row) is visited once per lane block, and a whole block of
// rows with its outputs (2 x 16 KiB of float, 2 x 32 KiB of double) would not stay in a 32 KiB L1 between
// those visits. Each row's arithmetic is unchanged, and so is the order of the sums over rows: bitwise the
// same results.
constexpr int64_t kSubRows = 16;

template <typename A>
inline void accumulate_block(A* acc, int64_t H, const A* p, int64_t ldp, const A* rows, int64_t nj, int64_t D) {
  for (int64_t j0 = 0; j0 < nj; j0 += kSubRows) {
    const int64_t nk = std::min<int64_t>(kSubRows, nj - j0);
    for_head_groups(H, [&](auto G, int64_t h0) {
      constexpr int K = decltype(G)::value;
      A* a[K];
      for (int k = 0; k < K; ++k) a[k] = acc + (h0 + k) * D;
      accumulate_rows<K>(a, p + h0 * ldp + j0, ldp, rows + j0 * D, nk, D);
    });
  }
}

// out_j = init_j + sum_k ca[k*ld + j] U[k] + cb[k*ld + j] Q[k] for j < nj,
// where init_j = -gamma[j] row_j (first group; 0 without gamma) or out_j;
// with `accum` the first group starts from out_j too (out_j - gamma[j] row_j).
// With X (first group, gamma given, no accum): one more head of the second
// kind and its own row coefficient, out_j += -gx[j] row_j + cx[j] qx, in the
// same sweep (a pending addressing gradient, dnc_write_read_kernels.h).
template <int K, bool HAS_A, bool HAS_B, bool X = false, typename A>
inline void combine_rows(A* out, const A* rows, int64_t nj, int64_t D, bool first, const A* gamma, const A* ca,
                         const A* const* U, const A* cb, const A* const* Q, int64_t ld, bool accum = false,
                         const A* gx = nullptr, const A* cx = nullptr, const A* qx = nullptr) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t d = 0; d < D; d += V) {
    const int64_t m = std::min<int64_t>(V, D - d);
    Vec u[K], q[K];
    for (int k = 0; k < K; ++k) {
      if constexpr (HAS_A) u[k] = load_n(U[k] + d, m);
      if constexpr (HAS_B) q[k] = load_n(Q[k] + d, m);
    }
    Vec qxv;
    if constexpr (X) qxv = load_n(qx + d, m);
    for (int64_t j = 0; j < nj; ++j) {
      Vec o;
      if (!first) {
        o = load_n(out + j * D + d, m);
      } else if (accum) {
        o = load_n(out + j * D + d, m);
        if (gamma != nullptr) o = at::vec::fmadd(Vec(-gamma[j]), load_n(rows + j * D + d, m), o);
      } else if (gamma != nullptr) {
        const Vec r = load_n(rows + j * D + d, m);
        o = Vec(-gamma[j]) * r;
        if constexpr (X) o = at::vec::fmadd(Vec(-gx[j]), r, o);
      } else {
        o = Vec(A(0));
      }
      for (int k = 0; k < K; ++k) {
        if constexpr (HAS_A) o = at::vec::fmadd(Vec(ca[k * ld + j]), u[k], o);
        if constexpr (HAS_B) o = at::vec::fmadd(Vec(cb[k * ld + j]), q[k], o);
      }
      if constexpr (X) o = at::vec::fmadd(Vec(cx[j]), qxv, o);
      store_n(o, out + j * D + d, m);
    }
  }
}

// combine_rows over H heads in groups; `accum` adds to what out holds. With gx (1 <= H <= 4, gamma given,
// no accum): combine_rows' extra head (X), gx and cx per row of the block, qx its vector.
template <bool HAS_A, bool HAS_B, typename A>
inline void combine_block(A* out, const A* rows, int64_t nj, int64_t D, int64_t H, const A* gamma, const A* ca,
                          const A* Ubase, const A* cb, const A* Qbase, int64_t ld, bool accum = false,
                          const A* gx = nullptr, const A* cx = nullptr, const A* qx = nullptr) {
  TORCH_INTERNAL_ASSERT(gx == nullptr || (H >= 1 && H <= 4 && gamma != nullptr && !accum));
  for (int64_t j0 = 0; j0 < nj; j0 += kSubRows) {  // see kSubRows
    const int64_t nk = std::min<int64_t>(kSubRows, nj - j0);
    for_head_groups(H, [&](auto G, int64_t h0) {
      constexpr int K = decltype(G)::value;
      const A* u[K];
      const A* q[K];
      for (int k = 0; k < K; ++k) {
        u[k] = HAS_A ? Ubase + (h0 + k) * D : nullptr;
        q[k] = HAS_B ? Qbase + (h0 + k) * D : nullptr;
      }
      auto rows_with = [&](auto x) {
        combine_rows<K, HAS_A, HAS_B, decltype(x)::value>(
            out + j0 * D, rows + j0 * D, nk, D, h0 == 0, gamma ? gamma + j0 : nullptr,
            HAS_A ? ca + h0 * ld + j0 : nullptr, u, HAS_B ? cb + h0 * ld + j0 : nullptr, q, ld, accum,
            gx ? gx + j0 : nullptr, gx ? cx + j0 : nullptr, qx);
      };
      if (gx != nullptr) {
        rows_with(std::true_type{});  // H <= 4: the only group
      } else {
        rows_with(std::false_type{});
      }
    });
  }
  if (H == 0) {
    if (accum) {
      if (gamma) for (int64_t i = 0; i < nj * D; ++i) out[i] -= gamma[i / D] * rows[i];
    } else {
      for (int64_t i = 0; i < nj * D; ++i) out[i] = gamma ? -gamma[i / D] * rows[i] : A(0);
    }
  }
}

// q[h] = k[h] / max(|k[h]|, eps) as F.normalize; knorm[h] = |k[h]| if asked.
template <typename T, typename A>
inline void normalize_keys(const T* k, int64_t H, int64_t D, A eps, A* q, A* knorm) {
  for (int64_t h = 0; h < H; ++h) {
    A* qh = q + h * D;
    for (int64_t d = 0; d < D; ++d) qh[d] = static_cast<A>(k[h * D + d]);
    const A nrm = std::sqrt(dot(qh, qh, D));
    if (knorm != nullptr) knorm[h] = nrm;
    const A inv = A(1) / std::max(nrm, eps);
    scale_(qh, D, inv);
  }
}

// Non-finite strengths and keys. The reference formula gives a head whose
// strength is inf or NaN, or whose key has an inf or NaN element, NaN
// weights, hence NaN reads, lse and gradients (the memory gradient of every
// slot of that memory included), while the clamped logits of the kernels
// would give finite numbers. The kernels follow the reference: such a head is
// computed as a zero key of strength 0, so that the arithmetic of the other
// heads sharing its blocks stays finite, and its outputs are then set to NaN.
// One check per (memory, head), nothing per slot; nothing raises, since a
// check on the GPU would need a synchronisation.
template <typename T>
inline bool head_finite(const T* key, T strength, int64_t D) {
  using A = acc_t<T>;
  A z = 0;  // x * 0 is NaN exactly when x is inf or NaN
  for (int64_t d = 0; d < D; ++d) z += static_cast<A>(key[d]) * A(0);
  return z == A(0) && std::isfinite(static_cast<A>(strength));
}

// normalize_keys plus the strengths of H heads; a head that head_finite
// rejects gets q = 0 and beta = 0 (and ok[h] = false when ok is given).
template <typename T, typename A>
inline void prepare_heads(const T* k, const T* s, int64_t H, int64_t D, A eps, A* q, A* beta,
                          bool* ok = nullptr) {
  normalize_keys(k, H, D, eps, q, static_cast<A*>(nullptr));
  for (int64_t h = 0; h < H; ++h) {
    const bool f = head_finite(k + h * D, s[h], D);
    if (ok != nullptr) ok[h] = f;
    beta[h] = f ? static_cast<A>(s[h]) : A(0);
    if (!f) std::fill(q + h * D, q + (h + 1) * D, A(0));
  }
}

// The (memory, head) pairs, as b * H + h, that head_finite rejects; usually
// none.
template <typename T>
std::vector<int64_t> nonfinite_heads(const T* keys, const T* str, int64_t B, int64_t H, int64_t D) {
  std::vector<int64_t> bad;
  for (int64_t i = 0; i < B * H; ++i)
    if (!head_finite(keys + i * D, str[i], D)) bad.push_back(i);
  return bad;
}

template <typename T>
inline void fill_nan(T* p, int64_t n) {
  std::fill(p, p + n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

// From squared row norms: inv[j] = 1 / max(|m_j|, eps) and gate[j] = inv^2
// where |m_j| > eps, else 0 (the clamped branch of F.normalize has no
// gradient through the norm).
template <typename A>
inline void row_scales(const A* nrm2, int64_t nj, A eps, A* inv, A* gate) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec veps(eps), one(A(1)), zero(A(0));
  for (int64_t j = 0; j < nj; j += V) {
    const int64_t m = std::min<int64_t>(V, nj - j);
    const Vec nrm = load_n(nrm2 + j, m).sqrt();
    const Vec iv = one / at::vec::maximum(nrm, veps);
    store_n(iv, inv + j, m);
    if (gate != nullptr) store_n(Vec::blendv(zero, iv * iv, nrm > veps), gate + j, m);
  }
}

// Logits of a block in place: s[h*ld + j] = clamp(beta[h] * s[h*ld + j] * inv[j]).
template <typename A>
inline void scale_logits(A* s, int64_t H, int64_t nj, int64_t ld, const A* beta, const A* inv) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec lo(-std::numeric_limits<A>::max()), hi(std::numeric_limits<A>::max());
  for (int64_t h = 0; h < H; ++h) {
    A* sh = s + h * ld;
    const Vec bh(beta[h]);
    for (int64_t j = 0; j < nj; j += V) {
      const int64_t m = std::min<int64_t>(V, nj - j);
      store_n(at::vec::clamp(bh * (load_n(sh + j, m) * load_n(inv + j, m)), lo, hi), sh + j, m);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

// CPU kernels of the memory ops, written once over at::vec::Vectorized and
// compiled once per instruction set (see kernel_table.h). Include only from a
// memory_kernels_*.cpp, after kernel_prelude.h and after defining
// CPU_CAPABILITY. The replay sum tree's inner loops are at the end of the
// file (pow_inplace in double and float, tree_level, tree_find); the AVX-512
// forms of the last two use intrinsics directly, since they shuffle within
// one 8-double line.
//
// Design
// - Work unit: (memory b, chunk of slots). Chunk sizes depend on the shape
//   only, never on the thread count, so results are bitwise reproducible
//   whatever at::parallel_for decides. Small problems form one chunk per
//   memory and run inline on the calling thread: at N=128 a thread handoff
//   costs more than the arithmetic.
// - Reductions over slots (the online softmax of content_read, the key and
//   strength gradients, the erase/add gradients) keep one partial record
//   per chunk, combined afterwards in chunk order: deterministic, no atomics.
// - Within a chunk, slots go in blocks of up to 256 rows (16 KiB of float):
//   first every head's dot product with every row of the block (one load of
//   a row element feeds all heads), then the softmax arithmetic vectorised
//   over the block, then the weighted row sums with the D loop outermost so
//   that each head's accumulator lives in a register while the rows of the
//   block, still in L1, stream past.
// - content_read is FlashAttention's single-query recipe with L2-normalised
//   keys: the running (max, sum, acc) per head is rescaled only when a block
//   raises the max; logits are clamped to the finite range so that any
//   finite strength gives finite weights. Its backward recomputes the weights
//   block by block: (B,H,N) never exists. Half inputs recompute them with
//   the softmax's own max and sum and the correction term delta from float
//   intermediates, in one more pass, never from the half reads or weights
//   of the forward (see addressing_backward_typed).
// - A head with a non-finite strength or key gets NaN outputs, as the
//   reference formula gives (see head_finite).
// - Half and bfloat16 rows are widened to float once per block; everything
//   accumulates in at::opmath_type (float for half, else the input type).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including memory_kernels.h"
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

// x[j] = exp(x[j] - shift) * scale; returns the sum of the new x.
template <typename A>
inline A exp_shift(A* x, int64_t n, A shift, A scale = A(1)) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vs(shift), vc(scale);
  Vec acc(A(0));
  for (int64_t j = 0; j < n; j += V) {
    const int64_t m = std::min<int64_t>(V, n - j);
    Vec e = (load_n(x + j, m) - vs).exp() * vc;
    // Padded lanes hold exp(-shift): keep them out of the sum.
    if (m < V) e = Vec::set(Vec(A(0)), e, m);
    store_n(e, x + j, m);
    acc = acc + e;
  }
  return hsum(acc);
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

// DC > 0: rows of exactly DC full vectors (D = 64 in float on AVX-512), the
// K keys held in registers for the whole block instead of reloaded for every
// row; with the row's DC loads that halves the loads per multiply-add. The
// arithmetic, and so every bit of the result, is that of DC = 0.
template <int K, bool NORM, int DC, typename A>
inline void dots_rows_impl(const A* const* vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo,
                           A* nrm2) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  Vec kq[DC > 0 ? K : 1][DC > 0 ? DC : 1];
  if constexpr (DC > 0) {
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
        for (int k = 0; k < K; ++k) acc[k] = at::vec::fmadd(x, kq[k][c], acc[k]);
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
  for (int64_t j = nj & ~int64_t(3); j < nj; ++j) {
    if constexpr (K != 4) {
      for (int k = 0; k < K; ++k) out[k * ldo + j] = hsum(pend[k][j & 3]);
    }
    if constexpr (NORM) nrm2[j] = hsum(accn[j & 3]);
  }
}

template <int K, bool NORM, typename A>
inline void dots_rows(const A* const* vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo, A* nrm2) {
  constexpr int64_t V = Vectorized<A>::size();
  constexpr int DC = static_cast<int>(64 / V);
  // keys K*DC, accumulators K + 1, the row DC
  if constexpr (64 % V == 0 && K * DC + K + 1 + DC <= kVecRegs) {
    if (D == 64) return dots_rows_impl<K, NORM, DC>(vecs, rows, nj, D, out, ldo, nrm2);
  }
  dots_rows_impl<K, NORM, 0>(vecs, rows, nj, D, out, ldo, nrm2);
}

// Dots of every row of the block with n_vecs vectors (vecs[i] at base + i*D),
// the first group also giving the squared row norms.
template <typename A>
inline void dots_block(const A* base, int64_t n_vecs, const A* rows, int64_t nj, int64_t D, A* out, int64_t ldo,
                       A* nrm2) {
  for_head_groups(n_vecs, [&](auto G, int64_t h0) {
    constexpr int K = decltype(G)::value;
    const A* v[K];
    for (int k = 0; k < K; ++k) v[k] = base + (h0 + k) * D;
    if (h0 == 0) {
      dots_rows<K, true>(v, rows, nj, D, out, ldo, nrm2);
    } else {
      dots_rows<K, false>(v, rows, nj, D, out + h0 * ldo, ldo, static_cast<A*>(nullptr));
    }
  });
}

// acc[k][:] += sum_j p[k * ldp + j] * row_j for k < K, j < nj.
template <int K, typename A>
inline void accumulate_rows(A* const* acc, const A* p, int64_t ldp, const A* rows, int64_t nj, int64_t D) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  constexpr int DC = static_cast<int>(64 / V);
  if constexpr (64 % V == 0 && K * DC + DC + 1 <= kVecRegs) {
    if (D == 64) {
      // Rows of DC full vectors: every accumulator in a register for the
      // whole block, so a row costs its DC loads and K broadcasts, not
      // K broadcasts per vector of the row. Same sums in the same order.
      Vec a[K][DC];
      for (int k = 0; k < K; ++k)
        for (int c = 0; c < DC; ++c) a[k][c] = Vec::loadu(acc[k] + c * V);
      for (int64_t j = 0; j < nj; ++j) {
        Vec x[DC];
        for (int c = 0; c < DC; ++c) x[c] = Vec::loadu(rows + j * 64 + c * V);
        for (int k = 0; k < K; ++k) {
          const Vec pk(p[k * ldp + j]);
          for (int c = 0; c < DC; ++c) a[k][c] = at::vec::fmadd(pk, x[c], a[k][c]);
        }
      }
      for (int k = 0; k < K; ++k)
        for (int c = 0; c < DC; ++c) a[k][c].store(acc[k] + c * V);
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

template <typename A>
inline void accumulate_block(A* acc, int64_t H, const A* p, int64_t ldp, const A* rows, int64_t nj, int64_t D) {
  for_head_groups(H, [&](auto G, int64_t h0) {
    constexpr int K = decltype(G)::value;
    A* a[K];
    for (int k = 0; k < K; ++k) a[k] = acc + (h0 + k) * D;
    accumulate_rows<K>(a, p + h0 * ldp, ldp, rows, nj, D);
  });
}

// out_j = init_j + sum_k ca[k*ld + j] U[k] + cb[k*ld + j] Q[k] for j < nj,
// where init_j = -gamma[j] row_j (first group; 0 without gamma) or out_j.
template <int K, bool HAS_A, bool HAS_B, typename A>
inline void combine_rows(A* out, const A* rows, int64_t nj, int64_t D, bool first, const A* gamma, const A* ca,
                         const A* const* U, const A* cb, const A* const* Q, int64_t ld) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t d = 0; d < D; d += V) {
    const int64_t m = std::min<int64_t>(V, D - d);
    Vec u[K], q[K];
    for (int k = 0; k < K; ++k) {
      if constexpr (HAS_A) u[k] = load_n(U[k] + d, m);
      if constexpr (HAS_B) q[k] = load_n(Q[k] + d, m);
    }
    for (int64_t j = 0; j < nj; ++j) {
      Vec o;
      if (!first) {
        o = load_n(out + j * D + d, m);
      } else if (gamma != nullptr) {
        o = Vec(-gamma[j]) * load_n(rows + j * D + d, m);
      } else {
        o = Vec(A(0));
      }
      for (int k = 0; k < K; ++k) {
        if constexpr (HAS_A) o = at::vec::fmadd(Vec(ca[k * ld + j]), u[k], o);
        if constexpr (HAS_B) o = at::vec::fmadd(Vec(cb[k * ld + j]), q[k], o);
      }
      store_n(o, out + j * D + d, m);
    }
  }
}

template <bool HAS_A, bool HAS_B, typename A>
inline void combine_block(A* out, const A* rows, int64_t nj, int64_t D, int64_t H, const A* gamma, const A* ca,
                          const A* Ubase, const A* cb, const A* Qbase, int64_t ld) {
  for_head_groups(H, [&](auto G, int64_t h0) {
    constexpr int K = decltype(G)::value;
    const A* u[K];
    const A* q[K];
    for (int k = 0; k < K; ++k) {
      u[k] = HAS_A ? Ubase + (h0 + k) * D : nullptr;
      q[k] = HAS_B ? Qbase + (h0 + k) * D : nullptr;
    }
    combine_rows<K, HAS_A, HAS_B>(out, rows, nj, D, h0 == 0, gamma, HAS_A ? ca + h0 * ld : nullptr, u,
                                  HAS_B ? cb + h0 * ld : nullptr, q, ld);
  });
  if (H == 0) {
    for (int64_t i = 0; i < nj * D; ++i) out[i] = gamma ? -gamma[i / D] * rows[i] : A(0);
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

// ---------------------------------------------------------------------------
// content_addressing
// ---------------------------------------------------------------------------
template <typename T>
void content_addressing_typed(const at::Tensor& memory_t, const at::Tensor& keys_t, const at::Tensor& str_t,
                              double eps_d, at::Tensor& out_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = keys_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  T* out = out_t.data_ptr<T>();
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * (H + 1));
  const int64_t C = ch.count;

  // Logits land in the output itself for float/double, else in a float buffer.
  std::vector<A> logit_buf(std::is_same_v<T, A> ? 0 : B * H * N);
  A* logits = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) : logit_buf.data();
  std::vector<A> part(B * C * H * 2);  // per (b, chunk, h): max, sum of exp

  at::parallel_for(0, B * C, grain_for(ch.size * D * (H + 1)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(H * D), beta(H), nrm2(BS), inv(BS), rowbuf(std::is_same_v<T, A> ? 1 : BS * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * H * D, str + b * H, H, D, eps, q.data(), beta.data());
      A* lg = logits + b * H * N;
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        dots_block(q.data(), H, rows, nj, D, lg + nb, N, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(lg + nb, H, nj, N, beta.data(), inv.data());
      }
      for (int64_t h = 0; h < H; ++h) {
        const A* sh = lg + h * N + n0;
        const A m = max_of(sh, n1 - n0);
        A l = 0;
        for (int64_t j = 0; j < n1 - n0; ++j) l += std::exp(sh[j] - m);
        part[(t * H + h) * 2] = m;
        part[(t * H + h) * 2 + 1] = l;
      }
    }
  });

  // Global max and normaliser per (b, h), combined in chunk order.
  const std::vector<A> stats = combine_max_sum(part, B, C, H);

  // w = exp(s - max) / sum, as torch.softmax: exact where exp(s - lse) is not.
  at::parallel_for(0, B * C, grain_for(ch.size * H * 8), [&](int64_t t0, int64_t t1) {
    Scratch<A> tmp(std::is_same_v<T, A> ? 1 : ch.size);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      for (int64_t h = 0; h < H; ++h) {
        A* sh = logits + (b * H + h) * N + n0;
        const A* st = &stats[(b * H + h) * 2];
        if constexpr (std::is_same_v<T, A>) {
          exp_shift(sh, n1 - n0, st[0], st[1]);
        } else {
          std::memcpy(tmp.data(), sh, sizeof(A) * (n1 - n0));
          exp_shift(tmp.data(), n1 - n0, st[0], st[1]);
          narrow(tmp.data(), out + (b * H + h) * N + n0, n1 - n0);
        }
      }
    }
  });
  for (const int64_t i : nonfinite_heads(keys, str, B, H, D)) fill_nan(out + i * N, N);
}

// ---------------------------------------------------------------------------
// backward of content addressing: shared by content_addressing_backward
// (FUSED=false: weights and their gradient given) and content_read_backward
// (FUSED=true: weights recomputed, dw_n = g . m_n).
//   ds_n = w_n (dw_n - delta), delta = sum_n w_n dw_n
//   dbeta = sum_n ds_n c_n; dc_n = beta ds_n
//   dm_n = [w_n g] + dc_n inv_n (q - c_n m_n inv_n)   (q/eps where |m_n| <= eps)
//   dq = sum_n dc_n inv_n m_n; dk = (dq - (dq.q) q)/|k|  (dq/eps where |k| <= eps)
//
// content_read_backward is, for any reads and lse it is given, the gradient
// with w_n = exp(s_n - lse) and delta = g . reads (a sharded memory passes
// the global lse and reads, for its share of the global gradient). But delta
// is a difference of near-equal numbers wherever the softmax is peaked, and
// every gradient carries ds, times the strength: from half-precision reads
// (or weights), their rounding times the strength lands in every gradient.
// So where the given lse is this memory's own (to float rounding), the
// weights and delta come from the same float intermediates as dw instead:
//   w_n = exp(s_n - M) / L, delta = sum_n exp(s_n - M) dw_n / L,
// with M, L the max and normaliser of the logits recomputed here ("exact").
// Half inputs take that form in one extra pass over the memory that gathers
// (M, L, delta) per (b, h), or inside the main pass when the whole memory is
// one block; float/double only in that one-block case, where it is free (and
// makes the N = 1 gradient exactly 0: w = 1, delta = dw). Above one block
// they keep delta = g . reads, whose rounding is that of float itself.
// content_addressing_backward with half inputs always recomputes its weights
// so (its `weights` are the forward's output, rounded to half).
// ---------------------------------------------------------------------------
// Logits of a block for H heads: w[h*BS + j] = clamp(beta[h] * c[h*BS + j] * inv[j]).
template <typename A>
inline void block_logits(A* w, const A* c, const A* inv, const A* beta, int64_t H, int64_t nj, int64_t BS) {
  for (int64_t h = 0; h < H; ++h) {
    A* wh = w + h * BS;
    const A* ch = c + h * BS;
    for (int64_t j = 0; j < nj; ++j) wh[j] = clamp_finite(beta[h] * (ch[j] * inv[j]));
  }
}

// Whether a given logsumexp is the one recomputed as M + log L, to the
// rounding of a float lse computed in another order (for float32: at |lse|
// ~ 1e4 about 1e-3; a sharded memory's global lse differs from its local one
// by -log of the rank's share of the mass).
template <typename A>
inline bool same_lse(A given, A M, A L) {
  const A mine = M + std::log(L);
  constexpr A rel = std::is_same_v<A, double> ? A(0x1p-44) : A(0x1p-19);
  return std::abs(given - mine) <= rel * (A(1) + std::abs(mine));
}

template <typename T, bool FUSED>
void addressing_backward_typed(const at::Tensor* grad_reads_t, const at::Tensor* reads_t, const at::Tensor* lse_t,
                               const at::Tensor* grad_w_t, const at::Tensor* w_t, const at::Tensor& memory_t,
                               const at::Tensor& keys_t, const at::Tensor& str_t, double eps_d, at::Tensor& dm_t,
                               at::Tensor& dk_t, at::Tensor& ds_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = keys_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  T* dm = dm_t.data_ptr<T>();
  T* dk = dk_t.data_ptr<T>();
  T* dstr = ds_t.data_ptr<T>();
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  const int64_t nvec = FUSED ? 2 * H : H;  // dots per row: keys (and grad of reads)
  const Chunks ch = make_chunks(N, D * (nvec + 1 + 3 * H));
  const int64_t C = ch.count;
  constexpr bool kHalf = !std::is_same_v<T, A>;
  const bool one_block = C == 1 && N <= BS;
  // Weights recomputed as exp(s - M) / L: always for half, else one block of
  // content_read; gathered in a pass of their own unless one block.
  const bool recompute = kHalf || (FUSED && one_block);
  const bool prepass = recompute && !one_block;
  const T* gw_all = FUSED ? nullptr : grad_w_t->const_data_ptr<T>();
  const A* lse_in = FUSED ? lse_t->const_data_ptr<A>() : nullptr;

  // Per (b, h): w = exp(s - shift) * scale, delta, and whether (shift,
  // scale) = (M, 1/L) were recomputed here.
  std::vector<A> shift(B * H), scale(B * H, A(1)), delta(B * H);
  std::vector<char> exact(B * H, 0);

  // delta = g . reads, for the heads that use the given reads and lse.
  auto given_delta = [&](int64_t i) {
    const T* gr = grad_reads_t->const_data_ptr<T>() + i * D;
    const T* rd = reads_t->const_data_ptr<T>() + i * D;
    A s = 0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<A>(gr[d]) * static_cast<A>(rd[d]);
    return s;
  };
  // Sets head i's weights and delta from its recomputed (M, L, T = sum exp(s - M) dw).
  auto choose = [&](int64_t i, A M, A L, A Tt) {
    exact[i] = !FUSED || same_lse(lse_in[i], M, L);
    if (!exact[i]) {
      shift[i] = lse_in[i];
      scale[i] = A(1);
      delta[i] = given_delta(i);
    } else {
      shift[i] = M;
      scale[i] = A(1) / L;
      delta[i] = Tt * scale[i];
    }
  };

  // Loads the head vectors of memory b: q (and, fused, g after it) in vecs,
  // the strengths in beta.
  auto load_vecs = [&](int64_t b, A* vecs, A* beta) {
    prepare_heads(keys + b * H * D, str + b * H, H, D, eps, vecs, beta);
    if constexpr (FUSED) {
      const T* gr = grad_reads_t->const_data_ptr<T>() + b * H * D;
      for (int64_t i = 0; i < H * D; ++i) vecs[H * D + i] = static_cast<A>(gr[i]);
    }
  };
  // dw of head h in the block at nb: the dots with g (fused), or the given
  // grad of the weights widened into buf + h * BS.
  auto block_dw = [&](int64_t b, int64_t h, int64_t nb, int64_t nj, const A* dots, A* buf) -> const A* {
    if constexpr (FUSED) {
      (void)b, (void)nb, (void)nj, (void)buf;
      return dots + (H + h) * BS;
    } else {
      return widen(gw_all + (b * H + h) * N + nb, buf + h * BS, nj);
    }
  };

  if (prepass) {
    // Per (b, chunk, h) a running (max, sum of exp, sum of exp * dw),
    // combined in chunk order.
    std::vector<A> part(B * C * H * 3);
    at::parallel_for(0, B * C, grain_for(ch.size * D * (nvec + 1)), [&](int64_t t0, int64_t t1) {
      Scratch<A> vecs(nvec * D), beta(H), dots(nvec * BS), nrm2(BS), inv(BS), s(H * BS);
      Scratch<A> rowbuf(kHalf ? BS * D : 1), gwl(FUSED ? 1 : H * BS);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
        load_vecs(b, vecs.data(), beta.data());
        A* p = &part[t * H * 3];
        for (int64_t h = 0; h < H; ++h) {
          p[3 * h] = -std::numeric_limits<A>::infinity();
          p[3 * h + 1] = p[3 * h + 2] = 0;
        }
        for (int64_t nb = n0; nb < n1; nb += BS) {
          const int64_t nj = std::min(BS, n1 - nb);
          const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
          dots_block(vecs.data(), nvec, rows, nj, D, dots.data(), BS, nrm2.data());
          row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
          block_logits(s.data(), dots.data(), inv.data(), beta.data(), H, nj, BS);
          for (int64_t h = 0; h < H; ++h) {
            A* sh = s.data() + h * BS;
            A* ph = p + 3 * h;
            const A bm = max_of(sh, nj);
            if (bm > ph[0]) {
              const A f = std::exp(ph[0] - bm);
              ph[1] *= f;
              ph[2] *= f;
              ph[0] = bm;
            }
            ph[1] += exp_shift(sh, nj, ph[0]);
            ph[2] += dot(sh, block_dw(b, h, nb, nj, dots.data(), gwl.data()), nj);
          }
        }
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        A M = -std::numeric_limits<A>::infinity();
        for (int64_t c = 0; c < C; ++c) M = std::max(M, part[((b * C + c) * H + h) * 3]);
        A L = 0, Tt = 0;
        for (int64_t c = 0; c < C; ++c) {
          const A* p = &part[((b * C + c) * H + h) * 3];
          const A f = std::exp(p[0] - M);
          L += p[1] * f;
          Tt += p[2] * f;
        }
        choose(b * H + h, M, L, Tt);
      }
    }
  } else if (!recompute) {
    if constexpr (FUSED) {
      for (int64_t i = 0; i < B * H; ++i) {
        shift[i] = lse_in[i];
        delta[i] = given_delta(i);
      }
    } else {
      const T* w = w_t->const_data_ptr<T>();
      at::parallel_for(0, B * H, grain_for(N), [&](int64_t i0, int64_t i1) {
        constexpr int64_t kPiece = 1024;
        Scratch<A> a(kPiece), bb(kPiece);
        for (int64_t i = i0; i < i1; ++i) {
          A s = 0;
          for (int64_t n = 0; n < N; n += kPiece) {
            const int64_t m = std::min(kPiece, N - n);
            s += dot(widen(w + i * N + n, a.data(), m), widen(gw_all + i * N + n, bb.data(), m), m);
          }
          delta[i] = s;
        }
      });
    }
  }

  const int64_t rec = H * (D + 1);  // per (b, chunk): dq[H*D], dbeta[H]
  std::vector<A> part(C > 1 ? B * C * rec : 0);
  std::vector<A> finals(C > 1 ? 0 : B * rec);

  at::parallel_for(0, B * C, grain_for(ch.size * D * (nvec + 1 + 3 * H)), [&](int64_t t0, int64_t t1) {
    // vecs: q (H*D) then, fused, g (H*D); dots: H*BS cos then H*BS dw.
    Scratch<A> vecs(nvec * D), beta(H), dots((nvec)*BS), nrm2(BS), inv(BS), gate(BS), gam(BS);
    Scratch<A> w(H * BS), bq(H * BS), rowbuf(kHalf ? BS * D : 1);
    Scratch<A> dmbuf(kHalf ? BS * D : 1), gwl(FUSED ? 1 : H * BS);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      A* q = vecs.data();
      load_vecs(b, vecs.data(), beta.data());
      A* r = C > 1 ? &part[t * rec] : &finals[b * rec];
      A* dq = r;
      A* dbeta = r + H * D;
      std::fill(r, r + rec, A(0));
      const A* dl = &delta[b * H];

      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        dots_block(vecs.data(), nvec, rows, nj, D, dots.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), gate.data());
        const A* wp = nullptr;  // weights of the block, ld BS (recomputed) or N (given)
        const A* gwp = nullptr;
        int64_t ldw = BS;
        if (FUSED || recompute) {
          block_logits(w.data(), dots.data(), inv.data(), beta.data(), H, nj, BS);
          if constexpr (!FUSED) {
            // (Only half inputs get here: widen copies into gwl.)
            for (int64_t h = 0; h < H; ++h) block_dw(b, h, nb, nj, dots.data(), gwl.data());
          }
          for (int64_t h = 0; h < H; ++h) {
            A* wh = w.data() + h * BS;
            const int64_t i = b * H + h;
            if (recompute && one_block) {
              // All N slots are in this block: (M, L, T) from them.
              const A M = max_of(wh, nj);
              const A L = exp_shift(wh, nj, M);
              const A Tt = dot(wh, FUSED ? dots.data() + (H + h) * BS : gwl.data() + h * BS, nj);
              choose(i, M, L, Tt);
              if (exact[i]) {
                scale_(wh, nj, scale[i]);
                continue;
              }
              // The given lse: the logits again, for exp(s - lse).
              block_logits(wh, dots.data() + h * BS, inv.data(), beta.data() + h, 1, nj, BS);
            }
            exp_shift(wh, nj, shift[i], scale[i]);
          }
          wp = w.data();
          gwp = FUSED ? dots.data() + H * BS : gwl.data();
        } else if constexpr (!kHalf) {
          // float/double content_addressing: the given weights.
          wp = w_t->const_data_ptr<T>() + b * H * N + nb;
          gwp = gw_all + b * H * N + nb;
          ldw = N;
        }
        for (int64_t j = 0; j < nj; ++j) gam[j] = 0;
        for (int64_t h = 0; h < H; ++h) {
          const A* cosh = dots.data() + h * BS;
          const A bh = beta[h], dh = dl[h];
          A* bqh = bq.data() + h * BS;
          A db = 0;
          for (int64_t j = 0; j < nj; ++j) {
            const A cj = cosh[j] * inv[j];
            const A dsj = wp[h * ldw + j] * (gwp[h * ldw + j] - dh);
            db += dsj * cj;
            const A dc = bh * dsj;
            bqh[j] = dc * inv[j];
            gam[j] += dc * cj;
          }
          dbeta[h] += db;
        }
        for (int64_t j = 0; j < nj; ++j) gam[j] *= gate[j];
        A* dmrow = kHalf ? dmbuf.data() : reinterpret_cast<A*>(dm + (b * N + nb) * D);
        if constexpr (FUSED) {
          combine_block<true, true>(dmrow, rows, nj, D, H, gam.data(), wp, vecs.data() + H * D, bq.data(), q, BS);
        } else {
          combine_block<false, true>(dmrow, rows, nj, D, H, gam.data(), static_cast<const A*>(nullptr),
                                     static_cast<const A*>(nullptr), bq.data(), q, BS);
        }
        if constexpr (kHalf) narrow(dmbuf.data(), dm + (b * N + nb) * D, nj * D);
        accumulate_block(dq, H, bq.data(), BS, rows, nj, D);
      }
    }
  });

  // Combine chunks in order, then dk = projection of dq off q, scaled by 1/|k|.
  at::parallel_for(0, B, grain_for(C * rec), [&](int64_t b0, int64_t b1) {
    Scratch<A> kk(H * D), kn(H), dq(H * D);
    for (int64_t b = b0; b < b1; ++b) {
      const A* r;
      if (C > 1) {
        std::fill(dq.data(), dq.data() + H * D, A(0));
        A* acc = dq.data();
        std::vector<A> sum(rec, A(0));
        for (int64_t c = 0; c < C; ++c) {
          const A* p = &part[(b * C + c) * rec];
          for (int64_t i = 0; i < rec; ++i) sum[i] += p[i];
        }
        std::memcpy(acc, sum.data(), sizeof(A) * H * D);
        for (int64_t h = 0; h < H; ++h) dstr[b * H + h] = static_cast<T>(sum[H * D + h]);
        r = acc;
      } else {
        const A* f = &finals[b * rec];
        for (int64_t h = 0; h < H; ++h) dstr[b * H + h] = static_cast<T>(f[H * D + h]);
        r = f;
      }
      normalize_keys(keys + b * H * D, H, D, eps, kk.data(), kn.data());
      for (int64_t h = 0; h < H; ++h) {
        const A* dqh = r + h * D;
        const A* qh = kk.data() + h * D;
        T* out = dk + (b * H + h) * D;
        if (kn[h] > eps) {
          const A proj = dot(dqh, qh, D);
          const A s = A(1) / kn[h];
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>((dqh[d] - proj * qh[d]) * s);
        } else {
          const A s = A(1) / eps;
          for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(dqh[d] * s);
        }
      }
    }
  });

  // A non-finite head: NaN gradients for its key and strength, and for every
  // slot of its memory, which its NaN weights reach.
  for (const int64_t i : nonfinite_heads(keys, str, B, H, D)) {
    fill_nan(dk + i * D, D);
    dstr[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    fill_nan(dm + (i / H) * N * D, N * D);
  }
}

// ---------------------------------------------------------------------------
// memory_read and its backward
// ---------------------------------------------------------------------------
template <typename T>
void memory_read_typed(const at::Tensor& memory_t, const at::Tensor& w_t, at::Tensor& reads_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = w_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  T* reads = reads_t.data_ptr<T>();
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * H);
  const int64_t C = ch.count;
  const int64_t rec = H * D;
  std::vector<A> part(C > 1 ? B * C * rec : 0);

  at::parallel_for(0, B * C, grain_for(ch.size * D * H), [&](int64_t t0, int64_t t1) {
    Scratch<A> acc(rec), rowbuf(std::is_same_v<T, A> ? 1 : BS * D), wbuf(std::is_same_v<T, A> ? 1 : H * BS);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      A* a = C > 1 ? &part[t * rec] : acc.data();
      std::fill(a, a + rec, A(0));
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        const T* wsrc = w + b * H * N + nb;
        if constexpr (std::is_same_v<T, A>) {
          accumulate_block(a, H, wsrc, N, rows, nj, D);
        } else {
          for (int64_t h = 0; h < H; ++h) widen(wsrc + h * N, wbuf.data() + h * BS, nj);
          accumulate_block(a, H, wbuf.data(), BS, rows, nj, D);
        }
      }
      if (C == 1) narrow(a, reads + b * rec, rec);
    }
  });
  if (C > 1) {
    at::parallel_for(0, B, grain_for(C * rec), [&](int64_t b0, int64_t b1) {
      std::vector<A> sum(rec);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(sum.begin(), sum.end(), A(0));
        for (int64_t c = 0; c < C; ++c) {
          const A* p = &part[(b * C + c) * rec];
          for (int64_t i = 0; i < rec; ++i) sum[i] += p[i];
        }
        narrow(sum.data(), reads + b * rec, rec);
      }
    });
  }
}

// dm_n = sum_h w[h,n] g_h; dw[h,n] = g_h . m_n. No reduction over slots.
template <typename T>
void memory_read_backward_typed(const at::Tensor& gr_t, const at::Tensor& memory_t, const at::Tensor& w_t,
                                at::Tensor& dm_t, at::Tensor& dw_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = w_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  const T* gr = gr_t.const_data_ptr<T>();
  T* dm = dm_t.data_ptr<T>();
  T* dw = dw_t.data_ptr<T>();
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, 2 * D * H);
  const int64_t C = ch.count;

  at::parallel_for(0, B * C, grain_for(ch.size * 2 * D * H), [&](int64_t t0, int64_t t1) {
    Scratch<A> g(H * D), dots(H * BS), wbuf(H * BS), rowbuf(std::is_same_v<T, A> ? 1 : BS * D);
    Scratch<A> dmbuf(std::is_same_v<T, A> ? 1 : BS * D), unused(BS);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      for (int64_t i = 0; i < H * D; ++i) g[i] = static_cast<A>(gr[b * H * D + i]);
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        dots_block(g.data(), H, rows, nj, D, dots.data(), BS, unused.data());
        for (int64_t h = 0; h < H; ++h) {
          narrow(dots.data() + h * BS, dw + (b * H + h) * N + nb, nj);
          widen(w + (b * H + h) * N + nb, wbuf.data() + h * BS, nj);
          if constexpr (std::is_same_v<T, A>) {
            std::memcpy(wbuf.data() + h * BS, w + (b * H + h) * N + nb, sizeof(A) * nj);
          }
        }
        A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dm + (b * N + nb) * D) : dmbuf.data();
        combine_block<true, false>(out, rows, nj, D, H, static_cast<const A*>(nullptr), wbuf.data(), g.data(),
                                   static_cast<const A*>(nullptr), static_cast<const A*>(nullptr), BS);
        if constexpr (!std::is_same_v<T, A>) narrow(dmbuf.data(), dm + (b * N + nb) * D, nj * D);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// content_read: one pass, online softmax, partial (max, sum, acc) per chunk
// ---------------------------------------------------------------------------
// With write heads (W > 0, wkeys (B,W,D), wstr (B,W)), the same pass also
// gathers each write head's softmax (max, sum) per chunk into `wpart`
// ([b][chunk][w][2], for combine_max_sum; the chunk count is written to
// *wchunks): the first pass of the write, fused into the read, so that a
// read-then-write step streams the memory twice instead of three times.
template <typename T>
void content_read_typed(const at::Tensor& memory_t, const at::Tensor& keys_t, const at::Tensor& str_t,
                        double eps_d, at::Tensor& reads_t, at::Tensor& lse_t, const at::Tensor* wkeys_t = nullptr,
                        const at::Tensor* wstr_t = nullptr, std::vector<acc_t<T>>* wpart = nullptr,
                        int64_t* wchunks = nullptr) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = keys_t.size(1);
  const int64_t W = wkeys_t != nullptr ? wkeys_t->size(1) : 0, HW = H + W;
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  const T* wkeys = W > 0 ? wkeys_t->const_data_ptr<T>() : nullptr;
  const T* wstr = W > 0 ? wstr_t->const_data_ptr<T>() : nullptr;
  T* reads = reads_t.data_ptr<T>();
  A* lse = lse_t.data_ptr<A>();
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  // Chunks as for a read alone, so that the reads do not depend on W.
  const Chunks ch = make_chunks(N, D * (2 * H + 1));
  const int64_t C = ch.count;
  const int64_t rec = H * (D + 2);  // per (b, chunk): max[H], sum[H], acc[H*D]
  std::vector<A> part(C > 1 ? B * C * rec : 0);
  if (W > 0) {
    wpart->assign(B * C * W * 2, A(0));
    *wchunks = C;
  }

  at::parallel_for(0, B * C, grain_for(ch.size * D * (2 * H + W + 1)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(HW * D), beta(HW), s(HW * BS), nrm2(BS), inv(BS), local(rec);
    Scratch<A> rowbuf(std::is_same_v<T, A> ? 1 : BS * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * H * D, str + b * H, H, D, eps, q.data(), beta.data());
      A* wp = nullptr;
      if (W > 0) {
        // (A non-finite write head: its weights are made NaN by the write pass.)
        prepare_heads(wkeys + b * W * D, wstr + b * W, W, D, eps, q.data() + H * D, beta.data() + H);
        wp = &(*wpart)[t * W * 2];
        for (int64_t k = 0; k < W; ++k) wp[2 * k] = -std::numeric_limits<A>::infinity();
      }
      A* r = C > 1 ? &part[t * rec] : local.data();
      A* mx = r;
      A* sm = r + H;
      A* acc = r + 2 * H;
      for (int64_t h = 0; h < H; ++h) {
        mx[h] = -std::numeric_limits<A>::infinity();
        sm[h] = 0;
      }
      std::fill(acc, acc + H * D, A(0));

      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        dots_block(q.data(), HW, rows, nj, D, s.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(s.data(), HW, nj, BS, beta.data(), inv.data());
        for (int64_t k = 0; k < W; ++k) softmax_stats_update(s.data() + (H + k) * BS, nj, wp + 2 * k);
        for (int64_t h = 0; h < H; ++h) {
          A* sh = s.data() + h * BS;
          const A bm = max_of(sh, nj);
          if (bm > mx[h]) {
            // Rescale the running sums only when the block raises the max.
            if (sm[h] != A(0)) {
              const A f = std::exp(mx[h] - bm);
              sm[h] *= f;
              scale_(acc + h * D, D, f);
            }
            mx[h] = bm;
          }
          sm[h] += exp_shift(sh, nj, mx[h]);
        }
        accumulate_block(acc, H, s.data(), BS, rows, nj, D);
      }
      if (C == 1) {
        for (int64_t h = 0; h < H; ++h) {
          scale_(acc + h * D, D, A(1) / sm[h]);
          lse[b * H + h] = mx[h] + std::log(sm[h]);
        }
        narrow(acc, reads + b * H * D, H * D);
      }
    }
  });

  if (C > 1) {
    at::parallel_for(0, B * H, grain_for(C * D), [&](int64_t i0, int64_t i1) {
      Scratch<A> acc(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t c = 0; c < C; ++c) m = std::max(m, part[(b * C + c) * rec + h]);
        A l = 0;
        std::fill(acc.data(), acc.data() + D, A(0));
        for (int64_t c = 0; c < C; ++c) {
          const A* p = &part[(b * C + c) * rec];
          const A f = std::exp(p[h] - m);
          l += p[H + h] * f;
          const A* pa = p + 2 * H + h * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += f * pa[d];
        }
        scale_(acc.data(), D, A(1) / l);
        narrow(acc.data(), reads + i * D, D);
        lse[i] = m + std::log(l);
      }
    });
  }
  for (const int64_t i : nonfinite_heads(keys, str, B, H, D)) {
    fill_nan(reads + i * D, D);
    lse[i] = std::numeric_limits<A>::quiet_NaN();
  }
}

// ---------------------------------------------------------------------------
// memory_write: o = m * prod_w (1 - w e_w) + sum_w w a_w
// ---------------------------------------------------------------------------
// One row; o may alias r. wv: the W weights of this slot.
template <typename A>
C10_ALWAYS_INLINE void write_row(const A* r, A* o, const A* wv, const A* E, const A* Ad, int64_t W, int64_t D) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec one(A(1));
  for (int64_t d = 0; d < D; d += V) {
    const int64_t m = std::min<int64_t>(V, D - d);
    Vec keep = one;
    Vec add(A(0));
    for (int64_t w = 0; w < W; ++w) {
      keep = keep * at::vec::fmadd(Vec(-wv[w]), load_n(E + w * D + d, m), one);
      add = at::vec::fmadd(Vec(wv[w]), load_n(Ad + w * D + d, m), add);
    }
    store_n(at::vec::fmadd(load_n(r + d, m), keep, add), o + d, m);
  }
}

// One write head over rows of exactly 64 (float on AVX-512: 4 vectors):
// erase and add stay in registers for the whole block. The arithmetic of
// write_row with W = 1, bit for bit: keep = 1 * (1 - w e), add = w a + 0.
// Returns false (nothing done) for any other shape.
template <typename A>
inline bool write_rows_w1_d64(A* rows, int64_t nj, int64_t D, int64_t W, const A* w, const A* E, const A* Ad) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  constexpr int DC = static_cast<int>(64 / V);
  if constexpr (64 % V == 0 && 2 * DC + DC + 2 <= kVecRegs) {
    if (W != 1 || D != 64) return false;
    Vec e[DC], a[DC];
    for (int c = 0; c < DC; ++c) {
      e[c] = Vec::loadu(E + c * V);
      a[c] = Vec::loadu(Ad + c * V);
    }
    const Vec one(A(1));
    for (int64_t j = 0; j < nj; ++j) {
      const Vec wj(w[j]), nwj(-w[j]);
      A* r = rows + j * 64;
      for (int c = 0; c < DC; ++c) {
        const Vec keep = one * at::vec::fmadd(nwj, e[c], one);
        const Vec add = at::vec::fmadd(wj, a[c], Vec(A(0)));
        at::vec::fmadd(Vec::loadu(r + c * V), keep, add).store(r + c * V);
      }
    }
    return true;
  }
  return false;
}

template <typename T>
void memory_write_typed(const at::Tensor& memory_t, const at::Tensor& w_t, const at::Tensor& e_t,
                        const at::Tensor& a_t, at::Tensor& out_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = w_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  const T* er = e_t.const_data_ptr<T>();
  const T* ad = a_t.const_data_ptr<T>();
  T* out = out_t.data_ptr<T>();
  const Chunks ch = make_chunks(N, D * (2 * W + 1));
  const int64_t C = ch.count;

  at::parallel_for(0, B * C, grain_for(ch.size * D * (2 * W + 1)), [&](int64_t t0, int64_t t1) {
    Scratch<A> E(W * D), Ad(W * D), wv(W), row(std::is_same_v<T, A> ? 1 : D);
    int64_t loaded = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      if (b != loaded) {
        for (int64_t i = 0; i < W * D; ++i) {
          E[i] = static_cast<A>(er[b * W * D + i]);
          Ad[i] = static_cast<A>(ad[b * W * D + i]);
        }
        loaded = b;
      }
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = 0; k < W; ++k) wv[k] = static_cast<A>(w[(b * W + k) * N + n]);
        const T* src = mem + (b * N + n) * D;
        T* dst = out + (b * N + n) * D;
        if constexpr (std::is_same_v<T, A>) {
          write_row(src, dst, wv.data(), E.data(), Ad.data(), W, D);
        } else {
          widen(src, row.data(), D);
          write_row(row.data(), row.data(), wv.data(), E.data(), Ad.data(), W, D);
          narrow(row.data(), dst, D);
        }
      }
    }
  });
}

// With f_w = 1 - w_w e_w and excl_w = prod_{v != w} f_v (prefix times suffix,
// never a division, so w e = 1 is fine):
//   dm = g keep; da_w = sum_n w_w g; de_w = -sum_n w_w g m excl_w;
//   dw_w = sum_d g a_w - g m e_w excl_w.
template <typename T>
void memory_write_backward_typed(const at::Tensor& g_t, const at::Tensor& memory_t, const at::Tensor& w_t,
                                 const at::Tensor& e_t, const at::Tensor& a_t, at::Tensor& dm_t, at::Tensor& dw_t,
                                 at::Tensor& de_t, at::Tensor& da_t) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = w_t.size(1);
  const T* g = g_t.const_data_ptr<T>();
  const T* mem = memory_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  const T* er = e_t.const_data_ptr<T>();
  const T* ad = a_t.const_data_ptr<T>();
  T* dm = dm_t.data_ptr<T>();
  T* dw = dw_t.data_ptr<T>();
  T* de = de_t.data_ptr<T>();
  T* da = da_t.data_ptr<T>();
  const Chunks ch = make_chunks(N, D * (8 * W + 2));
  const int64_t C = ch.count;
  const int64_t rec = 2 * W * D;  // per (b, chunk): de[W*D], da[W*D]
  std::vector<A> part(B * C * rec);

  at::parallel_for(0, B * C, grain_for(ch.size * D * (8 * W + 2)), [&](int64_t t0, int64_t t1) {
    Scratch<A> E(W * D), Ad(W * D), wv(W), gbuf(D), mbuf(D), dmbuf(D);
    // Per-lane factors f_w, suffix products S_w and dw accumulators; plain
    // arrays with unaligned access, since the heap need not honour the
    // 64-byte alignment of a 512-bit Vectorized.
    Scratch<A> f(W * V), S((W + 1) * V), dwacc(W * V);
    int64_t loaded = -1;
    const Vec one(A(1));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      if (b != loaded) {
        for (int64_t i = 0; i < W * D; ++i) {
          E[i] = static_cast<A>(er[b * W * D + i]);
          Ad[i] = static_cast<A>(ad[b * W * D + i]);
        }
        loaded = b;
      }
      A* dE = &part[t * rec];
      A* dA = dE + W * D;
      std::fill(dE, dE + rec, A(0));
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = 0; k < W; ++k) wv[k] = static_cast<A>(w[(b * W + k) * N + n]);
        const A* gr = widen(g + (b * N + n) * D, gbuf.data(), D);
        const A* mr = widen(mem + (b * N + n) * D, mbuf.data(), D);
        A* dmr = std::is_same_v<T, A> ? reinterpret_cast<A*>(dm + (b * N + n) * D) : dmbuf.data();
        std::fill(dwacc.data(), dwacc.data() + W * V, A(0));
        for (int64_t d = 0; d < D; d += V) {
          const int64_t m = std::min<int64_t>(V, D - d);
          const Vec gg = load_n(gr + d, m);
          const Vec x = load_n(mr + d, m);
          for (int64_t k = 0; k < W; ++k) {
            at::vec::fmadd(Vec(-wv[k]), load_n(E.data() + k * D + d, m), one).store(f.data() + k * V);
          }
          Vec suffix = one;
          suffix.store(S.data() + W * V);
          for (int64_t k = W - 1; k >= 0; --k) {
            suffix = Vec::loadu(f.data() + k * V) * suffix;
            suffix.store(S.data() + k * V);
          }
          store_n(gg * suffix, dmr + d, m);
          const Vec tm = gg * x;
          Vec P = one;
          for (int64_t k = 0; k < W; ++k) {
            const Vec te = tm * (P * Vec::loadu(S.data() + (k + 1) * V));
            const Vec e = load_n(E.data() + k * D + d, m);
            const Vec acc = at::vec::fmadd(gg, load_n(Ad.data() + k * D + d, m), Vec::loadu(dwacc.data() + k * V));
            (acc - te * e).store(dwacc.data() + k * V);
            store_n(at::vec::fmadd(Vec(-wv[k]), te, load_n(dE + k * D + d, m)), dE + k * D + d, m);
            store_n(at::vec::fmadd(Vec(wv[k]), gg, load_n(dA + k * D + d, m)), dA + k * D + d, m);
            P = P * Vec::loadu(f.data() + k * V);
          }
        }
        for (int64_t k = 0; k < W; ++k) {
          dw[(b * W + k) * N + n] = static_cast<T>(hsum(Vec::loadu(dwacc.data() + k * V)));
        }
        if constexpr (!std::is_same_v<T, A>) narrow(dmbuf.data(), dm + (b * N + n) * D, D);
      }
    }
  });

  at::parallel_for(0, B, grain_for(C * rec), [&](int64_t b0, int64_t b1) {
    std::vector<A> sum(rec);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(sum.begin(), sum.end(), A(0));
      for (int64_t c = 0; c < C; ++c) {
        const A* p = &part[(b * C + c) * rec];
        for (int64_t i = 0; i < rec; ++i) sum[i] += p[i];
      }
      narrow(sum.data(), de + b * W * D, W * D);
      narrow(sum.data() + W * D, da + b * W * D, W * D);
    }
  });
}

// ---------------------------------------------------------------------------
// usage_update: decay * usage + sum_w weights
// ---------------------------------------------------------------------------
// decay * u + sw with the product rounded on its own, never fused into a
// multiply-add: the arithmetic of the reference (and of torch), so that
// usage_update, the fused content_write_ and a sharded memory's write give
// bitwise the same usage from the same weights, and slots whose usage ties
// in one of them tie in all (the least-used slot is then the same index).
// sw is the sum of the write heads' weights, in head order.
template <typename A>
C10_ALWAYS_INLINE A usage_step(A decay, A u, A sw) {
  A du = decay * u;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(du));  // an opaque value: the compiler cannot contract it with the add
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(du));
#else
  volatile A v = du;
  du = v;
#endif
  return du + sw;
}

template <typename T>
void usage_update_typed(const at::Tensor& usage_t, const at::Tensor& w_t, double decay_d, at::Tensor& out_t) {
  using A = acc_t<T>;
  const int64_t B = usage_t.size(0), N = usage_t.size(1), W = w_t.size(1);
  const T* u = usage_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  T* out = out_t.data_ptr<T>();
  const A decay = static_cast<A>(decay_d);
  at::parallel_for(0, B * N, grain_for(W + 1) * 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, n = i % N;
      A sw = 0;
      for (int64_t k = 0; k < W; ++k) sw += static_cast<A>(w[(b * W + k) * N + n]);
      out[i] = static_cast<T>(usage_step(decay, static_cast<A>(u[i]), sw));
    }
  });
}

// ---------------------------------------------------------------------------
// content_write_: in-place write whose weights address the memory before it
// ---------------------------------------------------------------------------
// Pass 1 streams the memory once for each write head's softmax max and sum.
// Pass 2 recomputes each row's weights from the row's old values (so the
// (B,W,N) weights never exist), rewrites the row in place and updates the
// usage, tracking the least-used slot of each chunk; chunks are combined in
// order, so ties go to the lowest index, as torch.argmin.

// Whether usage value v, met after the current best, replaces it: smaller,
// or NaN where the best is not, which is what torch.argmin returns (NaN
// counts as the least value, ties go to the lowest index). Candidates are
// met in index order.
template <typename A>
C10_ALWAYS_INLINE bool argmin_better(A v, A best) {
  return v < best || (v != v && best == best);
}

// Pass 1: per (b, chunk, w) running max and sum of exp; returns per (b, w)
// (max, 1/sum) combined in chunk order.
template <typename T>
std::vector<acc_t<T>> content_write_stats(const at::Tensor& memory_t, const at::Tensor& keys_t,
                                          const at::Tensor& str_t, double eps_d) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = keys_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * (3 * W + 2));
  const int64_t C = ch.count;
  std::vector<A> part(B * C * W * 2);

  at::parallel_for(0, B * C, grain_for(ch.size * D * (W + 1)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(W * D), beta(W), s(W * BS), nrm2(BS), inv(BS), rowbuf(std::is_same_v<T, A> ? 1 : BS * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * W * D, str + b * W, W, D, eps, q.data(), beta.data());
      A* p = &part[t * W * 2];
      for (int64_t k = 0; k < W; ++k) {
        p[2 * k] = -std::numeric_limits<A>::infinity();
        p[2 * k + 1] = 0;
      }
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        dots_block(q.data(), W, rows, nj, D, s.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(s.data(), W, nj, BS, beta.data(), inv.data());
        for (int64_t k = 0; k < W; ++k) softmax_stats_update(s.data() + k * BS, nj, p + 2 * k);
      }
    }
  });
  return combine_max_sum(part, B, C, W);  // max, 1/sum
}

// Pass 2: recomputes each row's weights from its old values and the stats of
// pass 1, rewrites the row in place, updates usage and finds its argmin.
template <typename T>
void content_write_apply(at::Tensor& memory_t, at::Tensor& usage_t, const at::Tensor& keys_t,
                         const at::Tensor& str_t, const at::Tensor& e_t, const at::Tensor& a_t, double eps_d,
                         double decay_d, const std::vector<acc_t<T>>& stats, at::Tensor& least_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = keys_t.size(1);
  T* mem = memory_t.data_ptr<T>();
  T* usage = usage_t.defined() ? usage_t.data_ptr<T>() : nullptr;
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  const T* er = e_t.const_data_ptr<T>();
  const T* ad = a_t.const_data_ptr<T>();
  const A eps = static_cast<A>(eps_d);
  const A decay = static_cast<A>(decay_d);
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * (3 * W + 2));
  const int64_t C = ch.count;

  std::vector<A> best_val(B * C);
  std::vector<int64_t> best_idx(B * C);
  at::parallel_for(0, B * C, grain_for(ch.size * D * (3 * W + 2)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(W * D), beta(W), s(W * BS), nrm2(BS), inv(BS), wv(W), E(W * D), Ad(W * D);
    Scratch<A> rowbuf(std::is_same_v<T, A> ? 1 : BS * D);
    Scratch<bool> ok(W);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * W * D, str + b * W, W, D, eps, q.data(), beta.data(), ok.data());
      for (int64_t i = 0; i < W * D; ++i) {
        E[i] = static_cast<A>(er[b * W * D + i]);
        Ad[i] = static_cast<A>(ad[b * W * D + i]);
      }
      A bv = std::numeric_limits<A>::infinity();
      int64_t bi = n0;
      bool have = false;
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        T* blk = mem + (b * N + nb) * D;
        A* rows = const_cast<A*>(widen(static_cast<const T*>(blk), rowbuf.data(), nj * D));
        dots_block(q.data(), W, rows, nj, D, s.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(s.data(), W, nj, BS, beta.data(), inv.data());
        for (int64_t k = 0; k < W; ++k) {
          const A* st = &stats[(b * W + k) * 2];
          exp_shift(s.data() + k * BS, nj, st[0], st[1]);
          // A non-finite head's weights are NaN, and so every row it writes.
          if (!ok[k]) std::fill(s.data() + k * BS, s.data() + k * BS + nj, std::numeric_limits<A>::quiet_NaN());
        }
        // The rows first, then the block's usage: two tight loops instead of
        // one whose stores to memory kept the compiler from holding anything
        // in registers across rows (usage, rows and the vectors may alias).
        if (!write_rows_w1_d64(rows, nj, D, W, s.data(), E.data(), Ad.data())) {
          for (int64_t j = 0; j < nj; ++j) {
            for (int64_t k = 0; k < W; ++k) wv[k] = s[k * BS + j];
            write_row(rows + j * D, rows + j * D, wv.data(), E.data(), Ad.data(), W, D);
          }
        }
        if (usage != nullptr) {
          T* u = usage + b * N + nb;
          for (int64_t j = 0; j < nj; ++j) {
            A sw = 0;
            for (int64_t k = 0; k < W; ++k) sw += s[k * BS + j];
            const T nu = static_cast<T>(usage_step(decay, static_cast<A>(u[j]), sw));
            u[j] = nu;
            const A uv = static_cast<A>(nu);
            if (!have || argmin_better(uv, bv)) {
              bv = uv;
              bi = nb + j;
              have = true;
            }
          }
        }
        if constexpr (!std::is_same_v<T, A>) narrow(rows, blk, nj * D);
      }
      best_val[t] = bv;
      best_idx[t] = bi;
    }
  });

  if (usage != nullptr) {
    int64_t* least = least_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      A bv = best_val[b * C];
      int64_t bi = best_idx[b * C];
      for (int64_t c = 1; c < C; ++c) {
        if (argmin_better(best_val[b * C + c], bv)) {
          bv = best_val[b * C + c];
          bi = best_idx[b * C + c];
        }
      }
      least[b] = bi;
    }
  }
}

template <typename T>
void content_write_typed(at::Tensor& memory_t, at::Tensor& usage_t, const at::Tensor& keys_t,
                         const at::Tensor& str_t, const at::Tensor& e_t, const at::Tensor& a_t, double eps_d,
                         double decay_d, at::Tensor& least_t) {
  const auto stats = content_write_stats<T>(memory_t, keys_t, str_t, eps_d);
  content_write_apply<T>(memory_t, usage_t, keys_t, str_t, e_t, a_t, eps_d, decay_d, stats, least_t);
}

// ---------------------------------------------------------------------------
// content_read_write_: a read then an in-place write, both addressing the
// memory as it was before the write, in two passes: the read pass also
// gathers the write heads' softmax statistics, then the write pass.
// ---------------------------------------------------------------------------
template <typename T>
void content_read_write_typed(at::Tensor& memory_t, at::Tensor& usage_t, const at::Tensor& rkeys_t,
                              const at::Tensor& rstr_t, const at::Tensor& wkeys_t, const at::Tensor& wstr_t,
                              const at::Tensor& e_t, const at::Tensor& a_t, double eps_d, double decay_d,
                              at::Tensor& reads_t, at::Tensor& lse_t, at::Tensor& least_t) {
  using A = acc_t<T>;
  std::vector<A> wpart;
  int64_t wchunks = 0;
  content_read_typed<T>(memory_t, rkeys_t, rstr_t, eps_d, reads_t, lse_t, &wkeys_t, &wstr_t, &wpart, &wchunks);
  const auto stats = combine_max_sum(wpart, memory_t.size(0), wchunks, wkeys_t.size(1));
  content_write_apply<T>(memory_t, usage_t, wkeys_t, wstr_t, e_t, a_t, eps_d, decay_d, stats, least_t);
}

// ---------------------------------------------------------------------------
// dtype dispatch and the table
// ---------------------------------------------------------------------------
#define NEURALMEM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void content_addressing_k(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                 double eps, at::Tensor& weights) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_addressing", [&] {
    content_addressing_typed<scalar_t>(memory, keys, strengths, eps, weights);
  });
}

inline void content_addressing_backward_k(const at::Tensor& gw, const at::Tensor& w, const at::Tensor& memory,
                                          const at::Tensor& keys, const at::Tensor& strengths, double eps,
                                          at::Tensor& dm, at::Tensor& dk, at::Tensor& ds) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_addressing_backward", [&] {
    addressing_backward_typed<scalar_t, false>(nullptr, nullptr, nullptr, &gw, &w, memory, keys, strengths, eps,
                                               dm, dk, ds);
  });
}

inline void memory_read_k(const at::Tensor& memory, const at::Tensor& weights, at::Tensor& reads) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "memory_read", [&] { memory_read_typed<scalar_t>(memory, weights, reads); });
}

inline void memory_read_backward_k(const at::Tensor& gr, const at::Tensor& memory, const at::Tensor& weights,
                                   at::Tensor& dm, at::Tensor& dw) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "memory_read_backward", [&] {
    memory_read_backward_typed<scalar_t>(gr, memory, weights, dm, dw);
  });
}

inline void content_read_k(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                           double eps, at::Tensor& reads, at::Tensor& lse) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_read", [&] {
    content_read_typed<scalar_t>(memory, keys, strengths, eps, reads, lse);
  });
}

inline void content_read_backward_k(const at::Tensor& gr, const at::Tensor& reads, const at::Tensor& lse,
                                    const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                    double eps, at::Tensor& dm, at::Tensor& dk, at::Tensor& ds) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_read_backward", [&] {
    addressing_backward_typed<scalar_t, true>(&gr, &reads, &lse, nullptr, nullptr, memory, keys, strengths, eps,
                                              dm, dk, ds);
  });
}

inline void memory_write_k(const at::Tensor& memory, const at::Tensor& weights, const at::Tensor& erase,
                           const at::Tensor& add, at::Tensor& out) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "memory_write", [&] {
    memory_write_typed<scalar_t>(memory, weights, erase, add, out);
  });
}

inline void memory_write_backward_k(const at::Tensor& g, const at::Tensor& memory, const at::Tensor& weights,
                                    const at::Tensor& erase, const at::Tensor& add, at::Tensor& dm, at::Tensor& dw,
                                    at::Tensor& de, at::Tensor& da) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "memory_write_backward", [&] {
    memory_write_backward_typed<scalar_t>(g, memory, weights, erase, add, dm, dw, de, da);
  });
}

inline void usage_update_k(const at::Tensor& usage, const at::Tensor& weights, double decay, at::Tensor& out) {
  NEURALMEM_DISPATCH(usage.scalar_type(), "usage_update", [&] {
    usage_update_typed<scalar_t>(usage, weights, decay, out);
  });
}

inline void content_write_k(at::Tensor& memory, at::Tensor& usage, const at::Tensor& keys,
                            const at::Tensor& strengths, const at::Tensor& erase, const at::Tensor& add, double eps,
                            double decay, at::Tensor& least) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_write_", [&] {
    content_write_typed<scalar_t>(memory, usage, keys, strengths, erase, add, eps, decay, least);
  });
}

inline void content_read_write_k(at::Tensor& memory, at::Tensor& usage, const at::Tensor& read_keys,
                                 const at::Tensor& read_strengths, const at::Tensor& write_keys,
                                 const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
                                 double eps, double decay, at::Tensor& reads, at::Tensor& lse, at::Tensor& least) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_read_write_", [&] {
    content_read_write_typed<scalar_t>(memory, usage, read_keys, read_strengths, write_keys, write_strengths, erase,
                                       add, eps, decay, reads, lse, least);
  });
}

#undef NEURALMEM_DISPATCH

// x[i] = x[i]^e, vectorised (SLEEF's pow on AVX2/AVX-512): in double for the
// replay buffers' priority transform, in float for their importance weights.
template <typename F>
inline void pow_inplace_k(F* x, int64_t n, F e) {
  using Vec = Vectorized<F>;
  constexpr int64_t V = Vec::size();
  const Vec a(e);
  int64_t i = 0;
  for (; i + V <= n; i += V) Vec::loadu(x + i).pow(a).store(x + i);
  if (i < n) Vec::loadu(x + i, n - i).pow(a).store(x + i, n - i);
}

// One level of the replay sum tree (fan-out 8, see replay/sum_tree.h):
// parent p = parents[j] >> shift (or p = j when parents is null) gets
// sums[p] = ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) of child_sums[8p..8p+7] and
// mins[p] = the smallest of child_mins[8p..8p+7]; with child_mins null the
// children are leaves, whose min is the leaf when it is > 0 and +inf
// otherwise. A parent equal to the previous one is skipped. Every instruction
// set gives the same bits: the vector sum adds the same pairs in the same
// order, and min is exact.
inline void tree_level_k(const double* child_sums, const double* child_mins, double* sums, double* mins,
                         const int64_t* parents, int64_t n, int shift) {
  constexpr double inf = std::numeric_limits<double>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  // The 8 children are one aligned 64-byte line: one load, then three
  // butterfly steps (neighbours, pairs, halves) leave the sum in lane 0.
  const __m512d vinf = _mm512_set1_pd(inf);
  const __m512d zero = _mm512_setzero_pd();
  auto one = [&](int64_t p) {
    const __m512d c = _mm512_load_pd(child_sums + p * 8);
    const __m512d s1 = _mm512_add_pd(c, _mm512_permute_pd(c, 0x55));
    const __m512d s2 = _mm512_add_pd(s1, _mm512_permutex_pd(s1, 0x4E));
    const __m512d s3 = _mm512_add_pd(s2, _mm512_shuffle_f64x2(s2, s2, 0x4E));
    sums[p] = _mm512_cvtsd_f64(s3);
    const __m512d m = child_mins ? _mm512_load_pd(child_mins + p * 8)
                                 : _mm512_mask_blend_pd(_mm512_cmp_pd_mask(c, zero, _CMP_GT_OQ), vinf, c);
    mins[p] = _mm512_reduce_min_pd(m);
  };
#else
  auto min2 = [](double a, double b) { return b < a ? b : a; };
  auto one = [&](int64_t p) {
    const double* c = child_sums + p * 8;
    sums[p] = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
    double v[8];
    if (child_mins) {
      for (int k = 0; k < 8; ++k) v[k] = child_mins[p * 8 + k];
    } else {
      for (int k = 0; k < 8; ++k) v[k] = c[k] > 0.0 ? c[k] : inf;
    }
    mins[p] = min2(min2(min2(v[0], v[1]), min2(v[2], v[3])), min2(min2(v[4], v[5]), min2(v[6], v[7])));
  };
#endif
  if (!parents) {
    for (int64_t p = 0; p < n; ++p) one(p);
    return;
  }
  int64_t prev = -1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = parents[j] >> shift;
    if (p == prev) continue;  // sorted or clustered batches share parents
    one(p);
    prev = p;
  }
}

// The child of a sum-tree node that owns mass m >= 0, and its prefix within
// the node. With inclusive prefixes a_k = c_0 + ... + c_k (added left to
// right), the child is k = #{k < 7 : a_k <= m}: a mass equal to a boundary
// starts the next child, so leaf i owns [P_i, P_i+1), and the child found has
// a positive value (a_k-1 <= m < a_k). When m lies at or beyond the node's
// sum (a mass equal to the total, or beyond it by rounding) the count can
// land on trailing zero children, so it is capped at the last positive child.
// The caller enters only nodes of positive sum, so the leaf reached is
// positive. Branch-free on purpose: the children are usually a cache miss,
// and a mispredicted branch would wait for them and serialise the misses of
// a batch instead of overlapping them.
inline int64_t tree_pick_child(const double* c, double m, double* prefix) {
  double pre[8];
  double acc = 0.0;
  int64_t k = 0, last = 0;
  for (int64_t j = 0; j < 8; ++j) {
    pre[j] = acc;
    acc += c[j];
    k += (j < 7) & (acc <= m);
    last = c[j] > 0.0 ? j : last;
  }
  k = k < last ? k : last;
  *prefix = pre[k];
  return k;
}

#if defined(CPU_CAPABILITY_AVX512)
// tree_pick_child for 8 queries at once, one per 64-bit lane: the 8 child
// lines are transposed so that register k holds child k of every query, and
// each lane then adds its prefixes left to right exactly as the scalar code
// does (same bits), compares, and picks, with no per-query loop.
inline void tree_pick_child8(const double* level, double* m, int64_t* node) {
  __m512d r[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm512_load_pd(level + node[q] * 8);
  // 8x8 transpose: pairs, then quadruples, then halves.
  __m512d a[8], b[8], c[8];
  for (int q = 0; q < 8; q += 2) {
    a[q] = _mm512_unpacklo_pd(r[q], r[q + 1]);      // r_q0 r_q+1,0 r_q2 r_q+1,2 ...
    a[q + 1] = _mm512_unpackhi_pd(r[q], r[q + 1]);  // r_q1 r_q+1,1 r_q3 r_q+1,3 ...
  }
  const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int h = 0; h < 8; h += 4) {
    b[h + 0] = _mm512_permutex2var_pd(a[h], lo2, a[h + 2]);      // children 0 and 4 of 4 queries
    b[h + 1] = _mm512_permutex2var_pd(a[h + 1], lo2, a[h + 3]);  // children 1 and 5
    b[h + 2] = _mm512_permutex2var_pd(a[h], hi2, a[h + 2]);      // children 2 and 6
    b[h + 3] = _mm512_permutex2var_pd(a[h + 1], hi2, a[h + 3]);  // children 3 and 7
  }
  const __m512i lo4 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i hi4 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  for (int k = 0; k < 4; ++k) {
    c[k] = _mm512_permutex2var_pd(b[k], lo4, b[k + 4]);
    c[k + 4] = _mm512_permutex2var_pd(b[k], hi4, b[k + 4]);
  }
  const __m512d zero = _mm512_setzero_pd();
  const __m512d mass = _mm512_loadu_pd(m);
  __m512d acc[8];
  acc[0] = _mm512_add_pd(zero, c[0]);
  for (int k = 1; k < 8; ++k) acc[k] = _mm512_add_pd(acc[k - 1], c[k]);
  const __m512i one = _mm512_set1_epi64(1);
  __m512i k = _mm512_setzero_si512(), last = _mm512_setzero_si512();
  for (int j = 0; j < 7; ++j) k = _mm512_mask_add_epi64(k, _mm512_cmp_pd_mask(acc[j], mass, _CMP_LE_OQ), k, one);
  for (int j = 1; j < 8; ++j)
    last = _mm512_mask_mov_epi64(last, _mm512_cmp_pd_mask(c[j], zero, _CMP_GT_OQ), _mm512_set1_epi64(j));
  k = _mm512_min_epi64(k, last);
  __m512d pre = zero;
  for (int j = 1; j < 8; ++j)
    pre = _mm512_mask_mov_pd(pre, _mm512_cmpeq_epi64_mask(k, _mm512_set1_epi64(j)), acc[j - 1]);
  _mm512_storeu_pd(m, _mm512_sub_pd(mass, pre));
  const __m512i nd = _mm512_loadu_si512(node);
  _mm512_storeu_si512(node, _mm512_add_epi64(_mm512_slli_epi64(nd, 3), k));
}
#endif

// Descends n queries of masses m (consumed; negative ones count as 0) from
// the root of a fan-out-8 sum tree whose levels below the root are
// child_levels[0..depth-1] (64-byte aligned); out[j] is the leaf found for
// query j. One level at a time for the whole batch: the nodes one level down
// are known before the level is walked, so their lines are requested kAhead
// queries early and the misses overlap far beyond what the out-of-order
// window alone would allow.
inline void tree_find_k(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = 0;
    m[j] = m[j] < 0.0 ? 0.0 : m[j];  // below the first leaf: the first positive one
  }
  constexpr int64_t kAhead = 16;
  for (int d = 0; d < depth; ++d) {
    const double* level = child_levels[d];
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) __builtin_prefetch(level + out[j] * 8);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; j + 8 <= n; j += 8) {
      for (int64_t q = j + kAhead; q < std::min(n, j + kAhead + 8); ++q) __builtin_prefetch(level + out[q] * 8);
      tree_pick_child8(level, m + j, out + j);
    }
#endif
    for (; j < n; ++j) {
      if (j + kAhead < n) __builtin_prefetch(level + out[j + kAhead] * 8);
      double pre;
      const int64_t k = tree_pick_child(level + out[j] * 8, m[j], &pre);
      m[j] -= pre;
      out[j] = out[j] * 8 + k;
    }
  }
}

constexpr KernelTable make_table(const char* name) {
  return KernelTable{name,
                     &content_addressing_k,
                     &content_addressing_backward_k,
                     &memory_read_k,
                     &memory_read_backward_k,
                     &content_read_k,
                     &content_read_backward_k,
                     &memory_write_k,
                     &memory_write_backward_k,
                     &usage_update_k,
                     &content_write_k,
                     &content_read_write_k,
                     &pow_inplace_k<double>,
                     &pow_inplace_k<float>,
                     &tree_level_k,
                     &tree_find_k};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

// CPU kernels of memory_write (and its backward), usage_update, content_write_
// and content_read_write_. Part of memory_kernels.h (see its header for the design).
#pragma once
#include "cpu/read_kernels.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

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

// One write head and D = NV whole vectors, the write backwards' fast case
// (memory_write_backward, content_write's pass 1): calls f with
// std::integral_constant<int, NV> and returns true, or returns false.
template <typename A, typename F>
bool with_w1_vectors(int64_t W, int64_t D, F&& f) {
  constexpr int64_t V = Vectorized<A>::size();
  if (W != 1 || D % V != 0) return false;
  switch (D / V) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

// One vector of a row in that case: g (gg), the row (x), erase (e) and add
// (a) lanes, weight w; adds to the row's dw lanes (dwv) and to the chunk's
// dE, dA sums. The general loop's operations with its factors of exactly 1
// written out (te = g m (1 * 1)), so the same bits.
template <typename A>
C10_ALWAYS_INLINE void write_bwd_vec_w1(const Vectorized<A>& gg, const Vectorized<A>& x, const Vectorized<A>& e,
                                        const Vectorized<A>& a, A w, Vectorized<A>& dwv, Vectorized<A>& accE,
                                        Vectorized<A>& accA) {
  const Vectorized<A> one(A(1));
  const Vectorized<A> te = (gg * x) * (one * one);
  const Vectorized<A> acc = at::vec::fmadd(gg, a, dwv);
  dwv = acc - te * e;
  accE = at::vec::fmadd(Vectorized<A>(-w), te, accE);
  accA = at::vec::fmadd(Vectorized<A>(w), gg, accA);
}

// memory_write_backward's rows [n0, n1) of memory b for one write head and
// D = NV lanes-wide vectors: the general loop below with its factors of
// exactly 1 written out (suffix f * 1, te = tm * (1 * 1)), so the same
// operations in the same order and the same bits; what it drops are the
// per-vector stores and reloads of those factors and of the dE, dA
// accumulators, which stay in registers for the chunk (dE, dA: its sums).
template <int NV, typename T, typename A>
void write_bwd_rows_w1(const T* g, const T* mem, const T* w, const A* E, const A* Ad, int64_t b, int64_t N,
                       int64_t n0, int64_t n1, T* dm, T* dw, A* dE, A* dA, A* gbuf, A* mbuf, A* dmbuf) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t D = NV * V;
  const Vec one(A(1));
  Vec accE[NV], accA[NV];
  for (int i = 0; i < NV; ++i) accE[i] = accA[i] = Vec(A(0));
  for (int64_t n = n0; n < n1; ++n) {
    const A wn = static_cast<A>(w[b * N + n]);
    const A* gr = widen(g + (b * N + n) * D, gbuf, D);
    const A* mr = widen(mem + (b * N + n) * D, mbuf, D);
    A* dmr = std::is_same_v<T, A> ? reinterpret_cast<A*>(dm + (b * N + n) * D) : dmbuf;
    Vec dwv(A(0));
    for (int i = 0; i < NV; ++i) {
      const Vec gg = Vec::loadu(gr + i * V);
      const Vec e = Vec::loadu(E + i * V);
      const Vec f = at::vec::fmadd(Vec(-wn), e, one);
      (gg * (f * one)).store(dmr + i * V);
      write_bwd_vec_w1(gg, Vec::loadu(mr + i * V), e, Vec::loadu(Ad + i * V), wn, dwv, accE[i], accA[i]);
    }
    dw[b * N + n] = static_cast<T>(hsum(dwv));
    if constexpr (!std::is_same_v<T, A>) narrow(dmbuf, dm + (b * N + n) * D, D);
  }
  for (int i = 0; i < NV; ++i) {
    accE[i].store(dE + i * V);
    accA[i].store(dA + i * V);
  }
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
      // One write head, whole vectors: the fast path of the same arithmetic.
      if (with_w1_vectors<A>(W, D, [&](auto nv) {
            write_bwd_rows_w1<decltype(nv)::value>(g, mem, w, E.data(), Ad.data(), b, N, n0, n1, dm, dw, dE, dA,
                                                   gbuf.data(), mbuf.data(), dmbuf.data());
          })) {
        continue;
      }
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

// CPU kernels of the differentiable content write (content_write, out of
// place) and its backward. Part of memory_kernels.h (see its header).
//
//   w[k,n] = softmax_n(beta_k cos(q_k, m_n))           (k < W write heads)
//   new_n  = m_n * prod_k (1 - w[k,n] e_k) + sum_k w[k,n] a_k
//
// Forward: pass 1 gathers each head's softmax (max, sum) (content_write_stats,
// shared with content_write_), pass 2 writes new rows from old ones; lse per
// (b, k) is returned for the backward. (B,W,N) never leaves the kernel.
//
// Backward, with g = d loss / d new, f_k = 1 - w_k e_k, excl_k = prod_{v!=k} f_v:
//   pass 1 (reads m and g): w recomputed from lse; per slot
//     dw[k,n] = g_n . a_k - (g_n m_n excl_k) . e_k, kept in a (B,W,N) scratch
//     with w; de_k = -sum_n w g m excl_k, da_k = sum_n w g, delta_k = sum_n w dw
//   pass 2 (reads m and g, writes dm): ds = w (dw - delta), then as
//     content_addressing_backward: dm_n = g_n prod_k f_k + the addressing
//     term, dq and dbeta accumulated, dk = projection of dq off q over |k|.
// Two reads of the memory and of g and one write of dm, against the separate
// ops' content_addressing + memory_write backward (five reads, two (B,N,D)
// gradients and their sum).
//
// content_read_write (a read, then this write, both of the memory before the
// write): the forward's first pass is content_read's, which also gathers the
// write heads' (max, sum); the backward's pass 2 also takes the H read heads
// (their weights from the saved lse, dw = g_r . m_n from H more dots per row,
// delta = g_r . reads), so that its one dm holds both ops' terms.
#pragma once
#include "cpu/write_kernels.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

// Pass 2 of the forward, given each head's (max, 1/sum): the written rows
// into out, lse per (b, k).
template <typename T>
void content_write_out(const at::Tensor& memory_t, const at::Tensor& keys_t, const at::Tensor& str_t,
                       const at::Tensor& e_t, const at::Tensor& a_t, double eps_d,
                       const std::vector<acc_t<T>>& stats, at::Tensor& out_t, at::Tensor& lse_t) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = keys_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  const T* er = e_t.const_data_ptr<T>();
  const T* ad = a_t.const_data_ptr<T>();
  T* out = out_t.data_ptr<T>();
  A* lse = lse_t.data_ptr<A>();
  for (int64_t i = 0; i < B * W; ++i) lse[i] = stats[2 * i] - std::log(stats[2 * i + 1]);
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * (3 * W + 2));
  const int64_t C = ch.count;

  at::parallel_for(0, B * C, grain_for(ch.size * D * (3 * W + 2)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(W * D), beta(W), s(W * BS), nrm2(BS), inv(BS), wv(W), E(W * D), Ad(W * D), rowbuf(BS * D);
    Scratch<bool> ok(W);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * W * D, str + b * W, W, D, eps, q.data(), beta.data(), ok.data());
      for (int64_t i = 0; i < W * D; ++i) {
        E[i] = static_cast<A>(er[b * W * D + i]);
        Ad[i] = static_cast<A>(ad[b * W * D + i]);
      }
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        // The block's old rows, in the accumulation type, written over in place (in L1).
        A* rows = rowbuf.data();
        const T* src = mem + (b * N + nb) * D;
        if constexpr (std::is_same_v<T, A>) {
          std::memcpy(rows, src, sizeof(A) * nj * D);
        } else {
          widen(src, rows, nj * D);
        }
        dots_block(q.data(), W, rows, nj, D, s.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(s.data(), W, nj, BS, beta.data(), inv.data());
        for (int64_t k = 0; k < W; ++k) {
          const A* st = &stats[(b * W + k) * 2];
          exp_shift(s.data() + k * BS, nj, st[0], st[1]);
          if (!ok[k]) std::fill(s.data() + k * BS, s.data() + k * BS + nj, std::numeric_limits<A>::quiet_NaN());
        }
        if (!write_rows_w1_d64(rows, nj, D, W, s.data(), E.data(), Ad.data())) {
          for (int64_t j = 0; j < nj; ++j) {
            for (int64_t k = 0; k < W; ++k) wv[k] = s[k * BS + j];
            write_row(rows + j * D, rows + j * D, wv.data(), E.data(), Ad.data(), W, D);
          }
        }
        narrow(rows, out + (b * N + nb) * D, nj * D);
      }
    }
  });
  for (const int64_t i : nonfinite_heads(keys, str, B, W, D)) {
    lse[i] = std::numeric_limits<A>::quiet_NaN();
    fill_nan(out + (i / W) * N * D, N * D);
  }
}

template <typename T>
void content_write_fwd_typed(const at::Tensor& memory_t, const at::Tensor& keys_t, const at::Tensor& str_t,
                             const at::Tensor& e_t, const at::Tensor& a_t, double eps_d, at::Tensor& out_t,
                             at::Tensor& lse_t) {
  const auto stats = content_write_stats<T>(memory_t, keys_t, str_t, eps_d);  // (max, 1/sum)
  content_write_out<T>(memory_t, keys_t, str_t, e_t, a_t, eps_d, stats, out_t, lse_t);
}

// content_read_write (out of place): the read's pass also gathers the write
// heads' statistics (content_read_typed with write heads), then pass 2 of the
// write. Two passes over the memory, against three for the two ops.
template <typename T>
void content_read_write_fwd_typed(const at::Tensor& memory_t, const at::Tensor& rkeys_t, const at::Tensor& rstr_t,
                                  const at::Tensor& wkeys_t, const at::Tensor& wstr_t, const at::Tensor& e_t,
                                  const at::Tensor& a_t, double eps_d, at::Tensor& reads_t, at::Tensor& rlse_t,
                                  at::Tensor& out_t, at::Tensor& wlse_t) {
  std::vector<acc_t<T>> wpart;
  int64_t wchunks = 0;
  content_read_typed<T>(memory_t, rkeys_t, rstr_t, eps_d, reads_t, rlse_t, &wkeys_t, &wstr_t, &wpart, &wchunks);
  const auto stats = combine_max_sum(wpart, memory_t.size(0), wchunks, wkeys_t.size(1));
  content_write_out<T>(memory_t, wkeys_t, wstr_t, e_t, a_t, eps_d, stats, out_t, wlse_t);
}

// The read side of content_read_write_backward: H read heads of the memory
// before the write, whose gradient the write's second pass adds into dm.
struct ReadSide {
  const at::Tensor& grad_reads;  // (B,H,D)
  const at::Tensor& reads;       // (B,H,D)
  const at::Tensor& lse;         // (B,H), the forward's
  const at::Tensor& keys;        // (B,H,D)
  const at::Tensor& strengths;   // (B,H)
  at::Tensor& dk;
  at::Tensor& ds;
};

// content_write_backward, and with `rd` content_read_write_backward: pass 2
// then also takes the H read heads' gradient, as content_read_backward does
// (float and double: the given lse and delta = g . reads, or, when the
// memory is one block, the recomputed max and normaliser), so that one pass
// writes the sum of the two memory gradients.
template <typename T>
void content_write_backward_typed(const at::Tensor& g_t, const at::Tensor& lse_t, const at::Tensor& memory_t,
                                  const at::Tensor& keys_t, const at::Tensor& str_t, const at::Tensor& e_t,
                                  const at::Tensor& a_t, double eps_d, at::Tensor& dm_t, at::Tensor& dk_t,
                                  at::Tensor& ds_t, at::Tensor& de_t, at::Tensor& da_t,
                                  const ReadSide* rd = nullptr) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), W = keys_t.size(1);
  const T* g = g_t.const_data_ptr<T>();
  const A* lse = lse_t.const_data_ptr<A>();
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  const T* er = e_t.const_data_ptr<T>();
  const T* ad = a_t.const_data_ptr<T>();
  T* dm = dm_t.data_ptr<T>();
  T* dk = dk_t.data_ptr<T>();
  T* dstr = ds_t.data_ptr<T>();
  T* de = de_t.data_ptr<T>();
  T* da = da_t.data_ptr<T>();
  const A eps = static_cast<A>(eps_d);
  const int64_t BS = block_slots(D);
  const Chunks ch = make_chunks(N, D * (6 * W + 4));
  const int64_t C = ch.count;
  constexpr bool kHalf = !std::is_same_v<T, A>;

  // Pass 1: w and dw per slot (scratch), and per (b, chunk) de, da, sum w dw.
  std::vector<A> wsc(B * W * N), dwsc(B * W * N);
  const int64_t rec1 = W * (2 * D + 1);
  std::vector<A> part1(B * C * rec1);
  at::parallel_for(0, B * C, grain_for(ch.size * D * (6 * W + 2)), [&](int64_t t0, int64_t t1) {
    Scratch<A> q(W * D), beta(W), s(W * BS), nrm2(BS), inv(BS), E(W * D), Ad(W * D);
    Scratch<A> f(W * V), S((W + 1) * V), dwacc(W * V);
    Scratch<A> rowbuf(kHalf ? BS * D : 1), gbuf(kHalf ? BS * D : 1);
    const Vec one(A(1));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      prepare_heads(keys + b * W * D, str + b * W, W, D, eps, q.data(), beta.data());
      for (int64_t i = 0; i < W * D; ++i) {
        E[i] = static_cast<A>(er[b * W * D + i]);
        Ad[i] = static_cast<A>(ad[b * W * D + i]);
      }
      A* p = &part1[t * rec1];
      A* dE = p;
      A* dA = p + W * D;
      A* Tt = p + 2 * W * D;
      std::fill(p, p + rec1, A(0));
      // The block at nb: its rows and g (widened), and its weights in s.
      auto block = [&](int64_t nb, int64_t nj, const A*& rows, const A*& gr) {
        rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        gr = widen(g + (b * N + nb) * D, gbuf.data(), nj * D);
        dots_block(q.data(), W, rows, nj, D, s.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(s.data(), W, nj, BS, beta.data(), inv.data());
        for (int64_t k = 0; k < W; ++k) exp_shift(s.data() + k * BS, nj, lse[b * W + k]);
      };
      // One write head, whole vectors: the loop below with its factors of 1
      // written out and the chunk's dE, dA sums in registers (the same bits,
      // as memory_write_backward's write_bwd_rows_w1).
      auto chunk_w1 = [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        Vec accE[NV], accA[NV];
        for (int i = 0; i < NV; ++i) accE[i] = accA[i] = Vec(A(0));
        for (int64_t nb = n0; nb < n1; nb += BS) {
          const int64_t nj = std::min(BS, n1 - nb);
          const A *rows, *gr;
          block(nb, nj, rows, gr);
          for (int64_t j = 0; j < nj; ++j) {
            const A wk = s[j];
            Vec dwv(A(0));
            for (int i = 0; i < NV; ++i) {
              write_bwd_vec_w1(Vec::loadu(gr + j * D + i * V), Vec::loadu(rows + j * D + i * V),
                               Vec::loadu(E.data() + i * V), Vec::loadu(Ad.data() + i * V), wk, dwv, accE[i],
                               accA[i]);
            }
            const A dw = hsum(dwv);
            const int64_t i = b * N + nb + j;
            wsc[i] = wk;
            dwsc[i] = dw;
            Tt[0] += wk * dw;
          }
        }
        for (int i = 0; i < NV; ++i) {
          accE[i].store(dE + i * V);
          accA[i].store(dA + i * V);
        }
      };
      if (with_w1_vectors<A>(W, D, chunk_w1)) continue;
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A *rows, *gr;
        block(nb, nj, rows, gr);
        // Per row, vectorised over D as memory_write_backward: per-lane
        // factors f_k, suffix products, and dw accumulators summed at the end.
        for (int64_t j = 0; j < nj; ++j) {
          const A* mr = rows + j * D;
          const A* gj = gr + j * D;
          std::fill(dwacc.data(), dwacc.data() + W * V, A(0));
          for (int64_t d = 0; d < D; d += V) {
            const int64_t mm = std::min<int64_t>(V, D - d);
            const Vec gg = load_n(gj + d, mm);
            const Vec x = load_n(mr + d, mm);
            for (int64_t k = 0; k < W; ++k) {
              at::vec::fmadd(Vec(-s[k * BS + j]), load_n(E.data() + k * D + d, mm), one).store(f.data() + k * V);
            }
            Vec suffix = one;
            suffix.store(S.data() + W * V);
            for (int64_t k = W - 1; k >= 0; --k) {
              suffix = Vec::loadu(f.data() + k * V) * suffix;
              suffix.store(S.data() + k * V);
            }
            const Vec tm = gg * x;
            Vec P = one;
            for (int64_t k = 0; k < W; ++k) {
              const A wk = s[k * BS + j];
              const Vec te = tm * (P * Vec::loadu(S.data() + (k + 1) * V));
              const Vec e = load_n(E.data() + k * D + d, mm);
              const Vec acc = at::vec::fmadd(gg, load_n(Ad.data() + k * D + d, mm), Vec::loadu(dwacc.data() + k * V));
              (acc - te * e).store(dwacc.data() + k * V);
              store_n(at::vec::fmadd(Vec(-wk), te, load_n(dE + k * D + d, mm)), dE + k * D + d, mm);
              store_n(at::vec::fmadd(Vec(wk), gg, load_n(dA + k * D + d, mm)), dA + k * D + d, mm);
              P = P * Vec::loadu(f.data() + k * V);
            }
          }
          for (int64_t k = 0; k < W; ++k) {
            const A wk = s[k * BS + j];
            const A dw = hsum(Vec::loadu(dwacc.data() + k * V));
            const int64_t i = (b * W + k) * N + nb + j;
            wsc[i] = wk;
            dwsc[i] = dw;
            Tt[k] += wk * dw;
          }
        }
      }
    }
  });
  std::vector<A> delta(B * W, A(0));
  for (int64_t b = 0; b < B; ++b) {
    std::vector<A> sum(rec1, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const A* p = &part1[(b * C + c) * rec1];
      for (int64_t i = 0; i < rec1; ++i) sum[i] += p[i];
    }
    narrow(sum.data(), de + b * W * D, W * D);
    narrow(sum.data() + W * D, da + b * W * D, W * D);
    for (int64_t k = 0; k < W; ++k) delta[b * W + k] = sum[2 * W * D + k];
  }

  // Pass 2: dm, and per (b, chunk) dq and dbeta of HW = W + H heads: the
  // write heads, then the read heads (none without rd). Head vectors: q of
  // the W + H heads, then the H read gradients, whose dots with a row are
  // the read weights' gradient dw.
  const int64_t H = rd != nullptr ? rd->keys.size(1) : 0, HW = W + H, NV = W + 2 * H;
  const T* rkeys = H > 0 ? rd->keys.const_data_ptr<T>() : nullptr;
  const T* rstr = H > 0 ? rd->strengths.const_data_ptr<T>() : nullptr;
  const T* rg = H > 0 ? rd->grad_reads.const_data_ptr<T>() : nullptr;
  const A* rlse = H > 0 ? rd->lse.const_data_ptr<A>() : nullptr;
  std::vector<A> rdelta(B * H);
  for (int64_t i = 0; i < B * H; ++i) {
    const T* rr = rd->reads.const_data_ptr<T>() + i * D;
    A sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += static_cast<A>(rg[i * D + d]) * static_cast<A>(rr[d]);
    rdelta[i] = sum;
  }
  const int64_t rec2 = HW * (D + 1);
  std::vector<A> part2(B * C * rec2);
  const bool one_block = C == 1 && N <= BS;
  at::parallel_for(0, B * C, grain_for(ch.size * D * (4 * W + 5 * H + 2)), [&](int64_t t0, int64_t t1) {
    Scratch<A> vecs(NV * D), beta(HW), dots(NV * BS), nrm2(BS), inv(BS), gate(BS), gam(BS), bq(HW * BS), E(W * D);
    Scratch<A> rowbuf(kHalf ? BS * D : 1), gbuf(kHalf ? BS * D : 1), dmbuf(kHalf ? BS * D : 1);
    // The read term of dm, sum_h w[h,n] g_h, as combine_block's first term
    // over all HW heads: weights ca and vectors U, zero for the write heads.
    Scratch<A> ca(H > 0 ? HW * BS : 1), U(H > 0 ? HW * D : 1);
    if (H > 0) {
      std::fill(ca.data(), ca.data() + W * BS, A(0));
      std::fill(U.data(), U.data() + W * D, A(0));
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / C, c = t % C;
      const int64_t n0 = c * ch.size, n1 = std::min(N, n0 + ch.size);
      A* q = vecs.data();
      prepare_heads(keys + b * W * D, str + b * W, W, D, eps, q, beta.data());
      if (H > 0) {
        prepare_heads(rkeys + b * H * D, rstr + b * H, H, D, eps, q + W * D, beta.data() + W);
        for (int64_t i = 0; i < H * D; ++i) U[W * D + i] = q[HW * D + i] = static_cast<A>(rg[b * H * D + i]);
      }
      for (int64_t i = 0; i < W * D; ++i) E[i] = static_cast<A>(er[b * W * D + i]);
      A* r = &part2[t * rec2];
      A* dq = r;
      A* dbeta = r + HW * D;
      std::fill(r, r + rec2, A(0));
      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        const A* gr = widen(g + (b * N + nb) * D, gbuf.data(), nj * D);
        dots_block(q, NV, rows, nj, D, dots.data(), BS, nrm2.data());
        row_scales(nrm2.data(), nj, eps, inv.data(), gate.data());
        for (int64_t j = 0; j < nj; ++j) gam[j] = 0;
        // Head k's ds = w (dw - delta) into bq, gam and dbeta.
        auto head = [&](int64_t k, const A* wk, const A* dwk, A dk_) {
          const A bk = beta[k];
          const A* ck = dots.data() + k * BS;
          A* bqk = bq.data() + k * BS;
          A db = 0;
          for (int64_t j = 0; j < nj; ++j) {
            const A cj = ck[j] * inv[j];
            const A dsj = wk[j] * (dwk[j] - dk_);
            db += dsj * cj;
            const A dc = bk * dsj;
            bqk[j] = dc * inv[j];
            gam[j] += dc * cj;
          }
          dbeta[k] += db;
        };
        for (int64_t k = 0; k < W; ++k) {
          head(k, &wsc[(b * W + k) * N + nb], &dwsc[(b * W + k) * N + nb], delta[b * W + k]);
        }
        if (H > 0) {
          A* wr = ca.data() + W * BS;
          block_logits(wr, dots.data() + W * BS, inv.data(), beta.data() + W, H, nj, BS);
          for (int64_t h = 0; h < H; ++h) {
            A* wh = wr + h * BS;
            const A* dwh = dots.data() + (HW + h) * BS;
            const int64_t i = b * H + h;
            if (one_block) {
              // Every slot is in this block: as content_read_backward, the weights and delta
              // from the recomputed max and normaliser where the given lse is this memory's
              // own, so that no delta = g . reads cancels in a peaked softmax.
              const A M = max_of(wh, nj);
              const A L = exp_shift(wh, nj, M);
              if (same_lse(rlse[i], M, L)) {
                const A sc = A(1) / L;
                const A Tt = dot(wh, dwh, nj);
                scale_(wh, nj, sc);
                head(W + h, wh, dwh, Tt * sc);
                continue;
              }
              block_logits(wh, dots.data() + (W + h) * BS, inv.data(), beta.data() + W + h, 1, nj, BS);
            }
            exp_shift(wh, nj, rlse[i]);
            head(W + h, wh, dwh, rdelta[i]);
          }
        }
        for (int64_t j = 0; j < nj; ++j) gam[j] *= gate[j];
        A* dmrow = kHalf ? dmbuf.data() : reinterpret_cast<A*>(dm + (b * N + nb) * D);
        if (H > 0) {
          combine_block<true, true>(dmrow, rows, nj, D, HW, gam.data(), ca.data(), U.data(), bq.data(), q, BS);
        } else {
          combine_block<false, true>(dmrow, rows, nj, D, W, gam.data(), static_cast<const A*>(nullptr),
                                     static_cast<const A*>(nullptr), bq.data(), q, BS);
        }
        // The write's own term: g * prod_k (1 - w_k e_k).
        for (int64_t j = 0; j < nj; ++j) {
          A* o = dmrow + j * D;
          const A* gj = gr + j * D;
          if (W == 1) {
            const A w0 = wsc[b * N + nb + j];
            for (int64_t d = 0; d < D; ++d) o[d] += gj[d] * (A(1) - w0 * E[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) {
              A keep = 1;
              for (int64_t k = 0; k < W; ++k) keep *= A(1) - wsc[(b * W + k) * N + nb + j] * E[k * D + d];
              o[d] += gj[d] * keep;
            }
          }
        }
        if constexpr (kHalf) narrow(dmbuf.data(), dm + (b * N + nb) * D, nj * D);
        accumulate_block(dq, HW, bq.data(), BS, rows, nj, D);
      }
    }
  });

  // Combine chunks in order; dk = projection of dq off q, over |k|.
  Scratch<A> kk(HW * D), kn(HW), sum(rec2);
  auto finish = [&](const T* kin, int64_t K, const A* dqs, const A* dbs, T* dko, T* dso) {
    normalize_keys(kin, K, D, eps, kk.data(), kn.data());
    for (int64_t k = 0; k < K; ++k) {
      dso[k] = static_cast<T>(dbs[k]);
      const A* dqk = dqs + k * D;
      const A* qk = kk.data() + k * D;
      T* o = dko + k * D;
      if (kn[k] > eps) {
        const A proj = dot(dqk, qk, D);
        const A sc = A(1) / kn[k];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>((dqk[d] - proj * qk[d]) * sc);
      } else {
        const A sc = A(1) / eps;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(dqk[d] * sc);
      }
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    std::fill(sum.data(), sum.data() + rec2, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const A* p = &part2[(b * C + c) * rec2];
      for (int64_t i = 0; i < rec2; ++i) sum[i] += p[i];
    }
    finish(keys + b * W * D, W, sum.data(), sum.data() + HW * D, dk + b * W * D, dstr + b * W);
    if (H > 0) {
      finish(rkeys + b * H * D, H, sum.data() + W * D, sum.data() + HW * D + W,
             rd->dk.data_ptr<T>() + b * H * D, rd->ds.data_ptr<T>() + b * H);
    }
  }
  for (const int64_t i : nonfinite_heads(keys, str, B, W, D)) {
    fill_nan(dk + i * D, D);
    dstr[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    fill_nan(de + i * D, D);
    fill_nan(da + i * D, D);
    fill_nan(dm + (i / W) * N * D, N * D);
  }
  if (H > 0) {
    for (const int64_t i : nonfinite_heads(rkeys, rstr, B, H, D)) {
      fill_nan(rd->dk.data_ptr<T>() + i * D, D);
      rd->ds.data_ptr<T>()[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      fill_nan(dm + (i / H) * N * D, N * D);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

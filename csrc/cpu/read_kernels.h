// CPU kernels of content addressing, memory_read and content_read, forward
// and backward. Part of memory_kernels.h (see its header for the design).
#pragma once
#include "cpu/kernel_common.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

// ---------------------------------------------------------------------------
// content_addressing
// ---------------------------------------------------------------------------
// n2_in (float and double): the rows' squared norms, given ((B, N) with rows n2_ld apart), taken instead of
// computed; dots_out: the raw dots q_h . m_n kept ((B, H, N)), for addressing_backward_typed's dots_in.
// dots_block's dots do not depend on whether it computes the norms beside them: the same weights, bit for bit.
template <typename T>
void content_addressing_typed(const at::Tensor& memory_t, const at::Tensor& keys_t, const at::Tensor& str_t,
                              double eps_d, at::Tensor& out_t, const T* n2_in = nullptr, int64_t n2_ld = 0,
                              T* dots_out = nullptr) {
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
  // A memory of a few MiB is likely in cache (MemoryCore's, just written by the previous step):
  // dots_block's unrolled rows. Larger ones stream from DRAM, where that is slower.
  const bool hot = B * N * D * static_cast<int64_t>(sizeof(T)) <= kHotBytes;

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
        dots_block(q.data(), H, rows, nj, D, lg + nb, N, n2_in != nullptr ? static_cast<A*>(nullptr) : nrm2.data(),
                   hot);
        if (n2_in != nullptr) std::copy(n2_in + b * n2_ld + nb, n2_in + b * n2_ld + nb + nj, nrm2.data());
        if (dots_out != nullptr) {
          for (int64_t h = 0; h < H; ++h)
            std::copy(lg + h * N + nb, lg + h * N + nb + nj, dots_out + (b * H + h) * N + nb);
        }
        row_scales(nrm2.data(), nj, eps, inv.data(), static_cast<A*>(nullptr));
        scale_logits(lg + nb, H, nj, N, beta.data(), inv.data());
      }
      for (int64_t h = 0; h < H; ++h) {
        const A* sh = lg + h * N + n0;
        const A m = max_of(sh, n1 - n0);
        part[(t * H + h) * 2] = m;
        part[(t * H + h) * 2 + 1] = exp_sum(sh, n1 - n0, m);
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
                               at::Tensor& dk_t, at::Tensor& ds_t, const at::Tensor* dm_in_t = nullptr,
                               T* coef_gamma = nullptr, T* coef_b = nullptr, T* coef_q = nullptr,
                               const T* dots_in = nullptr, const T* n2_in = nullptr, int64_t n2_ld = 0) {
  using A = acc_t<T>;
  const int64_t B = memory_t.size(0), N = memory_t.size(1), D = memory_t.size(2), H = keys_t.size(1);
  const T* mem = memory_t.const_data_ptr<T>();
  const T* keys = keys_t.const_data_ptr<T>();
  const T* str = str_t.const_data_ptr<T>();
  // An empty dm_t: the memory's gradient is not wanted (content_read_backward
  // with grad_memory=false). The pass then only reads the memory, for dk and
  // dstrengths; the chunks and every sum stay the same, so dk and dstrengths
  // are bitwise those of the full backward.
  T* dm = dm_t.defined() && dm_t.numel() > 0 ? dm_t.data_ptr<T>() : nullptr;
  // dm_in (float and double, not fused): dm = dm_in + this gradient, each
  // block of dm_in copied into dm while in cache, then added to (one pass
  // where a separate gradient and an add would take two).
  const T* dm_in = dm_in_t != nullptr ? dm_in_t->const_data_ptr<T>() : nullptr;
  TORCH_INTERNAL_ASSERT(dm_in == nullptr || (!FUSED && std::is_same_v<T, acc_t<T>> && dm != nullptr));
  // coef_*: the memory's gradient as per-slot coefficients (float and double, not fused, no dm):
  // d/dm_n = -coef_gamma[b, n] m_n + sum_h coef_b[b, h, n] q_h, with q the unit keys (coef_q, (B, H, D)).
  TORCH_INTERNAL_ASSERT(coef_gamma == nullptr || (!FUSED && std::is_same_v<T, acc_t<T>> && dm == nullptr &&
                                                  coef_b != nullptr && coef_q != nullptr));
  // dots_in, n2_in (float and double, not fused): the forward's raw dots q_h . m_n ((B, H, N), content_addressing
  // _typed's dots_out) and the rows' squared norms, taken instead of the sweep that computes them; the rows are
  // still read for the keys' gradient.
  TORCH_INTERNAL_ASSERT(dots_in == nullptr || (!FUSED && std::is_same_v<T, acc_t<T>> && n2_in != nullptr));
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
      if (coef_q != nullptr && c == 0) std::copy(q, q + H * D, reinterpret_cast<A*>(coef_q) + b * H * D);
      A* r = C > 1 ? &part[t * rec] : &finals[b * rec];
      A* dq = r;
      A* dbeta = r + H * D;
      std::fill(r, r + rec, A(0));
      const A* dl = &delta[b * H];

      for (int64_t nb = n0; nb < n1; nb += BS) {
        const int64_t nj = std::min(BS, n1 - nb);
        const A* rows = widen(mem + (b * N + nb) * D, rowbuf.data(), nj * D);
        if (dots_in != nullptr) {
          for (int64_t h = 0; h < H; ++h) {
            const T* src = dots_in + (b * H + h) * N + nb;
            std::copy(src, src + nj, dots.data() + h * BS);
          }
          std::copy(n2_in + b * n2_ld + nb, n2_in + b * n2_ld + nb + nj, nrm2.data());
        } else {
          dots_block(vecs.data(), nvec, rows, nj, D, dots.data(), BS, nrm2.data());
        }
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
        if (dm != nullptr || coef_gamma != nullptr) {
          for (int64_t j = 0; j < nj; ++j) gam[j] *= gate[j];
        }
        if (coef_gamma != nullptr) {
          std::copy(gam.data(), gam.data() + nj, reinterpret_cast<A*>(coef_gamma) + b * N + nb);
          for (int64_t h = 0; h < H; ++h) {
            std::copy(bq.data() + h * BS, bq.data() + h * BS + nj, reinterpret_cast<A*>(coef_b) + (b * H + h) * N + nb);
          }
        }
        if (dm != nullptr) {
          A* dmrow = kHalf ? dmbuf.data() : reinterpret_cast<A*>(dm + (b * N + nb) * D);
          if constexpr (FUSED) {
            combine_block<true, true>(dmrow, rows, nj, D, H, gam.data(), wp, vecs.data() + H * D, bq.data(), q,
                                      BS);
          } else {
            if (dm_in != nullptr && dm_in != dm) {
              std::memcpy(dmrow, dm_in + (b * N + nb) * D, sizeof(T) * nj * D);
            }
            combine_block<false, true>(dmrow, rows, nj, D, H, gam.data(), static_cast<const A*>(nullptr),
                                       static_cast<const A*>(nullptr), bq.data(), q, BS, dm_in != nullptr);
          }
          if constexpr (kHalf) narrow(dmbuf.data(), dm + (b * N + nb) * D, nj * D);
        }
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
    if (dm != nullptr) fill_nan(dm + (i / H) * N * D, N * D);
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

// CPU kernels of neuralmem_dnc::write_read (host code, checks and semantics:
// csrc/dnc/write_read.cpp): the erase-add write, then the read heads' content
// weights over the new memory and the reads, and the backward of all three.
// Part of memory_kernels.h, compiled once per instruction set; float32 and
// float64 only. One memory per task. At the classic tasks' sizes (N = 128 to
// a few thousand slots, B = 16) a memory's rows stay in cache between the
// loops over its slots; at large N each of those loops is one more pass.
#pragma once
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/dnc_write_read_kernels.h"
#endif

#include "cpu/kernel_common.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

// The inputs both kernels read, as raw pointers, copied into each task's locals (see below).
template <typename T>
struct WRInputs {
  const T* m;   // memory (B,N,D)
  const T* ww;  // write weights (B,W,N)
  const T* e;   // erase (B,W,D)
  const T* v;   // add (B,W,D)
  const T* k;   // read keys (B,R,D)
  const T* s;   // read strengths (B,R)
};

template <typename T>
WRInputs<T> wr_inputs(const at::Tensor& m, const at::Tensor& ww, const at::Tensor& e, const at::Tensor& v,
                      const at::Tensor& k, const at::Tensor& s) {
  return {m.const_data_ptr<T>(), ww.const_data_ptr<T>(), e.const_data_ptr<T>(), v.const_data_ptr<T>(),
          k.const_data_ptr<T>(), s.const_data_ptr<T>()};
}

// The keep factor prod_w (1 - a_w e_w) of one slot over lanes [d, d + m), a_w its write weights; skip = w
// leaves head w out (the product over the other heads), -1 none.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> wr_keep(const T* a, const T* e, int64_t W, int64_t D, int64_t d, int64_t m,
                                        int64_t skip) {
  using Vec = Vectorized<T>;
  Vec keep(T(1));
  for (int64_t w = 0; w < W; ++w)
    if (w != skip) keep = keep * (Vec(T(1)) - Vec(a[w]) * load_n(e + w * D + d, m));
  return keep;
}

// The old row and the given gradient of a slot are first touched by the backward's slot loops (the old
// memory from DRAM at large B N D): ask for the rows kPrefetchAhead elements ahead, as dots_rows_impl does.
template <bool GN, typename T>
C10_ALWAYS_INLINE void wr_prefetch_slot(const T* rj, const T* gnj, int64_t D) {
  for (int64_t d = 0; d < D; d += kLineElems<T>) {
    __builtin_prefetch(rj + kPrefetchAhead<T> + d);
    if constexpr (GN) __builtin_prefetch(gnj + kPrefetchAhead<T> + d);
  }
}

// One lane block of one slot of the one-head write's backward, new = row (1 - a e) + a v: stores
// d row = g (1 - a e), and adds g . (v - row e) to s (d a, per slot), -a g row to sde (d e) and a g to sda
// (d v). gt: the slot's gradient, re: its old row, ev, vv: the erase and add vectors, aw: its write weight.
template <typename T>
C10_ALWAYS_INLINE void wr_backward_lane(const Vectorized<T>& gt, const Vectorized<T>& re, const Vectorized<T>& ev,
                                        const Vectorized<T>& vv, const Vectorized<T>& aw, T* dmd,
                                        Vectorized<T>& s, Vectorized<T>& sde, Vectorized<T>& sda) {
  using Vec = Vectorized<T>;
  (gt * (Vec(T(1)) - aw * ev)).store(dmd);
  s = at::vec::fmadd(gt, vv - re * ev, s);
  sde = sde - gt * re * aw;
  sda = at::vec::fmadd(gt, aw, sda);
}

// One write head and rows of whole vectors (the classic tasks' W = 1, D = 64), the per-slot part of the
// backward in one sweep of the lanes per slot: the general loop of dnc_write_read_backward_typed takes two
// and reloads the slot's gradient between them, each lane through a masked load, with its keep factor
// rebuilt per head. The same formulas in the same order (the compiler may fuse other multiply-adds: last-bit
// differences). g: the slots' gradients without the given one (gs), gn: the given gradient of the new rows
// (GN), a: their write weights, e, v: the write's erase and add vectors, dm: the memory's gradient, de, da:
// accumulated, dww: per slot.
template <bool GN, typename T>
C10_ALWAYS_INLINE void wr_backward_slots_w1(const T* __restrict g, const T* __restrict gn, const T* __restrict row,
                                            const T* __restrict a, const T* __restrict e, const T* __restrict v,
                                            T* __restrict dm, T* __restrict de, T* __restrict da,
                                            T* __restrict dww, int64_t nj, int64_t D) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  for (int64_t j = 0; j < nj; ++j) {
    const Vec aw(a[j]);
    const T* gj = g + j * D;
    const T* gnj = GN ? gn + j * D : nullptr;
    const T* rj = row + j * D;
    T* dmj = dm + j * D;
    wr_prefetch_slot<GN>(rj, gnj, D);
    // de and da through memory, one lane block at a time.
    auto lane = [&](int64_t d, Vec& s) {
      Vec gt = Vec::loadu(gj + d);
      if constexpr (GN) gt = gt + Vec::loadu(gnj + d);
      Vec sde = Vec::loadu(de + d), sda = Vec::loadu(da + d);
      wr_backward_lane(gt, Vec::loadu(rj + d), Vec::loadu(e + d), Vec::loadu(v + d), aw, dmj + d, s, sde, sda);
      sde.store(de + d);
      sda.store(da + d);
    };
    Vec s0(T(0)), s1(T(0));  // even and odd lane blocks, as the general loop
    int64_t d = 0;
    for (; d + 2 * VL <= D; d += 2 * VL) {
      lane(d, s0);
      lane(d + VL, s1);
    }
    if (d < D) lane(d, s0);
    dww[j] = hsum(s0 + s1);
  }
}

// wr_backward_slots_w1 for rows of exactly DC vectors where the vector registers hold the erase and add
// vectors and the de, da sums of all DC lane blocks (4 DC of them: AVX-512's 32 at D = 64 in float): no load
// and store of de and da per slot, whose store-to-load latency chained every slot to the one before, and no
// reload of e and v. The same operations in the same order as wr_backward_slots_w1.
template <bool GN, int DC, typename T>
C10_ALWAYS_INLINE void wr_backward_slots_w1_regs(const T* __restrict g, const T* __restrict gn,
                                                 const T* __restrict row, const T* __restrict a,
                                                 const T* __restrict e, const T* __restrict v, T* __restrict dm,
                                                 T* __restrict de, T* __restrict da, T* __restrict dww, int64_t nj) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  constexpr int64_t D = DC * VL;
  Vec ev[DC], vv[DC], sde[DC], sda[DC];
  for (int c = 0; c < DC; ++c) {
    ev[c] = Vec::loadu(e + c * VL);
    vv[c] = Vec::loadu(v + c * VL);
    sde[c] = Vec::loadu(de + c * VL);
    sda[c] = Vec::loadu(da + c * VL);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const Vec aw(a[j]);
    const T* gj = g + j * D;
    const T* gnj = GN ? gn + j * D : nullptr;
    const T* rj = row + j * D;
    T* dmj = dm + j * D;
    wr_prefetch_slot<GN>(rj, gnj, D);
    Vec s[2] = {Vec(T(0)), Vec(T(0))};  // even and odd lane blocks, as wr_backward_slots_w1
    for (int c = 0; c < DC; ++c) {
      Vec gt = Vec::loadu(gj + c * VL);
      if constexpr (GN) gt = gt + Vec::loadu(gnj + c * VL);
      wr_backward_lane(gt, Vec::loadu(rj + c * VL), ev[c], vv[c], aw, dmj + c * VL, s[c & 1], sde[c], sda[c]);
    }
    dww[j] = hsum(s[0] + s[1]);
  }
  for (int c = 0; c < DC; ++c) {
    sde[c].store(de + c * VL);
    sda[c].store(da + c * VL);
  }
}

// Forward, per memory: (1) by blocks of slots, each slot's new row, then the block's norms and R read
// logits (dots_block) from the rows still in L1; (2) the softmax of each head over the slots; (3) the reads from the
// new rows, still in cache. With dots_t defined ((B, R + 1, N)), the R cosine numerators k_r . new_n and the
// squared norms |new_n|^2 are kept there for the backward, which then need not compute them again (with no
// read heads, R = 0, the norms are not computed and their row is zeros).
template <typename T>
void dnc_write_read_typed(const at::Tensor& mem_t, const at::Tensor& ww_t, const at::Tensor& e_t,
                          const at::Tensor& a_t, const at::Tensor& k_t, const at::Tensor& s_t, double eps_d,
                          int64_t B, int64_t N_, int64_t D_, int64_t W_, int64_t R_, at::Tensor& out_t,
                          at::Tensor& rw_t, at::Tensor& rd_t, at::Tensor& dots_t) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const T eps_ = static_cast<T>(eps_d);
  const WRInputs<T> in_ = wr_inputs<T>(mem_t, ww_t, e_t, a_t, k_t, s_t);
  T* MO_ = out_t.data_ptr<T>();
  T* RW_ = rw_t.data_ptr<T>();
  T* RD_ = rd_t.data_ptr<T>();
  T* SV_ = dots_t.defined() ? dots_t.data_ptr<T>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // Locals, not captures: the build has no strict aliasing, so captured values are reloaded after
    // every store of the loops below.
    const int64_t N = N_, D = D_, W = W_, R = R_;
    const T eps = eps_;
    const WRInputs<T> in = in_;
    T* MO = MO_;
    T* RW = RW_;
    T* RD = RD_;
    T* SV = SV_;
    const int64_t BS = block_slots(D);
    std::vector<T> buf(R * D + W + BS);
    T* const kh = buf.data();
    T* const a = kh + R * D;
    T* const nr = a + W;  // the block's squared row norms, then their inverse norms
    for (int64_t b = b0; b < b1; ++b) {
      const T* m = in.m + b * N * D;
      const T* ww = in.ww + b * W * N;
      const T* e = in.e + b * W * D;
      const T* v = in.v + b * W * D;
      const T* beta = in.s + b * R;
      T* mo = MO + b * N * D;
      T* rw = RW + b * R * N;
      T* rd = RD + b * R * D;
      normalize_keys(in.k + b * R * D, R, D, eps, kh, static_cast<T*>(nullptr));
      for (int64_t n0 = 0; n0 < N; n0 += BS) {
        const int64_t nj = std::min<int64_t>(BS, N - n0);
        if (W == 1 && D % VL == 0) {
          // One write head, whole vectors: new = row (1 - a e) + a v with no masked loads and no loop over
          // heads; the formula of the general loop below.
          for (int64_t n = n0; n < n0 + nj; ++n) {
            const Vec aw(ww[n]);
            const T* row = m + n * D;
            T* o = mo + n * D;
            for (int64_t d = 0; d < D; d += VL) {
              const Vec x = Vec::loadu(row + d) * (Vec(T(1)) - aw * Vec::loadu(e + d));
              at::vec::fmadd(aw, Vec::loadu(v + d), x).store(o + d);
            }
          }
        } else {
          for (int64_t n = n0; n < n0 + nj; ++n) {
            for (int64_t w = 0; w < W; ++w) a[w] = ww[w * N + n];
            const T* row = m + n * D;
            T* o = mo + n * D;
            for (int64_t d = 0; d < D; d += VL) {
              const int64_t k = std::min<int64_t>(VL, D - d);
              Vec x = load_n(row + d, k) * wr_keep(a, e, W, D, d, k, -1);
              for (int64_t w = 0; w < W; ++w) x = at::vec::fmadd(Vec(a[w]), load_n(v + w * D + d, k), x);
              store_n(x, o + d, k);
            }
          }
        }
        // The block's rows, just written, are in L1: their norms and read logits.
        dots_block(kh, R, mo + n0 * D, nj, D, rw + n0, N, nr, /*hot=*/true);
        if (SV) {
          T* sv = SV + b * (R + 1) * N + n0;
          for (int64_t r = 0; r < R; ++r) std::copy(rw + r * N + n0, rw + r * N + n0 + nj, sv + r * N);
          // No read heads: dots_block computed nothing, and the backward needs no norms.
          if (R > 0) {
            std::copy(nr, nr + nj, sv + R * N);
          } else {
            std::fill(sv, sv + nj, T(0));
          }
        }
        // One square root and division per slot, not per slot and head, a vector of slots at a time (row_scales,
        // in place): one slot at a time, the divisions' latency took a fifth of this loop's time at N = 128. The
        // same operations, so the same bits: sqrt and division are correctly rounded either way, and maximum
        // keeps eps below it and a NaN norm as std::max did.
        row_scales(nr, nj, eps, nr, static_cast<T*>(nullptr));
        for (int64_t r = 0; r < R; ++r) {
          const Vec br(beta[r]);
          T* x = rw + r * N + n0;
          for (int64_t j = 0; j < nj; j += VL) {
            const int64_t k = std::min<int64_t>(VL, nj - j);
            store_n(load_n(x + j, k) * (br * load_n(nr + j, k)), x + j, k);
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        T* x = rw + r * N;
        const T sum = exp_shift(x, N, max_of(x, N));
        scale_(x, N, T(1) / sum);
      }
      // reads = w @ new rows, still in cache.
      std::fill(rd, rd + R * D, T(0));
      accumulate_block(rd, R, rw, N, mo, N, D);
    }
  });
}

// Backward, per memory: (1) the read weights' gradient dw = given + g_reads . new row, and the softmax's
// delta = sum_n w dw per head, from one sweep of the new rows (their norms, cosines and dots with the
// reads' gradient); (2) per slot, in one sweep of the D lanes, the new row's gradient (given + read +
// addressing terms), the memory's gradient through the keep factor, and the write's gradients; (3) the
// keys' gradient through k / max(|k|, eps).
template <typename T>
void dnc_write_read_backward_typed(const at::Tensor* g_mo_t, const at::Tensor* g_rw_t, const at::Tensor* g_rd_t,
                                   const at::Tensor& mem_t, const at::Tensor& ww_t, const at::Tensor& e_t,
                                   const at::Tensor& a_t, const at::Tensor& k_t, const at::Tensor& s_t,
                                   const at::Tensor& mo_t, const at::Tensor& rw_t, double eps_d, int64_t B,
                                   int64_t N_, int64_t D_, int64_t W_, int64_t R_, at::Tensor& dm_t, at::Tensor& dww_t,
                                   at::Tensor& de_t, at::Tensor& da_t, at::Tensor& dk_t, at::Tensor& ds_t,
                                   const at::Tensor* pg_t = nullptr, const at::Tensor* pc_t = nullptr,
                                   const at::Tensor* pq_t = nullptr, const at::Tensor* dots_t = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const T eps_ = static_cast<T>(eps_d);
  // A pending addressing gradient of the new memory (kernel_table.h): P heads of coefficients.
  const T* PG_ = pg_t ? pg_t->const_data_ptr<T>() : nullptr;
  const T* PC_ = pg_t ? pc_t->const_data_ptr<T>() : nullptr;
  const T* PQ_ = pg_t ? pq_t->const_data_ptr<T>() : nullptr;
  const int64_t P_ = pg_t ? pc_t->size(1) : 0;
  const T* GMO_ = g_mo_t ? g_mo_t->const_data_ptr<T>() : nullptr;
  const T* GRW_ = g_rw_t ? g_rw_t->const_data_ptr<T>() : nullptr;
  const T* GRD_ = g_rd_t ? g_rd_t->const_data_ptr<T>() : nullptr;
  const WRInputs<T> in_ = wr_inputs<T>(mem_t, ww_t, e_t, a_t, k_t, s_t);
  const T* MO_ = mo_t.const_data_ptr<T>();
  const T* RWS_ = rw_t.const_data_ptr<T>();
  // The forward's cosine numerators and squared norms ((B, R + 1, N)), or null: computed here.
  const T* SV_ = dots_t ? dots_t->const_data_ptr<T>() : nullptr;
  T* DM_ = dm_t.data_ptr<T>();
  T* DWW_ = dww_t.data_ptr<T>();
  T* DE_ = de_t.data_ptr<T>();
  T* DA_ = da_t.data_ptr<T>();
  T* DK_ = dk_t.data_ptr<T>();
  T* DS_ = ds_t.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // Locals, not captures: the build has no strict aliasing, so captured values are reloaded after
    // every store of the loops below.
    const int64_t N = N_, D = D_, W = W_, R = R_;
    const T eps = eps_;
    const T* GMO = GMO_;
    const T* GRW = GRW_;
    const T* GRD = GRD_;
    const T* PG = PG_;
    const T* PC = PC_;
    const T* PQ = PQ_;
    const int64_t P = P_;
    const WRInputs<T> in = in_;
    const T* MO = MO_;
    const T* RWS = RWS_;
    const T* SV = SV_;
    T* DM = DM_;
    T* DWW = DWW_;
    T* DE = DE_;
    T* DA = DA_;
    T* DK = DK_;
    T* DS = DS_;
    // vecs: the unit keys, then the reads' gradient (R x D each); cs: each head's cosine numerator
    // k . new row, then the cosine, and after it dr: the read weights' gradient (R x N each); gs: a block
    // of slots' gradients (BS x D); cob: every slot's coefficient of its new row (N).
    const int64_t BS = block_slots(D);
    std::vector<T> buf(3 * R * D + 2 * R * N + N + 2 * R + W + BS * D + N);
    T* const kh = buf.data();
    T* const gv = kh + R * D;
    T* const dkh = gv + R * D;
    T* const cs = dkh + R * D;
    T* const dr = cs + R * N;
    T* const nr = dr + R * N;
    T* const kn = nr + N;
    T* const delta = kn + R;
    T* const a = delta + R;
    T* const gs = a + W;
    T* const cob = gs + BS * D;
    for (int64_t b = b0; b < b1; ++b) {
      const T* m = in.m + b * N * D;
      const T* ww = in.ww + b * W * N;
      const T* e = in.e + b * W * D;
      const T* v = in.v + b * W * D;
      const T* beta = in.s + b * R;
      const T* mo = MO + b * N * D;
      const T* rw = RWS + b * R * N;
      const T* grd = GRD ? GRD + b * R * D : nullptr;
      const T* gmo = GMO ? GMO + b * N * D : nullptr;
      T* de = DE + b * W * D;
      T* da = DA + b * W * D;
      T* ds = DS + b * R;
      normalize_keys(in.k + b * R * D, R, D, eps, kh, kn);
      // (1) one sweep of the new rows (dots_block, blocked over rows): their squared norms, the R cosine
      // numerators and the R dots with the reads' gradient; the first R + 1 from the forward where it kept
      // them (the same values: dots_block's dots do not depend on the group they are computed in).
      if (grd) std::copy(grd, grd + R * D, gv);
      if (SV) {
        const T* sv = SV + b * (R + 1) * N;
        std::copy(sv, sv + R * N, cs);
        std::copy(sv + R * N, sv + (R + 1) * N, nr);
        if (grd) dots_block(gv, R, mo, N, D, dr, N, static_cast<T*>(nullptr));
      } else {
        dots_block(kh, grd ? 2 * R : R, mo, N, D, cs, N, nr);
      }
      if (!grd) std::fill(dr, dr + R * N, T(0));
      // Eight (or four) slots at a time from here to the blocks below: scalar, these per-slot loops took a
      // fifth of the kernel at N = 1,024 (divisions, and sums whose every addition waited on the last).
      const Vec veps(eps);
      for (int64_t n = 0; n < N; n += VL) {
        const int64_t k = std::min<int64_t>(VL, N - n);
        store_n(load_n(nr + n, k).sqrt(), nr + n, k);
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* p = rw + r * N;
        T* x = dr + r * N;
        T* c = cs + r * N;
        const T* gw = GRW ? GRW + (b * R + r) * N : nullptr;
        Vec sum(T(0));
        for (int64_t n = 0; n < N; n += VL) {
          const int64_t k = std::min<int64_t>(VL, N - n);
          Vec xv = load_n(x + n, k);
          if (gw) {
            xv = xv + load_n(gw + n, k);
            store_n(xv, x + n, k);
          }
          sum = at::vec::fmadd(load_n(p + n, k), xv, sum);  // the padding lanes are zeros
          store_n(load_n(c + n, k) / at::vec::maximum(load_n(nr + n, k), veps), c + n, k);
        }
        delta[r] = hsum(sum);
      }
      // Per slot the scalars of the addressing's gradient: dr[r, n] becomes dc_r inv, the coefficient of the
      // unit key in the slot's gradient, with dc_r = beta_r * (gradient of the logit); cob[n] =
      // sum_r dc_r cos_r inv^2 where the norm is at least eps (F.normalize's clamp_min passes the gradient
      // at equality), else 0; ds the strengths' gradient.
      for (int64_t r = 0; r < R; ++r) {
        const Vec dlt(delta[r]), br(beta[r]);
        Vec dsum(T(0));
        for (int64_t n = 0; n < N; n += VL) {
          const int64_t k = std::min<int64_t>(VL, N - n);
          const Vec nrv = load_n(nr + n, k);
          const Vec inv = Vec(T(1)) / at::vec::maximum(nrv, veps);
          const Vec dl = load_n(rw + r * N + n, k) * (load_n(dr + r * N + n, k) - dlt);
          const Vec c = load_n(cs + r * N + n, k);
          dsum = at::vec::fmadd(dl, c, dsum);  // zero in the padding lanes: rw is padded with zeros
          const Vec dc = dl * br;
          store_n(dc * inv, dr + r * N + n, k);
          const Vec co = Vec::blendv(Vec(T(0)), dc * c * inv * inv, nrv >= veps);
          store_n(r == 0 ? co : load_n(cob + n, k) + co, cob + n, k);
        }
        ds[r] = hsum(dsum);
      }
      if (R == 0) std::fill(cob, cob + N, T(0));
      std::fill(dkh, dkh + R * D, T(0));
      std::fill(de, de + W * D, T(0));
      std::fill(da, da + W * D, T(0));
      // (2) by blocks of slots, the block's rows in L1: the slots' gradients g_n = given - co_n o_n +
      // sum_r (p_r g_reads_r + dc_r inv k_r), all but the given term as one blocked product (combine_block);
      // the keys' gradient sum_n dc_r inv o_n (accumulate_block); then per slot the memory's gradient through
      // the keep factor and the write's gradients.
      // One pending write head beside at most four read heads (the classic tasks' W = 1, R = 4): its terms
      // in the same sweep of each block as the read heads', not a sweep of their own.
      const bool fold = PG && P == 1 && R >= 1 && R <= 4;
      const T* fqx = fold ? PQ + b * D : nullptr;
      for (int64_t n0 = 0; n0 < N; n0 += BS) {
        const int64_t nj = std::min<int64_t>(BS, N - n0);
        const T* ob = mo + n0 * D;
        const T* fgx = fold ? PG + b * N + n0 : nullptr;
        const T* fcx = fold ? PC + b * N + n0 : nullptr;
        if (grd) {
          combine_block<true, true>(gs, ob, nj, D, R, cob + n0, rw + n0, grd, dr + n0, kh, N, false, fgx, fcx, fqx);
        } else {
          combine_block<false, true>(gs, ob, nj, D, R, cob + n0, static_cast<const T*>(nullptr),
                                     static_cast<const T*>(nullptr), dr + n0, kh, N, false, fgx, fcx, fqx);
        }
        if (PG && !fold) {
          // The pending addressing gradient of these new rows (read by the read heads' terms just above).
          combine_block<false, true>(gs, ob, nj, D, P, PG + b * N + n0, static_cast<const T*>(nullptr),
                                     static_cast<const T*>(nullptr), PC + b * P * N + n0, PQ + b * P * D, N, true);
        }
        accumulate_block(dkh, R, dr + n0, N, ob, nj, D);
        if (W == 1 && D % VL == 0) {
          const T* rows = m + n0 * D;
          T* dmb = DM + (b * N + n0) * D;
          if (kVecRegs >= 32 && D == 4 * VL) {
            if (gmo) {
              wr_backward_slots_w1_regs<true, 4>(gs, gmo + n0 * D, rows, ww + n0, e, v, dmb, de, da,
                                                 DWW + b * N + n0, nj);
            } else {
              wr_backward_slots_w1_regs<false, 4>(gs, static_cast<const T*>(nullptr), rows, ww + n0, e, v, dmb, de,
                                                  da, DWW + b * N + n0, nj);
            }
          } else if (gmo) {
            wr_backward_slots_w1<true>(gs, gmo + n0 * D, rows, ww + n0, e, v, dmb, de, da, DWW + b * N + n0, nj, D);
          } else {
            wr_backward_slots_w1<false>(gs, static_cast<const T*>(nullptr), rows, ww + n0, e, v, dmb, de, da,
                                        DWW + b * N + n0, nj, D);
          }
          continue;
        }
        for (int64_t j = 0; j < nj; ++j) {
          const int64_t n = n0 + j;
          T* g = gs + j * D;
          const T* row = m + n * D;
          const T* gn = gmo ? gmo + n * D : nullptr;
          T* dm = DM + (b * N + n) * D;
          for (int64_t w = 0; w < W; ++w) a[w] = ww[w * N + n];
          // The given gradient of the new row joins here (not copied in first: one pass less over it). The
          // erase-add write: new = row * keep + sum_w a_w add_w.
          for (int64_t d = 0; d < D; d += VL) {
            const int64_t k = std::min<int64_t>(VL, D - d);
            Vec gt = load_n(g + d, k);
            if (gn) {
              gt = gt + load_n(gn + d, k);
              store_n(gt, g + d, k);
            }
            store_n(gt * wr_keep(a, e, W, D, d, k, -1), dm + d, k);
          }
          for (int64_t w = 0; w < W; ++w) {
            const Vec aw(a[w]);
            Vec s0(T(0)), s1(T(0));  // two accumulators: half the dependent chain
            int64_t i = 0;
            for (int64_t d = 0; d < D; d += VL, ++i) {
              const int64_t k = std::min<int64_t>(VL, D - d);
              const Vec gv = load_n(g + d, k);
              const Vec re = load_n(row + d, k) * wr_keep(a, e, W, D, d, k, w);
              const Vec t = load_n(v + w * D + d, k) - re * load_n(e + w * D + d, k);
              if (i & 1) {
                s1 = at::vec::fmadd(gv, t, s1);
              } else {
                s0 = at::vec::fmadd(gv, t, s0);
              }
              store_n(load_n(de + w * D + d, k) - gv * re * aw, de + w * D + d, k);
              store_n(at::vec::fmadd(gv, aw, load_n(da + w * D + d, k)), da + w * D + d, k);
            }
            DWW[(b * W + w) * N + n] = hsum(s0 + s1);
          }
        }
      }
      // Through k / max(|k|, eps).
      for (int64_t r = 0; r < R; ++r) {
        const T* k = kh + r * D;
        const T* dk = dkh + r * D;
        T* out = DK + (b * R + r) * D;
        const T proj = kn[r] >= eps ? dot(dk, k, D) : T(0);
        const T inv = T(1) / std::max(kn[r], eps);
        for (int64_t j = 0; j < D; ++j) out[j] = (dk[j] - proj * k[j]) * inv;
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

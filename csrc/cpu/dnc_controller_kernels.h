// CPU kernels of MemoryCore's sequence node (csrc/dnc/core_sequence.cpp): the
// nonlinearities of one time step's LSTM cell and interface layer, each one
// pass where ATen took six and eight calls (about 2 µs each from C++ at the
// classic tasks' B = 16, as much as their arithmetic). Part of
// memory_kernels.h, compiled once per instruction set so that exp and tanh
// are ATen's vectorised ones; float32 and float64 only. The formulas are
// ATen's own (sigmoid as 1 / (1 + exp(-x)), softplus with threshold 20), so
// that the node equals the step-by-step path (tests/test_core_sequence.py).
#pragma once
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/dnc_controller_kernels.h"
#endif

#include "cpu/kernel_common.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

// The LSTM cell from its pre-activations gates (B, 4H), blocks i, f, g, o:
// s = sigmoid(gates) (all four blocks), g = tanh(gates_g), c = s_f c_prev + s_i g, tc = tanh(c), h = s_o tc.
template <typename T>
void lstm_cell_typed(const T* gates, const T* c_prev, int64_t B, int64_t H, T* s, T* g, T* c, T* tc, T* h) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  for (int64_t b = 0; b < B; ++b) {
    const T* x = gates + b * 4 * H;
    T* sb = s + b * 4 * H;
    for (int64_t j = 0; j < 4 * H; j += VL) {
      const int64_t k = std::min<int64_t>(VL, 4 * H - j);
      store_n(((Vec(T(0)) - load_n(x + j, k)).exp() + Vec(T(1))).reciprocal(), sb + j, k);
    }
    const int64_t o = b * H;
    for (int64_t j = 0; j < H; j += VL) {
      const int64_t k = std::min<int64_t>(VL, H - j);
      const Vec gv = load_n(x + 2 * H + j, k).tanh();
      store_n(gv, g + o + j, k);
      const Vec cv = load_n(sb + H + j, k) * load_n(c_prev + o + j, k) + load_n(sb + j, k) * gv;
      store_n(cv, c + o + j, k);
      const Vec t = cv.tanh();
      store_n(t, tc + o + j, k);
      store_n(load_n(sb + 3 * H + j, k) * t, h + o + j, k);
    }
  }
}

// The interface's activations from its pre-activations raw (B, S), columns [0, n_lin) linear, [n_lin, n_lin +
// n_one) oneplus, the rest sigmoid: act = [raw, 1 + softplus(raw), sigmoid(raw)], and fac, the derivative of
// act by raw: [1, softplus'(raw), s (1 - s)] with softplus'(x) = 1 above the threshold 20, as ATen's.
template <typename T>
void dnc_interface_typed(const T* raw, int64_t B, int64_t S, int64_t n_lin, int64_t n_one, T* act, T* fac) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const Vec one(T(1)), thr(T(20));
  for (int64_t b = 0; b < B; ++b) {
    const T* x = raw + b * S;
    T* a = act + b * S;
    T* f = fac + b * S;
    std::copy(x, x + n_lin, a);
    std::fill(f, f + n_lin, T(1));
    for (int64_t j = n_lin; j < n_lin + n_one; j += VL) {
      const int64_t k = std::min<int64_t>(VL, n_lin + n_one - j);
      const Vec v = load_n(x + j, k);
      const Vec above = v > thr;
      const Vec z = v.exp();
      store_n(Vec::blendv(z.log1p(), v, above) + one, a + j, k);
      store_n(Vec::blendv(z / (z + one), one, above), f + j, k);
    }
    for (int64_t j = n_lin + n_one; j < S; j += VL) {
      const int64_t k = std::min<int64_t>(VL, S - j);
      const Vec sg = ((Vec(T(0)) - load_n(x + j, k)).exp() + one).reciprocal();
      store_n(sg, a + j, k);
      store_n(sg * (one - sg), f + j, k);
    }
  }
}

// out = c0 + a b for the sequence node's per-step matmuls, whose rows are the batch (or a chunk of it: 8 or 16
// at the dnc package's setting) and whose b is a weight of at most a few hundred KB: a (M, K) rows of unit
// stride, b (K, N) contiguous, c0 none, a bias row (N) or (M, N) rows of unit stride, out (M, N) rows of unit
// stride. MKL's sgemm reached 54 to 66 GFLOP/s on these shapes at M = 8 on a 2-core AVX-512 EPYC, where it
// packs b at every call; this kernel keeps an 8-row block's outputs, two vectors wide, in registers and
// streams b once per block from L2, at 104 to 112 GFLOP/s there (about the core's multiply-add rate).
// Each output is c0 plus its K products added in k order, one fused multiply-add each, whatever M and the
// other rows: a chunk of the batch gets the bits of the same rows in the whole batch.
template <typename T, int MR>
void small_matmul_block(const T* a, int64_t lda, int64_t K, const T* b, int64_t N, const T* c0, int64_t c0s,
                        T* out, int64_t ldo) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  int64_t n = 0;
  for (; n + 2 * VL <= N; n += 2 * VL) {
    Vec acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) {
      acc0[r] = c0 ? Vec::loadu(c0 + r * c0s + n) : Vec(T(0));
      acc1[r] = c0 ? Vec::loadu(c0 + r * c0s + n + VL) : Vec(T(0));
    }
    const T* bk = b + n;
    for (int64_t k = 0; k < K; ++k, bk += N) {
      const Vec b0 = Vec::loadu(bk), b1 = Vec::loadu(bk + VL);
      for (int r = 0; r < MR; ++r) {
        const Vec ar(a[r * lda + k]);
        acc0[r] = at::vec::fmadd(ar, b0, acc0[r]);
        acc1[r] = at::vec::fmadd(ar, b1, acc1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      acc0[r].store(out + r * ldo + n);
      acc1[r].store(out + r * ldo + n + VL);
    }
  }
  for (; n < N; n += VL) {
    const int64_t w = std::min<int64_t>(VL, N - n);
    Vec acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = c0 ? load_n(c0 + r * c0s + n, w) : Vec(T(0));
    const T* bk = b + n;
    for (int64_t k = 0; k < K; ++k, bk += N) {
      const Vec b0 = load_n(bk, w);
      for (int r = 0; r < MR; ++r) acc[r] = at::vec::fmadd(Vec(a[r * lda + k]), b0, acc[r]);
    }
    for (int r = 0; r < MR; ++r) store_n(acc[r], out + r * ldo + n, w);
  }
}

// The last block's rows (fewer than MR) with a block of exactly that many rows.
template <typename T, int MR>
void small_matmul_rows(int64_t rows, const T* a, int64_t lda, int64_t K, const T* b, int64_t N, const T* c0,
                       int64_t c0s, T* out, int64_t ldo) {
  if constexpr (MR > 1) {
    if (rows < MR) return small_matmul_rows<T, MR - 1>(rows, a, lda, K, b, N, c0, c0s, out, ldo);
  }
  small_matmul_block<T, MR>(a, lda, K, b, N, c0, c0s, out, ldo);
}

template <typename T>
void small_matmul_typed(const T* a, int64_t lda, int64_t M, int64_t K, const T* b, int64_t N, const T* c0,
                        int64_t c0s, T* out, int64_t ldo) {
  // 2 MR accumulators, two vectors of b and one of a in registers: 8 rows with 32 vector registers (AVX-512),
  // 4 with 16 (AVX2).
  constexpr int MR = Vectorized<T>::size() * sizeof(T) >= 64 ? 8 : 4;
  for (int64_t m = 0; m < M; m += MR) {
    const T* c0m = c0 ? c0 + m * c0s : nullptr;
    small_matmul_rows<T, MR>(std::min<int64_t>(MR, M - m), a + m * lda, lda, K, b, N, c0m, c0s, out + m * ldo,
                             ldo);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

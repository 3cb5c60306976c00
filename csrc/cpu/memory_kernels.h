// CPU kernels of the memory ops, written once over at::vec::Vectorized and
// compiled once per instruction set (see kernel_table.h). Include only from a
// csrc/isa/kernels_*.cpp, after common/isa_prelude.h and after defining
// CPU_CAPABILITY. The kernels live in kernel_common.h, read_kernels.h and
// write_kernels.h; this file dispatches on the dtype and builds the table.
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

#include "cpu/content_write_kernels.h"
#include "cpu/dnc_controller_kernels.h"
#include "cpu/dnc_write_read_kernels.h"

namespace neuralmem {
namespace cpu {
namespace CPU_CAPABILITY {

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

// dm = grad_memory + content addressing's memory gradient (float and double).
inline void content_addressing_backward_add_k(const at::Tensor& gm, const at::Tensor& gw, const at::Tensor& w,
                                              const at::Tensor& memory, const at::Tensor& keys,
                                              const at::Tensor& strengths, double eps, at::Tensor& dm,
                                              at::Tensor& dk, at::Tensor& ds) {
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "addressing_backward_add", [&] {
    addressing_backward_typed<scalar_t, false>(nullptr, nullptr, nullptr, &gw, &w, memory, keys, strengths, eps,
                                               dm, dk, ds, &gm);
  });
}

// content_addressing_backward's key and strength gradients, its memory gradient left as coefficients; with
// dots and norms2 defined, the forward's raw dots and the rows' squared norms instead of a sweep for them.
inline void content_addressing_backward_coefs_k(const at::Tensor& gw, const at::Tensor& w, const at::Tensor& memory,
                                                const at::Tensor& keys, const at::Tensor& strengths, double eps,
                                                const at::Tensor& dots, const at::Tensor& norms2, at::Tensor& dk,
                                                at::Tensor& ds, at::Tensor& gamma, at::Tensor& coef, at::Tensor& q) {
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "addressing_backward_coefs", [&] {
    at::Tensor none;  // undefined: no memory gradient
    const bool given = dots.defined();
    addressing_backward_typed<scalar_t, false>(nullptr, nullptr, nullptr, &gw, &w, memory, keys, strengths, eps,
                                               none, dk, ds, nullptr, gamma.data_ptr<scalar_t>(),
                                               coef.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                               given ? dots.const_data_ptr<scalar_t>() : nullptr,
                                               given ? norms2.const_data_ptr<scalar_t>() : nullptr,
                                               given ? norms2.stride(0) : 0);
  });
}

// content_addressing (float and double) taking the rows' squared norms where norms2 is defined ((B, N), rows
// contiguous) and keeping the raw dots in dots ((B, H, N)) for content_addressing_backward_coefs.
inline void content_addressing_keep_k(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                      double eps, const at::Tensor& norms2, at::Tensor& weights, at::Tensor& dots) {
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "content_addressing_keep", [&] {
    const bool given = norms2.defined();
    content_addressing_typed<scalar_t>(memory, keys, strengths, eps, weights,
                                       given ? norms2.const_data_ptr<scalar_t>() : nullptr,
                                       given ? norms2.stride(0) : 0, dots.data_ptr<scalar_t>());
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

inline void content_write_fwd_k(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                const at::Tensor& erase, const at::Tensor& add, double eps, at::Tensor& out,
                                at::Tensor& lse) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_write", [&] {
    content_write_fwd_typed<scalar_t>(memory, keys, strengths, erase, add, eps, out, lse);
  });
}

inline void content_write_backward_k(const at::Tensor& g, const at::Tensor& lse, const at::Tensor& memory,
                                     const at::Tensor& keys, const at::Tensor& strengths, const at::Tensor& erase,
                                     const at::Tensor& add, double eps, at::Tensor& dm, at::Tensor& dk,
                                     at::Tensor& ds, at::Tensor& de, at::Tensor& da) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_write_backward", [&] {
    content_write_backward_typed<scalar_t>(g, lse, memory, keys, strengths, erase, add, eps, dm, dk, ds, de, da);
  });
}

inline void content_read_write_fwd_k(const at::Tensor& memory, const at::Tensor& rk, const at::Tensor& rs,
                                     const at::Tensor& wk, const at::Tensor& ws, const at::Tensor& erase,
                                     const at::Tensor& add, double eps, at::Tensor& reads, at::Tensor& rlse,
                                     at::Tensor& out, at::Tensor& wlse) {
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_read_write", [&] {
    content_read_write_fwd_typed<scalar_t>(memory, rk, rs, wk, ws, erase, add, eps, reads, rlse, out, wlse);
  });
}

inline void content_read_write_backward_k(const at::Tensor& gr, const at::Tensor& g, const at::Tensor& reads,
                                          const at::Tensor& rlse, const at::Tensor& wlse, const at::Tensor& memory,
                                          const at::Tensor& rk, const at::Tensor& rs, const at::Tensor& wk,
                                          const at::Tensor& ws, const at::Tensor& erase, const at::Tensor& add,
                                          double eps, at::Tensor& dm, at::Tensor& drk, at::Tensor& drs,
                                          at::Tensor& dwk, at::Tensor& dws, at::Tensor& de, at::Tensor& da) {
  const ReadSide rd{gr, reads, rlse, rk, rs, drk, drs};
  NEURALMEM_DISPATCH(memory.scalar_type(), "content_read_write_backward", [&] {
    content_write_backward_typed<scalar_t>(g, wlse, memory, wk, ws, erase, add, eps, dm, dwk, dws, de, da, &rd);
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

inline void dnc_write_read_k(const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase,
                             const at::Tensor& add, const at::Tensor& rk, const at::Tensor& rs, double eps,
                             at::Tensor& out, at::Tensor& rw, at::Tensor& reads, at::Tensor& dots) {
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), W = ww.size(1), R = rk.size(1);
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "write_read", [&] {
    dnc_write_read_typed<scalar_t>(memory, ww, erase, add, rk, rs, eps, B, N, D, W, R, out, rw, reads, dots);
  });
}

inline void dnc_write_read_backward_k(const at::Tensor& gmo, const at::Tensor& grw, const at::Tensor& grd,
                                      const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase,
                                      const at::Tensor& add, const at::Tensor& rk, const at::Tensor& rs,
                                      const at::Tensor& out, const at::Tensor& rw, double eps,
                                      const at::Tensor& pend_gamma, const at::Tensor& pend_coef,
                                      const at::Tensor& pend_q, const at::Tensor& dots, at::Tensor& dm,
                                      at::Tensor& dww, at::Tensor& de, at::Tensor& da, at::Tensor& dk,
                                      at::Tensor& ds) {
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), W = ww.size(1), R = rk.size(1);
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "write_read_backward", [&] {
    dnc_write_read_backward_typed<scalar_t>(gmo.defined() ? &gmo : nullptr, grw.defined() ? &grw : nullptr,
                                            grd.defined() ? &grd : nullptr, memory, ww, erase, add, rk, rs, out,
                                            rw, eps, B, N, D, W, R, dm, dww, de, da, dk, ds,
                                            pend_gamma.defined() ? &pend_gamma : nullptr, &pend_coef, &pend_q,
                                            dots.defined() ? &dots : nullptr);
  });
}

inline void lstm_cell_k(const at::Tensor& gates, const at::Tensor& c_prev, at::Tensor& s, at::Tensor& g,
                        at::Tensor& c, at::Tensor& tc, at::Tensor& h) {
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell", [&] {
    lstm_cell_typed<scalar_t>(gates.const_data_ptr<scalar_t>(), c_prev.const_data_ptr<scalar_t>(), c_prev.size(0),
                              c_prev.size(1), s.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                              tc.data_ptr<scalar_t>(), h.data_ptr<scalar_t>());
  });
}

inline void dnc_interface_k(const at::Tensor& raw, int64_t n_lin, int64_t n_one, at::Tensor& act, at::Tensor& fac) {
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "dnc_interface", [&] {
    dnc_interface_typed<scalar_t>(raw.const_data_ptr<scalar_t>(), raw.size(0), raw.size(1), n_lin, n_one,
                                  act.data_ptr<scalar_t>(), fac.data_ptr<scalar_t>());
  });
}

inline void small_matmul_k(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c0, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "small_matmul", [&] {
    const bool rows = c0.defined() && c0.dim() == 2;
    small_matmul_typed<scalar_t>(a.const_data_ptr<scalar_t>(), a.stride(0), a.size(0), a.size(1),
                                 b.const_data_ptr<scalar_t>(), b.size(1),
                                 c0.defined() ? c0.const_data_ptr<scalar_t>() : nullptr, rows ? c0.stride(0) : 0,
                                 out.data_ptr<scalar_t>(), out.stride(0));
  });
}

#undef NEURALMEM_DISPATCH

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
                     &content_write_fwd_k,
                     &content_write_backward_k,
                     &content_read_write_fwd_k,
                     &content_read_write_backward_k,
                     &content_read_write_k,
                     &dnc_write_read_k,
                     &dnc_write_read_backward_k,
                     &content_addressing_backward_add_k,
                     &content_addressing_backward_coefs_k,
                     &content_addressing_keep_k,
                     &lstm_cell_k,
                     &dnc_interface_k,
#ifdef CPU_CAPABILITY_DEFAULT
                     nullptr};  // without vector instructions MKL's sgemm is the faster
#else
                     &small_matmul_k};
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace neuralmem

// The CPU kernels of the memory ops, compiled once per instruction set (the
// replay sum tree has its own table, csrc/replay/tree_kernel_table.h).
//
// memory_kernels.h holds the kernels as templates over the element type; it
// is compiled three times (csrc/isa/kernels_{default,avx2,avx512}.cpp), each
// time with at::vec::Vectorized bound to that instruction set, exactly as
// ATen compiles its own CPU kernels per CPU_CAPABILITY. The host code in
// memory_ops_cpu.cpp validates arguments, allocates outputs and calls the
// table of the best instruction set this processor supports, so that one
// wheel runs everywhere and still uses 512-bit vectors where they exist.
//
// Every entry receives contiguous tensors of one dtype (lse: float32 for
// half inputs) with the shapes checked by the host code, and writes into
// preallocated outputs. `out` of memory_write may alias `memory` (in place).
#pragma once

#include <ATen/core/Tensor.h>

namespace neuralmem {
namespace cpu {

struct KernelTable {
  const char* name;
  void (*content_addressing)(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                             double eps, at::Tensor& weights);
  void (*content_addressing_backward)(const at::Tensor& grad_weights, const at::Tensor& weights,
                                      const at::Tensor& memory, const at::Tensor& keys,
                                      const at::Tensor& strengths, double eps, at::Tensor& grad_memory,
                                      at::Tensor& grad_keys, at::Tensor& grad_strengths);
  void (*memory_read)(const at::Tensor& memory, const at::Tensor& weights, at::Tensor& reads);
  void (*memory_read_backward)(const at::Tensor& grad_reads, const at::Tensor& memory, const at::Tensor& weights,
                               at::Tensor& grad_memory, at::Tensor& grad_weights);
  void (*content_read)(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths, double eps,
                       at::Tensor& reads, at::Tensor& lse);
  void (*content_read_backward)(const at::Tensor& grad_reads, const at::Tensor& reads, const at::Tensor& lse,
                                const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                double eps, at::Tensor& grad_memory, at::Tensor& grad_keys,
                                at::Tensor& grad_strengths);
  void (*memory_write)(const at::Tensor& memory, const at::Tensor& weights, const at::Tensor& erase,
                       const at::Tensor& add, at::Tensor& out);
  void (*memory_write_backward)(const at::Tensor& grad_out, const at::Tensor& memory, const at::Tensor& weights,
                                const at::Tensor& erase, const at::Tensor& add, at::Tensor& grad_memory,
                                at::Tensor& grad_weights, at::Tensor& grad_erase, at::Tensor& grad_add);
  void (*usage_update)(const at::Tensor& usage, const at::Tensor& weights, double decay, at::Tensor& out);
  // usage may be undefined; least (B,) int64 is written only when it is not.
  void (*content_write)(at::Tensor& memory, at::Tensor& usage, const at::Tensor& keys,
                        const at::Tensor& strengths, const at::Tensor& erase, const at::Tensor& add, double eps,
                        double decay, at::Tensor& least);
  // Differentiable content write, out of place: out = the written memory,
  // lse (B,W) the write heads' logsumexp (float32 for half inputs).
  void (*content_write_fwd)(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                            const at::Tensor& erase, const at::Tensor& add, double eps, at::Tensor& out,
                            at::Tensor& lse);
  void (*content_write_backward)(const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& memory,
                                 const at::Tensor& keys, const at::Tensor& strengths, const at::Tensor& erase,
                                 const at::Tensor& add, double eps, at::Tensor& grad_memory, at::Tensor& grad_keys,
                                 at::Tensor& grad_strengths, at::Tensor& grad_erase, at::Tensor& grad_add);
  // Differentiable content_read then content_write, both on the memory
  // before the write, out of place: reads and lse (B,H), out and lse (B,W).
  void (*content_read_write_fwd)(const at::Tensor& memory, const at::Tensor& read_keys,
                                 const at::Tensor& read_strengths, const at::Tensor& write_keys,
                                 const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
                                 double eps, at::Tensor& reads, at::Tensor& read_lse, at::Tensor& out,
                                 at::Tensor& write_lse);
  // Its backward: the gradients of the read heads (grad_read_keys,
  // grad_read_strengths), of the write's inputs, and one memory gradient.
  void (*content_read_write_backward)(const at::Tensor& grad_reads, const at::Tensor& grad_out,
                                      const at::Tensor& reads, const at::Tensor& read_lse,
                                      const at::Tensor& write_lse, const at::Tensor& memory,
                                      const at::Tensor& read_keys, const at::Tensor& read_strengths,
                                      const at::Tensor& write_keys, const at::Tensor& write_strengths,
                                      const at::Tensor& erase, const at::Tensor& add, double eps,
                                      at::Tensor& grad_memory, at::Tensor& grad_read_keys,
                                      at::Tensor& grad_read_strengths, at::Tensor& grad_write_keys,
                                      at::Tensor& grad_write_strengths, at::Tensor& grad_erase, at::Tensor& grad_add);
  // content_read then content_write_ on the memory before the write.
  void (*content_read_write)(at::Tensor& memory, at::Tensor& usage, const at::Tensor& read_keys,
                             const at::Tensor& read_strengths, const at::Tensor& write_keys,
                             const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
                             double eps, double decay, at::Tensor& reads, at::Tensor& lse, at::Tensor& least);
  // neuralmem_dnc::write_read (csrc/dnc/write_read.cpp), float32/float64: the
  // erase-add write, then content read weights over the new memory and reads. A defined `dots`
  // ((B, R + 1, N), MemoryCore's sequence node) receives the read heads' cosine numerators and the new
  // rows' squared norms, which dnc_write_read_backward then takes instead of computing them again.
  void (*dnc_write_read)(const at::Tensor& memory, const at::Tensor& write_weights, const at::Tensor& erase,
                         const at::Tensor& add, const at::Tensor& read_keys, const at::Tensor& read_strengths,
                         double eps, at::Tensor& new_memory, at::Tensor& read_weights, at::Tensor& reads,
                         at::Tensor& dots);
  // Its backward; an undefined incoming gradient counts as zeros. With pend_gamma defined (float and double,
  // MemoryCore's sequence node), grad_new_memory is taken as grad_new_memory + a content addressing's memory
  // gradient over new_memory that content_addressing_backward_coefs left pending: row n gets
  // - pend_gamma[b, n] new_memory[b, n] + sum_h pend_coef[b, h, n] pend_q[b, h].
  void (*dnc_write_read_backward)(const at::Tensor& grad_new_memory, const at::Tensor& grad_read_weights,
                                  const at::Tensor& grad_reads, const at::Tensor& memory,
                                  const at::Tensor& write_weights, const at::Tensor& erase, const at::Tensor& add,
                                  const at::Tensor& read_keys, const at::Tensor& read_strengths,
                                  const at::Tensor& new_memory, const at::Tensor& read_weights, double eps,
                                  const at::Tensor& pend_gamma, const at::Tensor& pend_coef,
                                  const at::Tensor& pend_q, const at::Tensor& dots, at::Tensor& grad_memory,
                                  at::Tensor& grad_write_weights, at::Tensor& grad_erase, at::Tensor& grad_add,
                                  at::Tensor& grad_read_keys, at::Tensor& grad_read_strengths);
  // content_addressing_backward whose memory gradient is added to grad_memory
  // (grad_memory_out = grad_memory + that gradient): float and double only.
  void (*content_addressing_backward_add)(const at::Tensor& grad_memory, const at::Tensor& grad_weights,
                                          const at::Tensor& weights, const at::Tensor& memory,
                                          const at::Tensor& keys, const at::Tensor& strengths, double eps,
                                          at::Tensor& grad_memory_out, at::Tensor& grad_keys,
                                          at::Tensor& grad_strengths);
  // content_addressing_backward without the memory's gradient, which it leaves as per-slot coefficients
  // (float and double): d/dmemory[b, n] = - gamma[b, n] memory[b, n] + sum_h coef[b, h, n] q[b, h], with
  // gamma (B, N), coef (B, H, N) and q (B, H, D) the unit keys. One read of the memory where the gradient
  // would take a read and a write of (B, N, D) more; dnc_write_read_backward adds it where it reads the
  // gradient of its new memory anyway.
  // With dots and norms2 defined (MemoryCore's sequence node): the forward's raw dots q_h . m_n (B, H, N) and
  // the rows' squared norms (B, N), taken instead of the sweep of the memory that computes them.
  void (*content_addressing_backward_coefs)(const at::Tensor& grad_weights, const at::Tensor& weights,
                                            const at::Tensor& memory, const at::Tensor& keys,
                                            const at::Tensor& strengths, double eps, const at::Tensor& dots,
                                            const at::Tensor& norms2, at::Tensor& grad_keys,
                                            at::Tensor& grad_strengths, at::Tensor& gamma, at::Tensor& coef,
                                            at::Tensor& q);
  // content_addressing (float and double) for MemoryCore's sequence node: the rows' squared norms taken
  // from norms2 ((B, N), rows contiguous) where it is defined, the raw dots kept in dots (B, H, N).
  void (*content_addressing_keep)(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                                  double eps, const at::Tensor& norms2, at::Tensor& weights, at::Tensor& dots);
  // MemoryCore's sequence node (csrc/dnc/core_sequence.cpp), float and double, contiguous (B, .) inputs: one
  // step's LSTM cell from its pre-activations gates (B, 4H) and c_prev (B, H): s (B, 4H) the sigmoids of
  // all four blocks, g = tanh of the cell block, the new cell c, tc = tanh(c) and h.
  void (*lstm_cell)(const at::Tensor& gates, const at::Tensor& c_prev, at::Tensor& s, at::Tensor& g, at::Tensor& c,
                    at::Tensor& tc, at::Tensor& h);
  // The interface's activations act (B, S) from raw (B, S): n_lin linear columns, n_one oneplus, the rest
  // sigmoid; fac (B, S) their derivatives.
  void (*dnc_interface)(const at::Tensor& raw, int64_t n_lin, int64_t n_one, at::Tensor& act, at::Tensor& fac);
  // out = c0 + a b for the node's per-step matmuls (float and double; cpu/dnc_controller_kernels.h): a (M, K)
  // and out (M, N) with rows of unit stride, b (K, N) contiguous, c0 undefined, (N) contiguous or (M, N) with
  // rows of unit stride. Null in the baseline table (no vector instructions): ATen's addmm there.
  void (*small_matmul)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c0, at::Tensor& out);
};

// Null when the compiler could not build that instruction set.
const KernelTable* kernel_table_DEFAULT();
const KernelTable* kernel_table_AVX2();
const KernelTable* kernel_table_AVX512();

// The table of the best instruction set this processor supports (and
// NEURALMEM_CPU_CAPABILITY allows), chosen once (memory_ops_cpu.cpp).
const KernelTable& kernels();

}  // namespace cpu
}  // namespace neuralmem

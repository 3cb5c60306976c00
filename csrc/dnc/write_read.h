// What MemoryCore's sequence node (core_sequence.cpp) calls of write_read.cpp besides the registered ops:
// a write addressing's memory gradient left pending as per-slot coefficients, and write_read's backward that
// adds it to the gradient of its new memory (cpu/kernel_table.h). CPU, float32 and float64, below autograd.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace neuralmem {
namespace dnc {

// (grad_keys (B,H,D), grad_strengths (B,H), gamma (B,N), coef (B,H,N), q (B,H,D)): content addressing's
// backward with d/dmemory[b, n] = -gamma[b, n] memory[b, n] + sum_h coef[b, h, n] q[b, h] not formed. With
// dots and norms2 (content_addressing_keep's dots and the norms it took), no sweep computes them again: the
// same bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> addressing_backward_coefs(
    const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& memory, const at::Tensor& keys,
    const at::Tensor& strengths, double eps, const at::Tensor& dots = at::Tensor(),
    const at::Tensor& norms2 = at::Tensor());

// neuralmem::content_addressing (float and double) as (weights, dots): dots (B, H, N) the raw q_h . m_n for
// addressing_backward_coefs. norms2 ((B, N), rows contiguous; undefined: computed): the rows' squared norms,
// as write_read_keep's dots give them for the memory it wrote. The same weights, bit for bit.
std::tuple<at::Tensor, at::Tensor> content_addressing_keep(const at::Tensor& memory, const at::Tensor& keys,
                                                           const at::Tensor& strengths, double eps,
                                                           const at::Tensor& norms2);

// neuralmem_dnc::write_read, plus dots (B, R + 1, N): the read heads' cosine numerators k_r . new_n and the
// new rows' squared norms, for write_read_backward_pending.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_keep(
    const at::Tensor& memory, const at::Tensor& write_weights, const at::Tensor& erase, const at::Tensor& add,
    const at::Tensor& read_keys, const at::Tensor& read_strengths, double eps);

// neuralmem_dnc::write_read_backward with grad_new_memory + the pending gradient (gamma, coef, q) of an
// addressing over new_memory (none where pend_gamma is undefined), and with dots (write_read_keep's, or
// undefined) in place of the sweep that would compute them again; the same six gradients, bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_backward_pending(
    const at::Tensor& grad_new_memory, const at::Tensor& grad_read_weights, const at::Tensor& grad_reads,
    const at::Tensor& memory, const at::Tensor& write_weights, const at::Tensor& erase, const at::Tensor& add,
    const at::Tensor& read_keys, const at::Tensor& read_strengths, const at::Tensor& new_memory,
    const at::Tensor& read_weights, double eps, const at::Tensor& pend_gamma, const at::Tensor& pend_coef,
    const at::Tensor& pend_q, const at::Tensor& dots);

}  // namespace dnc
}  // namespace neuralmem

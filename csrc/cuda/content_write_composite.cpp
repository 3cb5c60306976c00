// The differentiable content write (content_write, content_write_backward)
// and content_read_write for CUDA tensors, composed of the CUDA kernels of
// content_read, content_addressing and memory_write through the dispatcher: the (B,W,N) weights exist here, and
// the backward pays both ops' passes. A fused CUDA kernel, as the CPU one
// (csrc/cpu/content_write_kernels.h), would read the memory twice instead.
// Plain C++ over ATen: compiled with or without the CUDA toolkit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace neuralmem {
namespace composite {
namespace {

using at::Tensor;

Tensor addressing(const Tensor& m, const Tensor& k, const Tensor& s, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neuralmem::content_addressing", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, double)>();
  return op.call(m, k, s, eps);
}

// strengths * cos(keys, slots) in float (double for double), as the reference's logits.
Tensor logits(const Tensor& m, const Tensor& k, const Tensor& s, double eps) {
  const auto acc = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor mm = m.to(acc), kk = k.to(acc), ss = s.to(acc);
  const Tensor mn = mm / mm.norm(2, {-1}, true).clamp_min(eps);
  const Tensor kn = kk / kk.norm(2, {-1}, true).clamp_min(eps);
  return ss.unsqueeze(-1) * at::matmul(kn, mn.transpose(-1, -2));
}

std::tuple<Tensor, Tensor> content_write_composite(const Tensor& memory, const Tensor& keys, const Tensor& strengths,
                                                   const Tensor& erase, const Tensor& add, double eps) {
  static auto write = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("neuralmem::memory_write", "")
                          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  const Tensor w = addressing(memory, keys, strengths, eps);
  return {write.call(memory, w, erase, add), at::logsumexp(logits(memory, keys, strengths, eps), {-1})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> content_write_backward_composite(
    const Tensor& grad_out, const Tensor& lse, const Tensor& memory, const Tensor& keys, const Tensor& strengths,
    const Tensor& erase, const Tensor& add, double eps) {
  (void)lse;
  static auto write_bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neuralmem::memory_write_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&)>();
  static auto addr_bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neuralmem::content_addressing_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, double)>();
  const Tensor w = addressing(memory, keys, strengths, eps);
  auto [dm, dw, de, da] = write_bwd.call(grad_out, memory, w, erase, add);
  auto [dm2, dk, ds] = addr_bwd.call(dw, w, memory, keys, strengths, eps);
  dm.add_(dm2);
  return {dm, dk, ds, de, da};
}

// content_read_write: the CUDA content_read, then content_write above; its
// backward the two backwards and the sum of their memory gradients.
std::tuple<Tensor, Tensor, Tensor, Tensor> content_read_write_composite(const Tensor& memory, const Tensor& rkeys,
                                                                        const Tensor& rstr, const Tensor& wkeys,
                                                                        const Tensor& wstr, const Tensor& erase,
                                                                        const Tensor& add, double eps) {
  static auto read = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("neuralmem::content_read", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>();
  auto [reads, rlse] = read.call(memory, rkeys, rstr, eps);
  auto [out, wlse] = content_write_composite(memory, wkeys, wstr, erase, add, eps);
  return {reads, out, rlse, wlse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> content_read_write_backward_composite(
    const Tensor& grad_reads, const Tensor& grad_out, const Tensor& reads, const Tensor& rlse, const Tensor& wlse,
    const Tensor& memory, const Tensor& rkeys, const Tensor& rstr, const Tensor& wkeys, const Tensor& wstr,
    const Tensor& erase, const Tensor& add, double eps) {
  static auto read_bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neuralmem::content_read_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, double, bool)>();
  auto [dm, drk, drs] = read_bwd.call(grad_reads, reads, rlse, memory, rkeys, rstr, eps, true);
  auto [dm2, dwk, dws, de, da] = content_write_backward_composite(grad_out, wlse, memory, wkeys, wstr, erase, add,
                                                                  eps);
  dm2.add_(dm);
  return {dm2, drk, drs, dwk, dws, de, da};
}

}  // namespace
}  // namespace composite
}  // namespace neuralmem

TORCH_LIBRARY_IMPL(neuralmem, CUDA, m) {
  m.impl("content_write", &neuralmem::composite::content_write_composite);
  m.impl("content_write_backward", &neuralmem::composite::content_write_backward_composite);
  m.impl("content_read_write", &neuralmem::composite::content_read_write_composite);
  m.impl("content_read_write_backward", &neuralmem::composite::content_read_write_backward_composite);
}

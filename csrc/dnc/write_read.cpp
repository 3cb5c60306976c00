// neuralmem_dnc::write_read: the second half of a DNC access step as one op.
//
//   new_memory   = memory * prod_w (1 - write_weights[w] erase[w]) + sum_w write_weights[w] add[w]
//   read_weights = softmax_n(strengths[r] * cos(read_keys[r], new_memory[n]))
//   reads        = read_weights @ new_memory
//
// which nn/access.py otherwise runs as memory_write, content_addressing and
// memory_read: three ops, three autograd nodes, and three uses of the new
// memory whose gradients autograd adds up in (B, N, D) buffers. Here the
// forward visits each slot once (erase-add, norm and read logits while the
// row is in cache; a softmax over (R, N); the reads from the rows just
// written), and the backward takes the gradients of all three outputs at
// once and writes the memory's gradient in one visit of each slot.
//
// The cosine follows F.normalize: x / max(|x|, eps) for keys and slots, so a
// slot of norm below eps has a gradient of (key term) / eps, as in the
// reference (neuralmem_fast/ops/dnc.py, write_read_ref) and content_addressing.
// CPU kernels only (cpu/dnc_write_read_kernels.h, in the per-instruction-set
// kernel table), float32 and float64; other devices and dtypes run the three
// ops. Semantics, the gradient formula's registration and the fake
// kernels: neuralmem_fast/ops/dnc.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/buffer_pool.h"
#include "inplace_autograd.h"
#include "inplace_checks.h"
#include "cpu/kernel_table.h"
#include "dnc/checks.h"
#include "dnc/write_read.h"

TORCH_LIBRARY_FRAGMENT(neuralmem_dnc, m) {
  m.def("write_read(Tensor memory, Tensor write_weights, Tensor erase, Tensor add, Tensor read_keys, "
        "Tensor read_strengths, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad_memory, grad_write_weights, grad_erase, grad_add, grad_read_keys, grad_read_strengths);
  // a gradient given as None counts as zeros.
  m.def("write_read_backward(Tensor? grad_new_memory, Tensor? grad_read_weights, Tensor? grad_reads, "
        "Tensor memory, Tensor write_weights, Tensor erase, Tensor add, Tensor read_keys, Tensor read_strengths, "
        "Tensor new_memory, Tensor read_weights, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // content_addressing_backward (neuralmem::) with the memory's gradient added to grad_memory:
  // (grad_memory + d/dmemory, grad_keys, grad_strengths). The access step's backward (ops/dnc.py) adds the
  // write addressing's gradient to write_read's this way: one pass where a gradient and an add took two.
  m.def("addressing_backward_add(Tensor grad_memory, Tensor grad_weights, Tensor weights, Tensor memory, "
        "Tensor keys, Tensor strengths, float eps) -> (Tensor, Tensor, Tensor)");
  // The same with the sum written over grad_memory in place: (grad_keys, grad_strengths). Without the
  // out-of-place op's copy of grad_memory into a new buffer, one pass over (B, N, D) less; the access step's
  // backward runs it on the memory gradient that write_read_backward has just made.
  m.def("addressing_backward_add_(Tensor(a!) grad_memory, Tensor grad_weights, Tensor weights, Tensor memory, "
        "Tensor keys, Tensor strengths, float eps) -> (Tensor, Tensor)");
}

namespace neuralmem {
namespace dnc {
namespace {

struct WRDims {
  int64_t B, N, D, W, R;
};

// t: shape `want`, the dtype of memory, on the CPU (checks.h).
void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want, const at::Tensor& memory,
                 const char* hint) {
  check_tensor(t, name, want, memory, "memory", hint);
}

// memory: (B, N, D) float32/float64 on the CPU; eps > 0.
void check_memory_eps(const at::Tensor& memory, double eps) {
  TORCH_CHECK_VALUE(memory.defined() && memory.dim() == 3, "memory must have shape (B, N, D), got ",
                    memory.defined() ? memory.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble,
                   "memory must be float32 or float64 for the CPU kernel, got ", memory.scalar_type());
  TORCH_CHECK_VALUE(memory.device().is_cpu(), "memory must be a CPU tensor for the CPU kernel, got ",
                    memory.device());
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
}

WRDims check_inputs(const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase, const at::Tensor& add,
                    const at::Tensor& keys, const at::Tensor& str, double eps) {
  check_memory_eps(memory, eps);
  TORCH_CHECK_VALUE(ww.dim() == 3, "write_weights must have shape (B, W, N), got ", ww.sizes());
  TORCH_CHECK_VALUE(keys.dim() == 3, "read_keys must have shape (B, R, D), got ", keys.sizes());
  const WRDims d{memory.size(0), memory.size(1), memory.size(2), ww.size(1), keys.size(1)};
  TORCH_CHECK_VALUE(d.N >= 1 && d.D >= 1, "memory must have at least one slot and one dimension, got ",
                    memory.sizes());
  check_shape(ww, "write_weights", {d.B, d.W, d.N}, memory, "(B, W, N)");
  check_shape(erase, "erase", {d.B, d.W, d.D}, memory, "(B, W, D)");
  check_shape(add, "add", {d.B, d.W, d.D}, memory, "(B, W, D)");
  check_shape(keys, "read_keys", {d.B, d.R, d.D}, memory, "(B, R, D)");
  check_shape(str, "read_strengths", {d.B, d.R}, memory, "(B, R)");
  return d;
}

// write_read, and with keep_dots also the read heads' cosine numerators and the new rows' squared norms
// ((B, R + 1, N)) for the backward; undefined without.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_impl(const at::Tensor& memory,
                                                                          const at::Tensor& ww,
                                                                          const at::Tensor& erase,
                                                                          const at::Tensor& add,
                                                                          const at::Tensor& keys,
                                                                          const at::Tensor& str, double eps,
                                                                          bool keep_dots) {
  const WRDims d = check_inputs(memory, ww, erase, add, keys, str, eps);
  // Memory-sized outputs from the pool (cpu/buffer_pool.h): a recurrent step keeps one per time step and
  // frees them together; fresh pages would fault in at every step.
  at::Tensor out = cpu::empty_like_c(memory);
  at::Tensor rw = at::empty({d.B, d.R, d.N}, memory.options());
  at::Tensor rd = at::empty({d.B, d.R, d.D}, memory.options());
  at::Tensor dots = keep_dots ? at::empty({d.B, d.R + 1, d.N}, memory.options()) : at::Tensor();
  cpu::kernels().dnc_write_read(memory.contiguous(), ww.contiguous(), erase.contiguous(), add.contiguous(),
                                keys.contiguous(), str.contiguous(), eps, out, rw, rd, dots);
  return {out, rw, rd, dots};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> write_read_cpu(const at::Tensor& memory, const at::Tensor& ww,
                                                              const at::Tensor& erase, const at::Tensor& add,
                                                              const at::Tensor& keys, const at::Tensor& str,
                                                              double eps) {
  auto [out, rw, rd, dots] = write_read_impl(memory, ww, erase, add, keys, str, eps, /*keep_dots=*/false);
  return {out, rw, rd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_backward_impl(
    const std::optional<at::Tensor>& g_mo, const std::optional<at::Tensor>& g_rw,
    const std::optional<at::Tensor>& g_rd, const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase,
    const at::Tensor& add, const at::Tensor& keys, const at::Tensor& str, const at::Tensor& new_memory,
    const at::Tensor& read_weights, double eps, const at::Tensor& pend_gamma = at::Tensor(),
    const at::Tensor& pend_coef = at::Tensor(), const at::Tensor& pend_q = at::Tensor(),
    const at::Tensor& dots = at::Tensor()) {
  const WRDims d = check_inputs(memory, ww, erase, add, keys, str, eps);
  check_shape(new_memory, "new_memory", {d.B, d.N, d.D}, memory, "(B, N, D)");
  check_shape(read_weights, "read_weights", {d.B, d.R, d.N}, memory, "(B, R, N)");
  if (dots.defined()) check_shape(dots, "dots", {d.B, d.R + 1, d.N}, memory, "(B, R + 1, N)");
  at::Tensor gmo, grw, grd;
  if (g_mo.has_value() && g_mo->defined()) {
    check_shape(*g_mo, "grad_new_memory", {d.B, d.N, d.D}, memory, "(B, N, D)");
    gmo = cpu::contiguous_pooled(*g_mo);  // often expanded (the gradient of a sum)
  }
  if (g_rw.has_value() && g_rw->defined()) {
    check_shape(*g_rw, "grad_read_weights", {d.B, d.R, d.N}, memory, "(B, R, N)");
    grw = g_rw->contiguous();
  }
  if (g_rd.has_value() && g_rd->defined()) {
    check_shape(*g_rd, "grad_reads", {d.B, d.R, d.D}, memory, "(B, R, D)");
    grd = g_rd->contiguous();
  }
  at::Tensor dm = cpu::empty_like_c(memory);
  at::Tensor dww = at::empty({d.B, d.W, d.N}, memory.options());
  at::Tensor de = at::empty({d.B, d.W, d.D}, memory.options());
  at::Tensor da = at::empty({d.B, d.W, d.D}, memory.options());
  at::Tensor dk = at::empty({d.B, d.R, d.D}, memory.options());
  at::Tensor ds = at::empty({d.B, d.R}, memory.options());
  cpu::kernels().dnc_write_read_backward(gmo, grw, grd, memory.contiguous(), ww.contiguous(), erase.contiguous(),
                                    add.contiguous(), keys.contiguous(), str.contiguous(), new_memory.contiguous(),
                                    read_weights.contiguous(), eps, pend_gamma, pend_coef, pend_q,
                                    dots.defined() ? dots.contiguous() : dots, dm, dww, de, da, dk, ds);
  return {dm, dww, de, da, dk, ds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_backward_cpu(
    const std::optional<at::Tensor>& g_mo, const std::optional<at::Tensor>& g_rw,
    const std::optional<at::Tensor>& g_rd, const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase,
    const at::Tensor& add, const at::Tensor& keys, const at::Tensor& str, const at::Tensor& new_memory,
    const at::Tensor& read_weights, double eps) {
  return write_read_backward_impl(g_mo, g_rw, g_rd, memory, ww, erase, add, keys, str, new_memory, read_weights,
                                  eps);
}

// The checks of a content addressing's memory, keys and strengths; returns H.
int64_t check_addressing_keys(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& str, double eps) {
  check_memory_eps(memory, eps);
  TORCH_CHECK_VALUE(keys.defined() && keys.dim() == 3, "keys must have shape (B, H, D), got ",
                    keys.defined() ? keys.sizes() : c10::IntArrayRef{});
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2), H = keys.size(1);
  TORCH_CHECK_VALUE(N >= 1 && D >= 1, "memory must have at least one slot and one dimension, got ", memory.sizes());
  check_shape(keys, "keys", {B, H, D}, memory, "(B, H, D)");
  check_shape(str, "strengths", {B, H}, memory, "(B, H)");
  return H;
}

// The checks of an addressing backward's inputs; returns H.
int64_t check_addressing(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& memory,
                         const at::Tensor& keys, const at::Tensor& str, double eps) {
  const int64_t H = check_addressing_keys(memory, keys, str, eps);
  const int64_t B = memory.size(0), N = memory.size(1);
  check_shape(weights, "weights", {B, H, N}, memory, "(B, H, N)");
  check_shape(grad_weights, "grad_weights", {B, H, N}, memory, "(B, H, N)");
  return H;
}

// The checks of both addressing_backward_add ops; returns H.
int64_t check_addressing_add(const at::Tensor& grad_memory, const at::Tensor& grad_weights, const at::Tensor& weights,
                             const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& str, double eps) {
  const int64_t H = check_addressing(grad_weights, weights, memory, keys, str, eps);
  check_shape(grad_memory, "grad_memory", {memory.size(0), memory.size(1), memory.size(2)}, memory, "(B, N, D)");
  return H;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> addressing_backward_add_cpu(
    const at::Tensor& grad_memory, const at::Tensor& grad_weights, const at::Tensor& weights,
    const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& str, double eps) {
  const int64_t H = check_addressing_add(grad_memory, grad_weights, weights, memory, keys, str, eps);
  at::Tensor dm = cpu::empty_like_c(memory);
  at::Tensor dk = at::empty({memory.size(0), H, memory.size(2)}, memory.options());
  at::Tensor ds = at::empty({memory.size(0), H}, memory.options());
  cpu::kernels().content_addressing_backward_add(cpu::contiguous_pooled(grad_memory), grad_weights.contiguous(),
                                                 weights.contiguous(), memory.contiguous(), keys.contiguous(),
                                                 str.contiguous(), eps, dm, dk, ds);
  return {dm, dk, ds};
}

// In place: the kernel adds each block of the gradient to what grad_memory holds (it skips the copy when
// the incoming and outgoing buffers are one). A strided grad_memory is summed in a contiguous buffer and
// copied back.
std::tuple<at::Tensor, at::Tensor> addressing_backward_add_inplace_cpu(
    at::Tensor& grad_memory, const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& memory,
    const at::Tensor& keys, const at::Tensor& str, double eps) {
  const int64_t H = check_addressing_add(grad_memory, grad_weights, weights, memory, keys, str, eps);
  check_no_overlap("addressing_backward_add_", grad_memory, "grad_memory",
                   {{"grad_weights", &grad_weights}, {"weights", &weights}, {"memory", &memory}, {"keys", &keys},
                    {"strengths", &str}});
  at::Tensor dk = at::empty({memory.size(0), H, memory.size(2)}, memory.options());
  at::Tensor ds = at::empty({memory.size(0), H}, memory.options());
  at::Tensor dm = grad_memory.is_contiguous() ? grad_memory : cpu::contiguous_pooled(grad_memory);
  cpu::kernels().content_addressing_backward_add(dm, grad_weights.contiguous(), weights.contiguous(),
                                                 memory.contiguous(), keys.contiguous(), str.contiguous(), eps, dm,
                                                 dk, ds);
  if (!dm.is_same(grad_memory)) grad_memory.copy_(dm);
  return {dk, ds};
}

// Autograd key: a gradient op with no gradient of its own. With grad mode on, a grad_memory that is a leaf
// requiring grad, or any input that requires grad, is refused; the version counter of grad_memory moves.
std::tuple<at::Tensor, at::Tensor> addressing_backward_add_inplace_autograd(
    at::Tensor& grad_memory, const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& memory,
    const at::Tensor& keys, const at::Tensor& str, double eps) {
  const char* op_name = "addressing_backward_add_";
  check_mutated(op_name, grad_memory, "grad_memory");
  if (c10::GradMode::is_enabled()) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_memory", &grad_memory},
                                  {"grad_weights", &grad_weights}, {"weights", &weights}, {"memory", &memory},
                                  {"keys", &keys}, {"strengths", &str}}) {
      TORCH_CHECK(!requires_grad(*t), "neuralmem_dnc::addressing_backward_add_ has no gradient of its own, but ",
                  name, " requires grad. For a gradient that can be differentiated again, differentiate "
                  "neuralmem_fast.ops.content_addressing with create_graph=True; otherwise run under torch.no_grad().");
    }
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neuralmem_dnc::addressing_backward_add_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double)>();
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(grad_memory, grad_weights, weights, memory, keys, str, eps);
  }
  bump(grad_memory);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_backward_pending(
    const at::Tensor& g_mo, const at::Tensor& g_rw, const at::Tensor& g_rd, const at::Tensor& memory,
    const at::Tensor& ww, const at::Tensor& erase, const at::Tensor& add, const at::Tensor& keys,
    const at::Tensor& str, const at::Tensor& new_memory, const at::Tensor& read_weights, double eps,
    const at::Tensor& pend_gamma, const at::Tensor& pend_coef, const at::Tensor& pend_q, const at::Tensor& dots) {
  if (!pend_gamma.defined()) {
    return write_read_backward_impl(g_mo, g_rw, g_rd, memory, ww, erase, add, keys, str, new_memory, read_weights,
                                    eps, at::Tensor(), at::Tensor(), at::Tensor(), dots);
  }
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  TORCH_CHECK(pend_coef.dim() == 3 && pend_coef.size(0) == B && pend_coef.size(2) == N,
              "write_read_backward_pending: pend_coef must be (B, P, N), got ", pend_coef.sizes());
  check_shape(pend_gamma, "pend_gamma", {B, N}, memory, "(B, N)");
  check_shape(pend_q, "pend_q", {B, pend_coef.size(1), D}, memory, "(B, P, D)");
  return write_read_backward_impl(g_mo, g_rw, g_rd, memory, ww, erase, add, keys, str, new_memory, read_weights,
                                  eps, pend_gamma.contiguous(), pend_coef.contiguous(), pend_q.contiguous(), dots);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_read_keep(
    const at::Tensor& memory, const at::Tensor& ww, const at::Tensor& erase, const at::Tensor& add,
    const at::Tensor& keys, const at::Tensor& str, double eps) {
  return write_read_impl(memory, ww, erase, add, keys, str, eps, /*keep_dots=*/true);
}

namespace {

// norms2: (B, N), the memory's dtype, rows contiguous (a column of write_read_keep's dots).
void check_norms2(const at::Tensor& norms2, const at::Tensor& memory) {
  check_shape(norms2, "norms2", {memory.size(0), memory.size(1)}, memory, "(B, N)");
  TORCH_CHECK_VALUE(norms2.stride(1) == 1 || memory.size(1) == 1, "norms2 must have contiguous rows, got strides ",
                    norms2.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> content_addressing_keep(const at::Tensor& memory, const at::Tensor& keys,
                                                           const at::Tensor& str, double eps,
                                                           const at::Tensor& norms2) {
  const int64_t H = check_addressing_keys(memory, keys, str, eps);
  const int64_t B = memory.size(0), N = memory.size(1);
  if (norms2.defined()) check_norms2(norms2, memory);
  at::Tensor w = at::empty({B, H, N}, memory.options());
  at::Tensor dots = at::empty({B, H, N}, memory.options());
  cpu::kernels().content_addressing_keep(memory.contiguous(), keys.contiguous(), str.contiguous(), eps, norms2, w,
                                         dots);
  return {w, dots};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> addressing_backward_coefs(
    const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& memory, const at::Tensor& keys,
    const at::Tensor& str, double eps, const at::Tensor& dots, const at::Tensor& norms2) {
  const int64_t H = check_addressing(grad_weights, weights, memory, keys, str, eps);
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  TORCH_CHECK_VALUE(dots.defined() == norms2.defined(), "dots and norms2 must be given together");
  if (dots.defined()) {
    check_shape(dots, "dots", {B, H, N}, memory, "(B, H, N)");
    check_norms2(norms2, memory);
  }
  at::Tensor dk = at::empty({B, H, D}, memory.options());
  at::Tensor ds = at::empty({B, H}, memory.options());
  at::Tensor gamma = at::empty({B, N}, memory.options());
  at::Tensor coef = at::empty({B, H, N}, memory.options());
  at::Tensor q = at::empty({B, H, D}, memory.options());
  cpu::kernels().content_addressing_backward_coefs(grad_weights.contiguous(), weights.contiguous(),
                                                   memory.contiguous(), keys.contiguous(), str.contiguous(), eps,
                                                   dots.defined() ? dots.contiguous() : dots, norms2, dk, ds, gamma,
                                                   coef, q);
  return {dk, ds, gamma, coef, q};
}

}  // namespace dnc
}  // namespace neuralmem

TORCH_LIBRARY_IMPL(neuralmem_dnc, CPU, m) {
  m.impl("write_read", &neuralmem::dnc::write_read_cpu);
  m.impl("write_read_backward", &neuralmem::dnc::write_read_backward_cpu);
  m.impl("addressing_backward_add", &neuralmem::dnc::addressing_backward_add_cpu);
  m.impl("addressing_backward_add_", &neuralmem::dnc::addressing_backward_add_inplace_cpu);
}

TORCH_LIBRARY_IMPL(neuralmem_dnc, Autograd, m) {
  m.impl("addressing_backward_add_", &neuralmem::dnc::addressing_backward_add_inplace_autograd);
}

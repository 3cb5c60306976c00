// CPU host code of the memory ops: argument checks, output allocation and
// the registration of every neuralmem:: schema for the CPU dispatch key.
//
// The arithmetic lives in memory_kernels.h, compiled per instruction set;
// the table used is chosen once per process: the best one this processor
// supports, capped by NEURALMEM_CPU_CAPABILITY (or else ATen's
// ATEN_CPU_CAPABILITY) = default | avx2 | avx512, so that each path can be
// tested on one machine. neuralmem::cpu_capability() names the table in use.
//
// The Python layer validates first and hands over contiguous tensors; the
// checks here repeat the essentials for direct torch.ops callers (opcheck,
// torch.compile graphs), with errors that name the argument. Non-contiguous
// inputs are made contiguous here; in-place targets must already be.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/hugepages.h"
#include "common/isa.h"
#include "cpu/buffer_pool.h"
#include "cpu/kernel_table.h"
#include "inplace_checks.h"


namespace neuralmem {
namespace cpu {

// ---------------------------------------------------------------------------
// instruction-set choice
// ---------------------------------------------------------------------------
const KernelTable& kernels() {
  static const KernelTable* table = pick_table(kernel_table_DEFAULT(), kernel_table_AVX2(), kernel_table_AVX512());
  return *table;
}

namespace {

std::string cpu_capability() { return kernels().name; }

}  // namespace

namespace {

// ---------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------
void check_tensor(const at::Tensor& t, const char* name, int64_t ndim, const char* hint) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", hint, " (", ndim, " dims), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got a tensor on ",
                    t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                   " must be a floating tensor (float16/bfloat16/float32/float64), got ", st);
}

void check_like(const at::Tensor& t, const char* name, int64_t ndim, const char* hint, const at::Tensor& memory) {
  check_tensor(t, name, ndim, hint);
  TORCH_CHECK_TYPE(t.scalar_type() == memory.scalar_type(), name, " must have the dtype of memory (",
                   memory.scalar_type(), "), got ", t.scalar_type());
}

void check_size(const at::Tensor& t, const char* name, const char* hint, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, " must have shape ", hint, " with ", what, " = ", expected,
                    ", got shape ", t.sizes());
}

void check_memory(const at::Tensor& memory) {
  check_tensor(memory, "memory", 3, "(B, N, D)");
  TORCH_CHECK_VALUE(memory.size(1) >= 1 && memory.size(2) >= 1,
                    "memory must have at least one slot and one dimension, got shape ", memory.sizes());
}

// keys (B, H, D) and strengths (B, H) against memory.
void check_keys(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths, double eps,
                const char* heads = "(B, H, D)", const char* shead = "(B, H)", const char* kname = "keys",
                const char* sname = "strengths") {
  check_memory(memory);
  check_like(keys, kname, 3, heads, memory);
  check_size(keys, kname, heads, 0, memory.size(0), "B");
  check_size(keys, kname, heads, 2, memory.size(2), "D");
  check_like(strengths, sname, 2, shead, memory);
  check_size(strengths, sname, shead, 0, memory.size(0), "B");
  check_size(strengths, sname, shead, 1, keys.size(1), kname);
  TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
}

// weights (B, heads, N) against memory.
void check_weights(const at::Tensor& memory, const at::Tensor& w, const char* name, const char* hint) {
  check_like(w, name, 3, hint, memory);
  check_size(w, name, hint, 0, memory.size(0), "B");
  check_size(w, name, hint, 2, memory.size(1), "N");
}

// (B, heads, D) against memory and a head count.
void check_heads(const at::Tensor& memory, const at::Tensor& t, const char* name, const char* hint, int64_t heads) {
  check_like(t, name, 3, hint, memory);
  check_size(t, name, hint, 0, memory.size(0), "B");
  check_size(t, name, hint, 1, heads, "heads");
  check_size(t, name, hint, 2, memory.size(2), "D");
}

void check_write(const at::Tensor& memory, const at::Tensor& w, const at::Tensor& erase, const at::Tensor& add) {
  check_memory(memory);
  check_weights(memory, w, "weights", "(B, W, N)");
  check_heads(memory, erase, "erase", "(B, W, D)", w.size(1));
  check_heads(memory, add, "add", "(B, W, D)", w.size(1));
}

void check_decay(double decay) {
  TORCH_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, "decay must be in [0, 1], got ", decay);
}

at::ScalarType lse_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// The log-sum-exp a forward saved for its backward: (B, heads) in lse_dtype.
void check_lse(const at::Tensor& lse, const at::Tensor& memory, int64_t heads, const char* hint,
               const char* heads_name, const char* name = "lse") {
  check_tensor(lse, name, 2, hint);
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(memory.scalar_type()), name, " must be ",
                   lse_dtype(memory.scalar_type()), " for memory of ", memory.scalar_type(), ", got ",
                   lse.scalar_type());
  check_size(lse, name, hint, 0, memory.size(0), "B");
  check_size(lse, name, hint, 1, heads, heads_name);
}

// ---------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------
at::Tensor content_addressing(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& strengths,
                              double eps) {
  check_keys(memory, keys, strengths, eps);
  at::Tensor out = at::empty({memory.size(0), keys.size(1), memory.size(1)}, memory.options());
  kernels().content_addressing(memory.contiguous(), keys.contiguous(), strengths.contiguous(), eps, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> content_addressing_backward(const at::Tensor& grad_weights,
                                                                           const at::Tensor& weights,
                                                                           const at::Tensor& memory,
                                                                           const at::Tensor& keys,
                                                                           const at::Tensor& strengths, double eps) {
  check_keys(memory, keys, strengths, eps);
  check_weights(memory, weights, "weights", "(B, H, N)");
  check_size(weights, "weights", "(B, H, N)", 1, keys.size(1), "H");
  check_weights(memory, grad_weights, "grad_weights", "(B, H, N)");
  check_size(grad_weights, "grad_weights", "(B, H, N)", 1, keys.size(1), "H");
  at::Tensor dm = empty_like_c(memory), dk = empty_like_c(keys), ds = empty_like_c(strengths);
  kernels().content_addressing_backward(grad_weights.contiguous(), weights.contiguous(), memory.contiguous(),
                                        keys.contiguous(), strengths.contiguous(), eps, dm, dk, ds);
  return {dm, dk, ds};
}

at::Tensor memory_read(const at::Tensor& memory, const at::Tensor& weights) {
  check_memory(memory);
  check_weights(memory, weights, "weights", "(B, H, N)");
  at::Tensor out = at::empty({memory.size(0), weights.size(1), memory.size(2)}, memory.options());
  kernels().memory_read(memory.contiguous(), weights.contiguous(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> memory_read_backward(const at::Tensor& grad_reads, const at::Tensor& memory,
                                                        const at::Tensor& weights) {
  check_memory(memory);
  check_weights(memory, weights, "weights", "(B, H, N)");
  check_heads(memory, grad_reads, "grad_reads", "(B, H, D)", weights.size(1));
  at::Tensor dm = empty_like_c(memory), dw = empty_like_c(weights);
  kernels().memory_read_backward(grad_reads.contiguous(), memory.contiguous(), weights.contiguous(), dm, dw);
  return {dm, dw};
}

std::tuple<at::Tensor, at::Tensor> content_read(const at::Tensor& memory, const at::Tensor& keys,
                                                const at::Tensor& strengths, double eps) {
  check_keys(memory, keys, strengths, eps);
  const int64_t B = memory.size(0), H = keys.size(1), D = memory.size(2);
  at::Tensor reads = at::empty({B, H, D}, memory.options());
  at::Tensor lse = at::empty({B, H}, memory.options().dtype(lse_dtype(memory.scalar_type())));
  kernels().content_read(memory.contiguous(), keys.contiguous(), strengths.contiguous(), eps, reads, lse);
  return {reads, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> content_read_backward(const at::Tensor& grad_reads,
                                                                     const at::Tensor& reads, const at::Tensor& lse,
                                                                     const at::Tensor& memory, const at::Tensor& keys,
                                                                     const at::Tensor& strengths, double eps,
                                                                     bool grad_memory) {
  check_keys(memory, keys, strengths, eps);
  const int64_t H = keys.size(1);
  check_heads(memory, grad_reads, "grad_reads", "(B, H, D)", H);
  check_heads(memory, reads, "reads", "(B, H, D)", H);
  check_lse(lse, memory, H, "(B, H)", "H");
  // Without grad_memory: no (N, D) buffer and no pass that writes one; dm is empty.
  at::Tensor dm = grad_memory ? empty_like_c(memory) : at::empty({0}, memory.options());
  at::Tensor dk = empty_like_c(keys), ds = empty_like_c(strengths);
  kernels().content_read_backward(grad_reads.contiguous(), reads.contiguous(), lse.contiguous(),
                                  memory.contiguous(), keys.contiguous(), strengths.contiguous(), eps, dm, dk, ds);
  return {dm, dk, ds};
}

at::Tensor memory_write(const at::Tensor& memory, const at::Tensor& weights, const at::Tensor& erase,
                        const at::Tensor& add) {
  check_write(memory, weights, erase, add);
  at::Tensor out = empty_like_c(memory);
  kernels().memory_write(memory.contiguous(), weights.contiguous(), erase.contiguous(), add.contiguous(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_write_backward(const at::Tensor& grad_out,
                                                                                 const at::Tensor& memory,
                                                                                 const at::Tensor& weights,
                                                                                 const at::Tensor& erase,
                                                                                 const at::Tensor& add) {
  check_write(memory, weights, erase, add);
  check_like(grad_out, "grad_out", 3, "(B, N, D)", memory);
  TORCH_CHECK_VALUE(grad_out.sizes() == memory.sizes(), "grad_out must have the shape of memory ", memory.sizes(),
                    ", got ", grad_out.sizes());
  at::Tensor dm = empty_like_c(memory), dw = empty_like_c(weights), de = empty_like_c(erase),
             da = empty_like_c(add);
  kernels().memory_write_backward(contiguous_pooled(grad_out), memory.contiguous(), weights.contiguous(),
                                  erase.contiguous(), add.contiguous(), dm, dw, de, da);
  return {dm, dw, de, da};
}

void memory_write_(at::Tensor& memory, const at::Tensor& weights, const at::Tensor& erase, const at::Tensor& add) {
  check_write(memory, weights, erase, add);
  TORCH_CHECK_VALUE(memory.is_contiguous(), "memory must be contiguous for the in-place write");
  check_no_overlap("memory_write_", memory, "memory", {{"weights", &weights}, {"erase", &erase}, {"add", &add}});
  kernels().memory_write(memory, weights.contiguous(), erase.contiguous(), add.contiguous(), memory);
}

at::Tensor usage_update(const at::Tensor& usage, const at::Tensor& weights, double decay) {
  check_tensor(weights, "weights", 3, "(B, W, N)");
  check_tensor(usage, "usage", 2, "(B, N)");
  TORCH_CHECK_TYPE(usage.scalar_type() == weights.scalar_type(), "usage must have the dtype of weights (",
                   weights.scalar_type(), "), got ", usage.scalar_type());
  check_size(usage, "usage", "(B, N)", 0, weights.size(0), "B");
  check_size(usage, "usage", "(B, N)", 1, weights.size(2), "N");
  check_decay(decay);
  at::Tensor out = empty_like_c(usage);
  kernels().usage_update(usage.contiguous(), weights.contiguous(), decay, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> content_write(const at::Tensor& memory, const at::Tensor& keys,
                                                 const at::Tensor& strengths, const at::Tensor& erase,
                                                 const at::Tensor& add, double eps) {
  check_keys(memory, keys, strengths, eps, "(B, W, D)", "(B, W)");
  const int64_t W = keys.size(1);
  check_heads(memory, erase, "erase", "(B, W, D)", W);
  check_heads(memory, add, "add", "(B, W, D)", W);
  at::Tensor out = empty_like_c(memory);
  at::Tensor lse = at::empty({memory.size(0), W}, memory.options().dtype(lse_dtype(memory.scalar_type())));
  kernels().content_write_fwd(memory.contiguous(), keys.contiguous(), strengths.contiguous(), erase.contiguous(),
                              add.contiguous(), eps, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> content_write_backward(
    const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& memory, const at::Tensor& keys,
    const at::Tensor& strengths, const at::Tensor& erase, const at::Tensor& add, double eps) {
  check_keys(memory, keys, strengths, eps, "(B, W, D)", "(B, W)");
  const int64_t W = keys.size(1);
  check_heads(memory, erase, "erase", "(B, W, D)", W);
  check_heads(memory, add, "add", "(B, W, D)", W);
  check_like(grad_out, "grad_out", 3, "(B, N, D)", memory);
  TORCH_CHECK_VALUE(grad_out.sizes() == memory.sizes(), "grad_out must have the shape of memory ", memory.sizes(),
                    ", got ", grad_out.sizes());
  check_lse(lse, memory, W, "(B, W)", "W");
  at::Tensor dm = empty_like_c(memory), dk = empty_like_c(keys), ds = empty_like_c(strengths),
             de = empty_like_c(erase), da = empty_like_c(add);
  kernels().content_write_backward(contiguous_pooled(grad_out), lse.contiguous(), memory.contiguous(),
                                   keys.contiguous(),
                                   strengths.contiguous(), erase.contiguous(), add.contiguous(), eps, dm, dk, ds,
                                   de, da);
  return {dm, dk, ds, de, da};
}

// The inputs of content_read_write: read heads (B,H,D), (B,H); write heads,
// erase and add (B,W,D), (B,W).
void check_read_write(const at::Tensor& memory, const at::Tensor& read_keys, const at::Tensor& read_strengths,
                      const at::Tensor& write_keys, const at::Tensor& write_strengths, const at::Tensor& erase,
                      const at::Tensor& add, double eps) {
  check_keys(memory, read_keys, read_strengths, eps, "(B, H, D)", "(B, H)", "read_keys", "read_strengths");
  check_keys(memory, write_keys, write_strengths, eps, "(B, W, D)", "(B, W)", "write_keys", "write_strengths");
  const int64_t W = write_keys.size(1);
  check_heads(memory, erase, "erase", "(B, W, D)", W);
  check_heads(memory, add, "add", "(B, W, D)", W);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> content_read_write(
    const at::Tensor& memory, const at::Tensor& read_keys, const at::Tensor& read_strengths,
    const at::Tensor& write_keys, const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
    double eps) {
  check_read_write(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps);
  const int64_t B = memory.size(0), H = read_keys.size(1), W = write_keys.size(1), D = memory.size(2);
  const auto lse_opts = memory.options().dtype(lse_dtype(memory.scalar_type()));
  at::Tensor reads = at::empty({B, H, D}, memory.options()), rlse = at::empty({B, H}, lse_opts);
  at::Tensor out = empty_like_c(memory), wlse = at::empty({B, W}, lse_opts);
  kernels().content_read_write_fwd(memory.contiguous(), read_keys.contiguous(), read_strengths.contiguous(),
                                   write_keys.contiguous(), write_strengths.contiguous(), erase.contiguous(),
                                   add.contiguous(), eps, reads, rlse, out, wlse);
  return {reads, out, rlse, wlse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
content_read_write_backward(const at::Tensor& grad_reads, const at::Tensor& grad_out, const at::Tensor& reads,
                            const at::Tensor& read_lse, const at::Tensor& write_lse, const at::Tensor& memory,
                            const at::Tensor& read_keys, const at::Tensor& read_strengths,
                            const at::Tensor& write_keys, const at::Tensor& write_strengths, const at::Tensor& erase,
                            const at::Tensor& add, double eps) {
  check_read_write(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps);
  const int64_t H = read_keys.size(1), W = write_keys.size(1);
  check_heads(memory, grad_reads, "grad_reads", "(B, H, D)", H);
  check_heads(memory, reads, "reads", "(B, H, D)", H);
  check_like(grad_out, "grad_out", 3, "(B, N, D)", memory);
  TORCH_CHECK_VALUE(grad_out.sizes() == memory.sizes(), "grad_out must have the shape of memory ", memory.sizes(),
                    ", got ", grad_out.sizes());
  check_lse(read_lse, memory, H, "(B, H)", "H", "read_lse");
  check_lse(write_lse, memory, W, "(B, W)", "W", "write_lse");
  if (memory.scalar_type() == at::kHalf || memory.scalar_type() == at::kBFloat16) {
    // Half: the two backwards, so that the read's keeps recomputing its
    // weights and delta in float (read_kernels.h) instead of taking delta
    // from half-precision reads.
    auto [dm, drk, drs] = content_read_backward(grad_reads, reads, read_lse, memory, read_keys, read_strengths, eps,
                                                true);
    auto [dm2, dwk, dws, de, da] =
        content_write_backward(grad_out, write_lse, memory, write_keys, write_strengths, erase, add, eps);
    dm2.add_(dm);
    return {dm2, drk, drs, dwk, dws, de, da};
  }
  at::Tensor dm = empty_like_c(memory), drk = empty_like_c(read_keys), drs = empty_like_c(read_strengths),
             dwk = empty_like_c(write_keys), dws = empty_like_c(write_strengths), de = empty_like_c(erase),
             da = empty_like_c(add);
  kernels().content_read_write_backward(
      grad_reads.contiguous(), contiguous_pooled(grad_out), reads.contiguous(), read_lse.contiguous(),
      write_lse.contiguous(), memory.contiguous(), read_keys.contiguous(), read_strengths.contiguous(),
      write_keys.contiguous(), write_strengths.contiguous(), erase.contiguous(), add.contiguous(), eps, dm, drk, drs,
      dwk, dws, de, da);
  return {dm, drk, drs, dwk, dws, de, da};
}

// The checks of an in-place content write; returns the usage to update
// (undefined when none is given) and sets `least` to its output.
at::Tensor check_content_write(const at::Tensor& memory, const std::optional<at::Tensor>& usage_opt,
                               const at::Tensor& keys, const at::Tensor& strengths, const at::Tensor& erase,
                               const at::Tensor& add, double eps, double decay, const char* kname,
                               const char* sname, at::Tensor* least) {
  check_keys(memory, keys, strengths, eps, "(B, W, D)", "(B, W)", kname, sname);
  const int64_t W = keys.size(1);
  check_heads(memory, erase, "erase", "(B, W, D)", W);
  check_heads(memory, add, "add", "(B, W, D)", W);
  TORCH_CHECK_VALUE(memory.is_contiguous(), "memory must be contiguous for the in-place write");
  check_decay(decay);
  at::Tensor usage;
  if (usage_opt.has_value() && usage_opt->defined()) {
    usage = *usage_opt;
    check_like(usage, "usage", 2, "(B, N)", memory);
    check_size(usage, "usage", "(B, N)", 0, memory.size(0), "B");
    check_size(usage, "usage", "(B, N)", 1, memory.size(1), "N");
    TORCH_CHECK_VALUE(usage.is_contiguous(), "usage must be contiguous for the in-place write");
    *least = at::empty({memory.size(0)}, memory.options().dtype(at::kLong));
  } else {
    *least = at::empty({0}, memory.options().dtype(at::kLong));
  }
  return usage;
}

at::Tensor content_write_(at::Tensor& memory, const std::optional<at::Tensor>& usage_opt, const at::Tensor& keys,
                          const at::Tensor& strengths, const at::Tensor& erase, const at::Tensor& add, double eps,
                          double decay) {
  at::Tensor least;
  at::Tensor usage =
      check_content_write(memory, usage_opt, keys, strengths, erase, add, eps, decay, "keys", "strengths", &least);
  check_no_overlap("content_write_", memory, usage,
                   {{"keys", &keys}, {"strengths", &strengths}, {"erase", &erase}, {"add", &add}});
  kernels().content_write(memory, usage, keys.contiguous(), strengths.contiguous(), erase.contiguous(),
                          add.contiguous(), eps, decay, least);
  return least;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> content_read_write_(
    at::Tensor& memory, const std::optional<at::Tensor>& usage_opt, const at::Tensor& read_keys,
    const at::Tensor& read_strengths, const at::Tensor& write_keys, const at::Tensor& write_strengths,
    const at::Tensor& erase, const at::Tensor& add, double eps, double decay) {
  check_keys(memory, read_keys, read_strengths, eps, "(B, H, D)", "(B, H)", "read_keys", "read_strengths");
  at::Tensor least;
  at::Tensor usage = check_content_write(memory, usage_opt, write_keys, write_strengths, erase, add, eps, decay,
                                         "write_keys", "write_strengths", &least);
  check_no_overlap("content_read_write_", memory, usage,
                   {{"read_keys", &read_keys}, {"read_strengths", &read_strengths}, {"write_keys", &write_keys},
                    {"write_strengths", &write_strengths}, {"erase", &erase}, {"add", &add}});
  const int64_t B = memory.size(0), H = read_keys.size(1), D = memory.size(2);
  at::Tensor reads = at::empty({B, H, D}, memory.options());
  at::Tensor lse = at::empty({B, H}, memory.options().dtype(lse_dtype(memory.scalar_type())));
  kernels().content_read_write(memory, usage, read_keys.contiguous(), read_strengths.contiguous(),
                               write_keys.contiguous(), write_strengths.contiguous(), erase.contiguous(),
                               add.contiguous(), eps, decay, reads, lse, least);
  return {reads, lse, least};
}

}  // namespace
}  // namespace cpu
}  // namespace neuralmem

TORCH_LIBRARY_FRAGMENT(neuralmem, m) {
  // Which instruction set the CPU kernels run with: "avx512", "avx2" or "default".
  m.def("cpu_capability() -> str", &neuralmem::cpu::cpu_capability);
}

TORCH_LIBRARY_IMPL(neuralmem, CPU, m) {
  using namespace neuralmem::cpu;
  m.impl("content_addressing", &content_addressing);
  m.impl("content_addressing_backward", &content_addressing_backward);
  m.impl("memory_read", &memory_read);
  m.impl("memory_read_backward", &memory_read_backward);
  m.impl("content_read", &content_read);
  m.impl("content_read_backward", &content_read_backward);
  m.impl("memory_write", &memory_write);
  m.impl("memory_write_backward", &memory_write_backward);
  m.impl("memory_write_", &memory_write_);
  m.impl("usage_update", &usage_update);
  m.impl("content_write_", &content_write_);
  m.impl("content_write", &content_write);
  m.impl("content_write_backward", &content_write_backward);
  m.impl("content_read_write_", &content_read_write_);
  m.impl("content_read_write", &content_read_write);
  m.impl("content_read_write_backward", &content_read_write_backward);
}

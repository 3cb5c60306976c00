// Op schemas of the `neuralmem` namespace and the pybind11 module `_C`.
//
// Schemas are declared once here; kernels are registered per dispatch key in
// csrc/cpu/ (CPU) and csrc/cuda/ (CUDA); fake (meta) kernels for
// torch.compile live in neuralmem_fast/ops.py. Shapes, with B memories, N slots,
// D slot width, H read heads and W write heads:
//   memory (B,N,D)  keys (B,H,D)  strengths (B,H)  weights (B,H,N)
//   erase/add (B,W,D)  write weights (B,W,N)  usage (B,N)
// Every backward op returns one gradient per differentiable input, in order.
#include <torch/library.h>
#include <torch/extension.h>

#include "dnc/core_sequence.h"
#include "replay/sum_tree.h"

TORCH_LIBRARY(neuralmem, m) {
  // weights[b,h,n] = softmax_n(strengths[b,h] * cos(keys[b,h], memory[b,n]))
  m.def("content_addressing(Tensor memory, Tensor keys, Tensor strengths, float eps) -> Tensor");
  m.def("content_addressing_backward(Tensor grad_weights, Tensor weights, Tensor memory, Tensor keys, "
        "Tensor strengths, float eps) -> (Tensor, Tensor, Tensor)");
  // reads[b,h,:] = sum_n weights[b,h,n] * memory[b,n,:]
  m.def("memory_read(Tensor memory, Tensor weights) -> Tensor");
  m.def("memory_read_backward(Tensor grad_reads, Tensor memory, Tensor weights) -> (Tensor, Tensor)");
  // Fused addressing + read; returns (reads, lse). lse (B,H) is the logsumexp of
  // the logits, in float32 for half inputs; it is all the backward needs.
  // With grad_memory=False the backward returns an empty tensor (0,) for the
  // memory's gradient and pays neither its (B,N,D) buffer nor the writes.
  m.def("content_read(Tensor memory, Tensor keys, Tensor strengths, float eps) -> (Tensor, Tensor)");
  m.def("content_read_backward(Tensor grad_reads, Tensor reads, Tensor lse, Tensor memory, Tensor keys, "
        "Tensor strengths, float eps, bool grad_memory=True) -> (Tensor, Tensor, Tensor)");
  // new = memory * prod_w (1 - w[w,n] e[w,:]) + sum_w w[w,n] a[w,:]
  m.def("memory_write(Tensor memory, Tensor weights, Tensor erase, Tensor add) -> Tensor");
  m.def("memory_write_backward(Tensor grad_out, Tensor memory, Tensor weights, Tensor erase, Tensor add) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("memory_write_(Tensor(a!) memory, Tensor weights, Tensor erase, Tensor add) -> ()");
  // Differentiable content write, out of place: memory_write with the weights
  // content_addressing(memory, keys, strengths, eps) gives, in one op.
  // Returns (new memory, lse (B,W)); lse, as content_read's, is for the backward.
  m.def("content_write(Tensor memory, Tensor keys, Tensor strengths, Tensor erase, Tensor add, float eps) "
        "-> (Tensor, Tensor)");
  m.def("content_write_backward(Tensor grad_out, Tensor lse, Tensor memory, Tensor keys, Tensor strengths, "
        "Tensor erase, Tensor add, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Differentiable content_read, then content_write, both addressing the
  // memory before the write, out of place: one step of a memory that reads
  // and then writes. Returns (reads, new memory, read lse (B,H), write lse
  // (B,W)). The backward returns the sum of the two ops' memory gradients and
  // the gradients of read_keys, read_strengths, write_keys, write_strengths,
  // erase and add.
  m.def("content_read_write(Tensor memory, Tensor read_keys, Tensor read_strengths, Tensor write_keys, "
        "Tensor write_strengths, Tensor erase, Tensor add, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("content_read_write_backward(Tensor grad_reads, Tensor grad_out, Tensor reads, Tensor read_lse, "
        "Tensor write_lse, Tensor memory, Tensor read_keys, Tensor read_strengths, Tensor write_keys, "
        "Tensor write_strengths, Tensor erase, Tensor add, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // usage_new = decay * usage + sum_w weights[:, w, :]
  m.def("usage_update(Tensor usage, Tensor weights, float decay) -> Tensor");
  // In-place write whose weights come from content addressing of the memory
  // before the write (one pass for the logsumexp, one pass that updates rows
  // and, when given, usage). Returns the index of the least-used slot after
  // the update, (B,) int64, or an empty tensor when usage is not given.
  m.def("content_write_(Tensor(a!) memory, Tensor(b!)? usage, Tensor keys, Tensor strengths, Tensor erase, "
        "Tensor add, float eps, float decay) -> Tensor");
  // content_read, then content_write_ with weights from the same memory
  // before the write: one step of a memory that reads and then writes.
  // Returns (reads, lse, least) as those two ops would. Two passes over the
  // memory instead of three on the CPU.
  m.def("content_read_write_(Tensor(a!) memory, Tensor(b!)? usage, Tensor read_keys, Tensor read_strengths, "
        "Tensor write_keys, Tensor write_strengths, Tensor erase, Tensor add, float eps, float decay) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace neuralmem {
bool built_with_cuda() {
#ifdef NEURALMEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace neuralmem

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuralmem_fast native extension: memory-op kernels and the sum tree";
  m.def("built_with_cuda", &neuralmem::built_with_cuda, "whether the CUDA kernels were compiled in");
  neuralmem::replay::bind(m);
  neuralmem::dnc::bind_core_sequence(m);
}

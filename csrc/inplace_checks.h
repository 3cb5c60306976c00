// Overlap checks of the in-place ops, shared by the CPU and CUDA host code.
//
// An in-place op streams the memory more than once (one pass for the softmax
// statistics, one that rewrites rows), so an input that aliases the memory
// (a key, erase or add vector taken as a view of a memory row, or usage
// sharing storage with it) would be read after part of it was overwritten,
// and with several threads, while it is being overwritten. PyTorch's own
// in-place ops refuse such inputs; so do these, with the arguments named.
// The test is on address ranges: two tensors of the same storage whose
// element ranges intersect are refused, which catches every true overlap
// (the mutated tensors are contiguous, so their range is exactly their
// elements) and, rarely, a strided view that only straddles the memory.
#pragma once

#include <initializer_list>
#include <utility>

#include <ATen/ATen.h>

namespace neuralmem {

inline bool ranges_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.has_storage() || !b.has_storage()) return false;
  const char* pa = static_cast<const char*>(a.storage().data());
  const char* pb = static_cast<const char*>(b.storage().data());
  if (pa == nullptr || pa != pb) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const int64_t es = static_cast<int64_t>(t.element_size());
    const int64_t lo = t.storage_offset() * es;
    return std::make_pair(lo, lo + (last + 1) * es);
  };
  const auto ra = extent(a), rb = extent(b);
  return ra.first < rb.second && rb.first < ra.second;
}

// Refuses any input that shares memory with the mutated tensor `mutated`.
inline void check_no_overlap(const char* op, const at::Tensor& mutated, const char* mutated_name,
                             std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(!ranges_overlap(mutated, *t), "neuralmem::", op, ": ", name, " shares memory with ", mutated_name,
                ", which the op overwrites in place (unsupported, as in PyTorch's in-place ops): pass ", name,
                ".clone() instead");
  }
}

// The checks of a write into `memory` and, when defined, `usage`.
inline void check_no_overlap(const char* op, const at::Tensor& memory, const at::Tensor& usage,
                             std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  check_no_overlap(op, memory, "memory", inputs);
  check_no_overlap(op, usage, "usage", inputs);
  check_no_overlap(op, memory, "memory", {{"usage", &usage}});
}

}  // namespace neuralmem

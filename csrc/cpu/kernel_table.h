// The CPU kernels of the memory ops, compiled once per instruction set (and,
// at the end of the table, the replay sum tree's inner loops: the priority
// transform, the importance weights' pow, a level's parents, the batched
// descent).
//
// memory_kernels.h holds the kernels as templates over the element type; it
// is compiled three times (memory_kernels_{default,avx2,avx512}.cpp), each
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
  // content_read then content_write_ on the memory before the write.
  void (*content_read_write)(at::Tensor& memory, at::Tensor& usage, const at::Tensor& read_keys,
                             const at::Tensor& read_strengths, const at::Tensor& write_keys,
                             const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
                             double eps, double decay, at::Tensor& reads, at::Tensor& lse, at::Tensor& least);
  // x[i] = x[i]^alpha (the replay buffers' priority transform), vectorised.
  void (*pow_inplace)(double* x, int64_t n, double alpha);
  // x[i] = x[i]^e in float (the replay buffers' importance weights), vectorised.
  void (*powf_inplace)(float* x, int64_t n, float e);
  // One level of the replay sum tree's parents recomputed from their children
  // (see tree_level below).
  void (*tree_level)(const double* child_sums, const double* child_mins, double* sums, double* mins,
                     const int64_t* parents, int64_t n, int shift);
  // The replay sum tree's batched descent (see tree_find below).
  void (*tree_find)(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n);
};

// pow_inplace of the best table for this processor (for the sum tree, which
// is compiled once, without per-instruction-set variants).
void pow_inplace(double* x, int64_t n, double alpha);
void powf_inplace(float* x, int64_t n, float e);

// Recomputes parents of one level of a fan-out-8 sum/min tree, with the best
// table for this processor: for each j < n, p = parents[j] >> shift (p = j
// when parents is null; a repeat of the previous p is skipped) gets the
// pairwise sum ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) of child_sums[8p..8p+7]
// and the min of child_mins[8p..8p+7], or, with child_mins null (children are
// leaves), the min over the children of (c > 0 ? c : +inf). child_sums and
// child_mins must be 64-byte aligned. The same bits on every instruction set.
void tree_level(const double* child_sums, const double* child_mins, double* sums, double* mins,
                const int64_t* parents, int64_t n, int shift);

// Finds, for each of n masses m (consumed; negative counts as 0), the leaf of
// a fan-out-8 sum tree that owns it: the leaf i with prefix(i) <= m <
// prefix(i+1), never a zero leaf when the root is positive (see
// tree_pick_child in memory_kernels.h for the exact rule). child_levels[d]
// is level d + 1 (64-byte aligned; the last one holds the leaves). Every
// instruction set gives the same leaves: each query adds its prefixes left
// to right in every build.
void tree_find(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n);

// Asks for transparent huge pages on the whole 2 MiB pages inside
// [p, p + bytes), before anything touches them (a no-op where THP is off).
void advise_hugepages(void* p, size_t bytes);

// Null when the compiler could not build that instruction set.
const KernelTable* kernel_table_DEFAULT();
const KernelTable* kernel_table_AVX2();
const KernelTable* kernel_table_AVX512();

}  // namespace cpu
}  // namespace neuralmem

// The CPU inner loops of the replay sum tree, compiled once per instruction
// set (tree_kernels.h, built by csrc/isa/kernels_{default,avx2,avx512}.cpp) like
// the memory ops' kernels, but in a table of their own: the replay code
// depends on csrc/common only, never on the memory ops.
#pragma once

#include <cstddef>
#include <cstdint>

namespace neuralmem {
namespace replay {

struct TreeKernelTable {
  const char* name;
  // x[i] = x[i]^alpha (the replay buffers' priority transform), vectorised.
  void (*pow_inplace)(double* x, int64_t n, double alpha);
  // x[i] = x[i]^e in float (the replay buffers' importance weights), vectorised.
  void (*powf_inplace)(float* x, int64_t n, float e);
  // One level of the tree's parents recomputed from their children (see tree_level below).
  void (*tree_level)(const double* child_sums, const double* child_mins, double* sums, double* mins,
                     const int64_t* parents, int64_t n, int shift);
  // The batched descent (see tree_find below).
  void (*tree_find)(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n);
};

// The entries of the best table for this processor (common/isa.h): the sum
// tree itself (sum_tree.cpp) is compiled once, without per-ISA variants.
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
// tree_pick_child in tree_kernels.h for the exact rule). child_levels[d]
// is level d + 1 (64-byte aligned; the last one holds the leaves). Every
// instruction set gives the same leaves: each query adds its prefixes left
// to right in every build.
void tree_find(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n);


// Null when the compiler could not build that instruction set.
const TreeKernelTable* tree_kernel_table_DEFAULT();
const TreeKernelTable* tree_kernel_table_AVX2();
const TreeKernelTable* tree_kernel_table_AVX512();

}  // namespace replay
}  // namespace neuralmem

// Picks the sum tree's kernel table for this processor (common/isa.h), once,
// and exposes its entries.
#include <cstdint>
#include <cstdlib>

#include "common/isa.h"
#include "replay/tree_kernel_table.h"

namespace neuralmem {
namespace replay {
namespace {

const TreeKernelTable& tree_kernels() {
  static const TreeKernelTable* table =
      pick_table(tree_kernel_table_DEFAULT(), tree_kernel_table_AVX2(), tree_kernel_table_AVX512());
  return *table;
}

}  // namespace

void pow_inplace(double* x, int64_t n, double alpha) { tree_kernels().pow_inplace(x, n, alpha); }

void powf_inplace(float* x, int64_t n, float e) { tree_kernels().powf_inplace(x, n, e); }

void tree_level(const double* child_sums, const double* child_mins, double* sums, double* mins,
                const int64_t* parents, int64_t n, int shift) {
  tree_kernels().tree_level(child_sums, child_mins, sums, mins, parents, n, shift);
}

void tree_find(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n) {
  tree_kernels().tree_find(child_levels, depth, m, out, n);
}


}  // namespace replay
}  // namespace neuralmem

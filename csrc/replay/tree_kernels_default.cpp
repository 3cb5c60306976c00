// The sum tree's kernels for the baseline instruction set (whatever the compiler targets by default): the fallback
// on any processor.
#include "common/isa_prelude.h"
#include "replay/tree_kernel_table.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "replay/tree_kernels.h"

namespace neuralmem {
namespace replay {
const TreeKernelTable* tree_kernel_table_DEFAULT() {
  static constexpr TreeKernelTable table = DEFAULT::make_tree_table("default");
  return &table;
}
}  // namespace replay
}  // namespace neuralmem

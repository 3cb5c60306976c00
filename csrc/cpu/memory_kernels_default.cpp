// The memory-op kernels for the baseline instruction set (whatever the compiler targets by default): the fallback
// on any processor.
#include "common/isa_prelude.h"
#include "cpu/kernel_table.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/memory_kernels.h"

namespace neuralmem {
namespace cpu {
const KernelTable* kernel_table_DEFAULT() {
  static constexpr KernelTable table = DEFAULT::make_table("default");
  return &table;
}
}  // namespace cpu
}  // namespace neuralmem

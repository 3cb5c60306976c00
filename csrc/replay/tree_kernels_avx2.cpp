// The sum tree's kernels for AVX2 + FMA (256-bit vectors). The instruction set is switched by pragma for this file
// only, after the baseline headers (common/isa_prelude.h), so that setup.py needs no per-file flags; the table is
// used only when the processor reports the instruction set (common/isa.h).
#include "common/isa_prelude.h"
#include "replay/tree_kernel_table.h"

#if NEURALMEM_X86_ISA_BUILDS
#include "common/isa_avx2_begin.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "replay/tree_kernels.h"
#include "common/isa_avx2_end.h"

namespace neuralmem {
namespace replay {
const TreeKernelTable* tree_kernel_table_AVX2() {
  static constexpr TreeKernelTable table = AVX2::make_tree_table("avx2");
  return &table;
}
}  // namespace replay
}  // namespace neuralmem
#else
namespace neuralmem {
namespace replay {
const TreeKernelTable* tree_kernel_table_AVX2() { return nullptr; }
}  // namespace replay
}  // namespace neuralmem
#endif

// The memory-op kernels for AVX-512 (512-bit vectors, masked tail loads). The instruction set is switched by
// pragma for this file only, after the baseline headers (common/isa_prelude.h), so that setup.py needs no per-file
// flags; the table is used only when the processor reports the instruction set (common/isa.h).
#include "common/isa_prelude.h"
#include "cpu/kernel_table.h"

#if NEURALMEM_X86_ISA_BUILDS
#include "common/isa_avx512_begin.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/memory_kernels.h"
#include "common/isa_avx512_end.h"

namespace neuralmem {
namespace cpu {
const KernelTable* kernel_table_AVX512() {
  static constexpr KernelTable table = AVX512::make_table("avx512");
  return &table;
}
}  // namespace cpu
}  // namespace neuralmem
#else
namespace neuralmem {
namespace cpu {
const KernelTable* kernel_table_AVX512() { return nullptr; }
}  // namespace cpu
}  // namespace neuralmem
#endif

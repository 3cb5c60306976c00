// The memory-op kernels for AVX2 + FMA (256-bit vectors). The instruction
// set is switched by pragma for this file only, after the baseline headers
// (see kernel_prelude.h), so that setup.py needs no per-file flags; the host
// code calls this table only when the processor reports AVX2 and FMA.
#include "cpu/kernel_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,lzcnt")
// g++ does not update the target macros after #pragma GCC target (gcc does);
// sleef.h and the at::vec headers select their declarations by them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __BMI__ 1
#define __BMI2__ 1
#define __POPCNT__ 1
#define __LZCNT__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/memory_kernels.h"
#pragma GCC pop_options
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __BMI__
#undef __BMI2__
#undef __POPCNT__
#undef __LZCNT__

namespace neuralmem {
namespace cpu {
const KernelTable* kernel_table_AVX2() {
  static constexpr KernelTable table = AVX2::make_table("avx2");
  return &table;
}
}  // namespace cpu
}  // namespace neuralmem
#else
namespace neuralmem {
namespace cpu {
const KernelTable* kernel_table_AVX2() { return nullptr; }
}  // namespace cpu
}  // namespace neuralmem
#endif

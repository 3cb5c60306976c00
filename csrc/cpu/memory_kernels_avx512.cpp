// The memory-op kernels for AVX-512 (F, BW, VL, DQ: 512-bit vectors, masked
// tail loads). Same scheme as memory_kernels_avx2.cpp.
#include "cpu/kernel_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt,lzcnt")
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
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
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
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__

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

// Both CPU kernel tables (the memory ops' and the sum tree's) for AVX2 + FMA (256-bit vectors).
// The instruction set is switched by pragma for this file only, after the
// baseline headers (common/isa_prelude.h), so that setup.py needs no per-file
// flags; the tables are used only when the processor reports the instruction
// set (common/isa.h).
#include "common/isa_prelude.h"
#include "cpu/kernel_table.h"
#include "replay/tree_kernel_table.h"

#if NEURALMEM_X86_ISA_BUILDS
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
#include "replay/tree_kernels.h"
#pragma GCC pop_options
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __BMI__
#undef __BMI2__
#undef __POPCNT__
#undef __LZCNT__

NEURALMEM_ISA_TABLES(AVX2, "avx2")
#else
NEURALMEM_NO_ISA_TABLES(AVX2)
#endif

// Switches the instruction set to AVX2 + FMA (256-bit vectors) for what follows, up to the matching
// isa_avx2_end.h: include only from a per-ISA translation unit, after isa_prelude.h,
// inside `#if NEURALMEM_X86_ISA_BUILDS`. No include guard: a unit includes it once.
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

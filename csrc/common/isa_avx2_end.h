// Restores the baseline instruction set after isa_avx2_begin.h.
#pragma GCC pop_options
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __BMI__
#undef __BMI2__
#undef __POPCNT__
#undef __LZCNT__

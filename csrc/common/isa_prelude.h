// Headers every per-instruction-set translation unit (csrc/cpu/memory_kernels_*.cpp,
// csrc/replay/tree_kernels_*.cpp) includes BEFORE it switches the
// instruction set: their inline functions must be compiled for the baseline
// processor in every translation unit, so that the linker can never pick a
// 512-bit copy of, say, a c10 helper for a caller on an older machine. Only
// at::vec (which lives in a namespace per instruction set) and our kernels
// are compiled after the switch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

// Whether this compiler can build the AVX2 and AVX-512 variants (by pragma,
// see isa_avx2_begin.h); elsewhere their tables are null.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NEURALMEM_X86_ISA_BUILDS 1
#else
#define NEURALMEM_X86_ISA_BUILDS 0
#endif

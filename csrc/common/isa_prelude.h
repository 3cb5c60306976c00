// Headers every per-instruction-set translation unit (csrc/isa/kernels_*.cpp,
// which builds the memory ops' and the sum tree's tables) includes BEFORE it switches the
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
// see csrc/isa/kernels_avx2.cpp); elsewhere their tables are null.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NEURALMEM_X86_ISA_BUILDS 1
#else
#define NEURALMEM_X86_ISA_BUILDS 0
#endif

// The accessors of the two tables built by one csrc/isa/kernels_*.cpp
// (null where the compiler cannot build that instruction set).
#define NEURALMEM_ISA_TABLES(CAP, NAME)                                                  \
  namespace neuralmem {                                                                 \
  namespace cpu {                                                                       \
  const KernelTable* kernel_table_##CAP() {                                             \
    static constexpr KernelTable table = CAP::make_table(NAME);                         \
    return &table;                                                                      \
  }                                                                                     \
  }                                                                                     \
  namespace replay {                                                                    \
  const TreeKernelTable* tree_kernel_table_##CAP() {                                    \
    static constexpr TreeKernelTable table = CAP::make_tree_table(NAME);                \
    return &table;                                                                      \
  }                                                                                     \
  }                                                                                     \
  }
#define NEURALMEM_NO_ISA_TABLES(CAP)                                                     \
  namespace neuralmem {                                                                 \
  namespace cpu {                                                                       \
  const KernelTable* kernel_table_##CAP() { return nullptr; }                           \
  }                                                                                     \
  namespace replay {                                                                    \
  const TreeKernelTable* tree_kernel_table_##CAP() { return nullptr; }                  \
  }                                                                                     \
  }

// Which instruction set the CPU kernels run with, for every per-ISA kernel
// table of the extension (the memory ops' in csrc/cpu, the sum tree's in
// csrc/replay): the best one this processor supports, capped by
// NEURALMEM_CPU_CAPABILITY (or else ATen's ATEN_CPU_CAPABILITY) = default |
// avx2 | avx512, so that each path can be tested on one machine.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

namespace neuralmem {

// 0: default, 1: AVX2 + FMA, 2: AVX-512 (F, BW, VL, DQ).
inline int supported_isa_level() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? 2 : (avx2 ? 1 : 0);
#else
  return 0;
#endif
}

inline int requested_isa_level() {
  const char* env = std::getenv("NEURALMEM_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return 2;
  const std::string v(env);
  if (v == "default") return 0;
  if (v == "avx2") return 1;
  return 2;
}

inline int isa_level() { return std::min(supported_isa_level(), requested_isa_level()); }

// The table of the best instruction set this processor supports and was
// built, from the three accessors of one kind of table (null when not built).
template <typename Table>
const Table* pick_table(const Table* default_table, const Table* avx2_table, const Table* avx512_table) {
  const int level = isa_level();
  if (level >= 2 && avx512_table != nullptr) return avx512_table;
  if (level >= 1 && avx2_table != nullptr) return avx2_table;
  return default_table;
}

}  // namespace neuralmem

// Transparent huge pages for large buffers, asked for before their first
// touch: the memory ops' outputs of the memory's size and the replay
// buffers' storage. At N = 10^6 and beyond, faulting 4 KiB pages in can cost
// more than the kernel that first writes them.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace neuralmem {

// Asks for transparent huge pages on the whole 2 MiB pages inside
// [p, p + bytes), before anything touches them (a no-op where THP is off).
inline void advise_hugepages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t start = (a + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (a + bytes) & ~(kHuge - 1);
  if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace neuralmem

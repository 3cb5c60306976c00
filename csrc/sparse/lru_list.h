// The LRU list of one memory, shared by the CPU and CUDA kernels: links (N+1, 2)
// int64, links[n] = (previous, next), node N the sentinel (its next is the least
// recently used slot, its previous the most recent).
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace neuralmem {
namespace sparse {

// Unlinks slot s and appends it at the most recent end. The caller has checked
// s and the links it reaches.
C10_HOST_DEVICE inline void lru_move_to_tail(int64_t* L, int64_t N, int64_t s) {
  const int64_t p = L[2 * s], q = L[2 * s + 1];
  L[2 * p + 1] = q;
  L[2 * q] = p;
  const int64_t tail = L[2 * N];
  L[2 * s] = tail;
  L[2 * s + 1] = N;
  L[2 * tail + 1] = s;
  L[2 * N] = s;
}

}  // namespace sparse
}  // namespace neuralmem

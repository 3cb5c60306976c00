// CPU inner loops of the replay sum tree, written once over at::vec and
// compiled once per instruction set (csrc/isa/kernels_{default,avx2,avx512}.cpp;
// see tree_kernel_table.h): the priority transform and the importance
// weights' pow, a level's parents, the batched descent. The AVX-512 forms of
// the last two use intrinsics directly, since they shuffle within one
// 8-double line. Include only from a tree_kernels_*.cpp, after
// common/isa_prelude.h and after defining CPU_CAPABILITY.
#pragma once
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including replay/tree_kernels.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "replay/tree_kernel_table.h"

namespace neuralmem {
namespace replay {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// x[i] = x[i]^e, vectorised (SLEEF's pow on AVX2/AVX-512): in double for the
// replay buffers' priority transform, in float for their importance weights.
template <typename F>
inline void pow_inplace_k(F* x, int64_t n, F e) {
  using Vec = Vectorized<F>;
  constexpr int64_t V = Vec::size();
  const Vec a(e);
  int64_t i = 0;
  for (; i + V <= n; i += V) Vec::loadu(x + i).pow(a).store(x + i);
  if (i < n) Vec::loadu(x + i, n - i).pow(a).store(x + i, n - i);
}

// One level of the replay sum tree (fan-out 8, see replay/sum_tree.h):
// parent p = parents[j] >> shift (or p = j when parents is null) gets
// sums[p] = ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) of child_sums[8p..8p+7] and
// mins[p] = the smallest of child_mins[8p..8p+7]; with child_mins null the
// children are leaves, whose min is the leaf when it is > 0 and +inf
// otherwise. A parent equal to the previous one is skipped. Every instruction
// set gives the same bits: the vector sum adds the same pairs in the same
// order, and min is exact.
inline void tree_level_k(const double* child_sums, const double* child_mins, double* sums, double* mins,
                         const int64_t* parents, int64_t n, int shift) {
  constexpr double inf = std::numeric_limits<double>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  // The 8 children are one aligned 64-byte line: one load, then three
  // butterfly steps (neighbours, pairs, halves) leave the sum in lane 0.
  const __m512d vinf = _mm512_set1_pd(inf);
  const __m512d zero = _mm512_setzero_pd();
  auto one = [&](int64_t p) {
    const __m512d c = _mm512_load_pd(child_sums + p * 8);
    const __m512d s1 = _mm512_add_pd(c, _mm512_permute_pd(c, 0x55));
    const __m512d s2 = _mm512_add_pd(s1, _mm512_permutex_pd(s1, 0x4E));
    const __m512d s3 = _mm512_add_pd(s2, _mm512_shuffle_f64x2(s2, s2, 0x4E));
    sums[p] = _mm512_cvtsd_f64(s3);
    const __m512d m = child_mins ? _mm512_load_pd(child_mins + p * 8)
                                 : _mm512_mask_blend_pd(_mm512_cmp_pd_mask(c, zero, _CMP_GT_OQ), vinf, c);
    mins[p] = _mm512_reduce_min_pd(m);
  };
#else
  auto min2 = [](double a, double b) { return b < a ? b : a; };
  auto one = [&](int64_t p) {
    const double* c = child_sums + p * 8;
    sums[p] = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
    double v[8];
    if (child_mins) {
      for (int k = 0; k < 8; ++k) v[k] = child_mins[p * 8 + k];
    } else {
      for (int k = 0; k < 8; ++k) v[k] = c[k] > 0.0 ? c[k] : inf;
    }
    mins[p] = min2(min2(min2(v[0], v[1]), min2(v[2], v[3])), min2(min2(v[4], v[5]), min2(v[6], v[7])));
  };
#endif
  if (!parents) {
    for (int64_t p = 0; p < n; ++p) one(p);
    return;
  }
  int64_t prev = -1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = parents[j] >> shift;
    if (p == prev) continue;  // sorted or clustered batches share parents
    one(p);
    prev = p;
  }
}

// The child of a sum-tree node that owns mass m >= 0, and its prefix within
// the node. With inclusive prefixes a_k = c_0 + ... + c_k (added left to
// right), the child is k = #{k < 7 : a_k <= m}: a mass equal to a boundary
// starts the next child, so leaf i owns [P_i, P_i+1), and the child found has
// a positive value (a_k-1 <= m < a_k). When m lies at or beyond the node's
// sum (a mass equal to the total, or beyond it by rounding) the count can
// land on trailing zero children, so it is capped at the last positive child.
// The caller enters only nodes of positive sum, so the leaf reached is
// positive. Branch-free on purpose: the children are usually a cache miss,
// and a mispredicted branch would wait for them and serialise the misses of
// a batch instead of overlapping them.
inline int64_t tree_pick_child(const double* c, double m, double* prefix) {
  double pre[8];
  double acc = 0.0;
  int64_t k = 0, last = 0;
  for (int64_t j = 0; j < 8; ++j) {
    pre[j] = acc;
    acc += c[j];
    k += (j < 7) & (acc <= m);
    last = c[j] > 0.0 ? j : last;
  }
  k = k < last ? k : last;
  *prefix = pre[k];
  return k;
}

#if defined(CPU_CAPABILITY_AVX512)
// tree_pick_child for 8 queries at once, one per 64-bit lane: the 8 child
// lines are transposed so that register k holds child k of every query, and
// each lane then adds its prefixes left to right exactly as the scalar code
// does (same bits), compares, and picks, with no per-query loop.
inline void tree_pick_child8(const double* level, double* m, int64_t* node) {
  __m512d r[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm512_load_pd(level + node[q] * 8);
  // 8x8 transpose: pairs, then quadruples, then halves.
  __m512d a[8], b[8], c[8];
  for (int q = 0; q < 8; q += 2) {
    a[q] = _mm512_unpacklo_pd(r[q], r[q + 1]);      // r_q0 r_q+1,0 r_q2 r_q+1,2 ...
    a[q + 1] = _mm512_unpackhi_pd(r[q], r[q + 1]);  // r_q1 r_q+1,1 r_q3 r_q+1,3 ...
  }
  const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int h = 0; h < 8; h += 4) {
    b[h + 0] = _mm512_permutex2var_pd(a[h], lo2, a[h + 2]);      // children 0 and 4 of 4 queries
    b[h + 1] = _mm512_permutex2var_pd(a[h + 1], lo2, a[h + 3]);  // children 1 and 5
    b[h + 2] = _mm512_permutex2var_pd(a[h], hi2, a[h + 2]);      // children 2 and 6
    b[h + 3] = _mm512_permutex2var_pd(a[h + 1], hi2, a[h + 3]);  // children 3 and 7
  }
  const __m512i lo4 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i hi4 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  for (int k = 0; k < 4; ++k) {
    c[k] = _mm512_permutex2var_pd(b[k], lo4, b[k + 4]);
    c[k + 4] = _mm512_permutex2var_pd(b[k], hi4, b[k + 4]);
  }
  const __m512d zero = _mm512_setzero_pd();
  const __m512d mass = _mm512_loadu_pd(m);
  __m512d acc[8];
  acc[0] = _mm512_add_pd(zero, c[0]);
  for (int k = 1; k < 8; ++k) acc[k] = _mm512_add_pd(acc[k - 1], c[k]);
  const __m512i one = _mm512_set1_epi64(1);
  __m512i k = _mm512_setzero_si512(), last = _mm512_setzero_si512();
  for (int j = 0; j < 7; ++j) k = _mm512_mask_add_epi64(k, _mm512_cmp_pd_mask(acc[j], mass, _CMP_LE_OQ), k, one);
  for (int j = 1; j < 8; ++j)
    last = _mm512_mask_mov_epi64(last, _mm512_cmp_pd_mask(c[j], zero, _CMP_GT_OQ), _mm512_set1_epi64(j));
  k = _mm512_min_epi64(k, last);
  __m512d pre = zero;
  for (int j = 1; j < 8; ++j)
    pre = _mm512_mask_mov_pd(pre, _mm512_cmpeq_epi64_mask(k, _mm512_set1_epi64(j)), acc[j - 1]);
  _mm512_storeu_pd(m, _mm512_sub_pd(mass, pre));
  const __m512i nd = _mm512_loadu_si512(node);
  _mm512_storeu_si512(node, _mm512_add_epi64(_mm512_slli_epi64(nd, 3), k));
}
#endif

// Descends n queries of masses m (consumed; negative ones count as 0) from
// the root of a fan-out-8 sum tree whose levels below the root are
// child_levels[0..depth-1] (64-byte aligned); out[j] is the leaf found for
// query j. One level at a time for the whole batch: the nodes one level down
// are known before the level is walked, so their lines are requested kAhead
// queries early and the misses overlap far beyond what the out-of-order
// window alone would allow.
inline void tree_find_k(const double* const* child_levels, int depth, double* m, int64_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = 0;
    m[j] = m[j] < 0.0 ? 0.0 : m[j];  // below the first leaf: the first positive one
  }
  constexpr int64_t kAhead = 16;
  for (int d = 0; d < depth; ++d) {
    const double* level = child_levels[d];
    for (int64_t j = 0; j < std::min(n, kAhead); ++j) __builtin_prefetch(level + out[j] * 8);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; j + 8 <= n; j += 8) {
      for (int64_t q = j + kAhead; q < std::min(n, j + kAhead + 8); ++q) __builtin_prefetch(level + out[q] * 8);
      tree_pick_child8(level, m + j, out + j);
    }
#endif
    for (; j < n; ++j) {
      if (j + kAhead < n) __builtin_prefetch(level + out[j + kAhead] * 8);
      double pre;
      const int64_t k = tree_pick_child(level + out[j] * 8, m[j], &pre);
      m[j] -= pre;
      out[j] = out[j] * 8 + k;
    }
  }
}

constexpr TreeKernelTable make_tree_table(const char* name) {
  return TreeKernelTable{name, &pow_inplace_k<double>, &pow_inplace_k<float>, &tree_level_k, &tree_find_k};
}

}  // namespace CPU_CAPABILITY
}  // namespace replay
}  // namespace neuralmem

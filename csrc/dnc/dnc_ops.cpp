// The neuralmem_dnc ops: the DNC access's usage and write weights (usage,
// free gates, allocation, gates) as one op with a hand-written backward, in
// place of the few dozen (B, N)-sized PyTorch ops and autograd nodes per step
// that nn/access.py would otherwise run. Semantics, the gradient formula's
// registration, the fake kernels and the reference: neuralmem_fast/ops/dnc.py.
// CPU kernels only: other devices take the reference (PyTorch ops).
//
// write_weights(usage (B,N), prev_write_weights (B,W,N), free_gates (B,R),
//               prev_read_weights (B,R,N), content (B,W,N), write_gates (B,W),
//               allocation_gates (B,W), eps)
//   -> (usage (B,N), write_weights (B,W,N), head_usage (B,W,N), order (B,W,N) int64)
//   written = 1 - prod_w (1 - prev_write_weights)          (no gradient)
//   usage   = (usage + written - usage * written) * prod_r (1 - free_r * prev_read_r)
//   head i (in order): u_i = the usage raised by heads < i (u_0 = usage),
//       s = eps + (1 - eps) u_i sorted ascending (stable; order[i] the slots),
//       a_i[order_j] = (1 - s_j) prod_{k<j} s_k,
//       u_{i+1} = u_i + (1 - u_i) g_w g_a a_i
//   write_weights_i = g_w (g_a a_i + (1 - g_a) content_i)
// head_usage (u_i) and order are what the backward needs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/isa.h"
#include "dnc/checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NEURALMEM_SORT_AVX512 1
#else
#define NEURALMEM_SORT_AVX512 0
#endif

TORCH_LIBRARY(neuralmem_dnc, m) {
  m.def("write_weights(Tensor usage, Tensor prev_write_weights, Tensor free_gates, Tensor prev_read_weights, "
        "Tensor content, Tensor write_gates, Tensor allocation_gates, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad_usage_in (B,N), grad_free_gates (B,R), grad_prev_read_weights (B,R,N), grad_content (B,W,N),
  //  grad_write_gates (B,W), grad_allocation_gates (B,W)); prev_write_weights gets no gradient.
  m.def("write_weights_backward(Tensor grad_usage, Tensor grad_write_weights, Tensor usage, "
        "Tensor prev_write_weights, Tensor free_gates, Tensor prev_read_weights, Tensor content, "
        "Tensor write_gates, Tensor allocation_gates, Tensor head_usage, Tensor order, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace neuralmem {
namespace dnc {
namespace {

// t: shape `want`, the dtype of usage, on the CPU (checks.h).
void check_t(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want, const at::Tensor& usage,
             const char* hint) {
  check_tensor(t, name, want, usage, "usage", hint);
}

struct Dims {
  int64_t B, N, W, R;
};

Dims check_inputs(const at::Tensor& usage, const at::Tensor& ww, const at::Tensor& fg, const at::Tensor& rw,
                  const at::Tensor& content, const at::Tensor& gw, const at::Tensor& ga, double eps) {
  TORCH_CHECK_VALUE(usage.defined() && usage.dim() == 2, "usage must have shape (B, N), got ",
                    usage.defined() ? usage.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(usage.scalar_type() == at::kFloat || usage.scalar_type() == at::kDouble,
                   "usage must be float32 or float64 for the CPU kernel, got ", usage.scalar_type());
  TORCH_CHECK_VALUE(usage.device().is_cpu(), "usage must be a CPU tensor for the CPU kernel, got ", usage.device());
  TORCH_CHECK_VALUE(eps >= 0 && eps < 1, "eps must lie in [0, 1), got ", eps);
  TORCH_CHECK_VALUE(ww.dim() == 3, "prev_write_weights must have shape (B, W, N), got ", ww.sizes());
  TORCH_CHECK_VALUE(rw.dim() == 3, "prev_read_weights must have shape (B, R, N), got ", rw.sizes());
  const Dims d{usage.size(0), usage.size(1), ww.size(1), rw.size(1)};
  TORCH_CHECK_VALUE(d.N >= 1, "usage must have N >= 1 slots, got ", d.N);
  TORCH_CHECK_VALUE(d.N <= int64_t(UINT32_MAX), "usage must have at most 2^32 - 1 slots (the sort's slot numbers), got ",
                    d.N);
  check_t(ww, "prev_write_weights", {d.B, d.W, d.N}, usage, "(B, W, N)");
  check_t(fg, "free_gates", {d.B, d.R}, usage, "(B, R)");
  check_t(rw, "prev_read_weights", {d.B, d.R, d.N}, usage, "(B, R, N)");
  check_t(content, "content", {d.B, d.W, d.N}, usage, "(B, W, N)");
  check_t(gw, "write_gates", {d.B, d.W}, usage, "(B, W)");
  check_t(ga, "allocation_gates", {d.B, d.W}, usage, "(B, W)");
  return d;
}

// The usage after the previous write and the frees, for slots of memory b:
// u1 (before the frees) kept when asked, and psi (the retention, scratch of N
// values) always. Row by row of the (W, N) and (R, N) inputs, so that every
// loop runs over contiguous slots (vectorised; slot by slot, the inner loops
// over heads were a third of the backward at N = 1,024); each slot's products
// are taken in the same order as before, so the values are bitwise the same.
template <typename T>
void retained_usage(const T* u0, const T* ww, const T* fg, const T* rw, const Dims& d, T* u, T* u1, T* psi,
                    T* written) {
  const int64_t N = d.N;
  const T* wr = ww;  // one head: the written amount is its weight
  if (d.W > 1) {
    T* keep = written != nullptr ? written : u;  // u as scratch until its own values below
    std::fill(keep, keep + N, T(1));
    for (int64_t w = 0; w < d.W; ++w) {
      const T* x = ww + w * N;
      for (int64_t n = 0; n < N; ++n) keep[n] *= T(1) - x[n];
    }
    for (int64_t n = 0; n < N; ++n) keep[n] = T(1) - keep[n];
    wr = keep;
  } else if (written != nullptr) {
    std::copy(ww, ww + N, written);
  }
  T* a = u1 != nullptr ? u1 : u;  // slot n of a, wr and u is read before it is written
  for (int64_t n = 0; n < N; ++n) a[n] = u0[n] + wr[n] - u0[n] * wr[n];
  std::fill(psi, psi + N, T(1));
  for (int64_t r = 0; r < d.R; ++r) {
    const T f = fg[r];
    const T* x = rw + r * N;
    for (int64_t n = 0; n < N; ++n) psi[n] *= T(1) - f * x[n];
  }
  for (int64_t n = 0; n < N; ++n) u[n] = a[n] * psi[n];
}

// Unsigned keys in the order of the values, as torch.sort orders them:
// -inf < ... < -0 = +0 < ... < +inf < NaN (every NaN last, alike).
template <typename T>
struct SortKey {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static U of(T v) {
    if (std::isnan(v)) return ~U(0);
    if (v == T(0)) v = T(0);  // -0 and +0 tie, as they compare equal
    U b;
    std::memcpy(&b, &v, sizeof(T));
    constexpr U sign = U(1) << (8 * sizeof(T) - 1);
    return (b & sign) ? ~b : (b | sign);
  }
};

// order = the slots sorted by s ascending, ties in slot order.
// Up to kPackedSortMax slots: one comparison sort of the keys packed with
// their slot, (key << bits) | slot, so that ties fall in slot order. Beyond: a
// stable LSD radix sort of the keys, 8 bits a pass, the four (eight) byte
// histograms counted in one pass over the keys; passes in which every key has
// the same byte are skipped. Measured on MemoryCore's usages (16 memories):
// the packed sort took 0.4-0.6x the radix sort's time at N = 128 and 1.1-2.5x
// at N = 1,024, whose 256-bucket passes pay off only at larger N.
constexpr int64_t kPackedSortMax = 512;

template <typename T>
struct SortScratch {
  using U = typename SortKey<T>::U;
  // a key and its slot in one integer: 64 bits for float, 128 for double
  using Packed = std::conditional_t<sizeof(U) == 4, uint64_t, unsigned __int128>;
  static constexpr int kShift = 8 * sizeof(U) == 32 ? 32 : 64;
  std::vector<U> k1, k2;
  std::vector<uint32_t> i1, i2;
  std::vector<Packed> packed;
  static Packed pack(T v, int64_t n) { return (Packed(SortKey<T>::of(v)) << kShift) | Packed(uint64_t(n)); }
  static int64_t slot(Packed p) { return static_cast<int64_t>(static_cast<uint32_t>(p)); }
};

#if NEURALMEM_SORT_AVX512
// Up to kNetworkSortMax packed 64-bit keys (float usages) sorted by a bitonic network in AVX-512 registers:
// std::sort took about 1.6 us for 128 of MemoryCore's usages, a sixth of the sequence node's usage op, most of
// it in mispredicted branches; the network has none. The keys are padded with ~0, which sorts after every
// packed key (whose slot bits are below 2^32 - 1). Compiled for AVX-512F alone (a target attribute, this file
// being built for the baseline) and taken where the processor has it.
constexpr int64_t kNetworkSortMax = 128;
#define NEURALMEM_AVX512 __attribute__((target("avx512f")))
// GCC 12 takes the unmasked intrinsics' undefined pass-through operand for an uninitialized read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// Lanes in `hi` take max(a, b), the others min(a, b): the comparators (i, j) of one network layer, i < j, when
// b is a with lane i and lane j swapped.
NEURALMEM_AVX512 inline __m512i cmp_exchange(__m512i a, __m512i b, __mmask8 hi) {
  return _mm512_mask_mov_epi64(_mm512_min_epu64(a, b), hi, _mm512_max_epu64(a, b));
}

NEURALMEM_AVX512 inline __m512i lanes(__m512i v, __m512i idx) { return _mm512_permutexvar_epi64(idx, v); }

// A bitonic sequence of 8 lanes sorted ascending: half-cleaners at lane distances 4, 2 and 1.
NEURALMEM_AVX512 inline __m512i merge8(__m512i z) {
  z = cmp_exchange(z, lanes(z, _mm512_set_epi64(3, 2, 1, 0, 7, 6, 5, 4)), 0xF0);
  z = cmp_exchange(z, lanes(z, _mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2)), 0xCC);
  return cmp_exchange(z, lanes(z, _mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1)), 0xAA);
}

// 8 lanes sorted ascending: pairs, then bitonic merges of 4 and 8 by reversal (lane i against 3 - i, 7 - i).
NEURALMEM_AVX512 inline __m512i sort8(__m512i z) {
  const __m512i swap1 = _mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1);
  z = cmp_exchange(z, lanes(z, swap1), 0xAA);
  z = cmp_exchange(z, lanes(z, _mm512_set_epi64(4, 5, 6, 7, 0, 1, 2, 3)), 0xCC);
  z = cmp_exchange(z, lanes(z, swap1), 0xAA);
  z = cmp_exchange(z, lanes(z, _mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7)), 0xF0);
  z = cmp_exchange(z, lanes(z, _mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2)), 0xCC);
  return cmp_exchange(z, lanes(z, swap1), 0xAA);
}

// R registers of keys (R a power of two up to 16) sorted ascending across them, in place: each register
// sorted, then blocks of w sorted registers merged pairwise for w = 1, 2, ..., R / 2. A merge reverses the
// second block (registers and lanes), which makes the pair one bitonic sequence, then runs half-cleaners at
// register distances w, w / 2, ..., 1 and merge8 in every register.
template <int R>
NEURALMEM_AVX512 void sort_network(uint64_t* keys) {
  __m512i r[R];
  const __m512i rev = _mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) r[i] = sort8(_mm512_loadu_si512(keys + 8 * i));
#pragma GCC unroll 16
  for (int w = 1; w < R; w *= 2) {
#pragma GCC unroll 16
    for (int b = 0; b < R; b += 2 * w) {
#pragma GCC unroll 16
      for (int i = 0; i < w / 2; ++i) {
        const __m512i t = r[b + w + i];
        r[b + w + i] = r[b + 2 * w - 1 - i], r[b + 2 * w - 1 - i] = t;
      }
#pragma GCC unroll 16
      for (int i = 0; i < w; ++i) r[b + w + i] = lanes(r[b + w + i], rev);
#pragma GCC unroll 16
      for (int d = w; d >= 1; d /= 2) {
#pragma GCC unroll 32
        for (int i = b; i < b + 2 * w; ++i) {
          if (i & d) continue;
          const __m512i lo = _mm512_min_epu64(r[i], r[i + d]), hi = _mm512_max_epu64(r[i], r[i + d]);
          r[i] = lo, r[i + d] = hi;
        }
      }
#pragma GCC unroll 32
      for (int i = b; i < b + 2 * w; ++i) r[i] = merge8(r[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) _mm512_storeu_si512(keys + 8 * i, r[i]);
}

// AVX-512 when the processor has it, unless NEURALMEM_CPU_CAPABILITY (or ATEN_CPU_CAPABILITY) caps the
// extension below it (common/isa.h), as for every other per-instruction-set path.
bool has_avx512() {
  static const bool yes = isa_level() >= 2;
  return yes;
}

// keys[0, N) (N <= kNetworkSortMax) sorted ascending; keys has room for the next power of two of registers.
void network_sort(uint64_t* keys, int64_t N) {
  int64_t regs = 1;
  while (8 * regs < N) regs *= 2;
  std::fill(keys + N, keys + 8 * regs, ~uint64_t(0));
  switch (regs) {
    case 1: return sort_network<1>(keys);
    case 2: return sort_network<2>(keys);
    case 4: return sort_network<4>(keys);
    case 8: return sort_network<8>(keys);
    default: return sort_network<16>(keys);
  }
}
#pragma GCC diagnostic pop
#undef NEURALMEM_AVX512
#endif

template <typename T, typename O>
void stable_order(const T* s, int64_t N, O* order, SortScratch<T>& sc) {
  using U = typename SortKey<T>::U;
  using SC = SortScratch<T>;
  if (N <= kPackedSortMax) {
    bool network = false;  // float keys (64 bits packed) few enough for the AVX-512 network
#if NEURALMEM_SORT_AVX512
    if constexpr (sizeof(U) == 4) network = N <= kNetworkSortMax && has_avx512();
#endif
    sc.packed.resize(network ? kNetworkSortMax : N);  // the network pads to whole registers
    auto* p = sc.packed.data();
    for (int64_t n = 0; n < N; ++n) p[n] = SC::pack(s[n], n);
#if NEURALMEM_SORT_AVX512
    if constexpr (sizeof(U) == 4) {
      if (network) network_sort(p, N);
    }
#endif
    if (!network) std::sort(p, p + N);
    for (int64_t n = 0; n < N; ++n) order[n] = static_cast<O>(SC::slot(p[n]));
    return;
  }
  sc.k1.resize(N);
  sc.k2.resize(N);
  sc.i1.resize(N);
  sc.i2.resize(N);
  U* kin = sc.k1.data();
  U* kout = sc.k2.data();
  uint32_t* iin = sc.i1.data();
  uint32_t* iout = sc.i2.data();
  constexpr int kBytes = static_cast<int>(sizeof(U));
  uint32_t count[kBytes][256];
  std::memset(count, 0, sizeof count);
  for (int64_t n = 0; n < N; ++n) {
    const U k = SortKey<T>::of(s[n]);
    kin[n] = k;
    iin[n] = static_cast<uint32_t>(n);
    for (int i = 0; i < kBytes; ++i) ++count[i][(k >> (8 * i)) & 0xff];
  }
  for (int i = 0; i < kBytes; ++i) {
    const int shift = 8 * i;
    uint32_t* c = count[i];
    if (c[(kin[0] >> shift) & 0xff] == static_cast<uint32_t>(N)) continue;  // one byte value: order kept
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const uint32_t x = c[v];
      c[v] = sum;
      sum += x;
    }
    for (int64_t n = 0; n < N; ++n) {
      const U k = kin[n];
      const uint32_t at = c[(k >> shift) & 0xff]++;
      kout[at] = k;
      iout[at] = iin[n];
    }
    std::swap(kin, kout);
    std::swap(iin, iout);
  }
  for (int64_t n = 0; n < N; ++n) order[n] = static_cast<O>(iin[n]);
}

// s = eps + (1 - eps) uc: the usage as the allocation sorts and multiplies it.
template <typename T>
void shifted_usage(const T* uc, int64_t N, T eps, T* s) {
  const T keep = T(1) - eps;
  for (int64_t n = 0; n < N; ++n) s[n] = eps + keep * uc[n];
}

// The allocation weighting a[order_j] = (1 - s_j) prod_{k<j} s_k over the
// slots in `order`; with P, also the products P[j] = prod_{k<j} s_k (in the
// sorted order), which the backward needs.
// A product below the smallest normal number in magnitude is taken as 0, and so is every
// weight after it. Without that, a full memory (every s_j near 1) keeps the
// product at the smallest subnormal, each multiplication rounding back up to
// it, and every remaining slot costs a subnormal multiply (about 100 cycles
// each; 2-3.5x the op at N = 128). The weights so dropped are below 1.2e-38
// (float32) or 2.3e-308 (float64).
// Returns J, the number of sorted slots before the flush (N without one):
// a is zero from J on (one contiguous fill first, not N - J scattered stores)
// and P is left unwritten there.
template <typename T, typename O>
int64_t allocation(const T* s, int64_t N, const O* order, T* a, T* P = nullptr) {
  std::fill(a, a + N, T(0));
  T p = 1;
  int64_t j = 0;
  for (; j < N && !(std::abs(p) < std::numeric_limits<T>::min()); ++j) {  // NaN carries on
    const int64_t n = order[j];
    if (P != nullptr) P[j] = p;
    a[n] = (T(1) - s[n]) * p;
    p *= s[n];
  }
  return j;
}

// The op's seven inputs (contiguous), as pointers.
template <typename T>
struct Inputs {
  const T *usage, *ww, *fg, *rw, *content, *gw, *ga;
  Inputs(const at::Tensor& u, const at::Tensor& w, const at::Tensor& f, const at::Tensor& r, const at::Tensor& c,
         const at::Tensor& g_w, const at::Tensor& g_a)
      : usage(u.const_data_ptr<T>()), ww(w.const_data_ptr<T>()), fg(f.const_data_ptr<T>()),
        rw(r.const_data_ptr<T>()), content(c.const_data_ptr<T>()), gw(g_w.const_data_ptr<T>()),
        ga(g_a.const_data_ptr<T>()) {}
};

template <typename T>
void forward_kernel(const at::Tensor& usage, const at::Tensor& ww, const at::Tensor& fg, const at::Tensor& rw,
                    const at::Tensor& content, const at::Tensor& gw, const at::Tensor& ga, double eps_d,
                    const Dims& d, at::Tensor& u_out, at::Tensor& w_out, at::Tensor& hu_out, at::Tensor& ord_out) {
  const T eps = static_cast<T>(eps_d);
  const Inputs<T> in(usage, ww, fg, rw, content, gw, ga);
  const T *U = in.usage, *WW = in.ww, *FG = in.fg, *RW = in.rw, *C = in.content, *GW = in.gw, *GA = in.ga;
  T* UO = u_out.data_ptr<T>();
  T* WO = w_out.data_ptr<T>();
  T* HU = hu_out.data_ptr<T>();
  int64_t* OR = ord_out.data_ptr<int64_t>();
  const int64_t N = d.N, W = d.W, R = d.R;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(N), a(N), psi(N);
    SortScratch<T> sc;
    for (int64_t b = b0; b < b1; ++b) {
      T* u = UO + b * N;
      retained_usage(U + b * N, WW + b * W * N, FG + b * R, RW + b * R * N, d, u, static_cast<T*>(nullptr),
                     psi.data(), static_cast<T*>(nullptr));
      std::copy(u, u + N, HU + b * W * N);
      for (int64_t i = 0; i < W; ++i) {
        T* uc = HU + (b * W + i) * N;
        int64_t* order = OR + (b * W + i) * N;
        shifted_usage(uc, N, eps, s.data());
        stable_order(s.data(), N, order, sc);
        allocation(s.data(), N, order, a.data());
        const T g_w = GW[b * W + i], g_a = GA[b * W + i];
        const T* c = C + (b * W + i) * N;
        T* wo = WO + (b * W + i) * N;
        for (int64_t n = 0; n < N; ++n) wo[n] = g_w * (g_a * a[n] + (T(1) - g_a) * c[n]);
        if (i + 1 < W) {
          const T g = g_w * g_a;
          T* un = uc + N;
          for (int64_t n = 0; n < N; ++n) un[n] = uc[n] + (T(1) - uc[n]) * g * a[n];
        }
      }
    }
  });
}

// sum_n f(n) over n < N as kLanes interleaved partial sums, added up at the end: each addition of a
// single running sum waits on the one before it (about 4 cycles a slot for each sum), and the
// compiler may not reorder them itself. The sums differ from the sequential ones in rounding only.
constexpr int kLanes = 8;

template <typename T, typename F>
T lane_sum(int64_t N, F&& f) {
  T p[kLanes] = {};
  int64_t n = 0;
  for (; n + kLanes <= N; n += kLanes)
    for (int l = 0; l < kLanes; ++l) p[l] += f(n + l);
  for (int l = 0; n < N; ++n, ++l) p[l] += f(n);
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += p[l];
  return sum;
}

template <typename T>
void backward_kernel(const at::Tensor& gu_t, const at::Tensor& gww_t, const at::Tensor& usage, const at::Tensor& ww,
                     const at::Tensor& fg, const at::Tensor& rw, const at::Tensor& content, const at::Tensor& gw,
                     const at::Tensor& ga, const at::Tensor& hu, const at::Tensor& ord, double eps_d, const Dims& d,
                     at::Tensor& du0_t, at::Tensor& dfg_t, at::Tensor& drw_t, at::Tensor& dc_t, at::Tensor& dgw_t,
                     at::Tensor& dga_t) {
  const T eps = static_cast<T>(eps_d);
  const T* GU = gu_t.const_data_ptr<T>();
  const T* GWW = gww_t.const_data_ptr<T>();
  const Inputs<T> in(usage, ww, fg, rw, content, gw, ga);
  const T *U = in.usage, *WW = in.ww, *FG = in.fg, *RW = in.rw, *C = in.content, *GW = in.gw, *GA = in.ga;
  const T* HU = hu.const_data_ptr<T>();
  const int64_t* OR = ord.const_data_ptr<int64_t>();
  T* DU0 = du0_t.data_ptr<T>();
  T* DFG = dfg_t.data_ptr<T>();
  T* DRW = drw_t.data_ptr<T>();
  T* DC = dc_t.data_ptr<T>();
  T* DGW = dgw_t.data_ptr<T>();
  T* DGA = dga_t.data_ptr<T>();
  const int64_t N = d.N, W = d.W, R = d.R;
  const T keep = T(1) - eps;
  at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(N), a(N), Ps(N), da(N), dU(N), u(N), u1(N), psi(N), written(N), prefix(N), suffix((R + 1) * N);
    for (int64_t b = b0; b < b1; ++b) {
      const T* hub = HU + b * W * N;
      const int64_t* orb = OR + b * W * N;
      std::fill(dU.begin(), dU.end(), T(0));
      for (int64_t i = W - 1; i >= 0; --i) {
        const int64_t bi = b * W + i;
        const T g_w = GW[bi], g_a = GA[bi];
        const T* c = C + bi * N;
        const T* gwi = GWW + bi * N;
        const T* ui = hub + i * N;
        const int64_t* o = orb + i * N;
        // Head i's allocation again, from the usage it sorted and its order.
        shifted_usage(ui, N, eps, s.data());
        const int64_t J = allocation(s.data(), N, o, a.data(), Ps.data());
        const T* ai = a.data();
        T* dc = DC + bi * N;
        const T cw = g_w * (T(1) - g_a), cwa = g_w * g_a;
        for (int64_t n = 0; n < N; ++n) {
          const T g = gwi[n];
          dc[n] = g * cw;
          da[n] = g * cwa;
        }
        T dgw = lane_sum<T>(N, [&](int64_t n) { return gwi[n] * (g_a * ai[n] + (T(1) - g_a) * c[n]); });
        T dga = lane_sum<T>(N, [&](int64_t n) { return gwi[n] * g_w * (ai[n] - c[n]); });
        if (i + 1 < W) {
          // u_{i+1} = u_i + (1 - u_i) g a_i; dU holds the gradient of u_{i+1}.
          const T g = g_w * g_a;
          T dg = 0;
          for (int64_t n = 0; n < N; ++n) {
            dg += dU[n] * (T(1) - ui[n]) * ai[n];
            da[n] += dU[n] * (T(1) - ui[n]) * g;
            dU[n] *= T(1) - g * ai[n];
          }
          dgw += dg * g_a;
          dga += dg * g_w;
        }
        DGW[bi] = dgw;
        DGA[bi] = dga;
        // Through the sorted product: with s sorted, P_j = prod_{k<j} s_k,
        // a_j = (1 - s_j) P_j, ds_j = P_j (R_j - da_j),
        // R_j = sum_{J>l>j} da_l (1 - s_l) prod_{j<k<l} s_k (no division).
        // The sorted slots from J on got weight 0 in the forward, a constant (the flush), so their da
        // reach nothing and the loop starts at J, not N: a memory with free slots (usage near 0) flushes
        // after a few dozen. A non-finite da still carries NaN to the slots the whole loop would reach
        // (0 * inf), through the loop over all N with P_j = 0 from J on.
        int64_t jend = J;
        if (J < N && !std::isfinite(lane_sum<T>(N, [&](int64_t n) { return da[n] * T(0); }))) {
          std::fill(Ps.begin() + J, Ps.end(), T(0));
          jend = N;
        }
        const T* Pj = Ps.data();
        T Rj = 0;
        for (int64_t j = jend - 1; j >= 0; --j) {
          const int64_t n = o[j];
          dU[n] += Pj[j] * (Rj - da[n]) * keep;
          Rj = da[n] * (T(1) - s[n]) + s[n] * Rj;
        }
      }
      // The usage output's own gradient, then usage = u1 * psi.
      const T* gu = GU + b * N;
      retained_usage(U + b * N, WW + b * W * N, FG + b * R, RW + b * R * N, d, u.data(), u1.data(), psi.data(),
                     written.data());
      const T* f = FG + b * R;
      const T* rwb = RW + b * R * N;
      T* drw = DRW + b * R * N;
      T* du0 = DU0 + b * N;
      T* dpsi = dU.data();  // dU is read for the last time here
      for (int64_t n = 0; n < N; ++n) {
        const T g = dU[n] + gu[n];
        du0[n] = g * psi[n] * (T(1) - written[n]);
        dpsi[n] = g * u1[n];
      }
      // psi = prod_r (1 - f_r rw_r): the product over the other heads as prefix * suffix (exact at zeros),
      // the suffixes in sfx ((R+1) x N), the prefix in pre, head by head.
      T* sfx = suffix.data();
      std::fill(sfx + R * N, sfx + (R + 1) * N, T(1));
      for (int64_t r = R - 1; r >= 0; --r) {
        const T fr = f[r];
        const T* rr = rwb + r * N;
        T* sr = sfx + r * N;
        const T* sn = sfx + (r + 1) * N;
        for (int64_t n = 0; n < N; ++n) sr[n] = sn[n] * (T(1) - fr * rr[n]);
      }
      T* pre = prefix.data();
      std::fill(pre, pre + N, T(1));
      for (int64_t r = 0; r < R; ++r) {
        const T fr = f[r];
        const T* rr = rwb + r * N;
        const T* sn = sfx + (r + 1) * N;
        T* dr = drw + r * N;
        for (int64_t n = 0; n < N; ++n) dr[n] = -(dpsi[n] * (pre[n] * sn[n])) * fr;
        DFG[b * R + r] = -lane_sum<T>(N, [&](int64_t n) { return dpsi[n] * (pre[n] * sn[n]) * rr[n]; });
        for (int64_t n = 0; n < N; ++n) pre[n] *= T(1) - fr * rr[n];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_weights_cpu(
    const at::Tensor& usage, const at::Tensor& ww, const at::Tensor& fg, const at::Tensor& rw,
    const at::Tensor& content, const at::Tensor& gw, const at::Tensor& ga, double eps) {
  const Dims d = check_inputs(usage, ww, fg, rw, content, gw, ga, eps);
  at::Tensor u_out = at::empty({d.B, d.N}, usage.options());
  at::Tensor w_out = at::empty({d.B, d.W, d.N}, usage.options());
  at::Tensor hu = at::empty({d.B, d.W, d.N}, usage.options());
  at::Tensor ord = at::empty({d.B, d.W, d.N}, usage.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(usage.scalar_type(), "write_weights", [&] {
    forward_kernel<scalar_t>(usage.contiguous(), ww.contiguous(), fg.contiguous(), rw.contiguous(),
                             content.contiguous(), gw.contiguous(), ga.contiguous(), eps, d, u_out, w_out, hu, ord);
  });
  return {u_out, w_out, hu, ord};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_weights_backward_cpu(
    const at::Tensor& grad_usage, const at::Tensor& grad_ww, const at::Tensor& usage, const at::Tensor& ww,
    const at::Tensor& fg, const at::Tensor& rw, const at::Tensor& content, const at::Tensor& gw,
    const at::Tensor& ga, const at::Tensor& hu, const at::Tensor& ord, double eps) {
  const Dims d = check_inputs(usage, ww, fg, rw, content, gw, ga, eps);
  check_t(grad_usage, "grad_usage", {d.B, d.N}, usage, "(B, N)");
  check_t(grad_ww, "grad_write_weights", {d.B, d.W, d.N}, usage, "(B, W, N)");
  check_t(hu, "head_usage", {d.B, d.W, d.N}, usage, "(B, W, N)");
  TORCH_CHECK_VALUE(ord.dim() == 3 && ord.size(0) == d.B && ord.size(1) == d.W && ord.size(2) == d.N,
                    "order must have shape (B, W, N) = (", d.B, ", ", d.W, ", ", d.N, "), got ", ord.sizes());
  TORCH_CHECK_TYPE(ord.scalar_type() == at::kLong, "order must be int64, got ", ord.scalar_type());
  const at::Tensor o = ord.contiguous();
  // Slot indices in [0, N) (the forward's permutations), else the kernel would read out of bounds. One plain
  // loop, not two ATen reductions and their item() calls: the sequence node calls this every step.
  const int64_t* op = o.const_data_ptr<int64_t>();
  const uint64_t slots = static_cast<uint64_t>(d.N);
  bool in_range = true;
  for (int64_t i = 0, n = o.numel(); i < n; ++i) in_range &= static_cast<uint64_t>(op[i]) < slots;
  TORCH_CHECK_VALUE(in_range, "order must hold slot indices in [0, N) (the forward's output)");
  at::Tensor du0 = at::empty({d.B, d.N}, usage.options());
  at::Tensor dfg = at::empty({d.B, d.R}, usage.options());
  at::Tensor drw = at::empty({d.B, d.R, d.N}, usage.options());
  at::Tensor dc = at::empty({d.B, d.W, d.N}, usage.options());
  at::Tensor dgw = at::empty({d.B, d.W}, usage.options());
  at::Tensor dga = at::empty({d.B, d.W}, usage.options());
  AT_DISPATCH_FLOATING_TYPES(usage.scalar_type(), "write_weights_backward", [&] {
    backward_kernel<scalar_t>(grad_usage.contiguous(), grad_ww.contiguous(), usage.contiguous(), ww.contiguous(),
                              fg.contiguous(), rw.contiguous(), content.contiguous(), gw.contiguous(),
                              ga.contiguous(), hu.contiguous(), o, eps, d, du0, dfg, drw, dc, dgw, dga);
  });
  return {du0, dfg, drw, dc, dgw, dga};
}

}  // namespace
}  // namespace dnc
}  // namespace neuralmem

TORCH_LIBRARY_IMPL(neuralmem_dnc, CPU, m) {
  m.impl("write_weights", &neuralmem::dnc::write_weights_cpu);
  m.impl("write_weights_backward", &neuralmem::dnc::write_weights_backward_cpu);
}

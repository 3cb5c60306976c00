// Sum tree for prioritized replay: the tree itself and its pybind11 class.
// The design (layout, level-by-level batches, locking) is described in
// sum_tree.h. This file adds the Python boundary: inputs may be numpy arrays,
// CPU tensors, lists or scalars; a contiguous float64 (values) or int64
// (indices) array or tensor is read in place, anything else is converted
// once. Outputs are new numpy arrays. Every input is checked before the tree
// is touched, so a rejected call changes nothing.
//
// Two helpers of the replay buffers live here too, because their cost is the
// same cache-miss problem as the descent: gather_rows (the sampled rows of
// every stored field, one memcpy each after prefetching them all) and take
// (the sampled objects of a Python list, with slots and objects prefetched).
#include "replay/sum_tree.h"

#include "common/hugepages.h"
#include "replay/tree_kernel_table.h"

#include <pybind11/numpy.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <limits>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace neuralmem {
namespace replay {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t K = SumTree::kFanout;
static_assert(K == 8, "the tree kernel table's tree_level and tree_find are written for a fan-out of 8");

inline double leaf_min(double v) { return v > 0.0 ? v : kInf; }

double* alloc_level(int64_t n) {
  // Whole cache lines, so that the K children of a node share one. Levels of
  // 2 MiB and more sit on 2 MiB-aligned memory marked for transparent huge
  // pages: a random descent touches one line per level, and with 4 KiB pages
  // each such miss is also a TLB miss whose page walk would serialise them.
  const size_t bytes = std::max<size_t>(64, static_cast<size_t>(n) * sizeof(double));
  const size_t align = bytes >= (size_t{2} << 20) ? (size_t{2} << 20) : size_t{64};
  void* mem = nullptr;
  if (posix_memalign(&mem, align, (bytes + align - 1) / align * align) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align > 64) madvise(mem, bytes, MADV_HUGEPAGE);
#endif
  return static_cast<double*>(mem);
}
}  // namespace

SumTree::SumTree(int64_t capacity) : capacity_(capacity), depth_(0) {
  if (capacity < 1) throw py::value_error("SumTree: capacity must be >= 1, got " + std::to_string(capacity));
  int64_t width = 1;
  while (width < capacity) {
    width *= K;
    ++depth_;
  }
  for (int d = 0, n = 1; d <= depth_; ++d, n *= K) {
    sums_.emplace_back(alloc_level(n));
    std::fill(sums_.back().get(), sums_.back().get() + n, 0.0);
    // The leaves' mins would only repeat leaf_min(leaf): the last inner
    // level computes them from the leaves, so an update writes one line, not two.
    if (d < depth_ || depth_ == 0) {
      mins_.emplace_back(alloc_level(n));
      std::fill(mins_.back().get(), mins_.back().get() + n, kInf);
    }
    width_.push_back(n);
  }
  for (int d = 1; d <= depth_; ++d) child_levels_.push_back(sums_[d].get());
}

// Level d's parents from level d + 1 through the kernel table (512-bit
// vectors where the processor has them: one load per node's children): the
// parents parents[j] >> shift for j < n, or, with whole set, every node.
inline void SumTree::level_locked(int d, const int64_t* parents, int64_t n, int shift, bool whole) {
  if (!whole && n <= 0) return;  // never pass the kernel a null pointer for an empty batch: null means 0..n-1
  neuralmem::replay::tree_level(sums_[d + 1].get(), d + 1 == depth_ ? nullptr : mins_[d + 1].get(), sums_[d].get(),
                             mins_[d].get(), whole ? nullptr : parents, whole ? width_[d] : n, shift);
}

void SumTree::rebuild_locked() {
  for (int d = depth_ - 1; d >= 0; --d) level_locked(d, nullptr, 0, 0, /*whole=*/true);
}

void SumTree::set_leaf_locked(int64_t i, double v) {
  sums_[depth_][i] = v;
  if (depth_ == 0) mins_[0][0] = leaf_min(v);
  for (int d = depth_ - 1; d >= 0; --d) {
    i /= K;
    level_locked(d, &i, 1, 0, /*whole=*/false);
  }
}

int64_t SumTree::descend_one(double m) const {
  int64_t i = 0;
  neuralmem::replay::tree_find(child_levels_.data(), depth_, &m, &i, 1);
  return i;
}

void SumTree::update(const int64_t* idx, const double* val, int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  update_locked(idx, val, n);
}

// Leaves first, in order (the last write to a repeated index wins), then
// every affected parent one level up at a time across the whole batch.
void SumTree::update_locked(const int64_t* idx, const double* val, int64_t n) {
  if (n <= 0) return;
  double* ls = sums_[depth_].get();
  // Random leaves and parents miss the cache: each line is requested kAhead
  // entries of the batch before it is written.
  constexpr int64_t kAhead = 16;
  for (int64_t j = 0; j < n; ++j) {
    if (j + kAhead < n) __builtin_prefetch(ls + idx[j + kAhead], 1);
    ls[idx[j]] = val[j];
  }
  if (depth_ == 0) mins_[0][0] = leaf_min(ls[0]);
  // K = 8: the ancestor `up` levels above leaf i is i >> (3 * up), a shift
  // where a 64-bit division per entry and level cost more than the sums.
  int shift = 0;
  for (int d = depth_ - 1; d >= 0; --d) {
    shift += 3;
    // A level no wider than the batch (the root's few levels) is cheaper to
    // recompute whole than once per entry: a random batch of 256 would
    // otherwise recompute the root 256 times. Same values: parents are a
    // pure function of their children.
    level_locked(d, idx, n, shift, /*whole=*/width_[d] <= n);
  }
}

// Descends every query of the batch one level at a time (the kernel table's
// tree_find: 8 queries per 512-bit step where the processor has AVX-512);
// `m` holds the masses and is consumed.
void SumTree::find_locked(double* m, int64_t* out, int64_t n) {
  neuralmem::replay::tree_find(child_levels_.data(), depth_, m, out, n);
}

void SumTree::find(const double* mass, int64_t* out, int64_t n, bool fractions, double* total_out,
                   double* min_out, double* values_out) {
  std::lock_guard<std::mutex> g(mu_);
  const double total = sums_[0][0];
  if (!(total > 0.0)) throw py::value_error("SumTree.find: the tree is empty (total is 0); nothing can be sampled");
  std::vector<double> m(mass, mass + n);
  if (fractions)
    for (int64_t j = 0; j < n; ++j) m[j] *= total;
  find_locked(m.data(), out, n);
  if (values_out)
    for (int64_t j = 0; j < n; ++j) values_out[j] = sums_[depth_][out[j]];
  if (total_out) *total_out = total;
  if (min_out) *min_out = mins_[0][0];
}

void SumTree::sample_weighted(const double* frac, int64_t n, bool stratified, double beta, int64_t* idx_out,
                              float* w_out, const int64_t* gen, int64_t* sampled_gen, int64_t gs) {
  std::lock_guard<std::mutex> g(mu_);
  const double total = sums_[0][0];
  if (!(total > 0.0))
    throw py::value_error("SumTree.sample_weighted: the tree is empty (total is 0); nothing can be sampled");
  std::vector<double> m(frac, frac + n);
  for (int64_t j = 0; j < n; ++j)
    m[j] = (stratified ? (static_cast<double>(j) + m[j]) / static_cast<double>(n) : m[j]) * total;
  find_locked(m.data(), idx_out, n);
  // (N p_i / T)^-beta over the largest possible weight (N p_min / T)^-beta.
  const double mn = mins_[0][0];
  const double* ls = sums_[depth_].get();
  // float pow, vectorised: the weights are float32 anyway.
  for (int64_t j = 0; j < n; ++j) w_out[j] = static_cast<float>(ls[idx_out[j]] / mn);
  neuralmem::replay::powf_inplace(w_out, n, static_cast<float>(-beta));
  if (sampled_gen) {
    // The counters of a slot are one random line (or two, when the arrays are
    // separate): requested kAhead draws early so that their misses overlap.
    constexpr int64_t kAhead = 16;
    for (int64_t j = 0; j < n; ++j) {
      if (j + kAhead < n) {
        __builtin_prefetch(gen + idx_out[j + kAhead] * gs);
        __builtin_prefetch(sampled_gen + idx_out[j + kAhead] * gs, 1);
      }
      sampled_gen[idx_out[j] * gs] = gen[idx_out[j] * gs];
    }
  }
}

int64_t SumTree::update_priorities(const int64_t* idx, const double* prio, int64_t n, double alpha, double eps,
                                   const int64_t* gen, const int64_t* sampled_gen, int64_t gs, double* max_out) {
  std::vector<int64_t> keep_idx(static_cast<size_t>(n));
  std::vector<double> keep_val(static_cast<size_t>(n));
  double mx = -kInf;
  int64_t k = 0;
  constexpr int64_t kAhead = 16;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = idx[j];
    if (j + kAhead < n) {
      const int64_t a = idx[j + kAhead];
      __builtin_prefetch(sums_[depth_].get() + a, 1);
      if (sampled_gen) {
        // one line when the counters are the columns of one array (the
        // buffers' layout), two when they are separate arrays
        __builtin_prefetch(gen + a * gs);
        __builtin_prefetch(sampled_gen + a * gs);
      }
    }
    // A slot rewritten since it was last sampled holds another item now: its
    // entry is written and then overwritten by the next one (no branch to
    // mispredict on the counters, which are usually a cache miss).
    const bool keep = !sampled_gen || sampled_gen[i * gs] < 0 || sampled_gen[i * gs] == gen[i * gs];
    keep_idx[k] = i;
    keep_val[k] = prio[j] + eps;
    mx = keep && prio[j] > mx ? prio[j] : mx;
    k += keep;
  }
  // (p + eps)^alpha in one vectorised pass (SLEEF's pow, within 1 ulp, on
  // AVX2/AVX-512): a libm pow per entry was a quarter of the call.
  neuralmem::replay::pow_inplace(keep_val.data(), k, alpha);
  std::lock_guard<std::mutex> g(mu_);
  update_locked(keep_idx.data(), keep_val.data(), k);
  if (max_out) *max_out = mx;
  return k;
}

int64_t SumTree::find_without_replacement(const double* frac, int64_t* out, double* values_out, int64_t n,
                                          const int64_t* exclude, int64_t n_exclude) {
  std::lock_guard<std::mutex> g(mu_);
  // Successive sampling: draw one leaf, zero it, draw from the rest (the
  // distribution of numpy's choice(replace=False, p=...)), after zeroing the
  // excluded leaves. Every zeroed leaf is restored afterwards in reverse
  // order; since parents are recomputed from children, the tree returns to
  // exactly the same bits.
  std::vector<double> saved(static_cast<size_t>(n_exclude));
  for (int64_t j = 0; j < n_exclude; ++j) {
    saved[j] = sums_[depth_][exclude[j]];
    set_leaf_locked(exclude[j], 0.0);
  }
  int64_t k = 0;
  for (; k < n; ++k) {
    const double total = sums_[0][0];
    if (!(total > 0.0)) break;
    const int64_t i = descend_one(frac[k] * total);
    out[k] = i;
    values_out[k] = sums_[depth_][i];
    set_leaf_locked(i, 0.0);
  }
  for (int64_t j = k - 1; j >= 0; --j) set_leaf_locked(out[j], values_out[j]);
  for (int64_t j = n_exclude - 1; j >= 0; --j) set_leaf_locked(exclude[j], saved[j]);
  return k;
}

int64_t SumTree::sample_distinct(const double* frac, int64_t n, int64_t* idx_out, double* val_out) {
  std::vector<int64_t> drawn(static_cast<size_t>(n));
  {
    std::lock_guard<std::mutex> g(mu_);
    const double total = sums_[0][0];
    if (!(total > 0.0))
      throw py::value_error("SumTree.sample_distinct: the tree is empty (total is 0); nothing can be sampled");
    std::vector<double> m(frac, frac + n);
    for (int64_t j = 0; j < n; ++j) m[j] *= total;
    find_locked(m.data(), drawn.data(), n);
    for (int64_t j = 0; j < n; ++j) val_out[j] = sums_[depth_][drawn[j]];
  }
  // First occurrences in order, through an open-addressing set of at least
  // twice the batch (a sort, as numpy's unique does, cost more than the draw).
  int64_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  std::vector<int64_t> set(static_cast<size_t>(cap), -1);
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = drawn[j];
    uint64_t h = (static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull) >> 20;
    bool seen = false;
    for (;; ++h) {
      int64_t& slot = set[h & static_cast<uint64_t>(cap - 1)];
      if (slot == i) {
        seen = true;
        break;
      }
      if (slot < 0) {
        slot = i;
        break;
      }
    }
    if (seen) continue;
    idx_out[k] = i;
    val_out[k] = val_out[j];
    ++k;
  }
  return k;
}

void SumTree::get(const int64_t* idx, double* out, int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < n; ++j) out[j] = sums_[depth_][idx[j]];
}

void SumTree::leaves(double* out) {
  std::lock_guard<std::mutex> g(mu_);
  std::memcpy(out, sums_[depth_].get(), static_cast<size_t>(capacity_) * sizeof(double));
}

void SumTree::assign(const double* val) {
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < capacity_; ++j) sums_[depth_][j] = val[j];
  if (depth_ == 0) mins_[0][0] = leaf_min(val[0]);
  rebuild_locked();
}

double SumTree::total() {
  std::lock_guard<std::mutex> g(mu_);
  return sums_[0][0];
}

double SumTree::min() {
  std::lock_guard<std::mutex> g(mu_);
  return mins_[0][0];
}

// ---------------------------------------------------------------------------
// Python boundary

namespace {

// A read-only view of a 1-D float64 or int64 input. `keep` owns whatever the
// pointer points into (the caller's array or tensor, or a converted copy).
template <typename T>
struct View {
  const T* ptr = nullptr;
  int64_t n = 0;
  py::object keep_array;
  at::Tensor keep_tensor;
  std::vector<T> owned;
};

template <typename T>
View<T> as_view(py::handle obj, const char* what, const char* arg) {
  constexpr bool is_index = std::is_same<T, int64_t>::value;
  View<T> v;
  if (THPVariable_Check(obj.ptr())) {
    at::Tensor t = THPVariable_Unpack(obj.ptr());
    if (!t.device().is_cpu())
      throw py::value_error(std::string(what) + ": `" + arg + "` must be a CPU tensor or a numpy array, got a tensor on " +
                            t.device().str());
    if (is_index && !(at::isIntegralType(t.scalar_type(), /*includeBool=*/false)))
      throw py::type_error(std::string(what) + ": `" + arg + "` must hold integers, got dtype " +
                           std::string(c10::toString(t.scalar_type())));
    const auto want = is_index ? at::kLong : at::kDouble;
    if (!is_index && t.scalar_type() == at::kFloat && t.is_contiguous()) {
      // float32 priorities (the usual TD errors): widen here, which is far
      // cheaper than a dispatched tensor conversion for a small batch.
      const float* src = t.const_data_ptr<float>();
      v.owned.assign(src, src + t.numel());
      v.ptr = v.owned.data();
      v.n = t.numel();
      return v;
    }
    if (t.scalar_type() != want || !t.is_contiguous()) t = t.to(want).contiguous();
    v.ptr = t.data_ptr<T>();
    v.n = t.numel();
    v.keep_tensor = t;
    return v;
  }
  py::array raw = py::array::ensure(obj);
  if (!raw) throw py::type_error(std::string(what) + ": `" + arg + "` must be a numpy array, a CPU tensor or a sequence of numbers");
  if (is_index) {
    const char kind = raw.dtype().kind();
    if (!(kind == 'i' || kind == 'u'))
      throw py::type_error(std::string(what) + ": `" + arg + "` must hold integers, got numpy dtype " +
                           std::string(py::str(raw.dtype())));
  }
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(raw);
  if (!a) throw py::type_error(std::string(what) + ": `" + arg + "` could not be converted");
  v.ptr = a.data();
  v.n = a.size();
  v.keep_array = a;
  return v;
}

void check_indices(const View<int64_t>& idx, int64_t high, const char* what, const char* bound = "capacity") {
  for (int64_t j = 0; j < idx.n; ++j) {
    if (idx.ptr[j] < 0 || idx.ptr[j] >= high)
      throw py::index_error(std::string(what) + ": index " + std::to_string(idx.ptr[j]) + " at position " +
                            std::to_string(j) + " is out of range for " + bound + " " + std::to_string(high));
  }
}

// The per-slot write counters of a buffer: two writable int64 numpy arrays of
// length capacity with the same stride (the buffers keep them as the two
// columns of one (capacity, 2) array, so that a slot's pair shares a line),
// or both None.
struct Counters {
  const int64_t* gen = nullptr;
  int64_t* sampled = nullptr;
  int64_t stride = 1;  // in elements
};

Counters counters(py::object gen, py::object sampled, int64_t capacity, const char* what) {
  if (gen.is_none() && sampled.is_none()) return {};
  auto as_arr = [&](py::object o, const char* arg) {
    if (!py::isinstance<py::array_t<int64_t>>(o))
      throw py::type_error(std::string(what) + ": `" + arg + "` must be an int64 numpy array");
    auto a = py::reinterpret_borrow<py::array>(o);
    if (a.ndim() != 1 || a.shape(0) != capacity || a.strides(0) <= 0 || a.strides(0) % 8 != 0 || !a.writeable())
      throw py::value_error(std::string(what) + ": `" + arg +
                            "` must be a writable (capacity,) array with a positive stride");
    return a;
  };
  auto g = as_arr(gen, "generation");
  auto s = as_arr(sampled, "sampled_generation");
  if (g.strides(0) != s.strides(0))
    throw py::value_error(std::string(what) + ": `generation` and `sampled_generation` must have the same stride");
  return {static_cast<const int64_t*>(g.data()), static_cast<int64_t*>(s.mutable_data()), g.strides(0) / 8};
}

void check_finite(const View<double>& v, const char* what, const char* arg, bool nonneg) {
  for (int64_t j = 0; j < v.n; ++j) {
    const double x = v.ptr[j];
    if (!std::isfinite(x) || (nonneg && x < 0.0))
      throw py::value_error(std::string(what) + ": `" + arg + "` must be finite" + (nonneg ? " and >= 0" : "") +
                            ", got " + std::to_string(x) + " at position " + std::to_string(j));
  }
}

}  // namespace

// dst row j = src row idx[j], rows of `bytes`. Fields are a few bytes: a
// memcpy call of a run-time size per field and row cost more than the data,
// so the usual sizes get copies of a compile-time size (plain moves).
template <int64_t S>
inline void copy_rows_fixed(char* dst, const char* src, const int64_t* idx, int64_t n, int64_t pitch) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * S, src + idx[j] * pitch, S);
}

void copy_rows(char* dst, const char* src, const int64_t* idx, int64_t n, int64_t pitch, int64_t bytes) {
  switch (bytes) {
    case 1: return copy_rows_fixed<1>(dst, src, idx, n, pitch);
    case 2: return copy_rows_fixed<2>(dst, src, idx, n, pitch);
    case 4: return copy_rows_fixed<4>(dst, src, idx, n, pitch);
    case 8: return copy_rows_fixed<8>(dst, src, idx, n, pitch);
    case 16: return copy_rows_fixed<16>(dst, src, idx, n, pitch);
    case 32: return copy_rows_fixed<32>(dst, src, idx, n, pitch);
    default:
      for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * bytes, src + idx[j] * pitch, static_cast<size_t>(bytes));
  }
}

// Rows `indices` of every CPU tensor in `storages`, as new contiguous tensors.
// A storage may be a strided view whose rows are contiguous (stride(0) is
// free), such as the fields of a buffer that packs each item into one byte
// row: the fields of a row then share its cache lines, which are prefetched
// for the whole batch before the copies, so one miss per row is paid instead
// of one per field, and they overlap. The checks and outputs come first (with
// the GIL), then the copies (without it).
struct Gather {
  std::vector<at::Tensor> out;
  std::vector<const char*> src;
  std::vector<int64_t> pitch, row;
  int64_t rows_available = std::numeric_limits<int64_t>::max();  // the shortest storage
};

Gather prepare_gather(const std::vector<at::Tensor>& storages, int64_t n, const char* what) {
  Gather g;
  const size_t nf = storages.size();
  g.src.resize(nf);
  g.pitch.resize(nf);
  g.row.resize(nf);
  g.out.reserve(nf);
  for (size_t f = 0; f < nf; ++f) {
    const auto& s = storages[f];
    if (!s.device().is_cpu() || s.dim() < 1)
      throw py::value_error(std::string(what) + ": every storage must be a CPU tensor with a leading dimension");
    int64_t expect = 1;  // the trailing dims must be contiguous within a row
    for (int64_t d = s.dim() - 1; d >= 1; --d) {
      if (s.size(d) != 1 && s.stride(d) != expect)
        throw py::value_error(std::string(what) + ": the rows of every storage must be contiguous");
      expect *= s.size(d);
    }
    g.rows_available = std::min(g.rows_available, s.size(0));
    auto sizes = s.sizes().vec();
    sizes[0] = n;
    g.out.push_back(at::empty(sizes, s.options().memory_format(at::MemoryFormat::Contiguous)));
    g.src[f] = static_cast<const char*>(s.const_data_ptr());
    g.pitch[f] = s.stride(0) * static_cast<int64_t>(s.element_size());
    g.row[f] = expect * static_cast<int64_t>(s.element_size());
  }
  return g;
}

void run_gather(Gather& g, const int64_t* idx, int64_t n) {
  const size_t nf = g.out.size();
  for (size_t f = 0; f < nf; ++f) {
    // fields of one packed row share lines: prefetching a line twice is cheap
    for (int64_t j = 0; j < n; ++j) __builtin_prefetch(g.src[f] + idx[j] * g.pitch[f]);
  }
  for (size_t f = 0; f < nf; ++f)
    copy_rows(static_cast<char*>(g.out[f].mutable_data_ptr()), g.src[f], idx, n, g.pitch[f], g.row[f]);
}

std::vector<at::Tensor> gather_rows(const std::vector<at::Tensor>& storages, py::handle indices) {
  const char* what = "gather_rows";
  auto idx = as_view<int64_t>(indices, what, "indices");
  Gather g = prepare_gather(storages, idx.n, what);
  if (!storages.empty()) check_indices(idx, g.rows_available, what, "storage length");
  {
    py::gil_scoped_release nogil;
    run_gather(g, idx.ptr, idx.n);
  }
  return g.out;
}

// [items[i] for i in indices] for a Python list: the list slots and then the
// objects (whose reference counts are written) are prefetched for the whole
// batch before any is touched, so their cache misses overlap instead of
// following one another as they do in an interpreted loop.
py::list take(py::list items, py::handle indices) {
  const char* what = "take";
  auto idx = as_view<int64_t>(indices, what, "indices");
  const int64_t n_items = static_cast<int64_t>(PyList_GET_SIZE(items.ptr()));
  check_indices(idx, n_items, what, "list length");
  PyObject** slots = reinterpret_cast<PyListObject*>(items.ptr())->ob_item;
  for (int64_t j = 0; j < idx.n; ++j) __builtin_prefetch(slots + idx.ptr[j]);
  for (int64_t j = 0; j < idx.n; ++j) __builtin_prefetch(slots[idx.ptr[j]], 1);
  py::list out(idx.n);
  for (int64_t j = 0; j < idx.n; ++j) {
    PyObject* o = slots[idx.ptr[j]];
    Py_INCREF(o);
    PyList_SET_ITEM(out.ptr(), j, o);
  }
  return out;
}

// A zero-filled CPU byte tensor for a buffer's random-access state (stored
// rows, per-slot counters). Its pages are marked for transparent huge pages
// before the zeros first touch them: a sample touches a few hundred random
// lines, and with 4 KiB pages nearly each is also a TLB miss whose page walk
// delays it further.
at::Tensor zeros_hugepages(int64_t nbytes) {
  if (nbytes < 0) throw py::value_error("zeros_hugepages: `nbytes` must be >= 0, got " + std::to_string(nbytes));
  at::Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  neuralmem::advise_hugepages(out.data_ptr(), static_cast<size_t>(nbytes));
  out.zero_();
  return out;
}

void bind(py::module_& m) {
  m.def("zeros_hugepages", &zeros_hugepages, py::arg("nbytes"),
        "A zero-filled uint8 CPU tensor of `nbytes`, on transparent huge pages where the system offers them.");
  m.def("take", &take, py::arg("items"), py::arg("indices"),
        "[items[i] for i in indices] for a list, with the memory accesses of the batch overlapped.");
  m.def("gather_rows", &gather_rows, py::arg("storages"), py::arg("indices"),
        "Rows `indices` of each contiguous CPU tensor in `storages`, as new tensors (a fast index_select).");
  py::class_<SumTree>(m, "SumTree", R"doc(
Sum tree over `capacity` float64 leaves (all 0 at first), with a min tree of
the positive leaves. Batch calls take numpy arrays, CPU tensors or sequences,
release the GIL and hold the tree's mutex, so threads may use one tree at once.
)doc")
      .def(py::init<int64_t>(), py::arg("capacity"))
      .def_property_readonly("capacity", &SumTree::capacity)
      .def(
          "update",
          [](SumTree& t, py::handle indices, py::handle values) {
            auto idx = as_view<int64_t>(indices, "SumTree.update", "indices");
            auto val = as_view<double>(values, "SumTree.update", "values");
            if (idx.n != val.n)
              throw py::value_error("SumTree.update: `indices` and `values` must have the same length, got " +
                                    std::to_string(idx.n) + " and " + std::to_string(val.n));
            py::gil_scoped_release nogil;
            check_indices(idx, t.capacity(), "SumTree.update");
            check_finite(val, "SumTree.update", "values", /*nonneg=*/true);
            t.update(idx.ptr, val.ptr, idx.n);
          },
          py::arg("indices"), py::arg("values"),
          "Sets leaves[indices] = values (finite, >= 0); for a repeated index the last value wins.")
      .def(
          "find",
          [](SumTree& t, py::handle masses) {
            auto ms = as_view<double>(masses, "SumTree.find", "masses");
            py::array_t<int64_t> out(ms.n);
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              check_finite(ms, "SumTree.find", "masses", /*nonneg=*/false);
              t.find(ms.ptr, o, ms.n, false, nullptr, nullptr, nullptr);
            }
            return out;
          },
          py::arg("masses"),
          "For each mass, the leaf i with prefix(i) <= mass < prefix(i+1); always a leaf of positive value.")
      .def(
          "sample_rows",
          [](SumTree& t, py::handle fractions, double beta, bool stratified, py::object generation,
             py::object sampled_generation, const std::vector<at::Tensor>& storages) {
            const char* what = "SumTree.sample_rows";
            auto fr = as_view<double>(fractions, what, "fractions");
            if (!std::isfinite(beta) || beta < 0) throw py::value_error(std::string(what) + ": `beta` must be finite and >= 0");
            auto gens = counters(generation, sampled_generation, t.capacity(), what);
            Gather g = prepare_gather(storages, fr.n, what);
            if (!storages.empty() && g.rows_available < t.capacity())
              throw py::value_error(std::string(what) + ": every storage must hold `capacity` rows");
            at::Tensor idx = at::empty({fr.n}, at::TensorOptions().dtype(at::kLong));
            at::Tensor w = at::empty({fr.n}, at::TensorOptions().dtype(at::kFloat));
            {
              py::gil_scoped_release nogil;
              check_finite(fr, what, "fractions", /*nonneg=*/false);
              int64_t* ip = idx.data_ptr<int64_t>();
              t.sample_weighted(fr.ptr, fr.n, stratified, beta, ip, w.data_ptr<float>(), gens.gen, gens.sampled,
                                gens.stride);
              run_gather(g, ip, fr.n);
            }
            return py::make_tuple(idx, w, g.out);
          },
          py::arg("fractions"), py::arg("beta"), py::arg("stratified"), py::arg("generation"),
          py::arg("sampled_generation"), py::arg("storages"),
          "sample_weighted and gather_rows of the drawn slots in one call, returning tensors: "
          "(indices int64, weights float32, the rows of each storage).")
      .def(
          "sample_distinct",
          [](SumTree& t, py::handle fractions, double beta, py::object generation, py::object sampled_generation) {
            const char* what = "SumTree.sample_distinct";
            auto fr = as_view<double>(fractions, what, "fractions");
            if (!std::isfinite(beta) || beta < 0) throw py::value_error(std::string(what) + ": `beta` must be finite and >= 0");
            auto gens = counters(generation, sampled_generation, t.capacity(), what);
            std::vector<int64_t> idx(static_cast<size_t>(fr.n));
            std::vector<double> val(static_cast<size_t>(fr.n));
            int64_t k = 0;
            py::array_t<float> w(fr.n);
            float* wp = w.mutable_data();
            {
              py::gil_scoped_release nogil;
              check_finite(fr, what, "fractions", /*nonneg=*/false);
              k = t.sample_distinct(fr.ptr, fr.n, idx.data(), val.data());
              if (k == fr.n && k > 0) {
                // (N P(i))^-beta over its batch maximum, the smallest value's.
                double mn = val[0];
                for (int64_t j = 1; j < k; ++j) mn = val[j] < mn ? val[j] : mn;
                // float pow, as sample_weighted: the weights are float32 anyway.
                for (int64_t j = 0; j < k; ++j) wp[j] = static_cast<float>(val[j] / mn);
                neuralmem::replay::powf_inplace(wp, k, static_cast<float>(-beta));
                if (gens.sampled) {
                  constexpr int64_t kAhead = 16;  // one random line per slot: overlap the misses
                  const int64_t s = gens.stride;
                  for (int64_t j = 0; j < k; ++j) {
                    if (j + kAhead < k) __builtin_prefetch(gens.sampled + idx[j + kAhead] * s, 1);
                    gens.sampled[idx[j] * s] = gens.gen[idx[j] * s];
                  }
                }
              }
            }
            py::array_t<int64_t> idx_a(k);
            py::array_t<double> val_a(k);
            std::memcpy(idx_a.mutable_data(), idx.data(), static_cast<size_t>(k) * sizeof(int64_t));
            std::memcpy(val_a.mutable_data(), val.data(), static_cast<size_t>(k) * sizeof(double));
            return py::make_tuple(idx_a, val_a, k == fr.n && k > 0 ? py::object(w) : py::object(py::none()));
          },
          py::arg("fractions"), py::arg("beta"), py::arg("generation") = py::none(),
          py::arg("sampled_generation") = py::none(),
          R"doc(Draws len(fractions) leaves with replacement (mass u_j * total) and keeps
the first occurrence of each, in order: successive sampling without
replacement, by rejection. Returns (indices, leaf values, weights): when every
draw was distinct, weights are (value / smallest value)^-beta as float32 and
sampled_generation[i] = generation[i] for every drawn i (when given);
otherwise weights is None and the counters are untouched, for the caller to
complete the batch.)doc")
      .def(
          "sample",
          [](SumTree& t, py::handle fractions) {
            auto fr = as_view<double>(fractions, "SumTree.sample", "fractions");
            py::array_t<int64_t> out(fr.n);
            py::array_t<double> vals(fr.n);
            int64_t* o = out.mutable_data();
            double* v = vals.mutable_data();
            double total = 0.0, mn = 0.0;
            {
              py::gil_scoped_release nogil;
              check_finite(fr, "SumTree.sample", "fractions", /*nonneg=*/false);
              t.find(fr.ptr, o, fr.n, true, &total, &mn, v);
            }
            return py::make_tuple(out, vals, total, mn);
          },
          py::arg("fractions"),
          "find(fractions * total()) read under one lock: returns (indices, leaf values, total, min).")
      .def(
          "sample_weighted",
          [](SumTree& t, py::handle fractions, double beta, bool stratified, py::object generation,
             py::object sampled_generation) {
            const char* what = "SumTree.sample_weighted";
            auto fr = as_view<double>(fractions, what, "fractions");
            if (!std::isfinite(beta) || beta < 0) throw py::value_error(std::string(what) + ": `beta` must be finite and >= 0");
            auto gens = counters(generation, sampled_generation, t.capacity(), what);
            py::array_t<int64_t> out(fr.n);
            py::array_t<float> w(fr.n);
            int64_t* o = out.mutable_data();
            float* wp = w.mutable_data();
            {
              py::gil_scoped_release nogil;
              check_finite(fr, what, "fractions", /*nonneg=*/false);
              t.sample_weighted(fr.ptr, fr.n, stratified, beta, o, wp, gens.gen, gens.sampled, gens.stride);
            }
            return py::make_tuple(out, w);
          },
          py::arg("fractions"), py::arg("beta"), py::arg("stratified") = false, py::arg("generation") = py::none(),
          py::arg("sampled_generation") = py::none(),
          R"doc(Draws for a replay buffer, in one locked pass: leaf i for mass u_j * total
(stratified: (j + u_j) / n * total) and its importance weight
(leaf_i / min())^-beta as float32, which is (N P(i))^-beta divided by the
largest possible weight. When the two int64 arrays are given,
sampled_generation[i] = generation[i] for every drawn i. Returns (indices, weights).)doc")
      .def(
          "update_priorities",
          [](SumTree& t, py::handle indices, py::handle priorities, double alpha, double eps, int64_t limit,
             py::object generation, py::object sampled_generation, py::object max_priority) {
            const char* what = "update_priorities";
            auto idx = as_view<int64_t>(indices, what, "indices");
            auto pr = as_view<double>(priorities, what, "priorities");
            if (idx.n != pr.n)
              throw py::value_error(std::string(what) + ": `indices` and `priorities` must have the same length, got " +
                                    std::to_string(idx.n) + " and " + std::to_string(pr.n));
            if (limit < 0 || limit > t.capacity()) limit = t.capacity();
            auto gens = counters(generation, sampled_generation, t.capacity(), what);
            double* running_max = nullptr;
            if (!max_priority.is_none()) {
              if (!py::isinstance<py::array_t<double>>(max_priority))
                throw py::type_error(std::string(what) + ": `max_priority` must be a float64 numpy array");
              auto a = py::reinterpret_borrow<py::array>(max_priority);
              if (a.size() < 1 || !a.writeable())
                throw py::value_error(std::string(what) + ": `max_priority` must be a writable array of one element");
              running_max = static_cast<double*>(a.mutable_data());
            }
            double mx = 0.0;
            int64_t applied = 0;
            {
              py::gil_scoped_release nogil;
              check_indices(idx, limit, what, "buffer length");
              check_finite(pr, what, "priorities", /*nonneg=*/true);
              applied = t.update_priorities(idx.ptr, pr.ptr, idx.n, alpha, eps, gens.gen, gens.sampled, gens.stride, &mx);
            }
            if (running_max && applied > 0 && mx > *running_max) *running_max = mx;
            return applied;
          },
          py::arg("indices"), py::arg("priorities"), py::arg("alpha"), py::arg("eps"), py::arg("limit"),
          py::arg("generation") = py::none(), py::arg("sampled_generation") = py::none(),
          py::arg("max_priority") = py::none(),
          R"doc(The replay buffers' priority update: checks indices < limit and priorities
finite and >= 0, skips every i with sampled_generation[i] >= 0 and !=
generation[i] (rewritten since last sampled), and sets the rest to
(priority + eps) ** alpha, last write winning. Returns how many were applied;
max_priority (a float64 array of one element), when given, is raised to the
largest applied priority.)doc")
      .def(
          "sample_without_replacement",
          [](SumTree& t, py::handle fractions, py::object exclude) {
            const char* what = "SumTree.sample_without_replacement";
            auto fr = as_view<double>(fractions, what, "fractions");
            View<int64_t> ex;
            if (!exclude.is_none()) ex = as_view<int64_t>(exclude, what, "exclude");
            py::array_t<int64_t> out(fr.n);
            py::array_t<double> vals(fr.n);
            int64_t* o = out.mutable_data();
            double* v = vals.mutable_data();
            int64_t k = 0;
            {
              py::gil_scoped_release nogil;
              check_finite(fr, what, "fractions", /*nonneg=*/false);
              check_indices(ex, t.capacity(), what);
              k = t.find_without_replacement(fr.ptr, o, v, fr.n, ex.ptr, ex.n);
            }
            if (k < fr.n)
              throw py::value_error(std::string(what) + ": asked for " + std::to_string(fr.n) +
                                    " distinct leaves but only " + std::to_string(k) +
                                    " (not excluded) have a positive value");
            return py::make_tuple(out, vals);
          },
          py::arg("fractions"), py::arg("exclude") = py::none(),
          "Successive draws without replacement among the leaves not in `exclude` (draw k takes fraction k "
          "of the mass left after removing the earlier draws); returns (indices, leaf values). The tree is "
          "unchanged afterwards.")
      .def(
          "get",
          [](SumTree& t, py::handle indices) {
            auto idx = as_view<int64_t>(indices, "SumTree.get", "indices");
            py::array_t<double> out(idx.n);
            double* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              check_indices(idx, t.capacity(), "SumTree.get");
              t.get(idx.ptr, o, idx.n);
            }
            return out;
          },
          py::arg("indices"), "leaves[indices]")
      .def(
          "leaves",
          [](SumTree& t) {
            py::array_t<double> out(t.capacity());
            double* o = out.mutable_data();
            py::gil_scoped_release nogil;
            t.leaves(o);
            return out;
          },
          "A copy of all `capacity` leaves.")
      .def(
          "assign",
          [](SumTree& t, py::handle values) {
            auto val = as_view<double>(values, "SumTree.assign", "values");
            if (val.n != t.capacity())
              throw py::value_error("SumTree.assign: `values` must have length capacity=" +
                                    std::to_string(t.capacity()) + ", got " + std::to_string(val.n));
            py::gil_scoped_release nogil;
            check_finite(val, "SumTree.assign", "values", /*nonneg=*/true);
            t.assign(val.ptr);
          },
          py::arg("values"), "Replaces all leaves at once and rebuilds the tree (O(capacity)).")
      .def(
          "total", [](SumTree& t) { return t.total(); }, "Sum of all leaves.")
      .def(
          "min", [](SumTree& t) { return t.min(); }, "Smallest positive leaf; inf when none is positive.")
      .def("__len__", &SumTree::capacity);
}

}  // namespace replay
}  // namespace neuralmem

// Sum tree for prioritized replay: the tree itself and its pybind11 class.
// The design (layout, level-by-level batches, locking) is described in
// sum_tree.h. This file adds the Python boundary: inputs may be numpy arrays,
// CPU tensors, lists or scalars; a contiguous float64 (values) or int64
// (indices) array or tensor is read in place, anything else is converted
// once. Outputs are new numpy arrays. Every input is checked before the tree
// is touched, so a rejected call changes nothing.
#include "replay/sum_tree.h"

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

inline Node combine(const Node& a, const Node& b) {
  return Node{a.sum + b.sum, a.min < b.min ? a.min : b.min};
}

inline Node leaf(double v) { return Node{v, v > 0.0 ? v : kInf}; }
}  // namespace

SumTree::SumTree(int64_t capacity) : capacity_(capacity), size_(1), depth_(0) {
  if (capacity < 1) throw py::value_error("SumTree: capacity must be >= 1, got " + std::to_string(capacity));
  while (size_ < capacity) {
    size_ <<= 1;
    ++depth_;
  }
  // 64-byte aligned, so that the two children of a node share a cache line.
  // Large trees sit on 2 MiB-aligned memory marked for transparent huge
  // pages: a random descent touches one node per level, and with 4 KiB pages
  // every such miss is also a TLB miss whose page walk would serialise them.
  const size_t bytes = static_cast<size_t>(2 * size_) * sizeof(Node);
  const size_t align = bytes >= (size_t{2} << 20) ? (size_t{2} << 20) : size_t{64};
  void* mem = nullptr;
  if (posix_memalign(&mem, align, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align > 64) madvise(mem, bytes, MADV_HUGEPAGE);
#endif
  storage_.reset(static_cast<Node*>(mem));
  nodes_ = storage_.get();
  std::fill(nodes_, nodes_ + 2 * size_, Node{0.0, kInf});
}

void SumTree::rebuild_locked() {
  for (int64_t i = size_ - 1; i >= 1; --i) nodes_[i] = combine(nodes_[2 * i], nodes_[2 * i + 1]);
}

void SumTree::set_leaf_locked(int64_t i, double v) {
  int64_t node = size_ + i;
  nodes_[node] = leaf(v);
  for (node >>= 1; node >= 1; node >>= 1) nodes_[node] = combine(nodes_[2 * node], nodes_[2 * node + 1]);
}

// One step of the descent is shared by every search: go left when the mass
// falls strictly inside the left subtree, or when the right subtree is empty;
// otherwise go right. Entering only subtrees of positive sum means the leaf
// reached always has a positive value and lies before `capacity`, whatever
// the mass (a mass equal to the total, or beyond it by rounding, ends on the
// last positive leaf; a mass equal to a prefix boundary starts the next
// positive leaf, i.e. leaf i owns the half-open interval [P_i, P_i+1)).
int64_t SumTree::descend_one(double m) const {
  int64_t i = 1;
  while (i < size_) {
    const double l = nodes_[2 * i].sum;
    const double r = nodes_[2 * i + 1].sum;
    if (l > 0.0 && (m < l || !(r > 0.0))) {
      i = 2 * i;
    } else {
      m -= l;
      i = 2 * i + 1;
    }
  }
  return i - size_;
}

void SumTree::update(const int64_t* idx, const double* val, int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  update_locked(idx, val, n);
}

void SumTree::update_locked(const int64_t* idx, const double* val, int64_t n) {
  for (int64_t j = 0; j < n; ++j) nodes_[size_ + idx[j]] = leaf(val[j]);
  for (int level = 1; level <= depth_; ++level) {
    int64_t prev = -1;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = (size_ + idx[j]) >> level;
      if (p == prev) continue;  // sorted or clustered batches share parents
      nodes_[p] = combine(nodes_[2 * p], nodes_[2 * p + 1]);
      prev = p;
    }
  }
}

// Descends every query of the batch one level at a time; `m` holds the masses
// and is consumed, `out` holds the current node of each query meanwhile.
void SumTree::find_locked(double* m, int64_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = 1;
  // Branch-free on purpose: the direction depends on a value that is usually
  // a cache miss, and a mispredicted branch would wait for it and serialise
  // the misses of the whole batch instead of overlapping them.
  for (int level = 0; level < depth_; ++level) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = out[j];
      const double l = nodes_[2 * i].sum;
      const double r = nodes_[2 * i + 1].sum;
      const int64_t right = !((l > 0.0) & ((m[j] < l) | !(r > 0.0)));
      m[j] -= right ? l : 0.0;
      out[j] = 2 * i + right;
    }
  }
}

void SumTree::find(const double* mass, int64_t* out, int64_t n, bool fractions, double* total_out,
                   double* min_out, double* values_out) {
  std::lock_guard<std::mutex> g(mu_);
  const double total = nodes_[1].sum;
  if (!(total > 0.0)) throw py::value_error("SumTree.find: the tree is empty (total is 0); nothing can be sampled");
  std::vector<double> m(mass, mass + n);
  if (fractions)
    for (int64_t j = 0; j < n; ++j) m[j] *= total;
  find_locked(m.data(), out, n);
  for (int64_t j = 0; j < n; ++j) {
    if (values_out) values_out[j] = nodes_[out[j]].sum;
    out[j] -= size_;
  }
  if (total_out) *total_out = total;
  if (min_out) *min_out = nodes_[1].min;
}

void SumTree::sample_weighted(const double* frac, int64_t n, bool stratified, double beta, int64_t* idx_out,
                              float* w_out, const int64_t* gen, int64_t* sampled_gen) {
  std::lock_guard<std::mutex> g(mu_);
  const double total = nodes_[1].sum;
  if (!(total > 0.0))
    throw py::value_error("SumTree.sample_weighted: the tree is empty (total is 0); nothing can be sampled");
  std::vector<double> m(frac, frac + n);
  for (int64_t j = 0; j < n; ++j) m[j] = (stratified ? (static_cast<double>(j) + m[j]) / static_cast<double>(n) : m[j]) * total;
  find_locked(m.data(), idx_out, n);
  // (N p_i / T)^-beta over the largest possible weight (N p_min / T)^-beta.
  const double mn = nodes_[1].min;
  for (int64_t j = 0; j < n; ++j) {
    const double v = nodes_[idx_out[j]].sum;
    idx_out[j] -= size_;
    w_out[j] = static_cast<float>(std::pow(v / mn, -beta));
    if (sampled_gen) sampled_gen[idx_out[j]] = gen[idx_out[j]];
  }
}

int64_t SumTree::update_priorities(const int64_t* idx, const double* prio, int64_t n, double alpha, double eps,
                                   const int64_t* gen, const int64_t* sampled_gen, double* max_out) {
  std::vector<int64_t> keep_idx;
  std::vector<double> keep_val;
  keep_idx.reserve(n);
  keep_val.reserve(n);
  double mx = -kInf;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = idx[j];
    // A slot rewritten since it was last sampled holds another item now.
    if (sampled_gen && sampled_gen[i] >= 0 && sampled_gen[i] != gen[i]) continue;
    keep_idx.push_back(i);
    keep_val.push_back(std::pow(prio[j] + eps, alpha));
    if (prio[j] > mx) mx = prio[j];
  }
  std::lock_guard<std::mutex> g(mu_);
  update_locked(keep_idx.data(), keep_val.data(), static_cast<int64_t>(keep_idx.size()));
  if (max_out) *max_out = mx;
  return static_cast<int64_t>(keep_idx.size());
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
    saved[j] = nodes_[size_ + exclude[j]].sum;
    set_leaf_locked(exclude[j], 0.0);
  }
  int64_t k = 0;
  for (; k < n; ++k) {
    const double total = nodes_[1].sum;
    if (!(total > 0.0)) break;
    const int64_t i = descend_one(frac[k] * total);
    out[k] = i;
    values_out[k] = nodes_[size_ + i].sum;
    set_leaf_locked(i, 0.0);
  }
  for (int64_t j = k - 1; j >= 0; --j) set_leaf_locked(out[j], values_out[j]);
  for (int64_t j = n_exclude - 1; j >= 0; --j) set_leaf_locked(exclude[j], saved[j]);
  return k;
}

void SumTree::get(const int64_t* idx, double* out, int64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < n; ++j) out[j] = nodes_[size_ + idx[j]].sum;
}

void SumTree::leaves(double* out) {
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < capacity_; ++j) out[j] = nodes_[size_ + j].sum;
}

void SumTree::assign(const double* val) {
  std::lock_guard<std::mutex> g(mu_);
  for (int64_t j = 0; j < capacity_; ++j) nodes_[size_ + j] = leaf(val[j]);
  rebuild_locked();
}

double SumTree::total() {
  std::lock_guard<std::mutex> g(mu_);
  return nodes_[1].sum;
}

double SumTree::min() {
  std::lock_guard<std::mutex> g(mu_);
  return nodes_[1].min;
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

// The per-slot write counters of a buffer: two writable, contiguous int64
// numpy arrays of length capacity, or both None.
std::pair<const int64_t*, int64_t*> counters(py::object gen, py::object sampled, int64_t capacity, const char* what) {
  if (gen.is_none() && sampled.is_none()) return {nullptr, nullptr};
  auto as_arr = [&](py::object o, const char* arg) {
    if (!py::isinstance<py::array_t<int64_t>>(o))
      throw py::type_error(std::string(what) + ": `" + arg + "` must be an int64 numpy array");
    auto a = py::reinterpret_borrow<py::array_t<int64_t>>(o);
    if (a.ndim() != 1 || a.shape(0) != capacity || !(a.flags() & py::array::c_style) || !a.writeable())
      throw py::value_error(std::string(what) + ": `" + arg + "` must be a writable contiguous (capacity,) array");
    return a;
  };
  auto g = as_arr(gen, "generation");
  auto s = as_arr(sampled, "sampled_generation");
  return {g.data(), s.mutable_data()};
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

// Rows `indices` of every CPU tensor in `storages`, as new contiguous tensors:
// one memcpy per row and field with the GIL released, instead of one
// index_select dispatch per field.
std::vector<at::Tensor> gather_rows(const std::vector<at::Tensor>& storages, py::handle indices) {
  const char* what = "gather_rows";
  auto idx = as_view<int64_t>(indices, what, "indices");
  std::vector<at::Tensor> out;
  out.reserve(storages.size());
  for (const auto& s : storages) {
    if (!s.device().is_cpu() || !s.is_contiguous() || s.dim() < 1)
      throw py::value_error(std::string(what) + ": every storage must be a contiguous CPU tensor with a leading dimension");
    check_indices(idx, s.size(0), what, "storage length");
    auto sizes = s.sizes().vec();
    sizes[0] = idx.n;
    out.push_back(at::empty(sizes, s.options()));
  }
  {
    py::gil_scoped_release nogil;
    // Issue every row's load first so that the misses overlap.
    for (size_t f = 0; f < storages.size(); ++f) {
      const auto& s = storages[f];
      const int64_t row = s.numel() / std::max<int64_t>(s.size(0), 1) * static_cast<int64_t>(s.element_size());
      const char* src = static_cast<const char*>(s.const_data_ptr());
      for (int64_t j = 0; j < idx.n; ++j) __builtin_prefetch(src + idx.ptr[j] * row);
    }
    for (size_t f = 0; f < storages.size(); ++f) {
      const auto& s = storages[f];
      const int64_t row = s.numel() / std::max<int64_t>(s.size(0), 1) * static_cast<int64_t>(s.element_size());
      const char* src = static_cast<const char*>(s.const_data_ptr());
      char* dst = static_cast<char*>(out[f].mutable_data_ptr());
      for (int64_t j = 0; j < idx.n; ++j) std::memcpy(dst + j * row, src + idx.ptr[j] * row, static_cast<size_t>(row));
    }
  }
  return out;
}

void bind(py::module_& m) {
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
              t.sample_weighted(fr.ptr, fr.n, stratified, beta, o, wp, gens.first, gens.second);
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
             py::object generation, py::object sampled_generation) {
            const char* what = "update_priorities";
            auto idx = as_view<int64_t>(indices, what, "indices");
            auto pr = as_view<double>(priorities, what, "priorities");
            if (idx.n != pr.n)
              throw py::value_error(std::string(what) + ": `indices` and `priorities` must have the same length, got " +
                                    std::to_string(idx.n) + " and " + std::to_string(pr.n));
            if (limit < 0 || limit > t.capacity()) limit = t.capacity();
            auto gens = counters(generation, sampled_generation, t.capacity(), what);
            double mx = 0.0;
            int64_t applied = 0;
            {
              py::gil_scoped_release nogil;
              check_indices(idx, limit, what, "buffer length");
              check_finite(pr, what, "priorities", /*nonneg=*/true);
              applied = t.update_priorities(idx.ptr, pr.ptr, idx.n, alpha, eps, gens.first, gens.second, &mx);
            }
            return py::make_tuple(applied, mx);
          },
          py::arg("indices"), py::arg("priorities"), py::arg("alpha"), py::arg("eps"), py::arg("limit"),
          py::arg("generation") = py::none(), py::arg("sampled_generation") = py::none(),
          R"doc(The replay buffers' priority update: checks indices < limit and priorities
finite and >= 0, skips every i with sampled_generation[i] >= 0 and !=
generation[i] (rewritten since last sampled), and sets the rest to
(priority + eps) ** alpha, last write winning. Returns (applied, largest
applied priority, or -inf when none).)doc")
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

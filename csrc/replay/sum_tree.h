// Sum tree (with a min tree alongside) for prioritized replay.
//
// Layout: a complete tree of fan-out K = 8 stored level by level, one aligned
// array per level (sums) plus one of the same shape per inner level (mins; a
// leaf's min would only repeat it, so the last inner level computes its mins
// from the leaves). The K children of a node are adjacent and fill exactly
// one 64-byte cache line, so a descent over a million leaves reads 7 lines
// instead of the 20 levels of a binary heap, and an update recomputes 7
// parents. Leaves past `capacity` hold 0, and a leaf of value 0 counts as
// +inf for the min, so min() is the smallest *positive* leaf, the one that
// bounds the largest importance weight of anything that can be sampled.
//
// Every parent is recomputed from its K children, added pairwise in a fixed
// order (never patched by a delta), so the sums carry no accumulated rounding
// error: the tree is a pure function of its leaves, bit for bit.
//
// Batch operations run level by level across the whole batch: all leaves are
// written first (in order, so the last write to a duplicate index wins), then
// every affected parent one level up, and so on to the root. find() descends
// the same way, one level for the whole batch at a time; its inner loop walks
// independent nodes without branches, so the CPU overlaps their cache misses
// instead of chasing one root-to-leaf path at a time. Both inner loops are
// entries of the CPU kernel table (cpu/kernel_table.h), compiled per
// instruction set: with AVX-512 a node's children are one vector load, and
// the descent picks the children of 8 queries at once. Every build gives the
// same bits.
//
// Threads: the GIL is released for the work of every batch call, and one
// mutex serialises access to the nodes, so Python threads may add, sample and
// update at once. Inputs are validated completely before the first node is
// written: a bad call leaves the tree as it was.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace neuralmem {
namespace replay {

class SumTree {
 public:
  static constexpr int64_t kFanout = 8;

  explicit SumTree(int64_t capacity);

  int64_t capacity() const { return capacity_; }

  // Raw-pointer cores; callers validate inputs and hold no GIL.
  void update(const int64_t* idx, const double* val, int64_t n);
  void find(const double* mass, int64_t* out, int64_t n, bool fractions, double* total_out,
            double* min_out, double* values_out);
  int64_t find_without_replacement(const double* frac, int64_t* out, double* values_out, int64_t n,
                                  const int64_t* exclude, int64_t n_exclude);
  // Draws n leaves with replacement (mass frac_j * total) and keeps the first
  // occurrence of each, in draw order; returns how many were kept.
  int64_t sample_distinct(const double* frac, int64_t n, int64_t* idx_out, double* val_out);
  void get(const int64_t* idx, double* out, int64_t n);
  // The replay buffers' cores (see the bound methods of the same names).
  void sample_weighted(const double* frac, int64_t n, bool stratified, double beta, int64_t* idx_out,
                       float* w_out, const int64_t* gen, int64_t* sampled_gen, int64_t gen_stride);
  int64_t update_priorities(const int64_t* idx, const double* prio, int64_t n, double alpha, double eps,
                            const int64_t* gen, const int64_t* sampled_gen, int64_t gen_stride, double* max_out);
  void leaves(double* out);
  void assign(const double* val);
  double total();
  double min();

 private:
  void rebuild_locked();
  void level_locked(int d, const int64_t* parents, int64_t n, int shift, bool whole);
  void update_locked(const int64_t* idx, const double* val, int64_t n);
  void find_locked(double* m, int64_t* out, int64_t n);
  int64_t descend_one(double mass) const;
  void set_leaf_locked(int64_t i, double v);

  struct FreeDeleter {
    void operator()(double* p) const { std::free(p); }
  };
  using Level = std::unique_ptr<double[], FreeDeleter>;

  int64_t capacity_;
  int depth_;                  // leaves are level depth_, the root level 0
  std::vector<Level> sums_;    // sums_[d] has width_[d] = K^d entries
  std::vector<Level> mins_;    // inner levels only (all levels when depth_ is 0)
  std::vector<int64_t> width_;
  std::vector<const double*> child_levels_;  // sums_[1..depth_], for the descent
  std::mutex mu_;
};

// Adds the SumTree class to the module.
void bind(pybind11::module_& m);

}  // namespace replay
}  // namespace neuralmem

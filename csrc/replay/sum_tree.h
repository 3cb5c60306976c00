// Sum tree (with a min tree alongside) for prioritized replay.
//
// Layout: an implicit binary heap over `size_` = next power of two >= capacity
// leaves; node 1 is the root, the children of node i are 2i and 2i+1, leaf j
// is node size_ + j. Each node holds {sum, min} side by side, so recomputing
// a parent reads one 32-byte pair of children and both trees share the cache
// misses. Padding leaves (j >= capacity) hold sum 0 and min +inf; a leaf of
// value 0 also holds min +inf, so min() is the smallest *positive* leaf, the
// one that bounds the largest importance weight of anything that can be
// sampled.
//
// Every parent is recomputed from its two children (never patched by a
// delta), so the sums carry no accumulated rounding error: the tree is a
// pure function of its leaves, bit for bit.
//
// Batch operations run level by level across the whole batch: all leaves are
// written first (in order, so the last write to a duplicate index wins), then
// every affected parent of level 1, then level 2, ... The inner loop walks
// independent nodes, so the CPU overlaps their cache misses instead of
// chasing one root-to-leaf path at a time. find() descends the same way.
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

struct Node {
  double sum;
  double min;
};

class SumTree {
 public:
  explicit SumTree(int64_t capacity);

  int64_t capacity() const { return capacity_; }

  // Raw-pointer cores; callers validate inputs and hold no GIL.
  void update(const int64_t* idx, const double* val, int64_t n);
  void find(const double* mass, int64_t* out, int64_t n, bool fractions, double* total_out,
            double* min_out, double* values_out);
  int64_t find_without_replacement(const double* frac, int64_t* out, double* values_out, int64_t n,
                                  const int64_t* exclude, int64_t n_exclude);
  void get(const int64_t* idx, double* out, int64_t n);
  // The replay buffers' cores (see the bound methods of the same names).
  void sample_weighted(const double* frac, int64_t n, bool stratified, double beta, int64_t* idx_out,
                       float* w_out, const int64_t* gen, int64_t* sampled_gen);
  int64_t update_priorities(const int64_t* idx, const double* prio, int64_t n, double alpha, double eps,
                            const int64_t* gen, const int64_t* sampled_gen, double* max_out);
  void leaves(double* out);
  void assign(const double* val);
  double total();
  double min();

 private:
  void rebuild_locked();
  void update_locked(const int64_t* idx, const double* val, int64_t n);
  void find_locked(double* m, int64_t* out, int64_t n);
  int64_t descend_one(double mass) const;
  void set_leaf_locked(int64_t i, double v);

  int64_t capacity_;
  int64_t size_;
  int depth_;
  struct FreeDeleter {
    void operator()(Node* p) const { std::free(p); }
  };
  std::unique_ptr<Node[], FreeDeleter> storage_;  // 2 * size_ nodes, see the constructor
  Node* nodes_;
  std::mutex mu_;
};

// Adds the SumTree class to the module.
void bind(pybind11::module_& m);

}  // namespace replay
}  // namespace neuralmem

// Large CPU outputs of the memory ops (the memory's gradient, a written
// copy) from a small pool of blocks that stay resident between calls.
//
// A training step at N = 10^5 (D = 64: 25.6 MB per buffer) allocates three
// or four buffers of the memory's size and frees them when the step ends.
// glibc hands such blocks back to the kernel (munmap, or a trim of the heap
// top), so the next step faults every page in again, zero-filled by the
// kernel; in regions advised for transparent huge pages, with the kernel's
// defrag set to "madvise", each fault may also compact memory synchronously.
// Measured here: steps of 30 ms next to steps of 300 ms, the slow ones with
// ~1300 page faults and 180 ms of system time. The pool keeps the freed
// blocks mapped and hands them out again for a request of the same size:
// no fault, no zero-fill (the kernels write every element of their outputs).
//
// At most kMaxIdle blocks and NEURALMEM_CPU_POOL_MB megabytes (default 1024;
// 0 disables the pool) are kept idle, or the newest block alone when it is
// larger; the oldest idle block goes first.
//
// Blocks from kMinBytes (1 MB) up to kLargeBytes (8 MB) are pooled too, in a
// class of their own: at most kMaxSmallIdle of them and kMaxSmallIdleBytes in
// all. glibc maps and trims blocks of that size as well (its mmap threshold
// grows to 32 MB at most): at B = 16, N = 1,024, D = 64 (4 MB per buffer)
// content_addressing_backward at 4 heads took 19x a memory.sum() pass with
// fresh pages and 6x with glibc told to keep them, and a MemoryCore training
// step faulted 6,800 pages. A recurrent step keeps one output per time step
// for the backward (T of them) and frees them together, hence more idle
// blocks of this class than of the large one.
// The default holds a training step's four memory-sized buffers up to
// N = 10^6 at D = 64 (256 MB each), and counts in the process's RSS.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

#include <ATen/ATen.h>

#include "common/hugepages.h"

namespace neuralmem {
namespace cpu {

class BufferPool {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;   // smaller blocks: malloc keeps them
  static constexpr size_t kLargeBytes = size_t{8} << 20;
  static constexpr size_t kAlign = size_t{2} << 20;      // whole huge pages
  static constexpr size_t kMaxIdle = 4;                  // blocks of kLargeBytes and more
  static constexpr size_t kMaxSmallIdle = 32;            // blocks below kLargeBytes
  static constexpr size_t kMaxSmallIdleBytes = size_t{128} << 20;

  // Never destroyed: tensors may return their blocks during process exit.
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  bool enabled() const { return max_idle_bytes_ > 0; }

  // An uninitialised contiguous tensor of `sizes` and `options` (CPU).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    size_t bytes = options.dtype().itemsize();
    for (const int64_t s : sizes) bytes *= static_cast<size_t>(s);
    if (!enabled() || bytes < kMinBytes) {
      at::Tensor out = at::empty(sizes, options);
      if (bytes >= kLargeBytes) advise_hugepages(out.data_ptr(), out.nbytes());
      return out;
    }
    void* p = take(bytes);
    return at::from_blob(p, sizes, [bytes](void* q) { BufferPool::get().give(q, bytes); }, options);
  }

  // Frees every idle block (for tests and for callers about to need the RAM).
  void release() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto* q : {&idle_, &idle_small_}) {
      for (const Block& b : *q) std::free(b.ptr);
      q->clear();
    }
    idle_bytes_ = small_bytes_ = 0;
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return idle_bytes_;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  BufferPool() {
    const char* env = std::getenv("NEURALMEM_CPU_POOL_MB");
    long mb = 1024;
    if (env != nullptr && *env != '\0') mb = std::strtol(env, nullptr, 10);
    max_idle_bytes_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      std::deque<Block>& q = bytes < kLargeBytes ? idle_small_ : idle_;
      for (auto it = q.begin(); it != q.end(); ++it) {
        if (it->bytes == bytes) {
          void* p = it->ptr;
          idle_bytes_ -= bytes;
          if (&q == &idle_small_) small_bytes_ -= bytes;
          q.erase(it);
          return p;
        }
      }
    }
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    TORCH_CHECK(p != nullptr, "out of memory: could not allocate ", bytes, " bytes for a memory-sized output");
    advise_hugepages(p, rounded);
    return p;
  }

  // The newest idle block is kept whatever its size: at N = 10^7 (2.56 GB)
  // a training loop's gradient buffer is then reused rather than faulted in
  // at every step (measured: 1,200 huge-page faults and 2.3 s of system time
  // in a 9 s content_read forward+backward).
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    idle_bytes_ += bytes;
    if (bytes < kLargeBytes) {
      idle_small_.push_back(Block{p, bytes});
      small_bytes_ += bytes;
    } else {
      idle_.push_back(Block{p, bytes});
    }
    auto drop_oldest = [&](std::deque<Block>& q) {
      std::free(q.front().ptr);
      idle_bytes_ -= q.front().bytes;
      if (&q == &idle_small_) small_bytes_ -= q.front().bytes;
      q.pop_front();
    };
    while (idle_small_.size() > kMaxSmallIdle || small_bytes_ > kMaxSmallIdleBytes) drop_oldest(idle_small_);
    while (idle_.size() > kMaxIdle || (idle_bytes_ > max_idle_bytes_ && idle_.size() > 1)) drop_oldest(idle_);
    while (idle_bytes_ > max_idle_bytes_ && !idle_small_.empty()) drop_oldest(idle_small_);
  }

  std::mutex mu_;
  std::deque<Block> idle_;        // blocks of kLargeBytes and more
  std::deque<Block> idle_small_;  // blocks of kMinBytes up to kLargeBytes
  size_t idle_bytes_ = 0;         // both classes
  size_t small_bytes_ = 0;
  size_t max_idle_bytes_ = 0;
};

// Outputs of the memory's size (its gradient, a written copy) are first
// touched by our kernels. At N = 10^6 and beyond, faulting them in 4 KiB pages
// costs more than the kernel (measured here: ~100 ms of a 126 ms backward for
// 256 MB); they come from BufferPool above, which asks for
// transparent huge pages before the first touch and keeps freed blocks mapped
// for the next call of the same size, so that a training loop faults them in
// once rather than at every step.
inline at::Tensor empty_like_c(const at::Tensor& t) { return BufferPool::get().empty(t.sizes(), t.options()); }

// A contiguous copy of a memory-sized incoming gradient, in a pooled buffer.
// The gradient of new_memory.sum() (or of any loss that broadcasts) arrives
// expanded, with zero strides; .contiguous() would take a fresh (B,N,D)
// block from malloc and fault every page of it in at every step (at N = 10^6
// 62,500 faults and 100+ ms of system time per step, measured here).
inline at::Tensor contiguous_pooled(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  at::Tensor out = BufferPool::get().empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  out.copy_(t);
  return out;
}

}  // namespace cpu
}  // namespace neuralmem

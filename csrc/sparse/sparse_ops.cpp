// The neuralmem_sparse ops (Sparse Access Memory): schemas, CPU kernels' host
// code, and the Autograd-key kernel of the in-place lru_touch_. Semantics and
// shapes: the module docstring of neuralmem_fast/ops/sparse.py (fake kernels,
// the gradient formula of sparse_read and the references live there); the
// arithmetic: sparse_cpu_kernels.h; the CUDA kernels: csrc/cuda/sparse_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "sparse/sparse_checks.h"
#include "sparse/sparse_cpu_kernels.h"

TORCH_LIBRARY(neuralmem_sparse, m) {
  // weights[b,h,:] = softmax_k(strengths[b,h] * cos(keys[b,h], rows[b,h,k])), reads = sum_k weights_k rows_k.
  m.def("sparse_read(Tensor rows, Tensor keys, Tensor strengths, float eps) -> (Tensor, Tensor)");
  // (grad_rows (B,H,K,D), grad_keys (B,H,D), grad_strengths (B,H)); the kernels recompute the weights from
  // rows, keys and strengths in the accumulation dtype (weights is checked for its shape).
  m.def("sparse_read_backward(Tensor grad_reads, Tensor grad_weights, Tensor weights, Tensor rows, Tensor keys, "
        "Tensor strengths, float eps) -> (Tensor, Tensor, Tensor)");
  // (scores (B,H,k) memory dtype, indices (B,H,k) int64): best first, equal scores in slot order, NaN first.
  m.def("cosine_topk(Tensor memory, Tensor keys, int k, float eps) -> (Tensor, Tensor)");
  m.def("lru_touch_(Tensor(a!) links, Tensor indices) -> ()");
  m.def("lru_oldest(Tensor links, int count, Tensor? skip) -> Tensor");
}

namespace neuralmem {
namespace sparse {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got a tensor on ",
                    t.device());
}

std::tuple<at::Tensor, at::Tensor> sparse_read_cpu(const at::Tensor& rows, const at::Tensor& keys,
                                                   const at::Tensor& strengths, double eps) {
  check_read(rows, keys, strengths, eps);
  check_cpu(rows, "rows");
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  at::Tensor reads = at::empty({B, H, D}, rows.options());
  at::Tensor weights = at::empty({B, H, K}, rows.options());
  const at::Tensor r = rows.contiguous(), k = keys.contiguous(), s = strengths.contiguous();
  NEURALMEM_SPARSE_DISPATCH(rows.scalar_type(), "sparse_read", [&] {
    cpu::sparse_read<scalar_t>(r, k, s, eps, reads, weights);
  });
  return {reads, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_read_backward_cpu(
    const at::Tensor& grad_reads, const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& rows,
    const at::Tensor& keys, const at::Tensor& strengths, double eps) {
  check_read_backward(grad_reads, grad_weights, weights, rows, keys, strengths, eps);
  check_cpu(rows, "rows");
  at::Tensor gr = at::empty(rows.sizes(), rows.options());
  at::Tensor gk = at::empty(keys.sizes(), keys.options());
  at::Tensor gs = at::empty(strengths.sizes(), strengths.options());
  const at::Tensor g = grad_reads.contiguous(), gw = grad_weights.contiguous(), r = rows.contiguous(),
                   k = keys.contiguous(), s = strengths.contiguous();
  NEURALMEM_SPARSE_DISPATCH(rows.scalar_type(), "sparse_read_backward", [&] {
    cpu::sparse_read_backward<scalar_t>(g, gw, r, k, s, eps, gr, gk, gs);
  });
  return {gr, gk, gs};
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& memory, const at::Tensor& keys, int64_t k,
                                                   double eps) {
  check_topk(memory, keys, k, eps);
  check_cpu(memory, "memory");
  const int64_t B = memory.size(0), H = keys.size(1);
  at::Tensor scores = at::empty({B, H, k}, memory.options());
  at::Tensor indices = at::empty({B, H, k}, memory.options().dtype(at::kLong));
  const at::Tensor m = memory.contiguous(), ks = keys.contiguous();
  NEURALMEM_SPARSE_DISPATCH(memory.scalar_type(), "cosine_topk", [&] {
    cpu::cosine_topk<scalar_t>(m, ks, k, eps, scores, indices);
  });
  return {scores, indices};
}

// Every index in [-1, N), and the links every touched slot and the sentinel
// hold in [0, N]: then every entry the moves read or write is in range (each
// value written is a touched slot, N, or a value read from a checked entry).
// All of it before the first write, so that a refused call changes nothing.
void check_touch_cpu(const at::Tensor& links, const at::Tensor& idx, int64_t N) {
  const int64_t B = links.size(0), M = idx.size(1);
  const int64_t* L = links.const_data_ptr<int64_t>();
  const int64_t* I = idx.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* Lb = L + b * (N + 1) * 2;
    auto link_ok = [&](int64_t node) {
      return Lb[2 * node] >= 0 && Lb[2 * node] <= N && Lb[2 * node + 1] >= 0 && Lb[2 * node + 1] <= N;
    };
    TORCH_CHECK_VALUE(link_ok(N), "links: memory ", b, " has sentinel links (", Lb[2 * N], ", ", Lb[2 * N + 1],
                      ") outside [0, N=", N, "] (corrupted; build links with lru_init)");
    for (int64_t m = 0; m < M; ++m) {
      const int64_t s = I[b * M + m];
      TORCH_CHECK_VALUE(s >= -1 && s < N, "indices must lie in [-1, N=", N, "), got ", s, " at [", b, ", ", m, "]");
      if (s >= 0)
        TORCH_CHECK_VALUE(link_ok(s), "links: slot ", s, " of memory ", b, " has links (", Lb[2 * s], ", ",
                          Lb[2 * s + 1], ") outside [0, N=", N, "] (corrupted; build links with lru_init)");
    }
  }
}

void lru_touch_cpu(at::Tensor& links, const at::Tensor& indices) {
  const int64_t N = check_links(links);
  check_index_tensor(indices, "indices", links);
  check_cpu(links, "links");
  const at::Tensor idx = indices.contiguous();
  check_touch_cpu(links, idx, N);
  cpu::lru_touch(links.data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(), links.size(0), N, idx.size(1));
}

at::Tensor lru_oldest_cpu(const at::Tensor& links, int64_t count, const c10::optional<at::Tensor>& skip) {
  const int64_t N = check_links(links);
  check_count(count);
  check_skip(skip, links, N);
  check_cpu(links, "links");
  const int64_t B = links.size(0);
  at::Tensor out = at::full({B, count}, -1, links.options());
  at::Tensor sk = skip.has_value() && skip->defined() ? skip->contiguous() : at::Tensor();
  const bool* S = sk.defined() ? sk.const_data_ptr<bool>() : nullptr;
  const int64_t* L = links.const_data_ptr<int64_t>();
  int64_t* O = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* Lb = L + b * (N + 1) * 2;
    int64_t cur = Lb[2 * N + 1], got = 0, steps = 0;
    while (got < count && cur != N) {
      TORCH_CHECK_VALUE(cur >= 0 && cur < N && steps < N, "links: the list of memory ", b,
                        " is corrupted (a link outside [0, N=", N, "] or a cycle); build links with lru_init");
      if (S == nullptr || !S[b * N + cur]) O[b * count + got++] = cur;
      cur = Lb[2 * cur + 1];
      ++steps;
    }
  }
  return out;
}

// lru_touch_ at the Autograd key: links are int64 (no gradient arises), but the
// op mutates them, so the version counter moves as PyTorch's in-place ops do.
void lru_touch_autograd(at::Tensor& links, const at::Tensor& indices) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neuralmem_sparse::lru_touch_", "")
                       .typed<void(at::Tensor&, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(links, indices);
  }
  if (links.defined() && !links.is_inference()) torch::autograd::impl::bump_version(links);
}

}  // namespace
}  // namespace sparse
}  // namespace neuralmem

TORCH_LIBRARY_IMPL(neuralmem_sparse, CPU, m) {
  m.impl("sparse_read", &neuralmem::sparse::sparse_read_cpu);
  m.impl("sparse_read_backward", &neuralmem::sparse::sparse_read_backward_cpu);
  m.impl("cosine_topk", &neuralmem::sparse::cosine_topk_cpu);
  m.impl("lru_touch_", &neuralmem::sparse::lru_touch_cpu);
  m.impl("lru_oldest", &neuralmem::sparse::lru_oldest_cpu);
}

TORCH_LIBRARY_IMPL(neuralmem_sparse, Autograd, m) {
  m.impl("lru_touch_", &neuralmem::sparse::lru_touch_autograd);
}

// Argument checks of the neuralmem_sparse ops, shared by the CPU and CUDA host
// code: shapes, dtypes and devices, with messages that name the argument, so
// that a direct torch.ops.neuralmem_sparse call cannot make a kernel read out
// of bounds. Value checks (indices in range) need the data and live with each
// device's host code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

// The dtypes every neuralmem_sparse kernel takes, for the CPU and CUDA host code alike.
#define NEURALMEM_SPARSE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace neuralmem {
namespace sparse {

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// t must have `ndim` dims, a floating dtype and the device of `ref` (and its
// dtype when same_dtype), else a clear error naming `name`.
inline void check_float(const at::Tensor& t, const char* name, int64_t ndim, const char* hint,
                        const at::Tensor* ref = nullptr, const char* ref_name = nullptr) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor of shape ", hint, ", got an undefined tensor");
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have shape ", hint, " (", ndim, " dims), got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), name,
                   " must be a floating tensor (float16/bfloat16/float32/float64), got ", t.scalar_type());
  if (ref != nullptr) {
    TORCH_CHECK_TYPE(t.scalar_type() == ref->scalar_type(), name, " must have the dtype of ", ref_name, " (",
                     ref->scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == ref->device(), name, " must be on the device of ", ref_name, " (",
                      ref->device(), "), got ", t.device());
  }
}

inline void check_dims(const at::Tensor& t, const char* name, const char* hint, std::initializer_list<int64_t> want) {
  int64_t i = 0;
  for (int64_t w : want) {
    TORCH_CHECK_VALUE(t.size(i) == w, name, " must have shape ", hint, " = ", c10::IntArrayRef(want), ", got ",
                      t.sizes(), " (dim ", i, ")");
    ++i;
  }
}

inline void check_eps(double eps) { TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps); }

// rows (B,H,K,D), keys (B,H,D), strengths (B,H).
inline void check_read(const at::Tensor& rows, const at::Tensor& keys, const at::Tensor& strengths, double eps) {
  check_float(rows, "rows", 4, "(B, H, K, D)");
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  TORCH_CHECK_VALUE(K >= 1 && D >= 1, "rows must have K >= 1 candidates and D >= 1, got shape ", rows.sizes());
  check_float(keys, "keys", 3, "(B, H, D)", &rows, "rows");
  check_dims(keys, "keys", "(B, H, D)", {B, H, D});
  check_float(strengths, "strengths", 2, "(B, H)", &rows, "rows");
  check_dims(strengths, "strengths", "(B, H)", {B, H});
  check_eps(eps);
}

inline void check_read_backward(const at::Tensor& grad_reads, const at::Tensor& grad_weights,
                                const at::Tensor& weights, const at::Tensor& rows, const at::Tensor& keys,
                                const at::Tensor& strengths, double eps) {
  check_read(rows, keys, strengths, eps);
  const int64_t B = rows.size(0), H = rows.size(1), K = rows.size(2), D = rows.size(3);
  check_float(grad_reads, "grad_reads", 3, "(B, H, D)", &rows, "rows");
  check_dims(grad_reads, "grad_reads", "(B, H, D)", {B, H, D});
  check_float(grad_weights, "grad_weights", 3, "(B, H, K)", &rows, "rows");
  check_dims(grad_weights, "grad_weights", "(B, H, K)", {B, H, K});
  check_float(weights, "weights", 3, "(B, H, K)", &rows, "rows");
  check_dims(weights, "weights", "(B, H, K)", {B, H, K});
}

// memory (B,N,D), keys (B,H,D), 1 <= k <= N.
inline void check_topk(const at::Tensor& memory, const at::Tensor& keys, int64_t k, double eps) {
  check_float(memory, "memory", 3, "(B, N, D)");
  const int64_t B = memory.size(0), N = memory.size(1), D = memory.size(2);
  TORCH_CHECK_VALUE(N >= 1 && D >= 1, "memory must have at least one slot and one dimension, got shape ",
                    memory.sizes());
  check_float(keys, "keys", 3, "(B, H, D)", &memory, "memory");
  TORCH_CHECK_VALUE(keys.size(0) == B && keys.size(2) == D, "keys must have shape (B, H, D) = (", B, ", H, ", D,
                    "), got ", keys.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "k must be in [1, N=", N, "], got ", k);
  check_eps(eps);
}

// links (B, N+1, 2) int64 contiguous; returns N.
inline int64_t check_links(const at::Tensor& links) {
  TORCH_CHECK_VALUE(links.defined() && links.dim() == 3 && links.size(2) == 2 && links.size(1) >= 2,
                    "links must be a (B, N+1, 2) int64 tensor from lru_init, got shape ",
                    links.defined() ? links.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(links.scalar_type() == at::kLong, "links must be int64, got ", links.scalar_type());
  TORCH_CHECK_VALUE(links.is_contiguous(), "links must be contiguous");
  return links.size(1) - 1;
}

// indices (B, M) int64 on the device of links.
inline void check_index_tensor(const at::Tensor& indices, const char* name, const at::Tensor& links) {
  TORCH_CHECK_VALUE(indices.defined() && indices.dim() == 2 && indices.size(0) == links.size(0), name,
                    " must be a (B=", links.size(0), ", M) int64 tensor, got shape ",
                    indices.defined() ? indices.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, name, " must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == links.device(), name, " must be on the device of links (", links.device(),
                    "), got ", indices.device());
}

inline void check_skip(const c10::optional<at::Tensor>& skip, const at::Tensor& links, int64_t N) {
  if (!skip.has_value() || !skip->defined()) return;
  const at::Tensor& s = *skip;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kBool, "skip must be a bool tensor, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == links.size(0) && s.size(1) == N, "skip must have shape (B, N) = (",
                    links.size(0), ", ", N, "), got ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == links.device(), "skip must be on the device of links (", links.device(), "), got ",
                    s.device());
}

inline void check_count(int64_t count) { TORCH_CHECK_VALUE(count >= 0, "count must be non-negative, got ", count); }

}  // namespace sparse
}  // namespace neuralmem

// Argument checks shared by the neuralmem_dnc ops' host code (dnc_ops.cpp,
// write_read.cpp): errors name the argument, its expected shape and the
// tensor whose dtype it must share.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>

namespace neuralmem {
namespace dnc {

// t must be a CPU tensor of shape `want` (`hint` names its dimensions) and of
// the dtype of `ref` (called `ref_name` in the message).
inline void check_tensor(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want,
                         const at::Tensor& ref, const char* ref_name, const char* hint) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor of shape ", hint);
  TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(want.size()) &&
                        std::equal(want.begin(), want.end(), t.sizes().begin()),
                    name, " must have shape ", hint, " = ", c10::IntArrayRef(want), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

}  // namespace dnc
}  // namespace neuralmem

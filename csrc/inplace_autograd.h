// Autograd-key helpers of the in-place ops (inplace.cpp, dnc/write_read.cpp):
// what PyTorch's own in-place ops do, for ops that PyTorch's autograd
// fallback would otherwise run as if they were pure.
#pragma once

#include <initializer_list>
#include <utility>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>

namespace neuralmem {

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

// With grad mode on, a mutated leaf that requires grad is refused with PyTorch's own message.
inline void check_mutated(const char* op, const at::Tensor& t, const char* name) {
  if (!c10::GradMode::is_enabled() || !requires_grad(t)) return;
  TORCH_CHECK(!t.is_leaf(), "neuralmem::", op, ": ", name,
              " is a leaf Variable that requires grad: a leaf Variable that requires grad is being used in an "
              "in-place operation.");
}

// With grad mode on, any input that requires grad is refused: the op has no gradient.
// `alternative` names the differentiable op(s) to use instead.
inline void check_forward_only(const char* op,
                               std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs,
                               const char* alternative) {
  if (!c10::GradMode::is_enabled()) return;
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(!requires_grad(*t), "neuralmem::", op, " is forward-only (it overwrites the memory in place and has ",
                "no gradient), but ", name, " requires grad. For a differentiable write use ", alternative,
                "; to write without gradients, detach the inputs or run under torch.no_grad().");
  }
}

// The version counter of a mutated tensor moves, so that a backward that saved it refuses to run.
inline void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
}

}  // namespace neuralmem

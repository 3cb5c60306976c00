// Autograd-key kernels of the in-place ops: memory_write_, content_write_ and
// content_read_write_.
//
// These ops overwrite the memory (and usage) and have no backward. With no
// kernel at the Autograd key, PyTorch's fallback would run them as if they
// were pure: the version counter of the mutated tensor would not move (so a
// pending backward that saved the memory would silently read the new
// contents), a leaf that requires grad would be overwritten, and inputs that
// require grad would lose their gradient without a word. This kernel does
// what PyTorch's own in-place ops do, once for every device:
//   - with grad mode on, a mutated leaf that requires grad is refused with
//     PyTorch's own message, and any input that requires grad is refused with
//     an error that names it and the differentiable alternative;
//   - it runs the device kernel below autograd;
//   - it bumps the version counter of every tensor it mutated.
// Overlap between a mutated tensor and another input is refused by the
// device kernels themselves (inplace_checks.h), so that it holds under
// inference mode too, where this kernel is skipped.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "inplace_autograd.h"

namespace neuralmem {
namespace {

using OptTensor = std::optional<at::Tensor>;

void memory_write_autograd(at::Tensor& memory, const at::Tensor& weights, const at::Tensor& erase,
                           const at::Tensor& add) {
  check_mutated("memory_write_", memory, "memory");
  check_forward_only("memory_write_", {{"memory", &memory}, {"weights", &weights}, {"erase", &erase}, {"add", &add}},
                     "memory_write (out of place)");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neuralmem::memory_write_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(memory, weights, erase, add);
  }
  bump(memory);
}

const char* kContentWriteAlternative =
    "content_addressing followed by memory_write (out of place), or NeuralMemoryBank(differentiable=True)";

at::Tensor content_write_autograd(at::Tensor& memory, const OptTensor& usage, const at::Tensor& keys,
                                  const at::Tensor& strengths, const at::Tensor& erase, const at::Tensor& add,
                                  double eps, double decay) {
  const at::Tensor u = usage.has_value() ? *usage : at::Tensor();
  check_mutated("content_write_", memory, "memory");
  check_mutated("content_write_", u, "usage");
  check_forward_only("content_write_",
                     {{"memory", &memory}, {"usage", &u}, {"keys", &keys}, {"strengths", &strengths},
                      {"erase", &erase}, {"add", &add}},
                     kContentWriteAlternative);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("neuralmem::content_write_", "")
                       .typed<at::Tensor(at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double, double)>();
  at::Tensor least;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    least = op.call(memory, usage, keys, strengths, erase, add, eps, decay);
  }
  bump(memory);
  bump(u);
  return least;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> content_read_write_autograd(
    at::Tensor& memory, const OptTensor& usage, const at::Tensor& read_keys, const at::Tensor& read_strengths,
    const at::Tensor& write_keys, const at::Tensor& write_strengths, const at::Tensor& erase, const at::Tensor& add,
    double eps, double decay) {
  const at::Tensor u = usage.has_value() ? *usage : at::Tensor();
  check_mutated("content_read_write_", memory, "memory");
  check_mutated("content_read_write_", u, "usage");
  check_forward_only("content_read_write_",
                     {{"memory", &memory}, {"usage", &u}, {"read_keys", &read_keys},
                      {"read_strengths", &read_strengths}, {"write_keys", &write_keys},
                      {"write_strengths", &write_strengths}, {"erase", &erase}, {"add", &add}},
                     "content_read, then content_addressing and memory_write (out of place)");
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("neuralmem::content_read_write_", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.call(memory, usage, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps, decay);
  }
  bump(memory);
  bump(u);
  return out;
}

}  // namespace
}  // namespace neuralmem

TORCH_LIBRARY_IMPL(neuralmem, Autograd, m) {
  m.impl("memory_write_", &neuralmem::memory_write_autograd);
  m.impl("content_write_", &neuralmem::content_write_autograd);
  m.impl("content_read_write_", &neuralmem::content_read_write_autograd);
}

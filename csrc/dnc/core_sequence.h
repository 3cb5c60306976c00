// MemoryCore's whole sequence, forward and backward, in C++ (core_sequence.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace neuralmem {
namespace dnc {
void bind_core_sequence(pybind11::module_& m);
}  // namespace dnc
}  // namespace neuralmem

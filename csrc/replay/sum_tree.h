// Sum tree for prioritized replay. See sum_tree.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace neuralmem {
namespace replay {
// Adds the SumTree class to the module.
void bind(pybind11::module_& m);
}  // namespace replay
}  // namespace neuralmem

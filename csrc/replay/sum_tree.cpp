#include "replay/sum_tree.h"

namespace neuralmem {
namespace replay {
void bind(pybind11::module_& m) { (void)m; }
}  // namespace replay
}  // namespace neuralmem

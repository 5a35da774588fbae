// Bindings for the Hessian accumulator and Hessian files (filled in by the C++-hosts work).
#include "register.hpp"

namespace obc_bindings {

void register_hessian_io(pybind11::module_& m) {}

}  // namespace obc_bindings

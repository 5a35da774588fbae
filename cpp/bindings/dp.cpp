// Bindings for the budgeted level solver (filled in by the non-uniform compression work).
#include "register.hpp"

namespace obc_bindings {

void register_dp(pybind11::module_& m) {}

}  // namespace obc_bindings

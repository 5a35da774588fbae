// Registration functions of the binding files; module.cpp calls each one once.
#pragma once

#include <pybind11/pybind11.h>

namespace obc_bindings {

/// Hessian accumulator and Hessian files (hessian_io.cpp).
void register_hessian_io(pybind11::module_& m);

/// Budgeted dynamic-programming level selection (dp.cpp).
void register_dp(pybind11::module_& m);

}  // namespace obc_bindings

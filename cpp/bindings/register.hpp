// Registration functions of the binding files; module.cpp calls each one once.
#pragma once

#include <pybind11/pybind11.h>

#include "obc/interrupt.hpp"

namespace obc_bindings {

/// Ctrl-C for the core's InterruptHook: polled from the calling thread between units of work,
/// it takes the GIL only for the check. A pending signal stops the solver, which then surfaces
/// as KeyboardInterrupt (the error indicator is cleared here and set again by the translator).
class PythonInterrupt : public obc::InterruptHook {
 public:
  bool should_stop() override {
    pybind11::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      PyErr_Clear();
      return true;
    }
    return false;
  }
};

/// Hessian accumulator and Hessian files (hessian_io.cpp).
void register_hessian_io(pybind11::module_& m);

/// Budgeted dynamic-programming level selection (dp.cpp).
void register_dp(pybind11::module_& m);

/// SparseGPT pruning and joint pruning + quantization (sparsegpt.cpp); needs the f32 and f64
/// submodules to exist.
void register_sparsegpt(pybind11::module_& m);

}  // namespace obc_bindings

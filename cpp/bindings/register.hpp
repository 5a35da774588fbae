// Registration functions of the binding files; module.cpp calls each one once.
#pragma once

#include <pybind11/pybind11.h>

#include "obc/interrupt.hpp"

namespace obc_bindings {

/// The exception a signal handler raised while the core ran, owned (null when none). Kept per
/// thread: the hook is polled only from the thread that called into the core, and that same
/// thread runs the exception translator once obc::Interrupted has unwound the call.
inline thread_local PyObject* pending_signal_error = nullptr;

/// Takes the exception set by PyErr_CheckSignals() off the error indicator into
/// pending_signal_error (replacing a stale one). Requires the GIL.
inline void stash_signal_error() {
#if PY_VERSION_HEX >= 0x030C0000
  PyObject* error = PyErr_GetRaisedException();
#else
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  PyErr_Fetch(&type, &value, &traceback);
  PyErr_NormalizeException(&type, &value, &traceback);
  if (value != nullptr && traceback != nullptr) PyException_SetTraceback(value, traceback);
  Py_XDECREF(type);
  Py_XDECREF(traceback);
  PyObject* error = value;
#endif
  Py_XDECREF(pending_signal_error);
  pending_signal_error = error;
}

/// Sets the error indicator for an obc::Interrupted that reached Python: the exception the
/// signal handler raised (KeyboardInterrupt for Ctrl-C under the default handler, or whatever a
/// custom handler raised, e.g. a timeout from SIGALRM), or KeyboardInterrupt when the stop came
/// from elsewhere. Requires the GIL.
inline void raise_interrupted() {
  PyObject* error = pending_signal_error;
  pending_signal_error = nullptr;
  if (error == nullptr) {
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    return;
  }
#if PY_VERSION_HEX >= 0x030C0000
  PyErr_SetRaisedException(error);
#else
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(error));
  Py_INCREF(type);
  PyErr_Restore(type, error, PyException_GetTraceback(error));
#endif
}

/// Ctrl-C for the core's InterruptHook: polled from the calling thread between units of work,
/// it takes the GIL only for the check. When a signal handler raises (the default SIGINT handler
/// raises KeyboardInterrupt), the solver stops and the call raises that same exception: it is
/// kept by stash_signal_error() and set again by the translator (raise_interrupted()).
class PythonInterrupt : public obc::InterruptHook {
 public:
  bool should_stop() override {
    pybind11::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      stash_signal_error();
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

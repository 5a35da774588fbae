// Bindings for the Hessian accumulator and Hessian files: check arrays under the GIL, release it
// for the Gram products and file I/O. Conversions (dtype widening, contiguity) happen in
// python/obc_native/hessian.py; this layer accepts only C-contiguous float32/float64 arrays.
#include "obc/hessian_io.hpp"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "obc/accumulator.hpp"
#include "obc/errors.hpp"
#include "register.hpp"

namespace py = pybind11;
using obc::Index;
using obc_bindings::PythonInterrupt;

namespace {

/// The state behind obc_native.HessianAccumulator. Python threads run add()/merge() concurrently
/// once the GIL is released, so every access takes `mutex`, always after releasing the GIL (a
/// thread waiting for the mutex never blocks the interpreter).
struct PyAccumulator {
  explicit PyAccumulator(obc::HessianAccumulator s) : state(std::move(s)) {}
  obc::HessianAccumulator state;
  mutable std::mutex mutex;
};

template <class Fn>
auto without_gil_locked(const PyAccumulator& acc, Fn&& fn) {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(acc.mutex);
  return fn();
}

obc::AccumulatorOptions accumulator_options(int num_threads) {
  obc::AccumulatorOptions options;
  options.num_threads = num_threads;
  return options;
}

py::array_t<double> to_array(const Eigen::MatrixXd& m) {
  // Both results are symmetric, so the column-major buffer is also the row-major one.
  py::array_t<double> out({m.rows(), m.cols()});
  std::memcpy(out.mutable_data(), m.data(), sizeof(double) * static_cast<size_t>(m.size()));
  return out;
}

/// Checks that X is a 2-D (n, cols) float32 or float64 array of samples; true for float32.
bool samples_are_float32(const py::array& X) {
  const bool is_f32 = X.dtype().is(py::dtype::of<float>());
  const bool is_f64 = X.dtype().is(py::dtype::of<double>());
  if (!is_f32 && !is_f64) {
    throw py::type_error("X: expected a float32 or float64 array, got dtype " +
                         std::string(py::str(X.dtype())));
  }
  if (X.ndim() != 2) {
    throw obc::InvalidArgument("X: expected a 2-D (n, cols) array, got " +
                               std::to_string(X.ndim()) + " dimensions");
  }
  return is_f32;
}

void add_array(PyAccumulator& acc, const py::array& X) {
  const bool is_f32 = samples_are_float32(X);
  if (!(X.flags() & py::array::c_style)) {
    throw obc::InvalidArgument("X: expected a C-contiguous array");
  }
  const auto rows = static_cast<Index>(X.shape(0));
  const auto cols = static_cast<Index>(X.shape(1));
  const void* data = X.data();  // X stays referenced by the caller for the whole call
  PythonInterrupt hook;  // Ctrl-C rolls the batch back (see HessianAccumulator::add)
  without_gil_locked(acc, [&] {
    if (is_f32) {
      acc.state.add(static_cast<const float*>(data), rows, cols, &hook);
    } else {
      acc.state.add(static_cast<const double*>(data), rows, cols, &hook);
    }
  });
}

void merge_into(PyAccumulator& into, const PyAccumulator& other) {
  py::gil_scoped_release release;
  if (&into == &other) {
    std::lock_guard<std::mutex> lock(into.mutex);
    into.state.merge(into.state);
    return;
  }
  std::scoped_lock lock(into.mutex, other.mutex);  // deadlock-free for a.merge(b) || b.merge(a)
  into.state.merge(other.state);
}

/// _core.accumulate_gram(total, X, num_threads): total += X^T X in place (see
/// obc::accumulate_gram). total: a writable C-contiguous (cols, cols) float64 array, read as
/// column-major (the same matrix when it is symmetric, which the core checks); X: a 2-D float32
/// or float64 array with unit column stride (rows may be strided).
void accumulate_gram_array(py::array& total, const py::array& X, int num_threads) {
  if (!total.dtype().is(py::dtype::of<double>())) {
    throw py::type_error("total: expected a float64 array, got dtype " +
                         std::string(py::str(total.dtype())));
  }
  if (total.ndim() != 2 || total.shape(0) != total.shape(1)) {
    throw obc::InvalidArgument("total: expected a square 2-D (cols, cols) array");
  }
  if (!(total.flags() & py::array::c_style) || !total.writeable()) {
    throw obc::InvalidArgument("total: expected a writable C-contiguous array");
  }
  const bool is_f32 = samples_are_float32(X);
  const auto item = static_cast<py::ssize_t>(X.itemsize());
  const auto rows = static_cast<Index>(X.shape(0));
  const auto cols = static_cast<Index>(X.shape(1));
  if ((cols > 1 && X.strides(1) != item) || (rows > 1 && (X.strides(0) <= 0 || X.strides(0) % item != 0))) {
    throw obc::InvalidArgument(
        "X: expected rows of contiguous values at a positive stride (e.g. a C-contiguous array)");
  }
  const Index row_stride = rows > 1 ? static_cast<Index>(X.strides(0) / item) : cols;
  const auto n = static_cast<Index>(total.shape(0));
  double* out = static_cast<double*>(total.mutable_data());
  const void* data = X.data();  // both arrays stay referenced by the caller for the whole call
  PythonInterrupt hook;  // Ctrl-C restores total (see obc::accumulate_gram)
  py::gil_scoped_release release;
  Eigen::Map<Eigen::MatrixXd> view(out, n, n);
  if (is_f32) {
    obc::accumulate_gram(view, static_cast<const float*>(data), rows, cols, row_stride, num_threads,
                         &hook);
  } else {
    obc::accumulate_gram(view, static_cast<const double*>(data), rows, cols, row_stride,
                         num_threads, &hook);
  }
}

}  // namespace

namespace obc_bindings {

void register_hessian_io(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const obc::IoError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<PyAccumulator>(m, "HessianAccumulator",
                            "Float64 sum of x x^T and sample count (private; use "
                            "obc_native.HessianAccumulator)")
      .def(py::init([](Index cols, int num_threads) {
             return std::make_unique<PyAccumulator>(
                 obc::HessianAccumulator(cols, accumulator_options(num_threads)));
           }),
           py::arg("cols"), py::arg("num_threads") = 0)
      .def_static(
          "from_state",
          [](py::array_t<double, py::array::c_style | py::array::forcecast> sum,
             std::uint64_t count, int num_threads) {
            if (sum.ndim() != 2) {
              throw obc::InvalidArgument("sum: expected a 2-D (cols, cols) array");
            }
            const Eigen::Map<const obc::RowMatrixXd> view(sum.data(), sum.shape(0), sum.shape(1));
            std::unique_ptr<PyAccumulator> out;
            {
              py::gil_scoped_release release;
              out = std::make_unique<PyAccumulator>(obc::HessianAccumulator::from_state(
                  view, count, accumulator_options(num_threads)));
            }
            return out;
          },
          py::arg("sum"), py::arg("count"), py::arg("num_threads") = 0)
      .def_static(
          "load",
          [](const std::string& path, int num_threads) {
            PythonInterrupt hook;  // Ctrl-C between chunks of a long read
            py::gil_scoped_release release;
            return std::make_unique<PyAccumulator>(
                obc::load_hessian(path, accumulator_options(num_threads), &hook));
          },
          py::arg("path"), py::arg("num_threads") = 0)
      .def("add", &add_array, py::arg("X"))
      .def("merge", &merge_into, py::arg("other"))
      .def("reset", [](PyAccumulator& acc) { without_gil_locked(acc, [&] { acc.state.reset(); }); })
      .def("hessian",
           [](const PyAccumulator& acc) {
             return to_array(without_gil_locked(acc, [&] { return acc.state.hessian(); }));
           })
      .def("sum",
           [](const PyAccumulator& acc) {
             return to_array(without_gil_locked(acc, [&] { return acc.state.sum(); }));
           })
      .def(
          "save",
          [](const PyAccumulator& acc, const std::string& path) {
            PythonInterrupt hook;  // Ctrl-C between chunks of a long write (path left as it was)
            without_gil_locked(acc, [&] { obc::save_hessian(path, acc.state, &hook); });
          },
          py::arg("path"))
      .def_property_readonly("cols",
                             [](const PyAccumulator& acc) {
                               return without_gil_locked(acc, [&] { return acc.state.cols(); });
                             })
      .def_property_readonly("count",
                             [](const PyAccumulator& acc) {
                               return without_gil_locked(acc, [&] { return acc.state.count(); });
                             })
      .def_property(
          "num_threads",
          [](const PyAccumulator& acc) {
            return without_gil_locked(acc, [&] { return acc.state.options().num_threads; });
          },
          [](PyAccumulator& acc, int num_threads) {
            without_gil_locked(acc,
                               [&] { acc.state.set_options(accumulator_options(num_threads)); });
          });

  m.def("accumulate_gram", &accumulate_gram_array, py::arg("total"), py::arg("X"),
        py::arg("num_threads") = 0,
        "total += X^T X in place, float64, exactly symmetric, bit-identical for any num_threads "
        "(private; see obc_native.torch.hessian)");

  m.def(
      "read_hessian_info",
      [](const std::string& path) {
        obc::HessianFileInfo info;
        {
          py::gil_scoped_release release;
          info = obc::read_hessian_info(path);
        }
        py::dict d;
        d["version"] = info.version;
        d["cols"] = info.cols;
        d["count"] = info.count;
        d["file_bytes"] = info.file_bytes;
        return d;
      },
      py::arg("path"));
}

}  // namespace obc_bindings

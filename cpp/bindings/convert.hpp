// Conversions shared by the binding files: numpy arrays in (H without a copy), result dicts out.
// Binding-only (pybind11); the order of every binding is: check under the GIL, release it for
// the solve, build these outputs with the GIL held again.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "obc/errors.hpp"
#include "obc/hessian.hpp"
#include "obc/prune.hpp"
#include "obc/quant.hpp"
#include "register.hpp"

namespace obc_bindings {

namespace py = pybind11;
using obc::Index;

template <class S>
using RowRef = Eigen::Ref<const obc::RowMatrix<S>>;

// H as it lies in the numpy array (float32 or float64, C- or Fortran-ordered): no copy, since a
// Hessian is the largest input of a call. The Python layer makes it contiguous first.
inline obc::HessianRef hessian_ref(const py::array& H) {
  const bool f32 = py::isinstance<py::array_t<float>>(H) && H.itemsize() == 4;
  const bool f64 = py::isinstance<py::array_t<double>>(H) && H.itemsize() == 8;
  if (!f32 && !f64)
    throw py::type_error("H: expected a float32 or float64 array, got dtype " +
                         std::string(py::str(H.dtype())));
  if (H.ndim() != 2)
    throw py::value_error("H: expected a 2-D array, got " + std::to_string(H.ndim()) + " dims");
  const Index item = static_cast<Index>(H.itemsize());
  const Index rows = H.shape(0), cols = H.shape(1);
  Index row_stride = H.strides(0) / item, col_stride = H.strides(1) / item;
  if (H.strides(0) % item != 0 || H.strides(1) % item != 0 || row_stride < 0 || col_stride < 0 ||
      (rows > 1 && cols > 1 && row_stride != 1 && col_stride != 1))
    throw py::value_error("H: expected a C- or Fortran-contiguous array");
  if (f32) return obc::HessianRef(static_cast<const float*>(H.data()), rows, cols, row_stride,
                                  col_stride);
  return obc::HessianRef(static_cast<const double*>(H.data()), rows, cols, row_stride, col_stride);
}

template <class S>
py::array_t<S> to_array(const obc::RowMatrix<S>& m) {
  py::array_t<S> out({m.rows(), m.cols()});
  std::copy(m.data(), m.data() + m.size(), out.mutable_data());
  return out;
}

// A result matrix handed to numpy without a copy: the array's base owns the moved matrix. (A
// 4096 x 4096 layer's weights and codes were copied into fresh arrays with the GIL held, 80 MB
// of page faults and copying after the solve: ~10% of a 2-thread GPTQ call.)
template <class S>
py::array_t<S> moved_array(obc::RowMatrix<S>&& m) {
  if (m.size() == 0) return to_array<S>(m);
  auto owner = std::make_unique<obc::RowMatrix<S>>(std::move(m));
  py::capsule base(owner.get(), [](void* p) { delete static_cast<obc::RowMatrix<S>*>(p); });
  const obc::RowMatrix<S>& held = *owner.release();  // the capsule owns it now
  return py::array_t<S>({held.rows(), held.cols()}, held.data(), base);
}

inline py::array_t<bool> mask_kept(const obc::MaskMatrix& pruned) {
  py::array_t<bool> out({pruned.rows(), pruned.cols()});
  bool* dst = out.mutable_data();
  for (Index i = 0; i < pruned.size(); ++i) dst[i] = pruned.data()[i] == 0;
  return out;
}

inline py::array_t<double> to_vector(const Eigen::VectorXd& v) {
  py::array_t<double> out(v.size());
  std::copy(v.data(), v.data() + v.size(), out.mutable_data());
  return out;
}

inline obc::Spread parse_spread(const std::string& spread) {
  if (spread == "global") return obc::Spread::Global;
  if (spread == "uniform") return obc::Spread::Uniform;
  throw obc::InvalidArgument("spread: expected 'global' or 'uniform', got '" + spread + "'");
}

// Which precision the eliminations ran in: float64 layers always in float64, float32 ones in
// float32 unless they were redone in float64 (the float32 elimination lost definiteness).
template <class S>
const char* precision_of(bool float64_fallback) {
  return std::is_same_v<S, double> || float64_fallback ? "float64" : "float32";
}

template <class S>
py::dict prune_dict(obc::PruneResult<S>&& r) {
  py::dict d;
  d["weight"] = moved_array<S>(std::move(r.weight));
  d["mask"] = mask_kept(r.pruned);
  d["row_losses"] = to_vector(r.row_losses);
  d["damp"] = r.damp;
  d["damp_absolute"] = r.damp_absolute;
  d["precision"] = precision_of<S>(r.float64_fallback);
  return d;
}

template <class S>
py::dict quant_dict(obc::QuantResult<S>&& r) {
  py::dict d;
  d["weight"] = moved_array<S>(std::move(r.weight));
  d["codes"] = moved_array<std::uint8_t>(std::move(r.codes));
  d["scale"] = to_array<S>(r.grid.scale);
  d["zero"] = to_array<std::uint8_t>(r.grid.zero);
  d["group_size"] = r.grid.group_size;
  d["mask"] = mask_kept(r.pruned);
  d["row_losses"] = to_vector(r.row_losses);
  d["row_losses_unrefined"] = to_vector(r.row_losses_unrefined);
  py::array_t<std::uint8_t> methods(r.row_method.size());
  std::copy(r.row_method.data(), r.row_method.data() + r.row_method.size(),
            methods.mutable_data());
  d["row_method"] = methods;
  d["refine_passes"] = r.refine_passes;
  d["damp"] = r.damp;
  d["damp_absolute"] = r.damp_absolute;
  d["precision"] = precision_of<S>(r.float64_fallback);
  return d;
}

/// RunOptions of a binding call: the thread count, the row batch of the lazy updates (0 = the
/// kernel's default) and the Ctrl-C hook (owned by the caller, alive for the whole call).
inline obc::RunOptions run_options(int num_threads, int lazy_batch, PythonInterrupt& hook) {
  obc::RunOptions run;
  run.num_threads = num_threads;
  run.lazy_batch = lazy_batch;
  run.interrupt = &hook;
  return run;
}

/// QuantOptions from the Python arguments (grid: "mse" or "minmax").
inline obc::QuantOptions quant_options(int bits, bool sym, Index group_size,
                                       const std::string& grid) {
  obc::QuantOptions opt;
  opt.bits = bits;
  opt.sym = sym;
  opt.group_size = group_size;
  if (grid == "mse") opt.grid = obc::GridSearch::Mse;
  else if (grid == "minmax") opt.grid = obc::GridSearch::MinMax;
  else throw obc::InvalidArgument("grid: expected 'mse' or 'minmax', got '" + grid + "'");
  return opt;
}

}  // namespace obc_bindings

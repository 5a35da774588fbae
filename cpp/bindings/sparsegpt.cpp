// Bindings for SparseGPT (obc/sparsegpt.hpp): _core.f32/f64.prune_sparsegpt, quantize_sparsegpt.
// Same order as module.cpp: check arrays with the GIL held, release it for the solve, rebuild
// outputs. The Python front (obc_native._api) validates and converts arguments first.
#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "obc/errors.hpp"
#include "obc/sparsegpt.hpp"
#include "register.hpp"

namespace py = pybind11;
using obc::Index;

namespace {

template <class S>
using RowRef = Eigen::Ref<const obc::RowMatrix<S>>;

// H as it lies in the numpy array, without a copy (the same policy as module.cpp's hessian_ref;
// kept here so that this file stays independent of module.cpp's internals).
obc::HessianRef hessian_view(const py::array& H) {
  const bool f32 = py::isinstance<py::array_t<float>>(H) && H.itemsize() == 4;
  const bool f64 = py::isinstance<py::array_t<double>>(H) && H.itemsize() == 8;
  if (!f32 && !f64)
    throw py::type_error("H: expected a float32 or float64 array, got dtype " +
                         std::string(py::str(H.dtype())));
  if (H.ndim() != 2)
    throw py::value_error("H: expected a 2-D array, got " + std::to_string(H.ndim()) + " dims");
  const Index item = static_cast<Index>(H.itemsize());
  const Index rows = H.shape(0), cols = H.shape(1);
  const Index row_stride = H.strides(0) / item, col_stride = H.strides(1) / item;
  if (H.strides(0) % item != 0 || H.strides(1) % item != 0 || row_stride < 0 || col_stride < 0 ||
      (rows > 1 && cols > 1 && row_stride != 1 && col_stride != 1))
    throw py::value_error("H: expected a C- or Fortran-contiguous array");
  if (f32)
    return obc::HessianRef(static_cast<const float*>(H.data()), rows, cols, row_stride,
                           col_stride);
  return obc::HessianRef(static_cast<const double*>(H.data()), rows, cols, row_stride, col_stride);
}

template <class T>
py::array_t<T> to_array(const obc::RowMatrix<T>& m) {
  py::array_t<T> out({m.rows(), m.cols()});
  std::copy(m.data(), m.data() + m.size(), out.mutable_data());
  return out;
}

py::array_t<bool> kept_mask(const obc::MaskMatrix& pruned) {
  py::array_t<bool> out({pruned.rows(), pruned.cols()});
  bool* dst = out.mutable_data();
  for (Index i = 0; i < pruned.size(); ++i) dst[i] = pruned.data()[i] == 0;
  return out;
}

py::array_t<double> to_vector(const Eigen::VectorXd& v) {
  py::array_t<double> out(v.size());
  std::copy(v.data(), v.data() + v.size(), out.mutable_data());
  return out;
}

obc::SparseGptOptions sparsegpt_options(const std::string& pattern, double sparsity,
                                        const std::string& spread, Index block, Index n, Index m,
                                        Index lazy_block) {
  obc::SparseGptOptions opt;
  if (pattern == "unstructured") opt.pattern = obc::SparsePattern::Unstructured;
  else if (pattern == "blocked") opt.pattern = obc::SparsePattern::Blocked;
  else if (pattern == "nm") opt.pattern = obc::SparsePattern::NM;
  else
    throw obc::InvalidArgument("pattern: expected 'unstructured', 'blocked' or 'nm', got '" +
                               pattern + "'");
  if (spread == "global") opt.spread = obc::Spread::Global;
  else if (spread == "uniform") opt.spread = obc::Spread::Uniform;
  else throw obc::InvalidArgument("spread: expected 'global' or 'uniform', got '" + spread + "'");
  opt.sparsity = sparsity;
  opt.block = block;
  opt.n = n;
  opt.m = m;
  opt.lazy_block = lazy_block;
  return opt;
}

template <class S>
void bind_scalar(py::module_& mod) {
  mod.def("prune_sparsegpt",
          [](RowRef<S> W, const py::array& H, const std::string& pattern, double sparsity,
             const std::string& spread, Index block, Index n, Index m, Index lazy_block,
             double damp, int num_threads) {
            const obc::HessianRef h = hessian_view(H);
            const obc::SparseGptOptions opt =
                sparsegpt_options(pattern, sparsity, spread, block, n, m, lazy_block);
            obc_bindings::PythonInterrupt hook;
            obc::RunOptions run;
            run.num_threads = num_threads;
            run.interrupt = &hook;
            obc::PruneResult<S> r;
            {
              py::gil_scoped_release release;
              r = obc::prune_sparsegpt<S>(W, h, opt, obc::HessianOptions{damp}, run);
            }
            py::dict d;
            d["weight"] = to_array<S>(r.weight);
            d["mask"] = kept_mask(r.pruned);
            d["row_losses"] = to_vector(r.row_losses);
            d["damp"] = r.damp;
            d["damp_absolute"] = r.damp_absolute;
            d["precision"] = std::is_same_v<S, double> ? "float64" : "float32";  // no fallback:
            return d;                                  // the factor of H^-1 is always float64
          },
          py::arg("W"), py::arg("H"), py::arg("pattern"), py::arg("sparsity"), py::arg("spread"),
          py::arg("block"), py::arg("n"), py::arg("m"), py::arg("lazy_block"), py::arg("damp"),
          py::arg("num_threads"));
  mod.def("quantize_sparsegpt",
          [](RowRef<S> W, const py::array& H, const std::string& pattern, double sparsity,
             const std::string& spread, Index block, Index n, Index m, Index lazy_block, int bits,
             bool sym, Index group_size, const std::string& grid, double damp, int num_threads) {
            const obc::HessianRef h = hessian_view(H);
            const obc::SparseGptOptions opt =
                sparsegpt_options(pattern, sparsity, spread, block, n, m, lazy_block);
            obc::QuantOptions quant;
            quant.bits = bits;
            quant.sym = sym;
            quant.group_size = group_size;
            if (grid == "mse") quant.grid = obc::GridSearch::Mse;
            else if (grid == "minmax") quant.grid = obc::GridSearch::MinMax;
            else throw obc::InvalidArgument("grid: expected 'mse' or 'minmax', got '" + grid + "'");
            obc_bindings::PythonInterrupt hook;
            obc::RunOptions run;
            run.num_threads = num_threads;
            run.interrupt = &hook;
            obc::QuantResult<S> r;
            {
              py::gil_scoped_release release;
              r = obc::quantize_sparsegpt<S>(W, h, opt, quant, obc::HessianOptions{damp}, run);
            }
            py::dict d;
            d["weight"] = to_array<S>(r.weight);
            d["codes"] = to_array<std::uint8_t>(r.codes);
            d["scale"] = to_array<S>(r.grid.scale);
            d["zero"] = to_array<std::uint8_t>(r.grid.zero);
            d["group_size"] = r.grid.group_size;
            d["mask"] = kept_mask(r.pruned);
            d["row_losses"] = to_vector(r.row_losses);
            d["damp"] = r.damp;
            d["damp_absolute"] = r.damp_absolute;
            d["precision"] = std::is_same_v<S, double> ? "float64" : "float32";  // no fallback:
            return d;                                  // the factor of H^-1 is always float64
          },
          py::arg("W"), py::arg("H"), py::arg("pattern"), py::arg("sparsity"), py::arg("spread"),
          py::arg("block"), py::arg("n"), py::arg("m"), py::arg("lazy_block"), py::arg("bits"),
          py::arg("sym"), py::arg("group_size"), py::arg("grid"), py::arg("damp"),
          py::arg("num_threads"));
}

}  // namespace

namespace obc_bindings {

void register_sparsegpt(py::module_& m) {
  py::module_ f32 = m.attr("f32").cast<py::module_>();
  py::module_ f64 = m.attr("f64").cast<py::module_>();
  bind_scalar<float>(f32);
  bind_scalar<double>(f64);
}

}  // namespace obc_bindings

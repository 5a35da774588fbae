// Bindings for SparseGPT (obc/sparsegpt.hpp): _core.f32/f64.prune_sparsegpt, quantize_sparsegpt.
// Same order as module.cpp: check arrays with the GIL held, release it for the solve, rebuild
// outputs. The Python front (obc_native._api) validates and converts arguments first.
#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "obc/errors.hpp"
#include "obc/sparsegpt.hpp"
#include "convert.hpp"
#include "register.hpp"

namespace py = pybind11;
using obc::Index;

namespace {

using obc_bindings::hessian_ref;
using obc_bindings::parse_spread;
using obc_bindings::prune_dict;
using obc_bindings::quant_dict;
using obc_bindings::quant_options;
using obc_bindings::run_options;
using obc_bindings::RowRef;

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
  opt.spread = parse_spread(spread);
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
            const obc::HessianRef h = hessian_ref(H);
            const obc::SparseGptOptions opt =
                sparsegpt_options(pattern, sparsity, spread, block, n, m, lazy_block);
            obc_bindings::PythonInterrupt hook;
            const obc::RunOptions run = run_options(num_threads, 0, hook);
            obc::PruneResult<S> r;
            {
              py::gil_scoped_release release;
              r = obc::prune_sparsegpt<S>(W, h, opt, obc::HessianOptions{damp}, run);
            }
            return prune_dict<S>(std::move(r));
          },
          py::arg("W"), py::arg("H"), py::arg("pattern"), py::arg("sparsity"), py::arg("spread"),
          py::arg("block"), py::arg("n"), py::arg("m"), py::arg("lazy_block"), py::arg("damp"),
          py::arg("num_threads"));
  mod.def("quantize_sparsegpt",
          [](RowRef<S> W, const py::array& H, const std::string& pattern, double sparsity,
             const std::string& spread, Index block, Index n, Index m, Index lazy_block, int bits,
             bool sym, Index group_size, const std::string& grid, double damp, int num_threads) {
            const obc::HessianRef h = hessian_ref(H);
            const obc::SparseGptOptions opt =
                sparsegpt_options(pattern, sparsity, spread, block, n, m, lazy_block);
            const obc::QuantOptions quant = quant_options(bits, sym, group_size, grid);
            obc_bindings::PythonInterrupt hook;
            const obc::RunOptions run = run_options(num_threads, 0, hook);
            obc::QuantResult<S> r;
            {
              py::gil_scoped_release release;
              r = obc::quantize_sparsegpt<S>(W, h, opt, quant, obc::HessianOptions{damp}, run);
            }
            return quant_dict<S>(std::move(r));
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

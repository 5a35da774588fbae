// pybind11 module obc_native._core: validate under the GIL, release it, solve, rebuild outputs.
// Conversion policy (dtypes, contiguity, finiteness messages) lives in python/obc_native/_arrays.py;
// this layer only accepts C-contiguous float32/float64 arrays and maps C++ errors to Python.
#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <type_traits>

#include "obc/build_info.hpp"
#include "obc/errors.hpp"
#include "obc/hessian.hpp"
#include "obc/prune.hpp"
#include "obc/quant.hpp"
#include "obc/quant_select.hpp"
#include "convert.hpp"
#include "register.hpp"

namespace py = pybind11;
using obc::Index;

namespace {

using obc_bindings::PythonInterrupt;

using obc_bindings::hessian_ref;
using obc_bindings::mask_kept;
using obc_bindings::parse_spread;
using obc_bindings::precision_of;
using obc_bindings::prune_dict;
using obc_bindings::quant_dict;
using obc_bindings::quant_options;
using obc_bindings::run_options;
using obc_bindings::RowRef;
using obc_bindings::to_array;
using obc_bindings::to_vector;

// Hands an Eigen matrix to numpy without copying it: the array owns it through a capsule.
template <class T>
py::array_t<T> to_array_moved(obc::RowMatrix<T>&& m) {
  auto* owned = new obc::RowMatrix<T>(std::move(m));
  py::capsule owner(owned, [](void* p) { delete static_cast<obc::RowMatrix<T>*>(p); });
  return py::array_t<T>({owned->rows(), owned->cols()}, owned->data(), owner);
}

obc::QuantMethod parse_method(const std::string& name) {
  for (auto m : {obc::QuantMethod::Obq, obc::QuantMethod::Gptq, obc::QuantMethod::GptqNatural,
                 obc::QuantMethod::Rtn})
    if (name == obc::quant_method_name(m)) return m;
  throw obc::InvalidArgument("method: expected 'obq', 'gptq', 'gptq-natural' or 'rtn', got '" +
                             name + "'");
}

template <class S>
void bind_scalar(py::module_& m) {
  m.def("prune_unstructured",
        [](RowRef<S> W, const py::array& H, double sparsity, const std::string& spread, double damp,
           int num_threads, int lazy_batch) {
          const obc::HessianRef h = hessian_ref(H);
          const obc::Spread sp = parse_spread(spread);
          PythonInterrupt hook;
          obc::PruneResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::prune_unstructured<S>(W, h, sparsity, sp, obc::HessianOptions{damp},
                                           run_options(num_threads, lazy_batch, hook));
          }
          return prune_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("sparsity"), py::arg("spread"), py::arg("damp"),
        py::arg("num_threads"), py::arg("lazy_batch") = 0);
  m.def("prune_blocked",
        [](RowRef<S> W, const py::array& H, double sparsity, Index block, const std::string& spread,
           double damp, int num_threads, int lazy_batch) {
          const obc::HessianRef h = hessian_ref(H);
          const obc::Spread sp = parse_spread(spread);
          PythonInterrupt hook;
          obc::PruneResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::prune_blocked<S>(W, h, sparsity, block, sp, obc::HessianOptions{damp},
                                      run_options(num_threads, lazy_batch, hook));
          }
          return prune_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("sparsity"), py::arg("block"), py::arg("spread"),
        py::arg("damp"), py::arg("num_threads"), py::arg("lazy_batch") = 0);
  m.def("prune_nm",
        [](RowRef<S> W, const py::array& H, Index n, Index mm, double damp, int num_threads, int lazy_batch) {
          const obc::HessianRef h = hessian_ref(H);
          PythonInterrupt hook;
          obc::PruneResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::prune_nm<S>(W, h, n, mm, obc::HessianOptions{damp},
                                 run_options(num_threads, lazy_batch, hook));
          }
          return prune_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("n"), py::arg("m"), py::arg("damp"),
        py::arg("num_threads"), py::arg("lazy_batch") = 0);
  m.def("prune_structured",
        [](RowRef<S> W, const py::array& H, double sparsity, Index group, double damp, int num_threads) {
          const obc::HessianRef h = hessian_ref(H);
          PythonInterrupt hook;
          obc::PruneResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::prune_structured<S>(W, h, sparsity, group, obc::HessianOptions{damp},
                                         run_options(num_threads, 0, hook));
          }
          return prune_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("sparsity"), py::arg("group"), py::arg("damp"),
        py::arg("num_threads"));
  m.def("trace",
        [](RowRef<S> W, const py::array& H, Index block, double damp, int num_threads, int lazy_batch,
           std::vector<Index> record_steps) {
          const obc::HessianRef h = hessian_ref(H);
          PythonInterrupt hook;
          obc::Trace t;
          obc::PreparedHessian prep;
          std::vector<obc::RowMatrix<S>> recorded;
          bool float64_fallback = false;
          {
            py::gil_scoped_release release;
            const obc::RunOptions run = run_options(num_threads, lazy_batch, hook);
            prep = obc::prepare_hessian(h, obc::HessianOptions{damp}, num_threads, &hook);
            // Only the row kernels read the inverse here, and float32 ones compute in float32.
            if constexpr (std::is_same_v<S, float>) {
              prep.keep_float32_only();
              try {
                t = obc::trace_rows<S>(W, prep, block, record_steps, recorded, run);
              } catch (const obc::PrecisionLost&) {
                float64_fallback = true;  // redo the layer in float64, same damping
              }
              if (float64_fallback) {
                prep = obc::prepare_hessian(h, obc::HessianOptions{damp}, num_threads, &hook);
                const obc::RowMatrix<double> w64 = W.template cast<double>();
                std::vector<obc::RowMatrix<double>> recorded64;
                t = obc::trace_rows<double>(w64, prep, block, record_steps, recorded64, run);
                recorded.clear();
                for (const obc::RowMatrix<double>& layer : recorded64)
                  recorded.push_back(layer.template cast<float>());
              }
            } else {
              t = obc::trace_rows<S>(W, prep, block, record_steps, recorded, run);
            }
            prep.hinv_lower_f32 = std::vector<float>();
            prep.hinv = Eigen::MatrixXd();
          }
          py::dict d;
          d["order"] = to_array_moved<std::int32_t>(std::move(t.order));
          d["losses"] = to_array_moved<double>(std::move(t.step_losses));
          d["damp"] = prep.damp;
          d["damp_absolute"] = prep.damp_absolute;
          d["precision"] = precision_of<S>(float64_fallback);
          py::list layers;
          for (obc::RowMatrix<S>& layer : recorded)
            layers.append(to_array_moved<S>(std::move(layer)));
          d["recorded"] = layers;
          return d;
        },
        py::arg("W"), py::arg("H"), py::arg("block"), py::arg("damp"), py::arg("num_threads"),
        py::arg("lazy_batch") = 0, py::arg("record_steps") = std::vector<Index>{});
  m.def("solve_masked",
        [](RowRef<S> W, const py::array& H, Eigen::Ref<const obc::MaskMatrix> pruned, double damp,
           int num_threads) {
          const obc::HessianRef h = hessian_ref(H);
          PythonInterrupt hook;
          obc::PruneResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::solve_masked<S>(W, h, obc::MaskMatrix(pruned), obc::HessianOptions{damp},
                                     run_options(num_threads, 0, hook));
          }
          return prune_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("pruned"), py::arg("damp"), py::arg("num_threads"));
  m.def("quantize",
        [](RowRef<S> W, const py::array& H, int bits, bool sym, Index group_size,
                        const std::string& grid, double damp, int num_threads, int lazy_batch) {
          const obc::HessianRef h = hessian_ref(H);
          const obc::QuantOptions opt = quant_options(bits, sym, group_size, grid);
          PythonInterrupt hook;
          obc::QuantResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::quantize<S>(W, h, opt, obc::HessianOptions{damp},
                                 run_options(num_threads, lazy_batch, hook));
          }
          return quant_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("bits"), py::arg("sym"), py::arg("group_size"),
        py::arg("grid"), py::arg("damp"), py::arg("num_threads"), py::arg("lazy_batch") = 0);
  m.def("quantize_select",
        [](RowRef<S> W, const py::array& H, int bits, bool sym, Index group_size,
                        const std::string& grid, double damp, int num_threads,
                        const std::vector<std::string>& methods, int refine_passes,
                        double refine_tol, bool refine_damped, Index gptq_block_size,
                        Index refine_block_size, int refit_rounds) {
          const obc::HessianRef h = hessian_ref(H);
          const obc::QuantOptions opt = quant_options(bits, sym, group_size, grid);
          obc::QuantSelectOptions sopt;
          sopt.refit_rounds = refit_rounds;
          sopt.methods.clear();
          for (const std::string& name : methods) sopt.methods.push_back(parse_method(name));
          sopt.refine.max_passes = refine_passes;
          sopt.refine.rel_tol = refine_tol;
          sopt.refine.damped = refine_damped;
          sopt.refine.block_size = refine_block_size;
          sopt.gptq_block_size = gptq_block_size;
          PythonInterrupt hook;
          obc::QuantResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::quantize_select<S>(W, h, opt, sopt, obc::HessianOptions{damp},
                                        run_options(num_threads, 0, hook));
          }
          return quant_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("bits"), py::arg("sym"), py::arg("group_size"),
        py::arg("grid"), py::arg("damp"), py::arg("num_threads"), py::arg("methods"),
        py::arg("refine_passes"), py::arg("refine_tol"), py::arg("refine_damped") = false,
        py::arg("gptq_block_size") = 128, py::arg("refine_block_size") = 0,
        py::arg("refit_rounds") = 0);
  m.def("quantize_rtn",
        [](RowRef<S> W, const py::array& H, int bits, bool sym, Index group_size,
                        const std::string& grid, int num_threads) {
          const obc::HessianRef h = hessian_ref(H);
          const obc::QuantOptions opt = quant_options(bits, sym, group_size, grid);
          PythonInterrupt hook;
          obc::QuantResult<S> r;
          {
            py::gil_scoped_release release;
            r = obc::quantize_rtn<S>(W, h, opt, obc::HessianOptions{},
                                     run_options(num_threads, 0, hook));
          }
          return quant_dict<S>(std::move(r));
        },
        py::arg("W"), py::arg("H"), py::arg("bits"), py::arg("sym"), py::arg("group_size"),
        py::arg("grid"), py::arg("num_threads"));
  // Private: make_grid alone, by its fast path or by the plain scan (the reference it must
  // match bit for bit); for tests and benchmarks. Returns (scale, zero), rows x groups.
  m.def("_make_grid",
        [](RowRef<S> W, int bits, bool sym, Index group_size, const std::string& grid,
           int num_threads, bool plain_scan, double mse_norm) {
          obc::QuantOptions opt = quant_options(bits, sym, group_size, grid);
          opt.mse_norm = mse_norm;
          obc::QuantGrid<S> g;
          PythonInterrupt hook;
          {
            py::gil_scoped_release release;
            g = plain_scan ? obc::detail::make_grid_plain_scan<S>(W, opt, num_threads, &hook)
                           : obc::make_grid<S>(W, opt, num_threads, &hook);
          }
          return py::make_tuple(to_array<S>(g.scale), to_array<std::uint8_t>(g.zero));
        },
        py::arg("W"), py::arg("bits"), py::arg("sym"), py::arg("group_size"), py::arg("grid"),
        py::arg("num_threads"), py::arg("plain_scan") = false, py::arg("mse_norm") = 2.4);
  m.def("layer_loss",
        [](RowRef<S> W, RowRef<S> W_hat, const py::array& H, int num_threads) {
          const obc::HessianRef h = hessian_ref(H);
          PythonInterrupt hook;
          Eigen::VectorXd losses;
          {
            py::gil_scoped_release release;
            losses = obc::row_losses<S>(W, W_hat, h, num_threads, &hook);
          }
          return to_vector(losses);
        },
        py::arg("W"), py::arg("W_hat"), py::arg("H"), py::arg("num_threads"));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "obc_native compiled core (private; use the obc_native package API)";
  static py::exception<obc::NotPositiveDefinite> hessian_error(m, "HessianError",
                                                               PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const obc::Interrupted&) {
      obc_bindings::raise_interrupted();
    } catch (const obc::NotPositiveDefinite& e) {
      py::set_error(hessian_error, e.what());
    } catch (const obc::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  // The one counting rule of every sparsity target; the Python helpers and baselines call it so
  // that they prune exactly as many items as the solvers at the same nominal sparsity.
  m.def("count_for_sparsity",
        [](Index total, double sparsity) {
          OBC_CHECK(total >= 0, "total: expected a count >= 0, got ", total);
          return obc::count_for_sparsity(sparsity, total);
        },
        "Number of items `sparsity` asks of `total`: ceil(sparsity * total), robust to binary "
        "rounding (0.3 * 10 gives 3). Raises ValueError unless 0 <= sparsity <= 1.",
        py::arg("total"), py::arg("sparsity"));
  m.def("auto_quant_methods",
        [](Index cols) {
          std::vector<std::string> names;
          for (const obc::QuantMethod method : obc::auto_quant_methods(cols))
            names.emplace_back(obc::quant_method_name(method));
          return names;
        },
        py::arg("cols"),
        "The candidates of quantize(method='auto') for a layer of `cols` inputs.");
  m.attr("AUTO_OBQ_MAX_COLS") = obc::kAutoObqMaxCols;
  m.def("build_info", []() {
    const obc::BuildInfo info = obc::build_info();
    py::dict d;
    d["version"] = info.version;
    d["openmp"] = info.openmp;
    d["max_threads"] = info.max_threads;
    d["eigen_version"] = info.eigen_version;
    d["cuda"] = info.cuda;
    d["simd"] = info.simd;
    d["kernel_isa"] = info.kernel_isa;
    d["avx512_kernels"] = info.avx512_kernels;
    d["grid_screen_isa"] = info.grid_screen_isa;
    d["compiler"] = info.compiler;
    return d;
  });
  py::module_ f32 = m.def_submodule("f32", "float32 kernels");
  py::module_ f64 = m.def_submodule("f64", "float64 kernels");
  bind_scalar<float>(f32);
  bind_scalar<double>(f64);
  obc_bindings::register_hessian_io(m);
  obc_bindings::register_dp(m);
  obc_bindings::register_sparsegpt(m);
}

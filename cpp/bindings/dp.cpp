// Bindings for the budgeted level solver (obc/dp.hpp): _core.solve_levels.
// Validation of values (finite, sizes) is the core's; the Python front (obc_native.budget)
// converts user input to lists of C-contiguous float64 1-D arrays first.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "obc/dp.hpp"
#include "obc/errors.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace {

/// Copies a list of 1-D float64 arrays into Eigen vectors (GIL held).
std::vector<Eigen::VectorXd> to_vectors(const py::list& arrays, const char* name) {
  std::vector<Eigen::VectorXd> out;
  out.reserve(arrays.size());
  for (size_t l = 0; l < arrays.size(); ++l) {
    py::handle item = arrays[l];
    if (!py::isinstance<py::array>(item))
      throw py::type_error(std::string(name) + "[" + std::to_string(l) +
                           "]: expected a numpy array, got " +
                           std::string(py::str(item.get_type().attr("__name__"))));
    auto arr = py::reinterpret_borrow<py::array>(item);
    if (!arr.dtype().is(py::dtype::of<double>()) || arr.ndim() != 1 ||
        !(arr.flags() & py::array::c_style))
      throw py::type_error(std::string(name) + "[" + std::to_string(l) +
                           "]: expected a C-contiguous 1-D float64 array, got dtype " +
                           std::string(py::str(arr.dtype())) + " with " +
                           std::to_string(arr.ndim()) + " dimensions");
    const auto* data = static_cast<const double*>(arr.data());
    Eigen::VectorXd v(arr.shape(0));
    std::copy(data, data + arr.shape(0), v.data());
    out.push_back(std::move(v));
  }
  return out;
}

}  // namespace

namespace obc_bindings {

void register_dp(pybind11::module_& m) {
  m.def(
      "solve_levels",
      [](const py::list& losses, const py::list& costs, double budget, obc::Index buckets,
         bool lower_bound) {
        const std::vector<Eigen::VectorXd> loss_vectors = to_vectors(losses, "losses");
        const std::vector<Eigen::VectorXd> cost_vectors = to_vectors(costs, "costs");
        obc_bindings::PythonInterrupt hook;
        obc::LevelDpOptions options;
        options.buckets = buckets;
        options.lower_bound = lower_bound;
        options.interrupt = &hook;
        obc::LevelDpResult r;
        {
          py::gil_scoped_release release;
          r = obc::solve_levels(loss_vectors, cost_vectors, budget, options);
        }
        py::array_t<std::int64_t> choice(static_cast<py::ssize_t>(r.choice.size()));
        std::copy(r.choice.begin(), r.choice.end(), choice.mutable_data());
        py::dict d;
        d["choice"] = choice;
        d["cost"] = r.cost;
        d["loss"] = r.loss;
        d["budget"] = r.budget;
        d["min_cost"] = r.min_cost;
        d["bucket_width"] = r.bucket_width;
        d["cost_slack_bound"] = r.cost_slack_bound;
        d["loss_lower_bound"] = r.loss_lower_bound;
        d["buckets"] = r.buckets;
        d["units_used"] = r.units_used;
        return d;
      },
      py::arg("losses"), py::arg("costs"), py::arg("budget"), py::arg("buckets") = 10000,
      py::arg("lower_bound") = true,
      "Budgeted level selection (obc/dp.hpp): one level per layer, minimal summed loss with "
      "summed cost <= budget. losses, costs: lists of C-contiguous 1-D float64 arrays.");
}

}  // namespace obc_bindings

// The steps the quantizers' public entry points share (quantize, quantize_gptq, quantize_select,
// and the tail of quantize_sparsegpt): checks, the grid, the float32 attempt with its float64
// redo, and the assembly of a one-quantizer result, so that each entry point states only its
// own checks and its own solve.
#pragma once

#include <Eigen/Core>
#include <type_traits>
#include <utility>

#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "obc/errors.hpp"
#include "obc/hessian.hpp"
#include "obc/quant.hpp"

namespace obc::internal {

/// A float32 layer redone in float64 because its float32 elimination lost positive definiteness
/// (PrecisionLost): `solve(w64, grid64)` solves W widened to float64 on the float32 `grid` widened
/// (same damping, never re-damped). The result takes the solved codes on the solved scales
/// rounded to float32 (the float32 grid itself unless a scale refit changed it). The losses are those of
/// the rounded weights; the result reports float64_fallback.
template <class Solve>
QuantResult<float> redo_in_float64(const Eigen::Ref<const RowMatrix<float>>& W, const HessianRef& H,
                                   QuantGrid<float>&& grid, const RunOptions& run, Solve&& solve) {
  QuantGrid<double> grid64;
  grid64.scale = grid.scale.template cast<double>();
  grid64.zero = grid.zero;
  grid64.bits = grid.bits;
  grid64.group_size = grid.group_size;
  const RowMatrix<double> w64 = W.template cast<double>();
  QuantResult<double> r64 = solve(w64, std::move(grid64));
  QuantResult<float> result;
  // The scales as solved (quantize_select's scale refit may have changed them), rounded to
  // float32; the weights are the codes on those float32 scales, so they lie exactly on the grid
  // (without a refit both are the float32 grid's own: a float32 scale times a code difference
  // rounds once either way).
  result.grid = std::move(grid);
  result.grid.scale = r64.grid.scale.template cast<float>();
  result.codes = std::move(r64.codes);
  result.weight.resize(W.rows(), W.cols());
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < W.cols(); ++c)
      result.weight(r, c) = grid_at(result.grid, r, c).value(static_cast<int>(result.codes(r, c)));
  result.pruned = std::move(r64.pruned);
  result.row_losses = row_losses<float>(W, result.weight, H, run.num_threads, run.interrupt);
  result.row_losses_unrefined = r64.row_losses_unrefined;
  result.row_method = std::move(r64.row_method);
  result.refine_passes = r64.refine_passes;
  result.damp = r64.damp;
  result.damp_absolute = r64.damp_absolute;
  result.float64_fallback = true;
  return result;
}

/// The body of a quantizer's public entry point. Checks, in this order (the first failure's
/// message is the one reported): `opt` (QuantOptions), then `check_own()` (the quantizer's own
/// options), then W (non-empty, finite) against H's size (check_layer_inputs); fits the grid on W as given (make_grid: rows in parallel,
/// polls run.interrupt); then returns solve(w, grid): w the layer (rows x cols) as
/// Eigen::Ref<const RowMatrix<S>>, grid the fitted grid as QuantGrid<S>&&, S the precision to
/// solve in (solve is generic: [&](const auto& w, auto&& grid) { using S = ...; }).
/// float64 W: solved in float64. float32 W: solved in float32 first; where that throws
/// PrecisionLost (a float32 elimination or factor lost positive definiteness), the whole layer is
/// solved again in float64 on the same grid (redo_in_float64: never re-damped).
template <class Scalar, class CheckOwn, class Solve>
QuantResult<Scalar> quantize_entry(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                   const HessianRef& H, const QuantOptions& opt,
                                   const RunOptions& run, CheckOwn&& check_own, Solve&& solve) {
  check_quant_options(opt, W.cols());
  check_own();
  check_layer_inputs<Scalar>(W, H.rows());
  QuantGrid<Scalar> grid = make_grid<Scalar>(W, opt, run.num_threads, run.interrupt);
  if constexpr (std::is_same_v<Scalar, double>) {
    return solve(W, std::move(grid));
  } else {
    try {
      return solve(W, QuantGrid<float>(grid));  // a copy: the float64 redo needs the grid
    } catch (const PrecisionLost&) {
    }
    return redo_in_float64(W, H, std::move(grid), run,
                           [&](const RowMatrix<double>& w64, QuantGrid<double>&& grid64) {
                             return solve(Eigen::Ref<const RowMatrix<double>>(w64),
                                          std::move(grid64));
                           });
  }
}

/// Completes `result` (weight and grid set, rows x cols) as the result of one quantizer that
/// produced every row: codes from the weights, `losses` (rows) as both row_losses and
/// row_losses_unrefined, `method` for every row, and prep's damping (damp, damp_absolute).
/// num_threads: the codes' row chunks in parallel (large layers only; the same codes).
template <class Scalar>
void finish_one_method(QuantResult<Scalar>& result, Eigen::VectorXd&& losses, QuantMethod method,
                       const PreparedHessian& prep, int num_threads) {
  fill_codes(result, num_threads);
  result.row_losses = std::move(losses);
  result.row_losses_unrefined = result.row_losses;
  result.row_method.setConstant(result.weight.rows(), static_cast<std::uint8_t>(method));
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
}

/// One quantizer over the whole layer W (rows x cols, already checked) on `grid` (fitted on W),
/// in precision Scalar (float: PrecisionLost where float32 arithmetic fails). Prepares H with
/// hopt (H^-1 only when `invert`), checks W's scale against it (check_layer_scale), then calls
/// into(W, prep, grid, weight): it writes the weights (rows x cols, on grid) and returns its
/// step losses (rows: GPTQ's sweep, turned into row losses by gptq_row_losses), or an empty
/// vector (the losses are then measured with row_losses). Every row reports `method`.
template <class Scalar, class Into>
QuantResult<Scalar> one_method_on_grid(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, QuantGrid<Scalar>&& grid,
                                       const HessianOptions& hopt, bool invert, QuantMethod method,
                                       const RunOptions& run, Into&& into) {
  HessianOptions prep_options = hopt;
  prep_options.invert = invert;
  PreparedHessian prep = prepare_hessian(H, prep_options, run.num_threads, run.interrupt);
  check_layer_scale<Scalar>(W, prep, run.num_threads);
  QuantResult<Scalar> result;
  result.grid = std::move(grid);
  Eigen::VectorXd step_losses = into(W, prep, result.grid, result.weight);
  check_finite_weights(result.weight, run.num_threads);
  result.pruned = pruned_mask<Scalar>(W, prep.dead, run.num_threads);
  Eigen::VectorXd losses =
      step_losses.size() == W.rows()
          ? gptq_row_losses<Scalar>(W, result.weight, H, prep, std::move(step_losses), run)
          : row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
  finish_one_method(result, std::move(losses), method, prep, run.num_threads);
  return result;
}

/// The whole entry point of a quantizer that produces every row itself (quantize_entry with
/// one_method_on_grid as the solve): `check_own` and `into` as theirs, `into` generic over the
/// precision (into(w, prep, grid, weight) with w an Eigen::Ref<const RowMatrix<S>>, grid a
/// const QuantGrid<S>&, weight a RowMatrix<S>&).
template <class Scalar, class CheckOwn, class Into>
QuantResult<Scalar> quantize_one_method(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                        const HessianRef& H, const QuantOptions& opt,
                                        const HessianOptions& hopt, const RunOptions& run,
                                        QuantMethod method, bool invert, CheckOwn&& check_own,
                                        Into&& into) {
  return quantize_entry<Scalar>(W, H, opt, run, check_own, [&](const auto& w, auto&& grid) {
    using S = typename std::decay_t<decltype(w)>::Scalar;
    return one_method_on_grid<S>(w, H, std::move(grid), hopt, invert, method, run, into);
  });
}

}  // namespace obc::internal

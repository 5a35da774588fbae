// Assembling a PruneResult: the final weights, their mask, exact row losses and the damping.
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

#include "obc/hessian.hpp"
#include "obc/prune.hpp"

namespace obc::internal {

/// check_scale for a layer solved in W's own precision (float32 rows: float32 kernels, which
/// also hold the inverse in float32: its diagonal, which bounds every entry, must fit there).
template <class Scalar>
inline void check_layer_scale(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                              const PreparedHessian& prep) {
  check_scale<Scalar>(W, prep.live_trace, static_cast<double>(std::numeric_limits<Scalar>::max()),
                      std::is_same_v<Scalar, float> ? "float32" : "float64");
  if (!std::is_same_v<Scalar, float> || prep.hinv.size() == 0) return;
  const double largest = prep.hinv.diagonal().maxCoeff(), smallest = prep.hinv.diagonal().minCoeff();
  if (largest <= std::numeric_limits<float>::max() / 256 &&
      smallest >= 256 * static_cast<double>(std::numeric_limits<float>::min()))
    return;
  throw Overflow(detail::concat(
      "H: its inverse (diagonal from ", smallest, " to ", largest, ") is out of float32 range ",
      "for float32 weights; rescale H (e.g. by its mean diagonal) or pass float64 W"));
}

/// Row losses are measured with the undamped H (see hessian.hpp row_losses).
template <class Scalar>
inline PruneResult<Scalar> finish_result(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H,
                                  const PreparedHessian& prep, RowMatrix<Scalar>&& weight,
                                  MaskMatrix&& pruned, const RunOptions& run) {
  PruneResult<Scalar> result;
  check_finite_result(weight, "weights");
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads);
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

/// The same from the greedy's own bookkeeping: `step_losses` (rows) holds each row's summed OBS
/// step losses, which add up to 1/2 dw (H + lambda I) dw^T over the live inputs, so the loss
/// with the undamped H is that minus 1/2 lambda ||dw_live||^2: O(rows cols) instead of a
/// second O(rows cols^2) pass. Exact up to rounding; clamped at 0.
template <class Scalar>
inline PruneResult<Scalar> finish_result_from_steps(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                                    const PreparedHessian& prep,
                                                    RowMatrix<Scalar>&& weight,
                                                    MaskMatrix&& pruned,
                                                    Eigen::VectorXd&& step_losses) {
  // Before the clamp below, which would turn a NaN loss into 0.
  check_finite_result(weight, "weights");
  check_finite_result(step_losses, "row losses");
  PruneResult<Scalar> result;
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  const Index rows = W.rows(), cols = W.cols();
  const double lambda = prep.damp_absolute;
  for (Index r = 0; r < rows; ++r) {
    double damping_part = 0;
    if (lambda > 0)
      for (Index c = 0; c < cols; ++c) {
        if (prep.dead[static_cast<size_t>(c)]) continue;
        const double dw = static_cast<double>(result.weight(r, c)) - static_cast<double>(W(r, c));
        damping_part += dw * dw;
      }
    step_losses[r] = std::max(0.0, step_losses[r] - 0.5 * lambda * damping_part);
  }
  result.row_losses = std::move(step_losses);
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

}  // namespace obc::internal

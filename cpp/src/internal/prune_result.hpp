// Assembling a PruneResult: the final weights, their mask, exact row losses and the damping.
#pragma once

#include <algorithm>
#include <utility>

#include "obc/hessian.hpp"
#include "obc/prune.hpp"

namespace obc::internal {

/// Row losses are measured with the undamped H (see hessian.hpp row_losses).
template <class Scalar>
inline PruneResult<Scalar> finish_result(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H,
                                  const PreparedHessian& prep, RowMatrix<Scalar>&& weight,
                                  MaskMatrix&& pruned, const RunOptions& run) {
  PruneResult<Scalar> result;
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
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

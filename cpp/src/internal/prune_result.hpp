// Assembling a PruneResult: the final weights, their mask, exact row losses and the damping.
#pragma once

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
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads);
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

}  // namespace obc::internal

// Structured ExactOBS pruning: whole groups of input columns removed from all rows at once.
// The greedy itself is kernels/structured_kernel.hpp (SIMD-dispatched); this is the public entry.
#include <cmath>

#include "internal/prepared_view.hpp"
#include "internal/prune_result.hpp"
#include "internal/row_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/prune.hpp"

namespace obc {

template <class Scalar>
PruneResult<Scalar> prune_structured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                     const HessianRef& H, double sparsity,
                                     Index group, const HessianOptions& hopt,
                                     const RunOptions& run) {
  OBC_CHECK(std::isfinite(sparsity) && sparsity >= 0 && sparsity <= 1,
            "sparsity: expected a value in [0, 1], got ", sparsity);
  OBC_CHECK(W.rows() > 0 && W.cols() > 0, "W: expected a non-empty rows x cols matrix, got ",
            W.rows(), "x", W.cols());
  OBC_CHECK(group >= 1 && W.cols() % group == 0, "group: expected a positive divisor of cols (",
            W.cols(), "), got ", group);
  const PreparedHessian prep = prepare_hessian(H, hopt, run.num_threads, run.interrupt);
  OBC_CHECK(prep.cols() == W.cols(), "H: expected ", W.cols(), "x", W.cols(), ", got ",
            prep.cols(), "x", prep.cols());
  OBC_CHECK(W.allFinite(), "W: expected finite values, got NaN or Inf");
  internal::check_layer_scale<Scalar>(W, prep);
  const Index rows = W.rows(), cols = W.cols(), num_groups = cols / group;
  const Index target = count_for_sparsity(sparsity, num_groups);

  RowMatrix<Scalar> W_copy;  // only when W's rows are not contiguous
  if (W.outerStride() != cols) W_copy = W;
  RowMatrix<Scalar> weight(rows, cols);
  MaskMatrix pruned(rows, cols);
  Eigen::VectorXd step_losses(rows);
  const internal::StructuredJob<Scalar> job{W_copy.size() > 0 ? W_copy.data() : W.data(),
                                            rows,
                                            internal::view_of(prep),
                                            group,
                                            target,
                                            weight.data(),
                                            pruned.data(),
                                            step_losses.data()};
  internal::row_kernels<Scalar>().structured(job, run);
  return internal::finish_result_from_steps<Scalar>(W, H, prep, std::move(weight),
                                                    std::move(pruned), std::move(step_losses),
                                                    run.num_threads);
}

template PruneResult<float> prune_structured<float>(const Eigen::Ref<const RowMatrix<float>>&,
                                                    const HessianRef&,
                                                    double, Index, const HessianOptions&,
                                                    const RunOptions&);
template PruneResult<double> prune_structured<double>(const Eigen::Ref<const RowMatrix<double>>&,
                                                      const HessianRef&,
                                                      double, Index, const HessianOptions&,
                                                      const RunOptions&);

}  // namespace obc

// Refit of the grid scales given the codes: the exact least-squares step that follows the choice
// of codes in quantize_select (the codes are fixed, each group's scale is a free variable).
#pragma once

#include <Eigen/Core>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/quant.hpp"

namespace obc::internal {

/// For every row r, the scales s (one per group of the row) minimizing the objective
///   1/2 (w - A s)^T hd (w - A s),  A(c, g) = code(r, c) - zero(r, g) for c in group g (0 else),
/// over the free inputs (pruned == 0; pruned entries stay as they are, and are 0 on any grid).
/// The codes of `weight` (on `grid`) are kept; grid.scale(r, .) and weight(r, .) are replaced
/// where the solution is finite and every solved scale is > 0 (groups without a non-zero
/// code keep their scale). hd: cols x cols, from refine_hessian. Rows are independent; chunked
/// as the refinement, so the floats do not depend on the thread count. The caller decides per
/// row whether to keep the result (the stored scale is rounded to Scalar, so the exact loss of
/// a refit row can differ in the last bits from the float64 optimum). Returns the number of rows
/// whose scales changed. Rows with more than 256 groups are left as they are.
template <class Scalar>
Index refit_scales_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const Eigen::MatrixXd& hd,
                        const MaskMatrix& pruned, const RunOptions& run, QuantGrid<Scalar>& grid,
                        RowMatrix<Scalar>& weight);

}  // namespace obc::internal

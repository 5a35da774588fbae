// Pieces shared by the quantizers (quant.cpp, gptq.cpp, quant_refine.cpp, quant_select.cpp):
// option and input checks, grid lookup, codes, and each quantizer on an already prepared
// Hessian and grid, so that quantize_select prepares them once for all candidates (the entry
// points' common steps around these are in quant_entry.hpp).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <utility>

#include "internal/grid_point.hpp"
#include "internal/prune_result.hpp"
#include "obc/gptq.hpp"
#include "obc/hessian.hpp"
#include "obc/quant.hpp"
#include "obc/quant_refine.hpp"

namespace obc::internal {

void check_quant_options(const QuantOptions& opt, Index cols);
void check_refine_options(const RefineOptions& opt);
void check_gptq_options(const GptqOptions& opt);

template <class Scalar>
inline GridPoint<Scalar> grid_at(const QuantGrid<Scalar>& grid, Index r, Index c) {
  const Index g = c / grid.group_size;
  return GridPoint<Scalar>{grid.scale(r, g), static_cast<int>(grid.zero(r, g)),
                           (1 << grid.bits) - 1};
}

/// codes from weight (every weight lies on its grid). num_threads: row chunks in parallel
/// (the same codes for any count; large layers only).
template <class Scalar>
void fill_codes(QuantResult<Scalar>& result, int num_threads = 1);

/// rows x cols: 1 where W is zero or the input is dead (num_threads as fill_codes).
template <class Scalar>
MaskMatrix pruned_mask(const Eigen::Ref<const RowMatrix<Scalar>>& W, const std::vector<char>& dead,
                       int num_threads = 1);

/// OBQ weights into `out` (rows x cols). For float32, prep is switched to its float32 copy
/// (PreparedHessian::keep_float32_only), so call this after anything that needs prep.hinv.
template <class Scalar>
void obq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, PreparedHessian& prep,
              const QuantGrid<Scalar>& grid, const QuantOptions& opt, const RunOptions& run,
              RowMatrix<Scalar>& out);

/// GPTQ weights into `out` (rows x cols). prep: prepare_hessian of H (H^-1 not needed: the
/// factor of the permuted inverse is found from H itself, 2/3 cols^3 flops; throws
/// NotPositiveDefinite as prepare_hessian does, and for float32 W Overflow when diag(H^-1) is out
/// of float32 range, as check_layer_scale does). hdiag: diag(H) (cols), the act-order key.
/// step_losses (may be null): set to each row's summed OBS step losses, 1/2 dw (H + lambda I)
/// dw^T over the live inputs (see gptq_row_losses).
template <class Scalar>
void gptq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
               const PreparedHessian& prep, const Eigen::VectorXd& hdiag,
               const QuantGrid<Scalar>& grid, const GptqOptions& gopt, const RunOptions& run,
               RowMatrix<Scalar>& out, Eigen::VectorXd* step_losses = nullptr);

/// The row losses 1/2 dw H dw^T (rows) of GPTQ's weights `out` (rows x cols, from gptq_into on
/// W with prep), taken from its step losses (gptq_into's step_losses, rows): in exact arithmetic
/// they add up to 1/2 dw (H + lambda I) dw^T over the live inputs, so the loss is that minus
/// 1/2 lambda ||dw_live||^2, O(rows cols) instead of the O(rows cols^2) measure. Where the
/// damping's share is over half the damped loss (cancellation), the row's 256-row chunk (the
/// row-loss kernel's own chunk, so the values do not depend on how the rows were split) is
/// measured with row_losses instead. Every API that reports GPTQ losses (quantize_gptq,
/// quantize_select, so quantize and the C API) takes them from here, so they agree bit for bit.
template <class Scalar>
Eigen::VectorXd gptq_row_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                const RowMatrix<Scalar>& out, const HessianRef& H,
                                const PreparedHessian& prep, Eigen::VectorXd step_losses,
                                const RunOptions& run);

/// The refinement's Hessian: (H + H^T) / 2, plus prep.damp_absolute on the live diagonal when
/// `damped` (the matrix the solvers invert), 1 on the diagonal of dead inputs (cols x cols).
Eigen::MatrixXd refine_hessian(const HessianRef& H, const PreparedHessian& prep, bool damped);

/// diag(H) in float64 (cols).
Eigen::VectorXd hessian_diagonal(const HessianRef& H);

/// Coordinate descent on the codes of `weight` (rows x cols, on `grid`), objective with the
/// Hessian `hd` (from refine_hessian); entries with pruned == 1 are not changed.
/// damp_absolute: the layer's lambda (PreparedHessian::damp_absolute), which the block moves'
/// proposals use in part. Returns the largest number of passes any row ran.
template <class Scalar>
int refine_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const Eigen::MatrixXd& hd,
                double damp_absolute, const QuantGrid<Scalar>& grid, const MaskMatrix& pruned, const RefineOptions& ropt,
                const RunOptions& run, RowMatrix<Scalar>& weight);

}  // namespace obc::internal

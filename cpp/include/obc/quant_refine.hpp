// Refinement of a quantized layer: exact coordinate descent over the integer codes.
//
// Each row's codes c (on its fixed grid) are changed (by block moves, see RefineOptions::block_size,
// then) one at a time to the value that minimizes
// the layer objective 1/2 (w - q(c)) H (w - q(c))^T given all the others: the 1-D
// quadratic's minimizer, clamped to [0, maxq], checked exactly at the two codes around it. The
// objective never increases. H is the undamped Hessian by default, so the loss that is reported
// (row_losses) never increases; RefineOptions::damped uses the damped one the quantizers
// minimize instead. The gradient g = H (q - w) is kept per row and updated in
// O(cols) per change, so a pass costs O(cols) per code plus O(cols) per changed code. The rows
// of a fixed chunk of 64 run their passes together, block by block, and g is kept exact only on
// the current block's inputs, the block's changes reaching the rest of g at its end as one
// product for all rows of the chunk (GPTQ's lazy updates): each row makes the same moves as
// alone, and H is read once per chunk and block instead of once per row and change.
#pragma once

#include <Eigen/Core>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/quant.hpp"
#include "obc/types.hpp"

namespace obc {

struct RefineOptions {
  /// Passes over all codes at most; 0 = no refinement. >= 0.
  int max_passes = 20;
  /// A row stops after a pass that lowered its objective by less than rel_tol times the
  /// objective at the pass's start. >= 0 (0: stop only when a pass changes nothing).
  double rel_tol = 1e-6;
  /// false: the objective is the reported loss 1/2 dw H dw^T with the undamped H, which then
  /// never increases. true: H plus the damping lambda on the live diagonal (the objective the
  /// quantizers themselves minimize; a milder, regularized target).
  bool damped = false;
  /// Block moves: before each pass of single-code moves, every block of block_size consecutive
  /// inputs of a row is re-quantized as a whole (GPTQ inside the block, in column order, from the
  /// block's continuous optimum given all other codes, solved with the objective's Hessian block
  /// plus a tenth of the layer's damping) and the new codes are kept where the exact objective
  /// drops. They make the correlated multi-code changes that single-code moves cannot
  /// (384 x 1536 layer with outlier features, 4 bits: GPTQ + single-code moves 0.957 x GPTQ's
  /// loss, with blocks of 128 0.878). Cost per pass: O(cols * block_size) per row plus O(cols)
  /// per accepted block. 0 or 1 = no block moves. >= 0.
  Index block_size = 128;
};

/// Refines `result` (from quantize, quantize_gptq or quantize_rtn of the same W, with the same
/// grid) in place: weight and codes change, row_losses is recomputed with the undamped H,
/// row_losses_unrefined keeps the loss before, refine_passes is the largest pass count of any
/// row. Weights that were zero on entry (result.pruned) and dead inputs are never changed. With
/// ropt.damped, the objective uses H damped as `hopt` says (result.damp is not read). Throws InvalidArgument for
/// a result whose shapes do not match W, or bad options. Bit-identical for any thread count.
template <class Scalar>
void refine_quantized(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
                      QuantResult<Scalar>& result, const RefineOptions& ropt = {},
                      const HessianOptions& hopt = {}, const RunOptions& run = {});

}  // namespace obc

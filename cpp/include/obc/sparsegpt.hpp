// SparseGPT: one-pass pruning (optionally joint with quantization) for wide layers.
//
// Frantar & Alistarh, "SparseGPT" (2023). Instead of ExactOBS's greedy over a private inverse
// per row (O(cols^3) per row), the columns are visited once, left to right, with the upper
// Cholesky factor U of the damped H^-1 shared by all rows (U^T U = H^-1): the row of U at column
// j holds the OBS update of the weights right of j when weight j is fixed with columns < j
// already fixed. Per column j:
//     err = (w_j - target_j) / U_jj,   w_{j+1:} -= err * U_{j, j+1:}
// where target_j is 0 (pruned), w_j (kept) or q(w_j) (kept, quantized). Columns are processed in
// lazy blocks of B: inside a block the update is applied column by column to the block only; the
// block's errors Err (rows x B) then update all later columns at once, W_later -= Err U_{B,later}
// (a GEMM). The mask is chosen adaptively from the current (updated) weights by the OBS score
// w_j^2 / U_jj^2: for unstructured and blocked patterns at the start of each lazy block, for N:M
// when a group's first column is reached. Paper letters: U = chol(H^-1)^T upper, B = lazy_block,
// Err = the scaled errors. Cost: O(cols^3) once for U, plus O(rows cols^2) for the sweep.
//
// Conventions shared with ExactOBS (prune.hpp): the same Hessian preparation (validation,
// relative damping, dead inputs), weights that are zero on entry and dead inputs are pruned and
// stay exactly zero, row losses are 1/2 dw H dw^T with the undamped H, computed in float64 after
// the sweep. Results are bit-identical for any thread count: rows are split into fixed chunks
// and the later-column update into fixed (row chunk, column panel) tiles.
#pragma once

#include <Eigen/Core>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/prune.hpp"
#include "obc/quant.hpp"
#include "obc/types.hpp"

namespace obc {

/// Which weights SparseGPT removes.
/// (The order is part of the kernels' plain interface, internal/sparsegpt_kernels.hpp.)
enum class SparsePattern {
  Unstructured,  ///< single weights, a fraction `sparsity` of them
  Blocked,       ///< blocks of `block` consecutive weights of a row, a fraction `sparsity` of them
  NM,            ///< at least n zeros in every group of m consecutive inputs of a row
};

struct SparseGptOptions {
  SparsePattern pattern = SparsePattern::Unstructured;
  /// Unstructured / Blocked: fraction of weights (blocks) to prune, in [0, 1].
  /// Counting rule (that of ExactOBS; a unit is a weight, or a block of `block` weights, and it is
  /// already pruned when all its weights are zero or dead): Global: the layer ends with exactly
  /// max(ceil(sparsity * rows * units), already pruned units) pruned units; Uniform: every row
  /// with exactly max(ceil(sparsity * units), its already pruned units). The new prunings are
  /// split over the lazy blocks in proportion to their live units (cumulative floor), and in
  /// each lazy block the units with the smallest summed scores are pruned: across all rows
  /// (Global) or per row (Uniform). Ties go to the lower (row, unit) index.
  double sparsity = 0.5;
  Spread spread = Spread::Global;
  /// Blocked: weights per block, a positive divisor of cols. Unstructured uses 1.
  Index block = 1;
  /// NM: 0 < n < m, cols % m == 0. A group with fewer than n zeros gets exactly n; one with more
  /// keeps them all.
  Index n = 2, m = 4;
  /// Columns per lazy block (the paper's B), >= 1; rounded down to a multiple of the pattern's
  /// unit (block, or m for N:M), at least one unit and at most cols. 128 is the paper's choice.
  Index lazy_block = 128;
};

/// SparseGPT pruning of W (rows x cols) with H (cols x cols). The sweep runs in Scalar (float32
/// layers in float32, as the paper); U is computed in float64 and rounded to Scalar.
/// Throws InvalidArgument for bad options or inputs, NotPositiveDefinite when the damped H
/// (or its inverse) has no Cholesky factor. Memory besides the result: the float64 cols x cols
/// inverse, 8 cols^2 bytes, which is factored in place and then holds U too (float32: rounded
/// in place into its first half), and a rows x lazy_block error block.
/// Flops: about cols^3 (inverse) + cols^3 / 3 (factor) + 2 rows cols^2 (sweep), against about
/// rows cols^3 for ExactOBS.
template <class Scalar>
PruneResult<Scalar> prune_sparsegpt(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                    const HessianRef& H, const SparseGptOptions& options,
                                    const HessianOptions& hopt = {}, const RunOptions& run = {});

/// Joint SparseGPT pruning + quantization in one sweep: pruned weights become 0, kept ones their
/// value on the grid, with the error fed forward like the pruning error. The grids are those of
/// quantize() (make_grid of the weights as given, per row or per group), fixed before the sweep;
/// 0 is on every grid, so pruned weights have the zero point's code. `pruned` in the result marks
/// the pruned weights (including zeros on entry and dead inputs).
template <class Scalar>
QuantResult<Scalar> quantize_sparsegpt(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, const SparseGptOptions& options,
                                       const QuantOptions& quant, const HessianOptions& hopt = {},
                                       const RunOptions& run = {});

}  // namespace obc

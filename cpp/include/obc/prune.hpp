// ExactOBS pruning: unstructured traces, N:M, blocks, and structured (whole input columns).
//
// Conventions (see README "Conventions"): W is rows x cols (outputs x inputs), H = 2/n X X^T is
// cols x cols. Each row is solved independently with the row's own inverse Hessian; greedy
// steps remove the weight (or block) with the smallest OBS score w_q^2 / [H^-1]_qq (blocks:
// w_B^T ([H^-1]_BB)^-1 w_B) and update the remaining weights optimally. A step's loss is half
// its score: the exact increase of 1/2 dw H dw^T under the damped H. Ties go to the lowest index.
// Weights that are already zero, and dead inputs, are pruned from the start (loss 0) and stay
// exactly zero in every mode.
#pragma once

#include <Eigen/Core>
#include <vector>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

/// How a layer sparsity is spread over rows.
enum class Spread {
  Global,   ///< the paper's way: the ceil(s * rows * steps) smallest step losses of the whole layer
  Uniform,  ///< every row gets ceil(s * steps) steps
};

/// Complete greedy elimination traces of a layer, one row per weight row.
/// For unstructured traces a step removes one weight; for blocked traces one block.
struct Trace {
  /// rows x steps: column (or block) index removed at each step. Already-pruned entries
  /// (existing zeros, dead inputs; for blocks, all-zero blocks) come first, in index order.
  IndexMatrix order;
  /// rows x steps: loss increase of each step under the damped H (0 for already-pruned ones).
  RowMatrixXd step_losses;
  Index block = 1;  ///< weights per step (1 = unstructured)
};

/// Result of a pruning solve.
template <class Scalar>
struct PruneResult {
  RowMatrix<Scalar> weight;     ///< rows x cols pruned and updated weights
  MaskMatrix pruned;            ///< rows x cols, 1 where the weight is pruned (exactly zero)
  Eigen::VectorXd row_losses;   ///< rows: 1/2 dw H dw^T with the undamped H
  double damp = 0.0;            ///< relative damping used
  double damp_absolute = 0.0;   ///< absolute damping added to the diagonal
  /// float32 layers only: true when the float32 elimination lost positive definiteness (an
  /// ill-conditioned H) and the layer was redone in float64; `weight` is then that float64
  /// result rounded to float32 and `row_losses` are measured on the rounded weights.
  bool float64_fallback = false;
};

/// Number of steps `sparsity` asks of `steps` items: ceil(sparsity * steps), robust to
/// floating point noise (0.3 * 10 gives 3). Throws InvalidArgument unless 0 <= sparsity <= 1.
Index count_for_sparsity(double sparsity, Index steps);

/// Full ExactOBS trace of every row (unstructured when block == 1, else blocks of `block`
/// consecutive weights; cols % block == 0 required). Memory: O(rows*cols) for the result plus
/// O(threads * cols^2) workspace.
template <class Scalar>
Trace trace_rows(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& hessian,
                 Index block = 1, const RunOptions& run = {});

/// The same, also keeping the greedy's own weights as every row passes record_steps[k] steps
/// (each in [0, cols / block], counted like steps_per_row(trace, s, Spread::Uniform), i.e.
/// including entries pruned on entry): recorded[k] is rows x cols, zero where pruned. The
/// greedy's updates are exact, so these are the optimal weights for those masks (what
/// solve_masked returns, computed in the kernels' precision) without any re-solve.
template <class Scalar>
Trace trace_rows(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& hessian,
                 Index block, const std::vector<Index>& record_steps,
                 std::vector<RowMatrix<Scalar>>& recorded, const RunOptions& run = {});

/// Steps per row for a layer sparsity, spread globally or uniformly (see Spread).
Eigen::Matrix<Index, Eigen::Dynamic, 1> steps_per_row(const Trace& trace, double sparsity,
                                                      Spread spread);

/// Builds the pruned mask of each row from the first counts[r] steps of its trace.
MaskMatrix mask_from_trace(const Trace& trace, Index cols,
                           const Eigen::Ref<const Eigen::Matrix<Index, Eigen::Dynamic, 1>>& counts);

/// Optimal weights for a fixed pruned mask, in closed form per row:
/// w_hat = w - Hinv[:,P] (Hinv_PP)^-1 w_P (or the equivalent solve on the kept set, whichever
/// is smaller), computed in float64 with the damped Hessian. Also fills row_losses (undamped H).
template <class Scalar>
PruneResult<Scalar> solve_masked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H,
                                 const PreparedHessian& hessian, const MaskMatrix& pruned,
                                 const RunOptions& run = {});

/// The same, preparing H itself. The O(cols^3) inverse is only computed when some row keeps
/// more weights than it prunes; otherwise each row solves with H directly, which needs no
/// cols x cols buffer at all.
template <class Scalar>
PruneResult<Scalar> solve_masked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H, const MaskMatrix& pruned,
                                 const HessianOptions& hopt = {}, const RunOptions& run = {});

/// Unstructured ExactOBS pruning to layer sparsity `sparsity` in [0, 1].
template <class Scalar>
PruneResult<Scalar> prune_unstructured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const HessianRef& H, double sparsity,
                                       Spread spread = Spread::Global,
                                       const HessianOptions& hopt = {}, const RunOptions& run = {});

/// Blocked ExactOBS pruning: whole blocks of `block` consecutive weights of a row are removed
/// together with the exact multi-weight OBS update. `sparsity` is the fraction of blocks.
template <class Scalar>
PruneResult<Scalar> prune_blocked(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, double sparsity,
                                  Index block, Spread spread = Spread::Global,
                                  const HessianOptions& hopt = {}, const RunOptions& run = {});

/// N:M ExactOBS pruning: every group of m consecutive inputs of a row ends with at least n
/// zeros (exactly n unless the group already had more zeros). 0 < n < m, cols % m == 0.
template <class Scalar>
PruneResult<Scalar> prune_nm(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                             const HessianRef& H, Index n, Index m,
                             const HessianOptions& hopt = {}, const RunOptions& run = {});

/// Structured ExactOBS pruning: whole groups of `group` consecutive input columns are removed
/// from every row at once (e.g. the kh*kw columns of one conv input channel), choosing greedily
/// by the summed group OBS score with the shared inverse and updating all rows exactly.
/// ceil(sparsity * cols/group) groups end up removed (already-zero groups count).
/// Rows with zeros of their own (not whole zero columns) keep them: such rows get a private
/// inverse so every greedy score stays exact (memory rows_with_zeros * cols^2 * 8 bytes, at most
/// 8 GiB, else InvalidArgument).
template <class Scalar>
PruneResult<Scalar> prune_structured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                     const HessianRef& H, double sparsity,
                                     Index group = 1, const HessianOptions& hopt = {},
                                     const RunOptions& run = {});


}  // namespace obc

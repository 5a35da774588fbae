// Fixed-order quantization (GPTQ): columns quantized one after the other in a fixed order, each
// step's error spread over the columns not yet quantized with the exact OBS update, applied
// lazily a block of columns at a time.
//
// Paper letters: U is the upper Cholesky factor of the (permuted, damped) inverse Hessian,
// H^-1 = U^T U; quantizing column j with error (w_j - q(w_j)) / U_jj updates every later
// column k by -that U_jk, which is the OBS update with [H_FF]^-1, F = columns j.. in the order.
// This implementation never forms H^-1 or U: with L = U^-T, the lower triangular factor with
// L^T L = H (permuted, damped; one Cholesky factor of the reversed H), the updates of steps
// 0..k-1 sum to w~_k = w_k + sum_{i<k} (L_ki / L_kk) (w_i - q_i), so each lazy block gets its
// updated weights from one GEMM of the earlier blocks' errors with rows of L (src/gptq.cpp).
// Cost: cols^3 / 3 flops for the factor plus rows cols^2 for the updates (level-3 per block).
#pragma once

#include <Eigen/Core>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/quant.hpp"
#include "obc/types.hpp"

namespace obc {

struct GptqOptions {
  /// true: quantize inputs by descending diag(H) ("act-order": the most important inputs first,
  /// while many columns are still free to absorb their error; ties by lower index); false: in
  /// column order 0, 1, ... Dead inputs (diag H == 0) are zero either way.
  bool act_order = true;
  /// Columns per lazy block update (only speed depends on it, not the result beyond float
  /// rounding). >= 1.
  Index block_size = 128;
};

/// GPTQ on the grids of make_grid(W, opt) (the same grids as quantize(): fitted on the original
/// weights in their original column order, so with groups this is GPTQ's "static groups").
/// Weights that are zero on entry stay exactly zero: in the order, they are set to 0 like any
/// other column and their error is propagated (SparseGPT's joint mode, with the layer's mask).
/// Dead inputs are zero. Computed in W's precision (one shared cols x cols factor; H's
/// preparation and the loss sums in float64): for float32 W the factor and the sweep run in
/// float32, and where that factor fails the pivot check, is not finite, or has 1 / L_kk^2 (the
/// OBS steps' [H_F^-1]_qq) outside float32's range, the layer is redone in float64 on the float32
/// grid (same damping) and result.float64_fallback is set. Bit-identical for any thread count
/// (rows are solved in fixed chunks). Throws InvalidArgument for bad options or inputs,
/// NotPositiveDefinite when the damped H has no float64 Cholesky factor (a pivot below
/// prepare_hessian's tolerance). result.row_method is Gptq or GptqNatural.
/// result.row_losses (1/2 dw H dw^T, undamped H) come from the sweep's own step losses, not from
/// a second O(rows cols^2) pass: the same bits quantize_select reports for these weights (exact
/// to float64 rounding, ~1e-13 relative; float32 sweeps: ~1e-6; the float64 fallback measures them).
/// Memory besides the inputs and the result: one cols x cols buffer in W's precision,
/// sizeof(Scalar) cols^2 bytes (4 cols^2 for float32, 8 cols^2 for float64; the damped Hessian
/// is written into it already permuted, in the factor's precision, and factored in place), plus
/// about (2 sizeof(Scalar) + 1) 64 cols bytes per thread for the sweep's row chunk. A float32
/// layer redone in float64 frees its float32 buffer first, then needs 8 cols^2. The result
/// itself (weights, codes, mask, losses) is about (sizeof(Scalar) + 2) rows cols bytes.
template <class Scalar>
QuantResult<Scalar> quantize_gptq(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, const QuantOptions& opt,
                                  const GptqOptions& gopt = {}, const HessianOptions& hopt = {},
                                  const RunOptions& run = {});

}  // namespace obc

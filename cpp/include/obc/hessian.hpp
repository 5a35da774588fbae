// Hessian preparation: validation, dead inputs, relative damping, Cholesky inverse.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <vector>

#include "obc/errors.hpp"

#include "obc/hessian_ref.hpp"
#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

/// How a layer Hessian H = 2/n * X X^T (cols x cols) is turned into the inverse the solvers use.
struct HessianOptions {
  /// Relative damping: lambda = damp * mean(diag H over live inputs) is added to the diagonal
  /// of the live inputs. Dimensionless, >= 0 (0 allowed). Default 0.01 (the paper uses 0.01 of
  /// the mean diagonal in its GPTQ/SparseGPT successors; 0 in OBC itself).
  double damp = 0.01;
  /// H must equal H^T within symmetry_tol * max|H| (absolute difference), else InvalidArgument.
  double symmetry_tol = 1e-6;
  /// false: only validate H, find dead inputs and the damping; `hinv` stays empty (for callers
  /// that solve with H itself, e.g. solve_masked when every row prunes at least half).
  bool invert = true;
};

/// A validated, damped Hessian's inverse. Dead inputs (diag H == 0: the input is always zero in
/// the calibration data) are decoupled: the damped Hessian gets a unit row/column there, so
/// `hinv` has a 1 there too and the solvers treat them as already pruned. The damped Hessian
/// itself is not kept: it is (H + H^T) / 2 plus damp_absolute on the live diagonal.
struct PreparedHessian {
  Eigen::MatrixXd hinv;       ///< cols x cols inverse of the damped H, full symmetric
  /// Optional float32 copy of hinv's lower triangle, packed column by column (entry (i, j),
  /// i >= j, at j * cols - j * (j - 1) / 2 + i - j), for float32 layers, whose row kernels
  /// compute in float32 anyway; set by keep_float32_only(), which frees `hinv`: a quarter of
  /// the memory.
  std::vector<float> hinv_lower_f32;
  std::vector<char> dead;     ///< cols flags: 1 where diag(H) == 0
  Index num_dead = 0;         ///< number of dead inputs
  double damp = 0.0;          ///< relative damping used (equals the option)
  double damp_absolute = 0.0; ///< lambda actually added to the diagonal
  double live_trace = 0.0;    ///< trace of the damped H over the live inputs (see check_scale)
  Index cols() const { return static_cast<Index>(dead.size()); }
  /// Replaces hinv by its float32 copy (for float32 row kernels only).
  void keep_float32_only() {
    const Index n = hinv.rows();
    hinv_lower_f32.resize(static_cast<size_t>(n * (n + 1) / 2));
    float* out = hinv_lower_f32.data();
    bool finite = true;
    for (Index j = 0; j < n; ++j)
      for (Index i = j; i < n; ++i) {
        *out = static_cast<float>(hinv(i, j));
        finite = finite && std::abs(*out) <= std::numeric_limits<float>::max();
        ++out;
      }
    hinv = Eigen::MatrixXd();
    if (!finite)
      throw Overflow("H: its inverse is out of float32 range (H is too small in scale for float32 "
                     "weights); rescale H or pass float64 W");
  }
};

/// Validates H (square, finite, symmetric, non-negative diagonal, zero rows at dead inputs).
/// Throws InvalidArgument naming the problem. One pass over H's entries, on num_threads threads
/// (0 = default) from 512 inputs up; the verdict does not depend on the count.
void validate_hessian(const HessianRef& H, double symmetry_tol = 1e-6, int num_threads = 1);

/// Validates H and builds its damped inverse. Throws NotPositiveDefinite (naming the damping
/// tried) when the damped Hessian has no Cholesky factor; never retries with more damping.
/// The inverse is computed in float64 (about cols^3 flops, on num_threads threads, 0 = default;
/// bit-identical for any count) in one cols x cols buffer, whatever H's type and layout.
/// `interrupt` (not owned, may be null) is polled from the calling thread during the inverse;
/// when it asks to stop, Interrupted is thrown.
PreparedHessian prepare_hessian(const HessianRef& H, const HessianOptions& options = {},
                                int num_threads = 0, InterruptHook* interrupt = nullptr);

/// Sum of diag(H) over the live inputs (diag > 0), plus damp_absolute for each; float64.
double live_trace(const HessianRef& H, double damp_absolute = 0.0);

/// Throws Overflow when the layer's scale alone rules out arithmetic whose largest finite value
/// is `limit` (e.g. FLT_MAX for float32 row kernels): every OBS score and every loss of a row w
/// is at most w H w^T <= ||w||^2 trace(H), and the greedy also squares single weights, so both
/// ||w||^2 * h_trace and ||w||^2 must stay below limit / 256 (room for the updates' products).
/// `precision` names the arithmetic in the message ("float32"). ||w||^2 is summed in float64.
template <class Scalar>
void check_scale(const Eigen::Ref<const RowMatrix<Scalar>>& W, double h_trace, double limit,
                 const char* precision);

/// Throws Overflow naming `what` unless every value of `values` (a result's weights or losses) is
/// finite: the last line of defence when the scale check passed but an ill-conditioned H let the
/// greedy's updates overflow.
template <class Derived>
void check_finite_result(const Eigen::DenseBase<Derived>& values, const char* what) {
  if (!values.allFinite())
    throw Overflow(detail::concat(
        what, ": the solve produced NaN or Inf (values too large for the precision, or H too "
        "ill-conditioned for it); rescale W or H, increase damp, or pass float64 inputs"));
}

/// Loss of replacing each row w of W by w_hat: 1/2 (w - w_hat) H (w - w_hat)^T, which equals
/// ||(W - W_hat) X||^2 / n for H = 2/n X X^T. Uses the undamped H. Returns `rows` values.
/// Validates H like prepare_hessian (InvalidArgument); an indefinite H, which would give a
/// negative loss beyond rounding, throws InvalidArgument too (rounding-level negatives give 0).
/// A loss that overflows float64 (values of W or W_hat too large for H's scale) throws Overflow
/// naming W (or W_hat, when its rows are clearly the larger) and saying to rescale.
/// `interrupt` (may be null) is polled from the calling thread; a stop throws Interrupted.
/// Each row's value depends only on that row, W's column count and H: the same bits whatever
/// other rows are in the call and for any thread count (rows may be solved in separate calls).
template <class Scalar>
Eigen::VectorXd row_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                           const Eigen::Ref<const RowMatrix<Scalar>>& W_hat,
                           const HessianRef& H, int num_threads = 0,
                           InterruptHook* interrupt = nullptr);

}  // namespace obc

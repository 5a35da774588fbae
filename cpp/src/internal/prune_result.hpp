// Assembling a PruneResult: the final weights, their mask, exact row losses and the damping;
// and the checks of a layer every solver makes (the quantizers' too).
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "obc/errors.hpp"
#include "obc/hessian.hpp"
#include "obc/parallel.hpp"
#include "obc/prune.hpp"

namespace obc::internal {

/// The check of a layer every solver's entry point makes: W (rows x cols) non-empty and finite,
/// and H cols x cols (hcols: H's size). Throws InvalidArgument.
template <class Scalar>
inline void check_layer_inputs(const Eigen::Ref<const RowMatrix<Scalar>>& W, Index hcols) {
  OBC_CHECK(W.rows() > 0 && W.cols() > 0, "W: expected a non-empty rows x cols matrix, got ",
            W.rows(), "x", W.cols());
  OBC_CHECK(W.allFinite(), "W: expected finite values, got NaN or Inf");
  OBC_CHECK(hcols == W.cols(), "H: expected ", W.cols(), "x", W.cols(), " (cols of W), got ",
            hcols, "x", hcols);
}

/// Whether entries of diag(H^-1) from `smallest` to `largest` fit float32 arithmetic (a margin
/// of 256 from both ends of its normal range).
inline bool inverse_fits_float32(double smallest, double largest) {
  return largest <= std::numeric_limits<float>::max() / 256 &&
         smallest >= 256 * static_cast<double>(std::numeric_limits<float>::min());
}

/// The float32 part of check_layer_scale, for the smallest and largest entries of diag(H^-1)
/// however they were found (nothing to check for float64).
template <class Scalar>
inline void check_inverse_range(double smallest, double largest) {
  if (!std::is_same_v<Scalar, float>) return;
  if (inverse_fits_float32(smallest, largest)) return;
  throw Overflow(detail::concat(
      "H: its inverse (diagonal from ", smallest, " to ", largest, ") is out of float32 range ",
      "for float32 weights; rescale H (e.g. by its mean diagonal) or pass float64 W"));
}

/// check_scale for a layer solved in W's own precision (float32 rows: float32 kernels, which
/// also hold the inverse in float32: its diagonal, which bounds every entry, must fit there).
/// num_threads: the rows' norms in parallel row chunks (large layers only; the same outcome).
template <class Scalar>
inline void check_layer_scale(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                              const PreparedHessian& prep, int num_threads = 1) {
  // check_scale reads every row on one thread (a serial pass of rows x cols at large layers):
  // find the row of largest norm in parallel, with check_scale's own expression and its max's
  // rule (a later row wins only when strictly larger), and hand check_scale that row alone: the
  // max over rows, and so the outcome and the message, are those of all of W.
  constexpr Index kRows = 256;
  const Index rows = W.rows(), chunks = (rows + kRows - 1) / kRows;
  if (chunks < 2 || W.size() < (Index(1) << 20)) {
    check_scale<Scalar>(W, prep.live_trace, static_cast<double>(std::numeric_limits<Scalar>::max()),
                        std::is_same_v<Scalar, float> ? "float32" : "float64");
  } else {
    std::vector<Index> chunk_row(static_cast<size_t>(chunks), 0);
    std::vector<double> chunk_norm2(static_cast<size_t>(chunks), -1.0);
    parallel_for(chunks, num_threads, nullptr, [&](Index chunk, int) {
      const size_t at = static_cast<size_t>(chunk);
      for (Index r = chunk * kRows; r < std::min(rows, (chunk + 1) * kRows); ++r) {
        const double norm2 = W.row(r).template cast<double>().squaredNorm();
        if (chunk_norm2[at] < norm2) {
          chunk_norm2[at] = norm2;
          chunk_row[at] = r;
        }
      }
    });
    Index largest = 0;
    double best = -1.0;
    for (size_t at = 0; at < chunk_norm2.size(); ++at)
      if (best < chunk_norm2[at]) {
        best = chunk_norm2[at];
        largest = chunk_row[at];
      }
    check_scale<Scalar>(W.middleRows(largest, 1), prep.live_trace,
                        static_cast<double>(std::numeric_limits<Scalar>::max()),
                        std::is_same_v<Scalar, float> ? "float32" : "float64");
  }
  if (prep.hinv.size() == 0) return;  // solvers without H^-1 check theirs (gptq_into)
  check_inverse_range<Scalar>(prep.hinv.diagonal().minCoeff(), prep.hinv.diagonal().maxCoeff());
}

/// check_finite_result(weight, "weights") with the rows read in parallel chunks on large layers
/// (the check itself is a serial pass of rows x cols otherwise); the same exception.
template <class Scalar>
inline void check_finite_weights(const RowMatrix<Scalar>& weight, int num_threads) {
  constexpr Index kRows = 256;
  const Index rows = weight.rows(), chunks = (rows + kRows - 1) / kRows;
  if (chunks < 2 || weight.size() < (Index(1) << 20)) return check_finite_result(weight, "weights");
  std::vector<char> bad(static_cast<size_t>(chunks), 0);
  parallel_for(chunks, num_threads, nullptr, [&](Index chunk, int) {
    const Index r0 = chunk * kRows, len = std::min(kRows, rows - r0);
    bad[static_cast<size_t>(chunk)] = weight.middleRows(r0, len).allFinite() ? 0 : 1;
  });
  if (std::find(bad.begin(), bad.end(), char(1)) != bad.end())
    check_finite_result(weight, "weights");  // throws
}

/// Row losses are measured with the undamped H (see hessian.hpp row_losses).
template <class Scalar>
inline PruneResult<Scalar> finish_result(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H,
                                  const PreparedHessian& prep, RowMatrix<Scalar>&& weight,
                                  MaskMatrix&& pruned, const RunOptions& run) {
  PruneResult<Scalar> result;
  check_finite_result(weight, "weights");
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
/// second O(rows cols^2) pass. Exact up to rounding; clamped at 0. Rows where that difference
/// cancels (see below) are measured directly with H, on num_threads threads.
template <class Scalar>
inline PruneResult<Scalar> finish_result_from_steps(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                                    const HessianRef& H,
                                                    const PreparedHessian& prep,
                                                    RowMatrix<Scalar>&& weight,
                                                    MaskMatrix&& pruned,
                                                    Eigen::VectorXd&& step_losses,
                                                    int num_threads) {
  // Before the clamp below, which would turn a NaN loss into 0.
  check_finite_result(weight, "weights");
  check_finite_result(step_losses, "row losses");
  PruneResult<Scalar> result;
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  const Index rows = W.rows(), cols = W.cols();
  const double lambda = prep.damp_absolute;
  std::vector<Index> direct;  // rows whose difference below cancels: measured directly instead
  for (Index r = 0; r < rows; ++r) {
    double damping_part = 0;
    if (lambda > 0)
      for (Index c = 0; c < cols; ++c) {
        if (prep.dead[static_cast<size_t>(c)]) continue;
        const double dw = static_cast<double>(result.weight(r, c)) - static_cast<double>(W(r, c));
        damping_part += dw * dw;
      }
    damping_part *= 0.5 * lambda;
    // When the damping's share is more than half the damped loss (H nearly singular along dw,
    // e.g. rank-deficient H), the difference loses bits to cancellation, and float32 weights'
    // rounding is no longer small beside it: such rows (up to 10% off on rank-1 H) get the
    // exact O(cols^2) measure on the returned weights.
    if (damping_part > 0.5 * step_losses[r]) direct.push_back(r);
    step_losses[r] = std::max(0.0, step_losses[r] - damping_part);
  }
  if (!direct.empty()) {
    const Index k = static_cast<Index>(direct.size());
    RowMatrix<Scalar> w_rows(k, cols), w_hat_rows(k, cols);
    for (Index i = 0; i < k; ++i) {
      w_rows.row(i) = W.row(direct[static_cast<size_t>(i)]);
      w_hat_rows.row(i) = result.weight.row(direct[static_cast<size_t>(i)]);
    }
    const Eigen::VectorXd measured = row_losses<Scalar>(w_rows, w_hat_rows, H, num_threads);
    for (Index i = 0; i < k; ++i) step_losses[direct[static_cast<size_t>(i)]] = measured[i];
  }
  result.row_losses = std::move(step_losses);
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

}  // namespace obc::internal

// HessianAccumulator: the float64 sum of x x^T over calibration activations, mergeable across
// shards.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <limits>

#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

/// Adds the Gram matrix X^T X of the n rows of X (n x cols, float32 or float64, row-major;
/// rows may be strided: row r at data + r * row_stride) to `total` (cols x cols float64, which
/// must be exactly symmetric, e.g. zeros or an earlier result): total += X^T X, in float64.
///
/// A symmetric rank-n update: only the lower triangle is computed (half the flops of a full
/// product), in tiles of 64 columns (each element by exactly one thread, in a fixed order), then
/// mirrored, so `total` stays exactly symmetric and the result is bit-identical for every
/// num_threads (0 = OpenMP's default). Rows are widened to float64 2048 at a time (no float64
/// copy of all of X); chunks are added in row order. The result differs from a BLAS dgemm of
/// the same values only by float64 rounding (another summation order).
///
/// Throws InvalidArgument, leaving `total` unchanged, for a non-square or non-symmetric total,
/// a width mismatch or NaN/Inf in X or total. `interrupt` (not owned, may be null) is polled from
/// the calling thread between chunks and tiles; a stop restores `total` exactly and throws
/// Interrupted.
void accumulate_gram(Eigen::Ref<Eigen::MatrixXd> total, const float* data, Index rows, Index cols,
                     Index row_stride, int num_threads = 0, InterruptHook* interrupt = nullptr);
void accumulate_gram(Eigen::Ref<Eigen::MatrixXd> total, const double* data, Index rows,
                     Index cols, Index row_stride, int num_threads = 0,
                     InterruptHook* interrupt = nullptr);

struct AccumulatorOptions {
  /// Worker threads for the per-batch Gram products; 0 = OpenMP's default. >= 0. The result is
  /// bit-identical for every thread count.
  int num_threads = 0;
};

/// Accumulates the layer Hessian H = 2/n * sum_x x x^T from batches of activation rows.
///
/// Each batch is an n x cols row-major matrix whose rows are input vectors x of the layer (for a
/// linear layer the activations; for a convolution the unfolded patches, n = batch * positions).
/// The accumulator keeps the float64 sum S = sum_x x x^T (cols x cols, exactly symmetric) and the
/// sample count n, so shards accumulated in different processes merge exactly: S and n add.
///
/// Summation order is fixed: each batch is cut into chunks of `chunk_rows` rows in input order;
/// the chunk's Gram matrix X_c^T X_c is computed in float64 (float32 rows are widened first, so a
/// float32 batch gives the same sum as the same values in float64) and added to S. The result
/// therefore depends only on the sequence of batches, never on the thread count.
///
/// Not thread-safe: synchronize concurrent add()/merge() on one object externally.
class HessianAccumulator {
 public:
  /// Rows per Gram product. Part of the summation order (see above); fixed.
  static constexpr Index chunk_rows = 2048;
  /// Largest magnitude of an entry of S: with |S_ij| <= DBL_MAX / 4, H = 2/n S (n >= 1) and the
  /// Gram products that build S cannot overflow.
  static constexpr double kMaxSumEntry = std::numeric_limits<double>::max() / 4;

  /// An empty accumulator for inputs of width `cols` (> 0). Throws InvalidArgument otherwise.
  explicit HessianAccumulator(Index cols, const AccumulatorOptions& options = {});

  /// Adds the n rows of X (n x cols, n >= 0). Throws InvalidArgument, leaving the accumulator
  /// unchanged, when X has another width, holds NaN/Inf, or would push an entry of the sum past
  /// kMaxSumEntry (so hessian() is always finite). `interrupt` (not owned, may be null)
  /// is polled from the calling thread during the Gram products; when it asks to stop, the
  /// batch is rolled back exactly (the accumulator is left as before the call) and Interrupted
  /// is thrown.
  void add(const Eigen::Ref<const RowMatrix<float>>& X, InterruptHook* interrupt = nullptr);
  void add(const Eigen::Ref<const RowMatrix<double>>& X, InterruptHook* interrupt = nullptr);
  /// The same for a raw row-major buffer of rows x cols values (data may be null when rows == 0).
  void add(const float* data, Index rows, Index cols, InterruptHook* interrupt = nullptr);
  void add(const double* data, Index rows, Index cols, InterruptHook* interrupt = nullptr);

  /// Adds the sum and count of `other` (same cols, else InvalidArgument). merge(*this) doubles.
  /// Throws InvalidArgument, unchanged, when the merged sum would pass kMaxSumEntry.
  void merge(const HessianAccumulator& other);

  /// Forgets all samples.
  void reset();

  Index cols() const { return sum_.rows(); }
  /// Number of activation rows added so far.
  std::uint64_t count() const { return count_; }
  /// S = sum_x x x^T, cols x cols, exactly symmetric, float64.
  const Eigen::MatrixXd& sum() const { return sum_; }
  /// H = 2/n * S, cols x cols, exactly symmetric. Throws InvalidArgument when count() == 0.
  Eigen::MatrixXd hessian() const;

  const AccumulatorOptions& options() const { return options_; }
  void set_options(const AccumulatorOptions& options);

  /// Rebuilds an accumulator from a saved state (e.g. a Hessian file). Throws InvalidArgument
  /// unless `sum` is square, non-empty, finite, at most kMaxSumEntry in magnitude, exactly
  /// symmetric with a non-negative diagonal, and all zero when count == 0; also when an
  /// off-diagonal entry breaks |s_ij| <= sqrt(s_ii s_jj) beyond rounding (an indefinite sum,
  /// which no sum of x x^T is; indefiniteness this O(cols^2) test misses surfaces in the solve).
  static HessianAccumulator from_state(const Eigen::Ref<const Eigen::MatrixXd>& sum,
                                       std::uint64_t count, const AccumulatorOptions& options = {});

 private:
  template <class Scalar>
  void add_rows(const Eigen::Ref<const RowMatrix<Scalar>>& X, InterruptHook* interrupt);

  Eigen::MatrixXd sum_;
  std::uint64_t count_ = 0;
  AccumulatorOptions options_;
};

}  // namespace obc

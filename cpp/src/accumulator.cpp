// HessianAccumulator: chunked float64 Gram products, tiled over columns, in a fixed order.
#include "obc/accumulator.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "internal/gram_kernels.hpp"
#include "internal/row_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace {

// Columns per parallel work item. Each item owns a block column of the lower triangle, so every
// element of the sum is written by exactly one thread with the same arithmetic whatever the
// thread count (rule 7: no float reductions across threads).
constexpr Index kTileCols = 64;

// The sum S is kept within HessianAccumulator::kMaxSumEntry: then H = 2/n S (n >= 1) is finite,
// and bounding the diagonal is enough, since each partial sum of x_i x_j is at most the larger
// of the two diagonal entries (Cauchy-Schwarz).
constexpr double kMaxSumEntry = HessianAccumulator::kMaxSumEntry;

void check_options(const AccumulatorOptions& options) {
  OBC_CHECK(options.num_threads >= 0 && options.num_threads <= kMaxThreads,
            "num_threads: expected an integer in [0, ", kMaxThreads, "] (0 = default), got ",
            options.num_threads);
}

// Copies the strictly lower triangle onto the strictly upper one: the lower triangle is the
// authoritative result of the tiled products, and S must be exactly symmetric.
void mirror_lower(Eigen::Ref<Eigen::MatrixXd> m) {
  // Tile by tile (64 x 64 blocks), so that the transposed reads stay in cache for wide layers.
  const Index n = m.rows();
  for (Index j0 = 0; j0 < n; j0 += kTileCols) {
    const Index width = std::min(kTileCols, n - j0);
    for (Index i0 = j0; i0 < n; i0 += kTileCols) {
      const Index height = std::min(kTileCols, n - i0);
      for (Index j = j0; j < j0 + width; ++j)
        for (Index i = std::max(i0, j + 1); i < i0 + height; ++i) m(j, i) = m(i, j);
    }
  }
}

// Undoes an interrupted batch exactly, without a second cols x cols buffer: the tiled products
// write only the lower triangle and the diagonal tiles (kTileCols x kTileCols blocks at (j0, j0)),
// so the strict upper triangle outside those tiles still mirrors the state before the batch.
// `diagonal_tiles` holds the diagonal tiles as they were, stacked (cols x kTileCols).
void restore_before_batch(Eigen::Ref<Eigen::MatrixXd> m, const Eigen::MatrixXd& diagonal_tiles,
                          Index tile_cols = kTileCols) {
  const Index n = m.rows();
  for (Index j = 0; j < n; ++j)
    for (Index i = j + 1; i < n; ++i) m(i, j) = m(j, i);
  for (Index j0 = 0; j0 < n; j0 += tile_cols) {
    const Index width = std::min(tile_cols, n - j0);
    m.block(j0, j0, width, width) = diagonal_tiles.block(j0, 0, width, width);
  }
}

}  // namespace

namespace internal {

// The Gram kernel compiled for the ISA the row kernels use (so OBC_SIMD=generic applies too).
// AVX-512 where the CPU has it (the result then differs from the AVX2 copy's in the last bits,
// like every kernel across SIMD levels; never across thread counts).
const GramKernels& gram_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (std::strcmp(kernels().isa, "generic") != 0) {
    return use_avx512_kernels() ? gram_kernels_avx512() : gram_kernels_avx2();
  }
#endif
  return gram_kernels_generic();
}

}  // namespace internal

namespace {

template <class Scalar>
void accumulate_gram_impl(Eigen::Ref<Eigen::MatrixXd> total, const Scalar* data, Index rows,
                          Index cols, Index row_stride, int num_threads,
                          InterruptHook* interrupt) {
  OBC_CHECK(num_threads >= 0 && num_threads <= kMaxThreads, "num_threads: expected an integer in [0, ",
            kMaxThreads, "] (0 = default), got ", num_threads);
  OBC_CHECK(total.rows() == total.cols() && total.rows() > 0,
            "total: expected a non-empty square cols x cols matrix, got ", total.rows(), "x",
            total.cols());
  OBC_CHECK(rows >= 0 && cols == total.cols(), "X: expected ", total.cols(),
            " columns (the width of total), got ", rows, "x", cols);
  OBC_CHECK(row_stride >= cols || rows <= 1, "X: row_stride ", row_stride,
            " is smaller than the row width ", cols);
  OBC_CHECK(data != nullptr || rows == 0, "X: null data pointer for ", rows, " rows");
  OBC_CHECK(total.allFinite(), "total: expected finite values, got NaN or Inf");
  // Exact symmetry, compared tile against transposed tile (cache-friendly: this runs per call).
  for (Index j0 = 0; j0 < cols; j0 += kTileCols) {
    const Index width = std::min(kTileCols, cols - j0);
    for (Index i0 = j0; i0 < cols; i0 += kTileCols) {
      const Index height = std::min(kTileCols, cols - i0);
      OBC_CHECK(total.block(i0, j0, height, width) == total.block(j0, i0, width, height).transpose(),
                "total: expected an exactly symmetric matrix (a sum of x x^T), got a different "
                "entry at [i, j] and [j, i] in rows ", i0, "..", i0 + height - 1, ", columns ", j0,
                "..", j0 + width - 1);
    }
  }
  if (rows == 0) return;
  for (Index r = 0; r < rows; ++r) {
    const Scalar* row = data + r * row_stride;
    OBC_CHECK(std::all_of(row, row + cols, [](Scalar v) { return std::isfinite(v); }),
              "X: expected finite values, got NaN or Inf in row ", r);
  }
  // What an interrupted update needs to be undone (see restore_before_batch): the diagonal
  // tiles of the kernel (which writes their upper parts too), cols x gram_tile_cols values.
  const Index tile = internal::gram_tile_cols;
  Eigen::MatrixXd diagonal_tiles(cols, std::min(tile, cols));
  for (Index j0 = 0; j0 < cols; j0 += tile) {
    const Index width = std::min(tile, cols - j0);
    diagonal_tiles.block(j0, 0, width, width) = total.block(j0, j0, width, width);
  }
  const internal::GramJob<Scalar> job{total.data(), total.outerStride(), cols, data, rows, row_stride};
  try {
    if constexpr (std::is_same_v<Scalar, float>) {
      internal::gram_kernels().add_lower_f32(job, num_threads, interrupt);
    } else {
      internal::gram_kernels().add_lower_f64(job, num_threads, interrupt);
    }
  } catch (...) {
    restore_before_batch(total, diagonal_tiles, tile);
    throw;
  }
  mirror_lower(total);
}

}  // namespace

void accumulate_gram(Eigen::Ref<Eigen::MatrixXd> total, const float* data, Index rows, Index cols,
                     Index row_stride, int num_threads, InterruptHook* interrupt) {
  accumulate_gram_impl<float>(total, data, rows, cols, row_stride, num_threads, interrupt);
}

void accumulate_gram(Eigen::Ref<Eigen::MatrixXd> total, const double* data, Index rows,
                     Index cols, Index row_stride, int num_threads, InterruptHook* interrupt) {
  accumulate_gram_impl<double>(total, data, rows, cols, row_stride, num_threads, interrupt);
}

HessianAccumulator::HessianAccumulator(Index cols, const AccumulatorOptions& options)
    : options_(options) {
  OBC_CHECK(cols > 0, "cols: expected a positive input width, got ", cols);
  check_options(options);
  sum_ = Eigen::MatrixXd::Zero(cols, cols);
}

void HessianAccumulator::set_options(const AccumulatorOptions& options) {
  check_options(options);
  options_ = options;
}

void HessianAccumulator::reset() {
  sum_.setZero();
  count_ = 0;
}

template <class Scalar>
void HessianAccumulator::add_rows(const Eigen::Ref<const RowMatrix<Scalar>>& X,
                                  InterruptHook* interrupt) {
  const Index cols = this->cols();
  OBC_CHECK(X.cols() == cols, "X: expected ", cols,
            " columns (the accumulator's input width), got ", X.rows(), "x", X.cols());
  const Index rows = X.rows();
  if (rows == 0) return;
  // Validate the whole batch first so that a rejected batch leaves the state unchanged.
  OBC_CHECK(X.allFinite(), "X: expected finite values, got NaN or Inf");
  OBC_CHECK(static_cast<std::uint64_t>(rows) <= std::numeric_limits<std::uint64_t>::max() - count_,
            "X: sample count would overflow");
  // The diagonal of S after this batch (sums of squares, in float64: an entry whose square
  // overflows gives Inf here) bounds every entry; reject the batch before touching the state.
  for (Index j = 0; j < cols; ++j) {
    const double squares = X.col(j).template cast<double>().squaredNorm();
    const double diagonal = sum_(j, j) + squares;
    OBC_CHECK(diagonal <= kMaxSumEntry, "X: values too large: the sum of squares of column ", j,
              " would reach ", diagonal, " (the float64 sum is limited to ", kMaxSumEntry,
              " so that H = 2/n sum x x^T stays finite); scale the activations down");
  }

  const Index tiles = (cols + kTileCols - 1) / kTileCols;
  // What an interrupted batch needs to be undone (see restore_before_batch): cols x 64 values.
  Eigen::MatrixXd diagonal_tiles;
  if (interrupt != nullptr) {
    diagonal_tiles.resize(cols, kTileCols);
    for (Index j0 = 0; j0 < cols; j0 += kTileCols) {
      const Index width = std::min(kTileCols, cols - j0);
      diagonal_tiles.block(j0, 0, width, width) = sum_.block(j0, j0, width, width);
    }
  }
  RowMatrixXd chunk;
  try {
    for (Index begin = 0; begin < rows; begin += chunk_rows) {
      if (interrupt != nullptr && interrupt->should_stop()) throw Interrupted();
      const Index len = std::min(chunk_rows, rows - begin);
      // Widen (or copy) to a contiguous float64 chunk: float32 and float64 inputs of the same
      // values then take the identical arithmetic path.
      chunk = X.middleRows(begin, len).template cast<double>();
      // The hook is polled between tiles too: one chunk of a wide layer takes seconds.
      parallel_for(tiles, options_.num_threads, interrupt, [&](Index tile, int) {
        const Index j0 = tile * kTileCols;
        const Index width = std::min(kTileCols, cols - j0);
        const Index below = cols - j0;
        sum_.block(j0, j0, below, width).noalias() +=
            chunk.rightCols(below).transpose() * chunk.middleCols(j0, width);
      });
    }
  } catch (const Interrupted&) {
    restore_before_batch(sum_, diagonal_tiles);
    throw;
  }
  mirror_lower(sum_);
  count_ += static_cast<std::uint64_t>(rows);
}

void HessianAccumulator::add(const Eigen::Ref<const RowMatrix<float>>& X,
                             InterruptHook* interrupt) {
  add_rows<float>(X, interrupt);
}
void HessianAccumulator::add(const Eigen::Ref<const RowMatrix<double>>& X,
                             InterruptHook* interrupt) {
  add_rows<double>(X, interrupt);
}

void HessianAccumulator::add(const float* data, Index rows, Index cols,
                             InterruptHook* interrupt) {
  OBC_CHECK(rows >= 0 && cols >= 0, "X: expected a non-negative shape, got ", rows, "x", cols);
  OBC_CHECK(data != nullptr || rows == 0, "X: null data pointer for ", rows, " rows");
  if (rows == 0) {
    OBC_CHECK(cols == this->cols(), "X: expected ", this->cols(), " columns, got 0x", cols);
    return;
  }
  add_rows<float>(Eigen::Map<const RowMatrix<float>>(data, rows, cols), interrupt);
}

void HessianAccumulator::add(const double* data, Index rows, Index cols,
                             InterruptHook* interrupt) {
  OBC_CHECK(rows >= 0 && cols >= 0, "X: expected a non-negative shape, got ", rows, "x", cols);
  OBC_CHECK(data != nullptr || rows == 0, "X: null data pointer for ", rows, " rows");
  if (rows == 0) {
    OBC_CHECK(cols == this->cols(), "X: expected ", this->cols(), " columns, got 0x", cols);
    return;
  }
  add_rows<double>(Eigen::Map<const RowMatrix<double>>(data, rows, cols), interrupt);
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  OBC_CHECK(other.cols() == cols(), "other: expected an accumulator of ", cols(), " columns, got ",
            other.cols());
  OBC_CHECK(other.count_ <= std::numeric_limits<std::uint64_t>::max() - count_,
            "other: sample count would overflow");
  for (Index j = 0; j < cols(); ++j) {
    const double diagonal = sum_(j, j) + other.sum_(j, j);
    OBC_CHECK(diagonal <= kMaxSumEntry, "other: merged sum too large: diagonal entry ", j,
              " would reach ", diagonal, " (limit ", kMaxSumEntry, ")");
  }
  sum_ += other.sum_;  // elementwise, so the result stays exactly symmetric
  count_ += other.count_;
}

Eigen::MatrixXd HessianAccumulator::hessian() const {
  OBC_CHECK(count_ > 0, "HessianAccumulator: no samples were added; H = 2/n sum x x^T needs n > 0");
  Eigen::MatrixXd h = (2.0 / static_cast<double>(count_)) * sum_;
  // Unreachable while S respects kMaxSumEntry; kept so that no Inf ever leaves this function.
  OBC_CHECK(h.allFinite(), "HessianAccumulator: H = 2/n sum x x^T overflows float64");
  return h;
}

HessianAccumulator HessianAccumulator::from_state(const Eigen::Ref<const Eigen::MatrixXd>& sum,
                                                  std::uint64_t count,
                                                  const AccumulatorOptions& options) {
  OBC_CHECK(sum.rows() == sum.cols() && sum.rows() > 0,
            "sum: expected a non-empty square cols x cols matrix, got ", sum.rows(), "x",
            sum.cols());
  OBC_CHECK(sum.allFinite(), "sum: expected finite values, got NaN or Inf");
  OBC_CHECK(sum.cwiseAbs().maxCoeff() <= kMaxSumEntry, "sum: expected entries of magnitude <= ",
            kMaxSumEntry, " (so that H = 2/n sum stays finite), got ", sum.cwiseAbs().maxCoeff());
  OBC_CHECK(sum == sum.transpose(), "sum: expected an exactly symmetric matrix");
  for (Index i = 0; i < sum.rows(); ++i) {
    OBC_CHECK(sum(i, i) >= 0, "sum: expected a non-negative diagonal (a sum of x x^T), got sum[", i,
              ",", i, "] = ", sum(i, i));
  }
  OBC_CHECK(count > 0 || sum.cwiseAbs().maxCoeff() == 0,
            "sum: expected all zeros for a sample count of 0");
  // A sum of x x^T is positive semidefinite, so every 2x2 principal minor is >= 0:
  // |s_ij| <= sqrt(s_ii s_jj). Checking this costs O(cols^2), like reading the state; it catches
  // the common inconsistencies (edited, subtracted or mismatched sums) here rather than as
  // "increase damp" in a later solve, which still catches indefiniteness this test misses (a
  // full test needs an O(cols^3) factorization). Rounding: each entry is a float64 sum of
  // `count` products, within count * eps of sum |x_i x_j| <= sqrt(s_ii s_jj); 4x that is allowed.
  const double slack =
      1 + 1e-12 + 4 * std::numeric_limits<double>::epsilon() * static_cast<double>(count);
  const Eigen::VectorXd root = sum.diagonal().cwiseSqrt();
  for (Index j = 0; j < sum.cols(); ++j) {
    for (Index i = j + 1; i < sum.rows(); ++i) {
      if (std::abs(sum(i, j)) <= root[i] * root[j] * slack) continue;
      throw InvalidArgument(detail::concat(
          "sum: expected a positive semidefinite sum of x x^T, got an indefinite one: |sum[", i,
          ",", j, "]| = ", std::abs(sum(i, j)), " exceeds sqrt(sum[", i, ",", i, "] * sum[", j,
          ",", j, "]) = ", root[i] * root[j], ", which no sum of x x^T does; was it accumulated ",
          "from inconsistent data (edited, subtracted, or pieced together from different "
          "layers)?"));
    }
  }
  HessianAccumulator acc(sum.rows(), options);
  acc.sum_ = sum;
  acc.count_ = count;
  return acc;
}

}  // namespace obc

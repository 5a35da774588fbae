// The Gram update total += X^T X of accumulate_gram (obc/accumulator.hpp), lower triangle only:
// half the flops of a full product. Compiled once per SIMD level like row_kernels.cpp
// (OBC_KERNEL_NS and a renamed Eigen in the AVX2 copy).
#include <algorithm>

#include "internal/gram_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"
#include "obc/types.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif
#ifndef OBC_GRAM_TABLE
#define OBC_GRAM_TABLE gram_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

using internal::GramJob;
using internal::gram_chunk_rows;
using internal::gram_tile_cols;

using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
using RowsD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Work item t is the block column of tile t below the diagonal: rows [j0, cols) x columns
// [j0, j0 + 64) of the total, one GEMM of the chunk's columns [j0, cols) against [j0, j0 + 64).
// Each element of the total is written by exactly one item, with the same operations whoever
// runs it, and chunks are added in row order: the result does not depend on the thread count.
// Items are handed out dynamically, largest (t = 0) first, which balances the threads.
template <class S>
void add_lower(const GramJob<S>& job, int num_threads, InterruptHook* interrupt) {
  const Index cols = job.cols;
  const Index tiles = (cols + gram_tile_cols - 1) / gram_tile_cols;
  Eigen::Map<MatrixD, 0, Eigen::OuterStride<>> total(job.total, cols, cols,
                                                     Eigen::OuterStride<>(job.total_stride));
  RowsD chunk;
  for (Index begin = 0; begin < job.rows; begin += gram_chunk_rows) {
    if (interrupt != nullptr && interrupt->should_stop()) throw Interrupted();
    const Index len = std::min(gram_chunk_rows, job.rows - begin);
    // Widen (or copy) one chunk to float64: float32 and float64 samples of equal values take
    // the same arithmetic, and only gram_chunk_rows x cols doubles are held at a time.
    Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
               Eigen::OuterStride<>>
        rows(job.x + begin * job.row_stride, len, cols, Eigen::OuterStride<>(job.row_stride));
    chunk = rows.template cast<double>();
    parallel_for(tiles, num_threads, interrupt, [&](Index tile, int) {
      const Index j0 = tile * gram_tile_cols;
      const Index width = std::min(gram_tile_cols, cols - j0);
      const Index below = cols - j0;
      total.block(j0, j0, below, width).noalias() +=
          chunk.rightCols(below).transpose() * chunk.middleCols(j0, width);
    });
  }
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const GramKernels& OBC_GRAM_TABLE() {
  static const GramKernels table{&OBC_KERNEL_NS::add_lower<float>, &OBC_KERNEL_NS::add_lower<double>};
  return table;
}

}  // namespace obc::internal

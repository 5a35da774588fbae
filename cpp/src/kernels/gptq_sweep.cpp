// The GPTQ sweep (obc/gptq.hpp): the column loop of each lazy block and the block's GEMM onto the
// later columns, in fixed chunks of rows, through the factor of the permuted H^-1; and the cubic
// part of that factor (the blocked, parallel Cholesky factor and triangular inverse of
// spd_inverse.hpp). Compiled once per SIMD level like row_kernels.cpp (OBC_KERNEL_NS and a
// renamed Eigen in the AVX2 copy).
#include <algorithm>
#include <vector>

#include "internal/gptq_kernels.hpp"
#include "internal/grid_point.hpp"
#include "kernels/spd_inverse.hpp"
#include "obc/parallel.hpp"
#include "obc/types.hpp"

#ifndef OBC_GPTQ_TABLE
#define OBC_GPTQ_TABLE gptq_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

using internal::GptqJob;

// Rows solved together by one thread: the block updates are (chunk x block) by (block x rest)
// products, and each chunk re-packs the factor's blocks for them (cols^2 / 2 doubles), so
// larger chunks pack less: at 4096 x 4096, one thread, the sweep took 3.6 s with 64 rows, 3.3 s
// with 128, 3.0 s with 256; 128 keeps 768-row layers at 6 items for 2 threads. Fixed, so that
// the chunking (and every float operation) is the same for any thread count; a divisor of 256,
// so that row ranges starting at multiples of 256 (the Ray executor's) give the same bits.
constexpr Index kRowChunk = 128;

using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
using FactorMap = Eigen::Map<const MatrixD>;  // U^T (GptqJob::factor), lower triangle

template <class S>
void sweep_chunk(const GptqJob<S>& job, const FactorMap& lower, Index chunk) {
  const Index rows = job.rows, cols = job.cols, groups = cols / job.group_size;
  const Index r0 = chunk * kRowChunk, len = std::min(kRowChunk, rows - r0);
  const Index block = std::min(job.block_size, cols);
  const int maxq = (1 << job.bits) - 1;
  MatrixD w(len, cols);     // the chunk's weights in quantization order, updated
  MatrixD err(len, block);  // (w_j - q_j) / U_jj of the block's columns
  std::vector<char> zero(static_cast<size_t>(len * cols));  // (i, k) at k * len + i
  for (Index k = 0; k < cols; ++k) {
    const Index c = job.order[k];
    const bool dead = job.dead[c] != 0;
    for (Index i = 0; i < len; ++i) {
      const S v = job.weight[(r0 + i) * job.weight_stride + c];
      zero[static_cast<size_t>(k * len + i)] = (dead || v == S(0)) ? 1 : 0;
      w(i, k) = dead ? 0.0 : static_cast<double>(v);
    }
  }
  Eigen::VectorXd losses = Eigen::VectorXd::Zero(len);
  for (Index b0 = 0; b0 < cols; b0 += block) {
    const Index nb = std::min(block, cols - b0), b1 = b0 + nb;
    for (Index k = b0; k < b1; ++k) {
      const Index c = job.order[k];
      const double ukk = lower(k, k);
      for (Index i = 0; i < len; ++i) {
        S q = S(0);
        if (!zero[static_cast<size_t>(k * len + i)]) {
          const Index at = (r0 + i) * groups + c / job.group_size;
          const GridPoint<S> point{job.scale[at], static_cast<int>(job.zero[at]), maxq};
          q = point.quantize(static_cast<S>(w(i, k)));
        }
        job.out[(r0 + i) * cols + c] = q;
        const double e = (w(i, k) - static_cast<double>(q)) / ukk;
        err(i, k - b0) = e;
        losses[i] += 0.5 * e * e;
      }
      // Within the block, eagerly: the next column must see this step's update.
      if (k + 1 < b1)
        w.middleCols(k + 1, b1 - k - 1).noalias() -=
            err.col(k - b0) * lower.col(k).segment(k + 1, b1 - k - 1).transpose();
    }
    // The block's steps onto every later column at once (level 3).
    if (b1 < cols)
      w.rightCols(cols - b1).noalias() -=
          err.leftCols(nb) * lower.block(b1, b0, cols - b1, nb).transpose();
  }
  if (job.step_losses != nullptr)
    for (Index i = 0; i < len; ++i) job.step_losses[r0 + i] = losses[i];
}

template <class S>
void sweep(const GptqJob<S>& job, const RunOptions& run) {
  const FactorMap lower(job.factor, job.cols, job.cols);
  const Index chunks = (job.rows + kRowChunk - 1) / kRowChunk;
  parallel_for(chunks, run.num_threads, run.interrupt,
               [&](Index chunk, int) { sweep_chunk<S>(job, lower, chunk); });
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const GptqKernels& OBC_GPTQ_TABLE() {
  static const GptqKernels table{&OBC_KERNEL_NS::cholesky_inverse_inplace,
                                 &OBC_KERNEL_NS::sweep<float>, &OBC_KERNEL_NS::sweep<double>};
  return table;
}

}  // namespace obc::internal

// The GPTQ sweep (obc/gptq.hpp) on the Cholesky factor of the permuted, damped Hessian itself
// (no inverse): per lazy block, one GEMM of the earlier blocks' errors with the factor's rows
// gives the block's updated weights, then the block's columns are quantized in turn; fixed chunks
// of rows run in parallel. Also the cubic part of that factor (the blocked, parallel Cholesky
// factor of spd_inverse.hpp). Compiled once per SIMD level like row_kernels.cpp (OBC_KERNEL_NS and
// a renamed Eigen in the AVX2 and AVX-512 copies).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "internal/gptq_kernels.hpp"
#include "kernels/spd_inverse.hpp"
#include "obc/parallel.hpp"
#include "obc/types.hpp"

#ifndef OBC_GPTQ_TABLE
#define OBC_GPTQ_TABLE gptq_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

using internal::GptqJob;

// Rows solved together by one thread: the block updates are (chunk x earlier columns) by
// (earlier columns x block) products, and each chunk re-packs the factor's blocks for them
// (cols^2 / 2 doubles), so larger chunks pack less (at 4096 x 4096, one thread, the old
// right-looking sweep took 3.6 s with 64 rows, 3.3 s with 128, 3.0 s with 256); 128 keeps
// 768-row layers at 6 items for 2 threads. Fixed, so that the chunking (and every float
// operation) is the same for any thread count; a divisor of 256, so that row ranges starting at
// multiples of 256 (the Ray executor's) give the same bits.
constexpr Index kRowChunk = 128;

// Columns per tile of the chunk's transposed copies of the weights (below): a tile of 128 rows
// writes 64 entries of each of 64 columns, 32 KiB of float32, within L1.
constexpr Index kTileCols = 64;

template <class S>
using MatrixS = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
// GptqJob::factor: M^T (strict upper) + diag(L), in the weights' precision.
template <class S>
using FactorMap = Eigen::Map<const MatrixS<S>>;

// L_kk, the factor's diagonal entry of step k, in double (the step losses are summed in double).
template <class S>
double lkk_of(const FactorMap<S>& mt, Index k) {
  return static_cast<double>(mt(k, k));
}

// Step k of a chunk of len rows: round w~ = w + add onto each row's grid (scale, zero point as S;
// is_zero: the weight stays 0), write q to out, add the step loss (L_kk (w~ - q))^2 / 2 to
// losses (double), and turn w into e = w - q. The same float operations as GridPoint::quantize,
// entry by entry (w~ / scale, round half to even, + zero point, clamp to [0, maxq], scale * (code
// - zero point): the code and the zero point are small integers, exact in S), written as plain
// loops without branches so that the compiler vectorizes them (the old per-entry loop, with a
// GridPoint and a strided grid read per entry and an out-of-line nearbyint, was 9% of a whole
// 4096 x 4096 call's CPU time). std::rint rounds as nearbyint does (to nearest, ties to even, in
// the default rounding mode) and is inlined as a vector instruction. Bit-identical to that loop
// in every copy (generic, AVX2, AVX-512: hashed on 96 configurations).
template <class S>
void round_column(Index len, double lkk, int maxq, const S* scale, const S* zero_point,
                  const char* is_zero, const S* add, S* w, S* out, S* rounded, S* updated,
                  double* losses) {
  const S top = static_cast<S>(maxq);
  for (Index i = 0; i < len; ++i) {
    const S wt = w[i] + add[i];
    S code = std::rint(wt / scale[i]) + zero_point[i];
    code = code < S(0) ? S(0) : code;
    code = top < code ? top : code;
    const S q = is_zero[i] ? S(0) : scale[i] * (code - zero_point[i]);
    updated[i] = wt;
    rounded[i] = q;
    out[i] = q;
    w[i] -= q;  // e_k: 0 where w_k was (or was made) 0
  }
  // The OBS step loss (w~_k - q_k)^2 / (2 [H_F^-1]_kk), [H_F^-1]_kk = 1 / L_kk^2.
  for (Index i = 0; i < len; ++i) {
    const double eps = lkk * (static_cast<double>(updated[i]) - static_cast<double>(rounded[i]));
    losses[i] += 0.5 * eps * eps;
  }
}

// One chunk of rows. With e = w - q (original minus quantized weights, step order) and
// M = diag(L)^-1 L, the weight that step k rounds is w~_k = w_k + sum_{i<k} M_ki e_i (the OBS
// updates of the earlier steps, summed: see gptq_factor in gptq.cpp). Left-looking: the
// block's w~ - w is first E_{<b0} M_{B,<b0}^T (one GEMM), then column by column the block's own
// earlier errors are added (a matrix-vector product on a contiguous column of M^T). The chunk's
// weight buffer turns into E column by column, so one len x cols buffer holds both.
// Everything runs in S (float32 weights: float32 GEMMs, twice the rate), except each row's sum of
// step losses, which is accumulated in double (cols terms: float32 would lose ~cols * 6e-8).
template <class S>
void sweep_chunk(const GptqJob<S>& job, const FactorMap<S>& mt, Index chunk) {
  const Index rows = job.rows, cols = job.cols, groups = cols / job.group_size;
  const Index r0 = chunk * kRowChunk, len = std::min(kRowChunk, rows - r0);
  const Index block = std::min(job.block_size, cols);
  const int maxq = (1 << job.bits) - 1;
  MatrixS<S> w(len, cols);     // columns < k: e = w - q; columns >= k: the original weights
  MatrixS<S> add(len, block);  // w~ - w of the block's columns
  std::vector<char> zero(static_cast<size_t>(len * cols));  // (i, k) at k * len + i
  // The chunk's weights by original column, column-major: reading a permuted column straight
  // from the rows strides by a whole row per entry, and at power-of-two widths (4096 floats =
  // 16 KiB) all of a column's entries fall in the same cache set, so nearly every read missed.
  // Transposed here in tiles (contiguous reads, few lines written per tile), then gathered a
  // column at a time. The same buffer then collects the quantized weights by original column,
  // written back to the rows in tiles at the end (the same cache argument for the writes).
  MatrixS<S> natural(len, cols);
  for (Index c0 = 0; c0 < cols; c0 += kTileCols) {
    const Index c1 = std::min(cols, c0 + kTileCols);
    for (Index i = 0; i < len; ++i) {
      const S* row = job.weight + (r0 + i) * job.weight_stride;
      for (Index c = c0; c < c1; ++c) natural(i, c) = row[c];
    }
  }
  for (Index k = 0; k < cols; ++k) {
    const Index c = job.order[k];
    const bool dead = job.dead[c] != 0;
    for (Index i = 0; i < len; ++i) {
      const S v = natural(i, c);
      zero[static_cast<size_t>(k * len + i)] = (dead || v == S(0)) ? 1 : 0;
      w(i, k) = dead ? S(0) : v;
    }
  }
  // The chunk's grids by group, contiguous over the chunk's rows (grid(i, g) at g * len + i), so
  // that a column's rounding loop below reads them as vectors instead of one strided entry per row.
  std::vector<S> grid_scale(static_cast<size_t>(len * groups)), grid_zero(grid_scale.size());
  for (Index i = 0; i < len; ++i)
    for (Index g = 0; g < groups; ++g) {
      const size_t at = static_cast<size_t>((r0 + i) * groups + g);
      grid_scale[static_cast<size_t>(g * len + i)] = job.scale[at];
      grid_zero[static_cast<size_t>(g * len + i)] = static_cast<S>(job.zero[at]);
    }
  std::vector<double> losses(static_cast<size_t>(len), 0.0);
  std::vector<S> rounded(static_cast<size_t>(len)), updated(static_cast<size_t>(len));
  for (Index b0 = 0; b0 < cols; b0 += block) {
    const Index nb = std::min(block, cols - b0);
    if (b0 == 0)
      add.leftCols(nb).setZero();
    else  // every earlier block's steps onto this block at once (level 3)
      add.leftCols(nb).noalias() = w.leftCols(b0) * mt.block(0, b0, b0, nb);
    for (Index k = b0; k < b0 + nb; ++k) {
      // This block's earlier steps, which the next column must see before it is rounded.
      if (k > b0) add.col(k - b0).noalias() += w.middleCols(b0, k - b0) * mt.col(k).segment(b0, k - b0);
      const Index c = job.order[k];
      const Index g = c / job.group_size;
      round_column<S>(len, lkk_of(mt, k), maxq, grid_scale.data() + g * len,
                      grid_zero.data() + g * len, zero.data() + k * len, add.col(k - b0).data(),
                      w.col(k).data(), natural.col(c).data(), rounded.data(), updated.data(),
                      losses.data());
    }
  }
  for (Index c0 = 0; c0 < cols; c0 += kTileCols) {
    const Index c1 = std::min(cols, c0 + kTileCols);
    for (Index i = 0; i < len; ++i) {
      S* row = job.out + (r0 + i) * cols;
      for (Index c = c0; c < c1; ++c) row[c] = natural(i, c);
    }
  }
  if (job.step_losses != nullptr)
    for (Index i = 0; i < len; ++i) job.step_losses[r0 + i] = losses[static_cast<size_t>(i)];
}

template <class S>
void sweep(const GptqJob<S>& job, const RunOptions& run) {
  const FactorMap<S> mt(job.factor, job.cols, job.cols);
  const Index chunks = (job.rows + kRowChunk - 1) / kRowChunk;
  parallel_for(chunks, run.num_threads, run.interrupt,
               [&](Index chunk, int) { sweep_chunk<S>(job, mt, chunk); });
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const GptqKernels& OBC_GPTQ_TABLE() {
  static const GptqKernels table{&OBC_KERNEL_NS::cholesky_factor_inplace<double>,
                                 &OBC_KERNEL_NS::cholesky_factor_inplace<float>,
                                 &OBC_KERNEL_NS::sweep<float>, &OBC_KERNEL_NS::sweep<double>};
  return table;
}

}  // namespace obc::internal

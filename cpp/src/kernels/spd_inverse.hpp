// In-place inverse of a symmetric positive definite matrix: Cholesky, triangular inverse, product
// (or only the first two: the inverse of the Cholesky factor, which is all GPTQ needs).
//
// The inverse Hessian is the one O(cols^3) cost every solver pays once per layer (and most of
// structured pruning's time). Solving L L^T X = I costs 2.33 n^3 flops and needs a second n x n
// buffer; the LAPACK route (potrf, trtri, lauum) costs n^3 in the buffer that held H. Each stage is
// blocked so that the bulk is level-3 (GEMM-shaped Eigen products), and those products are split
// into fixed column (or row) chunks run in parallel: a chunk's arithmetic never depends on the
// thread count, so the inverse is bit-identical for any number of threads.
//
// Only the lower triangle is read; on success the full symmetric inverse is written.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>

#include "obc/errors.hpp"
#include "obc/interrupt.hpp"
#include "obc/parallel.hpp"
#include "obc/types.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

namespace spd_detail {

using MatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
using Map = Eigen::Map<MatrixXd>;
// Panel width: small enough for cache and for enough parallel chunks, wide enough for GEMM speed.
// It depends on n only, never on the thread count.
inline Index block_size(Index n) { return n <= 1024 ? 64 : 128; }

inline Index chunks(Index len, Index nb) { return (len + nb - 1) / nb; }

// Polled by the calling thread between panels (outside every parallel region): one panel step
// takes at most a few hundred ms even at cols = 16k, and a poll costs microseconds.
inline void poll(InterruptHook* interrupt) {
  if (interrupt != nullptr && interrupt->should_stop()) throw Interrupted();
}

/// Lower Cholesky in place (right-looking, blocked, panels of `panel` columns; 0: block_size).
/// False when a pivot is not positive. T: double, or float (GPTQ's float32 factor).
template <class T>
inline bool cholesky_t(Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> a,
                       int num_threads, InterruptHook* interrupt, Index panel = 0) {
  using MatrixT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Index n = a.rows(), kBlock = panel > 0 ? panel : block_size(n);
  for (Index k = 0; k < n; k += kBlock) {
    poll(interrupt);
    const Index b = std::min(kBlock, n - k), rest = n - k - b;
    Eigen::Ref<MatrixT> diag_block = a.block(k, k, b, b);
    Eigen::LLT<Eigen::Ref<MatrixT>> llt(diag_block);  // factors the block in place
    if (llt.info() != Eigen::Success) return false;
    if (rest == 0) break;
    const auto l11 = a.block(k, k, b, b).template triangularView<Eigen::Lower>();
    // Panel: A21 <- A21 L11^-T, row chunks are independent.
    parallel_for(chunks(rest, kBlock), num_threads, nullptr, [&](Index c, int) {
      const Index r0 = k + b + c * kBlock, len = std::min(kBlock, n - r0);
      auto panel = a.block(r0, k, len, b);
      l11.transpose().template solveInPlace<Eigen::OnTheRight>(panel);
    });
    // Trailing update, lower part: A22 -= A21 A21^T, one column chunk (from its diagonal down)
    // per item.
    parallel_for(chunks(rest, kBlock), num_threads, nullptr, [&](Index c, int) {
      const Index j0 = k + b + c * kBlock, len = std::min(kBlock, n - j0);
      a.block(j0, j0, n - j0, len).noalias() -=
          a.block(j0, k, n - j0, b) * a.block(j0, k, len, b).transpose();
    });
  }
  return true;
}

inline bool cholesky(Map a, int num_threads, InterruptHook* interrupt, Index panel = 0) {
  return cholesky_t<double>(a, num_threads, interrupt, panel);
}

/// L <- L^-1 in place (L lower triangular), block columns from the last to the first:
/// X[j+1:, j] = -X[j+1:, j+1:] L[j+1:, j] X_jj with X_jj = L_jj^-1.
inline void triangular_inverse(Map a, int num_threads, InterruptHook* interrupt) {
  const Index n = a.rows(), kBlock = block_size(n);
  const Index nblocks = chunks(n, kBlock);
  MatrixXd panel;
  for (Index bj = nblocks - 1; bj >= 0; --bj) {
    poll(interrupt);
    const Index j = bj * kBlock, b = std::min(kBlock, n - j), rest = n - j - b;
    auto diag = a.block(j, j, b, b);
    MatrixXd diag_inv = MatrixXd::Identity(b, b);
    diag.triangularView<Eigen::Lower>().solveInPlace(diag_inv);
    if (rest > 0) {
      panel.resize(rest, b);
      const Index t0 = j + b;
      // panel = X[t0:, t0:] * L[t0:, j:j+b], by row chunks (X is lower triangular).
      parallel_for(chunks(rest, kBlock), num_threads, nullptr, [&](Index c, int) {
        const Index r0 = c * kBlock, len = std::min(kBlock, rest - r0);
        auto out = panel.middleRows(r0, len);
        out.noalias() = a.block(t0 + r0, t0 + r0, len, len).triangularView<Eigen::Lower>() *
                        a.block(t0 + r0, j, len, b);
        if (r0 > 0) out.noalias() += a.block(t0 + r0, t0, len, r0) * a.block(t0, j, r0, b);
      });
      // X[t0:, j] = -panel X_jj, by the same row chunks (after all of them read L[t0:, j]).
      parallel_for(chunks(rest, kBlock), num_threads, nullptr, [&](Index c, int) {
        const Index r0 = c * kBlock, len = std::min(kBlock, rest - r0);
        a.block(t0 + r0, j, len, b).noalias() =
            -(panel.middleRows(r0, len) * diag_inv.triangularView<Eigen::Lower>());
      });
    }
    diag.triangularView<Eigen::Lower>() = diag_inv;
  }
}

/// X <- X^T X in place, lower triangle (X lower triangular). Column block j of the result,
/// R[j:, j] = X[j:, j:]^T X[j:, j], only reads columns >= j, so ascending blocks can overwrite.
inline void lower_gram(Map a, int num_threads, InterruptHook* interrupt) {
  const Index n = a.rows(), kBlock = block_size(n);
  MatrixXd panel, xcol;
  for (Index j = 0; j < n; j += kBlock) {
    poll(interrupt);
    const Index b = std::min(kBlock, n - j), len_all = n - j;
    // X[j:, j:j+b] with the zeros above its diagonal made explicit (the upper triangle of `a`
    // holds unrelated values).
    xcol = a.block(j, j, len_all, b);
    xcol.topRows(b).triangularView<Eigen::StrictlyUpper>().setZero();
    panel.resize(len_all, b);
    parallel_for(chunks(len_all, kBlock), num_threads, nullptr, [&](Index c, int) {
      const Index r0 = c * kBlock, len = std::min(kBlock, len_all - r0);
      // rows t in [j + r0, j + r0 + len): sum over l >= t of X[l, t] X[l, j:j+b]
      auto out = panel.middleRows(r0, len);
      out.noalias() = a.block(j + r0, j + r0, len, len)
                          .triangularView<Eigen::Lower>()
                          .transpose() *
                      xcol.middleRows(r0, len);
      const Index below = len_all - r0 - len;
      if (below > 0)
        out.noalias() +=
            a.block(j + r0 + len, j + r0, below, len).transpose() * xcol.bottomRows(below);
    });
    // Written back once every chunk has read its columns (the first ones read this block).
    parallel_for(chunks(len_all, kBlock), num_threads, nullptr, [&](Index c, int) {
      const Index r0 = c * kBlock, len = std::min(kBlock, len_all - r0);
      if (r0 == 0)
        a.block(j, j, len, b).triangularView<Eigen::Lower>() = panel.topRows(len);
      else
        a.block(j + r0, j, len, b) = panel.middleRows(r0, len);
    });
  }
}

}  // namespace spd_detail

/// The inverse L^-1 of the lower Cholesky factor L of the SPD matrix in `a` (n x n, column-major;
/// only the lower triangle is read), in place: on success the lower triangle of `a` holds L^-1
/// (A^-1 = L^-T L^-1); the strict upper triangle holds no result. Returns false when a pivot
/// L_ii^2 is not above pivot_tol * a_ii (not positive definite, or numerically singular); `a` is
/// then clobbered. About 2/3 n^3 flops. `interrupt` (may be null) is polled from the calling
/// thread between panels; when it asks to stop, Interrupted is thrown and `a` is clobbered.
inline bool cholesky_inverse_inplace(double* data, Index n, double pivot_tol, int num_threads,
                                     InterruptHook* interrupt) {
  if (n < 384) num_threads = 1;  // a parallel region per panel costs more than it saves there
  spd_detail::Map a(data, n, n);
  const Eigen::VectorXd diag = a.diagonal();
  if (!spd_detail::cholesky(a, num_threads, interrupt)) return false;
  for (Index i = 0; i < n; ++i)
    if (!(a(i, i) * a(i, i) > pivot_tol * diag[i])) return false;
  spd_detail::triangular_inverse(a, num_threads, interrupt);
  return true;
}

/// The lower Cholesky factor L of the SPD matrix in `a` (n x n, column-major; only the lower
/// triangle is read), in place in the lower triangle (the strict upper triangle is left as it
/// was). Returns false as cholesky_inverse_inplace does (same pivot test). About n^3 / 3 flops.
/// Panels of 256 columns above 4096 (GEMM-shaped trailing updates with a deeper inner dimension,
/// half the passes over the trailing matrix), else cholesky_inverse_inplace's panels (so the
/// same n gives the same L bits as there). `interrupt` as there.
/// T = float: the same factor in float32 (GPTQ on float32 weights); the pivot test is made in
/// double on the float32 pivots, and a non-finite pivot fails it too (NaN compares false).
template <class T>
inline bool cholesky_factor_inplace(T* data, Index n, double pivot_tol, int num_threads,
                                    InterruptHook* interrupt) {
  if (n < 384) num_threads = 1;
  Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> a(data, n, n);
  const Eigen::VectorXd diag = a.diagonal().template cast<double>();
  const Index panel = n > 4096 ? 256 : spd_detail::block_size(n);
  if (!spd_detail::cholesky_t<T>(a, num_threads, interrupt, panel)) return false;
  for (Index i = 0; i < n; ++i) {
    const double lii = static_cast<double>(a(i, i));
    if (!(lii * lii > pivot_tol * diag[i])) return false;
  }
  return true;
}

/// Inverse of the SPD matrix in `a` (n x n, column-major; only the lower triangle is read), in
/// place: on success `a` holds the full symmetric inverse. Returns false as
/// cholesky_inverse_inplace does. About n^3 flops (L^-1, then L^-T L^-1). `interrupt` as there.
inline bool spd_inverse_inplace(double* data, Index n, double pivot_tol, int num_threads,
                                InterruptHook* interrupt) {
  if (!cholesky_inverse_inplace(data, n, pivot_tol, num_threads, interrupt)) return false;
  if (n < 384) num_threads = 1;
  spd_detail::Map a(data, n, n);
  spd_detail::lower_gram(a, num_threads, interrupt);
  // Mirror the lower triangle into the upper one: chunk c writes the upper part of rows
  // [j0, j0 + len), tile by tile so that both the reads and the writes stay in cache.
  const Index nb = spd_detail::block_size(n);
  parallel_for(spd_detail::chunks(n, nb), num_threads, nullptr, [&](Index c, int) {
    const Index j0 = c * nb, len = std::min(nb, n - j0);
    for (Index i0 = j0; i0 < n; i0 += nb)
      for (Index i = i0; i < std::min(n, i0 + nb); ++i)
        for (Index j = j0; j < std::min(i, j0 + len); ++j) a(j, i) = a(i, j);
  });
  return true;
}

}  // namespace obc::OBC_KERNEL_NS

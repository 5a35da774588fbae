// LazyInverse: one row's inverse Hessian over its still-active inputs, with lazy batched downdates.
//
// The greedy OBS loop downdates the inverse after every step: G <- G - g_q g_q^T / G_qq. Doing
// that eagerly streams the whole n x n matrix from memory each step. Instead we keep the last k
// downdates as columns of a thin matrix U (n x capacity), so that the current inverse is
// G0 - U U^T. A column of it costs O(n k); the exact diagonal is maintained in O(n) per step;
// when U is full, flush() applies it to G0 in one symmetric rank-k update (level-3, lower
// triangle only) and compacts away the eliminated inputs, so the active set shrinks over time.
// Only the lower triangle of G0 is ever read or written.
#pragma once

#include <Eigen/Core>
#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "internal/huge_pages.hpp"
#include "kernels/compress_forward.hpp"
#include "obc/parallel.hpp"
#include "obc/types.hpp"

// Compiled once per SIMD level: each copy lives in its own namespace (see row_kernels.hpp).
#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

template <class S>
class LazyInverse {
 public:
  using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  using MatMap = Eigen::Map<Mat>;
  using ConstMatMap = Eigen::Map<const Mat>;

  /// Loads G0 = hinv(active, active) (lower triangle) and empties U. hinv: ld x ld, symmetric,
  /// float64 or float32; `active` is increasing.
  template <class T>
  void load(const T* hinv, Index ld, const std::vector<Index>& active, Index capacity) {
    load_with(active, capacity, [&](Index col) { return hinv + col * ld; });
  }
  /// The same from a lower triangle packed column by column (entry (i, j), i >= j, at
  /// j * ld - j * (j - 1) / 2 + i - j).
  template <class T>
  void load_packed(const T* lower, Index ld, const std::vector<Index>& active, Index capacity) {
    load_with(active, capacity, [&](Index col) { return lower + col * ld - col * (col - 1) / 2 - col; });
  }

  Index size() const { return n_; }
  /// Grows the capacity of U to at least b columns (a block step needs b at once).
  /// Only with no pending downdates.
  void reserve(Index b) {
    if (capacity_ >= b) return;
    capacity_ = b;
    u_.ensure(static_cast<size_t>(n_ * capacity_));
    urow_.resize(capacity_);
  }
  Index room() const { return capacity_ - k_; }
  Index pending() const { return k_; }
  /// The last `len` downdate columns appended to U (n x len): G changed by -V V^T.
  auto recent_downdates(Index len) const { return cumap().middleCols(k_ - len, len); }
  const Vec& diag() const { return diag_; }

  /// Current column q of the inverse (length n) into `out`.
  void column(Index q, Eigen::Ref<Vec> out) {
    ConstMatMap g = cgmap();
    for (Index i = 0; i < q; ++i) out[i] = g(q, i);  // upper part read from the lower triangle
    out.tail(n_ - q) = g.col(q).tail(n_ - q);
    if (k_ > 0) {
      ConstMatMap u = cumap();
      for (Index t = 0; t < k_; ++t) urow_[t] = u(q, t);
      out.noalias() -= u.leftCols(k_) * urow_.head(k_);
    }
  }

  /// Current diagonal entry q, G0_qq - sum_t U_qt^2, summed in t order like column_range().
  S entry(Index q) const {
    const S* u = u_.data();
    S value = g_.data()[q * n_ + q];
    for (Index t = 0; t < k_; ++t) value -= u[t * n_ + q] * u[t * n_ + q];
    return value;
  }

  /// Entries [c0, c1) of the current column q into out[c0, c1) (out has length n). Each entry is
  /// G0_iq - sum_t U_it U_qt in t order, whatever the range: ranges split over threads give the
  /// same bits as one call over [0, n).
  void column_range(Index q, Index c0, Index c1, S* out) const {
    const S* g = g_.data();
    for (Index i = c0; i < std::min(c1, q); ++i) out[i] = g[i * n_ + q];  // row q, lower triangle
    for (Index i = std::max(c0, q); i < c1; ++i) out[i] = g[q * n_ + i];
    const S* u = u_.data();
    for (Index t = 0; t < k_; ++t) {
      const S* __restrict u_t = u + t * n_;
      const S u_qt = u_t[q];
      S* __restrict o = out;
      for (Index i = c0; i < c1; ++i) o[i] -= u_t[i] * u_qt;
    }
  }

  /// Entries [c0, c1) of the rank-1 downdate by the current column `col` (length n) of an input
  /// whose pivot is 1 / scale^2: U[c0:c1, k] = col * scale and the diagonal there. Ranges may run
  /// on different threads; commit_downdate() afterwards counts the new column. Needs room() >= 1.
  void downdate_range(const S* col, S scale, Index c0, Index c1) {
    S* __restrict u = u_.data() + k_ * n_;
    S* __restrict d = diag_.data();
    for (Index i = c0; i < c1; ++i) {
      const S v = col[i] * scale;
      u[i] = v;
      d[i] -= v * v;
    }
  }
  void commit_downdate() { ++k_; }

  /// Current columns [begin, begin + len) into out (n x len).
  void columns(Index begin, Index len, Mat& out) {
    out.resize(n_, len);
    for (Index c = 0; c < len; ++c) {
      const Index q = begin + c;
      ConstMatMap g = cgmap();
      for (Index i = 0; i < q; ++i) out(i, c) = g(q, i);
      out.col(c).tail(n_ - q) = g.col(q).tail(n_ - q);
    }
    if (k_ > 0) {
      ConstMatMap u = cumap();
      out.noalias() -= u.leftCols(k_) * u.middleRows(begin, len).leftCols(k_).transpose();
    }
  }

  /// Current diagonal block [begin, begin + len)^2 into out (len x len), both triangles.
  void diagonal_block(Index begin, Index len, Mat& out) const {
    out.resize(len, len);
    ConstMatMap g = cgmap();
    for (Index j = 0; j < len; ++j)
      for (Index i = j; i < len; ++i) out(i, j) = out(j, i) = g(begin + i, begin + j);
    if (k_ > 0) {
      ConstMatMap u = cumap();
      for (Index j = 0; j < len; ++j)
        for (Index i = j; i < len; ++i) {
          S dot = 0;
          for (Index t = 0; t < k_; ++t) dot += u(begin + i, t) * u(begin + j, t);
          out(i, j) -= dot;
          if (i != j) out(j, i) -= dot;
        }
    }
  }

  /// Rank-1 downdate by the current column `col` of input q: G <- G - col col^T / col[q].
  /// Requires room() >= 1.
  void downdate(Index q, const Eigen::Ref<const Vec>& col) {
    const S scale = S(1) / std::sqrt(col[q]);
    MatMap u = umap();
    u.col(k_) = col * scale;
    diag_ -= u.col(k_).cwiseAbs2();
    ++k_;
  }

  /// Rank-len downdate by the current columns `cols` (n x len) of a set B whose diagonal block
  /// G_BB = L L^T: G <- G - cols G_BB^-1 cols^T, stored as V = cols L^-T. Requires room() >= len.
  template <class Lower>
  void downdate_block(const Mat& cols, const Lower& L) {
    const Index len = cols.cols();
    MatMap u = umap();
    auto v = u.middleCols(k_, len);
    v = cols;
    L.template triangularView<Eigen::Lower>().transpose().template solveInPlace<Eigen::OnTheRight>(v);
    diag_ -= v.rowwise().squaredNorm();
    k_ += len;
  }

  /// Eliminates the local inputs in `set` at once (no pending downdates allowed): G becomes the
  /// inverse restricted to the others, i.e. G_FF - G_FS G_SS^-1 G_SF, and the set is dropped.
  /// Returns false when G_SS is not numerically positive definite.
  bool eliminate_now(const std::vector<Index>& set) {
    if (set.empty()) return true;
    const Index z = static_cast<Index>(set.size());
    Mat cols(n_, z);
    for (Index c = 0; c < z; ++c) column(set[static_cast<size_t>(c)], cols.col(c));
    Mat css(z, z);
    for (Index c = 0; c < z; ++c) css.row(c) = cols.row(set[static_cast<size_t>(c)]);
    Eigen::LLT<Mat> llt(css);
    if (llt.info() != Eigen::Success) return false;
    std::vector<char> keep(static_cast<size_t>(n_), 1);
    for (Index i : set) keep[static_cast<size_t>(i)] = 0;
    Mat kept_cols(n_ - z, z);
    for (Index i = 0, r = 0; i < n_; ++i)
      if (keep[static_cast<size_t>(i)]) kept_cols.row(r++) = cols.row(i);
    llt.matrixL().transpose().template solveInPlace<Eigen::OnTheRight>(kept_cols);
    flush(keep);  // compacts (nothing pending)
    if (n_ > 0) gmap().template selfadjointView<Eigen::Lower>().rankUpdate(kept_cols, S(-1));
    for (Index i = 0; i < n_; ++i) diag_[i] = cgmap()(i, i);
    return true;
  }

  /// Applies the pending downdates to G0 and drops every local index i with keep[i] == 0.
  /// `keep` has size() entries; afterwards size() is the number kept, in the same order.
  /// panel_threads >= 1 runs the rank-k update as fixed column panels (GEMMs) on that many threads;
  /// which path runs depends on n only, never on the thread count, so the bits do not either.
  /// Worth it for the shared inverse of structured pruning; the per-row kernels (already one row
  /// per thread) keep the default 0: one symmetric rank-k update.
  void flush(const std::vector<char>& keep, int panel_threads = 0) {
    std::vector<Index> kept;
    kept.reserve(static_cast<size_t>(n_));
    for (Index i = 0; i < n_; ++i)
      if (keep[static_cast<size_t>(i)]) kept.push_back(i);
    const Index m = static_cast<Index>(kept.size());
    // In-place compaction: element (i, j) moves to (kept-rank i, kept-rank j) with the new leading
    // dimension m <= n; every destination address is <= its source and both increase together,
    // so a forward sweep never overwrites data it still has to read. Each kept column's lower part
    // (rows from its own index down) and each column of U is left-packed by its keep bits
    // (kernels/compress_forward.hpp): a pass over G at memory speed, however scattered the
    // removed inputs are.
    if (m < n_) {
      keep8_.resize(static_cast<size_t>(n_));
      keep_bits8(keep.data(), n_, keep8_.data());
      S* g = g_.data();
      for (Index j = 0; j < m; ++j) {
        const Index old = kept[static_cast<size_t>(j)];
        compress_forward(g + j * m + j, g + old * n_ + old, n_ - old, keep8_.data() + old);
      }
      S* u = u_.data();
      for (Index t = 0; t < k_; ++t) compress_forward(u + t * m, u + t * n_, n_, keep8_.data());
    }
    n_ = m;
    if (k_ > 0 && n_ > 0) {
      constexpr Index block = 96;
      if (panel_threads >= 1 && n_ >= 2 * block) {
        // Column block [j0, j0 + w): its rows j0.. (a GEMM; the few entries above the diagonal
        // it also writes are never read).
        const Index num_blocks = (n_ + block - 1) / block;
        parallel_for(num_blocks, panel_threads, nullptr, [&](Index b, int) {
          const Index j0 = b * block, w = std::min(block, n_ - j0);
          auto u_all = cumap().leftCols(k_);
          gmap().block(j0, j0, n_ - j0, w).noalias() -=
              u_all.middleRows(j0, n_ - j0) * u_all.middleRows(j0, w).transpose();
        });
      } else {
        gmap().template selfadjointView<Eigen::Lower>().rankUpdate(cumap().leftCols(k_), S(-1));
      }
    }
    k_ = 0;
    diag_.resize(n_);
    ConstMatMap gm = cgmap();
    for (Index i = 0; i < n_; ++i) diag_[i] = gm(i, i);
  }

 private:
  // column(c)[r] is entry (r, c) of the symmetric source for r >= c (its lower triangle). Active
  // inputs come in runs of consecutive ones (all of them but for dead inputs and zero weights),
  // so each column is copied run by run with contiguous, vectorizable conversions.
  template <class Column>
  void load_with(const std::vector<Index>& active, Index capacity, Column column) {
    n_ = static_cast<Index>(active.size());
    capacity_ = std::max<Index>(1, capacity);
    g_.ensure(static_cast<size_t>(n_ * n_));
    u_.ensure(static_cast<size_t>(n_ * capacity_));
    struct Run {  // ranks [rank, rank + len) are the inputs [orig, orig + len)
      Index rank, orig, len;
    };
    std::vector<Run> runs;
    for (Index i = 0; i < n_;) {
      Index len = 1;
      while (i + len < n_ && active[static_cast<size_t>(i + len)] == active[static_cast<size_t>(i)] + len)
        ++len;
      runs.push_back({i, active[static_cast<size_t>(i)], len});
      i += len;
    }
    S* g = g_.data();
    size_t first = 0;  // the run holding rank j
    for (Index j = 0; j < n_; ++j) {
      while (runs[first].rank + runs[first].len <= j) ++first;
      const auto* src = column(active[static_cast<size_t>(j)]);
      S* dst = g + j * n_;
      for (size_t r = first; r < runs.size(); ++r) {
        const Index i0 = std::max(runs[r].rank, j), end = runs[r].rank + runs[r].len;
        const auto* from = src + runs[r].orig - runs[r].rank;
        for (Index i = i0; i < end; ++i) dst[i] = static_cast<S>(from[i]);
      }
    }
    k_ = 0;
    diag_.resize(n_);
    for (Index i = 0; i < n_; ++i) diag_[i] = g[i * n_ + i];
    urow_.resize(capacity_);
  }

  MatMap gmap() { return MatMap(g_.data(), n_, n_); }
  ConstMatMap cgmap() const { return ConstMatMap(g_.data(), n_, n_); }
  MatMap umap() { return MatMap(u_.data(), n_, capacity_); }
  ConstMatMap cumap() const { return ConstMatMap(u_.data(), n_, capacity_); }

  PageBuffer<S> g_;  // G0, n x n column-major, lower triangle
  PageBuffer<S> u_;  // U, n x capacity column-major
  Vec diag_;                                       // exact diagonal of G0 - U U^T
  Vec urow_;                                       // scratch: U(q, 0:k)
  std::vector<std::uint8_t> keep8_;  // scratch of flush(): keep bits, see keep_bits8
  Index n_ = 0, capacity_ = 1, k_ = 0;
};

}  // namespace obc::OBC_KERNEL_NS

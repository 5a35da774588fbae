// Structured ExactOBS greedy: whole groups of input columns removed from all rows at once.
// Included by kernels/row_kernels.cpp, so it is compiled once per SIMD level like the row kernels.
//
// All rows share one inverse (float64: it is solved once for the layer, so precision is cheap),
// held as a LazyInverse: a step reads columns of G0 - U U^T and the level-3 update runs every few
// steps. A step's other cost is the update of every row, W <- W - W_B G_BB^-1 G[B, :], a pass over
// the rows x n weights, which are kept in the layer's own precision (float32 layers: half the
// memory traffic, like the float32 row kernels); the column norms the next step scores with are
// accumulated in float64 in the same pass, so the weights are streamed through memory once per
// step. Single columns (the common case) split each step by column ranges, one per thread, so
// that almost nothing of a step is serial (StructuredGreedy::run_single_columns); groups and rows
// with zeros of their own split the weight update by row chunks (norms per fixed chunk, summed in
// chunk order).
// Both give the same bits for any thread count.
//
// Each row's loss is the sum of its step losses (exact OBS bookkeeping, float64), corrected for
// the damping afterwards (internal/prune_result.hpp), instead of an O(rows cols^2) pass.
//
// Rows with zeros of their own (outside the columns pruned from the start) have a different
// constrained problem: they get a private inverse (a RowState) so that every greedy score is exact.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "internal/lazy_inverse.hpp"
#include "internal/row_kernels.hpp"
#include "internal/row_state.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc::OBC_KERNEL_NS {

// rows_k[j] -= a_k * b[j] for four rows, and norm[j] += the four new squares (float64, fixed
// order). Restrict-qualified so that the compiler vectorizes without alias checks.
template <class S>
inline void update_four_rows(S* __restrict row0, S* __restrict row1, S* __restrict row2,
                             S* __restrict row3, S a0, S a1, S a2, S a3, const S* __restrict b,
                             double* __restrict norm, Index n) {
  for (Index j = 0; j < n; ++j) {
    const S v0 = row0[j] - a0 * b[j], v1 = row1[j] - a1 * b[j];
    const S v2 = row2[j] - a2 * b[j], v3 = row3[j] - a3 * b[j];
    row0[j] = v0;
    row1[j] = v1;
    row2[j] = v2;
    row3[j] = v3;
    const double d0 = v0, d1 = v1, d2 = v2, d3 = v3;
    norm[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
  }
}

// The structured greedy over one layer. The phases are the methods:
//   load_*()                the columns pruned from the start, the two kinds of rows, the shared
//                           weights over the live columns and the shared inverse;
//   run_single_columns()    single columns, no rows with zeros of their own: each step is one
//                           parallel pass over column ranges (single_column_step);
//   run_groups()            the general loop: candidate groups scored (score_candidates), the best
//                           one removed from every row (group_step);
//   flush()                 the lazy inverse's pending downdates applied and the removed columns
//                           dropped from the inverse, the weights and `active_`;
//   write_outputs()         kept weights, masks and step losses into the job's buffers.
// State is the object's: weights, inverse, norms and losses live across the steps.
template <class S>
class StructuredGreedy {
  using MatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using VectorXd = Eigen::Matrix<double, Eigen::Dynamic, 1>;
  using RowMatrixS = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MatrixS = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;

 public:
  StructuredGreedy(const internal::StructuredJob<S>& job, const RunOptions& run)
      : job_(job),
        run_(run),
        rows_(job.rows),
        cols_(job.h.cols),
        group_(job.group),
        num_groups_(cols_ / group_),
        W_(job.W, rows_, cols_),
        dead_(job.h.dead) {
    OBC_CHECK(job.h.hinv != nullptr, "structured pruning needs the float64 inverse");
  }

  /// Removes groups until job.target are gone (counting those gone from the start) and writes
  /// the job's outputs.
  void run() {
    load_columns_and_rows();
    load_own_rows();
    load_shared_weights();
    eliminate_zero_columns();
    shared_loss_.assign(static_cast<size_t>(num_shared_), 0.0);
    own_loss_.assign(own_rows_.size(), 0.0);
    own_begin_.resize(own_rows_.size());
    own_len_.resize(own_rows_.size());
    keep_.assign(static_cast<size_t>(n_), 1);
    // Single columns and no rows with zeros of their own, the common case, have their own loop.
    if (group_ == 1 && num_own_ == 0) {
      run_single_columns();
    } else {
      run_groups();
    }
    write_outputs();
  }

 private:
  // Row chunks of the shared weights: the unit of parallel work and of the column-norm sums in
  // the general loop.
  static constexpr Index kRowChunk = 32;

  // ---- loading ----------------------------------------------------------------------------

  // Columns pruned from the start (dead inputs and columns that are zero in every row), the
  // groups they complete, and the rows with zeros of their own (outside those columns).
  void load_columns_and_rows() {
    gone_.assign(static_cast<size_t>(cols_), 1);
    for (Index r = 0; r < rows_; ++r)
      for (Index c = 0; c < cols_; ++c)
        if (W_(r, c) != S(0)) gone_[c] = dead_[c];
    for (Index g = 0; g < num_groups_; ++g) {
      bool all = true;
      for (Index c = g * group_; c < (g + 1) * group_; ++c) all = all && gone_[c];
      removed_ += all ? 1 : 0;
    }
    for (Index r = 0; r < rows_; ++r) {
      bool own = false;
      for (Index c = 0; c < cols_ && !own; ++c) own = !gone_[c] && W_(r, c) == S(0);
      (own ? own_rows_ : shared_rows_).push_back(r);
    }
    num_own_ = static_cast<Index>(own_rows_.size());
    num_shared_ = static_cast<Index>(shared_rows_.size());
    num_chunks_ = (num_shared_ + kRowChunk - 1) / kRowChunk;
  }

  // Rows with zeros of their own have a different constrained problem: a private inverse each
  // (a RowState), so that every greedy score is exact.
  void load_own_rows() {
    Index live = 0;
    for (Index c = 0; c < cols_; ++c) live += dead_[c] ? 0 : 1;
    const double own_bytes = static_cast<double>(own_rows_.size()) * live * live * 8.0;
    OBC_CHECK(own_bytes <= 8.0 * (1 << 30), "W: ", own_rows_.size(),
              " rows have zeros of their own; exact structured pruning then needs a private ",
              "inverse per such row (", own_bytes / (1 << 30), " GiB > 8 GiB). Prune whole ",
              "columns first or pass a dense W");
    own_in_.resize(num_own_, cols_);
    own_out_.resize(num_own_, cols_);
    own_states_.resize(own_rows_.size());
    for (Index i = 0; i < num_own_; ++i) {
      own_in_.row(i) = W_.row(own_rows_[static_cast<size_t>(i)]).template cast<double>();
      own_states_[static_cast<size_t>(i)].load(own_in_.row(i).data(), job_.h, run_.lazy_batch,
                                               own_out_.row(i).data());
    }
  }

  // The shared inverse over the live columns, and the shared rows' weights over them:
  // num_shared x wl_cols row-major in one buffer that is compacted in place (no allocation per
  // flush). 64-byte aligned: Eigen's vectorized loops over a Map (the group update and scores)
  // choose where their packets start from the run-time address, so a std::vector's malloc
  // alignment (16 or 32 mod 64, varying from call to call) changed the rounding, and the bits
  // differed between calls.
  void load_shared_weights() {
    for (Index c = 0; c < cols_; ++c)
      if (!dead_[c]) active_.push_back(c);
    inv_.load(job_.h.hinv, cols_, active_,
              lazy_capacity(static_cast<Index>(active_.size()), run_.lazy_batch));
    wl_store_.ensure(std::max<size_t>(1, static_cast<size_t>(num_shared_) * active_.size()));
    wl_cols_ = static_cast<Index>(active_.size());
    for (Index r = 0; r < num_shared_; ++r) {
      const S* src = job_.W + shared_rows_[r] * cols_;
      S* dst = wl_store_.data() + r * wl_cols_;
      for (Index j = 0; j < wl_cols_; ++j) dst[j] = src[active_[j]];
    }
  }

  // Live columns that are zero in every row: eliminated first (weights need no update).
  void eliminate_zero_columns() {
    std::vector<Index> zero_cols;
    std::vector<char> keep(active_.size(), 1);
    for (Index i = 0; i < static_cast<Index>(active_.size()); ++i)
      if (gone_[active_[i]]) {
        zero_cols.push_back(i);
        keep[static_cast<size_t>(i)] = 0;
      }
    if (!zero_cols.empty()) {
      if (!inv_.eliminate_now(zero_cols)) RowState<double>::lost_definiteness();
      compact(kept_of(keep));
    }
    n_ = inv_.size();
  }

  // ---- shared helpers -----------------------------------------------------------------------

  Eigen::Map<RowMatrixS> weights() {
    return Eigen::Map<RowMatrixS>(wl_store_.data(), num_shared_, wl_cols_);
  }

  static std::vector<Index> kept_of(const std::vector<char>& keep) {
    std::vector<Index> kept;
    for (Index i = 0; i < static_cast<Index>(keep.size()); ++i)
      if (keep[static_cast<size_t>(i)]) kept.push_back(i);
    return kept;
  }

  // Keeps only the local columns `kept` (increasing) of the weights and `active_` (the inverse
  // compacts itself). Element (r, kept[j]) moves to (r, j) at the new width m: every destination
  // lies at or before its source and both increase together, so a forward sweep is safe in place.
  void compact(const std::vector<Index>& kept) {
    const Index m = static_cast<Index>(kept.size());
    S* data = wl_store_.data();
    for (Index r = 0; r < num_shared_; ++r)
      for (Index j = 0; j < m; ++j)
        data[r * m + j] = data[r * wl_cols_ + kept[static_cast<size_t>(j)]];
    wl_cols_ = m;
    for (Index j = 0; j < m; ++j) active_[static_cast<size_t>(j)] = active_[kept[j]];
    active_.resize(static_cast<size_t>(m));
  }

  // Applies the inverse's pending downdates and drops the columns removed since the last flush
  // (keep_ == 0) from the inverse, the weights and active_. Returns the kept local indices (as
  // they were before), so that callers can move their per-column state along.
  std::vector<Index> flush() {
    inv_.flush(keep_, step_threads());
    std::vector<Index> kept = kept_of(keep_);
    compact(kept);
    n_ = inv_.size();
    keep_.assign(static_cast<size_t>(n_), 1);
    return kept;
  }

  // Small layers: a parallel region per step costs more than the work itself. Resolved (0 =
  // the default count): the flush takes its panel path for any count >= 1, so 0 must not
  // select the other one.
  int step_threads() const {
    return static_cast<double>(num_shared_ + 1) * static_cast<double>(n_) < 2e4
               ? 1
               : resolve_num_threads(run_.num_threads);
  }

  // Rows with zeros of their own: a private inverse each, whose per-step work (scores and a
  // rank-`group` downdate) is about n^2 * group; below ~1e6 flops per step in all, a parallel
  // region costs more than it saves (on a busy machine, a scheduler slice per step).
  int own_threads() const {
    return static_cast<double>(num_own_) * static_cast<double>(n_) * static_cast<double>(n_) *
                       static_cast<double>(group_) < 1e6
               ? 1
               : resolve_num_threads(run_.num_threads);
  }

  void check_interrupt() const {
    if (run_.interrupt && run_.interrupt->should_stop()) throw Interrupted();
  }

  // ---- single columns -----------------------------------------------------------------------
  // One step is one parallel pass over column ranges [c0, c1) with thread t on range t:
  //  - that part of the pivot's current inverse column (LazyInverse::column_range), and the
  //    downdate of U and of the diagonal there;
  //  - those columns of every shared row, W[:, c0:c1] -= coef * G[q, c0:c1], and their squared
  //    norms summed over all rows in row order (no per-chunk partial sums to add up);
  //  - the scores norm_j / G_jj of the still-active columns there, and their minimum.
  // Serial per step: the pivot, the rows' coefficients W[r, q] / G_qq (read before any thread
  // writes) and the combination of the ranges' minima (first strict minimum, as one pass would
  // find it). Every entry's arithmetic is the same however [0, n) is split, so the bits do not
  // depend on the thread count; range bounds are multiples of 16 so that vector and scalar code
  // of the compiled loops see the same entries for any split.

  void run_single_columns() {
    norms_.resize(n_);
    col_.resize(n_);
    col_s_.resize(static_cast<size_t>(n_));
    coef_.resize(static_cast<size_t>(num_shared_));
    run_ranges([&](Index part, Index c0, Index c1) {
      range_norms(c0, c1);
      range_argmin(part, c0, c1);
    });
    Index q = best_of_ranges();
    while (removed_ < job_.target && q >= 0) {
      if (inv_.room() < 1) {
        const std::vector<Index> kept = flush();
        const Index q_kept = static_cast<Index>(std::lower_bound(kept.begin(), kept.end(), q) -
                                                kept.begin());
        for (Index m = 0; m < static_cast<Index>(kept.size()); ++m)
          norms_[m] = norms_[kept[static_cast<size_t>(m)]];
        q = q_kept;
      }
      q = single_column_step(q);
      ++removed_;
      check_interrupt();
    }
  }

  // Removes local column q from every shared row; returns the next step's column (-1: none).
  Index single_column_step(Index q) {
    const double pivot = inv_.entry(q);
    if (!(pivot > 0) || !std::isfinite(pivot)) RowState<double>::lost_definiteness();
    const double scale = 1.0 / std::sqrt(pivot);
    for (Index r = 0; r < num_shared_; ++r) {
      const double w_q = static_cast<double>(weights()(r, q));
      shared_loss_[static_cast<size_t>(r)] += 0.5 * w_q * w_q / pivot;
      coef_[static_cast<size_t>(r)] = static_cast<S>(w_q / pivot);
    }
    keep_[static_cast<size_t>(q)] = 0;
    run_ranges([&](Index part, Index c0, Index c1) {
      inv_.column_range(q, c0, c1, col_.data());
      inv_.downdate_range(col_.data(), scale, c0, c1);
      for (Index j = c0; j < c1; ++j) col_s_[static_cast<size_t>(j)] = static_cast<S>(col_[j]);
      range_update(c0, c1);
      range_argmin(part, c0, c1);
    });
    inv_.commit_downdate();
    return best_of_ranges();
  }

  // Range p of `parts` over [0, n): bounds are multiples of 16 (see above).
  Index range_bound(Index p, Index parts) const {
    return p >= parts ? n_ : std::min(n_, (p * n_ / parts) / 16 * 16);
  }

  // fn(part, c0, c1) for every range, one per thread, in parallel.
  template <class Fn>
  void run_ranges(const Fn& fn) {
    const Index parts = step_threads();
    range_best_.assign(static_cast<size_t>(parts), -1);
    range_score_.assign(static_cast<size_t>(parts), 0.0);
    parallel_for_static(parts, static_cast<int>(parts), nullptr, [&](Index p, int) {
      fn(p, range_bound(p, parts), range_bound(p + 1, parts));
    });
  }

  void range_norms(Index c0, Index c1) {
    double* norm = norms_.data();
    for (Index j = c0; j < c1; ++j) norm[j] = 0;
    for (Index r = 0; r < num_shared_; ++r) {
      const S* row = weights().row(r).data();
      for (Index j = c0; j < c1; ++j)
        norm[j] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    }
  }

  void range_update(Index c0, Index c1) {
    double* norm = norms_.data() + c0;
    for (Index j = 0; j < c1 - c0; ++j) norm[j] = 0;
    const S* b = col_s_.data() + c0;
    const Index len = c1 - c0;
    auto w = weights();
    Index r = 0;
    for (; r + 4 <= num_shared_; r += 4)
      update_four_rows(w.row(r).data() + c0, w.row(r + 1).data() + c0, w.row(r + 2).data() + c0,
                       w.row(r + 3).data() + c0, coef_[static_cast<size_t>(r)],
                       coef_[static_cast<size_t>(r + 1)], coef_[static_cast<size_t>(r + 2)],
                       coef_[static_cast<size_t>(r + 3)], b, norm, len);
    for (; r < num_shared_; ++r) {
      S* row = w.row(r).data() + c0;
      const S a = coef_[static_cast<size_t>(r)];
      for (Index j = 0; j < len; ++j) {
        const S v = row[j] - a * b[j];
        row[j] = v;
        norm[j] += static_cast<double>(v) * static_cast<double>(v);
      }
    }
  }

  void range_argmin(Index part, Index c0, Index c1) {
    const double* diag = inv_.diag().data();
    Index best = -1;
    double best_score = 0;
    for (Index j = c0; j < c1; ++j) {
      if (!keep_[static_cast<size_t>(j)]) continue;
      if (!(diag[j] > 0)) RowState<double>::lost_definiteness();
      const double score = norms_[j] / diag[j];
      if (best < 0 || score < best_score) {
        best = j;
        best_score = score;
      }
    }
    range_best_[static_cast<size_t>(part)] = best;
    range_score_[static_cast<size_t>(part)] = best_score;
  }

  // The first strict minimum over the ranges, as one pass over [0, n) would find it.
  Index best_of_ranges() const {
    Index best = -1;
    double best_score = 0;
    for (size_t p = 0; p < range_best_.size(); ++p)
      if (range_best_[p] >= 0 && (best < 0 || range_score_[p] < best_score)) {
        best = range_best_[p];
        best_score = range_score_[p];
      }
    return best;
  }

  // ---- groups, and rows with zeros of their own ---------------------------------------------
  // Column norms per row chunk (chunk_norms_ column c: chunk c's squared column norms, its rows
  // summed in row order), added up in chunk order for the scores; the weight update splits by
  // row chunks. The same bits for any thread count.

  void run_groups() {
    chunk_norms_.setZero(n_, std::max<Index>(num_chunks_, 1));
    parallel_for(num_chunks_, step_threads(), nullptr, [&](Index ch, int) { update_norms(ch); });
    while (removed_ < job_.target) {
      if (inv_.room() < group_) {
        const std::vector<Index> kept = flush();
        for (Index j = 0; j < static_cast<Index>(kept.size()); ++j)
          chunk_norms_.row(j) = chunk_norms_.row(kept[static_cast<size_t>(j)]);
        inv_.reserve(group_);
      }
      find_candidate_spans();
      if (spans_.empty()) break;
      score_candidates();
      size_t best = 0;
      for (size_t s = 1; s < spans_.size(); ++s)
        if (scores_[s] < scores_[best]) best = s;
      group_step(spans_[best].first, spans_[best].second);
      ++removed_;
      check_interrupt();
    }
  }

  // Candidate groups: the still-active columns of each group, contiguous in local order.
  void find_candidate_spans() {
    spans_.clear();
    for (Index i = 0; i < n_ && group_ == 1; ++i)
      if (keep_[static_cast<size_t>(i)]) spans_.emplace_back(i, 1);
    for (Index i = 0; i < n_ && group_ > 1;) {
      if (!keep_[static_cast<size_t>(i)]) {
        ++i;
        continue;
      }
      const Index g = active_[i] / group_;
      Index len = 1;
      while (i + len < n_ && keep_[static_cast<size_t>(i + len)] && active_[i + len] / group_ == g)
        ++len;
      spans_.emplace_back(i, len);
      i += len;
    }
  }

  // scores_[s]: span s's OBS score summed over all rows (shared rows from the shared inverse,
  // rows with zeros of their own exactly from their private ones, added in row order).
  void score_candidates() {
    const Index num_spans = static_cast<Index>(spans_.size());
    col_norms_ = chunk_norms_.col(0).head(n_);  // summed in a fixed order: chunk 0, 1, ...
    for (Index ch = 1; ch < num_chunks_; ++ch) col_norms_ += chunk_norms_.col(ch).head(n_);
    scores_.assign(spans_.size(), 0.0);
    if (group_ == 1) {
      for (Index s = 0; s < num_spans; ++s) score_shared_span(s);
    } else {
      parallel_for(num_spans, step_threads(), run_.interrupt,
                   [&](Index s, int) { score_shared_span(s); });
    }
    if (num_own_ == 0) return;
    own_scores_.setZero(num_own_, num_spans);
    parallel_for(num_own_, own_threads(), run_.interrupt, [&](Index i, int) {
      RowState<double>& state = own_states_[static_cast<size_t>(i)];
      state.ensure_room(group_);
      own_spans(state, own_begin_[i], own_len_[i]);
      for (Index s = 0; s < num_spans; ++s) {
        const size_t g = static_cast<size_t>(active_[spans_[s].first] / group_);
        if (own_len_[i][g] == 0) continue;
        if (!state.factor_block(own_begin_[i][g], own_len_[i][g]))
          RowState<double>::lost_definiteness();
        own_scores_(i, s) = state.block_score(own_begin_[i][g], own_len_[i][g]);
      }
    });
    for (Index i = 0; i < num_own_; ++i)
      for (Index s = 0; s < num_spans; ++s) scores_[static_cast<size_t>(s)] += own_scores_(i, s);
  }

  // The shared rows' score of span s: sum over rows of w_B^T G_BB^-1 w_B.
  void score_shared_span(Index s) {
    const auto [begin, len] = spans_[static_cast<size_t>(s)];
    const VectorXd& diag = inv_.diag();
    if (len == 1) {  // w^T (G_jj)^-1 w summed over rows, without a factorization
      if (!(diag[begin] > 0)) RowState<double>::lost_definiteness();
      scores_[static_cast<size_t>(s)] = col_norms_[begin] / diag[begin];
      return;
    }
    MatrixXd gbb;
    inv_.diagonal_block(begin, len, gbb);
    Eigen::LLT<MatrixXd> llt(gbb);
    if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
    // len x rows
    MatrixXd wt = weights().middleCols(begin, len).transpose().template cast<double>();
    llt.matrixL().solveInPlace(wt);
    scores_[static_cast<size_t>(s)] = wt.squaredNorm();
  }

  // Local span [begin, begin + len) of each group among a row state's free inputs (len 0: none).
  void own_spans(RowState<double>& state, std::vector<Index>& begin,
                 std::vector<Index>& len) const {
    begin.assign(static_cast<size_t>(num_groups_), 0);
    len.assign(static_cast<size_t>(num_groups_), 0);
    for (Index i = state.size() - 1; i >= 0; --i) {
      if (!state.is_free(i)) continue;
      const size_t g = static_cast<size_t>(state.orig(i) / group_);
      begin[g] = i;
      ++len[g];
    }
  }

  // Removes the group at local columns [begin, begin + len) from every row: the rows with
  // zeros of their own by their private OBS update; the shared rows by
  // W <- W - W_B G_BB^-1 G[B,:] (norms for the next step in the same pass), then the shared
  // inverse downdate.
  void group_step(Index begin, Index len) {
    const size_t best_group = static_cast<size_t>(active_[begin] / group_);
    if (num_own_ > 0) {
      parallel_for(num_own_, own_threads(), nullptr, [&](Index i, int) {
        const Index b = own_begin_[i][best_group], l = own_len_[i][best_group];
        if (l == 0) return;
        RowState<double>& state = own_states_[static_cast<size_t>(i)];
        state.factor_block(b, l);
        own_loss_[static_cast<size_t>(i)] += state.prune_block(b, l);
      });
    }
    inv_.columns(begin, len, cols_b_);  // n x len: G[:, B]
    block_ = cols_b_.middleRows(begin, len);
    Eigen::LLT<MatrixXd> llt(block_);
    if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
    for (Index i = begin; i < begin + len; ++i) keep_[static_cast<size_t>(i)] = 0;
    cols_s_ = cols_b_.template cast<S>();
    parallel_for(num_chunks_, step_threads(), nullptr,
                 [&](Index ch, int) { update_chunk(ch, begin, len, llt); });
    inv_.downdate_block(cols_b_, llt.matrixLLT());
  }

  // group_step's update of the shared rows of chunk ch, and their step losses and norms.
  void update_chunk(Index ch, Index begin, Index len, const Eigen::LLT<MatrixXd>& llt) {
    const Index r0 = ch * kRowChunk, nr = std::min(kRowChunk, num_shared_ - r0);
    auto rows_ch = weights().middleRows(r0, nr);
    double* step_loss = shared_loss_.data() + r0;
    if (len == 1) {
      auto norms = chunk_norms_.col(ch).head(n_);
      norms.setZero();
      // Plain loops the compiler vectorizes (Eigen's float -> double cast does not): update,
      // widening and squares in one pass, four rows at a time so that the float64 norms are
      // read and written once per four rows. Chunks hold a multiple of four rows, so the
      // summation order is fixed by the row index alone.
      const S* b = cols_s_.data();
      double* norm = norms.data();
      const double pivot = block_(0, 0);
      auto coef_of = [&](Index r) {
        const double w_q = static_cast<double>(rows_ch(r, begin));
        step_loss[r] += 0.5 * w_q * w_q / pivot;
        return static_cast<S>(w_q / pivot);
      };
      Index r = 0;
      for (; r + 4 <= nr; r += 4) {
        const S a0 = coef_of(r), a1 = coef_of(r + 1), a2 = coef_of(r + 2), a3 = coef_of(r + 3);
        update_four_rows(rows_ch.row(r).data(), rows_ch.row(r + 1).data(),
                         rows_ch.row(r + 2).data(), rows_ch.row(r + 3).data(), a0, a1, a2, a3, b,
                         norm, n_);
      }
      for (; r < nr; ++r) {
        S* row = rows_ch.row(r).data();
        const S a = coef_of(r);
        for (Index j = 0; j < n_; ++j) {
          const S v = row[j] - a * b[j];
          row[j] = v;
          norm[j] += static_cast<double>(v) * static_cast<double>(v);
        }
      }
    } else {
      const MatrixXd w_b = rows_ch.middleCols(begin, len).transpose().template cast<double>();
      const MatrixXd coef = llt.solve(w_b);  // len x nr: G_BB^-1 w_B per row
      for (Index r = 0; r < nr; ++r) step_loss[r] += 0.5 * w_b.col(r).dot(coef.col(r));
      rows_ch.noalias() -= coef.transpose().template cast<S>() * cols_s_.transpose();
      update_norms(ch);
    }
  }

  // chunk_norms_ column ch: the squared column norms of row chunk ch (rows are contiguous, so
  // they are summed row by row).
  void update_norms(Index ch) {
    const Index r0 = ch * kRowChunk, nr = std::min(kRowChunk, num_shared_ - r0);
    auto norms = chunk_norms_.col(ch).head(n_);
    norms.setZero();
    double* norm = norms.data();
    for (Index r = r0; r < r0 + nr; ++r) {
      const S* row = weights().row(r).data();
      for (Index j = 0; j < n_; ++j)
        norm[j] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    }
  }

  // ---- outputs ------------------------------------------------------------------------------

  // Kept columns of shared rows from the weights, own rows from their states; all else zero.
  void write_outputs() {
    std::vector<Index> kept_cols;
    for (Index i = 0; i < n_; ++i)
      if (keep_[static_cast<size_t>(i)]) kept_cols.push_back(i);
    std::fill(job_.out, job_.out + rows_ * cols_, S(0));
    std::fill(job_.pruned, job_.pruned + rows_ * cols_, std::uint8_t(1));
    for (Index r = 0; r < num_shared_; ++r) {
      S* out = job_.out + shared_rows_[r] * cols_;
      std::uint8_t* pruned = job_.pruned + shared_rows_[r] * cols_;
      for (Index j : kept_cols) {
        out[active_[j]] = weights()(r, j);
        pruned[active_[j]] = 0;
      }
    }
    for (Index r = 0; r < num_shared_; ++r)
      job_.step_losses[shared_rows_[r]] = shared_loss_[static_cast<size_t>(r)];
    for (Index i = 0; i < num_own_; ++i) {
      job_.step_losses[own_rows_[static_cast<size_t>(i)]] = own_loss_[static_cast<size_t>(i)];
      own_states_[static_cast<size_t>(i)].finish();
      const Index r = own_rows_[static_cast<size_t>(i)];
      S* out = job_.out + r * cols_;
      std::uint8_t* pruned = job_.pruned + r * cols_;
      for (Index c = 0; c < cols_; ++c) out[c] = static_cast<S>(own_out_(i, c));
      for (Index j : kept_cols) pruned[active_[j]] = W_(r, active_[j]) == S(0) ? 1 : 0;
    }
  }

  // ---- state ----------------------------------------------------------------------------------
  const internal::StructuredJob<S>& job_;
  const RunOptions& run_;
  const Index rows_, cols_, group_, num_groups_;
  const Eigen::Map<const RowMatrixS> W_;
  const char* dead_;

  std::vector<char> gone_;  // cols: pruned from the start (dead, or zero in every row)
  Index removed_ = 0;       // groups removed so far, counting those gone from the start
  std::vector<Index> own_rows_, shared_rows_;
  Index num_own_ = 0, num_shared_ = 0, num_chunks_ = 0;

  // Rows with zeros of their own: float64 copies, outputs and private inverses.
  RowMatrixXd own_in_, own_out_;
  std::vector<RowState<double>> own_states_;
  std::vector<std::vector<Index>> own_begin_, own_len_;  // own_spans() per such row

  // The shared problem: original column of each local index, the inverse over them, the shared
  // rows' weights (num_shared x wl_cols_, see load_shared_weights) and the live width n_.
  std::vector<Index> active_;
  LazyInverse<double> inv_;
  PageBuffer<S> wl_store_;
  Index wl_cols_ = 0;
  Index n_ = 0;
  std::vector<char> keep_;  // n_: 0 = removed, dropped at the next flush

  // Each row's step losses 1/2 w_B^T G_BB^-1 w_B, summed in step order: their total is the row's
  // loss under the damped H (exact OBS), so no O(rows cols^2) pass is needed afterwards.
  std::vector<double> shared_loss_, own_loss_;

  // run_single_columns(): one norm per column, the pivot's inverse column (float64 and S), the
  // rows' coefficients and each range's best column and score.
  VectorXd norms_, col_;
  std::vector<S> col_s_, coef_;
  std::vector<Index> range_best_;
  std::vector<double> range_score_;

  // run_groups(): per-chunk norms, candidate spans (local begin, len) and their scores, the
  // removed group's inverse columns and diagonal block.
  MatrixXd chunk_norms_;
  std::vector<std::pair<Index, Index>> spans_;
  std::vector<double> scores_;
  VectorXd col_norms_;
  MatrixXd own_scores_, cols_b_, block_;
  MatrixS cols_s_;
};

// The kernel table's entry point (internal/row_kernels.hpp).
template <class S>
void structured_rows(const internal::StructuredJob<S>& job, const RunOptions& run) {
  StructuredGreedy<S>(job, run).run();
}

}  // namespace obc::OBC_KERNEL_NS

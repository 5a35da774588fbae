// Structured ExactOBS pruning: whole groups of input columns removed from all rows at once.
#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "internal/prepared_view.hpp"
#include "internal/prune_result.hpp"
#include "internal/lazy_inverse.hpp"
#include "internal/row_state.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"
#include "obc/prune.hpp"

namespace obc {

template <class Scalar>
PruneResult<Scalar> prune_structured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                     const HessianRef& H, double sparsity,
                                     Index group, const HessianOptions& hopt,
                                     const RunOptions& run) {
  OBC_CHECK(std::isfinite(sparsity) && sparsity >= 0 && sparsity <= 1,
            "sparsity: expected a value in [0, 1], got ", sparsity);
  OBC_CHECK(W.rows() > 0 && W.cols() > 0, "W: expected a non-empty rows x cols matrix, got ",
            W.rows(), "x", W.cols());
  OBC_CHECK(group >= 1 && W.cols() % group == 0, "group: expected a positive divisor of cols (",
            W.cols(), "), got ", group);
  const PreparedHessian prep = prepare_hessian(H, hopt, run.num_threads);
  OBC_CHECK(prep.cols() == W.cols(), "H: expected ", W.cols(), "x", W.cols(), ", got ",
            prep.cols(), "x", prep.cols());
  OBC_CHECK(W.allFinite(), "W: expected finite values, got NaN or Inf");
  const Index rows = W.rows(), cols = W.cols(), num_groups = cols / group;
  const Index target = count_for_sparsity(sparsity, num_groups);

  // Columns pruned from the start: dead inputs and columns that are zero in every row.
  std::vector<char> gone(static_cast<size_t>(cols), 0);
  for (Index c = 0; c < cols; ++c)
    gone[c] = prep.dead[static_cast<size_t>(c)] || (W.col(c).array() == Scalar(0)).all();
  Index removed = 0;
  for (Index g = 0; g < num_groups; ++g) {
    bool all = true;
    for (Index c = g * group; c < (g + 1) * group; ++c) all = all && gone[c];
    removed += all ? 1 : 0;
  }

  // Rows with zeros of their own (outside the columns pruned from the start) have a different
  // constrained problem per row: they get a private inverse (a RowState) so that every greedy
  // score is exact. All other rows share one inverse.
  std::vector<Index> own_rows, shared_rows;
  for (Index r = 0; r < rows; ++r) {
    bool own = false;
    for (Index c = 0; c < cols && !own; ++c) own = !gone[c] && W(r, c) == Scalar(0);
    (own ? own_rows : shared_rows).push_back(r);
  }
  const Index live = cols - prep.num_dead;
  const double own_bytes = static_cast<double>(own_rows.size()) * live * live * 8.0;
  OBC_CHECK(own_bytes <= 8.0 * (1 << 30), "W: ", own_rows.size(),
            " rows have zeros of their own; exact structured pruning then needs a private ",
            "inverse per such row (", own_bytes / (1 << 30), " GiB > 8 GiB). Prune whole ",
            "columns first or pass a dense W");
  const RowMatrixXd W64 = W.template cast<double>();
  RowMatrixXd own_out(static_cast<Index>(own_rows.size()), cols);
  std::vector<internal::RowState<double>> own_states(own_rows.size());
  for (size_t i = 0; i < own_rows.size(); ++i)
    own_states[i].load(W64.row(own_rows[i]).data(), internal::view_of(prep), run.lazy_batch,
                       own_out.row(static_cast<Index>(i)).data());

  // The shared problem in float64 (solved once for all rows, so precision is cheap), with the
  // same lazy batched inverse as the row kernels: a step reads columns of G0 - U U^T and the
  // level-3 update runs every few steps, instead of streaming all of G through memory each step.
  std::vector<Index> active;  // original column of each local index
  for (Index c = 0; c < cols; ++c)
    if (!prep.dead[static_cast<size_t>(c)]) active.push_back(c);
  const Index num_shared = static_cast<Index>(shared_rows.size());
  internal::LazyInverse<double> inv;
  inv.load(prep.hinv.data(), cols, active, internal::lazy_capacity(
                                              static_cast<Index>(active.size()), run.lazy_batch));
  RowMatrixXd Wl(num_shared, static_cast<Index>(active.size()));
  for (Index j = 0; j < Wl.cols(); ++j)
    for (Index r = 0; r < num_shared; ++r) Wl(r, j) = W64(shared_rows[r], active[j]);
  // Drops the local columns with keep[i] == 0 from Wl and `active` (inv compacts itself).
  auto compact = [&](const std::vector<char>& keep) {
    Index m = 0;
    for (Index i = 0; i < static_cast<Index>(keep.size()); ++i) {
      if (!keep[static_cast<size_t>(i)]) continue;
      Wl.col(m) = Wl.col(i);
      active[static_cast<size_t>(m)] = active[static_cast<size_t>(i)];
      ++m;
    }
    Wl.conservativeResize(Eigen::NoChange, m);
    active.resize(static_cast<size_t>(m));
  };
  {  // live columns that are zero in every row: eliminated first (weights need no update)
    std::vector<Index> zero_cols;
    std::vector<char> keep(active.size(), 1);
    for (Index i = 0; i < static_cast<Index>(active.size()); ++i)
      if (gone[active[i]]) {
        zero_cols.push_back(i);
        keep[static_cast<size_t>(i)] = 0;
      }
    if (!inv.eliminate_now(zero_cols)) internal::RowState<double>::lost_definiteness();
    compact(keep);
  }
  Index n = inv.size();

  // Local span [begin, begin + len) of each group among a row state's free inputs (len 0: none).
  auto own_spans = [&](internal::RowState<double>& state, std::vector<Index>& begin,
                       std::vector<Index>& len) {
    begin.assign(static_cast<size_t>(num_groups), 0);
    len.assign(static_cast<size_t>(num_groups), 0);
    for (Index i = state.size() - 1; i >= 0; --i) {
      if (!state.is_free(i)) continue;
      const size_t g = static_cast<size_t>(state.orig(i) / group);
      begin[g] = i;
      ++len[g];
    }
  };

  constexpr Index row_chunk = 64;
  const Index num_own = static_cast<Index>(own_rows.size());
  std::vector<std::vector<Index>> own_begin(own_rows.size()), own_len(own_rows.size());
  std::vector<char> keep(static_cast<size_t>(n), 1);  // 0: removed, dropped at the next flush
  Eigen::MatrixXd block, cols_b;
  while (removed < target) {
    if (inv.room() < group) {
      inv.flush(keep);
      compact(keep);
      n = inv.size();
      keep.assign(static_cast<size_t>(n), 1);
      inv.reserve(group);
    }
    // Candidate groups: the still-active columns of each group, contiguous in local order.
    std::vector<std::pair<Index, Index>> spans;  // (local begin, len)
    for (Index i = 0; i < n;) {
      if (!keep[static_cast<size_t>(i)]) {
        ++i;
        continue;
      }
      const Index g = active[i] / group;
      Index len = 1;
      while (i + len < n && keep[static_cast<size_t>(i + len)] && active[i + len] / group == g)
        ++len;
      spans.emplace_back(i, len);
      i += len;
    }
    if (spans.empty()) break;
    const Index num_spans = static_cast<Index>(spans.size());
    // Small layers: a parallel region per step costs more than the scoring itself.
    const int score_threads =
        static_cast<double>(num_shared + 1) * static_cast<double>(n) * group < 1e6
            ? 1
            : run.num_threads;
    std::vector<double> scores(spans.size());
    // Column norms row by row: Wl is row-major, so a column-wise reduction would stride.
    Eigen::RowVectorXd col_norms = Eigen::RowVectorXd::Zero(n);
    for (Index r = 0; r < num_shared; ++r) col_norms += Wl.row(r).cwiseAbs2();
    const Eigen::VectorXd& diag = inv.diag();
    parallel_for(num_spans, score_threads, run.interrupt, [&](Index s, int) {
      const auto [begin, len] = spans[static_cast<size_t>(s)];
      if (len == 1) {  // w^T (G_jj)^-1 w summed over rows, without a factorization
        if (!(diag[begin] > 0)) internal::RowState<double>::lost_definiteness();
        scores[static_cast<size_t>(s)] = col_norms[begin] / diag[begin];
        return;
      }
      Eigen::MatrixXd gbb;
      inv.diagonal_block(begin, len, gbb);
      Eigen::LLT<Eigen::MatrixXd> llt(gbb);
      if (llt.info() != Eigen::Success) internal::RowState<double>::lost_definiteness();
      Eigen::MatrixXd wt = Wl.middleCols(begin, len).transpose();  // len x shared rows
      llt.matrixL().solveInPlace(wt);
      scores[static_cast<size_t>(s)] = wt.squaredNorm();
    });
    // Exact per-row scores of rows with their own zeros, summed in row order (deterministic).
    Eigen::MatrixXd own_scores = Eigen::MatrixXd::Zero(num_own, num_spans);
    parallel_for(num_own, run.num_threads, run.interrupt, [&](Index i, int) {
      internal::RowState<double>& state = own_states[static_cast<size_t>(i)];
      state.ensure_room(group);
      own_spans(state, own_begin[i], own_len[i]);
      for (Index s = 0; s < num_spans; ++s) {
        const size_t g = static_cast<size_t>(active[spans[s].first] / group);
        if (own_len[i][g] == 0) continue;
        if (!state.factor_block(own_begin[i][g], own_len[i][g]))
          internal::RowState<double>::lost_definiteness();
        own_scores(i, s) = state.block_score(own_begin[i][g], own_len[i][g]);
      }
    });
    for (Index i = 0; i < num_own; ++i)
      for (Index s = 0; s < num_spans; ++s) scores[static_cast<size_t>(s)] += own_scores(i, s);
    size_t best = 0;
    for (size_t s = 1; s < spans.size(); ++s)
      if (scores[s] < scores[best]) best = s;
    const auto [begin, len] = spans[best];
    const size_t best_group = static_cast<size_t>(active[begin] / group);
    parallel_for(num_own, run.num_threads, nullptr, [&](Index i, int) {
      const Index b = own_begin[i][best_group], l = own_len[i][best_group];
      if (l == 0) return;
      internal::RowState<double>& state = own_states[static_cast<size_t>(i)];
      state.factor_block(b, l);
      state.prune_block(b, l);
    });
    // W <- W - W_B G_BB^-1 G[B,:] for every shared row, then the shared inverse downdate.
    inv.columns(begin, len, cols_b);  // n x len: G[:, B]
    block = cols_b.middleRows(begin, len);
    Eigen::LLT<Eigen::MatrixXd> llt(block);
    if (llt.info() != Eigen::Success) internal::RowState<double>::lost_definiteness();
    const Index chunks = (num_shared + row_chunk - 1) / row_chunk;
    parallel_for(chunks, score_threads, nullptr, [&](Index ch, int) {
      const Index r0 = ch * row_chunk, nr = std::min(row_chunk, num_shared - r0);
      const Eigen::MatrixXd coef = llt.solve(Wl.block(r0, begin, nr, len).transpose());
      Wl.middleRows(r0, nr).noalias() -= coef.transpose() * cols_b.transpose();
    });
    inv.downdate_block(cols_b, llt.matrixLLT());
    for (Index i = begin; i < begin + len; ++i) keep[static_cast<size_t>(i)] = 0;
    ++removed;
    if (run.interrupt && run.interrupt->should_stop()) throw Interrupted();
  }

  RowMatrix<Scalar> weight = RowMatrix<Scalar>::Zero(rows, cols);
  MaskMatrix pruned = MaskMatrix::Ones(rows, cols);
  compact(keep);
  n = static_cast<Index>(active.size());
  for (Index j = 0; j < n; ++j) {
    for (Index r = 0; r < num_shared; ++r) {
      weight(shared_rows[r], active[j]) = static_cast<Scalar>(Wl(r, j));
      pruned(shared_rows[r], active[j]) = 0;
    }
  }
  for (Index i = 0; i < num_own; ++i) {
    own_states[static_cast<size_t>(i)].finish();
    const Index r = own_rows[static_cast<size_t>(i)];
    weight.row(r) = own_out.row(i).template cast<Scalar>();
    for (Index j = 0; j < n; ++j) pruned(r, active[j]) = W(r, active[j]) == Scalar(0) ? 1 : 0;
  }
  return internal::finish_result<Scalar>(W, H, prep, std::move(weight), std::move(pruned), run);
}

template PruneResult<float> prune_structured<float>(const Eigen::Ref<const RowMatrix<float>>&,
                                                    const HessianRef&,
                                                    double, Index, const HessianOptions&,
                                                    const RunOptions&);
template PruneResult<double> prune_structured<double>(const Eigen::Ref<const RowMatrix<double>>&,
                                                      const HessianRef&,
                                                      double, Index, const HessianOptions&,
                                                      const RunOptions&);

}  // namespace obc

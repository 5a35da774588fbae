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
// that almost nothing of a step is serial (single_column_steps); groups and rows with zeros of
// their own split the weight update by row chunks (norms per fixed chunk, summed in chunk order).
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
#include <functional>
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

template <class S>
void structured_rows(const internal::StructuredJob<S>& job, const RunOptions& run) {
  using MatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using VectorXd = Eigen::Matrix<double, Eigen::Dynamic, 1>;
  using RowMatrixS = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MatrixS = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  const Index rows = job.rows, cols = job.h.cols, group = job.group;
  const Index num_groups = cols / group;
  const Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> W(
      job.W, rows, cols);
  const char* dead = job.h.dead;
  OBC_CHECK(job.h.hinv != nullptr, "structured pruning needs the float64 inverse");

  // Columns pruned from the start: dead inputs and columns that are zero in every row.
  std::vector<char> gone(static_cast<size_t>(cols), 1);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      if (W(r, c) != S(0)) gone[c] = dead[c];
  Index removed = 0;
  for (Index g = 0; g < num_groups; ++g) {
    bool all = true;
    for (Index c = g * group; c < (g + 1) * group; ++c) all = all && gone[c];
    removed += all ? 1 : 0;
  }

  std::vector<Index> own_rows, shared_rows;
  for (Index r = 0; r < rows; ++r) {
    bool own = false;
    for (Index c = 0; c < cols && !own; ++c) own = !gone[c] && W(r, c) == S(0);
    (own ? own_rows : shared_rows).push_back(r);
  }
  Index live = 0;
  for (Index c = 0; c < cols; ++c) live += dead[c] ? 0 : 1;
  const double own_bytes = static_cast<double>(own_rows.size()) * live * live * 8.0;
  OBC_CHECK(own_bytes <= 8.0 * (1 << 30), "W: ", own_rows.size(),
            " rows have zeros of their own; exact structured pruning then needs a private ",
            "inverse per such row (", own_bytes / (1 << 30), " GiB > 8 GiB). Prune whole ",
            "columns first or pass a dense W");
  const Index num_own = static_cast<Index>(own_rows.size());
  RowMatrixXd own_in(num_own, cols), own_out(num_own, cols);
  std::vector<RowState<double>> own_states(own_rows.size());
  for (Index i = 0; i < num_own; ++i) {
    own_in.row(i) = W.row(own_rows[static_cast<size_t>(i)]).template cast<double>();
    own_states[static_cast<size_t>(i)].load(own_in.row(i).data(), job.h, run.lazy_batch,
                                            own_out.row(i).data());
  }

  std::vector<Index> active;  // original column of each local index
  for (Index c = 0; c < cols; ++c)
    if (!dead[c]) active.push_back(c);
  const Index num_shared = static_cast<Index>(shared_rows.size());
  LazyInverse<double> inv;
  inv.load(job.h.hinv, cols, active,
           lazy_capacity(static_cast<Index>(active.size()), run.lazy_batch));
  // The shared rows' weights over the active columns, num_shared x wl_cols row-major in one
  // buffer that is compacted in place (no allocation per flush). 64-byte aligned: Eigen's
  // vectorized loops over a Map (the group update and scores below) choose where their packets
  // start from the run-time address, so a std::vector's malloc alignment (16 or 32 mod 64,
  // varying from call to call) changed the rounding, and the bits differed between calls.
  PageBuffer<S> wl_store;
  wl_store.ensure(std::max<size_t>(1, static_cast<size_t>(num_shared) * active.size()));
  Index wl_cols = static_cast<Index>(active.size());
  auto wl = [&] { return Eigen::Map<RowMatrixS>(wl_store.data(), num_shared, wl_cols); };
  for (Index r = 0; r < num_shared; ++r) {
    const S* src = job.W + shared_rows[r] * cols;
    S* dst = wl_store.data() + r * wl_cols;
    for (Index j = 0; j < wl_cols; ++j) dst[j] = src[active[j]];
  }
  // Drops the local columns with keep[i] == 0 from the weights and `active` (inv compacts
  // itself). Element (r, kept[j]) moves to (r, j) at the new width m: every destination lies at
  // or before its source and both increase together, so a forward sweep is safe in place.
  auto compact = [&](const std::vector<char>& keep) {
    std::vector<Index> kept;
    for (Index i = 0; i < static_cast<Index>(keep.size()); ++i)
      if (keep[static_cast<size_t>(i)]) kept.push_back(i);
    const Index m = static_cast<Index>(kept.size());
    S* data = wl_store.data();
    for (Index r = 0; r < num_shared; ++r)
      for (Index j = 0; j < m; ++j)
        data[r * m + j] = data[r * wl_cols + kept[static_cast<size_t>(j)]];
    wl_cols = m;
    for (Index j = 0; j < m; ++j) active[static_cast<size_t>(j)] = active[kept[j]];
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
    if (!zero_cols.empty()) {
      if (!inv.eliminate_now(zero_cols)) RowState<double>::lost_definiteness();
      compact(keep);
    }
  }
  Index n = inv.size();

  // Local span [begin, begin + len) of each group among a row state's free inputs (len 0: none).
  auto own_spans = [&](RowState<double>& state, std::vector<Index>& begin,
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

  // Row chunks of the shared weights: the unit of parallel work and of the column-norm sums.
  constexpr Index row_chunk = 32;
  const Index num_chunks = (num_shared + row_chunk - 1) / row_chunk;
  // Column c: the squared column norms of row chunk c (rows are contiguous, so they are summed
  // row by row).
  // (Only the general loop below uses them; single_column_steps() keeps one norm per column.)
  MatrixXd chunk_norms;
  auto update_norms = [&](Index ch) {
    const Index r0 = ch * row_chunk, nr = std::min(row_chunk, num_shared - r0);
    auto norms = chunk_norms.col(ch).head(n);
    norms.setZero();
    double* norm = norms.data();
    for (Index r = r0; r < r0 + nr; ++r) {
      const S* row = wl().row(r).data();
      for (Index j = 0; j < n; ++j)
        norm[j] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    }
  };
  // Small layers: a parallel region per step costs more than the work itself. Resolved (0 =
  // the default count): the flush takes its panel path for any count >= 1, so 0 must not
  // select the other one.
  auto step_threads = [&] {
    return static_cast<double>(num_shared + 1) * static_cast<double>(n) < 2e4
               ? 1
               : resolve_num_threads(run.num_threads);
  };
  // Rows with zeros of their own: a private inverse each, whose per-step work (scores and a
  // rank-`group` downdate) is about n^2 * group; below ~1e6 flops per step in all, a parallel
  // region costs more than it saves (on a busy machine, a scheduler slice per step).
  auto own_threads = [&] {
    return static_cast<double>(num_own) * static_cast<double>(n) * static_cast<double>(n) *
                       static_cast<double>(group) < 1e6
               ? 1
               : resolve_num_threads(run.num_threads);
  };
  // Single columns and no rows with zeros of their own, the common case, run as
  // single_column_steps() below; the general loop handles groups and such rows.
  const bool single_columns = group == 1 && num_own == 0;
  if (!single_columns) {
    chunk_norms.setZero(n, std::max<Index>(num_chunks, 1));
    parallel_for(num_chunks, step_threads(), nullptr, [&](Index ch, int) { update_norms(ch); });
  }

  // Each row's step losses 1/2 w_B^T G_BB^-1 w_B, summed in step order: their total is the row's
  // loss under the damped H (exact OBS), so no O(rows cols^2) pass is needed afterwards.
  std::vector<double> shared_loss(static_cast<size_t>(num_shared), 0.0);
  std::vector<double> own_loss(own_rows.size(), 0.0);
  std::vector<std::vector<Index>> own_begin(own_rows.size()), own_len(own_rows.size());
  std::vector<char> keep(static_cast<size_t>(n), 1);  // 0: removed, dropped at the next flush
  std::vector<std::pair<Index, Index>> spans;         // (local begin, len) of candidate groups
  std::vector<double> scores;
  MatrixXd block, cols_b, own_scores;
  MatrixS cols_s;
  VectorXd col_norms;
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
  auto single_column_steps = [&] {
    VectorXd norms(n), col(n);
    std::vector<S> col_s(static_cast<size_t>(n)), coef(static_cast<size_t>(num_shared));
    std::vector<Index> range_best;
    std::vector<double> range_score;
    auto bound = [&](Index p, Index parts) {
      return p >= parts ? n : std::min(n, (p * n / parts) / 16 * 16);
    };
    auto range_norms = [&](Index c0, Index c1) {
      double* norm = norms.data();
      for (Index j = c0; j < c1; ++j) norm[j] = 0;
      for (Index r = 0; r < num_shared; ++r) {
        const S* row = wl().row(r).data();
        for (Index j = c0; j < c1; ++j)
          norm[j] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
      }
    };
    auto range_update = [&](Index c0, Index c1) {
      double* norm = norms.data() + c0;
      for (Index j = 0; j < c1 - c0; ++j) norm[j] = 0;
      const S* b = col_s.data() + c0;
      const Index len = c1 - c0;
      Index r = 0;
      for (; r + 4 <= num_shared; r += 4)
        update_four_rows(wl().row(r).data() + c0, wl().row(r + 1).data() + c0,
                         wl().row(r + 2).data() + c0, wl().row(r + 3).data() + c0,
                         coef[static_cast<size_t>(r)], coef[static_cast<size_t>(r + 1)],
                         coef[static_cast<size_t>(r + 2)], coef[static_cast<size_t>(r + 3)], b,
                         norm, len);
      for (; r < num_shared; ++r) {
        S* row = wl().row(r).data() + c0;
        const S a = coef[static_cast<size_t>(r)];
        for (Index j = 0; j < len; ++j) {
          const S v = row[j] - a * b[j];
          row[j] = v;
          norm[j] += static_cast<double>(v) * static_cast<double>(v);
        }
      }
    };
    auto range_argmin = [&](Index part, Index c0, Index c1) {
      const double* diag = inv.diag().data();
      Index best = -1;
      double best_score = 0;
      for (Index j = c0; j < c1; ++j) {
        if (!keep[static_cast<size_t>(j)]) continue;
        if (!(diag[j] > 0)) RowState<double>::lost_definiteness();
        const double score = norms[j] / diag[j];
        if (best < 0 || score < best_score) {
          best = j;
          best_score = score;
        }
      }
      range_best[static_cast<size_t>(part)] = best;
      range_score[static_cast<size_t>(part)] = best_score;
    };
    auto combine = [&] {
      Index best = -1;
      double best_score = 0;
      for (size_t p = 0; p < range_best.size(); ++p)
        if (range_best[p] >= 0 && (best < 0 || range_score[p] < best_score)) {
          best = range_best[p];
          best_score = range_score[p];
        }
      return best;
    };
    auto run_ranges = [&](const std::function<void(Index part, Index c0, Index c1)>& fn) {
      const Index parts = step_threads();
      range_best.assign(static_cast<size_t>(parts), -1);
      range_score.assign(static_cast<size_t>(parts), 0.0);
      parallel_for_static(parts, static_cast<int>(parts), nullptr, [&](Index p, int) {
        fn(p, bound(p, parts), bound(p + 1, parts));
      });
    };

    run_ranges([&](Index part, Index c0, Index c1) {
      range_norms(c0, c1);
      range_argmin(part, c0, c1);
    });
    Index q = combine();
    while (removed < job.target && q >= 0) {
      if (inv.room() < 1) {
        inv.flush(keep, step_threads());
        Index q_kept = 0, m = 0;
        for (Index i = 0; i < n; ++i) {
          if (!keep[static_cast<size_t>(i)]) continue;
          if (i < q) ++q_kept;
          norms[m++] = norms[i];
        }
        compact(keep);
        n = inv.size();
        keep.assign(static_cast<size_t>(n), 1);
        q = q_kept;
      }
      const double pivot = inv.entry(q);
      if (!(pivot > 0) || !std::isfinite(pivot)) RowState<double>::lost_definiteness();
      const double scale = 1.0 / std::sqrt(pivot);
      for (Index r = 0; r < num_shared; ++r) {
        const double w_q = static_cast<double>(wl()(r, q));
        shared_loss[static_cast<size_t>(r)] += 0.5 * w_q * w_q / pivot;
        coef[static_cast<size_t>(r)] = static_cast<S>(w_q / pivot);
      }
      keep[static_cast<size_t>(q)] = 0;
      run_ranges([&](Index part, Index c0, Index c1) {
        inv.column_range(q, c0, c1, col.data());
        inv.downdate_range(col.data(), scale, c0, c1);
        for (Index j = c0; j < c1; ++j) col_s[static_cast<size_t>(j)] = static_cast<S>(col[j]);
        range_update(c0, c1);
        range_argmin(part, c0, c1);
      });
      inv.commit_downdate();
      q = combine();
      ++removed;
      if (run.interrupt && run.interrupt->should_stop()) throw Interrupted();
    }
  };

  if (single_columns) single_column_steps();
  while (!single_columns && removed < job.target) {
    if (inv.room() < group) {
      inv.flush(keep, step_threads());
      std::vector<Index> kept;
      for (Index i = 0; i < n; ++i)
        if (keep[static_cast<size_t>(i)]) kept.push_back(i);
      for (Index j = 0; j < static_cast<Index>(kept.size()); ++j)
        chunk_norms.row(j) = chunk_norms.row(kept[static_cast<size_t>(j)]);
      compact(keep);
      n = inv.size();
      keep.assign(static_cast<size_t>(n), 1);
      inv.reserve(group);
    }
    // Candidate groups: the still-active columns of each group, contiguous in local order.
    spans.clear();
    for (Index i = 0; i < n && group == 1; ++i)
      if (keep[static_cast<size_t>(i)]) spans.emplace_back(i, 1);
    for (Index i = 0; i < n && group > 1;) {
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
    col_norms = chunk_norms.col(0).head(n);  // summed in a fixed order: chunk 0, 1, ...
    for (Index ch = 1; ch < num_chunks; ++ch) col_norms += chunk_norms.col(ch).head(n);
    const VectorXd& diag = inv.diag();
    scores.assign(spans.size(), 0.0);
    auto score_span = [&](Index s) {
      const auto [begin, len] = spans[static_cast<size_t>(s)];
      if (len == 1) {  // w^T (G_jj)^-1 w summed over rows, without a factorization
        if (!(diag[begin] > 0)) RowState<double>::lost_definiteness();
        scores[static_cast<size_t>(s)] = col_norms[begin] / diag[begin];
        return;
      }
      MatrixXd gbb;
      inv.diagonal_block(begin, len, gbb);
      Eigen::LLT<MatrixXd> llt(gbb);
      if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
      MatrixXd wt = wl().middleCols(begin, len).transpose().template cast<double>();  // len x rows
      llt.matrixL().solveInPlace(wt);
      scores[static_cast<size_t>(s)] = wt.squaredNorm();
    };
    if (group == 1) {
      for (Index s = 0; s < num_spans; ++s) score_span(s);
    } else {
      parallel_for(num_spans, step_threads(), run.interrupt, [&](Index s, int) { score_span(s); });
    }
    // Exact per-row scores of rows with their own zeros, summed in row order (deterministic).
    if (num_own > 0) {
      own_scores.setZero(num_own, num_spans);
      parallel_for(num_own, own_threads(), run.interrupt, [&](Index i, int) {
        RowState<double>& state = own_states[static_cast<size_t>(i)];
        state.ensure_room(group);
        own_spans(state, own_begin[i], own_len[i]);
        for (Index s = 0; s < num_spans; ++s) {
          const size_t g = static_cast<size_t>(active[spans[s].first] / group);
          if (own_len[i][g] == 0) continue;
          if (!state.factor_block(own_begin[i][g], own_len[i][g]))
            RowState<double>::lost_definiteness();
          own_scores(i, s) = state.block_score(own_begin[i][g], own_len[i][g]);
        }
      });
      for (Index i = 0; i < num_own; ++i)
        for (Index s = 0; s < num_spans; ++s) scores[static_cast<size_t>(s)] += own_scores(i, s);
    }
    size_t best = 0;
    for (size_t s = 1; s < spans.size(); ++s)
      if (scores[s] < scores[best]) best = s;
    const auto [begin, len] = spans[best];
    const size_t best_group = static_cast<size_t>(active[begin] / group);
    if (num_own > 0) {
      parallel_for(num_own, own_threads(), nullptr, [&](Index i, int) {
        const Index b = own_begin[i][best_group], l = own_len[i][best_group];
        if (l == 0) return;
        RowState<double>& state = own_states[static_cast<size_t>(i)];
        state.factor_block(b, l);
        own_loss[static_cast<size_t>(i)] += state.prune_block(b, l);
      });
    }
    // W <- W - W_B G_BB^-1 G[B,:] for every shared row (norms for the next step in the same
    // pass), then the shared inverse downdate.
    inv.columns(begin, len, cols_b);  // n x len: G[:, B]
    block = cols_b.middleRows(begin, len);
    Eigen::LLT<MatrixXd> llt(block);
    if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
    for (Index i = begin; i < begin + len; ++i) keep[static_cast<size_t>(i)] = 0;
    cols_s = cols_b.template cast<S>();
    parallel_for(num_chunks, step_threads(), nullptr, [&](Index ch, int) {
      const Index r0 = ch * row_chunk, nr = std::min(row_chunk, num_shared - r0);
      auto rows_ch = wl().middleRows(r0, nr);
      double* step_loss = shared_loss.data() + r0;
      if (len == 1) {
        auto norms = chunk_norms.col(ch).head(n);
        norms.setZero();
        // Plain loops the compiler vectorizes (Eigen's float -> double cast does not): update,
        // widening and squares in one pass, four rows at a time so that the float64 norms are
        // read and written once per four rows. Chunks hold a multiple of four rows, so the
        // summation order is fixed by the row index alone.
        const S* b = cols_s.data();
        double* norm = norms.data();
        const double pivot = block(0, 0);
        auto coef_of = [&](Index r) {
          const double w_q = static_cast<double>(rows_ch(r, begin));
          step_loss[r] += 0.5 * w_q * w_q / pivot;
          return static_cast<S>(w_q / pivot);
        };
        Index r = 0;
        for (; r + 4 <= nr; r += 4) {
          const S a0 = coef_of(r), a1 = coef_of(r + 1), a2 = coef_of(r + 2), a3 = coef_of(r + 3);
          update_four_rows(rows_ch.row(r).data(), rows_ch.row(r + 1).data(),
                           rows_ch.row(r + 2).data(), rows_ch.row(r + 3).data(), a0, a1, a2, a3,
                           b, norm, n);
        }
        for (; r < nr; ++r) {
          S* row = rows_ch.row(r).data();
          const S a = coef_of(r);
          for (Index j = 0; j < n; ++j) {
            const S v = row[j] - a * b[j];
            row[j] = v;
            norm[j] += static_cast<double>(v) * static_cast<double>(v);
          }
        }
      } else {
        const MatrixXd w_b = rows_ch.middleCols(begin, len).transpose().template cast<double>();
        const MatrixXd coef = llt.solve(w_b);  // len x nr: G_BB^-1 w_B per row
        for (Index r = 0; r < nr; ++r) step_loss[r] += 0.5 * w_b.col(r).dot(coef.col(r));
        rows_ch.noalias() -= coef.transpose().template cast<S>() * cols_s.transpose();
        update_norms(ch);
      }
    });
    inv.downdate_block(cols_b, llt.matrixLLT());
    ++removed;
    if (run.interrupt && run.interrupt->should_stop()) throw Interrupted();
  }

  // Outputs: kept columns of shared rows from the weights, own rows from their states; all else zero.
  std::vector<Index> kept_cols;
  for (Index i = 0; i < n; ++i)
    if (keep[static_cast<size_t>(i)]) kept_cols.push_back(i);
  std::fill(job.out, job.out + rows * cols, S(0));
  std::fill(job.pruned, job.pruned + rows * cols, std::uint8_t(1));
  for (Index r = 0; r < num_shared; ++r) {
    S* out = job.out + shared_rows[r] * cols;
    std::uint8_t* pruned = job.pruned + shared_rows[r] * cols;
    for (Index j : kept_cols) {
      out[active[j]] = wl()(r, j);
      pruned[active[j]] = 0;
    }
  }
  for (Index r = 0; r < num_shared; ++r)
    job.step_losses[shared_rows[r]] = shared_loss[static_cast<size_t>(r)];
  for (Index i = 0; i < num_own; ++i) {
    job.step_losses[own_rows[static_cast<size_t>(i)]] = own_loss[static_cast<size_t>(i)];
    own_states[static_cast<size_t>(i)].finish();
    const Index r = own_rows[static_cast<size_t>(i)];
    S* out = job.out + r * cols;
    std::uint8_t* pruned = job.pruned + r * cols;
    for (Index c = 0; c < cols; ++c) out[c] = static_cast<S>(own_out(i, c));
    for (Index j : kept_cols) pruned[active[j]] = W(r, active[j]) == S(0) ? 1 : 0;
  }
}

}  // namespace obc::OBC_KERNEL_NS

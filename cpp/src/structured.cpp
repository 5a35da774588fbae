// Structured ExactOBS pruning: whole groups of input columns removed from all rows at once.
#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "internal/row_state.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"
#include "obc/prune.hpp"

namespace obc {

template <class Scalar>
PruneResult<Scalar> prune_structured(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                     const Eigen::Ref<const Eigen::MatrixXd>& H, double sparsity,
                                     Index group, const HessianOptions& hopt,
                                     const RunOptions& run) {
  OBC_CHECK(std::isfinite(sparsity) && sparsity >= 0 && sparsity <= 1,
            "sparsity: expected a value in [0, 1], got ", sparsity);
  OBC_CHECK(W.rows() > 0 && W.cols() > 0, "W: expected a non-empty rows x cols matrix, got ",
            W.rows(), "x", W.cols());
  OBC_CHECK(group >= 1 && W.cols() % group == 0, "group: expected a positive divisor of cols (",
            W.cols(), "), got ", group);
  const PreparedHessian prep = prepare_hessian(H, hopt);
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

  // The shared problem in float64: it is solved once for all rows, so precision is cheap.
  std::vector<Index> active;  // original column of each local index
  for (Index c = 0; c < cols; ++c)
    if (!prep.dead[static_cast<size_t>(c)]) active.push_back(c);
  Index n = static_cast<Index>(active.size());
  Eigen::MatrixXd G(n, n);
  RowMatrixXd Wl(rows, n);
  for (Index j = 0; j < n; ++j) {
    for (Index i = 0; i < n; ++i) G(i, j) = prep.hinv(active[i], active[j]);
    Wl.col(j) = W.col(active[j]).template cast<double>();
  }

  // Drops the local set `drop` after G has been downdated: compacts G, Wl and `active`.
  auto compact = [&](const std::vector<char>& drop) {
    std::vector<Index> keep;
    for (Index i = 0; i < n; ++i)
      if (!drop[static_cast<size_t>(i)]) keep.push_back(i);
    const Index m = static_cast<Index>(keep.size());
    Eigen::MatrixXd Gk(m, m);
    RowMatrixXd Wk(rows, m);
    std::vector<Index> active_k(static_cast<size_t>(m));
    for (Index j = 0; j < m; ++j) {
      for (Index i = 0; i < m; ++i) Gk(i, j) = G(keep[i], keep[j]);
      Wk.col(j) = Wl.col(keep[j]);
      active_k[static_cast<size_t>(j)] = active[static_cast<size_t>(keep[j])];
    }
    G.swap(Gk);
    Wl.swap(Wk);
    active.swap(active_k);
    n = m;
  };
  // G <- G - G[:,B] G_BB^-1 G[B,:] for the local index set B.
  auto downdate = [&](const std::vector<Index>& B) -> Eigen::MatrixXd {
    const Index len = static_cast<Index>(B.size());
    Eigen::MatrixXd cols_b(n, len), gbb(len, len);
    for (Index c = 0; c < len; ++c) cols_b.col(c) = G.col(B[c]);
    for (Index c = 0; c < len; ++c) gbb.row(c) = cols_b.row(B[c]);
    Eigen::LLT<Eigen::MatrixXd> llt(gbb);
    if (llt.info() != Eigen::Success) internal::RowState<double>::lost_definiteness();
    Eigen::MatrixXd v = cols_b;
    llt.matrixL().transpose().solveInPlace<Eigen::OnTheRight>(v);
    G.selfadjointView<Eigen::Lower>().rankUpdate(v, -1.0);
    G.triangularView<Eigen::StrictlyUpper>() = G.transpose();
    return cols_b;
  };

  {  // live columns that are zero in every row: eliminated first (weights need no update)
    std::vector<Index> zero_cols;
    std::vector<char> drop(static_cast<size_t>(n), 0);
    for (Index i = 0; i < n; ++i)
      if (gone[active[i]]) {
        zero_cols.push_back(i);
        drop[i] = 1;
      }
    if (!zero_cols.empty()) {
      downdate(zero_cols);
      compact(drop);
    }
  }

  constexpr Index row_chunk = 64;
  while (removed < target) {
    // Candidate groups: the still-active columns of each group, contiguous in local order.
    std::vector<std::pair<Index, Index>> spans;  // (local begin, len)
    for (Index i = 0; i < n;) {
      const Index g = active[i] / group;
      Index len = 1;
      while (i + len < n && active[i + len] / group == g) ++len;
      spans.emplace_back(i, len);
      i += len;
    }
    if (spans.empty()) break;
    std::vector<double> scores(spans.size());
    parallel_for(static_cast<Index>(spans.size()), run.num_threads, run.interrupt,
                 [&](Index s, int) {
                   const auto [begin, len] = spans[static_cast<size_t>(s)];
                   Eigen::LLT<Eigen::MatrixXd> llt(G.block(begin, begin, len, len));
                   if (llt.info() != Eigen::Success)
                     internal::RowState<double>::lost_definiteness();
                   Eigen::MatrixXd wt = Wl.middleCols(begin, len).transpose();  // len x rows
                   llt.matrixL().solveInPlace(wt);
                   scores[static_cast<size_t>(s)] = wt.squaredNorm();
                 });
    size_t best = 0;
    for (size_t s = 1; s < spans.size(); ++s)
      if (scores[s] < scores[best]) best = s;
    const auto [begin, len] = spans[best];
    std::vector<Index> B(static_cast<size_t>(len));
    for (Index c = 0; c < len; ++c) B[c] = begin + c;
    // W <- W - W_B G_BB^-1 G[B,:] for every row, then the shared inverse downdate.
    const Eigen::MatrixXd gbb = G.block(begin, begin, len, len);
    const Eigen::MatrixXd g_rows = G.middleRows(begin, len);  // len x n
    Eigen::LLT<Eigen::MatrixXd> llt(gbb);
    const Index chunks = (rows + row_chunk - 1) / row_chunk;
    parallel_for(chunks, run.num_threads, nullptr, [&](Index ch, int) {
      const Index r0 = ch * row_chunk, nr = std::min(row_chunk, rows - r0);
      const Eigen::MatrixXd coef = llt.solve(Wl.block(r0, begin, nr, len).transpose());  // len x nr
      Wl.middleRows(r0, nr).noalias() -= coef.transpose() * g_rows;
    });
    downdate(B);
    std::vector<char> drop(static_cast<size_t>(n), 0);
    for (Index i : B) drop[i] = 1;
    compact(drop);
    ++removed;
    if (run.interrupt && run.interrupt->should_stop()) throw Interrupted();
  }

  RowMatrix<Scalar> weight = RowMatrix<Scalar>::Zero(rows, cols);
  MaskMatrix pruned = MaskMatrix::Ones(rows, cols);
  for (Index j = 0; j < n; ++j) {
    weight.col(active[j]) = Wl.col(j).template cast<Scalar>();
    pruned.col(active[j]).setZero();
  }
  // Rows with zeros of their own (not whole removed columns) need those zeros kept: re-solve
  // them exactly for their own mask; the shared inverse cannot express per-row constraints.
  bool partial = false;
  for (Index r = 0; r < rows && !partial; ++r)
    for (Index j = 0; j < n && !partial; ++j) partial = W(r, active[j]) == Scalar(0);
  if (partial) {
    MaskMatrix mask = pruned;
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c)
        if (W(r, c) == Scalar(0)) mask(r, c) = 1;
    return solve_masked<Scalar>(W, H, prep, mask, run);
  }
  PruneResult<Scalar> result;
  result.weight = std::move(weight);
  result.pruned = std::move(pruned);
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads);
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

template PruneResult<float> prune_structured<float>(const Eigen::Ref<const RowMatrix<float>>&,
                                                    const Eigen::Ref<const Eigen::MatrixXd>&,
                                                    double, Index, const HessianOptions&,
                                                    const RunOptions&);
template PruneResult<double> prune_structured<double>(const Eigen::Ref<const RowMatrix<double>>&,
                                                      const Eigen::Ref<const Eigen::MatrixXd>&,
                                                      double, Index, const HessianOptions&,
                                                      const RunOptions&);

}  // namespace obc

// Per-row choice between quantizers (OBQ, GPTQ, RTN) on shared grids, after refinement.
#include "obc/quant_select.hpp"

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "internal/quant_entry.hpp"
#include "internal/quant_refit.hpp"
#include "obc/errors.hpp"

namespace obc {

namespace {

void check_select_options(const QuantSelectOptions& sopt) {
  OBC_CHECK(!sopt.methods.empty(), "methods: expected at least one quantizer, got none");
  for (size_t i = 0; i < sopt.methods.size(); ++i) {
    const auto m = static_cast<int>(sopt.methods[i]);
    OBC_CHECK(m >= 0 && m <= static_cast<int>(QuantMethod::Rtn),
              "methods: expected obq, gptq, gptq-natural or rtn, got code ", m);
    for (size_t j = 0; j < i; ++j)
      OBC_CHECK(sopt.methods[j] != sopt.methods[i], "methods: '",
                quant_method_name(sopt.methods[i]), "' is listed twice");
  }
  internal::check_refine_options(sopt.refine);
  OBC_CHECK(sopt.refit_rounds >= 0, "refit_rounds: expected >= 0, got ", sopt.refit_rounds);
  internal::check_gptq_options(GptqOptions{true, sopt.gptq_block_size});
}

// Scale refit rounds (QuantSelectOptions::refit_rounds) on one candidate's `weight` (on `grid`,
// with `losses` its row losses): a row takes a round's scales and codes only where its loss
// drops. Returns the largest refinement pass count of the rounds.
template <class Scalar>
int refit_rounds(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
                 const Eigen::MatrixXd& hd, double damp_absolute, const MaskMatrix& pruned,
                 const QuantSelectOptions& sopt, const RunOptions& run, QuantGrid<Scalar>& grid,
                 RowMatrix<Scalar>& weight, Eigen::VectorXd& losses) {
  const Index rows = W.rows();
  int passes = 0;
  for (int round = 0; round < sopt.refit_rounds; ++round) {
    QuantGrid<Scalar> g = grid;
    RowMatrix<Scalar> w = weight;
    if (internal::refit_scales_into<Scalar>(W, hd, pruned, run, g, w) == 0) break;
    if (sopt.refine.max_passes > 0)
      passes = std::max(passes, internal::refine_into<Scalar>(W, hd, damp_absolute, g, pruned,
                                                              sopt.refine, run, w));
    check_finite_result(w, "weights");
    const Eigen::VectorXd l = row_losses<Scalar>(W, w, H, run.num_threads, run.interrupt);
    Index improved = 0;
    for (Index r = 0; r < rows; ++r) {
      // Same weights, same loss: a GPTQ row's loss from the sweep may differ from the measured
      // l[r] in the last bits, which must not pass for a gain.
      if (!(l[r] < losses[r]) || w.row(r) == weight.row(r)) continue;
      weight.row(r) = w.row(r);
      grid.scale.row(r) = g.scale.row(r);
      losses[r] = l[r];
      ++improved;
    }
    if (improved == 0) break;
  }
  return passes;
}

// The candidates on `grid` (fitted on the original W), with the kernels of precision Scalar.
template <class Scalar>
QuantResult<Scalar> select_on_grid(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                   const HessianRef& H, QuantGrid<Scalar>&& grid,
                                   const QuantOptions& opt, const QuantSelectOptions& sopt,
                                   const HessianOptions& hopt, const RunOptions& run) {
  const auto& methods = sopt.methods;
  const bool any_gptq = std::any_of(methods.begin(), methods.end(), [](QuantMethod m) {
    return m == QuantMethod::Gptq || m == QuantMethod::GptqNatural;
  });
  const bool any_obq = std::find(methods.begin(), methods.end(), QuantMethod::Obq) != methods.end();
  HessianOptions prep_options = hopt;
  prep_options.invert = any_obq;  // GPTQ factors the permuted H itself (gptq_into)
  PreparedHessian prep = prepare_hessian(H, prep_options, run.num_threads, run.interrupt);
  // W was checked by quantize_select (the float64 redo converts a checked W): only the shape
  // here, not a second serial pass over W's values.
  OBC_CHECK(prep.cols() == W.cols(), "internal: select_on_grid: shapes differ");
  internal::check_layer_scale<Scalar>(W, prep, run.num_threads);
  const Index rows = W.rows(), cols = W.cols();

  QuantResult<Scalar> best;
  best.grid = std::move(grid);  // shared by every candidate
  best.pruned = internal::pruned_mask<Scalar>(W, prep.dead, run.num_threads);
  best.damp = prep.damp;
  best.damp_absolute = prep.damp_absolute;
  const bool refine = sopt.refine.max_passes > 0;
  Eigen::MatrixXd hd;
  if (refine || sopt.refit_rounds > 0)
    hd = internal::refine_hessian(H, prep, sopt.refine.damped);

  Eigen::VectorXd hdiag;
  if (any_gptq) hdiag = internal::hessian_diagonal(H);

  std::vector<RowMatrix<Scalar>> weights(methods.size());
  // Each candidate's grid: the shared one, until its own scale refit changes it.
  std::vector<QuantGrid<Scalar>> grids(methods.size(), best.grid);
  std::vector<Eigen::VectorXd> unrefined(methods.size()), losses(methods.size());
  for (size_t i = 0; i < methods.size(); ++i) {
    RowMatrix<Scalar>& out = weights[i];
    Eigen::VectorXd step_losses;  // GPTQ's: its losses come from the sweep (gptq_row_losses)
    switch (methods[i]) {
      case QuantMethod::Obq:
        internal::obq_into<Scalar>(W, prep, best.grid, opt, run, out);
        break;
      case QuantMethod::Gptq:
      case QuantMethod::GptqNatural:
        internal::gptq_into<Scalar>(W, H, prep, hdiag, best.grid,
                                    GptqOptions{methods[i] == QuantMethod::Gptq,
                                                sopt.gptq_block_size},
                                    run, out, &step_losses);
        break;
      case QuantMethod::Rtn:
        out.resize(rows, cols);
        for (Index r = 0; r < rows; ++r)
          for (Index c = 0; c < cols; ++c)
            out(r, c) = best.pruned(r, c) ? Scalar(0)
                                          : internal::grid_at(best.grid, r, c).quantize(W(r, c));
        break;
    }
    internal::check_finite_weights(out, run.num_threads);
    const bool from_steps = step_losses.size() == rows;
    unrefined[i] = from_steps
                       ? internal::gptq_row_losses<Scalar>(W, out, H, prep,
                                                           std::move(step_losses), run)
                       : row_losses<Scalar>(W, out, H, run.num_threads, run.interrupt);
    if (refine) {
      // GPTQ's unrefined losses come from its sweep, not from row_losses: a row that refinement
      // leaves as it was keeps that value, so that its loss never reads as raised by rounding.
      RowMatrix<Scalar> unchanged;
      if (from_steps) unchanged = out;
      best.refine_passes = std::max(
          best.refine_passes,
          internal::refine_into<Scalar>(W, hd, prep.damp_absolute, best.grid, best.pruned,
                                        sopt.refine, run, out));
      check_finite_result(out, "weights");
      losses[i] = row_losses<Scalar>(W, out, H, run.num_threads, run.interrupt);
      if (from_steps)
        for (Index r = 0; r < rows; ++r)
          if (out.row(r) == unchanged.row(r)) losses[i][r] = unrefined[i][r];
    } else {
      losses[i] = unrefined[i];
    }
    if (sopt.refit_rounds > 0)
      best.refine_passes = std::max(
          best.refine_passes, refit_rounds<Scalar>(W, H, hd, prep.damp_absolute, best.pruned,
                                                   sopt, run, grids[i], out, losses[i]));
  }

  // Per row, the lowest loss; ties to the candidate listed first.
  std::vector<size_t> winner(static_cast<size_t>(rows), 0);
  for (Index r = 0; r < rows; ++r)
    for (size_t i = 1; i < methods.size(); ++i)
      if (losses[i][r] < losses[winner[static_cast<size_t>(r)]][r])
        winner[static_cast<size_t>(r)] = i;
  if (methods.size() == 1) {
    best.weight = std::move(weights[0]);
    best.grid = std::move(grids[0]);
  } else {
    best.weight.resize(rows, cols);
    for (Index r = 0; r < rows; ++r) {
      const size_t i = winner[static_cast<size_t>(r)];
      best.weight.row(r) = weights[i].row(r);
      best.grid.scale.row(r) = grids[i].scale.row(r);
    }
  }
  best.row_losses.resize(rows);
  best.row_losses_unrefined.resize(rows);
  best.row_method.resize(rows);
  for (Index r = 0; r < rows; ++r) {
    const size_t i = winner[static_cast<size_t>(r)];
    best.row_losses[r] = losses[i][r];
    best.row_losses_unrefined[r] = unrefined[i][r];
    best.row_method[r] = static_cast<std::uint8_t>(methods[i]);
  }
  internal::fill_codes(best, run.num_threads);
  return best;
}

}  // namespace

template <class Scalar>
QuantResult<Scalar> quantize_select(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                    const HessianRef& H, const QuantOptions& opt,
                                    const QuantSelectOptions& sopt, const HessianOptions& hopt,
                                    const RunOptions& run) {
  // One grid fitted on the original W, shared by every candidate; a float32 failure (OBQ's
  // elimination, GPTQ's factor) redoes every candidate in float64.
  return internal::quantize_entry<Scalar>(
      W, H, opt, run, [&] { check_select_options(sopt); },
      [&](const auto& w, auto&& grid) {
        using S = typename std::decay_t<decltype(w)>::Scalar;
        return select_on_grid<S>(w, H, std::move(grid), opt, sopt, hopt, run);
      });
}

std::vector<QuantMethod> auto_quant_methods(Index cols) {
  OBC_CHECK(cols >= 0, "cols: expected >= 0, got ", cols);
  if (cols <= kAutoObqMaxCols) return {QuantMethod::Obq, QuantMethod::Gptq};
  return {QuantMethod::Gptq};
}

#define OBC_INSTANTIATE(S)                                                                         \
  template QuantResult<S> quantize_select<S>(const Eigen::Ref<const RowMatrix<S>>&,                \
                                             const HessianRef&, const QuantOptions&,               \
                                             const QuantSelectOptions&, const HessianOptions&,     \
                                             const RunOptions&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc

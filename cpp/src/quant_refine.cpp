// Refinement of quantized rows: exact coordinate descent over the integer codes.
#include "obc/quant_refine.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/quant_common.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace {

// Rows whose gradients start with one (chunk x cols) by (cols x cols) product. Fixed, so the
// floats do not depend on the thread count.
constexpr Index kRowChunk = 64;

using MatrixD = Eigen::MatrixXd;
using RowMatrixD = RowMatrix<double>;

}  // namespace

namespace internal {

void check_refine_options(const RefineOptions& opt) {
  OBC_CHECK(opt.max_passes >= 0, "refine_passes: expected >= 0, got ", opt.max_passes);
  OBC_CHECK(std::isfinite(opt.rel_tol) && opt.rel_tol >= 0, "refine_tol: expected >= 0, got ",
            opt.rel_tol);
}

Eigen::MatrixXd refine_hessian(const HessianRef& H, const PreparedHessian& prep, bool damped) {
  const Index cols = prep.cols();
  MatrixD hd = H.visit([](const auto& h) -> MatrixD {
    return 0.5 * (h.template cast<double>() + h.transpose().template cast<double>());
  });
  for (Index c = 0; c < cols; ++c)
    if (prep.dead[static_cast<size_t>(c)])
      hd(c, c) = 1.0;
    else if (damped)
      hd(c, c) += prep.damp_absolute;
  return hd;
}

template <class Scalar>
int refine_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const Eigen::MatrixXd& hd,
                const QuantGrid<Scalar>& grid, const MaskMatrix& pruned, const RefineOptions& ropt,
                const RunOptions& run, RowMatrix<Scalar>& weight) {
  const Index rows = W.rows(), cols = W.cols();
  if (ropt.max_passes == 0) return 0;
  const int maxq = (1 << grid.bits) - 1;
  const Index chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<int> passes_of_chunk(static_cast<size_t>(chunks), 0);
  parallel_for(chunks, run.num_threads, run.interrupt, [&](Index chunk, int) {
    const Index r0 = chunk * kRowChunk, len = std::min(kRowChunk, rows - r0);
    // residual e = q - w over the free (not pruned) inputs, 0 elsewhere, and g = e H.
    RowMatrixD e(len, cols);
    for (Index i = 0; i < len; ++i)
      for (Index c = 0; c < cols; ++c)
        e(i, c) = pruned(r0 + i, c) ? 0.0
                                    : static_cast<double>(weight(r0 + i, c)) -
                                          static_cast<double>(W(r0 + i, c));
    RowMatrixD g(len, cols);
    g.noalias() = e * hd;  // hd symmetric
    int chunk_passes = 0;
    for (Index i = 0; i < len; ++i) {
      const Index r = r0 + i;
      auto e_row = e.row(i);
      auto g_row = g.row(i);
      double objective = 0.5 * e_row.dot(g_row);
      int pass = 0;
      while (pass < ropt.max_passes) {
        ++pass;
        const double start = objective;
        for (Index c = 0; c < cols; ++c) {
          if (pruned(r, c)) continue;
          const GridPoint<Scalar> gp = grid_at(grid, r, c);
          const int code = gp.code(weight(r, c));
          const double current = static_cast<double>(weight(r, c));
          const double hcc = hd(c, c);
          // Minimizer of the 1-D quadratic in the value, then in code units.
          const double ideal = static_cast<double>(code) -
                               g_row[c] / (hcc * static_cast<double>(gp.scale));
          if (!std::isfinite(ideal)) continue;
          const double clamped = std::clamp(ideal, 0.0, static_cast<double>(maxq));
          const int lo = static_cast<int>(std::floor(clamped));
          const int hi = std::min(lo + 1, maxq);
          int best_code = code;
          double best_change = 0.0, best_delta = 0.0;
          for (const int candidate : {lo, hi}) {
            if (candidate == code) continue;
            const double delta = static_cast<double>(gp.value(candidate)) - current;
            const double change = delta * g_row[c] + 0.5 * delta * delta * hcc;
            if (change < best_change) {
              best_change = change;
              best_code = candidate;
              best_delta = delta;
            }
          }
          if (best_code == code) continue;
          weight(r, c) = gp.value(best_code);
          e_row[c] += best_delta;
          g_row.noalias() += best_delta * hd.col(c).transpose();
          objective += best_change;
        }
        if (!(start - objective > ropt.rel_tol * start)) break;
      }
      chunk_passes = std::max(chunk_passes, pass);
    }
    passes_of_chunk[static_cast<size_t>(chunk)] = chunk_passes;
  });
  return *std::max_element(passes_of_chunk.begin(), passes_of_chunk.end());
}

}  // namespace internal

template <class Scalar>
void refine_quantized(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
                      QuantResult<Scalar>& result, const RefineOptions& ropt,
                      const HessianOptions& hopt, const RunOptions& run) {
  internal::check_refine_options(ropt);
  HessianOptions no_inverse = hopt;
  no_inverse.invert = false;
  const PreparedHessian prep = prepare_hessian(H, no_inverse, run.num_threads);
  internal::check_quant_inputs<Scalar>(W, prep.cols());
  const Index rows = W.rows(), cols = W.cols();
  const QuantGrid<Scalar>& grid = result.grid;
  OBC_CHECK(result.weight.rows() == rows && result.weight.cols() == cols,
            "result.weight: expected ", rows, "x", cols, ", got ", result.weight.rows(), "x",
            result.weight.cols());
  OBC_CHECK(grid.bits >= 2 && grid.bits <= 8 && grid.group_size >= 1 &&
                cols % grid.group_size == 0 && grid.scale.rows() == rows &&
                grid.scale.cols() == cols / grid.group_size &&
                grid.zero.rows() == rows && grid.zero.cols() == grid.scale.cols(),
            "result.grid: expected a grid of W's shape");
  const MaskMatrix pruned = internal::pruned_mask<Scalar>(W, prep.dead);
  const Eigen::VectorXd before = row_losses<Scalar>(W, result.weight, H, run.num_threads);
  result.refine_passes = internal::refine_into<Scalar>(W, internal::refine_hessian(H, prep, ropt.damped), grid,
                                                      pruned, ropt, run, result.weight);
  internal::fill_codes(result);
  result.row_losses_unrefined = before;
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads);
}

#define OBC_INSTANTIATE(S)                                                                         \
  template void refine_quantized<S>(const Eigen::Ref<const RowMatrix<S>>&, const HessianRef&,      \
                                    QuantResult<S>&, const RefineOptions&, const HessianOptions&, \
                                    const RunOptions&);                                            \
  template int internal::refine_into<S>(const Eigen::Ref<const RowMatrix<S>>&,                     \
                                        const Eigen::MatrixXd&, const QuantGrid<S>&,               \
                                        const MaskMatrix&, const RefineOptions&,                   \
                                        const RunOptions&, RowMatrix<S>&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc

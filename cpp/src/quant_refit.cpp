// Refit of the grid scales given the codes (internal/quant_refit.hpp).
#include "internal/quant_refit.hpp"

#include <Eigen/Cholesky>
#include <algorithm>
#include <cmath>
#include <vector>

#include "internal/quant_common.hpp"
#include "internal/refine_kernels.hpp"
#include "obc/parallel.hpp"

namespace obc::internal {

namespace {

// Rows per chunk: the per-group products below are (rows x group) by (group x cols) GEMMs over
// an item's whole chunks (refine_items).
constexpr Index kRefitChunk = kRefineChunk;
// Above this many groups per row the joint solve (a groups x groups system per row, kept for a
// whole chunk) is skipped: the scales stay as fitted. 128-input groups reach it at 32768 inputs.
constexpr Index kMaxGroups = 256;

}  // namespace

template <class Scalar>
Index refit_scales_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const Eigen::MatrixXd& hd,
                        const MaskMatrix& pruned, const RunOptions& run, QuantGrid<Scalar>& grid,
                        RowMatrix<Scalar>& weight) {
  const Index rows = W.rows(), cols = W.cols();
  const Index gs = grid.group_size, groups = cols / gs;
  if (groups > kMaxGroups || rows == 0) return 0;
  const Index chunks = (rows + kRefitChunk - 1) / kRefitChunk;
  // Items of several chunks: one product per group for all their rows (refine_items).
  const std::vector<Index> item_starts = refine_items(
      chunks, (3 * cols + groups * groups + groups) * Index(sizeof(double)), run.num_threads);
  const Index items = static_cast<Index>(item_starts.size()) - 1;
  std::vector<Index> changed_of_item(static_cast<size_t>(items), 0);
  parallel_for(items, run.num_threads, run.interrupt, [&](Index item, int) {
    const Index r0 = item_starts[static_cast<size_t>(item)] * kRefitChunk;
    const Index len =
        std::min(item_starts[static_cast<size_t>(item) + 1] * kRefitChunk, rows) - r0;
    // The item's whole chunks share the products; a last chunk of fewer rows has its own.
    const Index whole = len - len % kRefitChunk;
    // a = code - zero and w over the free inputs, 0 at pruned ones (which lie at 0 on any grid
    // and so drop out of the residual w - A s).
    RowMatrix<double> a(len, cols), w(len, cols);
    for (Index i = 0; i < len; ++i)
      for (Index c = 0; c < cols; ++c) {
        const bool fixed = pruned(r0 + i, c) != 0;
        const GridPoint<Scalar> gp = grid_at(grid, r0 + i, c);
        a(i, c) = fixed ? 0.0 : static_cast<double>(gp.code(weight(r0 + i, c)) - gp.zero);
        w(i, c) = fixed ? 0.0 : static_cast<double>(W(r0 + i, c));
      }
    // Per row, the normal equations M s = b: M(g, h) = a_g^T hd_gh a_h, b(h) = a_h^T (hd w)_h.
    // Both from p_h = a_h^T hd_h (a row per row: hd symmetric, rows [h gs, (h + 1) gs) of hd):
    // M(g, h) = p_h[group g] . a[group g], b(h) = p_h . w. So the chunk costs one
    // (chunk x cols) by (cols x cols) product in all, in the dispatched GEMM (AVX2 / AVX-512).
    std::vector<Eigen::MatrixXd> m(static_cast<size_t>(len), Eigen::MatrixXd(groups, groups));
    Eigen::MatrixXd b(len, groups);
    const RefineKernels& kern = refine_kernels();
    RowMatrix<double> p(len, cols);
    for (Index h = 0; h < groups; ++h) {
      if (whole > 0)
        kern.product(a.data() + h * gs, cols, hd.data() + h * gs * cols, cols, whole, cols, gs,
                     p.data(), cols);
      if (whole < len)
        kern.product(a.data() + whole * cols + h * gs, cols, hd.data() + h * gs * cols, cols,
                     len - whole, cols, gs, p.data() + whole * cols, cols);
      for (Index i = 0; i < len; ++i) {
        for (Index g = 0; g < groups; ++g)
          m[static_cast<size_t>(i)](g, h) =
              p.row(i).segment(g * gs, gs).dot(a.row(i).segment(g * gs, gs));
        b(i, h) = p.row(i).dot(w.row(i));
      }
    }

    Index changed = 0;
    std::vector<Index> live;
    for (Index i = 0; i < len; ++i) {
      const Index r = r0 + i;
      // Groups whose codes are all at the zero point have no scale in the objective.
      live.clear();
      const Eigen::MatrixXd& mi = m[static_cast<size_t>(i)];
      for (Index g = 0; g < groups; ++g)
        if (mi(g, g) > 0.0) live.push_back(g);
      if (live.empty()) continue;
      const Index n = static_cast<Index>(live.size());
      Eigen::MatrixXd ml(n, n);
      Eigen::VectorXd bl(n);
      for (Index u = 0; u < n; ++u) {
        bl[u] = b(i, live[static_cast<size_t>(u)]);
        for (Index v = 0; v < n; ++v)
          ml(u, v) = 0.5 * (mi(live[static_cast<size_t>(u)], live[static_cast<size_t>(v)]) +
                            mi(live[static_cast<size_t>(v)], live[static_cast<size_t>(u)]));
      }
      const Eigen::LDLT<Eigen::MatrixXd> ldlt(ml);
      if (ldlt.info() != Eigen::Success || !ldlt.isPositive()) continue;
      const Eigen::VectorXd s = ldlt.solve(bl);
      bool ok = true;
      for (Index u = 0; u < n; ++u) {
        const Scalar sc = static_cast<Scalar>(s[u]);
        ok = ok && std::isfinite(s[u]) && sc > Scalar(0) && std::isfinite(sc);
      }
      if (!ok) continue;
      bool any = false;
      for (Index u = 0; u < n; ++u) {
        const Index g = live[static_cast<size_t>(u)];
        const Scalar sc = static_cast<Scalar>(s[u]);
        any = any || sc != grid.scale(r, g);
        grid.scale(r, g) = sc;
      }
      if (!any) continue;
      ++changed;
      for (Index c = 0; c < cols; ++c) {
        if (pruned(r, c)) continue;
        const int zero = static_cast<int>(grid.zero(r, c / gs));
        weight(r, c) = grid_at(grid, r, c).value(static_cast<int>(std::lround(a(i, c))) + zero);
      }
    }
    changed_of_item[static_cast<size_t>(item)] = changed;
  });
  Index changed = 0;
  for (const Index c : changed_of_item) changed += c;
  return changed;
}

#define OBC_INSTANTIATE(S)                                                                         \
  template Index refit_scales_into<S>(const Eigen::Ref<const RowMatrix<S>>&,                       \
                                      const Eigen::MatrixXd&, const MaskMatrix&,                   \
                                      const RunOptions&, QuantGrid<S>&, RowMatrix<S>&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc::internal

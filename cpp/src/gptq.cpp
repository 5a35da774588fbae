// GPTQ: fixed-order quantization with lazy block updates through the Cholesky factor of H^-1.
#include "obc/gptq.hpp"

#include <Eigen/Cholesky>
#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace {

// Rows solved together by one thread: the block updates are (chunk x block) by (block x rest)
// products. Fixed, so that the chunking (and every float operation) is the same for any thread
// count.
constexpr Index kRowChunk = 64;

using MatrixD = Eigen::MatrixXd;  // column-major: a chunk's column j is contiguous

}  // namespace

namespace internal {

void check_gptq_options(const GptqOptions& opt) {
  OBC_CHECK(opt.block_size >= 1, "block_size: expected >= 1, got ", opt.block_size);
}

Eigen::VectorXd hessian_diagonal(const HessianRef& H) {
  return H.visit([](const auto& h) -> Eigen::VectorXd {
    return h.diagonal().template cast<double>();
  });
}

template <class Scalar>
void gptq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const PreparedHessian& prep,
               const Eigen::VectorXd& hdiag, const QuantGrid<Scalar>& grid,
               const GptqOptions& gopt, const RunOptions& run, RowMatrix<Scalar>& out) {
  const Index rows = W.rows(), cols = W.cols();
  OBC_CHECK(prep.hinv.rows() == cols, "internal: gptq_into needs the float64 inverse");
  // order[k]: the original column quantized at step k. Dead inputs have diag 0 and go last.
  std::vector<Index> order(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), Index(0));
  if (gopt.act_order)
    std::stable_sort(order.begin(), order.end(),
                     [&](Index a, Index b) { return hdiag[a] > hdiag[b]; });
  // Upper Cholesky factor of the permuted inverse: hinv_perm = U^T U; row k of U, divided by
  // U_kk, is the OBS update of step k onto the columns after it.
  MatrixD upper(cols, cols);
  {
    MatrixD permuted(cols, cols);
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < cols; ++i) permuted(i, j) = prep.hinv(order[i], order[j]);
    Eigen::LLT<MatrixD, Eigen::Upper> llt(permuted);
    if (llt.info() != Eigen::Success || !(llt.matrixLLT().diagonal().array() > 0.0).all())
      throw NotPositiveDefinite(
          "the damped inverse Hessian has no Cholesky factor in float64 (H is too "
          "ill-conditioned); increase damp");
    upper = llt.matrixU();
  }
  const Index block = std::min(gopt.block_size, cols);
  const Index chunks = (rows + kRowChunk - 1) / kRowChunk;
  out.resize(rows, cols);
  parallel_for(chunks, run.num_threads, run.interrupt, [&](Index chunk, int) {
    const Index r0 = chunk * kRowChunk, len = std::min(kRowChunk, rows - r0);
    MatrixD w(len, cols);       // the chunk's weights in quantization order, updated
    MatrixD err(len, block);    // (w_j - q_j) / U_jj of the block's columns
    std::vector<char> zero(static_cast<size_t>(len * cols));  // (i, k) at k * len + i
    for (Index k = 0; k < cols; ++k) {
      const Index c = order[static_cast<size_t>(k)];
      const bool dead = prep.dead[static_cast<size_t>(c)] != 0;
      for (Index i = 0; i < len; ++i) {
        const Scalar v = W(r0 + i, c);
        zero[static_cast<size_t>(k * len + i)] = (dead || v == Scalar(0)) ? 1 : 0;
        w(i, k) = dead ? 0.0 : static_cast<double>(v);
      }
    }
    for (Index b0 = 0; b0 < cols; b0 += block) {
      const Index nb = std::min(block, cols - b0), b1 = b0 + nb;
      for (Index k = b0; k < b1; ++k) {
        const Index c = order[static_cast<size_t>(k)];
        const double ukk = upper(k, k);
        for (Index i = 0; i < len; ++i) {
          const Scalar q = zero[static_cast<size_t>(k * len + i)]
                               ? Scalar(0)
                               : grid_at(grid, r0 + i, c).quantize(static_cast<Scalar>(w(i, k)));
          out(r0 + i, c) = q;
          err(i, k - b0) = (w(i, k) - static_cast<double>(q)) / ukk;
        }
        // Within the block, eagerly: the next column must see this step's update.
        if (k + 1 < b1)
          w.middleCols(k + 1, b1 - k - 1).noalias() -=
              err.col(k - b0) * upper.row(k).segment(k + 1, b1 - k - 1);
      }
      // The block's steps onto every later column at once (level 3).
      if (b1 < cols)
        w.rightCols(cols - b1).noalias() -=
            err.leftCols(nb) * upper.block(b0, b1, nb, cols - b1);
    }
  });
}

}  // namespace internal

template <class Scalar>
QuantResult<Scalar> quantize_gptq(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, const QuantOptions& opt,
                                  const GptqOptions& gopt, const HessianOptions& hopt,
                                  const RunOptions& run) {
  internal::check_quant_options(opt, W.cols());
  internal::check_gptq_options(gopt);
  HessianOptions inverting = hopt;
  inverting.invert = true;
  PreparedHessian prep = prepare_hessian(H, inverting, run.num_threads, run.interrupt);
  internal::check_quant_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  QuantResult<Scalar> result;
  result.grid = make_grid<Scalar>(W, opt);
  internal::gptq_into<Scalar>(W, prep, internal::hessian_diagonal(H), result.grid, gopt, run,
                              result.weight);
  check_finite_result(result.weight, "weights");
  result.pruned = internal::pruned_mask<Scalar>(W, prep.dead);
  internal::fill_codes(result);
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
  result.row_losses_unrefined = result.row_losses;
  result.row_method.setConstant(
      W.rows(), static_cast<std::uint8_t>(gopt.act_order ? QuantMethod::Gptq
                                                         : QuantMethod::GptqNatural));
  result.damp = prep.damp;
  result.damp_absolute = prep.damp_absolute;
  return result;
}

#define OBC_INSTANTIATE(S)                                                                         \
  template QuantResult<S> quantize_gptq<S>(const Eigen::Ref<const RowMatrix<S>>&,                  \
                                           const HessianRef&, const QuantOptions&,                 \
                                           const GptqOptions&, const HessianOptions&,              \
                                           const RunOptions&);                                     \
  template void internal::gptq_into<S>(const Eigen::Ref<const RowMatrix<S>>&,                      \
                                       const PreparedHessian&, const Eigen::VectorXd&,             \
                                       const QuantGrid<S>&, const GptqOptions&,                    \
                                       const RunOptions&, RowMatrix<S>&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc

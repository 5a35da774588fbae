// GPTQ: fixed-order quantization with lazy block updates through the Cholesky factor of H^-1
// (found without H^-1 itself, see gptq_inverse_factor).
#include "obc/gptq.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "internal/damped_hessian.hpp"
#include "internal/gptq_kernels.hpp"
#include "internal/huge_pages.hpp"
#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace internal {

void check_gptq_options(const GptqOptions& opt) {
  OBC_CHECK(opt.block_size >= 1, "block_size: expected >= 1, got ", opt.block_size);
}

Eigen::VectorXd hessian_diagonal(const HessianRef& H) {
  return H.visit([](const auto& h) -> Eigen::VectorXd {
    return h.diagonal().template cast<double>();
  });
}

// The sweep compiled for the ISA the row kernels use (so OBC_SIMD=generic applies here too).
const GptqKernels& gptq_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (std::strcmp(kernels().isa, "generic") != 0) return gptq_kernels_avx2();
#endif
  return gptq_kernels_generic();
}

namespace {

constexpr Index kColumnChunk = 128;  // columns per parallel item of the O(cols^2) passes
constexpr Index kTile = 64;          // square tiles of the in-place anti-transpose

// The factor the sweep reads (GptqJob::factor: U^T, U upper with U^T U = P^T D^-1 P, D the
// damped Hessian, P the order), without D^-1 itself. With J the reversal, the lower Cholesky
// factor L of A = J P^T D P J gives U = J L^-1 J: J L^-1 J is upper with a positive diagonal and
// (J L^-1 J)^T (J L^-1 J) = J (L L^T)^-1 J = P^T D^-1 P, so it is that factor. Cost: a Cholesky
// factor and a triangular inverse, 2/3 cols^3 flops, where D^-1 and then the factor of its
// permuted copy took 4/3 cols^3. Everything happens in one cols x cols buffer (fresh pages are
// costly: the first touch of each is a kernel fault). The pivot check is prepare_hessian's
// (same tolerance, same error), on A's pivots. inverse_diagonal (may be null): set to
// diag(P^T D^-1 P) in step order (L^-1's squared column norms, reversed), for the float32 range
// check.
Eigen::MatrixXd gptq_inverse_factor(const HessianRef& H, const PreparedHessian& prep,
                                    const std::vector<Index>& order, const RunOptions& run,
                                    Eigen::VectorXd* inverse_diagonal) {
  const Index n = prep.cols();
  const int threads = n < 384 ? 1 : run.num_threads;  // as spd_inverse: small ones on one thread
  const Index items = (n + kColumnChunk - 1) / kColumnChunk;
  Eigen::MatrixXd a(n, n);
  advise_huge_pages(a.data(), sizeof(double) * static_cast<size_t>(n * n));
  write_damped_hessian(H, prep, a.data(), true, threads);
  // A = J P^T D P J, i.e. A(i, j) = D(perm[i], perm[j]) with perm[k] = order[n-1-k]. First the
  // columns, in place along the cycles of perm (column k <- column perm[k]).
  std::vector<Index> perm(static_cast<size_t>(n));
  for (Index k = 0; k < n; ++k) perm[static_cast<size_t>(k)] = order[static_cast<size_t>(n - 1 - k)];
  {
    std::vector<char> done(static_cast<size_t>(n), 0);
    std::vector<double> held(static_cast<size_t>(n));
    const auto column = [&](Index k) { return a.data() + k * n; };
    for (Index start = 0; start < n; ++start) {
      if (done[static_cast<size_t>(start)]) continue;
      std::copy(column(start), column(start) + n, held.begin());
      for (Index k = start;;) {
        done[static_cast<size_t>(k)] = 1;
        const Index from = perm[static_cast<size_t>(k)];
        if (from == start) {
          std::copy(held.begin(), held.end(), column(k));
          break;
        }
        std::copy(column(from), column(from) + n, column(k));
        k = from;
      }
    }
  }
  // Then the rows of each column's lower part, from a copy of the column.
  parallel_for(items, threads, nullptr, [&](Index item, int) {
    std::vector<double> column(static_cast<size_t>(n));
    for (Index j = item * kColumnChunk; j < std::min(n, (item + 1) * kColumnChunk); ++j) {
      std::copy(a.col(j).data(), a.col(j).data() + n, column.begin());
      for (Index i = j; i < n; ++i)
        a(i, j) = column[static_cast<size_t>(perm[static_cast<size_t>(i)])];
    }
  });
  if (!gptq_kernels().cholesky_inverse(a.data(), n, kPivotTolerance, run.num_threads,
                                       run.interrupt))
    throw not_positive_definite(prep);
  if (inverse_diagonal != nullptr) {
    inverse_diagonal->resize(n);
    for (Index j = 0; j < n; ++j)
      (*inverse_diagonal)[n - 1 - j] = a.col(j).tail(n - j).squaredNorm();
  }
  // U^T (i, j) = U(j, i) = L^-1(n-1-j, n-1-i) for i >= j: swap each entry (i, j) of the lower
  // triangle with i + j < n - 1 with its mirror across the anti-diagonal, 64 x 64 tile against
  // tile so that both stay in cache. Each pair is swapped by the item owning column j, once.
  parallel_for(items, threads, nullptr, [&](Index item, int) {
    const Index j_end = std::min(n, (item + 1) * kColumnChunk);
    for (Index jb = item * kColumnChunk; jb < j_end; jb += kTile)
      for (Index ib = jb; ib < n - 1 - jb; ib += kTile)
        for (Index j = jb; j < std::min(j_end, jb + kTile); ++j)
          for (Index i = std::max(ib, j); i < std::min(n - 1 - j, ib + kTile); ++i)
            std::swap(a(i, j), a(n - 1 - j, n - 1 - i));
  });
  return a;
}

}  // namespace

template <class Scalar>
void gptq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, const HessianRef& H,
               const PreparedHessian& prep, const Eigen::VectorXd& hdiag,
               const QuantGrid<Scalar>& grid, const GptqOptions& gopt, const RunOptions& run,
               RowMatrix<Scalar>& out, Eigen::VectorXd* step_losses) {
  const Index rows = W.rows(), cols = W.cols();
  OBC_CHECK(prep.cols() == cols && H.rows() == cols, "internal: gptq_into: shapes differ");
  // order[k]: the original column quantized at step k. Dead inputs have diag 0 and go last.
  std::vector<Index> order(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), Index(0));
  if (gopt.act_order)
    std::stable_sort(order.begin(), order.end(),
                     [&](Index a, Index b) { return hdiag[a] > hdiag[b]; });
  Eigen::VectorXd inverse_diagonal;
  constexpr bool f32 = std::is_same_v<Scalar, float>;
  const Eigen::MatrixXd factor =
      gptq_inverse_factor(H, prep, order, run, f32 ? &inverse_diagonal : nullptr);
  // The float32 range check of check_layer_scale, on the diagonal of H^-1 found on the way
  // (prep has no H^-1 here).
  if constexpr (f32)
    check_inverse_range<Scalar>(inverse_diagonal.minCoeff(), inverse_diagonal.maxCoeff());
  out.resize(rows, cols);
  if (step_losses != nullptr) step_losses->resize(rows);
  const GptqJob<Scalar> job{W.data(),         W.outerStride(),     rows,
                            cols,             order.data(),        prep.dead.data(),
                            factor.data(),    grid.scale.data(),   grid.zero.data(),
                            grid.group_size,  grid.bits,           gopt.block_size,
                            out.data(),       step_losses != nullptr ? step_losses->data() : nullptr};
  if constexpr (f32)
    gptq_kernels().sweep_f32(job, run);
  else
    gptq_kernels().sweep_f64(job, run);
}

template <class Scalar>
Eigen::VectorXd gptq_row_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                const RowMatrix<Scalar>& out, const HessianRef& H,
                                const PreparedHessian& prep, Eigen::VectorXd step_losses,
                                const RunOptions& run) {
  const Index rows = W.rows(), cols = W.cols();
  OBC_CHECK(out.rows() == rows && out.cols() == cols && step_losses.size() == rows,
            "internal: gptq_row_losses: shapes differ");
  check_finite_result(step_losses, "row losses");  // before the clamp, which would hide a NaN
  constexpr Index kMeasureChunk = 256;  // row_losses' row chunk: its values depend on the chunk
  const Index chunks = (rows + kMeasureChunk - 1) / kMeasureChunk;
  std::vector<char> measure(static_cast<size_t>(chunks), 0);
  const double lambda = prep.damp_absolute;
  const char* dead = prep.dead.data();
  // Each row on its own, columns in order: the values do not depend on the thread count.
  parallel_for(chunks, run.num_threads, run.interrupt, [&](Index chunk, int) {
    for (Index r = chunk * kMeasureChunk; r < std::min(rows, (chunk + 1) * kMeasureChunk); ++r) {
      double damping_part = 0;
      if (lambda > 0) {
        for (Index c = 0; c < cols; ++c) {
          if (dead[c]) continue;
          const double dw = static_cast<double>(out(r, c)) - static_cast<double>(W(r, c));
          damping_part += dw * dw;
        }
        damping_part *= 0.5 * lambda;
      }
      // More than half of the damped loss is damping (H nearly singular along dw, e.g. a
      // rank-deficient H): the difference would lose bits to cancellation.
      if (damping_part > 0.5 * step_losses[r]) measure[static_cast<size_t>(chunk)] = 1;
      step_losses[r] = std::max(0.0, step_losses[r] - damping_part);
    }
  });
  for (Index chunk = 0; chunk < chunks; ++chunk) {
    if (!measure[static_cast<size_t>(chunk)]) continue;
    const Index r0 = chunk * kMeasureChunk, len = std::min(kMeasureChunk, rows - r0);
    step_losses.segment(r0, len) = row_losses<Scalar>(W.middleRows(r0, len), out.middleRows(r0, len),
                                                      H, run.num_threads, run.interrupt);
  }
  return step_losses;
}

}  // namespace internal

template <class Scalar>
QuantResult<Scalar> quantize_gptq(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                  const HessianRef& H, const QuantOptions& opt,
                                  const GptqOptions& gopt, const HessianOptions& hopt,
                                  const RunOptions& run) {
  internal::check_quant_options(opt, W.cols());
  internal::check_gptq_options(gopt);
  // No H^-1: gptq_into factors the permuted Hessian itself.
  HessianOptions no_inverse = hopt;
  no_inverse.invert = false;
  const PreparedHessian prep = prepare_hessian(H, no_inverse, run.num_threads, run.interrupt);
  internal::check_quant_inputs<Scalar>(W, prep.cols());
  internal::check_layer_scale<Scalar>(W, prep);
  QuantResult<Scalar> result;
  result.grid = make_grid<Scalar>(W, opt, run.num_threads);
  Eigen::VectorXd step_losses;
  internal::gptq_into<Scalar>(W, H, prep, internal::hessian_diagonal(H), result.grid, gopt, run,
                              result.weight, &step_losses);
  check_finite_result(result.weight, "weights");
  result.pruned = internal::pruned_mask<Scalar>(W, prep.dead);
  // From the sweep's step losses, as quantize_select (and so quantize and the C API) takes them.
  result.row_losses = internal::gptq_row_losses<Scalar>(W, result.weight, H, prep,
                                                        std::move(step_losses), run);
  internal::fill_codes(result);
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
  template void internal::gptq_into<S>(const Eigen::Ref<const RowMatrix<S>>&, const HessianRef&,  \
                                       const PreparedHessian&, const Eigen::VectorXd&,             \
                                       const QuantGrid<S>&, const GptqOptions&,                    \
                                       const RunOptions&, RowMatrix<S>&, Eigen::VectorXd*);   \
  template Eigen::VectorXd internal::gptq_row_losses<S>(                                           \
      const Eigen::Ref<const RowMatrix<S>>&, const RowMatrix<S>&, const HessianRef&,               \
      const PreparedHessian&, Eigen::VectorXd, const RunOptions&);

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc

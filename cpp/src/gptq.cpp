// GPTQ: fixed-order quantization with lazy block updates through the Cholesky factor of the
// permuted, damped Hessian itself (no inverse, no triangular inverse: see gptq_factor).
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
#include "internal/quant_entry.hpp"
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

// The sweep compiled for the ISA the row kernels use (so OBC_SIMD=generic applies here too), or
// its AVX-512 copy (OBC_SIMD=avx2 keeps that off).
const GptqKernels& gptq_kernels() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (use_avx512_kernels()) return gptq_kernels_avx512();
  if (std::strcmp(kernels().isa, "generic") != 0) return gptq_kernels_avx2();
#endif
  return gptq_kernels_generic();
}

namespace {

constexpr Index kColumnChunk = 128;  // columns per parallel item of the O(cols^2) passes

// The factor the sweep reads (GptqJob::factor), from H_p = P^T D P (D the damped Hessian, P the
// order) without any inverse. GPTQ's step k rounds w~_k, the weight after the OBS updates of steps
// 0..k-1; with U the upper Cholesky factor of H_p^-1 (U^T U = H_p^-1, the factor the research code
// and earlier versions use) and e = w - q, those updates sum to w~ = q + diag(U) U^-T e, i.e. with
// L = U^-T (lower, L^T L = H_p): w~_k = w_k + sum_{i<k} (L_ki / L_kk) e_i, and step k's loss is
// (L_kk (w~_k - q_k))^2 / 2. 1 / L_kk^2 = [(H_p[k:, k:])^-1]_00 is the [H_F^-1]_qq of the OBS step
// (F the columns not yet rounded). L itself: with J the reversal, the lower Cholesky factor R of
// A = J H_p J gives L = J R^T J (lower, and L^T L = J R R^T J = H_p). Cost: one Cholesky factor,
// cols^3 / 3 flops (the inverse factor took a triangular inverse more, 2/3 cols^3 in all).
// Everything happens in one cols x cols buffer of T (fresh pages are costly: the first touch of
// each is a kernel fault, and on some virtual machines that zeroing took half the call's time):
// D's columns are written already moved (column k holds column perm[k] of D), each column's
// rows then gathered in place, A's lower triangle factored in place, then each column k of the
// strict upper triangle gets row k of M = diag(L)^-1 L (M^T(i, k) = L(k, i) / L(k, k) =
// R(n-1-i, n-1-k) / R(n-1-k, n-1-k): the tail of R's column n-1-k, reversed) and the diagonal
// L_kk = R(n-1-k, n-1-k). The pivot check is prepare_hessian's (same tolerance, same error), on
// A's pivots.
// T: the factor's precision. float (float32 weights): A's entries are computed in double as for
// double and rounded to float32 once (as they are written), then factored and rearranged in
// float32 (the cubic part at float32 GEMM rate); a failed pivot check or a non-finite entry then
// throws PrecisionLost (the caller redoes the layer in float64) instead of the
// NotPositiveDefinite a float64 factor throws.
// Memory: this buffer, sizeof(T) cols^2 bytes, is the only cols^2 allocation of a GPTQ call.
// step_variance (may be null): set to 1 / L_kk^2 in step order, for the float32 range check.
template <class T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> gptq_factor(const HessianRef& H,
                                                             const PreparedHessian& prep,
                                                             const std::vector<Index>& order,
                                                             const RunOptions& run,
                                                             Eigen::VectorXd* step_variance) {
  using MatrixT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr bool f32 = std::is_same_v<T, float>;
  const Index n = prep.cols();
  const int threads = n < 384 ? 1 : run.num_threads;  // as spd_inverse: small ones on one thread
  const Index items = (n + kColumnChunk - 1) / kColumnChunk;
  // A = J P^T D P J, i.e. A(i, j) = D(perm[i], perm[j]) with perm[k] = order[n-1-k]. First the
  // columns: column perm[k] of D is written as column k (column_of the inverse of perm).
  std::vector<Index> perm(static_cast<size_t>(n)), column_of(static_cast<size_t>(n));
  for (Index k = 0; k < n; ++k) {
    perm[static_cast<size_t>(k)] = order[static_cast<size_t>(n - 1 - k)];
    column_of[static_cast<size_t>(perm[static_cast<size_t>(k)])] = k;
  }
  MatrixT f(n, n);
  advise_huge_pages(f.data(), sizeof(T) * static_cast<size_t>(n * n));
  // Polled: these first writes fault in the fresh buffer's pages (seconds at 6000 inputs on some
  // virtual machines).
  write_damped_hessian_moved<T>(H, prep, f.data(), column_of.data(), threads, run.interrupt);
  // Then the rows of each column's lower part, from a copy of the column.
  parallel_for(items, threads, run.interrupt, [&](Index item, int) {
    std::vector<T> column(static_cast<size_t>(n));
    for (Index j = item * kColumnChunk; j < std::min(n, (item + 1) * kColumnChunk); ++j) {
      std::copy(f.col(j).data(), f.col(j).data() + n, column.begin());
      for (Index i = j; i < n; ++i)
        f(i, j) = column[static_cast<size_t>(perm[static_cast<size_t>(i)])];
    }
  });
  bool factored = false;
  if constexpr (f32)
    factored = gptq_kernels().cholesky_f32(f.data(), n, kPivotTolerance, run.num_threads,
                                           run.interrupt);
  else
    factored = gptq_kernels().cholesky_f64(f.data(), n, kPivotTolerance, run.num_threads,
                                           run.interrupt);
  if (!factored) {
    if constexpr (f32)
      throw PrecisionLost("H: its float32 Cholesky factor for GPTQ lost positive definiteness");
    else
      throw not_positive_definite(prep);
  }
  // R's diagonal, reversed: L_kk.
  Eigen::VectorXd lkk(n);
  for (Index k = 0; k < n; ++k) lkk[k] = static_cast<double>(f(n - 1 - k, n - 1 - k));
  if (step_variance != nullptr) *step_variance = lkk.cwiseAbs2().cwiseInverse();
  // Column k of the strict upper triangle from the strict lower part of column n-1-k: writes
  // only above the diagonal, reads only below it, so the items never meet (the quotient is taken
  // in double and rounded once). float: a chunk with a non-finite entry marks the factor unusable.
  std::vector<char> bad(static_cast<size_t>(items), 0);
  parallel_for(items, threads, nullptr, [&](Index item, int) {
    for (Index k = item * kColumnChunk; k < std::min(n, (item + 1) * kColumnChunk); ++k) {
      const T* from = f.col(n - 1 - k).data();
      T* to = f.col(k).data();
      const double inv = 1.0 / lkk[k];
      for (Index i = 0; i < k; ++i)
        to[i] = static_cast<T>(static_cast<double>(from[n - 1 - i]) * inv);
      if constexpr (f32)
        if (!f.col(k).head(k).allFinite()) bad[static_cast<size_t>(item)] = 1;
    }
  });
  if constexpr (f32)
    if (std::find(bad.begin(), bad.end(), char(1)) != bad.end() || !lkk.allFinite())
      throw PrecisionLost("H: its float32 Cholesky factor for GPTQ is not finite");
  f.diagonal() = lkk.template cast<T>();
  return f;
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
  // float32 weights: the factor and the sweep in float32 (PrecisionLost where that fails; the
  // public entry points then redo the layer in float64).
  Eigen::VectorXd step_variance;
  constexpr bool f32 = std::is_same_v<Scalar, float>;
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> factor =
      gptq_factor<Scalar>(H, prep, order, run, f32 ? &step_variance : nullptr);
  // The float32 range check of check_layer_scale (prep has no H^-1 here), on the OBS steps'
  // [H_F^-1]_qq = 1 / L_kk^2 instead of diag(H^-1), which would take the inverse this factor
  // avoids: each is at most diag(P^T D^-1 P)_k (the inverse of a trailing block of H_p has a
  // smaller diagonal than the trailing block of H_p^-1), with equality at k = 0. Where they do
  // not fit float32 arithmetic the layer is redone in float64 (PrecisionLost), which needs no
  // such range; its results lie on the float32 grid all the same.
  if constexpr (f32)
    if (!inverse_fits_float32(step_variance.minCoeff(), step_variance.maxCoeff()))
      throw PrecisionLost("H: GPTQ's step variances are out of float32 range");
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
  // Rows are re-measured exactly in chunks, only where one of a chunk's rows needs it (the
  // flags below); row_losses gives each row the same bits in any chunk.
  constexpr Index kMeasureChunk = 256;
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
  // No H^-1: gptq_into factors the permuted H itself. The losses come from the sweep's step
  // losses, as quantize_select (and so quantize and the C API) takes them.
  return internal::quantize_one_method<Scalar>(
      W, H, opt, hopt, run, gopt.act_order ? QuantMethod::Gptq : QuantMethod::GptqNatural,
      /*invert=*/false, [&] { internal::check_gptq_options(gopt); },
      [&](const auto& w, const PreparedHessian& prep, const auto& grid, auto& out) {
        Eigen::VectorXd step_losses;
        internal::gptq_into(w, H, prep, internal::hessian_diagonal(H), grid, gopt, run, out,
                            &step_losses);
        return step_losses;
      });
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

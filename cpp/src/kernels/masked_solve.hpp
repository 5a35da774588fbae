// Optimal weights for fixed pruned masks, one float64 solve per row (obc::solve_masked).
// Included by kernels/row_kernels.cpp, so it is compiled once per SIMD level: the per-row
// Cholesky factorizations are most of the work of Trace::weights (at 2304 inputs and 50% about
// two thirds of a full trace's time with the portable build), and are level-3 in Eigen.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <type_traits>
#include <vector>

#include "internal/row_kernels.hpp"
#include "internal/row_state.hpp"
#include "obc/parallel.hpp"

namespace obc::OBC_KERNEL_NS {

using internal::HessianInput;

/// Calls f with H as an Eigen map (row- or column-major, float32 or float64, as it lies).
template <class F>
decltype(auto) visit_hessian(const HessianInput& H, F&& f) {
  auto as = [&](const auto* data) -> decltype(auto) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    using Stride = Eigen::OuterStride<>;
    using RowMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic,
                                                  Eigen::RowMajor>, 0, Stride>;
    using ColMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>, 0, Stride>;
    if (H.col_stride == 1) return f(RowMap(data, H.cols, H.cols, Stride(H.row_stride)));
    return f(ColMap(data, H.cols, H.cols, Stride(H.col_stride)));
  };
  if (H.is_f32) return as(static_cast<const float*>(H.data));
  return as(static_cast<const double*>(H.data));
}

template <class S>
void masked_solve_rows(const internal::MaskedSolveJob<S>& job, const RunOptions& run) {
  using MatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  using VectorXd = Eigen::Matrix<double, Eigen::Dynamic, 1>;
  const Index rows = job.rows, cols = job.cols;
  const Eigen::Map<const MatrixXd> hinv(job.hinv, job.hinv ? cols : 0, job.hinv ? cols : 0);
  visit_hessian(job.H, [&](const auto& h) {
    // An exactly symmetric H (the usual case: accumulated or symmetrized) has (h_ab + h_ba) / 2
    // == h_ab bit for bit, so rows may read one triangle only, along H's contiguous direction;
    // the transposed reads of the general case are strided (a cache miss per element).
    bool exactly_symmetric = true;
    for (Index j = 0; j < cols && exactly_symmetric; ++j)
      for (Index i = j + 1; i < cols; ++i)
        if (h(i, j) != h(j, i)) {
          exactly_symmetric = false;
          break;
        }
    constexpr bool row_major = std::decay_t<decltype(h)>::IsRowMajor;
    auto damped = [&](Index a, Index b) {
      const double v = 0.5 * (static_cast<double>(h(a, b)) + static_cast<double>(h(b, a)));
      return a == b ? v + job.damp_absolute : v;
    };
    auto off_diagonal = [&](Index a, Index b) {  // the damped H at (a, b), a != b
      if (!exactly_symmetric) return damped(a, b);
      return static_cast<double>(row_major ? h(a, b) : h(b, a));  // contiguous along b
    };
    parallel_for(rows, run.num_threads, run.interrupt, [&](Index r, int) {
      const std::uint8_t* pruned = job.pruned + r * cols;
      const S* w_row = job.W + r * cols;
      std::vector<Index> P, F;
      for (Index c = 0; c < cols; ++c) (pruned[c] ? P : F).push_back(c);
      VectorXd out(cols);
      for (Index c = 0; c < cols; ++c) out[c] = static_cast<double>(w_row[c]);
      const Index np = static_cast<Index>(P.size()), nf = static_cast<Index>(F.size());
      if (np > 0 && nf > 0) {
        VectorXd wp(np);
        for (Index i = 0; i < np; ++i) wp[i] = out[P[i]];
        if (np < nf) {
          // w_hat = w - Hinv[:,P] (Hinv_PP)^-1 w_P; hinv holds both triangles (mirrored, equal
          // bits), so every read goes down a column.
          MatrixXd gpp(np, np);
          for (Index j = 0; j < np; ++j)  // the lower triangle only: LLT reads nothing else
            for (Index i = j; i < np; ++i) gpp(i, j) = hinv(P[i], P[j]);
          Eigen::LLT<Eigen::Ref<MatrixXd>> llt(gpp);  // in place: no second np x np copy
          if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
          const VectorXd coef = llt.solve(wp);
          for (Index i = 0; i < nf; ++i) {
            double delta = 0;
            for (Index j = 0; j < np; ++j) delta += hinv(P[j], F[i]) * coef[j];
            out[F[i]] -= delta;
          }
        } else {
          // w_hat_F = w_F + H_FF^-1 H_FP w_P with the damped H (dead inputs are in P, and their
          // rows of H are zero, so only live entries are read here)
          MatrixXd hff(nf, nf);
          VectorXd rhs(nf);
          for (Index j = 0; j < nf; ++j) {  // the lower triangle only: LLT reads nothing else
            hff(j, j) = damped(F[j], F[j]);
            for (Index i = j + 1; i < nf; ++i) hff(i, j) = off_diagonal(F[j], F[i]);
          }
          for (Index i = 0; i < nf; ++i) {
            double sum = 0;  // in a register: rhs[i] += ... went through memory every term
            for (Index j = 0; j < np; ++j)
              if (!job.dead[P[j]]) sum += off_diagonal(F[i], P[j]) * wp[j];
            rhs[i] = sum;
          }
          Eigen::LLT<Eigen::Ref<MatrixXd>> llt(hff);  // in place
          if (llt.info() != Eigen::Success) RowState<double>::lost_definiteness();
          const VectorXd delta = llt.solve(rhs);
          for (Index i = 0; i < nf; ++i) out[F[i]] += delta[i];
        }
      }
      S* dst = job.out + r * cols;
      for (Index c = 0; c < cols; ++c) dst[c] = pruned[c] ? S(0) : static_cast<S>(out[c]);
    });
  });
}

}  // namespace obc::OBC_KERNEL_NS

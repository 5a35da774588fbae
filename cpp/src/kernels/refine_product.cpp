// The refinement's products (internal/refine_kernels.hpp): one Eigen GEMM, compiled once per SIMD
// level like row_kernels.cpp (OBC_KERNEL_NS and a renamed Eigen in the AVX2 / AVX-512 copies).
#include <Eigen/Core>
#include <algorithm>
#include <cmath>

#include "internal/refine_kernels.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif
#ifndef OBC_REFINE_TABLE
#define OBC_REFINE_TABLE refine_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

// In refine_codes.cpp (compiled without fused multiply-adds).
template <class S>
void propose_codes(const internal::ProposeRows<S>& job);
template <class S>
internal::KIndex sweep_codes(const internal::SweepRow<S>& job);

namespace {

using RowsD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ColsD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

// a b + c with one rounding where the copy has FMA, two where it has not: the same for every
// element, vectorized or not, so the result does not depend on the arrays' alignment (Eigen's
// packet path fuses where its scalar head and tail may not).
inline double madd(double a, double b, double c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

void product(const double* a, internal::KIndex lda, const double* b, internal::KIndex ldb,
             internal::KIndex m, internal::KIndex n, internal::KIndex k, double* c,
             internal::KIndex ldc) {
  if (m == 0 || n == 0) return;
  if (m == 1 || n == 1 || m + n + k < 24) {
    // Small or vector shapes: Eigen would take its coefficient-wise or GEMV paths, whose
    // vectorized reductions peel by the arrays' alignment (so the sums would depend on where
    // malloc put them, e.g. per thread). Plain loops in a fixed order instead.
    for (internal::KIndex i = 0; i < m; ++i) {
      double* ci = c + i * ldc;
      std::fill(ci, ci + n, 0.0);
      for (internal::KIndex u = 0; u < k; ++u) {
        const double aiu = a[i * lda + u];
        const double* bu = b + u * ldb;
        for (internal::KIndex j = 0; j < n; ++j) ci[j] = madd(aiu, bu[j], ci[j]);
      }
    }
    return;
  }
  // GEMM: Eigen packs the operands into aligned panels, so its sums depend on the shapes only.
  Eigen::Map<RowsD, 0, Eigen::OuterStride<>> cm(c, m, n, Eigen::OuterStride<>(ldc));
  const Eigen::Map<const RowsD, 0, Eigen::OuterStride<>> am(a, m, k, Eigen::OuterStride<>(lda));
  const Eigen::Map<const ColsD, 0, Eigen::OuterStride<>> bm(b, n, k, Eigen::OuterStride<>(ldb));
  cm.noalias() = am * bm.transpose();
}

void add_columns(double* y, internal::KIndex n, const double* b, internal::KIndex ldb,
                 const internal::KIndex* index, const double* delta, internal::KIndex count) {
  internal::KIndex u = 0;
  // Two columns per pass: half the loads and stores of y.
  for (; u + 1 < count; u += 2) {
    const double d0 = delta[u], d1 = delta[u + 1];
    const double* b0 = b + index[u] * ldb;
    const double* b1 = b + index[u + 1] * ldb;
    for (internal::KIndex t = 0; t < n; ++t) y[t] = madd(d1, b1[t], madd(d0, b0[t], y[t]));
  }
  if (u < count) {
    const double d0 = delta[u];
    const double* b0 = b + index[u] * ldb;
    for (internal::KIndex t = 0; t < n; ++t) y[t] = madd(d0, b0[t], y[t]);
  }
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const RefineKernels& OBC_REFINE_TABLE() {
  static const RefineKernels table{
      &OBC_KERNEL_NS::product,             &OBC_KERNEL_NS::add_columns,
      &OBC_KERNEL_NS::propose_codes<float>, &OBC_KERNEL_NS::propose_codes<double>,
      &OBC_KERNEL_NS::sweep_codes<float>,   &OBC_KERNEL_NS::sweep_codes<double>};
  return table;
}

}  // namespace obc::internal

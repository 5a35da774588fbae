// The refinement's products (internal/refine_kernels.hpp): one Eigen GEMM, compiled once per SIMD
// level like row_kernels.cpp (OBC_KERNEL_NS and a renamed Eigen in the AVX2 / AVX-512 copies).
#include <Eigen/Core>

#include "internal/refine_kernels.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif
#ifndef OBC_REFINE_TABLE
#define OBC_REFINE_TABLE refine_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

using RowsD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ColsD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;

void product(const double* a, internal::KIndex lda, const double* b, internal::KIndex ldb,
             internal::KIndex m, internal::KIndex n, internal::KIndex k, double* c,
             internal::KIndex ldc) {
  if (m == 0 || n == 0) return;
  Eigen::Map<RowsD, 0, Eigen::OuterStride<>> cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (k == 0) {
    cm.setZero();
    return;
  }
  const Eigen::Map<const RowsD, 0, Eigen::OuterStride<>> am(a, m, k, Eigen::OuterStride<>(lda));
  const Eigen::Map<const ColsD, 0, Eigen::OuterStride<>> bm(b, n, k, Eigen::OuterStride<>(ldb));
  cm.noalias() = am * bm.transpose();
}

void add_columns(double* y, internal::KIndex n, const double* b, internal::KIndex ldb,
                 const internal::KIndex* index, const double* delta, internal::KIndex count) {
  using Vec = Eigen::Map<Eigen::VectorXd>;
  using ConstVec = Eigen::Map<const Eigen::VectorXd>;
  Vec ym(y, n);
  internal::KIndex u = 0;
  // Two columns per pass: half the loads and stores of y.
  for (; u + 1 < count; u += 2)
    ym.noalias() += delta[u] * ConstVec(b + index[u] * ldb, n) +
                    delta[u + 1] * ConstVec(b + index[u + 1] * ldb, n);
  if (u < count) ym.noalias() += delta[u] * ConstVec(b + index[u] * ldb, n);
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const RefineKernels& OBC_REFINE_TABLE() {
  static const RefineKernels table{&OBC_KERNEL_NS::product, &OBC_KERNEL_NS::add_columns};
  return table;
}

}  // namespace obc::internal

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

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const RefineKernels& OBC_REFINE_TABLE() {
  static const RefineKernels table{&OBC_KERNEL_NS::product};
  return table;
}

}  // namespace obc::internal

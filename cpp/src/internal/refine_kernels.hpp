// Plain (Eigen-free) interface of the refinement's products (quant_refine.cpp, quant_refit.cpp),
// so that they are compiled once per SIMD level like the row kernels (see
// kernels/refine_product.cpp) and picked at run time: the refinement's gradient updates are
// GEMMs, which run several times faster with AVX2+FMA or AVX-512 than with the baseline SSE2.
#pragma once

#include "internal/row_kernels.hpp"

namespace obc::internal {

struct RefineKernels {
  /// c = a b^T in float64: c (m x n, row i at c + i * ldc), a (m x k, row i at a + i * lda),
  /// b (n x k column-major: column u at b + u * ldb, so b(j, u) = b[u * ldb + j]). c does not
  /// alias a or b. The summation order depends on (m, n, k) and the ISA only.
  void (*product)(const double* a, KIndex lda, const double* b, KIndex ldb, KIndex m, KIndex n,
                  KIndex k, double* c, KIndex ldc);
  /// y[0, n) += sum_u delta[u] * b[index[u] * ldb + t] over t in [0, n), u in [0, count): a few
  /// scaled columns of a column-major matrix added to one vector, in u order (pairs of columns
  /// per pass over y).
  void (*add_columns)(double* y, KIndex n, const double* b, KIndex ldb, const KIndex* index,
                      const double* delta, KIndex count);
};

/// The copy for this CPU: AVX-512 where use_avx512_kernels() says so, else the ISA of the row
/// kernels' table (kernels(), so OBC_SIMD=generic applies too).
const RefineKernels& refine_kernels();
const RefineKernels& refine_kernels_generic();
const RefineKernels& refine_kernels_avx2();
const RefineKernels& refine_kernels_avx512();

}  // namespace obc::internal

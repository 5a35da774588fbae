// The blocked greedy's score of one block, w_B^T G_BB^-1 w_B, by a small float64 Cholesky.
// Included by kernels/row_kernels.cpp (compiled once per SIMD level) and by a ctest.
//
// One function for every block length, so that every candidate of a step is scored with the same
// rounding: a compile-time length (the common 2, 4, 8: unrolled, a fraction of the cost of
// run-time-length loops) and a run-time one (other lengths, and blocks shortened by entries
// pruned on entry) run the same operations in the same order. The rounding is that of the exact
// loss the chosen block then records (RowState::block_score: Eigen's LLT divides each column by
// its pivot and the forward substitution divides by the diagonal): dividing rather than
// multiplying by a reciprocal pivot agrees with it far more often (float64, random 4 x 4 blocks:
// bit-equal 61% against 40%) and is nearer the exact value when the two differ.
#pragma once

#include <cmath>
#include <vector>

#include "obc/types.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

namespace block_score_detail {

// The score with n = L when L > 0 (the compiler unrolls every loop), else n = len. g: n x n
// column-major, lower triangle read; factor: n * n doubles of scratch (column-major, lower
// triangle written), rhs: n doubles. False if G is not positive definite.
template <int L, class Scalar>
inline bool score(const Scalar* g, const Scalar* w, Index len, double* factor, double* rhs,
                  double& out) {
  const Index n = L > 0 ? L : len;
  for (Index j = 0; j < n; ++j)
    for (Index i = j; i < n; ++i) factor[i + j * n] = static_cast<double>(g[i + j * n]);
  for (Index j = 0; j < n; ++j) {
    double pivot = factor[j + j * n];
    for (Index t = 0; t < j; ++t) pivot -= factor[j + t * n] * factor[j + t * n];
    if (!(pivot > 0)) return false;
    pivot = std::sqrt(pivot);
    factor[j + j * n] = pivot;
    for (Index i = j + 1; i < n; ++i) {
      double v = factor[i + j * n];
      for (Index t = 0; t < j; ++t) v -= factor[i + t * n] * factor[j + t * n];
      factor[i + j * n] = v / pivot;
    }
  }
  out = 0;
  for (Index i = 0; i < n; ++i) {
    double v = static_cast<double>(w[i]);
    for (Index t = 0; t < i; ++t) v -= factor[i + t * n] * rhs[t];
    rhs[i] = v / factor[i + i * n];
    out += rhs[i] * rhs[i];
  }
  return true;
}

}  // namespace block_score_detail

/// OBS score w^T G^-1 w (float64) of a len x len block G (column-major, lower triangle read;
/// W's precision) and its len weights w, by a float64 Cholesky of G. Returns false (score
/// unspecified) if G is not positive definite. `scratch` is resized as needed (lengths other
/// than 2, 4 and 8 use it). The same bits for a given block whatever its length's code path.
template <class Scalar>
inline bool block_score(const Scalar* g, const Scalar* w, Index len, std::vector<double>& scratch,
                        double& score) {
  double factor[64], rhs[8];
  switch (len) {
    case 2:
      return block_score_detail::score<2>(g, w, len, factor, rhs, score);
    case 4:
      return block_score_detail::score<4>(g, w, len, factor, rhs, score);
    case 8:
      return block_score_detail::score<8>(g, w, len, factor, rhs, score);
    default:
      break;
  }
  scratch.resize(static_cast<size_t>(len * len + len));
  return block_score_detail::score<0>(g, w, len, scratch.data(), scratch.data() + len * len,
                                      score);
}

}  // namespace obc::OBC_KERNEL_NS

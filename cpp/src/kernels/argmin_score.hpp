// The greedy's choice over the picked inputs of a row: argmin of the OBS scores w_i^2 / d_i
// (pruning), and OBQ's choice with its outlier rule (quantization).
// Included by kernels/row_kernels.cpp, so it is compiled once per SIMD level; the AVX2 copy uses
// explicit vectors (GCC leaves the branchy scalar loop, and even a lane-split one, scalar: it was
// ~15% of a 576-input trace).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "obc/types.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

/// Index of the smallest w[i]^2 / d[i] among the i < n with pick[i] != 0 (ties: the lowest
/// index), or -1 if nothing is picked. Sets `bad` when a picked d[i] is not positive (the inverse
/// lost definiteness); the index is then meaningless. Pass 1 takes the minimum, pass 2 the first
/// index attaining it; both evaluate the score with the same IEEE operations (a product, then a
/// quotient, never contracted), so the result is the scalar loop's, bit for bit, at any SIMD
/// level.
template <class Scalar>
Index argmin_obs_score(const Scalar* w, const Scalar* d, const char* pick, Index n, bool& bad) {
  constexpr Scalar inf = std::numeric_limits<Scalar>::infinity();
  Scalar best = inf;
  int not_positive = 0;
  Index i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Scalar, float>) {
    const __m256 vinf = _mm256_set1_ps(inf), vzero = _mm256_setzero_ps();
    __m256 vmin = vinf, vbad = vzero;
    for (; i + 8 <= n; i += 8) {
      const __m256 wv = _mm256_loadu_ps(w + i), dv = _mm256_loadu_ps(d + i);
      const __m256 score = _mm256_div_ps(_mm256_mul_ps(wv, wv), dv);
      long long bytes;
      std::memcpy(&bytes, pick + i, 8);
      const __m256 picked = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256()));
      vmin = _mm256_min_ps(_mm256_blendv_ps(vinf, score, picked), vmin);
      vbad = _mm256_or_ps(vbad, _mm256_and_ps(picked, _mm256_cmp_ps(dv, vzero, _CMP_NGT_UQ)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmin);
    for (float v : lanes) best = v < best ? v : best;
    not_positive = _mm256_movemask_ps(vbad);
  } else {
    const __m256d vinf = _mm256_set1_pd(inf), vzero = _mm256_setzero_pd();
    __m256d vmin = vinf, vbad = vzero;
    for (; i + 4 <= n; i += 4) {
      const __m256d wv = _mm256_loadu_pd(w + i), dv = _mm256_loadu_pd(d + i);
      const __m256d score = _mm256_div_pd(_mm256_mul_pd(wv, wv), dv);
      int bytes;
      std::memcpy(&bytes, pick + i, 4);
      const __m256d picked = _mm256_castsi256_pd(_mm256_cmpgt_epi64(
          _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(bytes)), _mm256_setzero_si256()));
      vmin = _mm256_min_pd(_mm256_blendv_pd(vinf, score, picked), vmin);
      vbad = _mm256_or_pd(vbad, _mm256_and_pd(picked, _mm256_cmp_pd(dv, vzero, _CMP_NGT_UQ)));
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, vmin);
    for (double v : lanes) best = v < best ? v : best;
    not_positive = _mm256_movemask_pd(vbad);
  }
#endif
  for (; i < n; ++i) {
    if (!pick[i]) continue;
    not_positive |= !(d[i] > Scalar(0));
    const Scalar score = w[i] * w[i] / d[i];
    best = score < best ? score : best;
  }
  bad = not_positive != 0;
  if (bad) return -1;
  for (i = 0; i < n; ++i)
    if (pick[i] && w[i] * w[i] / d[i] == best) return i;
  return -1;
}

/// Outlier threshold t' in the row's own precision with (err2 > t') exactly when
/// double(err2) > t: t rounded down to the precision (no value of it lies in (t', t]).
template <class Scalar>
Scalar outlier_threshold(double t) {
  Scalar below = static_cast<Scalar>(t);
  if (static_cast<double>(below) > t)
    below = std::nextafter(below, -std::numeric_limits<Scalar>::infinity());
  return below;
}

/// OBQ's choice among the i < n with pick[i] != 0: err_i = w_i - q_i(w_i) on the grid of input
/// i (scale[i], zero point zero[i], codes 0..maxq, rounding half to even). If some err_i^2
/// exceeds threshold[i] (see outlier_threshold), the largest such err_i^2 (an outlier, fixed
/// first); otherwise the smallest err_i^2 / d_i. Ties: the lowest index; -1 if nothing is picked;
/// `bad` as for argmin_obs_score. scratch: 2 n values. Pass 1 stores every score and outlier
/// error, pass 2 finds the first index attaining the extreme in what was stored, so the two
/// passes agree whatever the SIMD path computed.
template <class Scalar>
Index obq_choice(const Scalar* w, const Scalar* d, const char* pick, const Scalar* scale,
                 const Scalar* zero, const Scalar* threshold, Scalar maxq, Index n,
                 Scalar* scratch, bool& bad) {
  constexpr Scalar inf = std::numeric_limits<Scalar>::infinity();
  Scalar* scores = scratch;           // inf where not picked
  Scalar* outlier_err = scratch + n;  // err^2 of picked outliers, -1 elsewhere
  Scalar best = inf, worst = -1;
  int not_positive = 0;
  Index i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Scalar, float>) {
    const __m256 vinf = _mm256_set1_ps(inf), vzero = _mm256_setzero_ps();
    const __m256 vminus = _mm256_set1_ps(-1.0f), vmaxq = _mm256_set1_ps(maxq);
    __m256 vbest = vinf, vworst = vminus, vbad = vzero;
    for (; i + 8 <= n; i += 8) {
      const __m256 wv = _mm256_loadu_ps(w + i), dv = _mm256_loadu_ps(d + i);
      const __m256 sc = _mm256_loadu_ps(scale + i), zp = _mm256_loadu_ps(zero + i);
      const __m256 rounded = _mm256_round_ps(_mm256_div_ps(wv, sc),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 code = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(rounded, zp), vzero), vmaxq);
      const __m256 err = _mm256_sub_ps(wv, _mm256_mul_ps(sc, _mm256_sub_ps(code, zp)));
      const __m256 err2 = _mm256_mul_ps(err, err);
      long long bytes;
      std::memcpy(&bytes, pick + i, 8);
      const __m256 picked = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)), _mm256_setzero_si256()));
      const __m256 score = _mm256_blendv_ps(vinf, _mm256_div_ps(err2, dv), picked);
      const __m256 outlier = _mm256_and_ps(
          picked, _mm256_cmp_ps(err2, _mm256_loadu_ps(threshold + i), _CMP_GT_OQ));
      const __m256 oerr = _mm256_blendv_ps(vminus, err2, outlier);
      _mm256_storeu_ps(scores + i, score);
      _mm256_storeu_ps(outlier_err + i, oerr);
      vbest = _mm256_min_ps(score, vbest);
      vworst = _mm256_max_ps(oerr, vworst);
      vbad = _mm256_or_ps(vbad, _mm256_and_ps(picked, _mm256_cmp_ps(dv, vzero, _CMP_NGT_UQ)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vbest);
    for (float v : lanes) best = v < best ? v : best;
    _mm256_store_ps(lanes, vworst);
    for (float v : lanes) worst = v > worst ? v : worst;
    not_positive = _mm256_movemask_ps(vbad);
  }
#endif
  for (; i < n; ++i) {
    scores[i] = inf;
    outlier_err[i] = -1;
    if (!pick[i]) continue;
    not_positive |= !(d[i] > Scalar(0));
    const Scalar code =
        std::clamp(std::nearbyint(w[i] / scale[i]) + zero[i], Scalar(0), maxq);
    const Scalar err = w[i] - scale[i] * (code - zero[i]);
    const Scalar err2 = err * err;
    scores[i] = err2 / d[i];
    best = scores[i] < best ? scores[i] : best;
    if (err2 > threshold[i]) {
      outlier_err[i] = err2;
      worst = err2 > worst ? err2 : worst;
    }
  }
  bad = not_positive != 0;
  if (bad) return -1;
  if (worst >= 0) {
    for (i = 0; i < n; ++i)
      if (outlier_err[i] == worst) return i;
  }
  for (i = 0; i < n; ++i)
    if (pick[i] && scores[i] == best) return i;
  return -1;
}

}  // namespace obc::OBC_KERNEL_NS

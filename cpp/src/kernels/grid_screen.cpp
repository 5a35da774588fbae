// The MSE grid fit's screening estimate (internal/grid_screen.hpp): every weight's
// (|q - w| / scale)^norm with a bounded relative error, summed in float64: in the AVX2 and
// AVX-512 copies from an exponent table and a mantissa polynomial (ScreenPow), elsewhere (and for
// u beyond the tables) by a logarithm and exponential series (pow_estimate). This
// file is compiled once per SIMD level like row_kernels.cpp: 4 lanes with SSE2 (part of x86-64),
// 8 lanes with FMA in the AVX2 copy, 16 in the AVX-512 copy (its own object library). It is
// built with -ffp-contract=off: q - w must be the very float the exact scan (GridPoint::quantize,
// then the difference) computes, never a fused multiply-subtract; the fused operations below are
// explicit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define OBC_SCREEN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define OBC_SCREEN_AVX2 1
#endif

#include "internal/grid_screen.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif
#ifndef OBC_GRID_SCREEN_TABLE
#define OBC_GRID_SCREEN_TABLE grid_screen_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

using internal::KIndex;
using internal::kScreenPolyDegree;
using internal::kScreenSmall;
using internal::ScreenPow;

// u^norm for u in [2^-20, 2^11], 1 <= norm <= 4, relative error below 1e-5: 2^(norm log2 u),
// log2 from the exponent and an odd series of ln on the mantissa in [0.75, 1.5), 2^f by a
// degree-9 Taylor polynomial. (Smaller u give some finite value, which the callers discard.)
inline float pow_estimate(float u, float norm) {
  std::uint32_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  int e = static_cast<int>(bits >> 23) - 127;
  std::uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  if (m > 1.5f) {
    m *= 0.5f;
    e += 1;
  }
  const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;  // |t| <= 0.2
  const float ln_m =
      2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  const float y = std::max(norm * (static_cast<float>(e) + ln_m * 1.44269504f), -126.0f);
  int k = static_cast<int>(y);
  if (static_cast<float>(k) > y) k -= 1;  // floor
  const float f = (y - static_cast<float>(k)) * 0.693147181f;  // in [0, ln 2)
  const float two_f =
      1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (
          1.0f / 720 + f * (1.0f / 5040 + f * (1.0f / 40320 + f * (1.0f / 362880)))))))));
  const std::uint32_t kbits = static_cast<std::uint32_t>(k + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &kbits, sizeof two_k);
  return two_f * two_k;
}

#if defined(__SSE2__)
// pow_estimate on 4 lanes, the same operations (SSE2 is part of x86-64).
inline __m128 pow_estimate4(__m128 u, __m128 norm) {
  const __m128i bits = _mm_castps_si128(u);
  __m128i e = _mm_sub_epi32(_mm_srli_epi32(bits, 23), _mm_set1_epi32(127));
  __m128 m = _mm_castsi128_ps(
      _mm_or_si128(_mm_and_si128(bits, _mm_set1_epi32(0x7fffff)), _mm_set1_epi32(0x3f800000)));
  const __m128 high = _mm_cmpgt_ps(m, _mm_set1_ps(1.5f));
  m = _mm_sub_ps(m, _mm_and_ps(high, _mm_mul_ps(m, _mm_set1_ps(0.5f))));  // m - m/2 is exact
  e = _mm_sub_epi32(e, _mm_castps_si128(high));                           // the mask is -1
  const __m128 one = _mm_set1_ps(1.0f);
  const __m128 t = _mm_div_ps(_mm_sub_ps(m, one), _mm_add_ps(m, one)), t2 = _mm_mul_ps(t, t);
  __m128 series = _mm_set1_ps(1.0f / 9);
  for (const float c : {1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f})
    series = _mm_add_ps(_mm_set1_ps(c), _mm_mul_ps(t2, series));
  const __m128 ln_m = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(2.0f), t), series);
  const __m128 y = _mm_max_ps(
      _mm_mul_ps(norm, _mm_add_ps(_mm_cvtepi32_ps(e), _mm_mul_ps(ln_m, _mm_set1_ps(1.44269504f)))),
      _mm_set1_ps(-126.0f));
  __m128i k = _mm_cvttps_epi32(y);
  k = _mm_add_epi32(k, _mm_castps_si128(_mm_cmpgt_ps(_mm_cvtepi32_ps(k), y)));  // floor
  const __m128 f = _mm_mul_ps(_mm_sub_ps(y, _mm_cvtepi32_ps(k)), _mm_set1_ps(0.693147181f));
  __m128 two_f = _mm_set1_ps(1.0f / 362880);
  for (const float c : {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6,
                        0.5f, 1.0f, 1.0f})
    two_f = _mm_add_ps(_mm_set1_ps(c), _mm_mul_ps(f, two_f));
  const __m128 two_k =
      _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(k, _mm_set1_epi32(127)), 23));
  return _mm_mul_ps(two_f, two_k);
}
#endif

#if defined(OBC_SCREEN_AVX2)
// pow_estimate on 8 lanes: the same logarithm, its series by fused multiply-adds (only more
// accurate than the bound needs); 2^y = 2^k 2^f with k = round(y), f in [-1/2, 1/2] and 2^f by
// its Taylor series in f (terms (ln 2)^n / n!) to degree 7: truncation below 1e-8 relative.
inline __m256 pow_estimate8(__m256 u, __m256 norm) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 high = _mm256_cmp_ps(m, _mm256_set1_ps(1.5f), _CMP_GT_OQ);
  m = _mm256_sub_ps(m, _mm256_and_ps(high, _mm256_mul_ps(m, _mm256_set1_ps(0.5f))));  // exact
  e = _mm256_sub_epi32(e, _mm256_castps_si256(high));                                 // mask -1
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  const __m256 t2 = _mm256_mul_ps(t, t);
  __m256 series = _mm256_set1_ps(1.0f / 9);
  for (const float c : {1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f})
    series = _mm256_fmadd_ps(t2, series, _mm256_set1_ps(c));
  const __m256 ln_m = _mm256_mul_ps(_mm256_add_ps(t, t), series);
  const __m256 y = _mm256_max_ps(
      _mm256_mul_ps(norm,
                    _mm256_fmadd_ps(ln_m, _mm256_set1_ps(1.44269504f), _mm256_cvtepi32_ps(e))),
      _mm256_set1_ps(-126.0f));
  const __m256 k = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, k);
  __m256 two_f = _mm256_set1_ps(1.5252734e-5f);  // (ln 2)^7 / 7!
  for (const float c : {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f,
                        2.4022651e-1f, 6.9314718e-1f, 1.0f})
    two_f = _mm256_fmadd_ps(f, two_f, _mm256_set1_ps(c));
  const __m256 two_k = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(two_f, two_k);
}
#endif

#if defined(OBC_SCREEN_AVX512)
// pow_estimate on 16 lanes with AVX-512's own pieces: getmant/getexp split u = m 2^e with m in
// [0.75, 1.5) exactly (the same split as above), a reciprocal estimate refined by one Newton step
// replaces the division in t (relative error ~1e-8, far below the bound), and scalef applies 2^k.
inline __m512 pow_estimate16(__m512 u, __m512 norm) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  // getexp is floor(log2 u); a mantissa folded below 1 belongs to the next exponent.
  __m512 e = _mm512_getexp_ps(u);
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), e, one);
  const __m512 den = _mm512_add_ps(m, one);
  __m512 inv = _mm512_rcp14_ps(den);  // relative error < 2^-14; one Newton step: < 2^-27
  inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.0f)));
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(m, one), inv);
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 series = _mm512_set1_ps(1.0f / 9);
  for (const float c : {1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f})
    series = _mm512_fmadd_ps(t2, series, _mm512_set1_ps(c));
  const __m512 ln_m = _mm512_mul_ps(_mm512_add_ps(t, t), series);
  const __m512 y = _mm512_max_ps(
      _mm512_mul_ps(norm, _mm512_fmadd_ps(ln_m, _mm512_set1_ps(1.44269504f), e)),
      _mm512_set1_ps(-126.0f));
  // 2^y = 2^k 2^f with k = round(y), f in [-1/2, 1/2]: 2^f by its Taylor series in f (terms
  // (ln 2)^n / n!) to degree 7, truncation below 1e-9 relative.
  const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, k);
  __m512 two_f = _mm512_set1_ps(1.5252734e-5f);  // (ln 2)^7 / 7!
  for (const float c : {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f,
                        2.4022651e-1f, 6.9314718e-1f, 1.0f})
    two_f = _mm512_fmadd_ps(f, two_f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(two_f, k);
}
#endif

// u^norm estimates of w[0, len) into terms (0 where u < kScreenSmall), u = |q(w) - w| / scale; returns
// how many were below kScreenSmall. The rounding is GridPoint::quantize's: for |x| < 2^22,
// (x + 1.5 2^23) - 1.5 2^23 is x rounded half to even, and larger |x| is clamped to the same end
// code either way; q - w is then the very float the exact sum raises to norm.
inline KIndex estimate_terms(const float* w, KIndex len, float scale, float zero, float maxq,
                             float norm, float* terms) {
  const float inv_scale = 1.0f / scale;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  KIndex j = 0, n_small = 0;
#if defined(__SSE2__)
  const __m128 v_scale = _mm_set1_ps(scale), v_inv = _mm_set1_ps(inv_scale);
  const __m128 v_zero = _mm_set1_ps(zero), v_maxq = _mm_set1_ps(maxq);
  const __m128 v_round = _mm_set1_ps(kRound), v_small = _mm_set1_ps(kScreenSmall);
  const __m128 v_norm = _mm_set1_ps(norm), sign = _mm_set1_ps(-0.0f);
  __m128i count = _mm_setzero_si128();
  for (; j + 4 <= len; j += 4) {
    const __m128 wv = _mm_loadu_ps(w + j);
    const __m128 r = _mm_sub_ps(_mm_add_ps(_mm_div_ps(wv, v_scale), v_round), v_round);
    const __m128 c = _mm_min_ps(_mm_max_ps(_mm_add_ps(r, v_zero), _mm_setzero_ps()), v_maxq);
    const __m128 d = _mm_sub_ps(_mm_mul_ps(v_scale, _mm_sub_ps(c, v_zero)), wv);
    const __m128 u = _mm_mul_ps(_mm_andnot_ps(sign, d), v_inv);
    const __m128 tiny = _mm_cmplt_ps(u, v_small);
    count = _mm_sub_epi32(count, _mm_castps_si128(tiny));
    _mm_storeu_ps(terms + j, _mm_andnot_ps(tiny, pow_estimate4(u, v_norm)));
  }
  alignas(16) std::int32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), count);
  n_small = static_cast<KIndex>(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; j < len; ++j) {
    const float x = w[j] / scale;
    const float r = (x + kRound) - kRound;
    const float c = std::min(std::max(r + zero, 0.0f), maxq);
    const float u = std::abs(scale * (c - zero) - w[j]) * inv_scale;
    const bool tiny = u < kScreenSmall;
    n_small += tiny ? 1 : 0;
    terms[j] = tiny ? 0.0f : pow_estimate(u, norm);
  }
  return n_small;
}

// Whether the table estimate (ScreenPow) may be used for this grid: its tables are fitted and
// every u lies in their range. |w| / scale <= amax / scale =: X, and u <= X + maxq (q within the
// grid's codes), so u < 2^11 when X + maxq < 2^11; the screen's grids have X <= 255 / 0.21.
inline bool table_applies(const ScreenPow& pw, float scale, int max_code, float amax) {
  return pw.usable &&
         static_cast<double>(amax) / static_cast<double>(scale) + max_code < 2048.0;
}

// The rounding x -> round_half_even(w / scale) by a product with 1 / scale instead of the
// division (~10x the cost of a product): x = w * (1 / scale) is within 3 2^-24 |x| of the
// division's float (each within one rounding of w / scale, 1 / scale one more), so the two
// round to the same integer unless a half-integer lies that close to x. A lane with
// | |x - round(x)| - 1/2 | <= tie_tol, tie_tol = 2^-20 X >= 16 2^-24 |x| (X = amax / scale),
// redoes its vector with the division: the codes are GridPoint::quantize's in every case.
// (Near such a tie both codes leave |q - w| ~ scale / 2, but apart by up to 12 2^-24 X
// relative: more than the estimate's error budget for long grids, so the codes must agree.)
inline float tie_limit(float scale, float amax) {
  return static_cast<float>(0.5 - static_cast<double>(amax) / static_cast<double>(scale) * 0x1p-20);
}

#if defined(OBC_SCREEN_AVX512)
// u^norm by the tables (ScreenPow): u = 2^e m, 2^(e norm) = exp32[(e + 127) & 31] (the
// permute reads the low 5 bits of u's biased exponent), m^norm by the polynomial in m - 1.5.
// u in [2^-20, 2^12) (smaller u: the callers discard the lane).
inline __m512 table_pow16(__m512 u, __m512 tab_lo, __m512 tab_hi, const __m512* coef) {
  const __m512i biased = _mm512_srli_epi32(_mm512_castps_si512(u), 23);
  const __m512 two_en = _mm512_permutex2var_ps(tab_lo, biased, tab_hi);
  const __m512 t = _mm512_sub_ps(_mm512_getmant_ps(u, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero),
                                 _mm512_set1_ps(1.5f));
  __m512 p = coef[kScreenPolyDegree];
  for (int k = kScreenPolyDegree - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, t, coef[k]);
  return _mm512_mul_ps(p, two_en);
}

// The screening loop of the 16-lane kernels, for float32 and float64 weights alike: they differ
// only in how a vector of u = |q - w| / scale is made, u_at(j, live) for terms j.. (lanes
// outside `live` may hold anything: they are neither summed nor counted).
template <bool kTable, class UAt>
inline double screen_sum16(KIndex len, const UAt& u_at, const ScreenPow& pw, double stop_above,
                           KIndex* small, bool* complete, double* margin) {
  // Terms between two comparisons with stop_above: short enough that a hopeless shrink factor
  // of a 128-group stops after a quarter of it, long enough that the comparisons stay cheap.
  constexpr KIndex kBlock = 32;
  // 16 lanes, a block's two vectors added in float32, then into two fixed sets of 8 float64
  // lanes (the same sum on every run); the last partial vector of a block has its unused lanes
  // neither summed nor counted.
  const __m512 v_small = _mm512_set1_ps(kScreenSmall), v_norm = _mm512_set1_ps(pw.norm);
  __m512 coef[kScreenPolyDegree + 1];
  for (int k = 0; k <= kScreenPolyDegree; ++k) coef[k] = _mm512_set1_ps(pw.coef[k]);
  const __m512 tab_lo = _mm512_loadu_ps(pw.exp32), tab_hi = _mm512_loadu_ps(pw.exp32 + 16);
  __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
  KIndex n_small = 0;
  *small = 0;
  *complete = false;
  *margin = kTable ? internal::kScreenTableMargin : internal::kScreenMargin;
  const auto total = [&] { return _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi)); };
  // The comparison (a horizontal sum) every check_every blocks: in rows longer than 512, every
  // 128 terms (a quarter of the loop's operations at every 32; a stopping candidate reads ~48
  // more terms of thousands); groups keep 32, so that a hopeless 128-group can stop early.
  const KIndex check_every = len > 512 ? 4 : 1;
  KIndex blocks = 0;
  for (KIndex j0 = 0; j0 < len; j0 += kBlock) {
    const KIndex end = std::min(len, j0 + kBlock);
    __m512 block_sum = _mm512_setzero_ps();  // two vectors' terms: float32 adds, error 2^-24
    for (KIndex j = j0; j < end; j += 16) {
      const __mmask16 live =
          end - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - j)) - 1u);
      const __m512 u = u_at(j, live);
      const __mmask16 tiny = _mm512_cmp_ps_mask(u, v_small, _CMP_LT_OQ);
      n_small += __builtin_popcount(static_cast<unsigned>(tiny & live));
      const __m512 term =
          kTable ? table_pow16(u, tab_lo, tab_hi, coef) : pow_estimate16(u, v_norm);
      block_sum = _mm512_mask_add_ps(block_sum, live & ~tiny, block_sum, term);
    }
    sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(block_sum)));
    sum_hi = _mm512_add_pd(sum_hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(block_sum, 1)));
    if (end < len && ++blocks % check_every == 0 && total() > stop_above) {
      *small = n_small;
      return total();
    }
  }
  *small = n_small;
  *complete = true;
  return total();
}

template <bool kTable>
double scaled_error16(const float* w, KIndex len, float scale, int zero_point, int max_code,
                      const ScreenPow& pw, float amax, double stop_above, KIndex* small,
                      bool* complete, double* margin) {
  // Lanes outside `live` load as zeros. c - zero is clamp(round(x), -zero, maxq - zero):
  // integers below 2^12, the same value as GridPoint's clamp(round(x) + zero, 0, maxq) - zero.
  const float zero = static_cast<float>(zero_point), maxq = static_cast<float>(max_code);
  const __m512 v_scale = _mm512_set1_ps(scale), v_inv = _mm512_set1_ps(1.0f / scale);
  const __m512 v_lo = _mm512_set1_ps(-zero), v_hi = _mm512_set1_ps(maxq - zero);
  const __m512 v_tie = _mm512_set1_ps(kTable ? tie_limit(scale, amax) : 0.0f);
  const auto u_at = [=](KIndex j, __mmask16 live) {
    const __m512 wv = _mm512_maskz_loadu_ps(live, w + j);
    __m512 r;
    if constexpr (kTable) {
      const __m512 x = _mm512_mul_ps(wv, v_inv);
      r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (_mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(x, r)), v_tie, _CMP_GT_OQ) != 0)
        r = _mm512_roundscale_ps(_mm512_div_ps(wv, v_scale),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      r = _mm512_roundscale_ps(_mm512_div_ps(wv, v_scale),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512 cz = _mm512_min_ps(_mm512_max_ps(r, v_lo), v_hi);
    const __m512 d = _mm512_sub_ps(_mm512_mul_ps(v_scale, cz), wv);
    return _mm512_mul_ps(_mm512_abs_ps(d), v_inv);
  };
  return screen_sum16<kTable>(len, u_at, pw, stop_above, small, complete, margin);
}
#endif

#if defined(OBC_SCREEN_AVX2)
// u^norm by the tables on 8 lanes: b = u's biased exponent, 2^(e norm) = exp_lo[b & 7] *
// exp_hi[(b >> 3) & 7] (two 8-entry permutes, which read the low 3 bits), m^norm by the
// polynomial in m - 1.5 (m from u's mantissa bits with exponent 0).
inline __m256 table_pow8(__m256 u, __m256 tab_lo, __m256 tab_hi, const __m256* coef) {
  const __m256i bits = _mm256_castps_si256(u);
  const __m256i biased = _mm256_srli_epi32(bits, 23);
  const __m256 two_en =
      _mm256_mul_ps(_mm256_permutevar8x32_ps(tab_lo, biased),
                    _mm256_permutevar8x32_ps(tab_hi, _mm256_srli_epi32(biased, 3)));
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.5f));
  __m256 p = coef[kScreenPolyDegree];
  for (int k = kScreenPolyDegree - 1; k >= 0; --k) p = _mm256_fmadd_ps(p, t, coef[k]);
  return _mm256_mul_ps(p, two_en);
}

// The screening loop of the 8-lane kernels, for float32 and float64 weights alike: u_at(j, end)
// gives the vector of u = |q - w| / scale for terms j.. . A block's last partial vector comes
// from a copy padded with zeros: those lanes have q - w = 0, u below kScreenSmall, so they add
// nothing and are taken off the small count at the end.
template <bool kTable, class UAt>
inline double screen_sum8(KIndex len, const UAt& u_at, const ScreenPow& pw, double stop_above,
                          KIndex* small, bool* complete, double* margin) {
  constexpr KIndex kBlock = 32;  // terms between two comparisons with stop_above (see above)
  // A block's terms added in 8 float32 lanes, then into 8 float64 lanes (fixed: the same sum on
  // every run).
  const __m256 v_small = _mm256_set1_ps(kScreenSmall), v_norm = _mm256_set1_ps(pw.norm);
  __m256 coef[kScreenPolyDegree + 1];
  for (int k = 0; k <= kScreenPolyDegree; ++k) coef[k] = _mm256_set1_ps(pw.coef[k]);
  const __m256 tab_lo = _mm256_loadu_ps(pw.exp_lo), tab_hi = _mm256_loadu_ps(pw.exp_hi);
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  __m256i count = _mm256_setzero_si256();
  KIndex padding = 0;  // zero lanes of padded tail vectors, counted in `count`
  *small = 0;
  *complete = false;
  *margin = kTable ? internal::kScreenTableMargin : internal::kScreenMargin;
  const auto total = [&] {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(sum_lo, sum_hi));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  };
  const auto count_small = [&] {
    alignas(32) std::int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), count);
    for (const std::int32_t l : lanes) *small += l;
    *small -= padding;
  };
  const KIndex check_every = len > 512 ? 4 : 1;  // as in screen_sum16
  KIndex blocks = 0;
  for (KIndex j0 = 0; j0 < len; j0 += kBlock) {
    const KIndex end = std::min(len, j0 + kBlock);
    __m256 block_sum = _mm256_setzero_ps();  // the block's terms: float32 adds, error <= 2^-22
    for (KIndex j = j0; j < end; j += 8) {
      if (end - j < 8) padding += 8 - (end - j);
      const __m256 u = u_at(j, end);
      const __m256 tiny = _mm256_cmp_ps(u, v_small, _CMP_LT_OQ);
      count = _mm256_sub_epi32(count, _mm256_castps_si256(tiny));
      const __m256 term =
          kTable ? table_pow8(u, tab_lo, tab_hi, coef) : pow_estimate8(u, v_norm);
      block_sum = _mm256_add_ps(block_sum, _mm256_andnot_ps(tiny, term));
    }
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(block_sum)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(block_sum, 1)));
    if (end < len && ++blocks % check_every == 0 && total() > stop_above) {
      count_small();
      return total();
    }
  }
  count_small();
  *complete = true;
  return total();
}

template <bool kTable>
double scaled_error8(const float* w, KIndex len, float scale, int zero_point, int max_code,
                     const ScreenPow& pw, float amax, double stop_above, KIndex* small,
                     bool* complete, double* margin) {
  // Codes as in scaled_error16 (round half to even, clamp: GridPoint::quantize's).
  const float zero = static_cast<float>(zero_point), maxq = static_cast<float>(max_code);
  const __m256 v_scale = _mm256_set1_ps(scale), v_inv = _mm256_set1_ps(1.0f / scale);
  const __m256 v_lo = _mm256_set1_ps(-zero), v_hi = _mm256_set1_ps(maxq - zero);
  const __m256 v_tie = _mm256_set1_ps(kTable ? tie_limit(scale, amax) : 0.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const auto u_at = [=](KIndex j, KIndex end) {
    __m256 wv;
    if (j + 8 <= end) {
      wv = _mm256_loadu_ps(w + j);
    } else {  // zero padding (see screen_sum8)
      alignas(32) float padded[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(padded, w + j, sizeof(float) * static_cast<size_t>(end - j));
      wv = _mm256_load_ps(padded);
    }
    __m256 r;
    if constexpr (kTable) {
      const __m256 x = _mm256_mul_ps(wv, v_inv);
      r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 off = _mm256_andnot_ps(sign, _mm256_sub_ps(x, r));
      if (_mm256_movemask_ps(_mm256_cmp_ps(off, v_tie, _CMP_GT_OQ)) != 0)
        r = _mm256_round_ps(_mm256_div_ps(wv, v_scale),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      r = _mm256_round_ps(_mm256_div_ps(wv, v_scale),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m256 cz = _mm256_min_ps(_mm256_max_ps(r, v_lo), v_hi);
    const __m256 d = _mm256_sub_ps(_mm256_mul_ps(v_scale, cz), wv);
    return _mm256_mul_ps(_mm256_andnot_ps(sign, d), v_inv);
  };
  return screen_sum8<kTable>(len, u_at, pw, stop_above, small, complete, margin);
}
#endif

double scaled_error(const float* w, KIndex len, float scale, int zero_point, int max_code,
                    const ScreenPow& pw, float amax, double stop_above, KIndex* small,
                    bool* complete, double* margin) {
#if defined(OBC_SCREEN_AVX512)
  return table_applies(pw, scale, max_code, amax)
             ? scaled_error16<true>(w, len, scale, zero_point, max_code, pw, amax, stop_above,
                                    small, complete, margin)
             : scaled_error16<false>(w, len, scale, zero_point, max_code, pw, amax, stop_above,
                                     small, complete, margin);
#elif defined(OBC_SCREEN_AVX2)
  return table_applies(pw, scale, max_code, amax)
             ? scaled_error8<true>(w, len, scale, zero_point, max_code, pw, amax, stop_above,
                                   small, complete, margin)
             : scaled_error8<false>(w, len, scale, zero_point, max_code, pw, amax, stop_above,
                                    small, complete, margin);
#else
  // The generic copy keeps the general estimate (logarithm and exponential per term).
  (void)amax;
  constexpr KIndex kBlock = 32;  // terms between two comparisons with stop_above
  const float zero = static_cast<float>(zero_point), maxq = static_cast<float>(max_code);
  const float norm = pw.norm;
  *small = 0;
  *complete = false;
  *margin = internal::kScreenMargin;
  float terms[kBlock];
  double sum[4] = {0, 0, 0, 0};  // fixed lanes: the same sum on every run
  for (KIndex j0 = 0; j0 < len; j0 += kBlock) {
    const KIndex n = std::min(kBlock, len - j0);
    *small += estimate_terms(w + j0, n, scale, zero, maxq, norm, terms);
    KIndex j = 0;
    for (; j + 4 <= n; j += 4)
      for (int l = 0; l < 4; ++l) sum[l] += static_cast<double>(terms[j + l]);
    for (; j < n; ++j) sum[0] += static_cast<double>(terms[j]);
    const double total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    if (total > stop_above && j0 + n < len) return total;
  }
  *complete = true;
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
#endif
}

// float64 weights (scaled_error_f64). Each term's u = |q - w| / scale is computed in double with
// GridPoint<double>'s code and difference, then rounded to float once (relative error 2^-24, so
// u^norm within norm 2^-24 <= 2.4e-7: inside either margin, see grid_screen.hpp) and estimated
// by the float machinery above; the sums are screen_sum16 / 8's. The code's rounding is by a
// product with 1 / scale as in tie_limit, with double's tolerance: x = w * (1 / scale) is within
// 3 2^-53 |x| of the division's double, so a lane with | |x - round(x)| - 1/2 | <= 2^-48 X
// (X = amax / scale >= |x|) redoes its vector with the division, and the codes are always
// GridPoint<double>::code's. Clamped lanes (|x| beyond the grid) take the same end code either way.
// (Unlike float32, a code flipped at such a tie would move |q - w| by only ~2^-49 X <= 3e-12
// relative, far inside the bound (X <= ~1300 for the fit's grids): the redo is not what keeps the
// estimate in its bound, only what keeps the codes identical; it costs one compare per vector.)
inline double tie_limit_f64(double scale, double amax) { return 0.5 - amax / scale * 0x1p-48; }

// The scalar u of one float64 weight: GridPoint<double>::quantize's code (w / scale rounded half
// to even by adding and subtracting 1.5 2^52, exact below 2^51; larger quotients are integers
// already), clamp, scale * (code - zero) - w, then |.| / scale in double (a product with
// inv_scale: 2 roundings, far inside the float rounding after it).
inline float scaled_u_f64(double w, double scale, double inv_scale, double zero, double maxq) {
  const double x = w / scale;
  const double r = std::abs(x) < 0x1p51 ? (x + 0x1.8p52) - 0x1.8p52 : x;
  const double cz = std::min(std::max(r, -zero), maxq - zero);
  return static_cast<float>(std::abs(scale * cz - w) * inv_scale);
}

#if defined(OBC_SCREEN_AVX512)
template <bool kTable>
double scaled_error_f64_16(const double* w, KIndex len, double scale, int zero_point,
                           int max_code, const ScreenPow& pw, double amax, double stop_above,
                           KIndex* small, bool* complete, double* margin) {
  // 16 terms per vector as in scaled_error16: two sets of 8 double lanes give the u's, rounded
  // to float and joined into one float vector.
  const double zero = static_cast<double>(zero_point), maxq = static_cast<double>(max_code);
  const __m512d v_scale = _mm512_set1_pd(scale), v_inv = _mm512_set1_pd(1.0 / scale);
  const __m512d v_lo = _mm512_set1_pd(-zero), v_hi = _mm512_set1_pd(maxq - zero);
  const __m512d v_tie = _mm512_set1_pd(tie_limit_f64(scale, amax));
  const auto u_of = [=](__mmask8 live, const double* at) -> __m256 {
    const __m512d wv = _mm512_maskz_loadu_pd(live, at);
    const __m512d x = _mm512_mul_pd(wv, v_inv);
    __m512d r = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (_mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_sub_pd(x, r)), v_tie, _CMP_GT_OQ) != 0)
      r = _mm512_roundscale_pd(_mm512_div_pd(wv, v_scale),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512d cz = _mm512_min_pd(_mm512_max_pd(r, v_lo), v_hi);
    const __m512d d = _mm512_sub_pd(_mm512_mul_pd(v_scale, cz), wv);
    return _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_abs_pd(d), v_inv));
  };
  const auto u_at = [=](KIndex j, __mmask16 live) {
    const __m256 u_lo = u_of(static_cast<__mmask8>(live & 0xff), w + j);
    const __m256 u_hi = u_of(static_cast<__mmask8>(live >> 8), w + j + 8);
    return _mm512_insertf32x8(_mm512_castps256_ps512(u_lo), u_hi, 1);
  };
  return screen_sum16<kTable>(len, u_at, pw, stop_above, small, complete, margin);
}
#endif

#if defined(OBC_SCREEN_AVX2)
template <bool kTable>
double scaled_error_f64_8(const double* w, KIndex len, double scale, int zero_point, int max_code,
                          const ScreenPow& pw, double amax, double stop_above, KIndex* small,
                          bool* complete, double* margin) {
  // 8 terms per vector as in scaled_error8: two sets of 4 double lanes give the u's.
  const double zero = static_cast<double>(zero_point), maxq = static_cast<double>(max_code);
  const __m256d v_scale = _mm256_set1_pd(scale), v_inv = _mm256_set1_pd(1.0 / scale);
  const __m256d v_lo = _mm256_set1_pd(-zero), v_hi = _mm256_set1_pd(maxq - zero);
  const __m256d v_tie = _mm256_set1_pd(tie_limit_f64(scale, amax));
  const __m256d sign_d = _mm256_set1_pd(-0.0);
  const auto u_of = [=](__m256d wv) -> __m128 {
    const __m256d x = _mm256_mul_pd(wv, v_inv);
    __m256d r = _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256d off = _mm256_andnot_pd(sign_d, _mm256_sub_pd(x, r));
    if (_mm256_movemask_pd(_mm256_cmp_pd(off, v_tie, _CMP_GT_OQ)) != 0)
      r = _mm256_round_pd(_mm256_div_pd(wv, v_scale),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256d cz = _mm256_min_pd(_mm256_max_pd(r, v_lo), v_hi);
    const __m256d d = _mm256_sub_pd(_mm256_mul_pd(v_scale, cz), wv);
    return _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_andnot_pd(sign_d, d), v_inv));
  };
  const auto u_at = [=](KIndex j, KIndex end) {
    __m256d w_lo, w_hi;
    if (j + 8 <= end) {
      w_lo = _mm256_loadu_pd(w + j);
      w_hi = _mm256_loadu_pd(w + j + 4);
    } else {  // zero padding (see screen_sum8)
      alignas(32) double padded[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(padded, w + j, sizeof(double) * static_cast<size_t>(end - j));
      w_lo = _mm256_load_pd(padded);
      w_hi = _mm256_load_pd(padded + 4);
    }
    return _mm256_set_m128(u_of(w_hi), u_of(w_lo));
  };
  return screen_sum8<kTable>(len, u_at, pw, stop_above, small, complete, margin);
}
#endif

double scaled_error_f64(const double* w, KIndex len, double scale, int zero_point, int max_code,
                        const ScreenPow& pw, double amax, double stop_above, KIndex* small,
                        bool* complete, double* margin) {
#if defined(OBC_SCREEN_AVX512)
  return table_applies(pw, static_cast<float>(scale), max_code, static_cast<float>(amax))
             ? scaled_error_f64_16<true>(w, len, scale, zero_point, max_code, pw, amax,
                                         stop_above, small, complete, margin)
             : scaled_error_f64_16<false>(w, len, scale, zero_point, max_code, pw, amax,
                                          stop_above, small, complete, margin);
#elif defined(OBC_SCREEN_AVX2)
  return table_applies(pw, static_cast<float>(scale), max_code, static_cast<float>(amax))
             ? scaled_error_f64_8<true>(w, len, scale, zero_point, max_code, pw, amax,
                                        stop_above, small, complete, margin)
             : scaled_error_f64_8<false>(w, len, scale, zero_point, max_code, pw, amax,
                                         stop_above, small, complete, margin);
#else
  // The generic copy: scalar u's, the general estimate per term, summed as the float32 one.
  (void)amax;
  constexpr KIndex kBlock = 32;  // terms between two comparisons with stop_above
  const double zero = static_cast<double>(zero_point), maxq = static_cast<double>(max_code);
  const double inv_scale = 1.0 / scale;
  const float norm = pw.norm;
  *small = 0;
  *complete = false;
  *margin = internal::kScreenMargin;
  float terms[kBlock];
  double sum[4] = {0, 0, 0, 0};  // fixed lanes: the same sum on every run
  for (KIndex j0 = 0; j0 < len; j0 += kBlock) {
    const KIndex n = std::min(kBlock, len - j0);
    for (KIndex j = 0; j < n; ++j) {
      const float u = scaled_u_f64(w[j0 + j], scale, inv_scale, zero, maxq);
      const bool tiny = u < kScreenSmall;
      *small += tiny ? 1 : 0;
      terms[j] = tiny ? 0.0f : pow_estimate(u, norm);
    }
    KIndex j = 0;
    for (; j + 4 <= n; j += 4)
      for (int l = 0; l < 4; ++l) sum[l] += static_cast<double>(terms[j + l]);
    for (; j < n; ++j) sum[0] += static_cast<double>(terms[j]);
    const double total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    if (total > stop_above && j0 + n < len) return total;
  }
  *complete = true;
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
#endif
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const GridScreenKernels& OBC_GRID_SCREEN_TABLE() {
  static const GridScreenKernels table{&OBC_KERNEL_NS::scaled_error,
                                       &OBC_KERNEL_NS::scaled_error_f64};
  return table;
}

}  // namespace obc::internal

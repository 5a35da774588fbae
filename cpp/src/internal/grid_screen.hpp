// Plain interface of the MSE grid fit's screening estimate (see fit_grid in quant.cpp), so that
// it is compiled once per SIMD level like the row kernels (kernels/grid_screen.cpp) and picked
// with them at run time: 16 lanes with AVX-512, 8 with AVX2+FMA, 4 with SSE2.
#pragma once

#include "internal/row_kernels.hpp"

namespace obc::internal {

/// Relative error bound the screening uses for its general estimates (logarithm and
/// exponential per term, the generic copy's; within ~2.3e-6 measured, 2e-5 asserted).
constexpr double kScreenMargin = 1e-4;
/// The same for the table estimates (ScreenPow) of the AVX2 / AVX-512 copies: within ~6e-7
/// measured, 2e-6 asserted, plus the scale^norm factor's ~5e-7 (the fit's ScalePow).
constexpr double kScreenTableMargin = 1e-5;
/// |q - w| / scale below this: the term is estimated as 0 (and counted, see scaled_error).
constexpr float kScreenSmall = 0x1p-20f;
/// Degree of the screen's polynomial for m^norm, m in [1, 2) (ScreenPow).
constexpr int kScreenPolyDegree = 6;

/// u^norm for one norm as the AVX2 / AVX-512 copies compute it: u = 2^e m with m in [1, 2)
/// (exponent and mantissa bits of the float), 2^(e norm) from a table indexed by e's bits and
/// m^norm by a polynomial in m - 1.5, so no logarithm or exponential per term. Made once per
/// norm by make_screen_pow (coefficients fitted in double, rounded to float, the float Horner
/// sum's relative error measured against std::pow).
struct ScreenPow {
  float norm = 2.4f;
  /// The norm as given (norm above is its float).
  double norm_exact = 2.4;
  /// kScreenSmall^norm.
  double small_term = 0;
  /// (1 - i / 100)^norm for the MSE search's 80 shrink factors (fit_grid's scale^norm).
  double shrink_pow[80] = {};
  /// m^norm ~ sum_k coef[k] (m - 1.5)^k on [1, 2), evaluated by fused multiply-adds.
  float coef[kScreenPolyDegree + 1] = {};
  /// [(e + 127) & 31] = 2^(e norm) for e in [-20, 11] (u in [2^-20, 2^12): AVX-512's one
  /// 32-entry permute).
  float exp32[32] = {};
  /// AVX2 (8-entry permutes): with b = e + 127, 2^(e norm) = exp_lo[b & 7] * exp_hi[(b >> 3) & 7]
  /// for e in [-23, 16]: exp_lo[l] = 2^(l norm), exp_hi[h & 7] = 2^((8 h - 127) norm), h 13..17.
  float exp_lo[8] = {}, exp_hi[8] = {};
  /// Largest relative error of the float polynomial against std::pow(m, norm) on a dense grid of
  /// [1, 2] (including the table's and the product's roundings: 3 2^-24 added).
  double max_rel_error = 1.0;
  /// Whether the tables are used: a norm in [1, 4] and max_rel_error <= 1e-6. Otherwise every
  /// copy takes its general estimate (logarithm and exponential).
  bool usable = false;
};

/// The ScreenPow of `norm` (the last few norms' are cached; thread-safe).
ScreenPow make_screen_pow(double norm);

struct GridScreenKernels {
  /// Estimate of sum_j (|q(w_j) - w_j| / scale)^norm over w[0, len) (float32 weights; 1 <= norm
  /// <= 4; scale, 1 / scale in [2^-80, 2^80]; amax >= max_j |w_j|) on the grid (scale, zero,
  /// maxq), q rounding as GridPoint<float>::quantize (the difference q - w is that very float),
  /// each term within ~1e-5 relative of its exact value or 0 where it is below kScreenSmall^norm.
  /// *small: how many terms were set to 0. Stops early once the partial sum exceeds stop_above
  /// (the terms are >= 0), returning that partial sum with *complete = false; else *complete =
  /// true. `pw` (of the same norm) selects the table estimate where pw.usable (and every u
  /// lies in the tables' range); *margin: the relative error bound of the estimate taken,
  /// kScreenTableMargin or kScreenMargin (always <= kScreenMargin).
  double (*scaled_error)(const float* w, KIndex len, float scale, int zero, int maxq,
                         const ScreenPow& pw, float amax, double stop_above, KIndex* small,
                         bool* complete, double* margin);
  /// The same estimate for float64 weights (the float64 MSE fit): q and q - w computed in
  /// double as GridPoint<double>::quantize does (the very code and difference of the exact sum),
  /// u = |q - w| / scale in double, then rounded to float for the same u^norm estimates (the
  /// rounding adds at most norm 2^-24 <= 2.4e-7 relative per term, inside either margin);
  /// scale, 1 / scale in [2^-80, 2^80], amax >= max_j |w_j| as above.
  double (*scaled_error_f64)(const double* w, KIndex len, double scale, int zero, int maxq,
                             const ScreenPow& pw, double amax, double stop_above, KIndex* small,
                             bool* complete, double* margin);
};

/// The copy for this CPU: the one whose ISA the row kernels' table (kernels()) uses.
const GridScreenKernels& grid_screen_kernels();
const GridScreenKernels& grid_screen_kernels_generic();
const GridScreenKernels& grid_screen_kernels_avx2();
const GridScreenKernels& grid_screen_kernels_avx512();
/// "avx512", "avx2+fma" or "generic": the copy grid_screen_kernels() returns.
const char* grid_screen_isa();

}  // namespace obc::internal

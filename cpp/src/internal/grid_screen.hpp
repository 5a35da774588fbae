// Plain interface of the MSE grid fit's screening estimate (see fit_grid in quant.cpp), so that
// it is compiled once per SIMD level like the row kernels (kernels/grid_screen.cpp) and picked
// with them at run time: 16 lanes with AVX-512, 8 with AVX2+FMA, 4 with SSE2.
#pragma once

#include "internal/row_kernels.hpp"

namespace obc::internal {

/// Relative error bound the screening uses for its estimates (they are within ~1e-5).
constexpr double kScreenMargin = 1e-4;
/// |q - w| / scale below this: the term is estimated as 0 (and counted, see scaled_error).
constexpr float kScreenSmall = 0x1p-20f;

struct GridScreenKernels {
  /// Estimate of sum_j (|q(w_j) - w_j| / scale)^norm over w[0, len) (float32 weights; 1 <= norm
  /// <= 4; scale, 1 / scale in [2^-80, 2^80]) on the grid (scale, zero, maxq), q rounding as
  /// GridPoint<float>::quantize (the difference q - w is that very float), each term within
  /// ~1e-5 relative of its exact value or 0 where it is below kScreenSmall^norm. *small: how many
  /// terms were set to 0. Stops early once the partial sum exceeds stop_above (the terms are
  /// >= 0), returning that partial sum with *complete = false; else *complete = true.
  double (*scaled_error)(const float* w, KIndex len, float scale, int zero, int maxq, float norm,
                         double stop_above, KIndex* small, bool* complete);
};

/// The copy for this CPU: the one whose ISA the row kernels' table (kernels()) uses.
const GridScreenKernels& grid_screen_kernels();
const GridScreenKernels& grid_screen_kernels_generic();
const GridScreenKernels& grid_screen_kernels_avx2();
const GridScreenKernels& grid_screen_kernels_avx512();
/// "avx512", "avx2+fma" or "generic": the copy grid_screen_kernels() returns.
const char* grid_screen_isa();

}  // namespace obc::internal

// Plain (Eigen-free) interface of the GPTQ sweep, so that it is compiled once per SIMD level like
// the row kernels (see kernels/gptq_sweep.cpp) and picked with them at run time: its cost is
// GEMMs, which run about twice as fast with AVX2+FMA.
#pragma once

#include <cstdint>

#include "internal/row_kernels.hpp"
#include "obc/interrupt.hpp"

namespace obc::internal {

/// One layer's GPTQ sweep (obc/gptq.hpp). weight: rows x cols, row r at weight + r *
/// weight_stride; order: cols entries, the original column quantized at step k; dead: cols flags
/// (1: the input is dead, its weights are 0); factor: cols x cols column-major, built by
/// gptq_factor in gptq.cpp from L, the lower triangular factor with L^T L = P^T (H +
/// lambda I) P (P: the order; L = U^-T for U the upper Cholesky factor of the permuted inverse):
/// its diagonal holds L_kk, its strict upper triangle M^T with M = diag(L)^-1 L (entry (i, k),
/// i < k: L_ki / L_kk), so that column k holds what step k needs; the strict lower triangle is not
/// read. scale / zero: rows x groups row-major grids; out: rows x cols row-major, the quantized
/// weights; step_losses (rows, or null): each row's summed OBS step losses
/// (L_kk (w~_k - q_k))^2 / 2, which add up to 1/2 dw (H + lambda I) dw^T.
template <class S>
struct GptqJob {
  const S* weight;
  KIndex weight_stride;
  KIndex rows, cols;
  const KIndex* order;
  const char* dead;
  const S* factor;  ///< in the weights' precision (float32 weights: the float32 factor)
  const S* scale;
  const std::uint8_t* zero;
  KIndex group_size;
  int bits;
  KIndex block_size;  ///< columns per lazy block update, >= 1
  S* out;
  double* step_losses = nullptr;
};

struct GptqKernels {
  /// L in place, the lower Cholesky factor of the SPD matrix in `a` (n x n column-major, lower
  /// triangle read and written; about n^3 / 3 flops): spd_inverse.hpp's cholesky_factor_inplace.
  /// False when a pivot L_ii^2 is not above pivot_tol * a_ii.
  bool (*cholesky_f64)(double* a, KIndex n, double pivot_tol, int num_threads,
                       InterruptHook* interrupt);
  /// The same in float32 (GPTQ on float32 weights; the pivot test is made in double).
  bool (*cholesky_f32)(float* a, KIndex n, double pivot_tol, int num_threads,
                       InterruptHook* interrupt);
  void (*sweep_f32)(const GptqJob<float>&, const RunOptions&);
  void (*sweep_f64)(const GptqJob<double>&, const RunOptions&);
};

/// The copy for this CPU: the one whose ISA the row kernels' table (kernels()) uses, or the
/// AVX-512 one where use_avx512_kernels() says so.
const GptqKernels& gptq_kernels();
const GptqKernels& gptq_kernels_generic();
const GptqKernels& gptq_kernels_avx2();
const GptqKernels& gptq_kernels_avx512();

}  // namespace obc::internal

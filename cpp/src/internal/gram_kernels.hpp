// Plain (Eigen-free) interface of the Gram accumulation kernel, so that it is compiled once per
// SIMD level like the row kernels (see kernels/gram.cpp), and once more with AVX-512, picked at
// run time: its cost is one GEMM per tile, which runs about twice as fast with AVX2+FMA and again
// faster with AVX-512.
#pragma once

#include "internal/row_kernels.hpp"
#include "obc/interrupt.hpp"

namespace obc::internal {

/// One Gram update total += X^T X, lower triangle only. total: cols x cols column-major float64
/// (column j at total + j * total_stride); x: rows x cols row-major (row r at x + r * row_stride).
template <class S>
struct GramJob {
  double* total;
  KIndex total_stride;
  KIndex cols;
  const S* x;
  KIndex rows, row_stride;
};

struct GramKernels {
  /// Adds X^T X to the lower triangle of `total` (and to the upper part of the diagonal tiles,
  /// gram_tile_cols x gram_tile_cols blocks at (j0, j0)); nothing else is written. Fixed
  /// arithmetic per element whatever num_threads (see kernels/gram.cpp). Polls `interrupt`
  /// from the calling thread between tiles; a stop throws Interrupted (total then partly updated).
  void (*add_lower_f32)(const GramJob<float>&, int num_threads, InterruptHook* interrupt);
  void (*add_lower_f64)(const GramJob<double>&, int num_threads, InterruptHook* interrupt);
};

/// Columns per tile of the Gram kernel (a work item: the lower part of a block column).
inline constexpr KIndex gram_tile_cols = 256;
/// Rows of X widened to float64 and multiplied at a time: part of the summation order.
inline constexpr KIndex gram_chunk_rows = 2048;

/// The copy for this CPU: the one whose ISA the row kernels' table (kernels()) uses.
const GramKernels& gram_kernels();
const GramKernels& gram_kernels_generic();
const GramKernels& gram_kernels_avx2();
const GramKernels& gram_kernels_avx512();

}  // namespace obc::internal

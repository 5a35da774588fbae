// Plain (Eigen-free) interface of the SparseGPT sweep, so that it is compiled once per SIMD level
// like the row kernels (see kernels/sparsegpt_sweep.cpp) and picked with them at run time.
#pragma once

#include <cstdint>

#include "internal/row_kernels.hpp"
#include "obc/interrupt.hpp"

namespace obc::internal {

/// One layer's sweep (obc/sparsegpt.hpp). weight: rows x cols row-major, W on entry, the result
/// on exit; pruned: rows x cols, the weights pruned from the start (zeros, dead inputs) on entry,
/// the final mask on exit; hinv: the damped H^-1, cols x cols column-major (lower triangle
/// read), overwritten by its Cholesky factor and then by U, the factor the sweep reads (float32:
/// narrowed in place; see kernels/sparsegpt_sweep.cpp). scale / zero: rows x groups row-major
/// grids for joint quantization, or null.
template <class S>
struct SparseGptJob {
  S* weight;
  std::uint8_t* pruned;
  double* hinv;
  KIndex rows, cols;
  int pattern;              ///< 0 unstructured, 1 blocked, 2 N:M (obc::SparsePattern order)
  bool uniform;             ///< Spread::Uniform (else Global)
  double sparsity;
  KIndex unit;              ///< weights per selection unit: 1, block or m
  KIndex n, m;
  KIndex lazy_block;        ///< columns per lazy block, a multiple of unit
  const S* scale = nullptr;
  const std::uint8_t* zero = nullptr;
  KIndex group_size = 0;
  int bits = 0;
};

struct SparseGptKernels {
  /// Return false when H^-1 has no Cholesky factor (weight and pruned then untouched).
  bool (*sweep_f32)(const SparseGptJob<float>&, const RunOptions&);
  bool (*sweep_f64)(const SparseGptJob<double>&, const RunOptions&);
};

/// The copy for this CPU: the one whose ISA the row kernels' table (kernels()) uses.
const SparseGptKernels& sparsegpt_kernels();
const SparseGptKernels& sparsegpt_kernels_generic();
const SparseGptKernels& sparsegpt_kernels_avx2();

}  // namespace obc::internal

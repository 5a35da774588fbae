// Plain (Eigen-free) interface of the row kernels, so that they can be compiled once per SIMD
// level and picked at run time (see kernels/row_kernels.cpp and dispatch.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "obc/interrupt.hpp"

namespace obc::internal {

using KIndex = std::ptrdiff_t;  // == obc::Index

/// A prepared Hessian as plain buffers: hinv is cols x cols (symmetric, any order) in float64,
/// or, for float32 kernels only, its lower triangle packed column by column in float32 (see
/// PreparedHessian::hinv_lower_f32); at least one of the two is set.
struct HessianView {
  const double* hinv = nullptr;
  const float* hinv_lower_f32 = nullptr;
  const char* dead = nullptr;  ///< cols flags
  KIndex cols = 0;
};

/// A cols x cols Hessian as plain memory: element (i, j) at data[i * row_stride + j * col_stride]
/// (float32 when is_f32, else float64); one of the strides is 1.
struct HessianInput {
  const void* data = nullptr;
  bool is_f32 = false;
  KIndex cols = 0, row_stride = 0, col_stride = 0;
};

/// Greedy traces of rows: unstructured (block 1) or blocked. W, out: rows x cols row-major;
/// order, losses: rows x (cols / block). max_steps: per-row step limit or null (all steps).
/// record_out[k] (rows x cols row-major, k < num_records) receives each row's weights when it
/// has taken record_steps[k] steps (0..cols / block; with max_steps, at most max_steps[r]).
template <class S>
struct TraceJob {
  const S* W;
  KIndex rows;
  HessianView h;
  KIndex block;
  const KIndex* max_steps;
  std::int32_t* order;
  double* losses;
  S* out;
  const KIndex* record_steps = nullptr;
  KIndex num_records = 0;
  S* const* record_out = nullptr;
};

/// N:M pruning of rows: at least n zeros in every group of m consecutive inputs.
template <class S>
struct NmJob {
  const S* W;
  KIndex rows;
  HessianView h;
  KIndex n, m;
  S* out;
};

/// OBQ of rows on fixed grids: scale, zero are rows x groups row-major.
template <class S>
struct ObqJob {
  const S* W;
  KIndex rows;
  HessianView h;
  const S* scale;
  const std::uint8_t* zero;
  KIndex group_size;
  int bits;
  double outlier_factor;  ///< (1 + outlier_tol) / 4
  S* out;
};

/// Structured pruning of a layer: whole groups of `group` consecutive input columns removed from
/// all rows until `target` groups are gone (counting those that are zero or dead from the start).
/// Needs h.hinv (float64). out: rows x cols weights; pruned: rows x cols, 1 = pruned.
template <class S>
struct StructuredJob {
  const S* W;
  KIndex rows;
  HessianView h;
  KIndex group, target;
  S* out;
  std::uint8_t* pruned;
  double* step_losses;  ///< rows: the sum of each row's greedy step losses (damped H)
};

/// Optimal weights for fixed masks (obc::solve_masked), one float64 solve per row. W, out: rows x
/// cols row-major; pruned: rows x cols, 1 = pruned (already including zeros and dead inputs);
/// hinv: the cols x cols float64 inverse (both triangles), or null when every row prunes at
/// least half (those solve with H_FF); H: the undamped Hessian, damped here by damp_absolute.
template <class S>
struct MaskedSolveJob {
  const S* W;
  KIndex rows, cols;
  const std::uint8_t* pruned;
  const double* hinv;
  const char* dead;  ///< cols flags
  HessianInput H;
  double damp_absolute;
  S* out;
};

template <class S>
struct RowKernels {
  void (*trace)(const TraceJob<S>&, const RunOptions&);
  void (*nm)(const NmJob<S>&, const RunOptions&);
  void (*obq)(const ObqJob<S>&, const RunOptions&);
  void (*structured)(const StructuredJob<S>&, const RunOptions&);
  void (*solve_masked)(const MaskedSolveJob<S>&, const RunOptions&);
  /// out[r] = 1/2 (W - W_hat)_r H (W - W_hat)_r^T in float64; W, W_hat rows x cols row-major.
  /// `interrupt` (may be null) is polled between column blocks; a stop throws Interrupted.
  void (*row_losses)(const S* W, const S* W_hat, KIndex rows, KIndex cols, const HessianInput& H,
                     double* out, int num_threads, InterruptHook* interrupt);
};

struct KernelTable {
  RowKernels<float> f32;
  RowKernels<double> f64;
  /// In-place inverse of the SPD matrix in a (n x n column-major, lower triangle read; on success
  /// both triangles written), see kernels/spd_inverse.hpp. Returns false when a Cholesky pivot
  /// falls below pivot_tol times its diagonal entry (numerically singular). `interrupt` (may be
  /// null) is polled between panels; a stop throws Interrupted.
  bool (*spd_inverse_inplace)(double* a, KIndex n, double pivot_tol, int num_threads,
                              InterruptHook* interrupt);
  const char* isa;  ///< "generic" or "avx2+fma"
};

/// The table for this CPU: AVX2+FMA kernels when compiled in and supported, unless the
/// environment sets OBC_SIMD=generic. Chosen once per process.
const KernelTable& kernels();

template <class S>
const RowKernels<S>& row_kernels() {
  if constexpr (sizeof(S) == 4) {
    return kernels().f32;
  } else {
    return kernels().f64;
  }
}

/// True when the AVX2 copies are in use (not OBC_SIMD=generic or OBC_SIMD=avx2) and the CPU has
/// AVX-512 F/DQ/VL/BW: the kernels that also have an AVX-512 copy take it. Chosen once per process.
bool use_avx512_kernels();

const KernelTable& kernel_table_generic();
const KernelTable& kernel_table_avx2();

}  // namespace obc::internal

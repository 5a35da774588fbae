// Plain (Eigen-free) interface of the row kernels, so that they can be compiled once per SIMD
// level and picked at run time (see kernels/row_kernels.cpp and dispatch.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "obc/interrupt.hpp"

namespace obc::internal {

using KIndex = std::ptrdiff_t;  // == obc::Index

/// A prepared Hessian as plain buffers: hinv is cols x cols (symmetric, any order).
struct HessianView {
  const double* hinv = nullptr;
  const char* dead = nullptr;  ///< cols flags
  KIndex cols = 0;
};

/// Greedy traces of rows: unstructured (block 1) or blocked. W, out: rows x cols row-major;
/// order, losses: rows x (cols / block). max_steps: per-row step limit or null (all steps).
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

template <class S>
struct RowKernels {
  void (*trace)(const TraceJob<S>&, const RunOptions&);
  void (*nm)(const NmJob<S>&, const RunOptions&);
  void (*obq)(const ObqJob<S>&, const RunOptions&);
};

struct KernelTable {
  RowKernels<float> f32;
  RowKernels<double> f64;
  /// Cholesky inverse of the SPD matrix h (n x n) into hinv (n x n, both triangles). Returns false
  /// when a pivot falls below pivot_tol times its diagonal entry (numerically singular).
  bool (*spd_inverse)(const double* h, double* hinv, KIndex n, double pivot_tol);
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

const KernelTable& kernel_table_generic();
const KernelTable& kernel_table_avx2();

}  // namespace obc::internal

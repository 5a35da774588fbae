// OBQ quantization: grids (symmetric/asymmetric, per row or per group, min-max or MSE-searched)
// and the greedy exact quantizer, which also serves joint pruning + quantization.
//
// A weight w on a grid (scale s, zero point z, bits b, maxq = 2^b - 1) has the integer code
// c = clamp(round_half_even(w / s) + z, 0, maxq) and the value s * (c - z). 0 is always on the
// grid (the range always contains 0), so weights that are zero stay exactly zero.
#pragma once

#include <Eigen/Core>
#include <cstdint>

#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

enum class GridSearch {
  MinMax,  ///< the range is [min(w, 0), max(w, 0)]
  Mse,     ///< the range is shrunk by p = 1 - i/100, i < 80, minimizing sum |q(w) - w|^2.4
};

struct QuantOptions {
  /// Bits per weight, 2..8.
  int bits = 4;
  /// Symmetric grid: zero point 2^(b-1), scale = max|w| / (2^(b-1) - 1), so both +max|w| and
  /// -max|w| are representable (codes 1..maxq hold them; code 0 is one extra negative level).
  /// Asymmetric: scale = (xmax - xmin) / maxq, zero point round(-xmin / scale).
  bool sym = true;
  /// Inputs sharing one grid: 0 = the whole row (per-channel), else cols % group_size == 0.
  Index group_size = 0;
  GridSearch grid = GridSearch::Mse;
  /// Exponent of the MSE grid search error (the paper's 2.4). > 0.
  double mse_norm = 2.4;
  /// OBQ outlier rule: a free weight whose rounding error exceeds (1 + outlier_tol) * scale^2/4
  /// lies outside the grid's range by more than half a step; the one with the largest error is
  /// quantized first. The relative tolerance makes the rule deterministic for weights exactly
  /// at the range edge, where float rounding would otherwise decide. >= 0.
  double outlier_tol = 1e-3;
};

/// The quantizers behind QuantResult::row_method (values are stable: the C API and Python use
/// them as codes).
enum class QuantMethod : std::uint8_t {
  Obq = 0,          ///< the greedy OBQ of quantize()
  Gptq = 1,         ///< fixed order, act-order (descending diag H): quantize_gptq()
  GptqNatural = 2,  ///< fixed order, natural column order
  Rtn = 3,          ///< round to nearest: quantize_rtn()
};

/// Short lower-case name: "obq", "gptq", "gptq-natural", "rtn".
const char* quant_method_name(QuantMethod method);

/// Grid per row and group: rows x groups.
template <class Scalar>
struct QuantGrid {
  RowMatrix<Scalar> scale;        ///< > 0
  RowMatrix<std::uint8_t> zero;   ///< zero point, integer in [0, maxq]
  int bits = 4;
  Index group_size = 0;           ///< resolved: cols when per row
};

template <class Scalar>
struct QuantResult {
  RowMatrix<Scalar> weight;       ///< rows x cols dequantized weights, exactly on the grid
  RowMatrix<std::uint8_t> codes;  ///< rows x cols integer codes in [0, 2^bits - 1]
  QuantGrid<Scalar> grid;
  MaskMatrix pruned;              ///< rows x cols, 1 where the weight was zero before (kept zero)
  Eigen::VectorXd row_losses;     ///< rows: 1/2 dw H dw^T with the undamped H
  /// rows: the quantizer that produced each row (see quantize_select for a per-row choice).
  Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1> row_method;
  /// rows: row_losses before refinement (quant_refine.hpp); equal to row_losses when none ran.
  Eigen::VectorXd row_losses_unrefined;
  /// Refinement passes run over the layer (the maximum over rows), 0 when none ran.
  int refine_passes = 0;
  double damp = 0.0;
  double damp_absolute = 0.0;
  /// float32 layers only: true when the float32 elimination lost positive definiteness and the
  /// layer was redone in float64 on the same (float32) grid; `weight` is that result rounded
  /// to float32, still exactly on the grid.
  bool float64_fallback = false;
};

/// Computes the grid of every row / group of W from W itself. Throws InvalidArgument for bits
/// outside 2..8 or a group size that does not divide cols. Rows are fitted in parallel on
/// num_threads threads (0: all; the result does not depend on it). `interrupt` (optional, not
/// owned) is polled between batches of 16 rows; a stop throws obc::Interrupted.
template <class Scalar>
QuantGrid<Scalar> make_grid(const Eigen::Ref<const RowMatrix<Scalar>>& W, const QuantOptions& opt,
                            int num_threads = 1, InterruptHook* interrupt = nullptr);

namespace detail {
/// make_grid by the plain scan: each of the MSE search's 80 shrink factors' errors summed in full
/// with std::pow (no early exit, no screening), the first smallest kept. The reference that
/// make_grid's fast paths reproduce bit for bit; for tests and benchmarks, not a stable API.
template <class Scalar>
QuantGrid<Scalar> make_grid_plain_scan(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                       const QuantOptions& opt, int num_threads = 1,
                                       InterruptHook* interrupt = nullptr);
}  // namespace detail

/// Rounds W to its grid (round-to-nearest, no error feedback): the RTN baseline.
template <class Scalar>
QuantResult<Scalar> quantize_rtn(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H,
                                 const QuantOptions& opt, const HessianOptions& hopt = {},
                                 const RunOptions& run = {});

/// OBQ: per row, greedily fixes the weight with the smallest (w_q - q(w_q))^2 / [H^-1]_qq to its
/// grid value (outliers first, see QuantOptions::outlier_tol) and updates the free weights
/// optimally. Weights that are zero on entry (and dead inputs) stay exactly zero: joint
/// pruning + quantization is quantize() of a pruned layer.
template <class Scalar>
QuantResult<Scalar> quantize(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                             const HessianRef& H, const QuantOptions& opt,
                             const HessianOptions& hopt = {}, const RunOptions& run = {});

}  // namespace obc

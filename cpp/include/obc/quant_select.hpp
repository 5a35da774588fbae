// Quantization with a per-row choice of method: every candidate quantizer runs on the same
// grids (fitted on the original weights, so rows are independent once the grid is fixed), each
// result is optionally refined (quant_refine.hpp), and every row keeps the candidate with the
// lowest loss.
#pragma once

#include <Eigen/Core>
#include <vector>

#include "obc/gptq.hpp"
#include "obc/hessian.hpp"
#include "obc/interrupt.hpp"
#include "obc/quant.hpp"
#include "obc/quant_refine.hpp"
#include "obc/types.hpp"

namespace obc {

/// Widest layer (inputs) for which the default candidates include greedy OBQ. OBQ costs
/// O(rows * cols^3): 25 s for 256 x 1024 and ~30 min for 4096 x 4096 on two cores, while past
/// about a thousand inputs it wins few rows (768 x 3072 with outlier inputs: 6 of 768 rows, 0.03%
/// of the loss, for 6.8x the time of refined GPTQ). Above it the default is refined GPTQ alone.
inline constexpr Index kAutoObqMaxCols = 1024;

/// The candidates of the default ("auto") quantizer for a layer of `cols` inputs: OBQ and GPTQ
/// up to kAutoObqMaxCols inputs, GPTQ alone above. cols >= 0.
std::vector<QuantMethod> auto_quant_methods(Index cols);

struct QuantSelectOptions {
  /// Candidates, each at most once, non-empty; ties between candidates go to the one listed
  /// first. Obq, Gptq, GptqNatural, Rtn.
  std::vector<QuantMethod> methods = {QuantMethod::Obq, QuantMethod::Gptq};
  /// Refinement of every candidate before the choice (max_passes = 0: none).
  RefineOptions refine{};
  /// Rounds of scale refit of every candidate, after its refinement and before the choice: each
  /// round solves, per row, the scales that
  /// minimize the row's objective given its codes (an exact least-squares problem, one unknown
  /// per group), then refines the codes on the new scales (when refine.max_passes > 0); a row
  /// keeps the round's result only where its loss (undamped H) drops, so the loss never rises.
  /// Rounds stop early when no row improves. The grids then differ from the fitted ones, row
  /// by row (the zero points do not change). 0 = the fitted grids are kept. >= 0.
  int refit_rounds = 2;
  /// Lazy block size of the GPTQ candidates (act_order is set by the method).
  Index gptq_block_size = 128;
};

/// Runs the candidates, refines each, and keeps per row the one with the lowest row loss
/// (undamped H, as row_losses). The Hessian is prepared once for all candidates. With a single
/// candidate, no refinement and refit_rounds = 0 the result equals that quantizer's own (bit
/// for bit).
/// result.row_method says which candidate won each row; row_losses_unrefined is the winner's
/// loss before refinement. Throws InvalidArgument for an empty or repeated candidate list and
/// the quantizers' own errors.
template <class Scalar>
QuantResult<Scalar> quantize_select(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                    const HessianRef& H, const QuantOptions& opt,
                                    const QuantSelectOptions& sopt = {},
                                    const HessianOptions& hopt = {}, const RunOptions& run = {});

}  // namespace obc

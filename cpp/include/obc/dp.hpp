// Budgeted level selection: one level per layer, minimal total loss within a cost budget.
//
// Problem: layers l = 0..L-1 each offer levels j = 0..J_l-1 with a loss losses[l][j] (any finite
// value, e.g. the layer's ||(W - W_hat) X||^2 / n at that level) and a cost costs[l][j] >= 0
// (parameters, storage bits, FLOPs, measured time, ...). Choose one level per layer minimizing
// sum_l losses[l][j_l] subject to sum_l costs[l][j_l] <= budget.
//
// Method: dynamic programming over a discretized budget (a multiple-choice knapsack).
//  1. min_cost = sum_l min_j costs[l][j] (summed in layer order). budget < min_cost is infeasible:
//     InvalidArgument whose message states min_cost.
//  2. Every cost is taken relative to its layer's cheapest level, extra = cost - min_j cost >= 0,
//     and the free budget budget - min_cost is split into `buckets` units of width
//     w = (budget - min_cost) / buckets. A level occupies units = ceil(extra / w) (0 for the
//     cheapest level); a level with extra > budget - min_cost is never feasible. When w == 0
//     (budget == min_cost) only levels with extra == 0 are allowed.
//     When even the dearest selection fits (sum_l max_j costs[l][j] <= budget), nothing is
//     discretized: every layer takes its best level (cost_slack_bound = 0, units_used = 0,
//     loss_lower_bound = loss).
//  3. The DP finds the selection with the smallest total loss whose units sum to <= buckets.
//     Rounding UP means such a selection's true cost is <= budget; the true cost (summed in
//     layer order) is re-checked, and in the (floating-point rounding) case that it exceeds the
//     budget the solver takes the best selection of the next smaller capacity instead.
//
// Ties between selections with equal total loss: lower total true cost wins, then the
// lexicographically smaller choice vector (lower level index at layer 0, then layer 1, ...).
// Totals inside the DP are summed right to left (losses[0] + (losses[1] + ...)); comparisons
// of exactly equal totals are therefore exact for integer- or dyadic-valued inputs.
//
// What discretization can cost: rounding up charges each non-cheapest chosen level less than
// one extra unit, so every selection whose true cost is <= budget - cost_slack_bound (with
// cost_slack_bound = adjustable layers * w) is feasible for the DP: the returned loss is at most
// the exact optimum at budget - cost_slack_bound, and (optionally) a second DP that rounds DOWN
// gives loss_lower_bound <= the exact optimum at `budget`.
//
// Memory: 4 * L * (buckets + 1) bytes for the choice table. Time: O(buckets * sum_l J_l).
#pragma once

#include <Eigen/Core>
#include <vector>

#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

struct LevelDpOptions {
  /// Number of units the free budget (budget - min_cost) is split into. More buckets: finer
  /// costs, smaller cost_slack_bound, more time and memory. Valid: 1 .. 1e9, and
  /// layers * (buckets + 1) <= 5e8 (the choice table, 4 bytes an entry).
  Index buckets = 10000;
  /// Also run the round-down relaxation to report loss_lower_bound (doubles the time).
  bool lower_bound = true;
  /// Optional interrupt hook, polled once per layer; not owned; may be null.
  InterruptHook* interrupt = nullptr;
};

/// The selected level of every layer and what is known about its quality.
struct LevelDpResult {
  std::vector<Index> choice;  ///< per layer: the chosen level index j_l
  double cost = 0.0;          ///< sum_l costs[l][choice[l]] in layer order; always <= budget
  double loss = 0.0;          ///< sum_l losses[l][choice[l]] in layer order (predicted loss)
  double budget = 0.0;        ///< the budget asked for
  double min_cost = 0.0;      ///< smallest achievable cost: every layer at its cheapest level
  double bucket_width = 0.0;  ///< w = (budget - min_cost) / buckets, in cost units (0 if equal)
  /// adjustable layers (those with a level dearer than their cheapest) * w: every selection of
  /// true cost <= budget - cost_slack_bound was considered, so `loss` is at most the exact
  /// optimum for that reduced budget. Cost units, >= 0.
  double cost_slack_bound = 0.0;
  /// A lower bound on the exact optimum loss at `budget` (round-down relaxation), so the
  /// returned loss is within loss - loss_lower_bound of it. NaN when not computed.
  double loss_lower_bound = 0.0;
  Index buckets = 0;        ///< buckets used for the discretization
  Index units_used = 0;     ///< sum of the chosen levels' units (<= buckets)
};

/// Chooses one level per layer (see the file comment). losses[l] and costs[l] hold the J_l >= 1
/// levels of layer l. Throws InvalidArgument for no layers, a layer without levels, mismatched
/// sizes, non-finite losses, negative or non-finite costs, a negative or non-finite budget,
/// bad options, and an infeasible budget (the message states the smallest achievable cost).
/// Throws Interrupted when the hook asks to stop.
LevelDpResult solve_levels(const std::vector<Eigen::VectorXd>& losses,
                           const std::vector<Eigen::VectorXd>& costs, double budget,
                           const LevelDpOptions& options = {});

}  // namespace obc

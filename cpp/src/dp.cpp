// Budgeted level selection by dynamic programming over a discretized budget (see obc/dp.hpp).
#include "obc/dp.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "obc/errors.hpp"

namespace obc {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr Index kExcluded = -1;
/// Relative floating-point noise forgiven when converting a cost to units: a quotient that
/// should be the integer k but came out as k * (1 + 1e-16) still takes k units. The budget
/// itself is protected by the exact re-check of the true cost, not by this rounding.
constexpr double kUnitTol = 1e-12;
constexpr Index kMaxBuckets = 1000000000;
constexpr double kMaxTableEntries = 5e8;

/// Shortest decimal that reads back as `x` (for messages).
std::string shortest(double x) {
  for (int precision = 6; precision <= 17; ++precision) {
    std::ostringstream out;
    out.precision(precision);
    out << x;
    if (std::strtod(out.str().c_str(), nullptr) == x) return out.str();
  }
  std::ostringstream out;
  out.precision(17);
  out << x;
  return out.str();
}

void check_stop(InterruptHook* hook) {
  if (hook != nullptr && hook->should_stop()) throw Interrupted();
}

/// Units of every level: ceil (round_up) or floor of (cost - layer min) / width, after
/// forgiving kUnitTol; kExcluded when the level can never fit the free budget.
std::vector<std::vector<Index>> level_units(const std::vector<Eigen::VectorXd>& costs,
                                            const std::vector<double>& layer_min, double free,
                                            Index buckets, bool round_up) {
  const double width = free / static_cast<double>(buckets);
  std::vector<std::vector<Index>> units(costs.size());
  for (size_t l = 0; l < costs.size(); ++l) {
    units[l].resize(static_cast<size_t>(costs[l].size()));
    for (Index j = 0; j < costs[l].size(); ++j) {
      const double extra = costs[l][j] - layer_min[l];
      Index u = kExcluded;
      if (extra == 0.0) {
        u = 0;
      } else if (width > 0.0 && extra <= free) {
        const double q = extra / width * (1.0 - kUnitTol);
        const double rounded = round_up ? std::ceil(q) : std::floor(q);
        if (rounded <= static_cast<double>(buckets)) u = static_cast<Index>(rounded);
      }
      units[l][static_cast<size_t>(j)] = u;
    }
  }
  return units;
}

}  // namespace

LevelDpResult solve_levels(const std::vector<Eigen::VectorXd>& losses,
                           const std::vector<Eigen::VectorXd>& costs, double budget,
                           const LevelDpOptions& options) {
  // --- validation -------------------------------------------------------------------------
  OBC_CHECK(!losses.empty(), "losses: expected at least one layer, got none");
  OBC_CHECK(costs.size() == losses.size(), "costs: expected one entry per layer (",
            losses.size(), "), got ", costs.size());
  const Index layers = static_cast<Index>(losses.size());
  for (Index l = 0; l < layers; ++l) {
    const auto& lo = losses[static_cast<size_t>(l)];
    const auto& co = costs[static_cast<size_t>(l)];
    OBC_CHECK(lo.size() > 0, "losses[", l, "]: expected at least one level, got none");
    OBC_CHECK(co.size() == lo.size(), "costs[", l, "]: expected ", lo.size(),
              " levels to match losses[", l, "], got ", co.size());
    for (Index j = 0; j < lo.size(); ++j) {
      OBC_CHECK(std::isfinite(lo[j]), "losses[", l, "][", j, "]: expected a finite value, got ",
                lo[j]);
      OBC_CHECK(std::isfinite(co[j]) && co[j] >= 0.0, "costs[", l, "][", j,
                "]: expected a finite value >= 0, got ", co[j]);
    }
  }
  OBC_CHECK(std::isfinite(budget) && budget >= 0.0,
            "budget: expected a finite value >= 0, got ", budget);
  const Index buckets = options.buckets;
  OBC_CHECK(buckets >= 1 && buckets <= kMaxBuckets, "buckets: expected an integer in [1, ",
            kMaxBuckets, "], got ", buckets);
  OBC_CHECK(static_cast<double>(layers) * static_cast<double>(buckets + 1) <= kMaxTableEntries,
            "buckets: ", layers, " layers x (", buckets,
            " + 1) buckets exceeds the table limit of ", kMaxTableEntries,
            " entries (4 bytes each); use fewer buckets");

  // --- feasibility: every layer at its cheapest level -------------------------------------
  std::vector<double> layer_min(static_cast<size_t>(layers));
  double min_cost = 0.0, max_cost = 0.0;
  Index adjustable = 0;
  for (Index l = 0; l < layers; ++l) {
    const auto& co = costs[static_cast<size_t>(l)];
    layer_min[static_cast<size_t>(l)] = co.minCoeff();
    min_cost += layer_min[static_cast<size_t>(l)];
    max_cost += co.maxCoeff();
    if (co.maxCoeff() > layer_min[static_cast<size_t>(l)]) ++adjustable;
  }
  if (min_cost > budget)
    throw InvalidArgument("budget: " + shortest(budget) +
                          " is infeasible; the smallest achievable cost is " +
                          shortest(min_cost) + " (every layer at its cheapest level)");
  const double free = budget - min_cost;
  const double width = free / static_cast<double>(buckets);

  LevelDpResult result;
  result.budget = budget;
  result.min_cost = min_cost;
  result.bucket_width = width;
  result.cost_slack_bound = static_cast<double>(adjustable) * width;
  result.buckets = buckets;
  result.loss_lower_bound = std::numeric_limits<double>::quiet_NaN();

  // --- every selection fits: no discretization, each layer takes its best level -------------
  if (max_cost <= budget) {
    result.choice.assign(static_cast<size_t>(layers), 0);
    for (Index l = 0; l < layers; ++l) {
      const auto& lo = losses[static_cast<size_t>(l)];
      const auto& co = costs[static_cast<size_t>(l)];
      Index best = 0;
      for (Index j = 1; j < lo.size(); ++j)
        if (lo[j] < lo[best] || (lo[j] == lo[best] && co[j] < co[best])) best = j;
      result.choice[static_cast<size_t>(l)] = best;
      result.cost += co[best];
      result.loss += lo[best];
    }
    result.cost_slack_bound = 0.0;
    if (options.lower_bound) result.loss_lower_bound = result.loss;
    return result;
  }

  // --- DP, last layer first: best[k] = best (loss, cost) of layers l..L-1 within k units ----
  const auto units = level_units(costs, layer_min, free, buckets, /*round_up=*/true);
  const size_t stride = static_cast<size_t>(buckets) + 1;
  std::vector<std::int32_t> choice(static_cast<size_t>(layers) * stride, -1);
  std::vector<double> next_loss(stride, 0.0), next_cost(stride, 0.0);
  std::vector<double> cur_loss(stride), cur_cost(stride);
  for (Index l = layers - 1; l >= 0; --l) {
    check_stop(options.interrupt);
    const auto& lo = losses[static_cast<size_t>(l)];
    const auto& co = costs[static_cast<size_t>(l)];
    const auto& un = units[static_cast<size_t>(l)];
    std::int32_t* layer_choice = choice.data() + static_cast<size_t>(l) * stride;
    for (size_t k = 0; k < stride; ++k) {
      double best_loss = kInf, best_cost = kInf;
      std::int32_t best = -1;
      for (Index j = 0; j < lo.size(); ++j) {
        const Index u = un[static_cast<size_t>(j)];
        if (u == kExcluded || static_cast<size_t>(u) > k) continue;
        const size_t rest = k - static_cast<size_t>(u);
        const double total_loss = lo[j] + next_loss[rest];
        const double total_cost = co[j] + next_cost[rest];
        // strict comparisons with j ascending: equal (loss, cost) keeps the lower index
        if (total_loss < best_loss || (total_loss == best_loss && total_cost < best_cost)) {
          best_loss = total_loss;
          best_cost = total_cost;
          best = static_cast<std::int32_t>(j);
        }
      }
      // the cheapest level always has 0 units, so every state has a choice
      cur_loss[k] = best_loss;
      cur_cost[k] = best_cost;
      layer_choice[k] = best;
    }
    std::swap(cur_loss, next_loss);
    std::swap(cur_cost, next_cost);
  }

  // --- reconstruct; re-check the true cost (floating-point rounding) -----------------------
  result.choice.assign(static_cast<size_t>(layers), 0);
  for (Index capacity = buckets; capacity >= 0; --capacity) {
    Index k = capacity;
    double cost = 0.0, loss = 0.0;
    for (Index l = 0; l < layers; ++l) {
      const std::int32_t j = choice[static_cast<size_t>(l) * stride + static_cast<size_t>(k)];
      result.choice[static_cast<size_t>(l)] = j;
      k -= units[static_cast<size_t>(l)][static_cast<size_t>(j)];
      cost += costs[static_cast<size_t>(l)][j];
      loss += losses[static_cast<size_t>(l)][j];
    }
    if (cost <= budget) {
      result.cost = cost;
      result.loss = loss;
      result.units_used = capacity - k;
      break;
    }
  }

  // --- optional relaxation: round DOWN, which every truly feasible selection satisfies -------
  if (options.lower_bound) {
    const auto floor_units = level_units(costs, layer_min, free, buckets, /*round_up=*/false);
    std::fill(next_loss.begin(), next_loss.end(), 0.0);
    for (Index l = layers - 1; l >= 0; --l) {
      check_stop(options.interrupt);
      const auto& lo = losses[static_cast<size_t>(l)];
      const auto& un = floor_units[static_cast<size_t>(l)];
      for (size_t k = 0; k < stride; ++k) {
        double best_loss = kInf;
        for (Index j = 0; j < lo.size(); ++j) {
          const Index u = un[static_cast<size_t>(j)];
          if (u == kExcluded || static_cast<size_t>(u) > k) continue;
          best_loss = std::min(best_loss, lo[j] + next_loss[k - static_cast<size_t>(u)]);
        }
        cur_loss[k] = best_loss;
      }
      std::swap(cur_loss, next_loss);
    }
    // the relaxation's optimum can exceed `loss` only by summation-order rounding
    result.loss_lower_bound = std::min(next_loss[static_cast<size_t>(buckets)], result.loss);
  }
  return result;
}

}  // namespace obc

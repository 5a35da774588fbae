// Tests for obc/dp.hpp: the budgeted level solver against brute-force enumeration.
#include "obc/dp.hpp"

#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "check.hpp"
#include "obc/errors.hpp"

using namespace obc;

namespace {

using Levels = std::vector<Eigen::VectorXd>;

struct Best {
  bool found = false;
  double loss = 0, cost = 0;
  std::vector<Index> choice;
};

// Exhaustive search: minimal (loss, cost, choice vector) among selections with cost <= budget.
// Totals are summed right to left like the solver's DP, so exact ties compare equal.
Best brute_force(const Levels& losses, const Levels& costs, double budget) {
  const size_t layers = losses.size();
  std::vector<Index> idx(layers, 0);
  Best best;
  while (true) {
    double loss = 0, cost = 0;
    for (size_t l = layers; l-- > 0;) {
      loss = losses[l][idx[l]] + loss;
      cost = costs[l][idx[l]] + cost;
    }
    if (cost <= budget &&
        (!best.found || loss < best.loss || (loss == best.loss && cost < best.cost))) {
      best = Best{true, loss, cost, idx};  // enumeration is lexicographic: first wins ties
    }
    size_t l = layers;
    while (l > 0) {
      --l;
      if (++idx[l] < losses[l].size()) break;
      idx[l] = 0;
      if (l == 0) return best;
    }
  }
}

Eigen::VectorXd random_vector(std::mt19937_64& gen, Index n, double low, double high,
                              bool integer) {
  std::uniform_real_distribution<double> uni(low, high);
  Eigen::VectorXd v(n);
  for (Index i = 0; i < n; ++i) v[i] = integer ? std::floor(uni(gen)) : uni(gen);
  return v;
}

double min_cost(const Levels& costs) {
  double s = 0;
  for (const auto& c : costs) s += c.minCoeff();
  return s;
}

double max_cost(const Levels& costs) {
  double s = 0;
  for (const auto& c : costs) s += c.maxCoeff();
  return s;
}

class StopNow : public InterruptHook {
 public:
  bool should_stop() override { return true; }
};

}  // namespace

OBC_TEST(integer_instances_match_brute_force_exactly) {
  // Integer costs with buckets == budget - min_cost make the discretization exact (width 1),
  // so the solver must return the brute-force optimum including its tie-breaking.
  std::mt19937_64 gen(7);
  int checked = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const Index layers = 1 + trial % 6;
    Levels losses, costs;
    for (Index l = 0; l < layers; ++l) {
      const Index levels = 1 + (trial / 6 + l) % 5;
      losses.push_back(random_vector(gen, levels, 0, 6, true));  // few values: many ties
      costs.push_back(random_vector(gen, levels, 0, 8, true));
    }
    const double lo = min_cost(costs), hi = max_cost(costs);
    std::uniform_int_distribution<int> pick(static_cast<int>(lo), static_cast<int>(hi));
    const double budget = pick(gen);
    if (budget <= lo) continue;  // width would be 0; covered elsewhere
    LevelDpOptions opt;
    opt.buckets = static_cast<Index>(budget - lo);
    const LevelDpResult r = solve_levels(losses, costs, budget, opt);
    const Best b = brute_force(losses, costs, budget);
    CHECK(b.found);
    CHECK(r.choice == b.choice);
    CHECK(r.loss == b.loss);
    CHECK(r.cost == b.cost);
    CHECK(r.cost <= budget);
    CHECK(r.bucket_width == 1.0);
    CHECK(r.loss_lower_bound <= r.loss);
    ++checked;
  }
  CHECK(checked > 200);
}

OBC_TEST(float_instances_are_bracketed_by_exact_optima) {
  std::mt19937_64 gen(11);
  for (int trial = 0; trial < 400; ++trial) {
    const Index layers = 1 + trial % 6;
    Levels losses, costs;
    for (Index l = 0; l < layers; ++l) {
      const Index levels = 1 + (trial / 6 + 2 * l) % 5;
      losses.push_back(random_vector(gen, levels, 0, 1, false));
      costs.push_back(random_vector(gen, levels, 0, 10, false));
    }
    const double lo = min_cost(costs), hi = max_cost(costs);
    std::uniform_real_distribution<double> frac(0, 1.1);
    const double budget = lo + frac(gen) * (hi - lo);
    for (Index buckets : {1, 7, 100, 10000}) {
      LevelDpOptions opt;
      opt.buckets = buckets;
      const LevelDpResult r = solve_levels(losses, costs, budget, opt);
      CHECK(r.cost <= budget);
      CHECK(r.units_used <= buckets);
      const Best exact = brute_force(losses, costs, budget);
      const Best reduced = brute_force(losses, costs, budget - r.cost_slack_bound);
      const double tol = 1e-12;
      CHECK(r.loss >= exact.loss - tol);
      if (reduced.found) CHECK(r.loss <= reduced.loss + tol);
      CHECK(r.loss_lower_bound <= exact.loss + tol);
      // the reported totals are those of the reported choice
      double cost = 0, loss = 0;
      for (Index l = 0; l < layers; ++l) {
        cost += costs[l][r.choice[l]];
        loss += losses[l][r.choice[l]];
      }
      CHECK(cost == r.cost);
      CHECK(loss == r.loss);
    }
  }
}

OBC_TEST(larger_budget_never_increases_the_loss) {
  std::mt19937_64 gen(3);
  for (int trial = 0; trial < 40; ++trial) {
    Levels losses, costs;
    for (Index l = 0; l < 5; ++l) {
      losses.push_back(random_vector(gen, 4, 0, 1, false));
      costs.push_back(random_vector(gen, 4, 0, 10, false));
    }
    const double lo = min_cost(costs), hi = max_cost(costs);
    double previous = std::numeric_limits<double>::infinity();
    for (int step = 0; step <= 40; ++step) {
      const double budget = lo + (hi - lo) * step / 40.0;
      const LevelDpResult r = solve_levels(losses, costs, budget);
      CHECK(r.loss <= previous + 1e-12);
      previous = r.loss;
    }
    // a budget covering everything picks each layer's lowest loss
    const LevelDpResult all = solve_levels(losses, costs, hi);
    for (Index l = 0; l < 5; ++l) CHECK(losses[l][all.choice[l]] == losses[l].minCoeff());
  }
}

OBC_TEST(budget_equal_to_min_cost_takes_the_cheapest_levels) {
  Levels losses{Eigen::Vector3d(3, 1, 2), Eigen::Vector2d(0, 5)};
  Levels costs{Eigen::Vector3d(2, 5, 2), Eigen::Vector2d(4, 1)};
  // cheapest: layer 0 levels 0 and 2 (cost 2; level 2 has the lower loss), layer 1 level 1
  const LevelDpResult r = solve_levels(losses, costs, 3.0);
  CHECK(r.choice == (std::vector<Index>{2, 1}));
  CHECK(r.cost == 3.0);
  CHECK(r.loss == 7.0);
  CHECK(r.bucket_width == 0.0);
  CHECK(r.cost_slack_bound == 0.0);
  CHECK(r.min_cost == 3.0);
}

OBC_TEST(ties_prefer_lower_cost_then_lower_index) {
  // equal loss everywhere: the cheapest selection; among equal cost the lower index
  Levels losses{Eigen::Vector3d(1, 1, 1), Eigen::Vector3d(2, 2, 2)};
  Levels costs{Eigen::Vector3d(3, 1, 1), Eigen::Vector3d(2, 2, 5)};
  const LevelDpResult r = solve_levels(losses, costs, 100.0);
  CHECK(r.choice == (std::vector<Index>{1, 0}));
  CHECK(r.cost == 3.0);
}

OBC_TEST(invalid_input_throws) {
  const Levels one{Eigen::Vector2d(1, 0)};
  const Levels one_cost{Eigen::Vector2d(1, 2)};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS(solve_levels({}, {}, 1.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, {}, 1.0), InvalidArgument);
  CHECK_THROWS(solve_levels({Eigen::VectorXd()}, {Eigen::VectorXd()}, 1.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, {Eigen::Vector3d(1, 2, 3)}, 1.0), InvalidArgument);
  CHECK_THROWS(solve_levels({Eigen::Vector2d(nan, 0)}, one_cost, 5.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, {Eigen::Vector2d(-1, 2)}, 5.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, {Eigen::Vector2d(1, nan)}, 5.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, one_cost, -1.0), InvalidArgument);
  CHECK_THROWS(solve_levels(one, one_cost, nan), InvalidArgument);
  CHECK_THROWS(solve_levels(one, one_cost, std::numeric_limits<double>::infinity()),
               InvalidArgument);
  LevelDpOptions opt;
  opt.buckets = 0;
  CHECK_THROWS(solve_levels(one, one_cost, 5.0, opt), InvalidArgument);
  opt.buckets = 400000000;
  CHECK_THROWS(solve_levels(Levels(3, Eigen::Vector2d(1, 0)), Levels(3, Eigen::Vector2d(1, 2)),
                            5.0, opt),
               InvalidArgument);
}

OBC_TEST(infeasible_budget_states_the_smallest_cost) {
  const Levels losses{Eigen::Vector2d(1, 0), Eigen::Vector2d(1, 0)};
  const Levels costs{Eigen::Vector2d(1.5, 2), Eigen::Vector2d(1, 4)};
  bool thrown = false;
  try {
    solve_levels(losses, costs, 2.0);
  } catch (const InvalidArgument& e) {
    thrown = true;
    CHECK(std::string(e.what()).find("smallest achievable cost is 2.5") != std::string::npos);
  }
  CHECK(thrown);
}

OBC_TEST(interrupt_hook_stops_the_solver) {
  StopNow stop;
  LevelDpOptions opt;
  opt.interrupt = &stop;
  CHECK_THROWS(solve_levels({Eigen::Vector2d(1, 0)}, {Eigen::Vector2d(1, 2)}, 1.5, opt),
               Interrupted);
}

OBC_TEST_MAIN

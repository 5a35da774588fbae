// The greedy's per-step choice (kernels/argmin_score.hpp) against plain scalar loops with the
// original semantics: smallest score, lowest index on ties, OBQ's outlier rule. Built twice by
// ctest: portable, and with AVX2+FMA (the vector paths), so both are checked bit for bit.
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.hpp"
#include "kernels/argmin_score.hpp"

namespace {

using obc::Index;
namespace k = obc::internal;

template <class S>
Index scalar_argmin(const std::vector<S>& w, const std::vector<S>& d, const std::vector<char>& pick) {
  Index best = -1;
  S best_score = std::numeric_limits<S>::infinity();
  for (Index i = 0; i < static_cast<Index>(w.size()); ++i) {
    if (!pick[i]) continue;
    const S score = w[i] * w[i] / d[i];
    if (score < best_score || best < 0) {
      best_score = score;
      best = i;
    }
  }
  return best;
}

template <class S>
Index scalar_obq(const std::vector<S>& w, const std::vector<S>& d, const std::vector<char>& pick,
                 const std::vector<S>& scale, const std::vector<S>& zero, S maxq, double factor) {
  Index best = -1, worst = -1;
  S best_score = std::numeric_limits<S>::infinity();
  double worst_err = -1;
  for (Index i = 0; i < static_cast<Index>(w.size()); ++i) {
    if (!pick[i]) continue;
    const S code = std::clamp(std::nearbyint(w[i] / scale[i]) + zero[i], S(0), maxq);
    const S err = w[i] - scale[i] * (code - zero[i]);
    const S err2 = err * err;
    const S score = err2 / d[i];
    if (score < best_score || best < 0) {
      best_score = score;
      best = i;
    }
    const double s = static_cast<double>(scale[i]);
    if (static_cast<double>(err2) > factor * s * s && static_cast<double>(err2) > worst_err) {
      worst_err = static_cast<double>(err2);
      worst = i;
    }
  }
  return worst >= 0 ? worst : best;
}

// Random rows with many exact ties: weights and diagonals drawn from small sets of values.
template <class S>
void check_choices(std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> small(0, 6);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double factor = (1 + 1e-3) / 4;
  const S maxq = 15;
  for (Index n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 70}) {
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<S> w(n), d(n), scale(n), zero(n);
      std::vector<char> pick(n);
      for (Index i = 0; i < n; ++i) {
        w[i] = rep % 2 ? static_cast<S>(small(gen) - 3) * S(0.37)
                       : static_cast<S>(4 * unit(gen) - 2);
        d[i] = rep % 3 ? static_cast<S>(1 + small(gen)) : static_cast<S>(0.1 + unit(gen));
        pick[i] = unit(gen) < 0.7;
        scale[i] = static_cast<S>(rep % 4 ? 0.1 : 0.05 + 0.1 * small(gen));  // narrow: outliers
        zero[i] = static_cast<S>(rep % 5 ? 8 : 3);
      }
      std::vector<S> thresholds(n), scratch(2 * n + 1);
      for (Index i = 0; i < n; ++i)
        thresholds[i] =
            k::outlier_threshold<S>(factor * static_cast<double>(scale[i]) * scale[i]);
      bool bad = true;
      CHECK(k::argmin_obs_score(w.data(), d.data(), pick.data(), n, bad) ==
            scalar_argmin(w, d, pick));
      CHECK(!bad);
      bad = true;
      CHECK(k::obq_choice(w.data(), d.data(), pick.data(), scale.data(), zero.data(),
                          thresholds.data(), maxq, n, scratch.data(), bad) ==
            scalar_obq(w, d, pick, scale, zero, maxq, factor));
      CHECK(!bad);
      if (n == 0) continue;
      // A non-positive (or NaN) diagonal is reported when picked, ignored when not.
      const Index at = static_cast<Index>(gen() % static_cast<std::uint32_t>(n));
      const S saved = d[at];
      for (S broken : {S(0), S(-1), std::numeric_limits<S>::quiet_NaN()}) {
        d[at] = broken;
        k::argmin_obs_score(w.data(), d.data(), pick.data(), n, bad);
        CHECK(bad == (pick[at] != 0));
        k::obq_choice(w.data(), d.data(), pick.data(), scale.data(), zero.data(),
                      thresholds.data(), maxq, n, scratch.data(), bad);
        CHECK(bad == (pick[at] != 0));
      }
      d[at] = saved;
    }
  }
}

}  // namespace

OBC_TEST(choices_match_scalar_loops_float) {
  if (obc_test::cpu_runs_this_build()) check_choices<float>(1);
}

OBC_TEST(choices_match_scalar_loops_double) {
  if (obc_test::cpu_runs_this_build()) check_choices<double>(2);
}

OBC_TEST(outlier_threshold_is_exact) {
  // (float err2 > t') must equal (double(err2) > t) for values right around t.
  for (double t : {0.25, 0.1, 1.0 / 3.0, 2.5e-3 * (1 + 1e-3), 7.0}) {
    const float tf = k::outlier_threshold<float>(t);
    CHECK(static_cast<double>(tf) <= t);
    float x = std::nextafter(tf, 0.0f);
    for (int step = 0; step < 4; ++step, x = std::nextafter(x, 10.0f))
      CHECK((x > tf) == (static_cast<double>(x) > t));
  }
}

OBC_TEST_MAIN

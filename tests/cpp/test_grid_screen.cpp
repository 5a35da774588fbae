// The MSE grid fit's screening estimate (internal/grid_screen.hpp), every compiled copy this CPU
// runs (generic SSE2, AVX2+FMA, AVX-512), against float64 std::pow: the relative error bound
// that make_grid's exact choice rests on (kScreenMargin), the count of terms set to 0, the early
// stop. A copy whose estimate drifted past the bound would let the fit drop the true minimum.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "internal/grid_screen.hpp"

namespace {

namespace k = obc::internal;
using k::KIndex;

// What the bound has to hold against: |estimate - exact| <= margin / 5 * exact, with 5x room
// left to the margin the kernel reports (kScreenMargin for the general estimate: per-term pow
// error ~2e-6; kScreenTableMargin for the tables: ~5e-7; plus float32 roundings of u and of
// the sums).

std::vector<std::pair<const char*, const k::GridScreenKernels*>> copies() {
  std::vector<std::pair<const char*, const k::GridScreenKernels*>> out{
      {"generic", &k::grid_screen_kernels_generic()}};
#if defined(OBC_TEST_AVX_COPIES) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back({"avx2", &k::grid_screen_kernels_avx2()});
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    out.push_back({"avx512", &k::grid_screen_kernels_avx512()});
#endif
  return out;
}

float amax_of(const std::vector<float>& w) {
  float amax = 0;
  for (const float x : w) amax = std::max(amax, std::fabs(x));
  return amax;
}

struct Exact {
  double sum = 0;  // sum of (|q - w| / scale)^norm over the terms >= kScreenSmall
  KIndex small = 0;
};

// The quantity the kernel estimates, term by term in float64 (q - w is the float32 the plain
// scan computes: w / scale, round half to even, clamp, scale * (code - zero), difference).
Exact exact_scaled_error(const std::vector<float>& w, float scale, int zero, int maxq,
                         double norm) {
  Exact e;
  for (const float x : w) {
    const float c =
        std::fmin(std::fmax(std::nearbyint(x / scale) + float(zero), 0.0f), float(maxq));
    const float d = std::fabs(scale * (c - float(zero)) - x);
    const float u = d * (1.0f / scale);
    if (u < k::kScreenSmall) {
      ++e.small;
    } else {
      e.sum += std::pow(static_cast<double>(d), norm) / std::pow(static_cast<double>(scale), norm);
    }
  }
  return e;
}

// The kernel's estimate of a whole row (no stop limit), with what it reports.
struct Screened {
  double estimate = 0;
  KIndex small = -1;
  bool complete = false;
  double margin = 0;
};

Screened screen_whole_row(const k::GridScreenKernels& table, const std::vector<float>& w,
                          float scale, int zero, int maxq, double norm) {
  Screened s;
  s.estimate = table.scaled_error(w.data(), KIndex(w.size()), scale, zero, maxq,
                                  k::make_screen_pow(norm), amax_of(w),
                                  std::numeric_limits<double>::infinity(), &s.small, &s.complete,
                                  &s.margin);
  return s;
}

// The weights of a random-row trial: each an integer code (some far outside the grid: clamped,
// u up to ~1300) plus a rounding error of any magnitude from 2^-1 down to 2^min_exp of a step,
// or exactly on the grid; every 10th trial reaches past the tables' range (u up to 2600): the
// general estimate. Shared by the float32 and float64 tests so that both draw the same kinds.
template <class T>
std::vector<T> random_row(std::mt19937_64& rng, KIndex len, int trial, double scale, int zero,
                          int maxq, int min_exp) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const int span = -1 - min_exp;  // exponents of the rounding error: min_exp .. -1
  std::vector<T> w(static_cast<size_t>(len));
  for (T& x : w) {
    const double n = std::floor(-zero - 40 + (maxq + 80) * unit(rng));
    const double far_max = trial % 10 == 9 ? 2600 : 1300;
    const double far = unit(rng) < 0.05 ? (unit(rng) < 0.5 ? -1 : 1) * far_max * unit(rng) : 0;
    const double f =
        unit(rng) < 0.05 ? 0 : (unit(rng) < 0.5 ? -1 : 1) * std::exp2(min_exp + span * unit(rng));
    x = static_cast<T>(scale * (n + far + f));
  }
  return w;
}

OBC_TEST(estimate_within_bound_on_random_rows) {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (const auto& [name, table] : copies()) {
    double worst_general = 0, worst_table = 0;
    int tables = 0;
    for (int trial = 0; trial < 600; ++trial) {
      const int bits = 2 + trial % 7, maxq = (1 << bits) - 1;
      const int zero =
          trial % 3 == 0 ? (1 << (bits - 1)) : int(unit(rng) * (maxq + 1)) % (maxq + 1);
      const float scale = static_cast<float>(std::exp2(-70 + 140 * unit(rng)));
      const double norm = trial % 5 == 0 ? 1.0 : trial % 5 == 1 ? 4.0 : 1.0 + 3.0 * unit(rng);
      const KIndex len = 1 + static_cast<KIndex>(unit(rng) * 300);
      // rounding errors down to 2^-24 of a step: below kScreenSmall
      const std::vector<float> w = random_row<float>(rng, len, trial, scale, zero, maxq, -24);
      const Exact e = exact_scaled_error(w, scale, zero, maxq, norm);
      const auto [est, small, complete, margin] = screen_whole_row(*table, w, scale, zero, maxq, norm);
      CHECK(complete);
      CHECK(small == e.small);
      // the bound the kernel reports (the tables' 1e-5 or the general 1e-4), 5x inside
      CHECK(margin == k::kScreenMargin || margin == k::kScreenTableMargin);
      const double max_rel = margin / 5;
      const double rel = e.sum > 0 ? std::abs(est - e.sum) / e.sum : std::abs(est);
      double& worst = margin == k::kScreenMargin ? worst_general : worst_table;
      worst = std::max(worst, rel);
      tables += margin == k::kScreenTableMargin ? 1 : 0;
      if (!(rel <= max_rel)) {
        std::printf("  %s: trial %d rel error %.3g (norm %g, scale %g)\n", name, trial, rel, norm,
                    double(scale));
        CHECK(rel <= max_rel);
      }
    }
    std::printf("  %s: worst relative error, general estimate %.3g (bound %.3g), tables %.3g "
                "(bound %.3g, %d of 600 rows)\n",
                name, worst_general, k::kScreenMargin / 5, worst_table,
                k::kScreenTableMargin / 5, tables);
    // the AVX copies take the tables unless a row reaches past their range
    if (std::string(name) != "generic") CHECK(tables > 400 && tables < 600);
  }
}

OBC_TEST(every_lane_position_within_bound) {
  // one term value at every position of rows of 1..40 zeros-on-grid: each SIMD lane and tail
  for (const auto& [name, table] : copies()) {
    for (const double norm : {1.0, 2.0, 2.4, 3.3, 4.0}) {
      for (KIndex len = 1; len <= 40; ++len) {
        for (KIndex pos = 0; pos < len; ++pos) {
          std::vector<float> w(static_cast<size_t>(len), 3.0f);  // on the grid: error 0
          w[static_cast<size_t>(pos)] = 3.0f + 0.3173f + 0.001f * float(pos);
          const Exact e = exact_scaled_error(w, 1.0f, 8, 15, norm);
          KIndex small = 0;
          bool complete = false;
      double margin = 0;
          const double est = table->scaled_error(w.data(), len, 1.0f, 8, 15,
                                                 k::make_screen_pow(norm), amax_of(w),
                                                 std::numeric_limits<double>::infinity(), &small,
                                                 &complete, &margin);
          CHECK(complete && small == len - 1);
          CHECK_NEAR(est, e.sum, margin / 5);
          (void)name;
        }
      }
    }
  }
}

OBC_TEST(early_stop_returns_a_partial_sum_above_the_limit) {
  std::vector<float> w(1000);
  for (size_t j = 0; j < w.size(); ++j) w[j] = 0.4f + 0.0001f * float(j % 7);  // u ~ 0.4 each
  for (const auto& [name, table] : copies()) {
    KIndex small = 0;
    bool complete = true;
    double margin = 0;
    const double est = table->scaled_error(w.data(), KIndex(w.size()), 1.0f, 0, 15,
                                           k::make_screen_pow(2.0), amax_of(w), 10.0, &small,
                                           &complete, &margin);
    CHECK(!complete);
    CHECK(est > 10.0);
    CHECK(est < 0.41 * 0.41 * 1000);
    (void)name;
  }
}

OBC_TEST(screen_pow_tables_fit_every_norm) {
  // The polynomial for m^norm (float coefficients, float Horner) within its measured bound, and
  // that bound far inside the fit's budget, for integer and fractional norms; the tables' u^norm
  // against std::pow over the whole range they serve, u in [2^-20, 2^12).
  for (const double norm : {1.0, 1.2, 1.5, 2.0, 2.4, 2.7, 3.0, 3.3, 3.9, 4.0}) {
    const k::ScreenPow pw = k::make_screen_pow(norm);
    CHECK(pw.usable);
    CHECK(pw.max_rel_error <= 1e-6);
    std::mt19937_64 rng(static_cast<unsigned>(norm * 100));
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    double worst = 0;
    for (int i = 0; i < 20000; ++i) {
      const float u = static_cast<float>(std::exp2(-20 + 32 * unit(rng)));
      if (!(u >= 0x1p-20f && u < 0x1p12f)) continue;
      int e = 0;
      const float m = 2 * std::frexp(u, &e);  // u = m 2^(e - 1), m in [1, 2)
      const float t = m - 1.5f;
      float p = pw.coef[k::kScreenPolyDegree];
      for (int c = k::kScreenPolyDegree - 1; c >= 0; --c) p = std::fma(p, t, pw.coef[c]);
      const int biased = e - 1 + 127;
      const float est32 = p * pw.exp32[biased & 31];
      const float est8 = p * (pw.exp_lo[biased & 7] * pw.exp_hi[(biased >> 3) & 7]);
      const double exact = std::pow(static_cast<double>(u), norm);
      const double rel = std::max(std::abs(est32 - exact), std::abs(est8 - exact)) / exact;
      worst = std::max(worst, rel);
    }
    CHECK(worst <= pw.max_rel_error + 0x1p-24);
    std::printf("  norm %g: polynomial bound %.3g, worst table estimate %.3g\n", norm,
                pw.max_rel_error, worst);
  }
  // outside [1, 4] the tables are not used (the fit falls back to its plain scan there anyway)
  CHECK(!k::make_screen_pow(0.5).usable);
  CHECK(!k::make_screen_pow(4.5).usable);
}

OBC_TEST(rounding_ties_choose_the_division_codes) {
  // Weights at and a few ulps around (n + 1/2) scale, where w * (1 / scale) and w / scale may
  // round to different integers: the kernels must take the division's (GridPoint::quantize's)
  // codes, or a term's error jumps by about one step and the estimate leaves its bound.
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (const auto& [name, table] : copies()) {
    for (int trial = 0; trial < 3000; ++trial) {
      // half the trials on 8-bit grids with codes 100..254 (|w / scale| large): there the two
      // codes of a tie leave |q - w| apart by ~1e-5 relative or more, beyond the bound. Each
      // row repeats one weight 32 times (every lane and the AVX2 tail), so a wrong code is
      // not averaged away.
      const bool wide = trial % 2 == 0;
      const int bits = wide ? 8 : 2 + trial % 7, maxq = (1 << bits) - 1;
      const int zero = wide ? 0 : trial % 4 == 1 ? 0 : maxq / 2;
      const float scale =
          trial % 5 == 1 ? 0.25f : static_cast<float>(std::exp2(-40 + 80 * unit(rng)));
      const double norm = trial % 4 == 0 ? 2.4 : 1.0 + 3.0 * unit(rng);
      const KIndex len = 32 + trial % 7;
      const double n = wide ? std::floor(100 + 154 * unit(rng))
                            : std::floor(-zero - 2 + (maxq + 4) * unit(rng));
      float x = static_cast<float>((n + 0.5) * scale);
      for (int ulps = static_cast<int>(unit(rng) * 9) - 4; ulps != 0; ulps += ulps > 0 ? -1 : 1)
        x = std::nextafter(x, ulps > 0 ? INFINITY : -INFINITY);
      const std::vector<float> w(static_cast<size_t>(len), x);
      const Exact e = exact_scaled_error(w, scale, zero, maxq, norm);
      const auto [est, small, complete, margin] = screen_whole_row(*table, w, scale, zero, maxq, norm);
      CHECK(complete && small == e.small);
      const double rel = e.sum > 0 ? std::abs(est - e.sum) / e.sum : std::abs(est);
      if (!(rel <= margin / 5))
        std::printf("  %s: trial %d rel error %.3g (scale %g)\n", name, trial, rel, double(scale));
      CHECK(rel <= margin / 5);
    }
  }
}

// float64 weights (scaled_error_f64): the same quantity with GridPoint<double>'s code and
// difference; a term counts as small where its u, rounded to float as the kernels round it, is
// below kScreenSmall.
Exact exact_scaled_error_f64(const std::vector<double>& w, double scale, int zero, int maxq,
                             double norm) {
  Exact e;
  for (const double x : w) {
    const double c =
        std::fmin(std::fmax(std::nearbyint(x / scale) + double(zero), 0.0), double(maxq));
    const double d = std::fabs(scale * (c - double(zero)) - x);
    if (static_cast<float>(d * (1.0 / scale)) < k::kScreenSmall) {
      ++e.small;
    } else {
      e.sum += std::pow(d, norm) / std::pow(scale, norm);
    }
  }
  return e;
}

Screened screen_whole_row_f64(const k::GridScreenKernels& table, const std::vector<double>& w,
                              double scale, int zero, int maxq, double norm) {
  double amax = 0;
  for (const double x : w) amax = std::max(amax, std::fabs(x));
  Screened s;
  s.estimate = table.scaled_error_f64(w.data(), KIndex(w.size()), scale, zero, maxq,
                                      k::make_screen_pow(norm), amax,
                                      std::numeric_limits<double>::infinity(), &s.small,
                                      &s.complete, &s.margin);
  return s;
}

OBC_TEST(f64_estimate_within_bound_on_random_rows) {
  // as estimate_within_bound_on_random_rows, float64 weights: rounding errors down to 2^-50 of
  // a step (below float32's resolution), so u's rounding to float is exercised too
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (const auto& [name, table] : copies()) {
    double worst = 0;
    int tables = 0;
    for (int trial = 0; trial < 600; ++trial) {
      const int bits = 2 + trial % 7, maxq = (1 << bits) - 1;
      const int zero =
          trial % 3 == 0 ? (1 << (bits - 1)) : int(unit(rng) * (maxq + 1)) % (maxq + 1);
      const double scale = std::exp2(-70 + 140 * unit(rng)) * (1 + 1e-9 * unit(rng));
      const double norm = trial % 5 == 0 ? 1.0 : trial % 5 == 1 ? 4.0 : 1.0 + 3.0 * unit(rng);
      const KIndex len = 1 + static_cast<KIndex>(unit(rng) * 300);
      const std::vector<double> w = random_row<double>(rng, len, trial, scale, zero, maxq, -50);
      const Exact e = exact_scaled_error_f64(w, scale, zero, maxq, norm);
      const auto [est, small, complete, margin] =
          screen_whole_row_f64(*table, w, scale, zero, maxq, norm);
      CHECK(complete);
      CHECK(small == e.small);
      CHECK(margin == k::kScreenMargin || margin == k::kScreenTableMargin);
      const double rel = e.sum > 0 ? std::abs(est - e.sum) / e.sum : std::abs(est);
      worst = std::max(worst, rel / margin);
      tables += margin == k::kScreenTableMargin ? 1 : 0;
      if (!(rel <= margin / 5)) {
        std::printf("  %s f64: trial %d rel error %.3g (norm %g, scale %g)\n", name, trial, rel,
                    norm, scale);
        CHECK(rel <= margin / 5);
      }
    }
    std::printf("  %s f64: worst relative error / margin %.3g (%d of 600 rows by the tables)\n",
                name, worst, tables);
    if (std::string(name) != "generic") CHECK(tables > 400 && tables < 600);
  }
}

OBC_TEST(f64_every_lane_position_and_early_stop) {
  for (const auto& [name, table] : copies()) {
    for (const double norm : {1.0, 2.4, 4.0}) {
      for (KIndex len = 1; len <= 40; ++len) {
        for (KIndex pos = 0; pos < len; ++pos) {
          std::vector<double> w(static_cast<size_t>(len), 3.0);  // on the grid: error 0
          w[static_cast<size_t>(pos)] = 3.0 + 0.3173 + 0.001 * double(pos);
          const Exact e = exact_scaled_error_f64(w, 1.0, 8, 15, norm);
          const auto [est, small, complete, margin] =
              screen_whole_row_f64(*table, w, 1.0, 8, 15, norm);
          CHECK(complete && small == len - 1);
          CHECK_NEAR(est, e.sum, margin / 5);
        }
      }
    }
    std::vector<double> w(1000);
    for (size_t j = 0; j < w.size(); ++j) w[j] = 0.4 + 0.0001 * double(j % 7);
    KIndex small = 0;
    bool complete = true;
    double margin = 0;
    const double est = table->scaled_error_f64(w.data(), KIndex(w.size()), 1.0, 0, 15,
                                               k::make_screen_pow(2.0), 0.41, 10.0, &small,
                                               &complete, &margin);
    CHECK(!complete);
    CHECK(est > 10.0);
    CHECK(est < 0.41 * 0.41 * 1000);
    (void)name;
  }
}

OBC_TEST(f64_rounding_ties_choose_the_division_codes) {
  // rounding_ties_choose_the_division_codes for float64 weights: a few double ulps around
  // (n + 1/2) scale, where w * (1 / scale) and w / scale may round apart (in double a flipped
  // code would stay inside the bound too, see grid_screen.cpp: this checks the bound there)
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (const auto& [name, table] : copies()) {
    int ties = 0;
    for (int trial = 0; trial < 3000; ++trial) {
      const bool wide = trial % 2 == 0;
      const int bits = wide ? 8 : 2 + trial % 7, maxq = (1 << bits) - 1;
      const int zero = wide ? 0 : trial % 4 == 1 ? 0 : maxq / 2;
      const double scale =
          trial % 5 == 1 ? 0.25 : std::exp2(-40 + 80 * unit(rng)) * (1 + unit(rng));
      const double norm = trial % 4 == 0 ? 2.4 : 1.0 + 3.0 * unit(rng);
      const KIndex len = 32 + trial % 7;
      const double n = wide ? std::floor(100 + 154 * unit(rng))
                            : std::floor(-zero - 2 + (maxq + 4) * unit(rng));
      double x = (n + 0.5) * scale;
      for (int ulps = static_cast<int>(unit(rng) * 9) - 4; ulps != 0; ulps += ulps > 0 ? -1 : 1)
        x = std::nextafter(x, ulps > 0 ? INFINITY : -INFINITY);
      ties += std::nearbyint(x / scale) != std::nearbyint(x * (1.0 / scale)) ? 1 : 0;
      const std::vector<double> w(static_cast<size_t>(len), x);
      const Exact e = exact_scaled_error_f64(w, scale, zero, maxq, norm);
      const auto [est, small, complete, margin] =
          screen_whole_row_f64(*table, w, scale, zero, maxq, norm);
      CHECK(complete && small == e.small);
      const double rel = e.sum > 0 ? std::abs(est - e.sum) / e.sum : std::abs(est);
      if (!(rel <= margin / 5))
        std::printf("  %s f64: trial %d rel error %.3g (scale %g)\n", name, trial, rel, scale);
      CHECK(rel <= margin / 5);
    }
    std::printf("  %s f64: %d of 3000 rows where the product and the division round apart\n",
                name, ties);
  }
}

}  // namespace

OBC_TEST_MAIN

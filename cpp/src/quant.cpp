// OBQ: quantization grids, round-to-nearest, and the greedy exact quantizer.
#include "obc/quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include <Eigen/LU>

#include "internal/grid_point.hpp"
#include "internal/grid_screen.hpp"
#include "internal/prepared_view.hpp"
#include "internal/prune_result.hpp"
#include "internal/quant_common.hpp"
#include "internal/quant_entry.hpp"
#include "internal/row_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

using internal::GridPoint;

namespace {

// The grid for range [xmin, xmax] (xmin <= 0 <= xmax); sym uses max(|xmin|, xmax).
template <class Scalar>
GridPoint<Scalar> grid_for_range(double xmin, double xmax, int bits, bool sym) {
  const int maxq = (1 << bits) - 1;
  GridPoint<Scalar> g{Scalar(1), 0, maxq};
  if (sym) {
    const double amax = std::max(-xmin, xmax);
    g.zero = 1 << (bits - 1);
    if (amax > 0) g.scale = static_cast<Scalar>(amax / static_cast<double>(g.zero - 1));
  } else {
    if (xmax > xmin) {
      g.scale = static_cast<Scalar>((xmax - xmin) / maxq);
      const double z = std::nearbyint(-xmin / static_cast<double>(g.scale));
      g.zero = static_cast<int>(std::clamp(z, 0.0, static_cast<double>(maxq)));
    }
  }
  if (!(g.scale > Scalar(0)) || !std::isfinite(static_cast<double>(g.scale))) g.scale = Scalar(1);
  return g;
}

constexpr int kMseSteps = 80;  // shrink factors p = 1 - i / 100, i < kMseSteps

// sum_j |q(w_j) - w_j|^norm on grid g, in index order; stops early (returning a value above
// `bound`) once the partial sum exceeds `bound`: the terms are >= 0, so the full sum would too.
// The partial sums are those of the full loop, so whatever is compared is computed identically.
template <class Scalar>
double grid_error(const Scalar* w, Index len, const GridPoint<Scalar>& g, double norm,
                  double bound) {
  constexpr Index kCheck = 32;  // terms between two comparisons with the bound
  double err = 0;
  for (Index j0 = 0; j0 < len; j0 += kCheck) {
    for (Index j = j0; j < std::min(len, j0 + kCheck); ++j) {
      const double d = std::abs(static_cast<double>(g.quantize(w[j]) - w[j]));
      if (d != 0) err += std::pow(d, norm);  // pow(0, norm > 0) is 0: adding it changes nothing
    }
    if (err > bound) return err;
  }
  return err;
}

// Whether the screening applies (float32 and float64 weights alike): a norm in [1, 4] and
// max |w| in [2^-60, 2^60], which keep every scale, 1 / scale and u^norm in pow_estimate's range
// (u <= 1300: clamped weights are at most (1 - 0.21) / 0.21 ranges of 255 steps away). Short
// groups are not worth it.
bool can_screen(bool finite, double amax, Index len, double norm) {
  if (!(norm >= 1.0 && norm <= 4.0) || len < 64 || !finite) return false;
  return amax >= 0x1p-60 && amax <= 0x1p60;
}

// xmin = min(0, w_j), xmax = max(0, w_j) over w[0, len) with the comparisons of std::min /
// std::max (a NaN never replaces the running value), and whether every w_j is finite; one pass
// with 8 independent chains (one chain of min / max costs its latency per weight: ~4 cycles,
// a fifth of a 128-group's fit). Min and max do not depend on the order of the comparisons.
template <class Scalar>
void range_of(const Scalar* w, Index len, double& xmin, double& xmax, bool& finite) {
  constexpr int kLanes = 8;
  Scalar lo[kLanes] = {}, hi[kLanes] = {};
  bool ok[kLanes];
  std::fill(ok, ok + kLanes, true);
  const Scalar big = std::numeric_limits<Scalar>::max();
  Index j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const Scalar x = w[j + l];
      lo[l] = x < lo[l] ? x : lo[l];
      hi[l] = hi[l] < x ? x : hi[l];
      ok[l] = ok[l] && std::abs(x) <= big;  // false for NaN and infinities
    }
  for (; j < len; ++j) {
    const Scalar x = w[j];
    lo[0] = x < lo[0] ? x : lo[0];
    hi[0] = hi[0] < x ? x : hi[0];
    ok[0] = ok[0] && std::abs(x) <= big;
  }
  xmin = 0;
  xmax = 0;
  finite = true;
  for (int l = 0; l < kLanes; ++l) {
    xmin = std::min(xmin, static_cast<double>(lo[l]));
    xmax = std::max(xmax, static_cast<double>(hi[l]));
    finite = finite && ok[l];
  }
}

// The weights a shrunk range can clip (beyond 0.21 of xmin or xmax: clipped at some step) first,
// then the others, each part in index order, in a per-thread buffer; `w` itself when there are
// none or too many. Only the screening reads this order: its sum is a bound whatever the order,
// and with the clipped weights first, a strongly shrunk range's partial sum passes the stop
// limit after a few terms instead of a share of the row (the exact sums keep index order).
template <class Scalar>
const Scalar* outliers_first(const Scalar* w, Index len, double xmin, double xmax) {
  if (len < 512) return w;  // groups: the extra pass costs more than it saves
  const Scalar lo = static_cast<Scalar>(0.21 * xmin), hi = static_cast<Scalar>(0.21 * xmax);
  Index n_out = 0;
  for (Index j = 0; j < len; ++j) n_out += (w[j] < lo || w[j] > hi) ? 1 : 0;
  if (n_out == 0 || n_out > len / 4) return w;
  thread_local std::vector<Scalar> buffer;
  buffer.resize(static_cast<size_t>(len));
  Index a = 0, b = n_out;
  for (Index j = 0; j < len; ++j) {
    const Index at = (w[j] < lo || w[j] > hi) ? a++ : b++;
    buffer[static_cast<size_t>(at)] = w[j];
  }
  return buffer.data();
}

// scale^norm for the screen's bounds, within ~5e-7 relative (the polynomial's interpolation
// error and its float coefficients; ScreenPow::max_rel_error bounds it with float Horner on
// top): scale = m 2^e, m^norm by the screen's polynomial evaluated in double, 2^(e norm) by
// std::exp2 once per exponent. Used for scale_0 of each row / group (and for the shrunk scales
// where the shortcut in fit_grid does not apply): 80 std::pow per row / group were about a
// fifth of a 128-group's fit.
struct ScalePow {
  int e = std::numeric_limits<int>::min();
  double two_en = 0;
  double operator()(float scale, const internal::ScreenPow& pw) {
    // scale is a normal float (2^-80..2^80): exponent and mantissa from its bits
    std::uint32_t bits;
    std::memcpy(&bits, &scale, sizeof bits);
    const int exponent = static_cast<int>(bits >> 23) - 127;
    const std::uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;
    float mf;
    std::memcpy(&mf, &mbits, sizeof mf);
    const double m = mf;  // in [1, 2)
    if (exponent != e) {
      e = exponent;
      two_en = std::exp2(e * pw.norm_exact);
    }
    const double t = m - 1.5;
    double p = pw.coef[internal::kScreenPolyDegree];
    for (int k = internal::kScreenPolyDegree - 1; k >= 0; --k) p = p * t + pw.coef[k];
    return p * two_en;
  }
};

// The grid of one row / group. MSE: of the kMseSteps shrunk ranges, the one with the smallest
// error (the first on ties). `guess` (a step index; only speed depends on it) is evaluated first,
// so that its error bounds every other candidate's partial sum and most of them stop early; on
// return it holds the chosen step, a good guess for the next row of similar weights. Rows are
// screened first (internal/grid_screen.hpp: an estimate of every candidate's error, cheap and
// vectorized, with a proven relative error bound): only the candidates that can still be the
// exact minimum are summed with std::pow, so the choice is the exact scan's; when one candidate
// is left (the usual case) it is the minimum and nothing is summed exactly. float64 rows too:
// without the screen, their 80 exact sums of std::pow were ~3/4 of a float64 GPTQ call (8x the
// float32 call's time at 2048 x 2048).
template <class Scalar>
GridPoint<Scalar> fit_grid(const Scalar* w, Index len, const QuantOptions& opt,
                           const internal::ScreenPow& pw, int& guess) {
  double xmin = 0, xmax = 0;
  bool finite = true;
  range_of(w, len, xmin, xmax, finite);
  if (opt.grid == GridSearch::MinMax) return grid_for_range<Scalar>(xmin, xmax, opt.bits, opt.sym);
  const auto grid_at_step = [&](int i) {
    const double p = 1.0 - i / 100.0;
    return grid_for_range<Scalar>(p * xmin, p * xmax, opt.bits, opt.sym);
  };
  bool candidate[kMseSteps];
  std::fill(candidate, candidate + kMseSteps, true);
  int first = std::clamp(guess, 0, kMseSteps - 1);
  {
    if (can_screen(finite, std::max(-xmin, xmax), len, opt.mse_norm)) {
      // exact_i >= low_i = (1 - m) est_i (zeroed terms only lower the estimate) and
      // exact_i <= high_i = (1 + m) (est_i + small_i kSmall^norm): a candidate whose low bound
      // is above the lowest high bound cannot be the minimum. m: the kernel's bound for the
      // estimate it took (1e-5 for the AVX2 / AVX-512 tables, 1e-4 for the general one), which
      // also covers unit's error (ScalePow, ~5e-7).
      double low[kMseSteps], lowest_high = std::numeric_limits<double>::infinity();
      const double small_term = pw.usable ? pw.small_term
                                          : std::pow(static_cast<double>(internal::kScreenSmall),
                                                     opt.mse_norm);
      // Every step's grid, scale^norm and stop factor first: independent of one another, so
      // they overlap, while the screening loop below is one chain (each stop limit depends on
      // the previous estimates).
      GridPoint<Scalar> grids[kMseSteps];
      double units[kMseSteps], stop_factor[kMseSteps];
      ScalePow scale_pow;
      // scale^norm: float32 scales by ScalePow's table; a float64 scale has no float bits to
      // split, so std::pow (one per row / group with the shortcut below).
      const auto scale_unit = [&](Scalar scale) {
        if constexpr (std::is_same_v<Scalar, float>)
          return scale_pow(scale, pw);
        else
          return std::pow(static_cast<double>(scale), opt.mse_norm);
      };
      double unit0 = 0;
      for (int i = 0; i < kMseSteps; ++i) {
        grids[i] = grid_at_step(i);
        // scale_i is (1 - i/100) scale_0 up to two float roundings: scale_i^norm is
        // shrink_pow[i] scale_0^norm times c^norm, c = scale_i / ((1 - i/100) scale_0) within
        // 2^-22 of 1, c^norm = 1 + norm (c - 1) to 1e-12; other ratios (the scale = 1
        // fallback of an empty range): ScalePow.
        const double c = i == 0 ? 1.0
                                 : static_cast<double>(grids[i].scale) /
                                       ((1.0 - i / 100.0) * static_cast<double>(grids[0].scale));
        if (!pw.usable) {
          units[i] = std::pow(static_cast<double>(grids[i].scale), opt.mse_norm);
        } else if (i == 0) {
          units[i] = unit0 = scale_unit(grids[i].scale);
        } else if (std::abs(c - 1) <= 0x1p-22) {
          units[i] = unit0 * pw.shrink_pow[i] * (1 + pw.norm_exact * (c - 1));
        } else {
          units[i] = scale_unit(grids[i].scale);
        }
        // est * unit * (1 - m) > lowest_high excludes i, so the estimate may stop above
        // lowest_high * stop_factor (m <= kScreenMargin, whichever estimate the kernel takes;
        // the product's rounding only moves the stop: low[i] below decides).
        stop_factor[i] = 1 / ((1 - internal::kScreenMargin) * units[i]);
      }
      const Scalar* screened = outliers_first<Scalar>(w, len, xmin, xmax);
      const Scalar amax = static_cast<Scalar>(std::max(-xmin, xmax));  // exact: a weight's |w|
      const internal::GridScreenKernels& screen = internal::grid_screen_kernels();
      const int start = first;  // the guess first: its high bound cuts the others short
      for (int n = 0; n < kMseSteps; ++n) {
        const int i = (start + n) % kMseSteps;
        const GridPoint<Scalar>& g = grids[i];
        const double unit = units[i];
        const double stop = lowest_high * stop_factor[i];
        Index small = 0;
        bool complete = false;
        double m = internal::kScreenMargin;
        double est = 0;
        if constexpr (std::is_same_v<Scalar, float>)
          est = screen.scaled_error(screened, len, g.scale, g.zero, g.maxq, pw, amax, stop,
                                    &small, &complete, &m);
        else
          est = screen.scaled_error_f64(screened, len, g.scale, g.zero, g.maxq, pw, amax, stop,
                                        &small, &complete, &m);
        low[i] = (1 - m) * est * unit;
        // Only a complete sum bounds the exact error from above.
        const double high = (1 + m) * (est + static_cast<double>(small) * small_term) * unit;
        if (complete && high < lowest_high) {
          lowest_high = high;
          first = i;
        }
      }
      int candidates = 0;
      for (int i = 0; i < kMseSteps; ++i) {
        candidate[i] = !(low[i] > lowest_high);
        candidates += candidate[i] ? 1 : 0;
      }
      // `first` (lowest high bound) is always a candidate; alone, every other step's exact
      // error is above its high bound, so it is the strict minimum: no exact sum is needed.
      if (candidates == 1 && std::isfinite(lowest_high)) {
        guess = first;
        return grid_at_step(first);
      }
    }
  }
  const double inf = std::numeric_limits<double>::infinity();
  int best = first;
  double best_err = grid_error<Scalar>(w, len, grid_at_step(first), opt.mse_norm, inf);
  if (std::isnan(best_err)) {  // non-finite weights: no bound; keep the plain scan's choice
    std::fill(candidate, candidate + kMseSteps, true);
    best = 0;
    best_err = grid_error<Scalar>(w, len, grid_at_step(0), opt.mse_norm, inf);
  }
  // Same choice as a plain scan keeping strictly smaller errors: the smallest error, lowest step
  // among equal ones. A step before `best` wins a tie, so it may only stop once it is above.
  for (int i = 0; i < kMseSteps; ++i) {
    if (i == first || !candidate[i]) continue;
    const double err = grid_error<Scalar>(w, len, grid_at_step(i), opt.mse_norm, best_err);
    if (err < best_err || (err == best_err && i < best)) {
      best_err = err;
      best = i;
    }
  }
  guess = best;
  return grid_at_step(best);
}

// The reference fit_grid must match bit for bit: every one of the kMseSteps errors summed in
// full with std::pow, no early exit, no screening, the first smallest error kept.
template <class Scalar>
GridPoint<Scalar> fit_grid_plain_scan(const Scalar* w, Index len, const QuantOptions& opt) {
  double xmin = 0, xmax = 0;
  for (Index i = 0; i < len; ++i) {
    xmin = std::min(xmin, static_cast<double>(w[i]));
    xmax = std::max(xmax, static_cast<double>(w[i]));
  }
  if (opt.grid == GridSearch::MinMax) return grid_for_range<Scalar>(xmin, xmax, opt.bits, opt.sym);
  const double inf = std::numeric_limits<double>::infinity();
  GridPoint<Scalar> best{};
  double best_err = 0;
  for (int i = 0; i < kMseSteps; ++i) {
    const double p = 1.0 - i / 100.0;
    const GridPoint<Scalar> g = grid_for_range<Scalar>(p * xmin, p * xmax, opt.bits, opt.sym);
    const double err = grid_error<Scalar>(w, len, g, opt.mse_norm, inf);
    if (i == 0 || err < best_err) {
      best = g;
      best_err = err;
    }
  }
  return best;
}

// make_grid's body, fitting each row / group by fit_grid or by the plain scan.
template <class Scalar, bool kPlainScan>
QuantGrid<Scalar> make_grid_with(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const QuantOptions& opt, int num_threads,
                                 InterruptHook* interrupt);

}  // namespace

namespace internal {

namespace {

// Rows per parallel item of the O(rows cols) passes over a result (fill_codes, pruned_mask).
constexpr Index kPassRows = 256;

// Threads for such a pass: a parallel region costs more than a small layer's pass.
template <class M>
int pass_threads(const M& W, int num_threads) {
  return W.rows() * W.cols() < (Index(1) << 20) ? 1 : num_threads;
}

}  // namespace

// The screening compiled for the ISA the row kernels use (so OBC_SIMD=generic applies here too),
// with AVX-512 where the other kernels with such a copy use it (OBC_SIMD=avx2 turns it off).
const char* grid_screen_isa() {
#ifdef OBC_HAVE_AVX2_KERNELS
  if (std::strcmp(kernels().isa, "generic") != 0)
    return use_avx512_kernels() ? "avx512" : "avx2+fma";
#endif
  return "generic";
}

namespace {

// The tables of make_screen_pow for one norm (see ScreenPow).
ScreenPow fit_screen_pow(double norm) {
  ScreenPow pw;
  pw.norm = static_cast<float>(norm);
  pw.norm_exact = norm;
  if (!(norm >= 1.0 && norm <= 4.0)) return pw;
  // Interpolation of (1.5 + t)^norm at the Chebyshev nodes of [-1/2, 1/2] (close to the best
  // polynomial of this degree: relative error ~6e-8 at norm 2.4), solved for the monomial
  // coefficients in t (7 x 7, nodes spread: well conditioned in double).
  constexpr int n = kScreenPolyDegree + 1;
  Eigen::Matrix<double, n, n> V;
  Eigen::Matrix<double, n, 1> f;
  for (int i = 0; i < n; ++i) {
    const double t = 0.5 * std::cos((2 * i + 1) * 3.14159265358979323846 / (2 * n));
    double tk = 1;
    for (int k = 0; k < n; ++k, tk *= t) V(i, k) = tk;
    f(i) = std::pow(1.5 + t, norm);
  }
  const Eigen::Matrix<double, n, 1> c = V.fullPivLu().solve(f);
  for (int k = 0; k < n; ++k) pw.coef[k] = static_cast<float>(c(k));
  // The error of what the kernels compute: float Horner by fused multiply-adds on t = m - 1.5
  // (exact), against std::pow, on 2^13 + 1 points of [1, 2] and the top mantissa.
  double worst = 0;
  constexpr int kPoints = 1 << 13;
  for (int i = 0; i <= kPoints; ++i) {
    const float m = i == kPoints ? std::nextafter(2.0f, 0.0f) : 1.0f + float(i) / kPoints;
    const float t = m - 1.5f;
    float p = pw.coef[kScreenPolyDegree];
    for (int k = kScreenPolyDegree - 1; k >= 0; --k) p = std::fma(p, t, pw.coef[k]);
    const double exact = std::pow(static_cast<double>(m), norm);
    worst = std::max(worst, std::abs(static_cast<double>(p) - exact) / exact);
  }
  // The table entries (rounded once each) and the product with them (AVX2: two entries, two
  // products) add at most 3 roundings of 2^-24.
  pw.max_rel_error = worst + 3 * 0x1p-24;
  for (int e = -20; e <= 11; ++e)
    pw.exp32[(e + 127) & 31] = static_cast<float>(std::exp2(e * norm));
  for (int l = 0; l < 8; ++l) pw.exp_lo[l] = static_cast<float>(std::exp2(l * norm));
  for (int h = 13; h <= 17; ++h) pw.exp_hi[h & 7] = static_cast<float>(std::exp2((8 * h - 127) * norm));
  pw.small_term = std::pow(static_cast<double>(kScreenSmall), norm);
  for (int i = 0; i < 80; ++i) pw.shrink_pow[i] = std::pow(1.0 - i / 100.0, norm);
  pw.usable = pw.max_rel_error <= 1e-6;
  return pw;
}

}  // namespace

ScreenPow make_screen_pow(double norm) {
  // One norm per call of make_grid, nearly always the same few: keep the last 8 norms' tables
  // (fitting and checking one costs ~0.2 ms, far more than a small layer's fit).
  static std::mutex mutex;
  static std::pair<double, ScreenPow> cache[8];
  static int filled = 0, next = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < filled; ++i)
      if (cache[i].first == norm) return cache[i].second;
  }
  const ScreenPow pw = fit_screen_pow(norm);
  std::lock_guard<std::mutex> lock(mutex);
  cache[next] = {norm, pw};
  next = (next + 1) % 8;
  filled = std::min(filled + 1, 8);
  return pw;
}

const GridScreenKernels& grid_screen_kernels() {
  static const GridScreenKernels& table = [] () -> const GridScreenKernels& {
#ifdef OBC_HAVE_AVX2_KERNELS
    if (std::strcmp(grid_screen_isa(), "avx512") == 0) return grid_screen_kernels_avx512();
    if (std::strcmp(grid_screen_isa(), "avx2+fma") == 0) return grid_screen_kernels_avx2();
#endif
    return grid_screen_kernels_generic();
  }();
  return table;
}

void check_quant_options(const QuantOptions& opt, Index cols) {
  OBC_CHECK(opt.bits >= 2 && opt.bits <= 8, "bits: expected an integer in 2..8, got ", opt.bits);
  OBC_CHECK(opt.group_size >= 0 && (opt.group_size == 0 || cols % opt.group_size == 0),
            "group_size: expected None/0 or a positive divisor of cols (", cols, "), got ",
            opt.group_size);
  OBC_CHECK(std::isfinite(opt.mse_norm) && opt.mse_norm > 0, "mse_norm: expected > 0, got ",
            opt.mse_norm);
  OBC_CHECK(std::isfinite(opt.outlier_tol) && opt.outlier_tol >= 0,
            "outlier_tol: expected >= 0, got ", opt.outlier_tol);
}

template <class Scalar>
void fill_codes(QuantResult<Scalar>& result, int num_threads) {
  const auto& W = result.weight;
  result.codes.resize(W.rows(), W.cols());
  // Each entry on its own: any thread count gives the same codes. GridPoint::code's operations
  // (w / scale, round half to even, + zero point, clamp, to integer), a group's entries in one
  // loop that the compiler vectorizes: per entry, grid_at's division of the column by the group
  // size and an out-of-line nearbyint made this pass cost ~50 ms per 16M weights. The rounding is
  // the add-and-subtract of 1.5 * 2^(mantissa bits) (SSE2 has no rounding instruction), exact and
  // equal to nearbyint in the default rounding mode below 2^22 (float) / 2^51 (double); larger
  // quotients are integers already (and clamp anyway).
  constexpr bool f32 = std::is_same_v<Scalar, float>;
  const Scalar shift = f32 ? Scalar(12582912.0) : Scalar(6755399441055744.0);
  const Scalar exact = f32 ? Scalar(4194304.0) : Scalar(2251799813685248.0);
  const Index cols = W.cols(), group = result.grid.group_size;
  const Scalar top = static_cast<Scalar>((1 << result.grid.bits) - 1);
  const Index chunks = (W.rows() + kPassRows - 1) / kPassRows;
  parallel_for(chunks, pass_threads(W, num_threads), nullptr, [&](Index chunk, int) {
    for (Index r = chunk * kPassRows; r < std::min(W.rows(), (chunk + 1) * kPassRows); ++r)
      for (Index g = 0; g < cols / group; ++g) {
        const Scalar scale = result.grid.scale(r, g);
        const Scalar zero = static_cast<Scalar>(result.grid.zero(r, g));
        const Scalar* w = W.data() + r * cols + g * group;
        std::uint8_t* code = result.codes.data() + r * cols + g * group;
        for (Index c = 0; c < group; ++c) {
          const Scalar x = w[c] / scale;
          Scalar v = (std::abs(x) < exact ? (x + shift) - shift : x) + zero;
          v = v < Scalar(0) ? Scalar(0) : v;  // std::clamp's order
          v = top < v ? top : v;
          code[c] = static_cast<std::uint8_t>(static_cast<int>(v));
        }
      }
  });
}

template <class Scalar>
MaskMatrix pruned_mask(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                       const std::vector<char>& dead, int num_threads) {
  MaskMatrix pruned(W.rows(), W.cols());
  const Index chunks = (W.rows() + kPassRows - 1) / kPassRows;
  parallel_for(chunks, pass_threads(W, num_threads), nullptr, [&](Index chunk, int) {
    for (Index r = chunk * kPassRows; r < std::min(W.rows(), (chunk + 1) * kPassRows); ++r)
      for (Index c = 0; c < W.cols(); ++c)
        pruned(r, c) = (W(r, c) == Scalar(0) || dead[static_cast<size_t>(c)]) ? 1 : 0;
  });
  return pruned;
}

template <class Scalar>
void obq_into(const Eigen::Ref<const RowMatrix<Scalar>>& W, PreparedHessian& prep,
              const QuantGrid<Scalar>& grid, const QuantOptions& opt, const RunOptions& run,
              RowMatrix<Scalar>& out) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (prep.hinv_lower_f32.empty()) prep.keep_float32_only();  // kernels are float32
  }
  out.resize(W.rows(), W.cols());
  const internal::ObqJob<Scalar> job{W.data(),          W.rows(),
                                     internal::view_of(prep), grid.scale.data(),
                                     grid.zero.data(),   grid.group_size,
                                     grid.bits,          0.25 * (1.0 + opt.outlier_tol),
                                     out.data()};
  internal::row_kernels<Scalar>().obq(job, run);
}

}  // namespace internal

using internal::check_quant_options;
using internal::fill_codes;
using internal::grid_at;

const char* quant_method_name(QuantMethod method) {
  switch (method) {
    case QuantMethod::Obq: return "obq";
    case QuantMethod::Gptq: return "gptq";
    case QuantMethod::GptqNatural: return "gptq-natural";
    case QuantMethod::Rtn: return "rtn";
  }
  return "unknown";
}


namespace {

template <class Scalar, bool kPlainScan>
QuantGrid<Scalar> make_grid_with(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const QuantOptions& opt, int num_threads,
                                 InterruptHook* interrupt) {
  check_quant_options(opt, W.cols());
  QuantGrid<Scalar> grid;
  grid.bits = opt.bits;
  grid.group_size = opt.group_size == 0 ? W.cols() : opt.group_size;
  const Index groups = W.cols() / grid.group_size;
  grid.scale.resize(W.rows(), groups);
  grid.zero.resize(W.rows(), groups);
  // Rows are independent: fixed chunks of rows, each fitted by one thread. A parallel region
  // costs more than a small layer's MSE search, so those stay on the calling thread.
  constexpr Index kRowsPerItem = 16;
  const Index items = (W.rows() + kRowsPerItem - 1) / kRowsPerItem;
  const double work = static_cast<double>(W.size()) * (opt.grid == GridSearch::Mse ? kMseSteps : 1);
  // The screen's u^norm tables (MSE fits only; fitted once per norm and cached).
  const internal::ScreenPow pw =
      opt.grid == GridSearch::Mse && !kPlainScan
          ? internal::make_screen_pow(opt.mse_norm)
          : internal::ScreenPow{};
  // The calling thread polls `interrupt` between items (16 rows: at most ~0.25 s of the plain
  // scan at 11008 columns, ~10 ms of the fast path).
  parallel_for(items, work < 4e6 ? 1 : num_threads, interrupt, [&](Index item, int) {
    int guess = 15;  // p = 0.85, typical of 3-4 bit MSE grids; the rows' own choices follow
    for (Index r = item * kRowsPerItem; r < std::min(W.rows(), (item + 1) * kRowsPerItem); ++r)
      for (Index g = 0; g < groups; ++g) {
        const Scalar* w = W.row(r).data() + g * grid.group_size;
        const GridPoint<Scalar> p = kPlainScan
                                        ? fit_grid_plain_scan<Scalar>(w, grid.group_size, opt)
                                        : fit_grid<Scalar>(w, grid.group_size, opt, pw, guess);
        grid.scale(r, g) = p.scale;
        grid.zero(r, g) = static_cast<std::uint8_t>(p.zero);
      }
  });
  return grid;
}

}  // namespace

template <class Scalar>
QuantGrid<Scalar> make_grid(const Eigen::Ref<const RowMatrix<Scalar>>& W, const QuantOptions& opt,
                            int num_threads, InterruptHook* interrupt) {
  return make_grid_with<Scalar, false>(W, opt, num_threads, interrupt);
}

template <class Scalar>
QuantGrid<Scalar> detail::make_grid_plain_scan(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                               const QuantOptions& opt, int num_threads,
                                               InterruptHook* interrupt) {
  return make_grid_with<Scalar, true>(W, opt, num_threads, interrupt);
}

template <class Scalar>
QuantResult<Scalar> quantize_rtn(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                 const HessianRef& H,
                                 const QuantOptions& opt, const HessianOptions& hopt,
                                 const RunOptions& run) {
  check_quant_options(opt, W.cols());
  validate_hessian(H, hopt.symmetry_tol);
  internal::check_layer_inputs<Scalar>(W, H.rows());
  QuantResult<Scalar> result;
  result.grid = make_grid<Scalar>(W, opt, run.num_threads, run.interrupt);
  result.weight.resize(W.rows(), W.cols());
  result.pruned.resize(W.rows(), W.cols());
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < W.cols(); ++c) {
      result.weight(r, c) = grid_at(result.grid, r, c).quantize(W(r, c));
      result.pruned(r, c) = W(r, c) == Scalar(0) ? 1 : 0;
    }
  check_finite_result(result.weight, "weights");
  fill_codes(result);
  result.row_losses = row_losses<Scalar>(W, result.weight, H, run.num_threads, run.interrupt);
  result.row_losses_unrefined = result.row_losses;
  result.row_method.setConstant(W.rows(), static_cast<std::uint8_t>(QuantMethod::Rtn));
  return result;
}

template <class Scalar>
QuantResult<Scalar> quantize(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                             const HessianRef& H, const QuantOptions& opt,
                             const HessianOptions& hopt, const RunOptions& run) {
  return internal::quantize_one_method<Scalar>(
      W, H, opt, hopt, run, QuantMethod::Obq, /*invert=*/true, [] {},
      [&](const auto& w, PreparedHessian& prep, const auto& grid, auto& out) {
        internal::obq_into(w, prep, grid, opt, run, out);
        return Eigen::VectorXd();  // no step losses: measured on the weights
      });
}

#define OBC_INSTANTIATE(S)                                                                         \
  template QuantGrid<S> make_grid<S>(const Eigen::Ref<const RowMatrix<S>>&,                        \
                                     const QuantOptions&, int, InterruptHook*);                    \
  template QuantGrid<S> detail::make_grid_plain_scan<S>(const Eigen::Ref<const RowMatrix<S>>&,   \
                                                        const QuantOptions&, int, InterruptHook*); \
  template QuantResult<S> quantize_rtn<S>(const Eigen::Ref<const RowMatrix<S>>&,                   \
                                          const HessianRef&,                                       \
                                          const QuantOptions&, const HessianOptions&,              \
                                          const RunOptions&);                                      \
  template QuantResult<S> quantize<S>(const Eigen::Ref<const RowMatrix<S>>&,                       \
                                      const HessianRef&,                                           \
                                      const QuantOptions&, const HessianOptions&,                  \
                                      const RunOptions&);

#define OBC_INSTANTIATE_INTERNAL(S)                                                                \
  template void internal::fill_codes<S>(QuantResult<S>&, int);                                    \
  template MaskMatrix internal::pruned_mask<S>(const Eigen::Ref<const RowMatrix<S>>&,             \
                                               const std::vector<char>&, int);                    \
  template void internal::obq_into<S>(const Eigen::Ref<const RowMatrix<S>>&, PreparedHessian&,    \
                                      const QuantGrid<S>&, const QuantOptions&,                   \
                                      const RunOptions&, RowMatrix<S>&);

OBC_INSTANTIATE_INTERNAL(float)
OBC_INSTANTIATE_INTERNAL(double)

OBC_INSTANTIATE(float)
OBC_INSTANTIATE(double)

}  // namespace obc

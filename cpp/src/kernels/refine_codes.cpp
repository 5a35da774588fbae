// The refinement's per-code work (internal/refine_kernels.hpp): the GPTQ of a block move's
// proposal and the single-code sweep, compiled once per SIMD level like refine_product.cpp.
// In the baseline (SSE2) build every code paid a libm call for its rounding (nearbyint, floor);
// with SSE4.1 and up they are one instruction, and the short updates run in wider vectors.
// Compiled with -ffp-contract=off (cpp/CMakeLists.txt): every copy must round a * b + c twice,
// as the baseline build does, so that all copies give the same bits.
#include <algorithm>
#include <cassert>
#include <cmath>

#include "internal/grid_point.hpp"
#include "internal/refine_kernels.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

// Below this fraction of scale * h_cc, a gradient entry cannot move its code (see sweep_codes).
constexpr double kStayFraction = 0.49;

// Rows run together by propose_codes: each code's rounding and divisions form a chain of
// dependent operations along its row, so one row at a time leaves the units idle; eight rows
// interleaved keep eight independent chains in flight (and let the compiler use vectors).
constexpr int kLanes = 8;

template <class S>
void propose_codes(const internal::ProposeRows<S>& job) {
  using internal::KIndex;
  const KIndex s0 = job.s0, ns = job.ns, end = s0 + ns;
  assert(ns <= internal::kMaxProposeSub);
  for (KIndex j0 = 0; j0 < job.n; j0 += kLanes) {
    const int lanes = static_cast<int>(std::min<KIndex>(kLanes, job.n - j0));
    // The lanes' x on the sub-block, column-major (lane fastest); unused lanes hold 0 and are
    // never stored.
    double x[internal::kMaxProposeSub][kLanes] = {};
    const S* weight[kLanes];
    const std::uint8_t* pruned[kLanes];
    const S* scale[kLanes];
    const std::uint8_t* zero[kLanes];
    bool changed[kLanes] = {};
    for (int l = 0; l < lanes; ++l) {
      const KIndex j = j0 + l, r = job.rows[j];
      for (KIndex k = s0; k < end; ++k) x[k - s0][l] = job.x[j * job.nb + k];
      weight[l] = job.weight + r * job.cols + job.b0;
      pruned[l] = job.pruned + r * job.cols + job.b0;
      scale[l] = job.scale + r * job.groups;
      zero[l] = job.zero + r * job.groups;
    }
    for (KIndex k = s0; k < end; ++k) {
      const KIndex group = (job.b0 + k) / job.group_size;
      const double* u = job.upper + k * job.nb;
      const double ukk = u[k];
      double err[kLanes] = {};
      for (int l = 0; l < lanes; ++l) {
        const KIndex j = j0 + l;
        const GridPoint<S> gp{scale[l][group], static_cast<int>(zero[l][group]), job.maxq};
        const double xk = x[k - s0][l];
        const S q = pruned[l][k] ? S(0) : gp.quantize(static_cast<S>(xk));
        job.codes[j * job.nb + k] = q;
        const double dk = static_cast<double>(q) - static_cast<double>(weight[l][k]);
        job.changes[j * job.nb + k] = dk;
        changed[l] |= dk != 0.0;
        err[l] = (xk - static_cast<double>(q)) / ukk;
        job.errors[j * job.ld_errors + k - s0] = err[l];
      }
      // Element-wise (no sums), so the vector width does not change the bits.
      for (KIndex t = k + 1; t < end; ++t) {
        const double ut = u[t];
        for (int l = 0; l < kLanes; ++l) x[t - s0][l] -= err[l] * ut;
      }
    }
    for (int l = 0; l < lanes; ++l) {
      const KIndex j = j0 + l;
      for (KIndex k = s0; k < end; ++k) job.x[j * job.nb + k] = x[k - s0][l];
      if (changed[l]) job.changed[j] = 1;
    }
  }
}

template <class S>
internal::KIndex sweep_codes(const internal::SweepRow<S>& job) {
  double* g = job.g;
  internal::KIndex moves = 0;
  internal::KIndex c = job.c0;
  const internal::KIndex end = job.c0 + job.nb;
  while (c < end) {
    const internal::KIndex group = c / job.group_size;
    const internal::KIndex stop = std::min(end, (group + 1) * job.group_size);
    const GridPoint<S> gp{job.scale[group], static_cast<int>(job.zero[group]), job.maxq};
    const double stay = kStayFraction * static_cast<double>(gp.scale);
    for (; c < stop; ++c) {
      if (job.pruned[c]) continue;
      const double hcc = job.hdiag[c];
      const double gc = g[c - job.c0];
      // Most codes stay: with |g_c| < 0.49 scale h_cc the 1-D minimizer lies within half a
      // step of the current code, the only candidate is a neighbour, and its change
      // delta g_c + delta^2 h_cc / 2 is positive (|delta| = scale up to float rounding, far
      // inside the 2% margin). Skipping them spares the division and roundings below.
      if (std::abs(gc) < stay * hcc) continue;
      const S w = job.weight[c];
      const int code = gp.code(w);
      const double current = static_cast<double>(w);
      const double ideal =
          static_cast<double>(code) - gc / (hcc * static_cast<double>(gp.scale));
      if (!std::isfinite(ideal)) continue;
      const double clamped = std::clamp(ideal, 0.0, static_cast<double>(job.maxq));
      const int lo = static_cast<int>(std::floor(clamped));
      const int hi = std::min(lo + 1, job.maxq);
      int best_code = code;
      double best_change = 0.0, best_delta = 0.0;
      for (const int candidate : {lo, hi}) {
        if (candidate == code) continue;
        const double delta = static_cast<double>(gp.value(candidate)) - current;
        const double change = delta * gc + 0.5 * delta * delta * hcc;
        if (change < best_change) {
          best_change = change;
          best_code = candidate;
          best_delta = delta;
        }
      }
      if (best_code == code) continue;
      job.weight[c] = gp.value(best_code);
      // g on the block's own columns at once (all a later move of this block reads).
      const double* h = job.hd + c * job.ld + job.c0;
      for (internal::KIndex t = 0; t < job.nb; ++t) g[t] += best_delta * h[t];
      job.moved[moves] = c - job.c0;
      job.deltas[moves] = best_delta;
      ++moves;
      *job.objective += best_change;
    }
  }
  return moves;
}

template void propose_codes<float>(const internal::ProposeRows<float>&);
template void propose_codes<double>(const internal::ProposeRows<double>&);
template internal::KIndex sweep_codes<float>(const internal::SweepRow<float>&);
template internal::KIndex sweep_codes<double>(const internal::SweepRow<double>&);

}  // namespace obc::OBC_KERNEL_NS

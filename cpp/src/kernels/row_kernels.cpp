// The per-row greedy loops (traces, N:M, OBQ). This file is compiled once per SIMD level:
// generically, and with AVX2+FMA into its own namespaces (OBC_KERNEL_NS, and Eigen renamed by
// the build) so that the two copies never share a symbol; dispatch.cpp picks one at run time.
#include <algorithm>
#include <limits>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/row_kernels.hpp"
#include "internal/row_state.hpp"
#include "obc/parallel.hpp"

#ifndef OBC_KERNEL_TABLE
#define OBC_KERNEL_TABLE kernel_table_generic
#define OBC_KERNEL_ISA "generic"
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

// The free input with the smallest OBS score w_i^2 / [H^-1]_ii among those `eligible(i)` allows
// (ties: lowest index), or -1 if there is none.
template <class Scalar, class Eligible>
Index argmin_score(const RowState<Scalar>& state, Eligible eligible) {
  const auto& w = state.w();
  const auto& d = state.diag();
  Index best = -1;
  Scalar best_score = std::numeric_limits<Scalar>::infinity();
  for (Index i = 0; i < state.size(); ++i) {
    if (!state.is_free(i) || !eligible(i)) continue;
    if (!(d[i] > Scalar(0))) RowState<Scalar>::lost_definiteness();
    const Scalar score = w[i] * w[i] / d[i];
    if (score < best_score || best < 0) {
      best_score = score;
      best = i;
    }
  }
  return best;
}

// One row's greedy trace. Unstructured when block == 1. Stops after `max_steps` steps (counting
// the already-pruned entries, which come first); unfilled trace entries get -1 / NaN.
// Final (or stopped-at) weights go to `out`.
template <class Scalar>
void trace_one_row(RowState<Scalar>& state, const Scalar* w_row, const HessianView& h,
                   Index block, Index max_steps, int lazy_batch, std::int32_t* order,
                   double* losses, Scalar* out) {
  const Index num_blocks = h.cols / block;
  state.load(w_row, h, lazy_batch, out);
  std::fill(order, order + num_blocks, -1);
  std::fill(losses, losses + num_blocks, std::numeric_limits<double>::quiet_NaN());
  // Entries already pruned on entry (zero or dead) come first, in index order, at zero loss.
  Index step = 0;
  std::vector<char> has_free(static_cast<size_t>(num_blocks), 0);
  for (Index i = 0; i < state.size(); ++i) has_free[static_cast<size_t>(state.orig(i) / block)] = 1;
  for (Index b = 0; b < num_blocks; ++b) {
    if (!has_free[static_cast<size_t>(b)]) {
      order[step] = static_cast<std::int32_t>(b);
      losses[step] = 0.0;
      ++step;
    }
  }
  if (block == 1) {
    while (step < max_steps && state.num_free() > 0) {
      state.ensure_room(1);
      const Index best = argmin_score(state, [](Index) { return true; });
      order[step] = static_cast<std::int32_t>(state.orig(best));
      losses[step] = state.fix(best, Scalar(0));
      ++step;
    }
  } else {
    while (step < max_steps && state.num_free() > 0) {
      state.ensure_room(block);
      // Free inputs of a block are contiguous local indices (blocks leave whole).
      Index best_begin = -1, best_len = 0;
      double best_score = std::numeric_limits<double>::infinity();
      for (Index i = 0; i < state.size();) {
        if (!state.is_free(i)) {
          ++i;
          continue;
        }
        const Index b = state.orig(i) / block;
        Index len = 1;
        while (i + len < state.size() && state.is_free(i + len) && state.orig(i + len) / block == b)
          ++len;
        if (!state.factor_block(i, len)) RowState<Scalar>::lost_definiteness();
        const double score = state.block_score(i, len);
        if (score < best_score || best_begin < 0) {
          best_score = score;
          best_begin = i;
          best_len = len;
        }
        i += len;
      }
      order[step] = static_cast<std::int32_t>(state.orig(best_begin) / block);
      state.factor_block(best_begin, best_len);
      losses[step] = state.prune_block(best_begin, best_len);
      ++step;
    }
  }
  state.finish();
}

template <class Scalar>
void trace_rows(const internal::TraceJob<Scalar>& job, const RunOptions& run) {
  const Index cols = job.h.cols, steps = cols / job.block;
  std::vector<RowState<Scalar>> states(static_cast<size_t>(resolve_num_threads(run.num_threads)));
  parallel_for(job.rows, run.num_threads, run.interrupt, [&](Index r, int tid) {
    const Index limit = job.max_steps ? job.max_steps[r] : steps;
    trace_one_row<Scalar>(states[static_cast<size_t>(tid)], job.W + r * cols, job.h, job.block,
                          limit, run.lazy_batch, job.order + r * steps, job.losses + r * steps,
                          job.out + r * cols);
  });
}

template <class Scalar>
void nm_rows(const internal::NmJob<Scalar>& job, const RunOptions& run) {
  const Index cols = job.h.cols, n = job.n, m = job.m, groups = cols / m;
  std::vector<RowState<Scalar>> states(static_cast<size_t>(resolve_num_threads(run.num_threads)));
  parallel_for(job.rows, run.num_threads, run.interrupt, [&](Index r, int tid) {
    RowState<Scalar>& state = states[static_cast<size_t>(tid)];
    state.load(job.W + r * cols, job.h, run.lazy_batch, job.out + r * cols);
    // Zeros per group so far; entries already zero (or dead) count toward the group's n.
    std::vector<Index> zeros(static_cast<size_t>(groups), m);
    for (Index i = 0; i < state.size(); ++i) --zeros[static_cast<size_t>(state.orig(i) / m)];
    while (true) {
      state.ensure_room(1);
      const Index best = argmin_score(
          state, [&](Index i) { return zeros[static_cast<size_t>(state.orig(i) / m)] < n; });
      if (best < 0) break;
      ++zeros[static_cast<size_t>(state.orig(best) / m)];
      state.fix(best, Scalar(0));
    }
    state.finish();
  });
}

template <class Scalar>
void obq_rows(const internal::ObqJob<Scalar>& job, const RunOptions& run) {
  const Index cols = job.h.cols, groups = cols / job.group_size;
  const int maxq = (1 << job.bits) - 1;
  std::vector<RowState<Scalar>> states(static_cast<size_t>(resolve_num_threads(run.num_threads)));
  parallel_for(job.rows, run.num_threads, run.interrupt, [&](Index r, int tid) {
    RowState<Scalar>& state = states[static_cast<size_t>(tid)];
    auto grid_of = [&](Index c) {
      const Index g = r * groups + c / job.group_size;
      return GridPoint<Scalar>{job.scale[g], static_cast<int>(job.zero[g]), maxq};
    };
    state.load(job.W + r * cols, job.h, run.lazy_batch, job.out + r * cols);
    while (state.num_free() > 0) {
      state.ensure_room(1);
      const auto& w = state.w();
      const auto& d = state.diag();
      Index best = -1, worst_outlier = -1;
      Scalar best_score = std::numeric_limits<Scalar>::infinity();
      double worst_err = -1;
      for (Index i = 0; i < state.size(); ++i) {
        if (!state.is_free(i)) continue;
        if (!(d[i] > Scalar(0))) RowState<Scalar>::lost_definiteness();
        const GridPoint<Scalar> g = grid_of(state.orig(i));
        const Scalar err = w[i] - g.quantize(w[i]);
        const Scalar err2 = err * err;
        const Scalar score = err2 / d[i];
        if (score < best_score || best < 0) {
          best_score = score;
          best = i;
        }
        const double scale = static_cast<double>(g.scale);
        if (static_cast<double>(err2) > job.outlier_factor * scale * scale &&
            static_cast<double>(err2) > worst_err) {
          worst_err = static_cast<double>(err2);
          worst_outlier = i;
        }
      }
      // Outlier rule: a weight pushed outside the range by more than half a step only gets
      // worse as others are fixed and push errors onto it, so it is fixed first.
      const Index q = worst_outlier >= 0 ? worst_outlier : best;
      state.fix(q, grid_of(state.orig(q)).quantize(w[q]));
    }
    state.finish();
  });
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const KernelTable& OBC_KERNEL_TABLE() {
  static const KernelTable table{
      RowKernels<float>{&OBC_KERNEL_NS::trace_rows<float>, &OBC_KERNEL_NS::nm_rows<float>,
                        &OBC_KERNEL_NS::obq_rows<float>},
      RowKernels<double>{&OBC_KERNEL_NS::trace_rows<double>, &OBC_KERNEL_NS::nm_rows<double>,
                         &OBC_KERNEL_NS::obq_rows<double>},
      OBC_KERNEL_ISA};
  return table;
}

}  // namespace obc::internal

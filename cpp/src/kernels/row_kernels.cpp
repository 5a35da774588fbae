// The per-row greedy loops (traces, N:M, OBQ). This file is compiled once per SIMD level:
// generically, and with AVX2+FMA into its own namespaces (OBC_KERNEL_NS, and Eigen renamed by
// the build) so that the two copies never share a symbol; dispatch.cpp picks one at run time.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/row_kernels.hpp"
#include "internal/row_state.hpp"
#include "kernels/argmin_score.hpp"
#include "kernels/block_score.hpp"
#include "kernels/masked_solve.hpp"
#include "kernels/spd_inverse.hpp"
#include "kernels/structured_kernel.hpp"
#include "obc/parallel.hpp"

#ifndef OBC_KERNEL_TABLE
#define OBC_KERNEL_TABLE kernel_table_generic
#define OBC_KERNEL_ISA "generic"
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

// The greedy choice over the picked inputs of a row, or -1 when nothing is picked; a lost
// definiteness throws, and so does an overflow: -1 although inputs are picked means every picked
// score was NaN, and an Inf best score would make the step's update NaN.
template <class Scalar>
Index argmin_score(const RowState<Scalar>& state, const char* pick) {
  bool bad = false;
  const Index best = argmin_obs_score(state.w().data(), state.diag().data(), pick, state.size(), bad);
  if (bad) RowState<Scalar>::lost_definiteness();
  if (best < 0) {
    if (std::any_of(pick, pick + state.size(), [](char p) { return p != 0; }))
      RowState<Scalar>::overflowed();
  } else if (!std::isfinite(state.w()[best] * state.w()[best] / state.diag()[best])) {
    RowState<Scalar>::overflowed();
  }
  return best;
}

// G <- G - V_B V_B^T for an L x L block G (both triangles) and the L x L rows B = [b0, b0 + L)
// of the last rank-L downdate V (n x L, column-major with leading dimension ld), as L outer
// products of V's contiguous column segments: the compiler turns each into L vector FMAs (a
// gather of V's rows and L^2 / 2 dot products ran scalar, ~10% of a blocked trace). Entry (i, j)
// and (j, i) see the same products in the same order, so G stays exactly symmetric.
template <int L, class Scalar>
void fixed_block_downdate(Scalar* __restrict g, const Scalar* __restrict v, Index ld, Index b0) {
  for (int t = 0; t < L; ++t) {
    const Scalar* __restrict vt = v + b0 + t * ld;  // V(b0 : b0 + L, t)
    for (int j = 0; j < L; ++j) {
      const Scalar vj = vt[j];
      for (int i = 0; i < L; ++i) g[i + j * L] -= vt[i] * vj;
    }
  }
}

// Blocked greedy: the diagonal blocks of the current inverse are kept up to date (a rank-len
// update per step, O(n * block^2)) instead of being rebuilt from G0 - U U^T for every candidate,
// so scoring all blocks costs O(n * block^2) per step rather than O(n * block * k).
template <class Scalar, class OnStep>
void trace_blocks(RowState<Scalar>& state, Index block, Index max_steps, Index& step,
                  std::int32_t* order, double* losses, OnStep on_step) {
  struct Span {
    Index begin, len;
    bool alive;
  };
  const Index stride = block * block;
  std::vector<Span> spans;
  std::vector<Scalar> blocks;  // span s: len x len column-major at s * stride; only the lower
                               // triangle is read (the unrolled downdate also updates the upper)
  std::vector<double> score_scratch;  // block_score's factor for lengths other than 2, 4, 8
  typename RowState<Scalar>::Mat scratch;
  auto rebuild = [&] {  // free inputs of a block are contiguous local indices
    spans.clear();
    for (Index i = 0; i < state.size();) {
      if (!state.is_free(i)) {
        ++i;
        continue;
      }
      Index len = 1;
      while (i + len < state.size() && state.is_free(i + len) &&
             state.orig(i + len) / block == state.orig(i) / block)
        ++len;
      spans.push_back({i, len, true});
      i += len;
    }
    blocks.resize(spans.size() * static_cast<size_t>(stride));
    for (size_t s = 0; s < spans.size(); ++s) {
      state.diagonal_block(spans[s].begin, spans[s].len, scratch);
      std::copy(scratch.data(), scratch.data() + scratch.size(), &blocks[s * stride]);
    }
  };
  rebuild();
  while (step < max_steps && state.num_free() > 0) {
    if (state.ensure_room(block)) rebuild();
    size_t best = spans.size();
    double best_score = std::numeric_limits<double>::infinity();
    const Scalar* w = state.w().data();
    for (size_t s = 0; s < spans.size(); ++s) {
      if (!spans[s].alive) continue;
      double score = 0;
      if (!block_score(&blocks[s * stride], w + spans[s].begin, spans[s].len, score_scratch, score))
        RowState<Scalar>::lost_definiteness();
      if (score < best_score || best == spans.size()) {
        best_score = score;
        best = s;
      }
    }
    if (!std::isfinite(best_score)) RowState<Scalar>::overflowed();  // NaN/Inf scores only
    const Index begin = spans[best].begin, len = spans[best].len;
    order[step] = static_cast<std::int32_t>(state.orig(begin) / block);
    if (!state.factor_block(begin, len)) RowState<Scalar>::lost_definiteness();
    losses[step] = state.prune_block(begin, len);
    ++step;
    on_step(step);
    spans[best].alive = false;
    const auto V = state.recent_downdates(len);  // G_BB -= V_B V_B^T for every other block
    for (size_t s = 0; s < spans.size(); ++s) {
      if (!spans[s].alive) continue;
      Scalar* g = &blocks[s * stride];
      const Index b0 = spans[s].begin, bl = spans[s].len;
      if (bl == len && (len == 2 || len == 4 || len == 8)) {
        const Scalar* v = V.data();
        const Index ld = V.outerStride();
        if (len == 4) fixed_block_downdate<4>(g, v, ld, b0);
        if (len == 2) fixed_block_downdate<2>(g, v, ld, b0);
        if (len == 8) fixed_block_downdate<8>(g, v, ld, b0);
        continue;
      }
      for (Index j = 0; j < bl; ++j)
        for (Index i = j; i < bl; ++i) {
          Scalar dot = 0;
          for (Index t = 0; t < len; ++t) dot += V(b0 + i, t) * V(b0 + j, t);
          g[i + j * bl] -= dot;
        }
    }
  }
}

// One row's greedy trace. Unstructured when block == 1. Stops after `max_steps` steps (counting
// the already-pruned entries, which come first); unfilled trace entries get -1 / NaN.
// Final (or stopped-at) weights go to `out`. on_step(step) runs once the row has taken
// `step` steps: for step = the already-pruned count (with every count below it) and after each
// greedy step.
template <class Scalar, class OnStep>
void trace_one_row(RowState<Scalar>& state, const Scalar* w_row, const HessianView& h,
                   Index block, Index max_steps, int lazy_batch, std::int32_t* order,
                   double* losses, Scalar* out, OnStep on_step) {
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
  for (Index s = 0; s <= step; ++s) on_step(s);  // the pruned-on-entry steps change no weight
  if (block == 1) {
    while (step < max_steps && state.num_free() > 0) {
      state.ensure_room(1);
      const Index best = argmin_score(state, state.free_mask());
      order[step] = static_cast<std::int32_t>(state.orig(best));
      losses[step] = state.fix(best, Scalar(0));
      on_step(++step);
    }
  } else {
    trace_blocks(state, block, max_steps, step, order, losses, on_step);
  }
  state.finish();
}

template <class Scalar>
void trace_rows(const internal::TraceJob<Scalar>& job, const RunOptions& run) {
  const Index cols = job.h.cols, steps = cols / job.block;
  std::vector<RowState<Scalar>> states(static_cast<size_t>(resolve_num_threads(run.num_threads)));
  parallel_for(job.rows, run.num_threads, run.interrupt, [&](Index r, int tid) {
    const Index limit = job.max_steps ? job.max_steps[r] : steps;
    RowState<Scalar>& state = states[static_cast<size_t>(tid)];
    // Recorded weights: the greedy's own, as the row passes each requested step count.
    auto record = [&](Index step) {
      for (Index k = 0; k < job.num_records; ++k) {
        if (job.record_steps[k] != step) continue;
        Scalar* dst = job.record_out[k] + r * cols;
        std::fill(dst, dst + cols, Scalar(0));
        for (Index i = 0; i < state.size(); ++i)
          if (state.is_free(i)) dst[state.orig(i)] = state.w()[i];
      }
    };
    trace_one_row<Scalar>(state, job.W + r * cols, job.h, job.block, limit, run.lazy_batch,
                          job.order + r * steps, job.losses + r * steps, job.out + r * cols,
                          record);
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
    // pick[i]: input i is free and its group still has fewer than n zeros. Kept up to date per
    // step (a group that fills closes its other members), rebuilt when local indices change.
    std::vector<char> pick;
    auto rebuild_pick = [&] {
      pick.resize(static_cast<size_t>(state.size()));
      for (Index i = 0; i < state.size(); ++i)
        pick[static_cast<size_t>(i)] =
            state.is_free(i) && zeros[static_cast<size_t>(state.orig(i) / m)] < n;
    };
    rebuild_pick();
    while (true) {
      if (state.ensure_room(1)) rebuild_pick();
      const Index best = argmin_score(state, pick.data());
      if (best < 0) break;
      const Index g = state.orig(best) / m;
      state.fix(best, Scalar(0));
      pick[static_cast<size_t>(best)] = 0;
      if (++zeros[static_cast<size_t>(g)] == n) {  // inputs of one group are contiguous locally
        for (Index i = best - 1; i >= 0 && state.orig(i) / m == g; --i)
          pick[static_cast<size_t>(i)] = 0;
        for (Index i = best + 1; i < state.size() && state.orig(i) / m == g; ++i)
          pick[static_cast<size_t>(i)] = 0;
      }
    }
    state.finish();
  });
}

template <class Scalar>
void obq_rows(const internal::ObqJob<Scalar>& job, const RunOptions& run) {
  const Index cols = job.h.cols, groups = cols / job.group_size;
  const int maxq = (1 << job.bits) - 1;
  const size_t num_threads = static_cast<size_t>(resolve_num_threads(run.num_threads));
  std::vector<RowState<Scalar>> states(num_threads);
  std::vector<std::vector<Scalar>> grids(num_threads);  // per thread: see rebuild_grid
  parallel_for(job.rows, run.num_threads, run.interrupt, [&](Index r, int tid) {
    RowState<Scalar>& state = states[static_cast<size_t>(tid)];
    auto grid_of = [&](Index c) {
      const Index g = r * groups + c / job.group_size;
      return GridPoint<Scalar>{job.scale[g], static_cast<int>(job.zero[g]), maxq};
    };
    // The grid of every local input (scale, zero point, outlier threshold), rebuilt when local
    // indices change, so that the per-step choice reads contiguous arrays.
    std::vector<Scalar>& grid = grids[static_cast<size_t>(tid)];
    auto rebuild_grid = [&] {
      const Index n = state.size();
      grid.resize(static_cast<size_t>(5 * n));
      for (Index i = 0; i < n; ++i) {
        const Index g = r * groups + state.orig(i) / job.group_size;
        const double scale = static_cast<double>(job.scale[g]);
        grid[i] = job.scale[g];
        grid[n + i] = static_cast<Scalar>(job.zero[g]);
        grid[2 * n + i] = outlier_threshold<Scalar>(job.outlier_factor * scale * scale);
      }
    };
    state.load(job.W + r * cols, job.h, run.lazy_batch, job.out + r * cols);
    rebuild_grid();
    while (state.num_free() > 0) {
      if (state.ensure_room(1)) rebuild_grid();
      const Index n = state.size();
      bool bad = false;
      const Index q = obq_choice(state.w().data(), state.diag().data(), state.free_mask(),
                                 grid.data(), grid.data() + n, grid.data() + 2 * n,
                                 static_cast<Scalar>(maxq), n, grid.data() + 3 * n, bad);
      if (bad) RowState<Scalar>::lost_definiteness();
      if (q < 0) RowState<Scalar>::overflowed();  // free inputs, but every score was NaN
      const auto& w = state.w();
      // Outlier rule (in obq_choice): a weight pushed outside the range by more than half a step
      // only gets worse as others are fixed and push errors onto it, so it is fixed first.
      state.fix(q, grid_of(state.orig(q)).quantize(w[q]));
    }
    state.finish();
  });
}

// 1/2 d H d^T per row of d = W - W_hat, in float64, with the symmetric part of H read from its
// lower triangle: d H d^T = sum_c H_cc d_c^2 + 2 sum_c d_c sum_{i > c} H_ic d_i, half the flops
// of a full product. Rows go 256 at a time; within them the work is split over fixed blocks of
// columns (each computes its share of every row's sum; the shares are added in block order, so
// the result does not depend on the thread count). H is widened to float64 one block at a
// time, never as a whole.
template <class S, class HMap>
void row_losses_with(const S* W, const S* W_hat, Index rows, Index cols, const HMap& h,
                     double* out, int num_threads, InterruptHook* interrupt) {
  using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  using ConstRows =
      Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  constexpr Index row_chunk = 256, col_block = 128;
  const ConstRows w(W, rows, cols), w_hat(W_hat, rows, cols);
  const Index blocks = (cols + col_block - 1) / col_block;
  RowMatrixD delta;
  MatrixD shares;  // len x blocks
  for (Index begin = 0; begin < rows; begin += row_chunk) {
    const Index len = std::min(row_chunk, rows - begin);
    delta = w.middleRows(begin, len).template cast<double>() -
            w_hat.middleRows(begin, len).template cast<double>();
    shares.resize(len, blocks);
    parallel_for(blocks, num_threads, interrupt, [&](Index b, int) {
      const Index j = b * col_block, nb = std::min(col_block, cols - j), below = cols - j - nb;
      // Symmetric part of H on the diagonal block and the block column below it.
      const MatrixD h_diag = 0.5 * (h.block(j, j, nb, nb).template cast<double>() +
                                    h.block(j, j, nb, nb).transpose().template cast<double>());
      MatrixD cross(len, nb);  // (r, c): sum over i > c of d_ri H_ic
      cross.noalias() =
          delta.middleCols(j, nb) * h_diag.template triangularView<Eigen::StrictlyLower>();
      if (below > 0) {
        const MatrixD h_below =
            0.5 * (h.block(j + nb, j, below, nb).template cast<double>() +
                   h.block(j, j + nb, nb, below).transpose().template cast<double>());
        cross.noalias() += delta.rightCols(below) * h_below;
      }
      const auto d = delta.middleCols(j, nb);
      shares.col(b) = 2.0 * cross.cwiseProduct(d).rowwise().sum() +
                      d.cwiseAbs2() * h_diag.diagonal();
    });
    for (Index i = 0; i < len; ++i) out[begin + i] = 0.5 * shares.row(i).sum();
  }
}

template <class S>
void row_losses(const S* W, const S* W_hat, Index rows, Index cols, const HessianInput& H,
                double* out, int num_threads, InterruptHook* interrupt) {
  visit_hessian(H, [&](const auto& h) {
    row_losses_with(W, W_hat, rows, cols, h, out, num_threads, interrupt);
  });
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const KernelTable& OBC_KERNEL_TABLE() {
  static const KernelTable table{
      RowKernels<float>{&OBC_KERNEL_NS::trace_rows<float>, &OBC_KERNEL_NS::nm_rows<float>,
                        &OBC_KERNEL_NS::obq_rows<float>, &OBC_KERNEL_NS::structured_rows<float>,
                        &OBC_KERNEL_NS::masked_solve_rows<float>,
                        &OBC_KERNEL_NS::row_losses<float>},
      RowKernels<double>{&OBC_KERNEL_NS::trace_rows<double>, &OBC_KERNEL_NS::nm_rows<double>,
                         &OBC_KERNEL_NS::obq_rows<double>, &OBC_KERNEL_NS::structured_rows<double>,
                         &OBC_KERNEL_NS::masked_solve_rows<double>,
                         &OBC_KERNEL_NS::row_losses<double>},
      &OBC_KERNEL_NS::spd_inverse_inplace,
      OBC_KERNEL_ISA};
  return table;
}

}  // namespace obc::internal

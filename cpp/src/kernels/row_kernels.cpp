// The per-row greedy loops (traces, N:M, OBQ). This file is compiled once per SIMD level:
// generically, and with AVX2+FMA into its own namespaces (OBC_KERNEL_NS, and Eigen renamed by
// the build) so that the two copies never share a symbol; dispatch.cpp picks one at run time.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "internal/grid_point.hpp"
#include "internal/row_kernels.hpp"
#include "internal/row_state.hpp"
#include "kernels/argmin_score.hpp"
#include "kernels/block_score.hpp"
#include "kernels/masked_solve.hpp"
#include "kernels/spd_inverse.hpp"
#include "kernels/structured_kernel.hpp"
#include "obc/errors.hpp"
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

// acc + p * d, rounded once where the kernel is built with FMA (the vector path below uses the
// same instruction), else twice: one rounding rule for every element of a build.
inline double multiply_add(double p, double d, double acc) {
#ifdef __FMA__
  return std::fma(p, d, acc);
#else
  return acc + p * d;
#endif
}

// One block of up to E = 8 consecutive y elements of R rows against one panel of H_s:
//   y_r[j + ib + e] += sum_{c < ib + e} P(ib + e, c) d_r[j + c],  c ascending,
// over the panel's columns c in [0, nb) (P column-major, leading dimension ld; d[r], y[r] point
// at column j). The block is held in registers while c runs (the columns every element is
// below first, then the triangle), so each y element takes its terms in the same order, with
// the same rounding, whichever rows share the block.
template <int R>
inline void lower_panel_block(const double* P, Index ld, Index ib, Index ne, Index nb,
                              const double* const* d, double* const* y) {
  [[maybe_unused]] constexpr int E = 8;  // the block width; only the AVX2 branch names it
  const Index below = std::min(ib, nb);  // columns c < ib: every element of the block is below
#if defined(__AVX2__) && defined(__FMA__)
  if (ne == E) {
    __m256d acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_loadu_pd(y[r] + ib);
      acc[r][1] = _mm256_loadu_pd(y[r] + ib + 4);
    }
    for (Index c = 0; c < below; ++c) {
      const double* p = P + c * ld + ib;
      const __m256d p0 = _mm256_loadu_pd(p), p1 = _mm256_loadu_pd(p + 4);
      for (int r = 0; r < R; ++r) {
        const __m256d dc = _mm256_broadcast_sd(d[r] + c);
        acc[r][0] = _mm256_fmadd_pd(p0, dc, acc[r][0]);
        acc[r][1] = _mm256_fmadd_pd(p1, dc, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_pd(y[r] + ib, acc[r][0]);
      _mm256_storeu_pd(y[r] + ib + 4, acc[r][1]);
    }
  } else
#endif
  {
    for (Index c = 0; c < below; ++c) {
      const double* p = P + c * ld + ib;
      for (int r = 0; r < R; ++r)
        for (Index e = 0; e < ne; ++e) y[r][ib + e] = multiply_add(p[e], d[r][c], y[r][ib + e]);
    }
  }
  for (Index c = ib; c < std::min(ib + ne, nb); ++c) {  // the triangle: elements below c only
    const double* p = P + c * ld + ib;
    for (int r = 0; r < R; ++r)
      for (Index e = c - ib + 1; e < ne; ++e)
        y[r][ib + e] = multiply_add(p[e], d[r][c], y[r][ib + e]);
  }
}

// 1/2 d H_s d^T per row of d = W - W_hat, in float64, H_s = (H + H^T) / 2:
//   d H_s d^T = sum_i d_i (H_s,ii d_i + 2 y_i),  y_i = sum_{c < i} H_s,ic d_c,
// half the flops of a full product. Every row's loss is computed by one fixed sequence of
// operations (y_i accumulated over c ascending, the final sum over i ascending) that depends on
// nothing but that row, cols and H: the same bits whatever other rows are in the call, how the
// rows are chunked, which thread runs them (row ranges of separate calls, Ray row tasks).
// Rows go 512 at a time, split over the threads; H_s is widened to float64 one panel of 128
// columns at a time (lower part only, one panel per thread), never as a whole. Building the
// panels took about a fifth of the time at 4096 x 4096 with 256 rows at a time: each thread
// builds them once per chunk, so the larger chunk halves that (3.5-3.9 CPU s per call instead
// of 4.0-4.3, same load), for twice the memory of delta and y (8 KiB per input).
template <class S, class HMap>
void row_losses_with(const S* W, const S* W_hat, Index rows, Index cols, const HMap& h,
                     double* out, int num_threads, InterruptHook* interrupt) {
  using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstRows =
      Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  constexpr Index row_chunk = 512, col_block = 128, group = 4, block = 8;
  const ConstRows w(W, rows, cols), w_hat(W_hat, rows, cols);
  Eigen::VectorXd diag(cols);
  for (Index i = 0; i < cols; ++i) diag[i] = static_cast<double>(h(i, i));
  RowMatrixD delta, y;
  const int threads = resolve_num_threads(num_threads);
  std::vector<std::vector<double>> panels(static_cast<size_t>(threads));
  std::atomic<bool> stopped{false};
  auto last_poll = std::chrono::steady_clock::now();
  for (Index begin = 0; begin < rows; begin += row_chunk) {
    const Index len = std::min(row_chunk, rows - begin);
    delta = w.middleRows(begin, len).template cast<double>() -
            w_hat.middleRows(begin, len).template cast<double>();
    y.setZero(len, cols);
    // one part of the chunk's rows per thread (one parallel region per chunk: each thread widens
    // the panels of H_s itself, 1/len of its work, instead of meeting the others after each)
    const Index parts = std::min<Index>(threads, (len + group - 1) / group);
    parallel_for(parts, num_threads, interrupt, [&](Index part, int thread) {
      const Index first = part * len / parts, last = (part + 1) * len / parts;
      std::vector<double>& panel = panels[static_cast<size_t>(thread)];
      for (Index j = 0; j < cols; j += col_block) {
        // a part is long: the calling thread (thread 0) also asks the host between panels
        if (thread == 0 && interrupt != nullptr) {
          const auto now = std::chrono::steady_clock::now();
          if (now - last_poll > std::chrono::milliseconds(50)) {
            last_poll = now;
            if (interrupt->should_stop()) stopped.store(true);
          }
        }
        if (stopped.load(std::memory_order_relaxed)) return;
        const Index nb = std::min(col_block, cols - j), ld = cols - j;
        // The panel's column stride: ld rounded up to whole cache lines, an odd number of them.
        // lower_panel_block reads one line from each of the nb columns at a time, again for
        // every group of rows; with a stride of a multiple of 8 lines (cols a multiple of 64,
        // e.g. 2048 or 4096: 16 or 32 KiB) those lines all fall in a few sets of the L1 cache,
        // which evicts them before the next group reads them (4096 x 4096: 3.1 CPU s per call
        // instead of 3.5-4.1). Only the layout changes: each y element takes the same terms in
        // the same order.
        const Index ldp = ((ld + 7) / 8 % 2 == 0) ? (ld + 7) / 8 * 8 + 8 : (ld + 7) / 8 * 8;
        // panel(i - j, c - j) = H_s(i, c) for i >= j (only i > c is read), in 32 x 32 tiles:
        // H(i, c) and H(c, i) are both read from a few cache lines, whichever way H is laid out
        panel.assign(static_cast<size_t>(ldp * nb), 0.0);
        constexpr Index tile = 32;
        for (Index i0 = 0; i0 < ld; i0 += tile)
          for (Index c0 = 0; c0 < std::min(nb, i0 + tile); c0 += tile)
            for (Index c = c0; c < std::min(c0 + tile, nb); ++c)
              for (Index i = std::max(i0, c + 1); i < std::min(i0 + tile, ld); ++i)
                panel[c * ldp + i] = 0.5 * (static_cast<double>(h(j + i, j + c)) +
                                           static_cast<double>(h(j + c, j + i)));
        for (Index ib = 0; ib < ld; ib += block) {
          const Index ne = std::min(block, ld - ib);
          for (Index r0 = first; r0 < last; r0 += group) {
            const Index count = std::min(group, last - r0);
            const double* d[group];
            double* yr[group];
            for (Index r = 0; r < count; ++r) {
              d[r] = delta.row(r0 + r).data() + j;
              yr[r] = y.row(r0 + r).data() + j;
            }
            // one instantiation per number of rows: the arithmetic of a row is the same in each
            switch (count) {
              case 4: lower_panel_block<4>(panel.data(), ldp, ib, ne, nb, d, yr); break;
              case 3: lower_panel_block<3>(panel.data(), ldp, ib, ne, nb, d, yr); break;
              case 2: lower_panel_block<2>(panel.data(), ldp, ib, ne, nb, d, yr); break;
              default: lower_panel_block<1>(panel.data(), ldp, ib, ne, nb, d, yr); break;
            }
          }
        }
      }
    });
    if (stopped.load()) throw Interrupted();
    for (Index r = 0; r < len; ++r) {
      const double* d = delta.row(r).data();
      const double* yr = y.row(r).data();
      double sum = 0.0;
      for (Index i = 0; i < cols; ++i) sum += d[i] * (diag[i] * d[i] + 2.0 * yr[i]);
      out[begin + r] = 0.5 * sum;
    }
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

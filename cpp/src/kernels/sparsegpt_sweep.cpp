// The SparseGPT sweep (obc/sparsegpt.hpp): Cholesky factor of H^-1, adaptive masks per lazy
// block, the column loop inside a block and the lazy GEMM over the later columns. Compiled once
// per SIMD level like row_kernels.cpp (OBC_KERNEL_NS and a renamed Eigen in the AVX2 copy).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "internal/grid_point.hpp"
#include "internal/sparsegpt_kernels.hpp"
#include "kernels/spd_inverse.hpp"
#include "obc/parallel.hpp"
#include "obc/prune.hpp"
#include "obc/types.hpp"

#ifndef OBC_SPARSEGPT_TABLE
#define OBC_SPARSEGPT_TABLE sparsegpt_kernels_generic
#endif

namespace obc::OBC_KERNEL_NS {

namespace {

// Work items have a fixed size, never derived from the thread count, so that every float
// operation, and its order, is the same whichever thread runs it.
constexpr Index kRowChunk = 64;      // rows per item of the column sweep and of the lazy GEMM
constexpr Index kColumnPanel = 512;  // later columns per item of the lazy GEMM
// A parallel region costs more than this many flops (about a millisecond of work, and far more
// when the cores are oversubscribed): smaller phases run on the calling thread. The items are
// the same either way, so this changes no result.
constexpr double kParallelFlops = 4e6;
constexpr int kNM = 2;  // SparseGptJob::pattern of N:M

using internal::SparseGptJob;
using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

// floor(total * part / whole) without overflow for 0 <= part <= whole, 0 <= total <= whole.
Index floor_share(Index total, Index part, Index whole) {
  if (whole == 0) return 0;
#if defined(__SIZEOF_INT128__)
  return static_cast<Index>((static_cast<__int128>(total) * part) / whole);
#else
  return static_cast<Index>(std::floor(static_cast<long double>(total) * part / whole));
#endif
}

// U with U^T U = H^-1, rounded to Scalar, in hinv's own memory (no second cols x cols buffer:
// fresh pages are costly, see gptq.cpp): the lower Cholesky factor L of H^-1 (in place, by the
// blocked parallel factorization of spd_inverse.hpp) is U stored row-major, since L(i, j) and
// U(j, i) sit at the same element offset j * n + i; the strict upper part of the column-major
// buffer (U's strict lower part) is set to 0. For float, each element e is narrowed to the
// float at element offset e of the same memory. Returns U (row-major, n x n, in hinv's memory),
// or null when L does not exist.
template <class Scalar>
Scalar* upper_factor_of_inverse(double* hinv, Index n, int num_threads, InterruptHook* interrupt) {
  spd_detail::Map a(hinv, n, n);
  const int threads = n < 384 ? 1 : num_threads;
  if (!spd_detail::cholesky(a, threads, interrupt)) return nullptr;
  for (Index i = 0; i < n; ++i)
    if (!(a(i, i) > 0)) return nullptr;
  const Index total = n * n;
  // Element e of U, for e in [begin, end) into to[e - begin]: L's entry at the same offset on or
  // below the diagonal (row e % n >= column e / n), else 0.
  const auto narrow = [&](Index begin, Index end, Scalar* to) {
    Index j = begin / n, i = begin % n;
    for (Index e = begin; e < end; ++e) {
      to[e - begin] = i >= j ? static_cast<Scalar>(hinv[e]) : Scalar(0);
      if (++i == n) i = 0, ++j;
    }
  };
  constexpr Index kChunk = Index(1) << 16;  // elements per parallel item
  if constexpr (std::is_same_v<Scalar, double>) {
    parallel_for(n, threads, nullptr, [&](Index j, int) {
      std::fill(hinv + j * n, hinv + j * n + j, 0.0);
    });
    return hinv;
  } else {
    // Float e occupies bytes [4e, 4e + 4), inside double e / 2: narrowing the elements [p, 2p)
    // writes only over doubles [p / 2, p), read by earlier stages, so each stage's reads and
    // writes are disjoint and its items may run in any order; the first stage goes through a
    // copy.
    Scalar* f = reinterpret_cast<Scalar*>(hinv);
    Index done = std::min(total, kChunk);
    std::vector<Scalar> head(static_cast<size_t>(done));
    narrow(0, done, head.data());
    std::memcpy(f, head.data(), sizeof(Scalar) * static_cast<size_t>(done));
    while (done < total) {
      const Index begin = done, end = std::min(total, 2 * done);
      parallel_for((end - begin + kChunk - 1) / kChunk, threads, nullptr, [&](Index item, int) {
        const Index from = begin + item * kChunk;
        narrow(from, std::min(end, from + kChunk), f + from);
      });
      done = end;
    }
    return f;
  }
}

// The sweep over one layer; `weight` starts as W and ends as the result, `pruned` starts with
// the zeros of W and the dead inputs and ends as the final mask.
template <class Scalar>
class Sweep {
 public:
  Sweep(const SparseGptJob<Scalar>& job, const Scalar* upper, const RunOptions& run)
      : opt_(job), unit_(job.unit), upper_(upper, job.cols, job.cols),
        weight_(job.weight, job.rows, job.cols),
        pruned_(job.pruned, job.rows, job.cols), run_(run), rows_(job.rows), cols_(job.cols),
        lazy_(job.lazy_block) {
    chunks_ = (rows_ + kRowChunk - 1) / kRowChunk;
    score_scale_.resize(cols_);
    for (Index c = 0; c < cols_; ++c) {
      const double d = static_cast<double>(upper_(c, c));
      score_scale_[c] = 1.0 / (d * d);
    }
    errors_.resize(rows_, lazy_);
    if (opt_.pattern != kNM) plan_quotas();
  }

  void run() {
    for (Index b0 = 0; b0 < cols_; b0 += lazy_) {
      const Index b1 = std::min(cols_, b0 + lazy_);
      const double width = static_cast<double>(b1 - b0);
      sweep_threads_ = threads_for(static_cast<double>(rows_) * width * width);
      if (opt_.pattern != kNM) choose_block_mask(b0, b1);
      parallel_for(chunks_, sweep_threads_, run_.interrupt,
                   [&](Index chunk, int) { sweep_chunk(chunk, b0, b1); });
      lazy_update(b0, b1);
    }
  }

 private:
  int threads_for(double flops) const { return flops < kParallelFlops ? 1 : run_.num_threads; }

  Index units_in(Index b0, Index b1) const { return (b1 - b0) / unit_; }

  // A unit is live when some weight in it is not pruned yet (only meaningful before its block).
  bool live(Index r, Index first_col) const {
    for (Index c = first_col; c < first_col + unit_; ++c)
      if (!pruned_(r, c)) return true;
    return false;
  }

  double unit_score(Index r, Index first_col) const {
    double score = 0;
    for (Index c = first_col; c < first_col + unit_; ++c) {
      if (pruned_(r, c)) continue;
      const double w = static_cast<double>(weight_(r, c));
      score += w * w * score_scale_[c];
    }
    return score;
  }

  // New prunings (beyond the units already pruned) per row (Uniform) or for the layer (Global),
  // and the live units they are shared over.
  void plan_quotas() {
    const Index units = cols_ / unit_;
    row_live_.setZero(rows_);
    for (Index r = 0; r < rows_; ++r)
      for (Index u = 0; u < units; ++u) row_live_[r] += live(r, u * unit_) ? 1 : 0;
    row_live_before_.setZero(rows_);
    if (opt_.uniform) {
      const Index target = count_for_sparsity(opt_.sparsity, units);
      row_new_.resize(rows_);
      for (Index r = 0; r < rows_; ++r)
        row_new_[r] = std::max<Index>(0, target - (units - row_live_[r]));
    } else {
      layer_live_ = row_live_.sum();
      const Index target = count_for_sparsity(opt_.sparsity, rows_ * units);
      layer_new_ = std::max<Index>(0, target - (rows_ * units - layer_live_));
    }
  }

  // Marks the units of columns [b0, b1) to prune: the smallest scores under the block's quota.
  void choose_block_mask(Index b0, Index b1) {
    const Index units = units_in(b0, b1);
    if (opt_.uniform) {
      parallel_for(chunks_, sweep_threads_, run_.interrupt, [&](Index chunk, int) {
        std::vector<std::pair<double, Index>> candidates;
        for (Index r = chunk * kRowChunk; r < std::min(rows_, (chunk + 1) * kRowChunk); ++r) {
          candidates.clear();
          for (Index u = 0; u < units; ++u)
            if (live(r, b0 + u * unit_)) candidates.emplace_back(unit_score(r, b0 + u * unit_), u);
          const Index before = row_live_before_[r];
          const Index after = before + static_cast<Index>(candidates.size());
          const Index quota = floor_share(row_new_[r], after, row_live_[r]) -
                              floor_share(row_new_[r], before, row_live_[r]);
          row_live_before_[r] = after;
          prune_smallest(candidates, quota, [&](Index u) {
            for (Index c = b0 + u * unit_; c < b0 + (u + 1) * unit_; ++c) pruned_(r, c) = 1;
          });
        }
      });
      return;
    }
    // Global: every row's scores of this block, then one choice over the whole block.
    RowMatrixXd scores(rows_, units);
    parallel_for(chunks_, sweep_threads_, run_.interrupt, [&](Index chunk, int) {
      for (Index r = chunk * kRowChunk; r < std::min(rows_, (chunk + 1) * kRowChunk); ++r)
        for (Index u = 0; u < units; ++u)
          scores(r, u) = live(r, b0 + u * unit_) ? unit_score(r, b0 + u * unit_) : -1.0;
    });
    std::vector<std::pair<double, Index>> candidates;
    for (Index i = 0; i < rows_ * units; ++i)
      if (scores.data()[i] >= 0) candidates.emplace_back(scores.data()[i], i);
    const Index before = layer_live_before_;
    const Index after = before + static_cast<Index>(candidates.size());
    const Index quota = floor_share(layer_new_, after, layer_live_) -
                        floor_share(layer_new_, before, layer_live_);
    layer_live_before_ = after;
    prune_smallest(candidates, quota, [&](Index i) {
      const Index r = i / units, u = i % units;
      for (Index c = b0 + u * unit_; c < b0 + (u + 1) * unit_; ++c) pruned_(r, c) = 1;
    });
  }

  // Calls mark(id) for the `count` candidates with the smallest (score, id).
  template <class Mark>
  static void prune_smallest(std::vector<std::pair<double, Index>>& candidates, Index count,
                             Mark mark) {
    count = std::min<Index>(count, static_cast<Index>(candidates.size()));
    if (count <= 0) return;
    std::nth_element(candidates.begin(), candidates.begin() + (count - 1), candidates.end());
    for (Index i = 0; i < count; ++i) mark(candidates[static_cast<size_t>(i)].second);
  }

  // N:M: the group starting at column g of row r gets its n - (zeros) smallest current scores.
  void choose_group_mask(Index r, Index g) {
    Index have = 0;
    for (Index c = g; c < g + opt_.m; ++c) have += pruned_(r, c) ? 1 : 0;
    Index need = opt_.n - have;
    while (need-- > 0) {  // m is small: repeated minimum, ties to the lower column
      Index best = -1;
      double best_score = 0;
      for (Index c = g; c < g + opt_.m; ++c) {
        if (pruned_(r, c)) continue;
        const double w = static_cast<double>(weight_(r, c));
        const double score = w * w * score_scale_[c];
        if (best < 0 || score < best_score) {
          best = c;
          best_score = score;
        }
      }
      pruned_(r, best) = 1;
    }
  }

  Scalar kept_value(Index r, Index c, Scalar w) const {
    if (opt_.scale == nullptr) return w;
    const Index groups = cols_ / opt_.group_size, at = r * groups + c / opt_.group_size;
    const GridPoint<Scalar> point{opt_.scale[at], static_cast<int>(opt_.zero[at]),
                                  (1 << opt_.bits) - 1};
    return point.quantize(w);
  }

  // Columns [b0, b1) of the chunk's rows, one column after the other, updating the block only;
  // the scaled errors go to errors_ for the lazy update.
  void sweep_chunk(Index chunk, Index b0, Index b1) {
    for (Index r = chunk * kRowChunk; r < std::min(rows_, (chunk + 1) * kRowChunk); ++r) {
      Scalar* w = weight_.row(r).data();
      for (Index j = b0; j < b1; ++j) {
        if (opt_.pattern == kNM && j % opt_.m == 0) choose_group_mask(r, j);
        const Scalar target = pruned_(r, j) ? Scalar(0) : kept_value(r, j, w[j]);
        const Scalar err = (w[j] - target) / upper_(j, j);
        w[j] = target;
        errors_(r, j - b0) = err;
        if (err == Scalar(0)) continue;
        const Index rest = b1 - j - 1;
        Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(w + j + 1, rest) -=
            err * upper_.row(j).segment(j + 1, rest);
      }
    }
  }

  // W[:, b1:] -= Err U[b0:b1, b1:], in fixed (row chunk, column panel) tiles.
  void lazy_update(Index b0, Index b1) {
    const Index later = cols_ - b1;
    if (later == 0) return;
    const Index panels = (later + kColumnPanel - 1) / kColumnPanel, width = b1 - b0;
    const double flops = 2.0 * static_cast<double>(rows_) * static_cast<double>(later * width);
    parallel_for(chunks_ * panels, threads_for(flops), run_.interrupt, [&](Index item, int) {
      const Index r0 = (item / panels) * kRowChunk, p0 = b1 + (item % panels) * kColumnPanel;
      const Index nr = std::min(kRowChunk, rows_ - r0), np = std::min(kColumnPanel, cols_ - p0);
      weight_.block(r0, p0, nr, np).noalias() -=
          errors_.block(r0, 0, nr, width) * upper_.block(b0, p0, width, np);
    });
  }

  const SparseGptJob<Scalar>& opt_;
  Index unit_;
  Eigen::Map<const RowMatrix<Scalar>> upper_;  // in job.hinv's memory
  Eigen::Map<RowMatrix<Scalar>> weight_;
  Eigen::Map<MaskMatrix> pruned_;
  const RunOptions& run_;
  Index rows_, cols_, lazy_, chunks_ = 1;
  int sweep_threads_ = 1;  // threads of the current block's mask choice and column sweep
  std::vector<double> score_scale_;  // 1 / U_jj^2: score = w^2 / U_jj^2
  RowMatrix<Scalar> errors_;         // rows x lazy_: the current block's scaled errors
  IndexVector row_live_, row_live_before_, row_new_;
  Index layer_live_ = 0, layer_live_before_ = 0, layer_new_ = 0;
};

template <class Scalar>
bool sweep(const SparseGptJob<Scalar>& job, const RunOptions& run) {
  const Scalar* upper =
      upper_factor_of_inverse<Scalar>(job.hinv, job.cols, run.num_threads, run.interrupt);
  if (upper == nullptr) return false;
  Sweep<Scalar>(job, upper, run).run();
  return true;
}

}  // namespace

}  // namespace obc::OBC_KERNEL_NS

namespace obc::internal {

const SparseGptKernels& OBC_SPARSEGPT_TABLE() {
  static const SparseGptKernels table{&OBC_KERNEL_NS::sweep<float>,
                                      &OBC_KERNEL_NS::sweep<double>};
  return table;
}

}  // namespace obc::internal

// RowState: one weight row during a greedy OBS solve (active inputs, weights, lazy inverse).
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "internal/lazy_inverse.hpp"
#include "internal/row_kernels.hpp"
#include "obc/errors.hpp"

namespace obc::OBC_KERNEL_NS {

using internal::HessianView;

/// Lazy batch size for n active inputs: large enough that flushes are level-3, small enough that
/// the O(n k) column reconstruction stays cheap next to the O(n^2) amortized flush. Tuned on full
/// float32 traces (2-core AVX2 machines): 96 beat 32/64/128 by 5-10% at 576, 1152 and 2304 inputs
/// (2026-11-23); once the greedy's choice was vectorized and compaction copies inlined, 96 was
/// also as fast as or faster than the former 16 / 32 / 64 below 768 inputs (2026-12-01, one
/// thread, a noisy VM: 64 inputs 0.031 vs 0.038 s for 2048 rows, 256 inputs 0.103-0.117 vs
/// 0.113-0.130 s for 512 rows, 576 inputs within noise). With n <= 96 a row never flushes.
inline Index lazy_capacity(Index n, int requested) {
  if (requested > 0) return requested;
  return std::min<Index>(96, std::max<Index>(n, 1));
}

template <class S>
class RowState {
 public:
  using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;

  /// Loads row `w_row` (length cols). Dead inputs are dropped; live inputs whose weight is zero,
  /// or for which `fixed_zero` (optional, length cols) is set, are eliminated at once (they stay
  /// exactly zero). `out` (length cols) receives final weights as inputs get fixed.
  void load(const S* w_row, const HessianView& h, int lazy_batch, S* out,
            const char* fixed_zero = nullptr) {
    const Index cols = h.cols;
    out_ = out;
    orig_.clear();
    std::vector<Index> zero_local;
    for (Index c = 0; c < cols; ++c) {
      if (h.dead[c]) {
        out_[c] = S(0);
        continue;
      }
      if (w_row[c] == S(0) || (fixed_zero != nullptr && fixed_zero[c])) {
        zero_local.push_back(static_cast<Index>(orig_.size()));
        out_[c] = S(0);
      }
      orig_.push_back(c);
    }
    const Index n = static_cast<Index>(orig_.size());
    const Index capacity = lazy_capacity(n, lazy_batch);
    // A float32 inverse is only ever prepared for float32 rows (PreparedHessian::keep_float32_only).
    if (h.hinv != nullptr)
      inv_.load(h.hinv, cols, orig_, capacity);
    else
      inv_.load_packed(h.hinv_lower_f32, cols, orig_, capacity);
    w_.resize(n);
    for (Index i = 0; i < n; ++i) w_[i] = w_row[orig_[static_cast<size_t>(i)]];
    free_.assign(static_cast<size_t>(n), 1);
    if (!zero_local.empty()) {
      if (!inv_.eliminate_now(zero_local)) lost_definiteness();
      std::vector<char> keep(static_cast<size_t>(n), 1);
      for (Index i : zero_local) keep[static_cast<size_t>(i)] = 0;
      compact(keep);
    }
    num_free_ = inv_.size();
  }

  Index size() const { return inv_.size(); }
  Index num_free() const { return num_free_; }
  bool is_free(Index i) const { return free_[static_cast<size_t>(i)] != 0; }
  /// size() flags, 1 where the input is still free.
  const char* free_mask() const { return free_.data(); }
  Index orig(Index i) const { return orig_[static_cast<size_t>(i)]; }
  const Vec& w() const { return w_; }
  const Vec& diag() const { return inv_.diag(); }
  /// The last `len` downdate columns (n x len): the inverse changed by -V V^T.
  auto recent_downdates(Index len) const { return inv_.recent_downdates(len); }
  /// Current diagonal block [begin, begin+len) of the inverse (len x len).
  void diagonal_block(Index begin, Index len, Mat& out) const {
    inv_.diagonal_block(begin, len, out);
  }

  /// Makes room for `b` more downdates, flushing (and compacting local indices) if needed.
  /// Returns true when local indices changed.
  bool ensure_room(Index b) {
    if (inv_.room() >= b) return false;
    inv_.flush(free_);
    compact(free_);
    inv_.reserve(b);  // a block larger than the lazy batch
    return true;
  }

  /// Fixes local input q to `target` with the exact OBS update of the free weights.
  /// Returns the step's loss increase 1/2 (w_q - target)^2 / G_qq. Requires room for 1.
  double fix(Index q, S target) {
    col_.resize(inv_.size());
    inv_.column(q, col_);
    const S dq = col_[q];
    if (!(dq > S(0)) || !std::isfinite(dq)) lost_definiteness();
    const S err = w_[q] - target;
    w_.noalias() -= col_ * (err / dq);
    w_[q] = target;
    inv_.downdate(q, col_);
    mark_fixed(q, target);
    return 0.5 * static_cast<double>(err) * static_cast<double>(err) / static_cast<double>(dq);
  }

  /// Factorizes the current diagonal block [begin, begin+len) of the inverse; false if not PD.
  bool factor_block(Index begin, Index len) {
    inv_.diagonal_block(begin, len, block_);
    llt_.compute(block_);
    if (llt_.info() != Eigen::Success) return false;
    return (llt_.matrixLLT().diagonal().array() > S(0)).all();
  }

  /// OBS score w_B^T G_BB^-1 w_B of the block last factorized by factor_block().
  double block_score(Index begin, Index len) {
    y_ = w_.segment(begin, len);
    llt_.matrixL().solveInPlace(y_);
    return static_cast<double>(y_.squaredNorm());
  }

  /// Prunes the block last factorized by factor_block() (all its inputs must be free) with the
  /// exact multi-weight OBS update. Returns the loss increase. Requires room for len.
  double prune_block(Index begin, Index len) {
    const double loss = 0.5 * block_score(begin, len);
    inv_.columns(begin, len, cols_);
    Vec coef = y_;
    llt_.matrixU().solveInPlace(coef);  // G_BB^-1 w_B
    w_.noalias() -= cols_ * coef;
    inv_.downdate_block(cols_, llt_.matrixLLT());
    for (Index i = begin; i < begin + len; ++i) mark_fixed(i, S(0));
    return loss;
  }

  /// Writes the free weights to the output row.
  void finish() {
    for (Index i = 0; i < inv_.size(); ++i)
      if (free_[static_cast<size_t>(i)]) out_[orig_[static_cast<size_t>(i)]] = w_[i];
  }

  /// float32: PrecisionLost (the solvers then redo the layer in float64); float64: the H is
  /// too ill-conditioned even there.
  [[noreturn]] static void lost_definiteness() {
    if constexpr (std::is_same_v<S, float>)
      throw PrecisionLost(
          "the inverse Hessian lost positive definiteness during the float32 elimination (H is "
          "too ill-conditioned for float32)");
    throw NotPositiveDefinite(
        "the inverse Hessian lost positive definiteness during the float64 elimination (H is "
        "too ill-conditioned even for float64; the float32 solvers already retry there); "
        "increase damp (e.g. 0.01) or collect more calibration samples");
  }

  /// A greedy's scores or weights overflowed (every picked score NaN, or the best one Inf).
  [[noreturn]] static void overflowed() {
    throw Overflow(
        "W: the greedy's scores overflowed to NaN or Inf (values too large for the precision, "
        "or H too ill-conditioned for it); rescale W or H, increase damp, or pass float64 "
        "inputs");
  }

 private:
  void mark_fixed(Index q, S value) {
    free_[static_cast<size_t>(q)] = 0;
    --num_free_;
    out_[orig_[static_cast<size_t>(q)]] = value;
  }

  void compact(const std::vector<char>& keep) {
    Index m = 0;
    for (Index i = 0; i < static_cast<Index>(keep.size()); ++i) {
      if (!keep[static_cast<size_t>(i)]) continue;
      w_[m] = w_[i];
      orig_[static_cast<size_t>(m)] = orig_[static_cast<size_t>(i)];
      ++m;
    }
    w_.conservativeResize(m);
    orig_.resize(static_cast<size_t>(m));
    free_.assign(static_cast<size_t>(m), 1);
  }

  LazyInverse<S> inv_;
  Vec w_, col_, y_;
  Mat cols_, block_;
  Eigen::LLT<Mat> llt_;
  std::vector<Index> orig_;
  std::vector<char> free_;
  Index num_free_ = 0;
  S* out_ = nullptr;
};

}  // namespace obc::OBC_KERNEL_NS

// Hessian validation, dead inputs, damping and the Cholesky inverse; layer losses.
#include "obc/hessian.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "internal/damped_hessian.hpp"
#include "internal/huge_pages.hpp"
#include "internal/prepared_view.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

namespace {

constexpr Index kTile = 64;  // square tiles make the transposed reads of H cache-friendly

Index tiles_of(Index n) { return (n + kTile - 1) / kTile; }

// Threads for one pass over an n x n Hessian: a parallel region costs more than a small pass.
int pass_threads(Index n, int num_threads) { return n < 512 ? 1 : num_threads; }

// What one pass over H's entries finds: whether all are finite, max |H_ij| and max |H_ij - H_ji|.
// Maxima do not depend on the order they are taken in, so a parallel pass gives the same values.
struct EntryScan {
  bool finite = true;
  double max_abs = 0, max_asym = 0;
  void merge(const EntryScan& other) {
    finite = finite && other.finite;
    max_abs = std::max(max_abs, other.max_abs);
    max_asym = std::max(max_asym, other.max_asym);
  }
};

// Scans the tiles of column tile `tile` at and below the diagonal, reading each (i, j), i >= j,
// with its mirror (j, i): every entry of H is read once, both directions in cache.
// Tile (ib, jb) of H and its mirror tile (jb, ib), copied in H's own storage order into
// contiguous buffers: reading the mirror transposed in place walks H with a stride of n entries,
// and at power-of-two n (4096 doubles = 32 KiB) all 64 rows of a tile fall in the same cache set,
// so nearly every read missed (the copies read whole rows or columns of H instead).
template <class M>
struct TilePair {
  using Buffer = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic,
                               M::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor>;
  Buffer lower, upper;  // lower(i - ib, j - jb) = H(i, j); upper(j - jb, i - ib) = H(j, i)
  void load(const M& h, Index ib, Index jb) {
    const Index n = h.rows(), height = std::min(kTile, n - ib), width = std::min(kTile, n - jb);
    lower = h.block(ib, jb, height, width).template cast<double>();
    upper = h.block(jb, ib, width, height).template cast<double>();
  }
};

template <class M>
EntryScan scan_tile_column(const M& h, Index tile) {
  const Index n = h.rows(), jb = tile * kTile;
  EntryScan scan;
  bool finite = true;
  TilePair<M> pair;
  for (Index ib = jb; ib < n; ib += kTile) {
    pair.load(h, ib, jb);
    for (Index j = jb; j < std::min(n, jb + kTile); ++j)
      for (Index i = std::max(ib, j); i < std::min(n, ib + kTile); ++i) {
        const double lower = pair.lower(i - ib, j - jb), upper = pair.upper(j - jb, i - ib);
        const double abs_lower = std::abs(lower), abs_upper = std::abs(upper);
        // NaN fails every comparison and Inf exceeds the largest double.
        finite = finite && abs_lower <= std::numeric_limits<double>::max() &&
                 abs_upper <= std::numeric_limits<double>::max();
        scan.max_abs = std::max(scan.max_abs, std::max(abs_lower, abs_upper));
        scan.max_asym = std::max(scan.max_asym, std::abs(lower - upper));
      }
  }
  scan.finite = finite;
  return scan;
}

}  // namespace

void validate_hessian(const HessianRef& H, double symmetry_tol, int num_threads) {
  OBC_CHECK(H.rows() == H.cols(), "H: expected a square cols x cols matrix, got ", H.rows(), "x",
            H.cols());
  OBC_CHECK(H.rows() > 0, "H: expected a non-empty matrix, got 0x0");
  H.visit([&](const auto& h) {
    const Index n = h.rows();
    std::vector<EntryScan> scans(static_cast<size_t>(tiles_of(n)));
    parallel_for(tiles_of(n), pass_threads(n, num_threads), nullptr,
                 [&](Index t, int) { scans[static_cast<size_t>(t)] = scan_tile_column(h, t); });
    EntryScan all;
    for (const EntryScan& scan : scans) all.merge(scan);
    OBC_CHECK(all.finite, "H: expected finite values, got NaN or Inf");
    // A Hessian whose largest entry is subnormal has lost its precision to underflow, and its
    // inverse overflows: say so rather than fail later as "not positive definite" or with NaN.
    OBC_CHECK(all.max_abs == 0 || all.max_abs >= std::numeric_limits<double>::min(),
              "H: expected entries of normal float64 magnitude, got max|H| = ", all.max_abs,
              " (below ", std::numeric_limits<double>::min(),
              ": subnormal, so H has lost precision and its inverse would overflow); rescale H "
              "(e.g. divide by max|H|; the solutions do not change)");
    OBC_CHECK(all.max_asym <= symmetry_tol * all.max_abs,
              "H: expected a symmetric matrix, got max|H - H^T| = ", all.max_asym,
              " (max|H| = ", all.max_abs, ")");
    for (Index i = 0; i < n; ++i) {
      OBC_CHECK(h(i, i) >= 0, "H: expected a non-negative diagonal (H = 2/n X X^T), got H[", i,
                ",", i, "] = ", h(i, i));
      if (h(i, i) == 0) {
        // A zero diagonal means the input is always zero, so its whole row must be zero.
        OBC_CHECK(h.row(i).cwiseAbs().maxCoeff() == 0, "H: row ", i,
                  " has a zero diagonal but non-zero off-diagonal entries; not a Hessian 2/n X X^T");
      }
    }
  });
}

namespace internal {

namespace {

// write_damped_hessian's body: `out` of element type T, column j of D into column
// column_of[j] (identity when null).
template <class T>
void write_damped(const HessianRef& H, const PreparedHessian& prep, T* out, bool full,
                  const Index* column_of, int num_threads, InterruptHook* interrupt) {
  const Index cols = prep.cols();
  const char* dead = prep.dead.data();
  const auto column = [&](Index j) { return out + (column_of ? column_of[j] : j) * cols; };
  // One column tile per item (its writes also fault in a fresh buffer's pages on the thread that
  // uses them).
  H.visit([&](const auto& h) {
    using M = std::decay_t<decltype(h)>;
    parallel_for(tiles_of(cols), pass_threads(cols, num_threads), interrupt, [&](Index tile, int) {
      const Index jb = tile * kTile, jend = std::min(cols, jb + kTile);
      TilePair<M> pair;
      Eigen::Matrix<double, kTile, kTile> value;  // the tile of D, for its mirror's writes
      for (Index ib = jb; ib < cols; ib += kTile) {
        const Index iend = std::min(cols, ib + kTile);
        pair.load(h, ib, jb);
        for (Index j = jb; j < jend; ++j) {
          T* to = column(j);
          for (Index i = std::max(ib, j); i < iend; ++i) {
            double v;
            if (dead[i] || dead[j]) {
              v = i == j ? 1.0 : 0.0;
            } else {
              v = 0.5 * (pair.lower(i - ib, j - jb) + pair.upper(j - jb, i - ib));
              if (i == j) v += prep.damp_absolute;
            }
            to[i] = static_cast<T>(v);
            value(i - ib, j - jb) = v;
          }
        }
        // The mirror (j, i) column by column of out, i.e. contiguous writes (as the reads above).
        if (full)
          for (Index i = ib; i < iend; ++i) {
            T* to = column(i);
            for (Index j = jb; j < std::min(jend, i + 1); ++j)
              to[j] = static_cast<T>(value(i - ib, j - jb));
          }
      }
    });
  });
}

}  // namespace

void write_damped_hessian(const HessianRef& H, const PreparedHessian& prep, double* out, bool full,
                          int num_threads, InterruptHook* interrupt) {
  write_damped<double>(H, prep, out, full, nullptr, num_threads, interrupt);
}

template <class T>
void write_damped_hessian_moved(const HessianRef& H, const PreparedHessian& prep, T* out,
                                const Index* column_of, int num_threads, InterruptHook* interrupt) {
  write_damped<T>(H, prep, out, true, column_of, num_threads, interrupt);
}

template void write_damped_hessian_moved<float>(const HessianRef&, const PreparedHessian&, float*,
                                                const Index*, int, InterruptHook*);
template void write_damped_hessian_moved<double>(const HessianRef&, const PreparedHessian&,
                                                 double*, const Index*, int, InterruptHook*);

NotPositiveDefinite not_positive_definite(const PreparedHessian& prep) {
  const Index live = prep.cols() - prep.num_dead;
  // If H were positive semidefinite, H + lambda I would have its eigenvalues in
  // [lambda, live_trace] (H's largest is at most its trace), so condition number <= live_trace /
  // lambda. Its Cholesky factorization then provably succeeds while that bound times
  // live^2 * eps is well below 1 (Demmel's bound for the diagonally scaled matrix), and its
  // pivots stay far above kPivotTolerance of their diagonal. A failure there can only mean
  // that H itself has a negative eigenvalue, and more damping would only mask that.
  const double cond_bound = prep.damp_absolute > 0 ? prep.live_trace / prep.damp_absolute : 0.0;
  const double eps = std::numeric_limits<double>::epsilon();
  const double n = static_cast<double>(live);
  const bool indefinite = cond_bound > 0 && cond_bound * n * n * eps <= 0.1 &&
                          cond_bound * kPivotTolerance <= 0.01;
  if (indefinite)
    return NotPositiveDefinite(detail::concat(
        "H is not positive semidefinite (it has a negative eigenvalue, which no Hessian "
        "2/n X X^T has): even with damp = ", prep.damp, " (lambda = ", prep.damp_absolute,
        " added to the diagonal of ", live, " live inputs) it has no Cholesky factor, which any "
        "positive semidefinite H of its trace would. Was it accumulated from inconsistent data "
        "(a Hessian or sum edited, subtracted, or pieced together from different layers)? "
        "Increasing damp would only mask this."));
  return NotPositiveDefinite(detail::concat(
      "H is not positive definite after damping: damp = ", prep.damp,
      " (lambda = ", prep.damp_absolute, " added to the diagonal of ", live,
      " live inputs). Increase damp (e.g. 0.01 or 0.1) or collect more calibration samples; "
      "if H was not accumulated as 2/n X X^T, it may itself be indefinite (not positive "
      "semidefinite), which damping cannot make right."));
}

}  // namespace internal

PreparedHessian prepare_hessian(const HessianRef& H, const HessianOptions& options,
                                int num_threads, InterruptHook* interrupt) {
  OBC_CHECK(std::isfinite(options.damp) && options.damp >= 0,
            "damp: expected a finite value >= 0, got ", options.damp);
  resolve_num_threads(num_threads);  // every solver starts here: a bad count fails at once
  validate_hessian(H, options.symmetry_tol, num_threads);
  const Index cols = H.rows();
  PreparedHessian prep;
  prep.dead.assign(static_cast<size_t>(cols), 0);
  double live_diag_sum = 0;
  H.visit([&](const auto& h) {
    for (Index i = 0; i < cols; ++i) {
      if (h(i, i) == 0) {
        prep.dead[static_cast<size_t>(i)] = 1;
        ++prep.num_dead;
      } else {
        live_diag_sum += static_cast<double>(h(i, i));
      }
    }
  });
  const Index live = cols - prep.num_dead;
  prep.damp = options.damp;
  prep.damp_absolute = live > 0 ? options.damp * live_diag_sum / static_cast<double>(live) : 0.0;
  prep.live_trace = live_diag_sum + static_cast<double>(live) * prep.damp_absolute;
  OBC_CHECK(std::isfinite(prep.damp_absolute),
            "damp: expected a relative damping whose absolute value damp * mean(diag H) fits in "
            "float64, got damp = ", options.damp, " times mean(diag H) = ",
            live > 0 ? live_diag_sum / static_cast<double>(live) : 0.0,
            ", which overflows; typical values are 0.001 .. 0.1");
  if (!options.invert) return prep;
  // The damped, exactly symmetric Hessian goes into the buffer that becomes its inverse (lower
  // triangle only): one cols x cols float64 buffer is all the preparation ever holds.
  prep.hinv.resize(cols, cols);
  internal::advise_huge_pages(prep.hinv.data(), sizeof(double) * static_cast<size_t>(cols * cols));
  internal::write_damped_hessian(H, prep, prep.hinv.data(), false, num_threads, interrupt);
  // The O(cols^3) inverse runs in the SIMD-dispatched kernels (see row_kernels.hpp). A pivot
  // below 1e-13 of its diagonal means H is numerically singular: the inverse would be dominated
  // by rounding, so say so instead of returning garbage.
  if (!internal::kernels().spd_inverse_inplace(prep.hinv.data(), cols, internal::kPivotTolerance,
                                               num_threads, interrupt))
    throw internal::not_positive_definite(prep);
  return prep;
}

double live_trace(const HessianRef& H, double damp_absolute) {
  double trace = 0;
  H.visit([&](const auto& h) {
    for (Index i = 0; i < h.rows(); ++i)
      if (h(i, i) > 0) trace += static_cast<double>(h(i, i)) + damp_absolute;
  });
  return trace;
}

template <class Scalar>
void check_scale(const Eigen::Ref<const RowMatrix<Scalar>>& W, double h_trace, double limit,
                 const char* precision) {
  double max_norm2 = 0;  // float64 even for float32 W; Inf when it overflows float64 too
  for (Index r = 0; r < W.rows(); ++r)
    max_norm2 = std::max(max_norm2, W.row(r).template cast<double>().squaredNorm());
  const double bound = limit / 256;
  if (max_norm2 <= bound && max_norm2 * h_trace <= bound) return;
  throw Overflow(detail::concat(
      "W: values too large for ", precision, " arithmetic: max over rows of ||w||^2 = ",
      max_norm2, " and trace(H) = ", h_trace, " (their product bounds every OBS score and loss) ",
      "must stay below ", bound, "; rescale W or H (losses are quadratic in W, linear in H)"));
}

template void check_scale<float>(const Eigen::Ref<const RowMatrix<float>>&, double, double,
                                 const char*);
template void check_scale<double>(const Eigen::Ref<const RowMatrix<double>>&, double, double,
                                  const char*);

namespace {

// A loss 1/2 dw H dw^T is >= 0 for a positive semidefinite H. A negative value within rounding
// of the sum (|terms| <= 1/2 max|H| ||dw||_1^2; H itself may carry float32 rounding) is set to
// 0; a larger one means H is indefinite, which no Hessian 2/n X X^T is: that is an error, never
// a negative loss.
template <class Scalar>
void reject_negative_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                            const Eigen::Ref<const RowMatrix<Scalar>>& W_hat, const HessianRef& H,
                            Eigen::VectorXd& losses) {
  double max_abs = -1;
  for (Index r = 0; r < losses.size(); ++r) {
    if (losses[r] >= 0) continue;
    if (max_abs < 0) max_abs = H.visit([](const auto& h) {
      return static_cast<double>(h.cwiseAbs().maxCoeff());
    });
    const double dw_l1 = (W.row(r).template cast<double>() - W_hat.row(r).template cast<double>())
                             .cwiseAbs()
                             .sum();
    const double rounding = 1e-6 * 0.5 * max_abs * dw_l1 * dw_l1;
    OBC_CHECK(-losses[r] <= rounding, "H: expected a positive semidefinite Hessian (2/n X X^T), "
              "got an indefinite one: row ", r, " has loss 1/2 dw H dw^T = ", losses[r], " < 0");
    losses[r] = 0;
  }
}

// W, W_hat and H are finite (validated), and the kernel sums in float64 whatever W's dtype: a
// non-finite loss can only mean that 1/2 dw H dw^T overflowed float64 (e.g. |W - W_hat| ~ 1e300,
// or float32 weights near FLT_MAX with a large H). Name the argument whose scale is to blame:
// W_hat only when it is clearly the larger (the solvers pass their own result as W_hat, which
// has W's scale, so there the message names the caller's W).
template <class Scalar>
[[noreturn]] void throw_loss_overflow(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                                      const Eigen::Ref<const RowMatrix<Scalar>>& W_hat,
                                      const HessianRef& H) {
  double w_norm2 = 0, hat_norm2 = 0;  // Inf when they overflow float64 themselves
  for (Index r = 0; r < W.rows(); ++r) {
    w_norm2 = std::max(w_norm2, W.row(r).template cast<double>().squaredNorm());
    hat_norm2 = std::max(hat_norm2, W_hat.row(r).template cast<double>().squaredNorm());
  }
  const bool blame_hat = hat_norm2 > 4 * w_norm2;
  throw Overflow(detail::concat(
      blame_hat ? "W_hat" : "W", ": values too large: the loss 1/2 (w - w_hat) H (w - w_hat)^T "
      "overflows float64 (max over rows of ||w||^2 = ", w_norm2, ", of ||w_hat||^2 = ", hat_norm2,
      ", trace(H) = ", live_trace(H), "); rescale ", blame_hat ? "W_hat" : "W",
      " or H (losses are quadratic in the weights, linear in H)"));
}

}  // namespace

template <class Scalar>
Eigen::VectorXd row_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                           const Eigen::Ref<const RowMatrix<Scalar>>& W_hat, const HessianRef& H,
                           int num_threads, InterruptHook* interrupt) {
  OBC_CHECK(W.rows() == W_hat.rows() && W.cols() == W_hat.cols(), "W_hat: expected shape ",
            W.rows(), "x", W.cols(), ", got ", W_hat.rows(), "x", W_hat.cols());
  OBC_CHECK(H.rows() == W.cols() && H.cols() == W.cols(), "H: expected ", W.cols(), "x", W.cols(),
            ", got ", H.rows(), "x", H.cols());
  validate_hessian(H, HessianOptions{}.symmetry_tol, num_threads);
  resolve_num_threads(num_threads);  // throws for a count outside [0, kMaxThreads]
  if (W.outerStride() != W.cols() || W_hat.outerStride() != W_hat.cols()) {
    const RowMatrix<Scalar> w = W, w_hat = W_hat;  // the kernel reads contiguous rows
    return row_losses<Scalar>(w, w_hat, H, num_threads, interrupt);
  }
  Eigen::VectorXd losses(W.rows());
  internal::row_kernels<Scalar>().row_losses(W.data(), W_hat.data(), W.rows(), W.cols(),
                                             internal::input_of(H), losses.data(), num_threads,
                                             interrupt);
  if (!losses.allFinite()) throw_loss_overflow<Scalar>(W, W_hat, H);
  reject_negative_losses<Scalar>(W, W_hat, H, losses);
  return losses;
}

template Eigen::VectorXd row_losses<float>(const Eigen::Ref<const RowMatrix<float>>&,
                                           const Eigen::Ref<const RowMatrix<float>>&,
                                           const HessianRef&, int, InterruptHook*);
template Eigen::VectorXd row_losses<double>(const Eigen::Ref<const RowMatrix<double>>&,
                                            const Eigen::Ref<const RowMatrix<double>>&,
                                            const HessianRef&, int, InterruptHook*);

}  // namespace obc

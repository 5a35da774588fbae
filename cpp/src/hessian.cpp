// Hessian validation, dead inputs, damping and the Cholesky inverse; layer losses.
#include "obc/hessian.hpp"

#include <Eigen/Cholesky>
#include <cmath>

#include "internal/row_kernels.hpp"
#include "obc/errors.hpp"
#include "obc/parallel.hpp"

namespace obc {

void validate_hessian(const Eigen::Ref<const Eigen::MatrixXd>& H, double symmetry_tol) {
  OBC_CHECK(H.rows() == H.cols(), "H: expected a square cols x cols matrix, got ", H.rows(), "x",
            H.cols());
  OBC_CHECK(H.rows() > 0, "H: expected a non-empty matrix, got 0x0");
  OBC_CHECK(H.allFinite(), "H: expected finite values, got NaN or Inf");
  const double scale = H.cwiseAbs().maxCoeff();
  const double asym = (H - H.transpose()).cwiseAbs().maxCoeff();
  OBC_CHECK(asym <= symmetry_tol * scale, "H: expected a symmetric matrix, got max|H - H^T| = ",
            asym, " (max|H| = ", scale, ")");
  for (Index i = 0; i < H.rows(); ++i) {
    OBC_CHECK(H(i, i) >= 0, "H: expected a non-negative diagonal (H = 2/n X X^T), got H[", i, ",",
              i, "] = ", H(i, i));
    if (H(i, i) == 0) {
      // A zero diagonal means the input is always zero, so its whole row must be zero.
      OBC_CHECK(H.row(i).cwiseAbs().maxCoeff() == 0, "H: row ", i,
                " has a zero diagonal but non-zero off-diagonal entries; not a Hessian 2/n X X^T");
    }
  }
}

PreparedHessian prepare_hessian(const Eigen::Ref<const Eigen::MatrixXd>& H,
                                const HessianOptions& options) {
  OBC_CHECK(std::isfinite(options.damp) && options.damp >= 0,
            "damp: expected a finite value >= 0, got ", options.damp);
  validate_hessian(H, options.symmetry_tol);
  const Index cols = H.rows();
  PreparedHessian prep;
  prep.h = 0.5 * (H + H.transpose());  // exact symmetry for the factorization
  prep.dead.assign(static_cast<size_t>(cols), 0);
  double live_diag_sum = 0;
  for (Index i = 0; i < cols; ++i) {
    if (H(i, i) == 0) {
      prep.dead[static_cast<size_t>(i)] = 1;
      ++prep.num_dead;
    } else {
      live_diag_sum += H(i, i);
    }
  }
  const Index live = cols - prep.num_dead;
  prep.damp = options.damp;
  prep.damp_absolute = live > 0 ? options.damp * live_diag_sum / static_cast<double>(live) : 0.0;
  for (Index i = 0; i < cols; ++i) {
    if (prep.dead[static_cast<size_t>(i)]) {
      prep.h(i, i) = 1.0;  // decoupled unit entry; such weights are zeroed and never updated
    } else {
      prep.h(i, i) += prep.damp_absolute;
    }
  }
  // The O(cols^3) factorization runs in the SIMD-dispatched kernels (see row_kernels.hpp).
  // A pivot below 1e-13 of its diagonal means H is numerically singular: the inverse would be
  // dominated by rounding, so say so instead of returning garbage.
  prep.hinv.resize(cols, cols);
  if (!internal::kernels().spd_inverse(prep.h.data(), prep.hinv.data(), cols, 1e-13)) {
    throw NotPositiveDefinite(detail::concat(
        "H is not positive definite after damping: damp = ", options.damp,
        " (lambda = ", prep.damp_absolute, " added to the diagonal of ", live,
        " live inputs). Increase damp (e.g. 0.01 or 0.1) or collect more calibration samples."));
  }
  return prep;
}

template <class Scalar>
Eigen::VectorXd row_losses(const Eigen::Ref<const RowMatrix<Scalar>>& W,
                           const Eigen::Ref<const RowMatrix<Scalar>>& W_hat,
                           const Eigen::Ref<const Eigen::MatrixXd>& H, int num_threads) {
  OBC_CHECK(W.rows() == W_hat.rows() && W.cols() == W_hat.cols(), "W_hat: expected shape ",
            W.rows(), "x", W.cols(), ", got ", W_hat.rows(), "x", W_hat.cols());
  OBC_CHECK(H.rows() == W.cols() && H.cols() == W.cols(), "H: expected ", W.cols(), "x", W.cols(),
            ", got ", H.rows(), "x", H.cols());
  Eigen::VectorXd losses(W.rows());
  constexpr Index chunk = 32;  // fixed chunking: results do not depend on the thread count
  const Index chunks = (W.rows() + chunk - 1) / chunk;
  parallel_for(chunks, num_threads, nullptr, [&](Index c, int) {
    const Index begin = c * chunk;
    const Index len = std::min(chunk, W.rows() - begin);
    const RowMatrixXd delta =
        (W.middleRows(begin, len).template cast<double>() -
         W_hat.middleRows(begin, len).template cast<double>());
    const RowMatrixXd delta_h = delta * H;
    losses.segment(begin, len) = 0.5 * delta_h.cwiseProduct(delta).rowwise().sum();
  });
  return losses;
}

template Eigen::VectorXd row_losses<float>(const Eigen::Ref<const RowMatrix<float>>&,
                                           const Eigen::Ref<const RowMatrix<float>>&,
                                           const Eigen::Ref<const Eigen::MatrixXd>&, int);
template Eigen::VectorXd row_losses<double>(const Eigen::Ref<const RowMatrix<double>>&,
                                            const Eigen::Ref<const RowMatrix<double>>&,
                                            const Eigen::Ref<const Eigen::MatrixXd>&, int);

}  // namespace obc

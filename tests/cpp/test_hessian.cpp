// Tests for obc/hessian.hpp: validation, damping, dead inputs, losses.
#include "obc/hessian.hpp"

#include "check.hpp"
#include "obc/errors.hpp"
#include "problems.hpp"

using namespace obc;

OBC_TEST(damping_is_relative_to_mean_diagonal) {
  auto p = obc_test::make_problem(2, 8, 64, 1);
  PreparedHessian prep = prepare_hessian(p.H, HessianOptions{0.1});
  CHECK_NEAR(prep.damp_absolute, 0.1 * p.H.diagonal().mean(), 1e-12);
  CHECK_NEAR(prep.h(3, 3), p.H(3, 3) + prep.damp_absolute, 1e-12);
  const Eigen::MatrixXd identity = prep.h * prep.hinv;
  CHECK((identity - Eigen::MatrixXd::Identity(8, 8)).cwiseAbs().maxCoeff() < 1e-10);
}

OBC_TEST(dead_inputs_are_decoupled) {
  auto p = obc_test::make_problem(2, 6, 64, 2);
  p.H.row(2).setZero();
  p.H.col(2).setZero();
  PreparedHessian prep = prepare_hessian(p.H, HessianOptions{0.0});
  CHECK(prep.num_dead == 1);
  CHECK(prep.dead[2] == 1);
  CHECK(prep.hinv(2, 2) == 1.0);
  CHECK(prep.hinv.row(2).cwiseAbs().sum() == 1.0);
}

OBC_TEST(singular_hessian_names_the_damping) {
  auto p = obc_test::make_problem(2, 16, 4, 3);  // rank 4 < 16
  bool thrown = false;
  try {
    prepare_hessian(p.H, HessianOptions{0.0});
  } catch (const NotPositiveDefinite& e) {
    thrown = std::string(e.what()).find("damp = 0") != std::string::npos;
  }
  CHECK(thrown);
  // With damping the same H is usable, and the damping used is reported.
  PreparedHessian prep = prepare_hessian(p.H, HessianOptions{0.01});
  CHECK(prep.damp == 0.01);
}

OBC_TEST(invalid_hessians_are_rejected) {
  auto p = obc_test::make_problem(2, 5, 32, 4);
  Eigen::MatrixXd asym = p.H;
  asym(0, 1) += 1.0;
  CHECK_THROWS(prepare_hessian(asym), InvalidArgument);
  Eigen::MatrixXd nan = p.H;
  nan(1, 1) = std::nan("");
  CHECK_THROWS(prepare_hessian(nan), InvalidArgument);
  CHECK_THROWS(prepare_hessian(Eigen::MatrixXd(3, 4)), InvalidArgument);
  Eigen::MatrixXd bad_dead = p.H;
  bad_dead(0, 0) = 0;  // zero diagonal with non-zero row
  CHECK_THROWS(prepare_hessian(bad_dead), InvalidArgument);
  CHECK_THROWS(prepare_hessian(p.H, HessianOptions{-1.0}), InvalidArgument);
}

OBC_TEST(row_losses_equal_output_error) {
  auto p = obc_test::make_problem(3, 7, 50, 5);
  RowMatrixXd W_hat = p.W * 0.5;
  const Eigen::VectorXd losses = row_losses<double>(p.W, W_hat, p.H);
  const RowMatrixXd out_err = (p.W - W_hat) * p.X;
  for (Index r = 0; r < 3; ++r)
    CHECK_NEAR(losses[r], out_err.row(r).squaredNorm() / 50.0, 1e-10);
}

OBC_TEST_MAIN

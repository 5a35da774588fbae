// Tests for obc/hessian.hpp: validation, damping, dead inputs, losses.
#include "obc/hessian.hpp"

#include <Eigen/Cholesky>
#include <cmath>

#include "check.hpp"
#include "obc/errors.hpp"
#include "problems.hpp"

using namespace obc;

OBC_TEST(damping_is_relative_to_mean_diagonal) {
  auto p = obc_test::make_problem(2, 8, 64, 1);
  PreparedHessian prep = prepare_hessian(p.H, HessianOptions{0.1});
  CHECK_NEAR(prep.damp_absolute, 0.1 * p.H.diagonal().mean(), 1e-12);
  Eigen::MatrixXd damped = p.H;
  damped.diagonal().array() += prep.damp_absolute;
  const Eigen::MatrixXd identity = damped * prep.hinv;
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

// The in-place inverse (blocked Cholesky, triangular inverse, product) against a plain solve,
// across the block size (128) boundaries, on random and ill-conditioned matrices, and the same
// bits for any thread count.
OBC_TEST(inverse_matches_solve_and_ignores_thread_count) {
  for (Index n : {1, 2, 5, 127, 128, 129, 300, 515, 1030}) {  // 1030: 128-wide panels
    for (int ill = 0; ill < 2; ++ill) {
      auto p = obc_test::make_problem(1, n, 2 * n + 3, 40 + static_cast<unsigned>(n),
                                      ill ? 3.0 : 0.0);
      const HessianOptions options{ill ? 1e-8 : 0.01};
      const PreparedHessian one = prepare_hessian(p.H, options, 1);
      const PreparedHessian two = prepare_hessian(p.H, options, 2);
      CHECK((one.hinv.array() == two.hinv.array()).all());
      CHECK((one.hinv.array() == one.hinv.transpose().array()).all());
      Eigen::MatrixXd damped = p.H;
      damped.diagonal().array() += one.damp_absolute;
      const Eigen::MatrixXd reference = damped.llt().solve(Eigen::MatrixXd::Identity(n, n));
      // Both are backward stable; their difference scales with the condition number.
      const double cond = damped.norm() * reference.norm();
      const double err = (one.hinv - reference).norm() / reference.norm();
      CHECK(err < 1e-15 * cond * n + 1e-14);
    }
  }
}

// A float32, row-major or strided Hessian is read where it lies and gives the same preparation
// as its float64 column-major copy.
OBC_TEST(hessian_views_of_any_layout_agree) {
  auto p = obc_test::make_problem(4, 150, 400, 9);
  const Eigen::MatrixXf h32 = p.H.cast<float>();
  const Eigen::MatrixXd h32_wide = h32.cast<double>();
  const RowMatrixXd h_rows = p.H;
  Eigen::MatrixXd padded = Eigen::MatrixXd::Zero(160, 150);
  padded.topRows(150) = p.H;
  const PreparedHessian base = prepare_hessian(p.H);
  CHECK((prepare_hessian(h_rows).hinv.array() == base.hinv.array()).all());
  CHECK((prepare_hessian(padded.topRows(150)).hinv.array() == base.hinv.array()).all());
  CHECK((prepare_hessian(h32).hinv.array() == prepare_hessian(h32_wide).hinv.array()).all());
  const RowMatrixXd w_hat = RowMatrixXd::Zero(4, 150);
  const Eigen::VectorXd l64 = row_losses<double>(p.W, w_hat, h32_wide);
  const Eigen::VectorXd l32 = row_losses<double>(p.W, w_hat, h32);
  for (Index r = 0; r < 4; ++r) CHECK_NEAR(l32[r], l64[r], 1e-13);
  const Eigen::VectorXd l_rows = row_losses<double>(p.W, w_hat, h_rows);
  const Eigen::VectorXd l_cols = row_losses<double>(p.W, w_hat, p.H);
  for (Index r = 0; r < 4; ++r) CHECK_NEAR(l_rows[r], l_cols[r], 1e-13);
  // keep_float32_only: the float32 copy of the same inverse, the float64 one released
  PreparedHessian narrowed = base;
  narrowed.keep_float32_only();
  CHECK(narrowed.hinv.size() == 0);
  CHECK(narrowed.hinv_lower_f32.size() == 150 * 151 / 2);
  for (Index j = 0, k = 0; j < 150; ++j)
    for (Index i = j; i < 150; ++i, ++k)
      CHECK(narrowed.hinv_lower_f32[static_cast<size_t>(k)] == static_cast<float>(base.hinv(i, j)));
}

OBC_TEST(row_losses_equal_output_error) {
  auto p = obc_test::make_problem(3, 7, 50, 5);
  RowMatrixXd W_hat = p.W * 0.5;
  const Eigen::VectorXd losses = row_losses<double>(p.W, W_hat, p.H);
  const RowMatrixXd out_err = (p.W - W_hat) * p.X;
  for (Index r = 0; r < 3; ++r)
    CHECK_NEAR(losses[r], out_err.row(r).squaredNorm() / 50.0, 1e-10);
}

OBC_TEST(inverse_polls_the_interrupt_hook) {
  // 700 inputs: 11 Cholesky panels of 64; a hook that stops at its 3rd poll stops the inverse.
  struct StopAtThird : InterruptHook {
    int polls = 0;
    bool should_stop() override { return ++polls >= 3; }
  } hook;
  const Index n = 700;
  Eigen::MatrixXd H = Eigen::MatrixXd::Identity(n, n) * (2.0 * n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < i; ++j) H(i, j) = H(j, i) = std::sin(static_cast<double>(i * n + j));
  CHECK_THROWS(prepare_hessian(H, HessianOptions{0.0}, 1, &hook), Interrupted);
  CHECK(hook.polls == 3);
  struct Never : InterruptHook {
    bool should_stop() override { return false; }
  } never;
  const PreparedHessian with_hook = prepare_hessian(H, HessianOptions{0.0}, 1, &never);
  const PreparedHessian without = prepare_hessian(H, HessianOptions{0.0}, 1);
  CHECK(with_hook.hinv == without.hinv);
}

OBC_TEST_MAIN

// Tests for obc/sparsegpt.hpp: the lazy sweep against a plain column loop, patterns, threads,
// interruption and bad arguments (the float64 replay of every pattern is in tests/python).
#include "obc/sparsegpt.hpp"

#include <Eigen/Cholesky>

#include "check.hpp"
#include "obc/errors.hpp"
#include "problems.hpp"

using namespace obc;

namespace {

// N:M SparseGPT with no lazy blocks: every column's update goes to all later columns at once.
RowMatrixXd plain_nm_loop(const RowMatrixXd& W, const Eigen::MatrixXd& H, double damp, Index n,
                          Index m) {
  const Index cols = W.cols();
  const double lambda = damp * H.diagonal().mean();
  const Eigen::MatrixXd Hd = H + lambda * Eigen::MatrixXd::Identity(cols, cols);
  const Eigen::MatrixXd hinv = Hd.llt().solve(Eigen::MatrixXd::Identity(cols, cols));
  const Eigen::MatrixXd U = hinv.llt().matrixU();
  RowMatrixXd w = W;
  for (Index r = 0; r < w.rows(); ++r) {
    std::vector<char> pruned(static_cast<size_t>(cols), 0);
    for (Index j = 0; j < cols; ++j) {
      if (j % m == 0)
        for (Index k = 0; k < n; ++k) {
          Index best = -1;
          for (Index c = j; c < j + m; ++c) {
            if (pruned[c]) continue;
            const double s = w(r, c) * w(r, c) / (U(c, c) * U(c, c));
            if (best < 0 || s < w(r, best) * w(r, best) / (U(best, best) * U(best, best))) best = c;
          }
          pruned[best] = 1;
        }
      const double err = (pruned[j] ? w(r, j) : 0.0) / U(j, j);
      if (pruned[j]) w(r, j) = 0;
      for (Index c = j + 1; c < cols; ++c) w(r, c) -= err * U(j, c);
    }
  }
  return w;
}

}  // namespace

OBC_TEST(nm_matches_plain_column_loop) {
  const auto p = obc_test::make_problem(70, 40, 160, 31);
  SparseGptOptions opt;
  opt.pattern = SparsePattern::NM;
  opt.lazy_block = 8;
  const auto res = prune_sparsegpt<double>(p.W, p.H, opt);
  const RowMatrixXd expected = plain_nm_loop(p.W, p.H, 0.01, 2, 4);
  CHECK((res.weight - expected).cwiseAbs().maxCoeff() <= 1e-10 * expected.cwiseAbs().maxCoeff());
  for (Index r = 0; r < 70; ++r)
    for (Index c = 0; c < 40; ++c) CHECK((res.pruned(r, c) == 1) == (expected(r, c) == 0.0));
}

OBC_TEST(unstructured_counts_and_existing_zeros) {
  auto p = obc_test::make_problem(9, 32, 128, 32);
  p.W(2, 7) = 0;
  p.W(4, 31) = 0;
  SparseGptOptions opt;
  opt.sparsity = 0.5;
  opt.lazy_block = 10;
  for (Spread spread : {Spread::Global, Spread::Uniform}) {
    opt.spread = spread;
    const auto res = prune_sparsegpt<double>(p.W, p.H, opt);
    CHECK(res.pruned.cast<Index>().sum() == 9 * 16);
    CHECK(res.weight(2, 7) == 0.0 && res.weight(4, 31) == 0.0);
    for (Index r = 0; r < 9; ++r) {
      if (spread == Spread::Uniform) CHECK(res.pruned.row(r).cast<Index>().sum() == 16);
      for (Index c = 0; c < 32; ++c)
        if (res.pruned(r, c)) CHECK(res.weight(r, c) == 0.0);
    }
  }
}

OBC_TEST(joint_quantization_lands_on_the_grid) {
  const auto p = obc_test::make_problem(6, 16, 64, 33);
  SparseGptOptions opt;
  opt.pattern = SparsePattern::NM;
  QuantOptions quant;
  quant.bits = 3;
  const auto res = quantize_sparsegpt<double>(p.W, p.H, opt, quant);
  for (Index r = 0; r < 6; ++r)
    for (Index c = 0; c < 16; ++c) {
      const double value = res.grid.scale(r, 0) * (double(res.codes(r, c)) - res.grid.zero(r, 0));
      CHECK(res.weight(r, c) == value);
      if (res.pruned(r, c)) CHECK(res.weight(r, c) == 0.0);
    }
}

OBC_TEST(results_do_not_depend_on_threads) {
  const auto p = obc_test::make_problem(300, 640, 700, 34);
  const RowMatrix<float> W = p.W.cast<float>();
  SparseGptOptions opt;
  RunOptions one, three;
  one.num_threads = 1;
  three.num_threads = 3;
  const auto a = prune_sparsegpt<float>(W, p.H, opt, {}, one);
  const auto b = prune_sparsegpt<float>(W, p.H, opt, {}, three);
  CHECK(a.weight == b.weight);
  CHECK(a.pruned == b.pruned);
}

OBC_TEST(interrupt_hook_stops_the_sweep) {
  struct StopNow : InterruptHook {
    bool should_stop() override { return true; }
  } stop;
  const auto p = obc_test::make_problem(8, 32, 64, 35);
  RunOptions run;
  run.interrupt = &stop;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, SparseGptOptions{}, {}, run), Interrupted);
}

OBC_TEST(bad_arguments_throw) {
  const auto p = obc_test::make_problem(3, 12, 48, 36);
  SparseGptOptions opt;
  opt.sparsity = 1.5;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, opt), InvalidArgument);
  opt = {};
  opt.lazy_block = 0;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, opt), InvalidArgument);
  opt = {};
  opt.pattern = SparsePattern::Blocked;
  opt.block = 5;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, opt), InvalidArgument);
  opt = {};
  opt.pattern = SparsePattern::NM;
  opt.n = 4;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, opt), InvalidArgument);
  opt.n = 1;
  opt.m = 5;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, p.H, opt), InvalidArgument);
  QuantOptions quant;
  quant.bits = 9;
  CHECK_THROWS(quantize_sparsegpt<double>(p.W, p.H, SparseGptOptions{}, quant), InvalidArgument);
  Eigen::MatrixXd singular = p.H;
  singular.setZero();
  singular(0, 0) = 1;
  singular(1, 1) = 1;
  singular(0, 1) = singular(1, 0) = 1;  // rank 1 on two live inputs; the rest dead
  HessianOptions no_damp;
  no_damp.damp = 0;
  CHECK_THROWS(prune_sparsegpt<double>(p.W, singular, SparseGptOptions{}, no_damp),
               NotPositiveDefinite);
}

OBC_TEST_MAIN

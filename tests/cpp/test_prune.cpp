// Tests for obc/prune.hpp against a brute-force re-solve, plus pattern and threading invariants.
#include "obc/prune.hpp"

#include <Eigen/Cholesky>
#include <set>

#include "check.hpp"
#include "obc/errors.hpp"
#include "problems.hpp"

using namespace obc;

namespace {

// Loss 1/2 dw H dw^T of the best row with the entries in P forced to zero (re-solved from scratch).
double masked_loss(const Eigen::VectorXd& w, const Eigen::MatrixXd& H, const std::set<Index>& P) {
  std::vector<Index> F;
  for (Index i = 0; i < w.size(); ++i)
    if (!P.count(i)) F.push_back(i);
  Eigen::VectorXd d = Eigen::VectorXd::Zero(w.size());
  for (Index i : P) d[i] = -w[i];
  if (!F.empty() && !P.empty()) {
    Eigen::MatrixXd hff(F.size(), F.size());
    Eigen::VectorXd rhs = Eigen::VectorXd::Zero(F.size());
    for (size_t a = 0; a < F.size(); ++a) {
      for (size_t b = 0; b < F.size(); ++b) hff(a, b) = H(F[a], F[b]);
      for (Index j : P) rhs[a] -= H(F[a], j) * d[j];
    }
    const Eigen::VectorXd dF = hff.llt().solve(rhs);
    for (size_t a = 0; a < F.size(); ++a) d[F[a]] = dF[a];
  }
  return 0.5 * d.dot(H * d);
}

std::vector<Index> brute_force_order(const Eigen::VectorXd& w, const Eigen::MatrixXd& Hd) {
  std::set<Index> P;
  std::vector<Index> order;
  while (static_cast<Index>(P.size()) < w.size()) {
    Index best = -1;
    double best_loss = 0;
    for (Index q = 0; q < w.size(); ++q) {
      if (P.count(q)) continue;
      std::set<Index> trial = P;
      trial.insert(q);
      const double l = masked_loss(w, Hd, trial);
      if (best < 0 || l < best_loss) {
        best = q;
        best_loss = l;
      }
    }
    P.insert(best);
    order.push_back(best);
  }
  return order;
}

}  // namespace

OBC_TEST(unstructured_trace_matches_brute_force) {
  for (unsigned seed = 0; seed < 4; ++seed) {
    auto p = obc_test::make_problem(3, 12, 48, 10 + seed, seed % 2 ? 3.0 : 0.0);
    const PreparedHessian prep = prepare_hessian(p.H, HessianOptions{0.01});
    for (int lazy : {1, 3, 64}) {
      RunOptions run;
      run.lazy_batch = lazy;
      const Trace t = trace_rows<double>(p.W, prep, 1, run);
      for (Index r = 0; r < 3; ++r) {
        Eigen::MatrixXd damped = p.H;
        damped.diagonal().array() += prep.damp_absolute;
        const auto expected = brute_force_order(p.W.row(r).transpose(), damped);
        for (Index s = 0; s < 12; ++s) CHECK(t.order(r, s) == expected[s]);
      }
    }
  }
}

OBC_TEST(uniform_pruning_is_optimal_for_its_mask) {
  auto p = obc_test::make_problem(4, 16, 64, 21);
  const auto res = prune_unstructured<double>(p.W, p.H, 0.5, Spread::Uniform, HessianOptions{0.0});
  for (Index r = 0; r < 4; ++r) {  // damp 0: the damped H is H itself
    std::set<Index> P;
    for (Index c = 0; c < 16; ++c)
      if (res.pruned(r, c)) P.insert(c);
    CHECK(P.size() == 8);
    CHECK_NEAR(res.row_losses[r], masked_loss(p.W.row(r).transpose(), p.H, P), 1e-8);
  }
}

OBC_TEST(global_spread_prunes_exact_count) {
  auto p = obc_test::make_problem(6, 20, 64, 22);
  const auto res = prune_unstructured<float>(p.W.cast<float>(), p.H, 0.37, Spread::Global);
  const Index zeros = res.pruned.cast<Index>().sum();
  CHECK(zeros == count_for_sparsity(0.37, 120));
  for (Index r = 0; r < 6; ++r)
    for (Index c = 0; c < 20; ++c)
      if (res.pruned(r, c)) CHECK(res.weight(r, c) == 0.0f);
}

OBC_TEST(nm_pattern_and_existing_zeros) {
  auto p = obc_test::make_problem(5, 16, 64, 23);
  p.W(0, 1) = 0;
  p.W(0, 2) = 0;
  p.W(0, 3) = 0;  // group 0 of row 0 already has 3 zeros
  const auto res = prune_nm<double>(p.W, p.H, 2, 4);
  for (Index r = 0; r < 5; ++r)
    for (Index g = 0; g < 4; ++g) {
      Index zeros = 0;
      for (Index c = 4 * g; c < 4 * g + 4; ++c) zeros += res.weight(r, c) == 0.0;
      CHECK(zeros == ((r == 0 && g == 0) ? 3 : 2));
    }
  CHECK(res.weight(0, 1) == 0 && res.weight(0, 2) == 0 && res.weight(0, 3) == 0);
  CHECK_THROWS(prune_nm<double>(p.W, p.H, 2, 3), InvalidArgument);
  CHECK_THROWS(prune_nm<double>(p.W, p.H, 4, 4), InvalidArgument);
}

OBC_TEST(blocked_and_structured_patterns) {
  auto p = obc_test::make_problem(4, 24, 96, 24);
  p.W(1, 5) = 0;  // an existing zero inside a block stays zero
  const auto blocked = prune_blocked<double>(p.W, p.H, 0.5, 4, Spread::Uniform);
  for (Index r = 0; r < 4; ++r) {
    Index zero_blocks = 0;
    for (Index b = 0; b < 6; ++b) {
      Index zeros = 0;
      for (Index c = 4 * b; c < 4 * b + 4; ++c) zeros += blocked.weight(r, c) == 0.0;
      zero_blocks += zeros == 4;
    }
    CHECK(zero_blocks == 3);
  }
  CHECK(blocked.weight(1, 5) == 0.0);
  const auto structured = prune_structured<double>(p.W, p.H, 0.5, 3);
  Index zero_groups = 0;
  for (Index g = 0; g < 8; ++g)
    zero_groups += structured.weight.middleCols(3 * g, 3).cwiseAbs().maxCoeff() == 0.0;
  CHECK(zero_groups == 4);
  CHECK(structured.weight(1, 5) == 0.0);
}

OBC_TEST(results_do_not_depend_on_threads) {
  auto p = obc_test::make_problem(33, 40, 128, 25);
  const RowMatrix<float> W = p.W.cast<float>();
  RunOptions one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  const auto a = prune_unstructured<float>(W, p.H, 0.6, Spread::Global, {}, one);
  const auto b = prune_unstructured<float>(W, p.H, 0.6, Spread::Global, {}, two);
  CHECK(a.weight == b.weight);
  const auto c = prune_structured<float>(W, p.H, 0.5, 2, {}, one);
  const auto d = prune_structured<float>(W, p.H, 0.5, 2, {}, two);
  CHECK(c.weight == d.weight);
}

OBC_TEST(interrupt_hook_stops_the_solve) {
  struct StopNow : InterruptHook {
    bool should_stop() override { return true; }
  } stop;
  auto p = obc_test::make_problem(8, 32, 64, 26);
  RunOptions run;
  run.interrupt = &stop;
  CHECK_THROWS(prune_unstructured<double>(p.W, p.H, 0.5, Spread::Global, {}, run), Interrupted);
}

OBC_TEST(bad_arguments_throw) {
  auto p = obc_test::make_problem(3, 12, 48, 27);
  CHECK_THROWS(prune_unstructured<double>(p.W, p.H, 1.5), InvalidArgument);
  CHECK_THROWS(prune_blocked<double>(p.W, p.H, 0.5, 5), InvalidArgument);
  CHECK_THROWS(prune_structured<double>(p.W, p.H, 0.5, 7), InvalidArgument);
  RowMatrixXd nan = p.W;
  nan(0, 0) = std::nan("");
  CHECK_THROWS(prune_unstructured<double>(nan, p.H, 0.5), InvalidArgument);
  CHECK_THROWS(prune_unstructured<double>(p.W, Eigen::MatrixXd(Eigen::MatrixXd::Identity(5, 5)), 0.5),
               InvalidArgument);
}

// Scores that overflow inside the greedy (here: an inverse Hessian so small that w^2 / [H^-1]_qq
// is Inf although w^2 itself is fine) throw Overflow. Before, the Inf step turned the row into
// NaN and the next step's "no candidate" index -1 was used as an input (heap overflow).
template <class S>
void check_greedy_overflow_throws(double hinv_scale, S weight) {
  PreparedHessian prep;
  prep.hinv = Eigen::MatrixXd::Identity(4, 4) * hinv_scale;
  prep.dead.assign(4, 0);
  RowMatrix<S> W = RowMatrix<S>::Constant(2, 4, weight);
  CHECK_THROWS(trace_rows<S>(W, prep, 1), Overflow);
  CHECK_THROWS(trace_rows<S>(W, prep, 2), Overflow);
}

OBC_TEST(greedy_overflow_throws) {
  check_greedy_overflow_throws<float>(1e-30, 1e17f);
  check_greedy_overflow_throws<double>(1e-300, 1e10);
}

OBC_TEST_MAIN

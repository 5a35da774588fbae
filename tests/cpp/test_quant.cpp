// Tests for obc/quant.hpp: grids, codes, joint mode, OBQ against round-to-nearest.
#include "obc/quant.hpp"

#include <cmath>

#include "check.hpp"
#include "obc/errors.hpp"
#include "problems.hpp"

using namespace obc;

OBC_TEST(symmetric_grid_represents_the_extremes) {
  RowMatrixXd W(1, 4);
  W << -1.0, 0.25, 0.5, 1.0;
  QuantOptions opt;
  opt.bits = 4;
  opt.grid = GridSearch::MinMax;
  const auto grid = make_grid<double>(W, opt);
  CHECK(grid.zero(0, 0) == 8);
  CHECK_NEAR(grid.scale(0, 0), 1.0 / 7.0, 1e-15);
  opt.sym = false;
  const auto asym = make_grid<double>(W, opt);
  CHECK_NEAR(asym.scale(0, 0), 2.0 / 15.0, 1e-15);
  CHECK(asym.zero(0, 0) == 8);  // round(7.5) half to even
}

OBC_TEST(obq_codes_grid_and_zeros) {
  auto p = obc_test::make_problem(6, 32, 128, 31);
  p.W(2, 7) = 0;
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {true, false}) {
      QuantOptions opt;
      opt.bits = bits;
      opt.sym = sym;
      opt.group_size = 8;
      const auto q = quantize<double>(p.W, p.H, opt);
      for (Index r = 0; r < 6; ++r)
        for (Index c = 0; c < 32; ++c) {
          const int code = q.codes(r, c);
          CHECK(code >= 0 && code < (1 << bits));
          const double value = q.grid.scale(r, c / 8) * (code - q.grid.zero(r, c / 8));
          CHECK(q.weight(r, c) == value);
        }
      CHECK(q.weight(2, 7) == 0.0);
      const auto rtn = quantize_rtn<double>(p.W, p.H, opt);
      CHECK(q.row_losses.sum() < rtn.row_losses.sum());
    }
}

OBC_TEST(bad_quant_options_throw) {
  auto p = obc_test::make_problem(2, 12, 48, 32);
  QuantOptions opt;
  opt.bits = 9;
  CHECK_THROWS(quantize<double>(p.W, p.H, opt), InvalidArgument);
  opt.bits = 1;
  CHECK_THROWS(quantize<double>(p.W, p.H, opt), InvalidArgument);
  opt.bits = 4;
  opt.group_size = 5;
  CHECK_THROWS(quantize<double>(p.W, p.H, opt), InvalidArgument);
}

OBC_TEST(make_grid_polls_its_interrupt_hook) {
  // The MSE fit polls its hook between batches of 16 rows (parallel_for: at most every 50 ms,
  // and once at the end): a hook that says stop ends the fit with Interrupted (on 1 thread and
  // on 2), one that never does changes nothing.
  struct StopAt : InterruptHook {
    int polls = 0, stop_at;
    explicit StopAt(int n) : stop_at(n) {}
    bool should_stop() override { return ++polls >= stop_at; }
  };
  RowMatrix<float> W(256, 512);
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < W.cols(); ++c)
      W(r, c) = static_cast<float>(std::sin(0.37 * double(r * W.cols() + c)) * 0.02);
  QuantOptions opt;
  opt.bits = 4;
  opt.grid = GridSearch::Mse;
  for (const int threads : {1, 2}) {
    StopAt stop(1);
    CHECK_THROWS(make_grid<float>(W, opt, threads, &stop), Interrupted);
    CHECK(stop.polls >= 1);
    StopAt never(1 << 30);
    const auto polled = make_grid<float>(W, opt, threads, &never);
    const auto plain = make_grid<float>(W, opt, threads);
    CHECK(never.polls > 0);
    CHECK(polled.scale == plain.scale && polled.zero == plain.zero);
  }
}

OBC_TEST_MAIN

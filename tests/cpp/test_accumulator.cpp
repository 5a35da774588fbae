// Tests for obc/accumulator.hpp: brute-force agreement, exact shard merging, determinism, errors.
#include <limits>
#include <random>

#include "check.hpp"
#include "obc/accumulator.hpp"
#include "obc/errors.hpp"
#include "obc/interrupt.hpp"

using namespace obc;

namespace {

// n x cols activation rows with correlated columns and a non-zero mean.
RowMatrixXd make_rows(Index n, Index cols, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  RowMatrixXd x = RowMatrixXd::NullaryExpr(n, cols, [&] { return normal(gen); });
  const RowMatrixXd mix = RowMatrixXd::Identity(cols, cols) +
                          0.3 * RowMatrixXd::NullaryExpr(cols, cols, [&] { return normal(gen); });
  RowMatrixXd mixed = x * mix;
  mixed.array() += 0.5;
  return mixed;
}

double max_abs(const Eigen::MatrixXd& m) { return m.cwiseAbs().maxCoeff(); }

// Asks to stop at its `stop_at`-th poll (counting from 1): a deterministic Ctrl-C.
class StopAtPoll : public InterruptHook {
 public:
  explicit StopAtPoll(int stop_at) : stop_at_(stop_at) {}
  bool should_stop() override { return ++polls_ >= stop_at_; }
  int polls() const { return polls_; }

 private:
  int stop_at_;
  int polls_ = 0;
};

}  // namespace

OBC_TEST(hessian_matches_brute_force) {
  // 70 columns: two column tiles; 5000 rows: three chunks.
  const RowMatrixXd x = make_rows(5000, 70, 1);
  HessianAccumulator acc(70);
  acc.add(x);
  CHECK(acc.count() == 5000);
  const Eigen::MatrixXd expected = (2.0 / 5000) * (x.transpose() * x);
  const Eigen::MatrixXd h = acc.hessian();
  CHECK(max_abs(h - expected) <= 1e-12 * max_abs(expected));
  CHECK(h == h.transpose());  // exactly symmetric
  CHECK(acc.sum() == acc.sum().transpose());
}

OBC_TEST(shards_merged_equal_one_shot) {
  const RowMatrixXd x = make_rows(3001, 37, 2);
  HessianAccumulator one_shot(37);
  one_shot.add(x);
  // Three shards of uneven sizes, accumulated separately (as in three processes), merged.
  HessianAccumulator a(37), b(37), c(37);
  a.add(x.topRows(1000));
  b.add(x.middleRows(1000, 1));
  b.add(x.middleRows(1001, 999));
  c.add(x.bottomRows(1001));
  a.merge(b);
  a.merge(c);
  CHECK(a.count() == one_shot.count());
  CHECK(max_abs(a.sum() - one_shot.sum()) <= 1e-13 * max_abs(one_shot.sum()));
  CHECK(max_abs(a.hessian() - one_shot.hessian()) <= 1e-13 * max_abs(one_shot.hessian()));
  CHECK(a.sum() == a.sum().transpose());
}

OBC_TEST(merge_order_of_equal_sums_is_exact) {
  // Merging is exact addition of sums and counts: a + b == b + a bit for bit.
  const RowMatrixXd x = make_rows(400, 20, 3);
  HessianAccumulator a(20), b(20);
  a.add(x.topRows(150));
  b.add(x.bottomRows(250));
  HessianAccumulator ab = a, ba = b;
  ab.merge(b);
  ba.merge(a);
  CHECK(ab.sum() == ba.sum());
  CHECK(ab.count() == ba.count());
  HessianAccumulator twice = a;
  twice.merge(twice);
  CHECK(twice.sum() == 2.0 * a.sum());
  CHECK(twice.count() == 2 * a.count());
}

OBC_TEST(chunk_boundaries_define_the_summation_order) {
  const Index chunk = HessianAccumulator::chunk_rows;
  const RowMatrixXd x = make_rows(chunk + 300, 9, 4);
  HessianAccumulator whole(9), split(9);
  whole.add(x);
  split.add(x.topRows(chunk));
  split.add(x.bottomRows(300));
  CHECK(whole.sum() == split.sum());
}

OBC_TEST(float32_equals_float64_of_the_same_values) {
  const RowMatrix<float> x32 = make_rows(700, 66, 5).cast<float>();
  const RowMatrixXd x64 = x32.cast<double>();
  HessianAccumulator a(66), b(66);
  a.add(x32);
  b.add(x64);
  CHECK(a.sum() == b.sum());
  HessianAccumulator c(66);
  c.add(x32.data(), x32.rows(), x32.cols());
  CHECK(c.sum() == a.sum());
}

OBC_TEST(results_do_not_depend_on_threads) {
  const RowMatrixXd x = make_rows(2500, 150, 6);
  Eigen::MatrixXd reference;
  for (int threads : {1, 2, 3, 0}) {
    AccumulatorOptions options;
    options.num_threads = threads;
    HessianAccumulator acc(150, options);
    acc.add(x);
    if (reference.size() == 0) {
      reference = acc.sum();
    } else {
      CHECK(acc.sum() == reference);
    }
  }
}

OBC_TEST(empty_batches_and_reset) {
  HessianAccumulator acc(4);
  acc.add(RowMatrixXd(0, 4));
  acc.add(static_cast<const double*>(nullptr), 0, 4);
  CHECK(acc.count() == 0);
  CHECK_THROWS(acc.hessian(), InvalidArgument);
  acc.add(RowMatrixXd::Ones(3, 4));
  CHECK(acc.count() == 3);
  CHECK(acc.hessian()(0, 1) == 2.0);
  acc.reset();
  CHECK(acc.count() == 0);
  CHECK(acc.sum().cwiseAbs().maxCoeff() == 0);
}

OBC_TEST(bad_input_is_rejected_and_leaves_state_unchanged) {
  CHECK_THROWS(HessianAccumulator(0), InvalidArgument);
  CHECK_THROWS(HessianAccumulator(-3), InvalidArgument);
  AccumulatorOptions bad_threads;
  bad_threads.num_threads = -1;
  CHECK_THROWS(HessianAccumulator(3, bad_threads), InvalidArgument);

  HessianAccumulator acc(5);
  const RowMatrixXd good = make_rows(10, 5, 7);
  acc.add(good);
  const Eigen::MatrixXd before = acc.sum();

  CHECK_THROWS(acc.add(RowMatrixXd::Ones(3, 4)), InvalidArgument);  // wrong width
  RowMatrixXd nan = good;
  nan(9, 4) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS(acc.add(nan), InvalidArgument);
  RowMatrix<float> inf = good.cast<float>();
  inf(0, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS(acc.add(inf), InvalidArgument);
  CHECK_THROWS(acc.add(static_cast<const double*>(nullptr), 2, 5), InvalidArgument);
  CHECK_THROWS(acc.merge(HessianAccumulator(6)), InvalidArgument);
  CHECK(acc.sum() == before);
  CHECK(acc.count() == 10);

  bool named = false;
  try {
    acc.add(RowMatrixXd::Ones(3, 4));
  } catch (const InvalidArgument& e) {
    named = std::string(e.what()).find("expected 5 columns") != std::string::npos;
  }
  CHECK(named);
}

OBC_TEST(from_state_restores_and_validates) {
  HessianAccumulator acc(6);
  acc.add(make_rows(50, 6, 8));
  const HessianAccumulator restored = HessianAccumulator::from_state(acc.sum(), acc.count());
  CHECK(restored.sum() == acc.sum());
  CHECK(restored.count() == acc.count());
  CHECK(restored.hessian() == acc.hessian());

  Eigen::MatrixXd asym = acc.sum();
  asym(0, 1) += 1e-9;
  CHECK_THROWS(HessianAccumulator::from_state(asym, 50), InvalidArgument);
  Eigen::MatrixXd negative = acc.sum();
  negative(2, 2) = -1;
  CHECK_THROWS(HessianAccumulator::from_state(negative, 50), InvalidArgument);
  CHECK_THROWS(HessianAccumulator::from_state(acc.sum(), 0), InvalidArgument);
  CHECK_THROWS(HessianAccumulator::from_state(Eigen::MatrixXd::Zero(2, 3), 1), InvalidArgument);
  const HessianAccumulator empty = HessianAccumulator::from_state(Eigen::MatrixXd::Zero(3, 3), 0);
  CHECK(empty.count() == 0);
}

OBC_TEST(interrupted_add_is_rolled_back_exactly) {
  // 150 columns: three column tiles (one partial); 5000 rows: three chunks. Stopping at each
  // poll in turn interrupts before, between and after chunks.
  const RowMatrixXd first = make_rows(300, 150, 7), batch = make_rows(5000, 150, 8);
  for (int stop_at = 1; stop_at <= 4; ++stop_at) {
    HessianAccumulator acc(150, AccumulatorOptions{1});
    acc.add(first);
    const Eigen::MatrixXd before = acc.sum();
    StopAtPoll hook(stop_at);
    CHECK_THROWS(acc.add(batch, &hook), Interrupted);
    CHECK(acc.count() == 300);
    CHECK(acc.sum() == before);
    // Still usable, and the same sum as an accumulator that never saw the interrupted batch.
    acc.add(batch);
    HessianAccumulator fresh(150, AccumulatorOptions{1});
    fresh.add(first);
    fresh.add(batch);
    CHECK(acc.sum() == fresh.sum());
  }
  // A hook that never stops changes nothing.
  struct Never : InterruptHook {
    bool should_stop() override { return false; }
  } never;
  HessianAccumulator a(150), b(150);
  a.add(batch, &never);
  b.add(batch);
  CHECK(a.sum() == b.sum());
}

OBC_TEST_MAIN

// ---- accumulate_gram: the symmetric Gram update of the torch Hessian hooks ----

namespace {

// sum_r x_r x_r^T in long double, row by row: a reference independent of any GEMM blocking.
Eigen::MatrixXd gram_reference(const RowMatrixXd& x, const Eigen::MatrixXd& start) {
  const Index cols = x.cols();
  Eigen::Matrix<long double, Eigen::Dynamic, Eigen::Dynamic> sum = start.cast<long double>();
  for (Index r = 0; r < x.rows(); ++r)
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < cols; ++i)
        sum(i, j) += static_cast<long double>(x(r, i)) * static_cast<long double>(x(r, j));
  return sum.cast<double>();
}

}  // namespace

OBC_TEST(accumulate_gram_matches_reference) {
  // 300 columns: two 256-column tiles (one partial); 4500 rows: three 2048-row chunks.
  const RowMatrixXd x = make_rows(4500, 300, 11);
  const RowMatrixXd y = make_rows(700, 300, 12);
  Eigen::MatrixXd total = Eigen::MatrixXd::Zero(300, 300);
  accumulate_gram(total, x.data(), x.rows(), x.cols(), x.cols());
  accumulate_gram(total, y.data(), y.rows(), y.cols(), y.cols());  // onto an earlier result
  RowMatrixXd both(5200, 300);
  both << x, y;
  const Eigen::MatrixXd expected = gram_reference(both, Eigen::MatrixXd::Zero(300, 300));
  CHECK(max_abs(total - expected) <= 1e-12 * max_abs(expected));
  CHECK(total == total.transpose());  // exactly symmetric
}

OBC_TEST(accumulate_gram_same_bits_for_every_thread_count) {
  const RowMatrixXd x = make_rows(2500, 530, 13);  // three tiles, two chunks
  Eigen::MatrixXd reference = Eigen::MatrixXd::Zero(530, 530);
  accumulate_gram(reference, x.data(), x.rows(), x.cols(), x.cols(), 1);
  for (int threads : {2, 3, 4, 0}) {
    Eigen::MatrixXd total = Eigen::MatrixXd::Zero(530, 530);
    accumulate_gram(total, x.data(), x.rows(), x.cols(), x.cols(), threads);
    CHECK(total == reference);
  }
}

OBC_TEST(accumulate_gram_float32_equals_float64_of_the_same_values) {
  const RowMatrixXd x = make_rows(900, 70, 14);
  const RowMatrix<float> x32 = x.cast<float>();
  const RowMatrixXd widened = x32.cast<double>();
  Eigen::MatrixXd a = Eigen::MatrixXd::Zero(70, 70), b = Eigen::MatrixXd::Zero(70, 70);
  accumulate_gram(a, x32.data(), 900, 70, 70);
  accumulate_gram(b, widened.data(), 900, 70, 70);
  CHECK(a == b);
}

OBC_TEST(accumulate_gram_strided_rows) {
  // Every other row of a wider buffer: rows at a stride of 2 * 90, the first 40 values used.
  const RowMatrixXd buffer = make_rows(400, 90, 15);
  const RowMatrixXd used = Eigen::Map<const RowMatrixXd, 0, Eigen::OuterStride<>>(
      buffer.data(), 200, 40, Eigen::OuterStride<>(180));
  Eigen::MatrixXd a = Eigen::MatrixXd::Zero(40, 40), b = Eigen::MatrixXd::Zero(40, 40);
  accumulate_gram(a, buffer.data(), 200, 40, 180);
  accumulate_gram(b, used.data(), 200, 40, 40);
  CHECK(a == b);
}

OBC_TEST(accumulate_gram_rejects_bad_input_unchanged) {
  const RowMatrixXd x = make_rows(50, 20, 16);
  Eigen::MatrixXd total = Eigen::MatrixXd::Zero(20, 20);
  accumulate_gram(total, x.data(), 50, 20, 20);
  const Eigen::MatrixXd before = total;
  CHECK_THROWS(accumulate_gram(total, x.data(), 50, 19, 19), InvalidArgument);  // width
  RowMatrixXd bad = x;
  bad(49, 3) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS(accumulate_gram(total, bad.data(), 50, 20, 20), InvalidArgument);
  CHECK(total == before);
  Eigen::MatrixXd skew = total;
  skew(3, 17) += 1.0;  // no longer symmetric
  CHECK_THROWS(accumulate_gram(skew, x.data(), 50, 20, 20), InvalidArgument);
  Eigen::MatrixXd rect = Eigen::MatrixXd::Zero(20, 21);
  CHECK_THROWS(accumulate_gram(rect, x.data(), 50, 20, 20), InvalidArgument);
  CHECK_THROWS(accumulate_gram(total, x.data(), 50, 20, 20, -1), InvalidArgument);
  accumulate_gram(total, x.data(), 0, 20, 20);  // no rows: nothing to add
  CHECK(total == before);
}

OBC_TEST(accumulate_gram_interrupted_restores_total) {
  const RowMatrixXd x = make_rows(4200, 600, 17);  // three chunks, three tiles
  Eigen::MatrixXd start = Eigen::MatrixXd::Zero(600, 600);
  accumulate_gram(start, x.data(), 300, 600, 600);
  Eigen::MatrixXd finished = start;
  accumulate_gram(finished, x.data(), x.rows(), 600, 600, 2);
  int interrupted = 0;
  // The calling thread polls before each chunk and between tiles: a stop at the k-th poll hits
  // before, between or inside chunks; late ones may find the update finished.
  for (int stop_at = 1; stop_at <= 8; ++stop_at) {
    Eigen::MatrixXd total = start;
    StopAtPoll hook(stop_at);
    try {
      accumulate_gram(total, x.data(), x.rows(), 600, 600, 2, &hook);
      CHECK(total == finished);
    } catch (const Interrupted&) {
      ++interrupted;
      CHECK(total == start);  // restored exactly
    }
  }
  CHECK(interrupted >= 3);  // at least one stop before each chunk
}

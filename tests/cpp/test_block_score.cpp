// The blocked greedy's block score (kernels/block_score.hpp): one rounding for every block length,
// and the rounding of the exact loss the chosen block records. Built twice by ctest: portable and
// with AVX2+FMA (no contraction), like the kernels.
#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <random>
#include <vector>

#include "check.hpp"
#include "kernels/block_score.hpp"

namespace {

using obc::Index;
namespace k = obc::internal;

// A random SPD len x len block (column-major, like the trace's diagonal blocks of the inverse)
// and weights, both in S.
template <class S>
void random_block(std::mt19937_64& gen, Index len, std::vector<S>& g, std::vector<S>& w) {
  std::normal_distribution<double> normal;
  const Eigen::MatrixXd a = Eigen::MatrixXd::NullaryExpr(len, 3 * len, [&] { return normal(gen); });
  const Eigen::MatrixXd spd = a * a.transpose() / static_cast<double>(3 * len);
  g.resize(static_cast<size_t>(len * len));
  w.resize(static_cast<size_t>(len));
  for (Index i = 0; i < len * len; ++i) g[static_cast<size_t>(i)] = static_cast<S>(spd.data()[i]);
  for (Index i = 0; i < len; ++i) w[static_cast<size_t>(i)] = static_cast<S>(normal(gen));
}

// The score through the run-time-length code path, whatever len is.
template <class S>
double runtime_length_score(const std::vector<S>& g, const std::vector<S>& w, Index len) {
  std::vector<double> factor(static_cast<size_t>(len * len)), rhs(static_cast<size_t>(len));
  double score = 0;
  CHECK(k::block_score_detail::score<0>(g.data(), w.data(), len, factor.data(), rhs.data(), score));
  return score;
}

// The rounding the unrolled lengths used before they shared one function with the others: one
// reciprocal square root per pivot, multiplications elsewhere.
double reciprocal_pivot_score(const std::vector<double>& g, const std::vector<double>& w,
                              Index len) {
  std::vector<double> f(static_cast<size_t>(len * len)), inv(static_cast<size_t>(len)),
      rhs(static_cast<size_t>(len));
  for (Index j = 0; j < len; ++j)
    for (Index i = j; i < len; ++i) f[i + j * len] = g[i + j * len];
  for (Index j = 0; j < len; ++j) {
    double pivot = f[j + j * len];
    for (Index t = 0; t < j; ++t) pivot -= f[j + t * len] * f[j + t * len];
    inv[j] = 1.0 / std::sqrt(pivot);
    for (Index i = j + 1; i < len; ++i) {
      double v = f[i + j * len];
      for (Index t = 0; t < j; ++t) v -= f[i + t * len] * f[j + t * len];
      f[i + j * len] = v * inv[j];
    }
  }
  double score = 0;
  for (Index i = 0; i < len; ++i) {
    double v = w[i];
    for (Index t = 0; t < i; ++t) v -= f[i + t * len] * rhs[t];
    rhs[i] = v * inv[i];
    score += rhs[i] * rhs[i];
  }
  return score;
}

// The exact loss's arithmetic (RowState::factor_block + block_score): Eigen's LLT, then a
// forward substitution, then the squared norm.
double llt_score(const std::vector<double>& g, const std::vector<double>& w, Index len) {
  const Eigen::MatrixXd block = Eigen::Map<const Eigen::MatrixXd>(g.data(), len, len);
  Eigen::LLT<Eigen::MatrixXd> llt(block);
  Eigen::VectorXd y = Eigen::Map<const Eigen::VectorXd>(w.data(), len);
  llt.matrixL().solveInPlace(y);
  return y.squaredNorm();
}

template <class S>
void check_one_rounding_for_every_length() {
  std::mt19937_64 gen(7);
  std::vector<double> scratch;
  std::vector<S> g, w;
  for (Index len : {1, 2, 3, 4, 5, 8, 11}) {
    for (int trial = 0; trial < 500; ++trial) {
      random_block(gen, len, g, w);
      double score = -1;
      CHECK(k::block_score(g.data(), w.data(), len, scratch, score));
      CHECK(score == runtime_length_score(g, w, len));  // bits, not a tolerance
      CHECK(score > 0);
    }
  }
}

}  // namespace

// Blocks of 2, 4 and 8 (unrolled) and all other lengths (run-time loops) round alike, so that a
// step compares candidates of different lengths (entries pruned on entry shorten a block) on one
// scale. Before, the unrolled lengths multiplied by a reciprocal pivot: different bits for ~45%
// of random 4 x 4 blocks.
OBC_TEST(one_rounding_for_every_block_length) {
  check_one_rounding_for_every_length<double>();
  check_one_rounding_for_every_length<float>();
}

// The rounding is the exact loss's: dividing by the pivots agrees bit for bit with Eigen's LLT
// (what the chosen block's recorded loss is computed with) far more often than multiplying by
// reciprocals, and the scores are the exact values to a few ulps.
OBC_TEST(rounding_follows_the_exact_loss) {
  std::mt19937_64 gen(11);
  std::vector<double> g, w, scratch;
  for (Index len : {2, 4, 8}) {
    int same_as_llt = 0, reciprocal_same_as_llt = 0;
    for (int trial = 0; trial < 2000; ++trial) {
      random_block(gen, len, g, w);
      double score = 0;
      CHECK(k::block_score(g.data(), w.data(), len, scratch, score));
      const double reference = llt_score(g, w, len);
      same_as_llt += score == reference ? 1 : 0;
      reciprocal_same_as_llt += reciprocal_pivot_score(g, w, len) == reference ? 1 : 0;
      CHECK_NEAR(score, reference, 1e-12);
    }
    CHECK(same_as_llt > reciprocal_same_as_llt);
  }
}

// A block that is not positive definite is reported, at every length.
OBC_TEST(indefinite_block_is_reported) {
  std::vector<double> scratch;
  for (Index len : {2, 3, 4, 8}) {
    std::vector<double> g(static_cast<size_t>(len * len), 1.0), w(static_cast<size_t>(len), 1.0);
    double score = 0;
    CHECK(!k::block_score(g.data(), w.data(), len, scratch, score));  // rank one
  }
}

OBC_TEST_MAIN

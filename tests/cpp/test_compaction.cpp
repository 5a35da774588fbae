// Active-set compaction: compress_forward (kernels/compress_forward.hpp) against a plain filter,
// out of place and in place; LazyInverse::flush's compaction of the lower triangle and of U
// against G0[kept, kept] and U[kept, :] gathered directly; and LazyInverse::load's gather of the
// active inputs. Built twice by ctest, portable and with
// AVX2+FMA, so that the vector path is checked at every length and alignment.
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "check.hpp"
#include "internal/lazy_inverse.hpp"

namespace {

using obc::Index;
namespace k = obc::internal;

std::vector<char> random_keep(std::mt19937& gen, Index n, int pattern) {
  std::vector<char> keep(static_cast<size_t>(n));
  std::bernoulli_distribution coin(pattern == 0 ? 0.5 : 0.9);
  for (Index i = 0; i < n; ++i) {
    switch (pattern) {
      case 2: keep[i] = 1; break;             // everything kept
      case 3: keep[i] = 0; break;             // nothing kept
      case 4: keep[i] = i % 2; break;         // alternating
      default: keep[i] = coin(gen) ? 1 : 0;   // scattered, dense or sparse removals
    }
  }
  return keep;
}

template <class S>
void check_compress_forward() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<double> value(-1, 1);
  for (Index n = 0; n <= 70; ++n)
    for (int pattern = 0; pattern < 5; ++pattern)
      for (Index offset = 0; offset < 3; ++offset) {  // unaligned starts
        const std::vector<char> keep = random_keep(gen, n + offset, pattern);
        std::vector<std::uint8_t> keep8(keep.size());
        k::keep_bits8(keep.data(), static_cast<Index>(keep.size()), keep8.data());
        for (size_t i = 0; i < keep.size(); ++i) {  // bit b is keep[i + b]
          unsigned expect = 0;
          for (size_t b = 0; b < 8 && i + b < keep.size(); ++b) expect |= (keep[i + b] ? 1u : 0u) << b;
          CHECK(keep8[i] == expect);
        }
        std::vector<S> src(static_cast<size_t>(n + offset));
        for (S& x : src) x = static_cast<S>(value(gen));
        std::vector<S> expect;
        for (Index t = 0; t < n; ++t)
          if (keep[offset + t]) expect.push_back(src[offset + t]);
        // Out of place.
        std::vector<S> dst(static_cast<size_t>(n) + 1, S(-7));
        const Index got = k::compress_forward(dst.data(), src.data() + offset, n, keep8.data() + offset);
        CHECK(got == static_cast<Index>(expect.size()));
        for (Index t = 0; t < got && t < static_cast<Index>(expect.size()); ++t) CHECK(dst[t] == expect[t]);
        CHECK(dst[n] == S(-7));  // nothing written past dst[len)
        // In place, with the destination 0 .. offset elements before the source.
        for (Index lag = 0; lag <= offset; ++lag) {
          std::vector<S> buf = src;
          const Index in_place = k::compress_forward(buf.data() + offset - lag, buf.data() + offset, n,
                                                     keep8.data() + offset);
          CHECK(in_place == got);
          for (Index t = 0; t < in_place && t < static_cast<Index>(expect.size()); ++t)
            CHECK(buf[offset - lag + t] == expect[t]);
          for (Index t = 0; t < offset - lag; ++t) CHECK(buf[t] == src[t]);  // before dst: untouched
        }
      }
}

// flush(keep) with pending downdates: G0 and U are compacted, then G0 -= U U^T. Without pending
// downdates the kept lower triangle must come out bit for bit; with them, compare to the float64
// product.
template <class S>
void check_flush_compaction() {
  std::mt19937 gen(11);
  std::normal_distribution<double> normal;
  for (Index n : {1, 2, 7, 8, 9, 31, 64, 100, 131}) {
    for (int pattern = 0; pattern < 5; ++pattern) {
      for (Index pending : {0, 1, 5}) {
        Eigen::MatrixXd a(n, 2 * n + 1);
        for (Index i = 0; i < a.size(); ++i) a.data()[i] = normal(gen);
        const Eigen::MatrixXd g0 = a * a.transpose() / static_cast<double>(a.cols()) +
                                   Eigen::MatrixXd::Identity(n, n);
        std::vector<Index> active(static_cast<size_t>(n));
        for (Index i = 0; i < n; ++i) active[i] = i;
        k::LazyInverse<S> inv;
        inv.load(g0.data(), n, active, 8);
        Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic> u(n, pending);
        for (Index t = 0; t < pending; ++t) {
          Eigen::Matrix<S, Eigen::Dynamic, 1> col(n);
          for (Index i = 0; i < n; ++i) col[i] = static_cast<S>(0.1 * normal(gen));
          col[t % n] = S(1);  // downdate() scales by 1 / sqrt(col[q]) with q = t % n
          inv.downdate(t % n, col);
          u.col(t) = col.template cast<double>();
        }
        const std::vector<char> keep = random_keep(gen, n, pattern);
        std::vector<Index> kept;
        for (Index i = 0; i < n; ++i)
          if (keep[i]) kept.push_back(i);
        inv.flush(keep);
        const Index m = static_cast<Index>(kept.size());
        CHECK(inv.size() == m);
        Eigen::Matrix<S, Eigen::Dynamic, 1> col(m);
        for (Index j = 0; j < m; ++j) {
          inv.column(j, col);
          for (Index i = 0; i < m; ++i) {
            const Index oi = kept[i], oj = kept[j];
            const S stored = static_cast<S>(g0(std::max(oi, oj), std::min(oi, oj)));
            if (pending == 0) {
              CHECK(col[i] == stored);
            } else {
              // Absolute tolerance on the scale of the terms: entries near zero cancel.
              const double expect = static_cast<double>(stored) - u.row(oi).dot(u.row(oj));
              const double scale = std::abs(static_cast<double>(stored)) +
                                   u.row(oi).norm() * u.row(oj).norm();
              CHECK(std::abs(static_cast<double>(col[i]) - expect) <=
                    (sizeof(S) == 4 ? 1e-6 : 1e-14) * scale);
            }
          }
          CHECK(inv.diag()[j] == col[j]);
        }
      }
    }
  }
}

// load() / load_packed() gather hinv(active, active) run by run: every entry must be the
// source's, whatever gaps (dead inputs, zero weights) the active set has.
template <class S>
void check_load_gathers_active() {
  std::mt19937 gen(5);
  std::normal_distribution<double> normal;
  for (Index cols : {1, 5, 33, 70}) {
    Eigen::MatrixXd a(cols, cols + 3);
    for (Index i = 0; i < a.size(); ++i) a.data()[i] = normal(gen);
    const Eigen::MatrixXd product = a * a.transpose();
    const Eigen::MatrixXd hinv = 0.5 * (product + product.transpose());  // exactly symmetric
    std::vector<float> packed;
    for (Index j = 0; j < cols; ++j)
      for (Index i = j; i < cols; ++i) packed.push_back(static_cast<float>(hinv(i, j)));
    for (int pattern = 0; pattern < 5; ++pattern) {
      const std::vector<char> keep = random_keep(gen, cols, pattern);
      std::vector<Index> active;
      for (Index i = 0; i < cols; ++i)
        if (keep[i]) active.push_back(i);
      const Index n = static_cast<Index>(active.size());
      for (int source = 0; source < 2; ++source) {
        if (source == 1 && !std::is_same_v<S, float>) continue;  // packed float32: float rows
        k::LazyInverse<S> inv;
        if (source == 0) inv.load(hinv.data(), cols, active, 4);
        if (source == 1) inv.load_packed(packed.data(), cols, active, 4);
        CHECK(inv.size() == n);
        Eigen::Matrix<S, Eigen::Dynamic, 1> col(n);
        for (Index j = 0; j < n; ++j) {
          inv.column(j, col);
          for (Index i = 0; i < n; ++i) {
            const double value = hinv(active[i], active[j]);
            CHECK(col[i] == (source == 0 ? static_cast<S>(value)
                                         : static_cast<S>(static_cast<float>(value))));
          }
          CHECK(inv.diag()[j] == col[j]);
        }
      }
    }
  }
}

}  // namespace

OBC_TEST(compress_forward_matches_filter_float) {
  if (obc_test::cpu_runs_this_build()) check_compress_forward<float>();
}
OBC_TEST(compress_forward_matches_filter_double) {
  if (obc_test::cpu_runs_this_build()) check_compress_forward<double>();
}
OBC_TEST(flush_compacts_lower_triangle_and_downdates_float) {
  if (obc_test::cpu_runs_this_build()) check_flush_compaction<float>();
}
OBC_TEST(flush_compacts_lower_triangle_and_downdates_double) {
  if (obc_test::cpu_runs_this_build()) check_flush_compaction<double>();
}

OBC_TEST(load_gathers_active_inputs_float) {
  if (obc_test::cpu_runs_this_build()) check_load_gathers_active<float>();
}
OBC_TEST(load_gathers_active_inputs_double) {
  if (obc_test::cpu_runs_this_build()) check_load_gathers_active<double>();
}

OBC_TEST_MAIN

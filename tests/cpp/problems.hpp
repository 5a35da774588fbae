// Random layer problems for the C++ tests: W (rows x cols) and H = 2/n X X^T.
#pragma once

#include <Eigen/Core>
#include <random>

#include "obc/types.hpp"

namespace obc_test {

struct Problem {
  obc::RowMatrixXd W;
  Eigen::MatrixXd X;  // cols x n
  Eigen::MatrixXd H;
};

/// `log10_spread` > 0 scales input i by 10^(-spread * i / cols): an ill-conditioned H.
inline Problem make_problem(obc::Index rows, obc::Index cols, obc::Index n, unsigned seed,
                            double log10_spread = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  Problem p;
  p.W = obc::RowMatrixXd::NullaryExpr(rows, cols, [&] { return normal(gen); });
  p.X = Eigen::MatrixXd::NullaryExpr(cols, n, [&] { return normal(gen); });
  for (obc::Index i = 0; i < cols; ++i)
    p.X.row(i) *= std::pow(10.0, -log10_spread * static_cast<double>(i) / cols);
  p.H = (2.0 / static_cast<double>(n)) * p.X * p.X.transpose();
  return p;
}

}  // namespace obc_test

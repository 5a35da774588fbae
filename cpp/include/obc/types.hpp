// Matrix aliases shared by the public headers.
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace obc {

using Index = Eigen::Index;

/// Row-major dense matrix: a weight matrix is rows x cols (outputs x inputs), each row
/// contiguous, which is the layout of numpy / PyTorch weights.
template <class Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using RowMatrixXd = RowMatrix<double>;
using IndexMatrix = RowMatrix<std::int32_t>;  ///< e.g. elimination orders, rows x steps
using MaskMatrix = RowMatrix<std::uint8_t>;   ///< 1 = pruned (exactly zero), 0 = kept

}  // namespace obc

// HessianRef: a read-only view of a layer Hessian in float32 or float64, row- or column-major.
//
// Hessians are the largest inputs (cols^2 values; 21 MB in float32 at cols = 2304), so the
// solvers read them where they lie instead of converting them to one fixed type and layout.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <utility>

#include "obc/errors.hpp"
#include "obc/types.hpp"

namespace obc {

class HessianRef {
 public:
  /// Views an Eigen matrix, Map, Ref or block of float or double with a unit stride in one
  /// direction (any plain matrix qualifies). Expressions must be evaluated first. The viewed
  /// data must outlive the HessianRef (a function argument is fine).
  template <class Derived>
  HessianRef(const Eigen::DenseBase<Derived>& h) {  // NOLINT: implicit on purpose
    using S = typename Derived::Scalar;
    static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                  "H: expected a float or double matrix");
    constexpr bool direct = bool(Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit);
    static_assert(direct, "H: pass a matrix, Map or Ref (evaluate expressions first)");
    if constexpr (direct) {
      const Derived& m = h.derived();
      init(m.data(), std::is_same_v<S, float>, m.rows(), m.cols(), m.rowStride(), m.colStride());
    }
  }
  /// Views raw memory: element (i, j) at data[i * row_stride + j * col_stride]; one of the two
  /// strides must be 1.
  HessianRef(const double* data, Index rows, Index cols, Index row_stride, Index col_stride) {
    init(data, false, rows, cols, row_stride, col_stride);
  }
  HessianRef(const float* data, Index rows, Index cols, Index row_stride, Index col_stride) {
    init(data, true, rows, cols, row_stride, col_stride);
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  bool is_float32() const { return is_f32_; }
  const void* data() const { return data_; }
  Index row_stride() const { return row_stride_; }
  Index col_stride() const { return col_stride_; }

  /// Calls f(map) with an Eigen::Map of the data in its own scalar type and storage order
  /// (unit inner stride), and returns what f returns. f must accept all four map types
  /// (a generic lambda does).
  template <class F>
  decltype(auto) visit(F&& f) const {
    if (is_f32_) return visit_as<float>(std::forward<F>(f));
    return visit_as<double>(std::forward<F>(f));
  }

 private:
  template <class S, int Order>
  using MapOf = Eigen::Map<const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Order>, 0,
                           Eigen::OuterStride<>>;

  template <class S, class F>
  decltype(auto) visit_as(F&& f) const {
    const S* p = static_cast<const S*>(data_);
    if (col_stride_ == 1)
      return f(MapOf<S, Eigen::RowMajor>(p, rows_, cols_, Eigen::OuterStride<>(row_stride_)));
    return f(MapOf<S, Eigen::ColMajor>(p, rows_, cols_, Eigen::OuterStride<>(col_stride_)));
  }

  void init(const void* data, bool is_f32, Index rows, Index cols, Index row_stride,
            Index col_stride) {
    OBC_CHECK(rows >= 0 && cols >= 0, "H: expected a non-negative shape, got ", rows, "x", cols);
    OBC_CHECK(rows == 0 || cols == 0 || data != nullptr, "H: null data for a ", rows, "x", cols,
              " matrix");
    if (rows <= 1 || cols <= 1) {
      // Never square beyond 1 x 1, so such a view is only ever checked for its shape.
      row_stride = std::max<Index>(cols, 1);
      col_stride = 1;
    }
    OBC_CHECK(row_stride == 1 || col_stride == 1, "H: expected unit stride along rows or ",
              "columns, got strides (", row_stride, ", ", col_stride, ")");
    data_ = data;
    is_f32_ = is_f32;
    rows_ = rows;
    cols_ = cols;
    row_stride_ = row_stride;
    col_stride_ = col_stride;
  }

  const void* data_ = nullptr;
  bool is_f32_ = false;
  Index rows_ = 0, cols_ = 0, row_stride_ = 0, col_stride_ = 1;
};

}  // namespace obc

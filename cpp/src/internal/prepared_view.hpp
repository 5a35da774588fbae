// Plain views of a PreparedHessian and a HessianRef for the row kernels (generic translation
// units only: the kernels themselves are compiled against a renamed Eigen).
#pragma once

#include "internal/row_kernels.hpp"
#include "obc/hessian.hpp"

namespace obc::internal {

inline HessianView view_of(const PreparedHessian& prep) {
  return HessianView{prep.hinv.size() > 0 ? prep.hinv.data() : nullptr,
                     prep.hinv_lower_f32.empty() ? nullptr : prep.hinv_lower_f32.data(), prep.dead.data(),
                     prep.cols()};
}

inline HessianInput input_of(const HessianRef& H) {
  return HessianInput{H.data(), H.is_float32(), H.rows(), H.row_stride(), H.col_stride()};
}

}  // namespace obc::internal

// Plain view of a PreparedHessian for the row kernels (generic translation units only).
#pragma once

#include "internal/row_kernels.hpp"
#include "obc/hessian.hpp"

namespace obc::internal {

inline HessianView view_of(const PreparedHessian& prep) {
  return HessianView{prep.hinv.data(), prep.dead.data(), prep.cols()};
}

}  // namespace obc::internal

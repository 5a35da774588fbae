// GridPoint: one quantization grid (scale, zero point, bits) and rounding onto it.
#pragma once

#include <algorithm>
#include <cmath>

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

template <class Scalar>
struct GridPoint {
  Scalar scale;
  int zero;
  int maxq;
  /// Integer code of w: clamp(round_half_even(w / scale) + zero, 0, maxq).
  int code(Scalar w) const {
    const Scalar c = std::nearbyint(w / scale) + static_cast<Scalar>(zero);
    return static_cast<int>(std::clamp(c, Scalar(0), static_cast<Scalar>(maxq)));
  }
  Scalar value(int c) const { return scale * static_cast<Scalar>(c - zero); }
  Scalar quantize(Scalar w) const { return value(code(w)); }
};

}  // namespace obc::OBC_KERNEL_NS

// Exception types of the obc_native core and the OBC_CHECK macro for user errors.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace obc {

/// A caller passed an invalid argument (wrong shape, NaN/Inf, value out of range).
/// Derives from std::invalid_argument; reaches Python as ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// The (damped) Hessian is not positive definite, or the inverse Hessian lost
/// positive definiteness during elimination. The message names the damping tried.
/// Reaches Python as obc_native.HessianError (a ValueError).
class NotPositiveDefinite : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The layer's values are too large (or H too small) for the arithmetic's precision: an OBS score,
/// a weight update or a loss would overflow to Inf or NaN. Raised before the solve when the
/// scale alone rules it out, else as soon as a non-finite value appears, so no result ever holds
/// NaN or Inf. Derives from InvalidArgument (Python: ValueError; C API:
/// OBC_ERR_INVALID_ARGUMENT). Rescale W or H (losses are quadratic in W and linear in H).
class Overflow : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// A float32 greedy elimination lost positive definiteness of its inverse Hessian (rounding, on
/// an ill-conditioned H). The public solvers catch it and redo the layer in float64 (reported by
/// the result's `float64_fallback`); it reaches callers only from the kernels themselves.
class PrecisionLost : public NotPositiveDefinite {
 public:
  using NotPositiveDefinite::NotPositiveDefinite;
};

/// A long computation was stopped by an InterruptHook. Reaches Python as KeyboardInterrupt.
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("obc_native: computation interrupted") {}
};

/// A file is not a valid obc_native file (wrong magic, unsupported format version, truncated or
/// oversized, checksum mismatch, inconsistent contents). Derives from InvalidArgument, so it
/// reaches Python as ValueError.
class FormatError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

/// The operating system refused a file operation (open, read, write, rename). The message names
/// the path and the system's reason. Reaches Python as OSError.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace obc

/// Throws obc::InvalidArgument with the streamed message parts when `cond` is false.
#define OBC_CHECK(cond, ...)                                                \
  do {                                                                      \
    if (!(cond)) throw ::obc::InvalidArgument(::obc::detail::concat(__VA_ARGS__)); \
  } while (0)

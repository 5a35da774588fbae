// build_info(): what this build of the core contains.
#include "obc/build_info.hpp"

#include "internal/grid_screen.hpp"
#include "internal/row_kernels.hpp"

#include <Eigen/Core>
#include <sstream>

#ifdef OBC_HAVE_OPENMP
#include <omp.h>
#endif

namespace obc {

BuildInfo build_info() {
  BuildInfo info;
  info.version = OBC_VERSION;
#ifdef OBC_HAVE_OPENMP
  info.openmp = true;
  info.max_threads = omp_get_max_threads();
#endif
  std::ostringstream eigen;
  eigen << EIGEN_WORLD_VERSION << '.' << EIGEN_MAJOR_VERSION << '.' << EIGEN_MINOR_VERSION;
  info.eigen_version = eigen.str();
  info.simd = Eigen::SimdInstructionSetsInUse();
  info.kernel_isa = internal::kernels().isa;
  info.avx512_kernels = internal::use_avx512_kernels();
  info.grid_screen_isa = internal::grid_screen_isa();
  std::ostringstream compiler;
#if defined(__clang__)
  compiler << "clang " << __clang_major__ << '.' << __clang_minor__;
#elif defined(__GNUC__)
  compiler << "gcc " << __GNUC__ << '.' << __GNUC_MINOR__;
#elif defined(_MSC_VER)
  compiler << "msvc " << _MSC_VER;
#else
  compiler << "unknown";
#endif
  info.compiler = compiler.str();
  return info;
}

}  // namespace obc

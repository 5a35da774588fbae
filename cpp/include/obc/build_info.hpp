// What was compiled into this build of the core.
#pragma once

#include <string>

namespace obc {

struct BuildInfo {
  std::string version;        ///< project version, e.g. "0.1.0"
  bool openmp = false;        ///< compiled with OpenMP
  int max_threads = 1;        ///< omp_get_max_threads() now (1 without OpenMP)
  std::string eigen_version;  ///< e.g. "3.4.1"
  bool cuda = false;          ///< CUDA kernels compiled in
  std::string simd;           ///< Eigen's SIMD instruction sets of the portable build, e.g. "SSE, SSE2"
  std::string kernel_isa;     ///< row kernels picked at run time: "avx2+fma" or "generic" (OBC_SIMD=generic forces it)
  bool avx512_kernels = false; ///< kernels with an AVX-512 copy use it (CPU has AVX-512, not OBC_SIMD=generic/avx2)
  std::string grid_screen_isa; ///< MSE grid fit's screening: "avx512", "avx2+fma" or "generic"
  std::string compiler;       ///< compiler id and version
};

BuildInfo build_info();

}  // namespace obc

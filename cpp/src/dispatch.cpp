// Run-time choice of the row kernels' SIMD level: portable wheels, fast kernels where supported.
#include <cstdlib>
#include <cstring>

#include "internal/row_kernels.hpp"

namespace obc::internal {

namespace {

bool cpu_has_avx2_fma() {
#if defined(OBC_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable& choose() {
  const char* forced = std::getenv("OBC_SIMD");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return kernel_table_generic();
#ifdef OBC_HAVE_AVX2_KERNELS
  if (cpu_has_avx2_fma()) return kernel_table_avx2();
#endif
  return kernel_table_generic();
}

bool cpu_has_avx512() {
#if defined(OBC_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

bool use_avx512_kernels() {
  static const bool use = [] {
    if (std::strcmp(kernels().isa, "generic") == 0) return false;
    const char* forced = std::getenv("OBC_SIMD");
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return false;
    return cpu_has_avx512();
  }();
  return use;
}

}  // namespace obc::internal

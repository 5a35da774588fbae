// Minimal in-repo test harness: CHECK macros that count failures; main returns non-zero on any.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace obc_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, fn); }
};

inline int run_all() {
  for (auto& [name, fn] : registry()) {
    const int before = failures();
    try {
      fn();
    } catch (const std::exception& e) {
      std::printf("  unexpected exception: %s\n", e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "[ ok ]" : "[FAIL]", name.c_str());
  }
  return failures() == 0 ? 0 : 1;
}

/// False when this test was built with AVX2+FMA (the vector copy of a kernel header) and the CPU
/// lacks them: such a test then checks nothing instead of crashing.
inline bool cpu_runs_this_build() {
#if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

}  // namespace obc_test

#define OBC_TEST(name)                                                   \
  static void name();                                                    \
  static obc_test::Register name##_registered(#name, name);              \
  static void name()

#define CHECK(cond)                                                                \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);      \
      ++obc_test::failures();                                                      \
    }                                                                              \
  } while (0)

#define CHECK_NEAR(a, b, rel)                                                              \
  do {                                                                                     \
    const double va_ = (a), vb_ = (b);                                                     \
    if (!(std::abs(va_ - vb_) <= (rel) * std::max(1e-300, std::max(std::abs(va_), std::abs(vb_))))) { \
      std::printf("  %s:%d: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, va_, #b, vb_); \
      ++obc_test::failures();                                                              \
    }                                                                                      \
  } while (0)

#define CHECK_THROWS(expr, type)                                                       \
  do {                                                                                 \
    bool thrown_ = false;                                                              \
    try {                                                                              \
      (void)(expr);                                                                    \
    } catch (const type&) {                                                            \
      thrown_ = true;                                                                  \
    }                                                                                  \
    if (!thrown_) {                                                                    \
      std::printf("  %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #type); \
      ++obc_test::failures();                                                          \
    }                                                                                  \
  } while (0)

#define OBC_TEST_MAIN \
  int main() { return obc_test::run_all(); }

// Stream compaction of one array segment in place: the kept elements move to the front, in order.
// Included (through internal/lazy_inverse.hpp) by kernels/row_kernels.cpp, so it is compiled once
// per SIMD level. Compaction of the active set after every lazy flush moves the whole lower
// triangle of the row's inverse; the removed inputs are scattered, so the kept ones come in short
// runs (about n / B elements), and copying run by run cost ~14 cycles per (column, run) pair:
// ~24% of a 576-input trace. The AVX2 copy left-packs 8 floats (4 doubles) per step with one
// permutation from a table indexed by their 8 (4) keep bits, whatever the runs look like.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "obc/types.hpp"

#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

/// keep8[i] for i in [0, n): bit b is keep[i + b] != 0 (0 past the end). One byte per index, so
/// that a compaction starting at any offset reads its keep bits with one load per 8 elements.
/// keep8 must hold n entries.
inline void keep_bits8(const char* keep, Index n, std::uint8_t* keep8) {
  unsigned bits = 0;
  for (Index i = n - 1; i >= 0; --i) {
    bits = ((bits << 1) | (keep[i] != 0 ? 1u : 0u)) & 0xFFu;
    keep8[i] = static_cast<std::uint8_t>(bits);
  }
}

namespace compress_detail {

// Lane permutation that moves the lanes whose bits are set in `mask` to the front, in order,
// as 32-bit lane indices (a double is two lanes).
struct PackTable {
  alignas(32) std::int32_t lanes[256][8];
  std::uint8_t count[256];
};

constexpr PackTable make_pack_table(int lanes_per_element) {
  PackTable t{};
  const int elements = 8 / lanes_per_element;
  for (int mask = 0; mask < 256; ++mask) {
    int out = 0;
    for (int e = 0; e < elements; ++e)
      if (mask & (1 << e)) {
        for (int l = 0; l < lanes_per_element; ++l)
          t.lanes[mask][out * lanes_per_element + l] = e * lanes_per_element + l;
        ++out;
      }
    t.count[mask] = static_cast<std::uint8_t>(out);
  }
  return t;
}

inline constexpr PackTable kPackFloat = make_pack_table(1);
inline constexpr PackTable kPackDouble = make_pack_table(2);

}  // namespace compress_detail

/// Copies the src[t] (t < len) whose keep bit (bit 0 of keep8[t], see keep_bits8) is set to
/// dst[0], dst[1], ... in order and returns how many. In place is allowed when dst <= src: each
/// group of 8 (4) is loaded before anything at or after its own start is stored, and a store of
/// a whole vector at the output position (<= the group's source position) ends before the next
/// group's data. The lanes stored past the kept count are garbage at positions that a later group
/// (or the caller) overwrites: the caller owns dst[0, len). Pure data movement: the result is the
/// same bits at every SIMD level.
template <class S>
inline Index compress_forward(S* dst, const S* src, Index len, const std::uint8_t* keep8) {
  Index t = 0, out = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<S, float>) {
    const auto& table = compress_detail::kPackFloat;
    for (; t + 8 <= len; t += 8) {
      const unsigned mask = keep8[t];
      const __m256i perm =
          _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]));
      _mm256_storeu_ps(dst + out, _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + t), perm));
      out += table.count[mask];
    }
  } else if constexpr (std::is_same_v<S, double>) {
    const auto& table = compress_detail::kPackDouble;
    for (; t + 4 <= len; t += 4) {
      const unsigned mask = keep8[t] & 0xFu;
      const __m256i perm =
          _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[mask]));
      const __m256 v = _mm256_castpd_ps(_mm256_loadu_pd(src + t));
      _mm256_storeu_pd(dst + out, _mm256_castps_pd(_mm256_permutevar8x32_ps(v, perm)));
      out += table.count[mask];
    }
  }
#endif
  // Branchless: every element is written at the output position, which advances only when it is
  // kept (out <= t, so in place never overwrites an unread element).
  for (; t < len; ++t) {
    dst[out] = src[t];
    out += keep8[t] & 1u;
  }
  return out;
}

}  // namespace obc::OBC_KERNEL_NS

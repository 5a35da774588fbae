// Transparent huge pages for large, freshly allocated buffers (Linux; a no-op elsewhere).
//
// A fresh cols x cols float64 buffer (42 MB at 2304 inputs) is faulted in 4 KiB page by page on
// first write, ~10k faults: 10-20 ms next to a ~150 ms inverse, serialized in the kernel. Where
// THP is in "madvise" mode (a common default), asking for huge pages makes that ~20 faults. The
// same holds for structured pruning's shared lazy inverse (another 42 MB per call): together
// 0.29 -> 0.25 s at 128x2304 on two threads. The per-row kernels, which reuse one buffer per
// thread, measured no difference (their strided read of the pivot's row did not get faster).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Compiled into each SIMD copy of the kernels under its own namespace, like the kernel headers,
// so that no inline function built with AVX2 can be picked for the portable copy.
#ifndef OBC_KERNEL_NS
#define OBC_KERNEL_NS internal
#endif

namespace obc::OBC_KERNEL_NS {

/// Advises the kernel to back the 2 MiB-aligned interior of [data, data + bytes) with huge
/// pages. Call before the first write. Advice only: failure (no THP, old kernel) changes nothing.
inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;  // small buffers: not worth a system call
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

/// An uninitialized, aligned array for large scratch matrices: 64-byte aligned, and 2 MiB aligned
/// with huge-page advice from 8 MiB up. Move-only.
template <class T>
class PageBuffer {
 public:
  PageBuffer() = default;
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;
  PageBuffer(PageBuffer&& other) noexcept { swap(other); }
  PageBuffer& operator=(PageBuffer&& other) noexcept {
    if (this != &other) {
      release();
      swap(other);
    }
    return *this;
  }
  ~PageBuffer() { release(); }

  /// Makes room for at least `count` elements. The contents are not kept when it grows.
  void ensure(std::size_t count) {
    if (count <= size_) return;
    release();
    const std::size_t bytes = count * sizeof(T);
    align_ = bytes >= (std::size_t(8) << 20) ? (std::size_t(1) << 21) : 64;
    const std::size_t rounded = (bytes + align_ - 1) / align_ * align_;
    data_ = static_cast<T*>(::operator new(rounded, std::align_val_t(align_)));
    advise_huge_pages(data_, rounded);
    size_ = count;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  void release() {
    if (data_ != nullptr) ::operator delete(data_, std::align_val_t(align_));
    data_ = nullptr;
    size_ = 0;
  }
  void swap(PageBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(align_, other.align_);
  }
  T* data_ = nullptr;
  std::size_t size_ = 0, align_ = 64;
};

}  // namespace obc::OBC_KERNEL_NS

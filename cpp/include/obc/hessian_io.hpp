// Hessian files: the state of a HessianAccumulator (sum of x x^T and sample count) on disk.
//
// Format version 1 (docs/hessian_format.md), all integers little-endian, total size
// 40 + 8 * cols^2 bytes:
//
//   offset  size          field
//   0       8             magic "OBCHESS\0" (4F 42 43 48 45 53 53 00)
//   8       4             format version, u32 = 1
//   12      4             reserved, u32 = 0 (readers reject other values)
//   16      8             cols, u64 >= 1
//   24      8             sample count n, u64
//   32      8 * cols^2    S = sum x x^T, float64 IEEE-754 little-endian, row-major (S is symmetric)
//   32 + 8 * cols^2   8   checksum, u64: FNV-1a 64 over every preceding byte (header + payload)
//
// Storing S and n rather than H = 2/n S keeps merging exact: S and n of shards add.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>

#include "obc/accumulator.hpp"
#include "obc/interrupt.hpp"
#include "obc/types.hpp"

namespace obc {

/// The format version this library writes; readers accept exactly this version.
constexpr std::uint32_t kHessianFormatVersion = 1;
/// Bytes before the payload.
constexpr std::uint64_t kHessianHeaderBytes = 32;

/// The header of a Hessian file.
struct HessianFileInfo {
  std::uint32_t version = kHessianFormatVersion;
  Index cols = 0;
  std::uint64_t count = 0;
  /// Total file size implied by cols: header + 8 * cols^2 + checksum.
  std::uint64_t file_bytes = 0;
};

/// FNV-1a 64-bit hash of `size` bytes, continuing from `hash` (start: the FNV offset basis).
std::uint64_t fnv1a64(const void* data, std::size_t size,
                      std::uint64_t hash = 0xcbf29ce484222325ULL);

/// Writes the accumulator state to `out` in the format above. Throws IoError when the stream
/// fails. `interrupt` (may be null) is asked between 1 MiB chunks (after the first, then at most
/// every 50 ms); a stop throws Interrupted (the stream then holds a partial file).
void write_hessian(std::ostream& out, const HessianAccumulator& accumulator,
                   InterruptHook* interrupt = nullptr);

/// Reads one Hessian file from `in`, which must end right after the checksum. Throws FormatError
/// for a wrong magic, an unsupported version, a non-zero reserved field, a truncated or oversized
/// stream, a checksum mismatch, or a payload that is not a valid sum of x x^T.
/// `interrupt`: as for write_hessian (a stop throws Interrupted, nothing is returned).
HessianAccumulator read_hessian(std::istream& in, const AccumulatorOptions& options = {},
                                InterruptHook* interrupt = nullptr);

/// Writes `path` (replacing it) through a temporary file in the same directory renamed into
/// place, so readers never see a partial file. Replaces only a missing path, an empty regular
/// file or a Hessian file; a directory, FIFO, device or other file is refused (IoError) and
/// left untouched. Throws IoError naming the path and the reason. `interrupt`: as for
/// write_hessian; a stop removes the temporary file and leaves `path` as it was.
void save_hessian(const std::string& path, const HessianAccumulator& accumulator,
                  InterruptHook* interrupt = nullptr);

/// Reads `path`, a regular file (anything else, e.g. a FIFO, is refused before it is opened).
/// Throws IoError when it cannot be opened or read, FormatError as read_hessian.
/// `interrupt`: as for read_hessian.
HessianAccumulator load_hessian(const std::string& path, const AccumulatorOptions& options = {},
                                InterruptHook* interrupt = nullptr);

/// Reads and checks only the header of `path` (magic, version, reserved field, file size);
/// the checksum is not verified. Throws as load_hessian.
HessianFileInfo read_hessian_info(const std::string& path);

}  // namespace obc

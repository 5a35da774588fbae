// Hessian files: byte-exact little-endian writer and a reader that checks every field.
#include "obc/hessian_io.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <istream>
#include <optional>
#include <ostream>
#include <thread>
#include <vector>

#include "obc/errors.hpp"

#ifndef _WIN32
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace obc {

namespace {

constexpr char kMagic[8] = {'O', 'B', 'C', 'H', 'E', 'S', 'S', '\0'};
constexpr std::uint64_t kChecksumBytes = 8;
// Largest cols whose payload size 8 * cols^2 cannot overflow 64 bits (and far beyond any layer).
constexpr std::uint64_t kMaxCols = std::uint64_t(1) << 28;
// Payload bytes moved per read/write call (and per byte-order conversion buffer).
constexpr std::size_t kIoChunkBytes = std::size_t(1) << 20;

bool host_is_little_endian() {
  const std::uint32_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

void put_u32(unsigned char* out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put_u64(unsigned char* out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}
std::uint32_t get_u32(const unsigned char* in) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(in[i]) << (8 * i);
  return v;
}
std::uint64_t get_u64(const unsigned char* in) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(in[i]) << (8 * i);
  return v;
}

// Reverses the byte order of each 8-byte word (doubles on big-endian hosts).
void swap_words(unsigned char* bytes, std::size_t size) {
  for (std::size_t i = 0; i + 8 <= size; i += 8) std::reverse(bytes + i, bytes + i + 8);
}

std::uint64_t file_bytes_for(std::uint64_t cols) {
  return kHessianHeaderBytes + 8 * cols * cols + kChecksumBytes;
}

using Sink = std::function<void(const unsigned char*, std::size_t)>;
// Reads up to `size` bytes, returns how many were read (fewer only at the end of the data).
using Source = std::function<std::size_t(unsigned char*, std::size_t)>;

// Asks `hook` (may be null) whether to stop, after the first chunk and then at most every 50 ms
// (a Python hook takes the GIL for each question); a stop throws Interrupted. Called between
// chunks, from the thread doing the IO (the caller's).
class ChunkPoll {
 public:
  explicit ChunkPoll(InterruptHook* hook) : hook_(hook) {}
  void operator()() {
    if (hook_ == nullptr) return;
    const auto now = std::chrono::steady_clock::now();
    if (asked_ && now - last_ < std::chrono::milliseconds(50)) return;
    asked_ = true;
    last_ = now;
    if (hook_->should_stop()) throw Interrupted();
  }

 private:
  InterruptHook* hook_;
  bool asked_ = false;
  std::chrono::steady_clock::time_point last_{};
};

void write_impl(const HessianAccumulator& acc, const Sink& sink, InterruptHook* interrupt) {
  ChunkPoll poll(interrupt);
  unsigned char header[kHessianHeaderBytes] = {};
  std::memcpy(header, kMagic, 8);
  put_u32(header + 8, kHessianFormatVersion);
  put_u32(header + 12, 0);
  put_u64(header + 16, static_cast<std::uint64_t>(acc.cols()));
  put_u64(header + 24, acc.count());
  std::uint64_t hash = fnv1a64(header, sizeof header);
  sink(header, sizeof header);
  // S is symmetric, so its column-major storage is also its row-major byte sequence.
  const auto* payload = reinterpret_cast<const unsigned char*>(acc.sum().data());
  const std::size_t payload_bytes = static_cast<std::size_t>(acc.sum().size()) * 8;
  const bool little = host_is_little_endian();
  std::vector<unsigned char> buffer;
  for (std::size_t done = 0; done < payload_bytes; done += kIoChunkBytes) {
    const std::size_t len = std::min(kIoChunkBytes, payload_bytes - done);
    const unsigned char* bytes = payload + done;
    if (!little) {
      buffer.assign(bytes, bytes + len);
      swap_words(buffer.data(), len);
      bytes = buffer.data();
    }
    hash = fnv1a64(bytes, len, hash);
    sink(bytes, len);
    poll();
  }
  unsigned char checksum[kChecksumBytes];
  put_u64(checksum, hash);
  sink(checksum, sizeof checksum);
}

std::string hex64(std::uint64_t v) {
  char text[19];
  std::snprintf(text, sizeof text, "0x%016llx", static_cast<unsigned long long>(v));
  return text;
}

HessianFileInfo parse_header(const unsigned char* header, std::size_t got,
                             const std::string& name) {
  if (got < kHessianHeaderBytes) {
    throw FormatError(detail::concat(name, ": truncated Hessian file: ", got,
                                     " bytes, the header alone is ", kHessianHeaderBytes));
  }
  if (std::memcmp(header, kMagic, 8) != 0) {
    throw FormatError(detail::concat(
        name, ": not an obc_native Hessian file (the first 8 bytes are not \"OBCHESS\\0\")"));
  }
  HessianFileInfo info;
  info.version = get_u32(header + 8);
  if (info.version != kHessianFormatVersion) {
    throw FormatError(detail::concat(name, ": unsupported Hessian file format version ",
                                     info.version, "; this library reads version ",
                                     kHessianFormatVersion));
  }
  const std::uint32_t reserved = get_u32(header + 12);
  if (reserved != 0) {
    throw FormatError(
        detail::concat(name, ": reserved header field is ", reserved, ", expected 0"));
  }
  const std::uint64_t cols = get_u64(header + 16);
  if (cols == 0 || cols > kMaxCols) {
    throw FormatError(detail::concat(name, ": invalid cols ", cols, " in the header (expected 1..",
                                     kMaxCols, ")"));
  }
  info.cols = static_cast<Index>(cols);
  info.count = get_u64(header + 24);
  info.file_bytes = file_bytes_for(cols);
  return info;
}

void check_size(const HessianFileInfo& info, std::uint64_t actual, const std::string& name) {
  if (actual < info.file_bytes) {
    throw FormatError(detail::concat(name, ": truncated Hessian file: ", actual,
                                     " bytes, expected ", info.file_bytes,
                                     " for cols = ", info.cols));
  }
  if (actual > info.file_bytes) {
    throw FormatError(detail::concat(name, ": oversized Hessian file: ", actual,
                                     " bytes, expected ", info.file_bytes,
                                     " for cols = ", info.cols, " (trailing data)"));
  }
}

// `known_size`: total bytes of the data when the source knows it (files, seekable streams),
// checked before the payload is allocated; empty when unknown (then reading stops at the end).
HessianAccumulator read_impl(const Source& source, std::optional<std::uint64_t> known_size,
                             const std::string& name, const AccumulatorOptions& options,
                             InterruptHook* interrupt) {
  ChunkPoll poll(interrupt);
  unsigned char header[kHessianHeaderBytes];
  const std::size_t got = source(header, sizeof header);
  const HessianFileInfo info = parse_header(header, got, name);
  if (known_size) check_size(info, *known_size, name);

  const std::uint64_t payload_bytes =
      8 * static_cast<std::uint64_t>(info.cols) * static_cast<std::uint64_t>(info.cols);
  std::uint64_t hash = fnv1a64(header, sizeof header);
  // Grown chunk by chunk, so a corrupt header in a stream of unknown size cannot make us
  // allocate more than the data that is really there.
  std::vector<unsigned char> payload;
  std::uint64_t done = 0;
  while (done < payload_bytes) {
    const std::size_t want =
        static_cast<std::size_t>(std::min<std::uint64_t>(kIoChunkBytes, payload_bytes - done));
    payload.resize(static_cast<std::size_t>(done) + want);
    const std::size_t n = source(payload.data() + done, want);
    hash = fnv1a64(payload.data() + done, n, hash);
    done += n;
    if (n < want) check_size(info, kHessianHeaderBytes + done, name);
    poll();
  }
  unsigned char checksum[kChecksumBytes + 1];
  const std::size_t tail = source(checksum, sizeof checksum);
  if (tail < kChecksumBytes) check_size(info, kHessianHeaderBytes + payload_bytes + tail, name);
  if (tail > kChecksumBytes) {
    throw FormatError(detail::concat(
        name, ": oversized Hessian file: data after the checksum at byte ", info.file_bytes));
  }
  const std::uint64_t stored = get_u64(checksum);
  if (stored != hash) {
    throw FormatError(detail::concat(name, ": Hessian file checksum mismatch (stored ",
                                     hex64(stored), ", computed ", hex64(hash),
                                     "): the file is corrupted or was modified"));
  }
  if (!host_is_little_endian()) swap_words(payload.data(), payload.size());
  Eigen::MatrixXd sum(info.cols, info.cols);
  std::memcpy(sum.data(), payload.data(), payload.size());
  payload = {};
  try {
    return HessianAccumulator::from_state(sum, info.count, options);
  } catch (const FormatError&) {
    throw;
  } catch (const InvalidArgument& e) {
    throw FormatError(detail::concat(name, ": invalid Hessian file contents: ", e.what()));
  }
}

std::string system_reason() { return std::strerror(errno); }

// A FILE* closed on scope exit.
struct File {
  std::FILE* handle = nullptr;
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (handle != nullptr) std::fclose(handle);
  }
};

// What is at `path` (a symbolic link is followed): "regular", "missing" or a description of
// anything else ("a directory", "a FIFO", ...). Never opens the path.
std::string path_kind(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  switch (status.type()) {
    case fs::file_type::regular: return "regular";
    case fs::file_type::not_found: return "missing";
    case fs::file_type::directory: return "a directory";
    case fs::file_type::fifo: return "a FIFO";
    case fs::file_type::socket: return "a socket";
    case fs::file_type::block:
    case fs::file_type::character: return "a device";
    default: break;
  }
  if (error) throw IoError(path + ": cannot inspect the path: " + error.message());
  return "not a regular file";
}

// Opens `path` for reading only if it is a regular file: checked before opening (so a FIFO or
// a device is never opened and cannot block us) and, on POSIX, again on the open descriptor
// (opened non-blocking, so a FIFO swapped in after the first check cannot block either).
// Returns the file's size in bytes, measured on the open file.
std::uint64_t open_for_reading(File& file, const std::string& path) {
  const std::string kind = path_kind(path);
  if (kind == "missing") throw IoError(path + ": cannot open for reading: no such file");
  if (kind != "regular") {
    throw IoError(path + ": cannot read a Hessian file from " + kind +
                  " (only regular files are read)");
  }
#ifndef _WIN32
  errno = 0;
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw IoError(path + ": cannot open for reading: " + system_reason());
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw IoError(path + ": cannot read a Hessian file from something that is not a regular file");
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  errno = 0;
  file.handle = ::fdopen(fd, "rb");
  if (file.handle == nullptr) {
    const std::string reason = system_reason();
    ::close(fd);
    throw IoError(path + ": cannot open for reading: " + reason);
  }
  return static_cast<std::uint64_t>(info.st_size);
#else
  errno = 0;
  file.handle = std::fopen(path.c_str(), "rb");
  if (file.handle == nullptr) throw IoError(path + ": cannot open for reading: " + system_reason());
  std::error_code error;
  const std::uintmax_t size = std::filesystem::file_size(path, error);
  if (error) throw IoError(path + ": cannot read the file size: " + error.message());
  return static_cast<std::uint64_t>(size);
#endif
}

// Refuses to replace anything at `path` that is not a Hessian file (or an empty regular file):
// a directory, FIFO or device, or a regular file holding other data.
void check_replaceable(const std::string& path) {
  const std::string kind = path_kind(path);
  if (kind == "missing") return;
  if (kind != "regular") {
    throw IoError(path + ": refusing to replace " + kind + " with a Hessian file");
  }
  File existing;
  open_for_reading(existing, path);  // regular files only, never blocks; unreadable: refused
  char magic[sizeof kMagic] = {};
  const std::size_t got = std::fread(magic, 1, sizeof magic, existing.handle);
  if (got != 0 && (got != sizeof magic || std::memcmp(magic, kMagic, sizeof magic) != 0)) {
    throw IoError(path + ": refusing to replace a file that is not an obc_native Hessian file");
  }
}

Source file_source(std::FILE* f, const std::string& path) {
  return [f, path](unsigned char* out, std::size_t size) {
    const std::size_t n = std::fread(out, 1, size, f);
    if (n < size && std::ferror(f)) throw IoError(path + ": read failed: " + system_reason());
    return n;
  };
}

}  // namespace

std::uint64_t fnv1a64(const void* data, std::size_t size, std::uint64_t hash) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

void write_hessian(std::ostream& out, const HessianAccumulator& accumulator,
                   InterruptHook* interrupt) {
  write_impl(
      accumulator,
      [&out](const unsigned char* bytes, std::size_t size) {
        out.write(reinterpret_cast<const char*>(bytes), static_cast<std::streamsize>(size));
        if (!out) throw IoError("write_hessian: the output stream failed");
      },
      interrupt);
}

HessianAccumulator read_hessian(std::istream& in, const AccumulatorOptions& options,
                                InterruptHook* interrupt) {
  std::optional<std::uint64_t> known_size;
  const std::istream::pos_type start = in.tellg();
  if (start != std::istream::pos_type(-1)) {
    in.seekg(0, std::ios::end);
    const std::istream::pos_type end = in.tellg();
    in.seekg(start);
    if (end != std::istream::pos_type(-1) && in) {
      known_size = static_cast<std::uint64_t>(end - start);
    } else {
      in.clear();
      in.seekg(start);
    }
  }
  const Source source = [&in](unsigned char* out, std::size_t size) {
    in.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(size));
    const auto n = static_cast<std::size_t>(in.gcount());
    if (in.bad()) throw IoError("read_hessian: the input stream failed");
    return n;
  };
  return read_impl(source, known_size, "read_hessian", options, interrupt);
}

void save_hessian(const std::string& path, const HessianAccumulator& accumulator,
                  InterruptHook* interrupt) {
  OBC_CHECK(!path.empty(), "path: expected a file name, got an empty string");
  check_replaceable(path);
  // A unique temporary next to the target, renamed into place once complete.
  const auto salt = static_cast<unsigned long long>(
      std::chrono::steady_clock::now().time_since_epoch().count() ^
      (std::hash<std::thread::id>()(std::this_thread::get_id()) << 1));
  const std::string temp = path + ".tmp" + std::to_string(salt % 1000000007ULL);
  {
    File file;
    errno = 0;
    file.handle = std::fopen(temp.c_str(), "wbx");  // exclusive: never through an existing name
    if (file.handle == nullptr) {
      throw IoError(path + ": cannot open for writing (" + temp + "): " + system_reason());
    }
    try {
      write_impl(
          accumulator,
          [&](const unsigned char* bytes, std::size_t size) {
            if (std::fwrite(bytes, 1, size, file.handle) != size) {
              throw IoError(path + ": write failed: " + system_reason());
            }
          },
          interrupt);
      errno = 0;
      const int closed = std::fclose(file.handle);
      file.handle = nullptr;
      if (closed != 0) throw IoError(path + ": write failed on close: " + system_reason());
    } catch (...) {
      if (file.handle != nullptr) {
        std::fclose(file.handle);
        file.handle = nullptr;
      }
      std::remove(temp.c_str());
      throw;
    }
  }
  // A replaced file keeps its permission bits (a user's chmod 600 survives a new save); a new one
  // keeps what fopen gave (0666 less the umask). Set-id and sticky bits are not carried over.
  std::error_code error;
  const auto existing = std::filesystem::symlink_status(path, error);
  if (!error && std::filesystem::is_regular_file(existing)) {
    std::filesystem::permissions(temp, existing.permissions() & std::filesystem::perms::all,
                                 std::filesystem::perm_options::replace, error);
    if (error) {
      std::remove(temp.c_str());
      throw IoError(path + ": cannot give the written file the replaced file's mode: " + error.message());
    }
  }
  error.clear();
  // std::filesystem::rename replaces an existing regular file (atomically on POSIX) and fails on
  // a directory; nothing but the temporary written above is ever removed here.
  std::filesystem::rename(temp, path, error);
  if (error) {
    std::remove(temp.c_str());
    throw IoError(path + ": cannot move the written file into place: " + error.message());
  }
}

HessianAccumulator load_hessian(const std::string& path, const AccumulatorOptions& options,
                                InterruptHook* interrupt) {
  OBC_CHECK(!path.empty(), "path: expected a file name, got an empty string");
  File file;
  const std::uint64_t size = open_for_reading(file, path);
  return read_impl(file_source(file.handle, path), size, path, options, interrupt);
}

HessianFileInfo read_hessian_info(const std::string& path) {
  OBC_CHECK(!path.empty(), "path: expected a file name, got an empty string");
  File file;
  const std::uint64_t size = open_for_reading(file, path);
  unsigned char header[kHessianHeaderBytes];
  const std::size_t got = file_source(file.handle, path)(header, sizeof header);
  const HessianFileInfo info = parse_header(header, got, path);
  check_size(info, size, path);
  return info;
}

}  // namespace obc

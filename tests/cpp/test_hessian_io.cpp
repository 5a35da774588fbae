// Tests for obc/hessian_io.hpp: exact round trips, the byte layout, and rejected corruptions.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "check.hpp"
#include "obc/errors.hpp"
#include "obc/hessian_io.hpp"

#ifndef _WIN32
#include <sys/stat.h>
#endif

using namespace obc;
namespace fs = std::filesystem;

namespace {

HessianAccumulator make_accumulator(Index cols, Index n, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  const RowMatrixXd x = RowMatrixXd::NullaryExpr(n, cols, [&] { return normal(gen); });
  HessianAccumulator acc(cols);
  acc.add(x);
  return acc;
}

std::string serialize(const HessianAccumulator& acc) {
  std::ostringstream out(std::ios::binary);
  write_hessian(out, acc);
  return out.str();
}

std::uint64_t read_u64(const std::string& bytes, std::size_t offset) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= std::uint64_t(static_cast<unsigned char>(bytes[offset + i])) << (8 * i);
  return v;
}

void put_u64(std::string& bytes, std::size_t offset, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) bytes[offset + i] = static_cast<char>(v >> (8 * i));
}

// Recomputes the trailing checksum after an edit, to test checks behind the checksum.
void reseal(std::string& bytes) {
  const std::size_t body = bytes.size() - 8;
  put_u64(bytes, body, fnv1a64(bytes.data(), body));
}

// The FormatError message of reading `bytes`, or "" when it does not throw FormatError.
std::string format_error(const std::string& bytes) {
  std::istringstream in(bytes, std::ios::binary);
  try {
    read_hessian(in);
  } catch (const FormatError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const char* part) {
  return text.find(part) != std::string::npos;
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("obc_test_hessian_io_" + std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

}  // namespace

OBC_TEST(fnv1a64_known_values) {
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ULL);
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cULL);
  CHECK(fnv1a64("foobar", 6) == 0x85944171f73967e8ULL);
  // Streaming in pieces equals one call.
  CHECK(fnv1a64("bar", 3, fnv1a64("foo", 3)) == fnv1a64("foobar", 6));
}

OBC_TEST(byte_layout_is_as_documented) {
  const HessianAccumulator acc = make_accumulator(3, 11, 1);
  const std::string bytes = serialize(acc);
  CHECK(bytes.size() == 40 + 8 * 9);
  CHECK(std::memcmp(bytes.data(), "OBCHESS\0", 8) == 0);
  CHECK(bytes[8] == 1 && bytes[9] == 0 && bytes[10] == 0 && bytes[11] == 0);  // version 1 LE
  CHECK(read_u64(bytes, 8) >> 32 == 0);                                       // reserved
  CHECK(read_u64(bytes, 16) == 3);
  CHECK(read_u64(bytes, 24) == 11);
  for (int i = 0; i < 9; ++i) {
    const std::uint64_t word = read_u64(bytes, 32 + 8 * static_cast<std::size_t>(i));
    double value;
    std::memcpy(&value, &word, 8);
    CHECK(value == acc.sum()(i / 3, i % 3));  // row-major
  }
  CHECK(read_u64(bytes, bytes.size() - 8) == fnv1a64(bytes.data(), bytes.size() - 8));
}

OBC_TEST(stream_round_trip_is_exact) {
  const HessianAccumulator acc = make_accumulator(17, 40, 2);
  std::istringstream in(serialize(acc), std::ios::binary);
  const HessianAccumulator back = read_hessian(in);
  CHECK(back.cols() == 17);
  CHECK(back.count() == 40);
  CHECK(back.sum() == acc.sum());
  CHECK(back.hessian() == acc.hessian());
  // An empty accumulator round-trips too.
  std::istringstream empty(serialize(HessianAccumulator(2)), std::ios::binary);
  CHECK(read_hessian(empty).count() == 0);
}

OBC_TEST(file_round_trip_and_merge_of_saved_shards) {
  TempDir dir;
  const HessianAccumulator a = make_accumulator(30, 100, 3);
  const HessianAccumulator b = make_accumulator(30, 57, 4);
  const std::string path_a = (dir.path / "a.obchess").string();
  const std::string path_b = (dir.path / "b.obchess").string();
  save_hessian(path_a, a);
  save_hessian(path_b, b);
  HessianAccumulator merged = load_hessian(path_a);
  merged.merge(load_hessian(path_b));
  HessianAccumulator expected = a;
  expected.merge(b);
  CHECK(merged.sum() == expected.sum());
  CHECK(merged.count() == 157);
  // Overwriting an existing file works and leaves no temporary behind.
  save_hessian(path_a, expected);
  CHECK(load_hessian(path_a).count() == 157);
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    (void)entry;
    ++files;
  }
  CHECK(files == 2);
  const HessianFileInfo info = read_hessian_info(path_a);
  CHECK(info.version == 1 && info.cols == 30 && info.count == 157);
  CHECK(info.file_bytes == fs::file_size(path_a));
}

OBC_TEST(corrupted_files_are_rejected) {
  const std::string good = serialize(make_accumulator(4, 9, 5));
  CHECK(format_error(good).empty());

  std::string magic = good;
  magic[0] = 'X';
  CHECK(contains(format_error(magic), "not an obc_native Hessian file"));

  std::string version = good;
  version[8] = 2;
  CHECK(contains(format_error(version), "unsupported Hessian file format version 2"));

  std::string reserved = good;
  reserved[12] = 1;
  reseal(reserved);
  CHECK(contains(format_error(reserved), "reserved header field"));

  std::string zero_cols = good;
  put_u64(zero_cols, 16, 0);
  CHECK(contains(format_error(zero_cols), "invalid cols 0"));

  std::string huge_cols = good;
  put_u64(huge_cols, 16, std::uint64_t(1) << 40);
  CHECK(contains(format_error(huge_cols), "invalid cols"));

  for (std::size_t keep : {std::size_t(0), std::size_t(7), std::size_t(31), std::size_t(32),
                           std::size_t(100), good.size() - 1}) {
    CHECK(contains(format_error(good.substr(0, keep)), "truncated"));
  }
  CHECK(contains(format_error(good + '\0'), "oversized"));
  std::string more_cols = good;  // header claims more data than the file holds
  put_u64(more_cols, 16, 5);
  CHECK(contains(format_error(more_cols), "truncated"));

  std::string payload = good;
  payload[40] ^= 0x01;
  CHECK(contains(format_error(payload), "checksum mismatch"));
  std::string count = good;
  count[24] ^= 0x10;
  CHECK(contains(format_error(count), "checksum mismatch"));
  std::string checksum = good;
  checksum[checksum.size() - 1] ^= 0x7f;
  CHECK(contains(format_error(checksum), "checksum mismatch"));

  // Behind a valid checksum, the payload must still be a sum of x x^T.
  std::string asym = good;
  double value = 123.0;
  std::memcpy(&asym[32 + 8], &value, 8);  // S[0, 1] != S[1, 0]
  reseal(asym);
  CHECK(contains(format_error(asym), "invalid Hessian file contents"));
  std::string nan = good;
  value = std::numeric_limits<double>::quiet_NaN();
  std::memcpy(&nan[32], &value, 8);
  reseal(nan);
  CHECK(contains(format_error(nan), "finite"));
}

OBC_TEST(file_errors_name_the_path) {
  TempDir dir;
  const std::string missing = (dir.path / "missing.obchess").string();
  bool io = false;
  try {
    load_hessian(missing);
  } catch (const IoError& e) {
    io = contains(e.what(), "missing.obchess") && contains(e.what(), "cannot open");
  }
  CHECK(io);
  CHECK_THROWS(
      save_hessian((dir.path / "no_such_dir" / "x.obchess").string(), HessianAccumulator(2)),
      IoError);
  CHECK_THROWS(load_hessian(""), InvalidArgument);

  const std::string bad = (dir.path / "bad.obchess").string();
  {
    std::ofstream out(bad, std::ios::binary);
    out << "definitely not a Hessian file, but longer than the header is";
  }
  bool named = false;
  try {
    load_hessian(bad);
  } catch (const FormatError& e) {
    named = contains(e.what(), "bad.obchess") && contains(e.what(), "not an obc_native");
  }
  CHECK(named);
  CHECK_THROWS(read_hessian_info(bad), FormatError);
  // FormatError is an InvalidArgument (ValueError in Python).
  CHECK_THROWS(load_hessian(bad), InvalidArgument);
}

OBC_TEST(save_never_deletes_what_it_did_not_create) {
  TempDir dir;
  const HessianAccumulator acc = make_accumulator(3, 5, 7);
  // An existing (empty) directory at the target: refused, and still there afterwards.
  const fs::path folder = dir.path / "folder.obchess";
  fs::create_directory(folder);
  CHECK_THROWS(save_hessian(folder.string(), acc), IoError);
  CHECK(fs::is_directory(folder));
  // A regular file holding something else: refused, contents intact.
  const fs::path other = dir.path / "notes.txt";
  {
    std::ofstream out(other, std::ios::binary);
    out << "keep me";
  }
  CHECK_THROWS(save_hessian(other.string(), acc), IoError);
  std::ifstream in(other, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text == "keep me");
  // An empty file and an older Hessian file are replaced.
  const fs::path empty = dir.path / "empty.obchess";
  std::ofstream(empty).close();
  save_hessian(empty.string(), acc);
  CHECK(load_hessian(empty.string()).count() == 5);
  save_hessian(empty.string(), make_accumulator(3, 9, 8));
  CHECK(load_hessian(empty.string()).count() == 9);
  // No temporary is left behind after a refusal or a success.
  int entries = 0;
  for (const auto& entry : fs::directory_iterator(dir.path)) entries += entry.path().empty() ? 0 : 1;
  CHECK(entries == 3);
}

#ifndef _WIN32
OBC_TEST(loading_a_fifo_fails_instead_of_blocking) {
  TempDir dir;
  const fs::path fifo = dir.path / "pipe.obchess";
  CHECK(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_THROWS(load_hessian(fifo.string()), IoError);
  CHECK_THROWS(read_hessian_info(fifo.string()), IoError);
  CHECK_THROWS(save_hessian(fifo.string(), make_accumulator(2, 2, 1)), IoError);
  CHECK_THROWS(load_hessian(dir.path.string()), IoError);
}
#endif

OBC_TEST(sums_that_would_overflow_are_rejected) {
  HessianAccumulator acc(2);
  const double big[2] = {1e200, 1.0};
  CHECK_THROWS(acc.add(big, 1, 2), InvalidArgument);
  CHECK(acc.count() == 0 && acc.sum().cwiseAbs().maxCoeff() == 0);
  const double large[2] = {6e153, 1.0};  // square 3.6e307 fits under DBL_MAX / 4; twice it does not
  acc.add(large, 1, 2);
  CHECK(acc.hessian().allFinite());
  CHECK_THROWS(acc.add(large, 1, 2), InvalidArgument);
  HessianAccumulator other = acc;
  CHECK_THROWS(acc.merge(other), InvalidArgument);
  CHECK(acc.count() == 1);
  Eigen::MatrixXd huge = Eigen::MatrixXd::Identity(2, 2) * std::numeric_limits<double>::max();
  CHECK_THROWS(HessianAccumulator::from_state(huge, 1), InvalidArgument);
}

// A host that asks to stop at its first question, and counts the questions.
struct StopAtOnce : InterruptHook {
  int asked = 0;
  bool should_stop() override {
    ++asked;
    return true;
  }
};

OBC_TEST(long_reads_and_writes_stop_when_the_host_asks) {
  const HessianAccumulator acc = make_accumulator(600, 3, 21);  // 2.7 MiB: three chunks
  const std::string bytes = serialize(acc);
  {  // a stream write stops after its first chunk
    StopAtOnce hook;
    std::ostringstream out(std::ios::binary);
    CHECK_THROWS(write_hessian(out, acc, &hook), Interrupted);
    CHECK(hook.asked == 1);
    CHECK(out.str().size() < bytes.size());
  }
  {  // and a stream read, returning nothing
    StopAtOnce hook;
    std::istringstream in(bytes, std::ios::binary);
    CHECK_THROWS(read_hessian(in, {}, &hook), Interrupted);
    CHECK(hook.asked == 1);
  }
  TempDir temp;
  const fs::path& dir = temp.path;
  const std::string path = (dir / "h.obch").string();
  save_hessian(path, make_accumulator(5, 2, 3));
  const std::uint64_t before = fs::file_size(path);
  {  // a stopped save leaves the old file and no temporary behind
    StopAtOnce hook;
    CHECK_THROWS(save_hessian(path, acc, &hook), Interrupted);
    CHECK(fs::file_size(path) == before);
    CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  }
  save_hessian(path, acc);
  {
    StopAtOnce hook;
    CHECK_THROWS(load_hessian(path, {}, &hook), Interrupted);
  }
  // without a stop the hook changes nothing
  struct Never : InterruptHook {
    bool should_stop() override { return false; }
  } never;
  std::ostringstream out(std::ios::binary);
  write_hessian(out, acc, &never);
  CHECK(out.str() == bytes);
  std::istringstream in(bytes, std::ios::binary);
  CHECK(read_hessian(in, {}, &never).sum() == acc.sum());
  CHECK(load_hessian(path, {}, &never).sum() == acc.sum());
}

OBC_TEST_MAIN

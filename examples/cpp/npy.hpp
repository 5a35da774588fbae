// Minimal .npy reading and writing for the example host: C-order, little-endian float32,
// float64 and uint8 arrays of 1 or 2 dimensions (what numpy.save writes for such arrays).
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

struct Array {
  std::string descr;                // "<f4", "<f8" or "|u1"
  std::vector<std::int64_t> shape;  // 1 or 2 dimensions
  std::vector<unsigned char> bytes;

  std::int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  std::int64_t cols() const { return shape.size() < 2 ? 1 : shape[1]; }
};

inline std::size_t item_size(const std::string& descr) {
  if (descr == "<f4") return 4;
  if (descr == "<f8") return 8;
  if (descr == "|u1" || descr == "<u1") return 1;
  throw std::runtime_error("unsupported .npy dtype '" + descr +
                           "' (expected float32 '<f4', float64 '<f8' or uint8 '|u1')");
}

// The text after `key` in the header dict, e.g. value_of(h, "'descr':") -> " '<f8', ...".
inline std::string value_of(const std::string& header, const std::string& key,
                            const std::string& path) {
  const std::size_t at = header.find(key);
  if (at == std::string::npos) throw std::runtime_error(path + ": .npy header lacks " + key);
  return header.substr(at + key.size());
}

inline Array read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open for reading");
  unsigned char preamble[10];
  in.read(reinterpret_cast<char*>(preamble), 8);
  if (in.gcount() != 8 || std::memcmp(preamble, "\x93NUMPY", 6) != 0) {
    throw std::runtime_error(path + ": not a .npy file");
  }
  const int major = preamble[6];
  std::uint32_t header_len = 0;
  if (major == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = len[0] | (std::uint32_t(len[1]) << 8);
  } else if (major == 2 || major == 3) {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    for (int i = 0; i < 4; ++i) header_len |= std::uint32_t(len[i]) << (8 * i);
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (!in) throw std::runtime_error(path + ": truncated .npy header");

  Array a;
  const std::string descr = value_of(header, "'descr':", path);
  const std::size_t q1 = descr.find('\'');
  const std::size_t q2 = descr.find('\'', q1 + 1);
  a.descr = descr.substr(q1 + 1, q2 - q1 - 1);
  const std::string fortran = value_of(header, "'fortran_order':", path);
  if (fortran.compare(fortran.find_first_not_of(' '), 5, "False") != 0) {
    throw std::runtime_error(path +
                             ": Fortran-order arrays are not supported; save a C-order "
                             "array (numpy.ascontiguousarray)");
  }
  const std::string shape = value_of(header, "'shape':", path);
  const std::size_t open = shape.find('(');
  const std::size_t close = shape.find(')');
  std::string dims = shape.substr(open + 1, close - open - 1);
  std::size_t pos = 0;
  while (pos < dims.size()) {
    const std::size_t comma = dims.find(',', pos);
    const std::string part =
        dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (part.find_first_of("0123456789") != std::string::npos) {
      a.shape.push_back(std::stoll(part));
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  if (a.shape.empty() || a.shape.size() > 2) {
    throw std::runtime_error(path + ": expected a 1-D or 2-D array");
  }
  std::size_t count = 1;
  for (std::int64_t d : a.shape) count *= static_cast<std::size_t>(d);
  a.bytes.resize(count * item_size(a.descr));
  in.read(reinterpret_cast<char*>(a.bytes.data()), static_cast<std::streamsize>(a.bytes.size()));
  if (static_cast<std::size_t>(in.gcount()) != a.bytes.size()) {
    throw std::runtime_error(path + ": truncated .npy data");
  }
  return a;
}

inline void write(const std::string& path, const std::string& descr,
                  const std::vector<std::int64_t>& shape, const void* data) {
  std::string dims;
  std::size_t count = 1;
  for (std::int64_t d : shape) {
    dims += std::to_string(d) + (shape.size() == 1 ? "," : ", ");
    count *= static_cast<std::size_t>(d);
  }
  if (shape.size() == 2) dims.resize(dims.size() - 2);
  std::string header =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  out.write("\x93NUMPY\x01\x00", 8);
  const char len[2] = {static_cast<char>(header.size() & 0xff),
                       static_cast<char>(header.size() >> 8)};
  out.write(len, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(count * item_size(descr)));
  if (!out) throw std::runtime_error(path + ": write failed");
}

}  // namespace npy

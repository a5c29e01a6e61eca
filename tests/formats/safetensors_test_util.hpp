// Test helpers for safetensors files: a self-deleting temporary directory, raw byte builders for
// hand-written (possibly malformed) files, and small file I/O.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

namespace fp8moe::testing {

// A fresh directory under the system temporary directory, removed with its contents on scope exit.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    const auto base = std::filesystem::temp_directory_path();
    do {
      path_ = base / ("fp8moe-st-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
    } while (!std::filesystem::create_directory(path_));
    path_ = std::filesystem::canonical(path_);  // messages name canonical paths
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// 8 bytes little-endian.
inline std::string le64(uint64_t v) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &v, 8);
  return s;
}

// A safetensors file image: N = header.size() (little-endian u64), the header, the data buffer.
inline std::string st_image(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("test: cannot write " + path);
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test: cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace fp8moe::testing

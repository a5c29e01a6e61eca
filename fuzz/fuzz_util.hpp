// What the libFuzzer targets share: a scratch directory on tmpfs (so that writing an input to a
// file costs microseconds and the writer's fsync nothing), file I/O, the container that packs
// several files into one input, and the way a target reports a broken property.
//
// A target accepts any input: fp8moe::Error is the one way to refuse it. Any other exception
// escapes to libFuzzer (std::terminate: reported as a crash), as does a property failure
// (fuzz_fail: abort with a message), a sanitizer report, an allocation above -malloc_limit_mb,
// or an input slower than -timeout.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace fp8moe::fuzz {

// Separates the files of a multi-file input (fuzz_checkpoint). Also in checkpoint.dict, so that
// mutations insert and keep it.
constexpr std::string_view kFileSeparator = "\n--fp8moe-next-file--\n";

[[noreturn]] inline void fuzz_fail(const std::string& what) {
  std::fprintf(stderr, "fp8moe fuzz: property broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// A fresh directory for this process, on /dev/shm when there is one; removed at exit.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    fs::path d = base / ("fp8moe-fuzz-" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) fuzz_fail("cannot write the scratch file " + path.string());
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The parts of a multi-file input, in order.
inline std::vector<std::string_view> split_files(std::string_view input) {
  std::vector<std::string_view> parts;
  for (;;) {
    const size_t at = input.find(kFileSeparator);
    parts.push_back(input.substr(0, at));
    if (at == std::string_view::npos) return parts;
    input.remove_prefix(at + kFileSeparator.size());
  }
}

}  // namespace fp8moe::fuzz

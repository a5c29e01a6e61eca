// The CLI's file checks and atomic output (files.hpp).
#include "files.hpp"

#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "fp8moe/error.hpp"
#include "signals.hpp"

namespace fs = std::filesystem;

namespace fp8moe::cli {

void expect_not_json(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return;
  std::ifstream f(path, std::ios::binary);
  char c = 0;
  while (f.get(c) && (c == ' ' || c == '\n' || c == '\r' || c == '\t')) {
  }
  if (!f || (c != '{' && c != '[')) return;
  const fs::path p(path);
  const std::string dir = p.has_parent_path() ? p.parent_path().string() : std::string(".");
  FP8MOE_FAIL(what, " '", path, "' is a JSON file, not a safetensors file",
              what == "checkpoint" ? "; give the checkpoint directory ('" + dir + "') or one of its .safetensors files"
                                   : std::string());
}

struct AtomicOutput::Guard {
  explicit Guard(const std::string& p) : cleanup(p) {}
  CleanupOnSignal cleanup;
};

AtomicOutput::AtomicOutput(std::string path, bool force, const std::string& option)
    : path_(std::move(path)), option_(option) {
  const fs::path p(path_);
  FP8MOE_CHECK(!p.filename().empty() && p.filename() != "." && p.filename() != "..", option_, " '", path_,
               "': expected a file name");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  std::error_code ec;
  FP8MOE_CHECK(fs::is_directory(dir, ec), option_, " '", path_, "': the folder '", dir.string(), "' does not exist");
  if (fs::exists(p, ec)) {
    FP8MOE_CHECK(!fs::is_directory(p, ec), option_, " '", path_, "' is a directory; expected a file name");
    FP8MOE_CHECK(force, option_, " '", path_, "' already exists; refusing to overwrite it (--force replaces it)");
  }
  std::string tmpl = (dir / ("." + p.filename().string() + ".XXXXXX")).string();
  const int fd = ::mkstemp(tmpl.data());
  FP8MOE_CHECK(fd >= 0, option_, " '", path_, "': cannot create a file in '", dir.string(), "': ", std::strerror(errno));
  ::close(fd);
  temp_ = tmpl;
  guard_ = std::make_unique<Guard>(temp_);
}

AtomicOutput::~AtomicOutput() {
  guard_.reset();
  if (!committed_) ::unlink(temp_.c_str());
  ::unlink((temp_ + ".tmp").c_str());  // SafetensorsWriter's own temporary, should it be left
}

void AtomicOutput::fail(const std::exception& e) const {
  // The writer names the file it was given (the temporary one): name the user's instead.
  auto mend = [&](std::string s) {
    for (const std::string& t : {temp_ + ".tmp", temp_})
      for (size_t at; (at = s.find(t)) != std::string::npos;) s.replace(at, t.size(), path_);
    return s;
  };
  if (const auto* err = dynamic_cast<const Error*>(&e)) throw Error(mend(err->message()), err->internals());
  throw Error(mend(e.what()));
}

void AtomicOutput::commit() {
  FP8MOE_CHECK(::rename(temp_.c_str(), path_.c_str()) == 0, option_, " '", path_, "': cannot write it: ", std::strerror(errno));
  committed_ = true;
}

}  // namespace fp8moe::cli

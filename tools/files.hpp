// Files the CLI reads and writes: a checkpoint path checked before it is parsed (a config.json
// given for a checkpoint is named as such, not read as a safetensors header), and an output file
// written atomically (a temporary file in the same folder, renamed over the target when complete;
// removed on failure or a signal), whose messages name the user's path.
#pragma once

#include <memory>
#include <string>

namespace fp8moe::cli {

// Throws (exit 1) when `path` is a regular file that is JSON (a config.json, an adapter_config.json)
// where `what` ("checkpoint", "--inputs") expects a safetensors file or a checkpoint directory.
void expect_not_json(const std::string& path, const std::string& what);

class AtomicOutput {
 public:
  // `path`: the file to produce. `force`: replace an existing file (else an existing one is an
  // error). The folder must exist. Creates the temporary file (".<name>.XXXXXX" beside it).
  AtomicOutput(std::string path, bool force, const std::string& option);
  ~AtomicOutput();
  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;

  const std::string& path() const { return path_; }
  // Runs `write(temporary path)`; errors that name the temporary file name the user's path
  // instead. Then renames the temporary file to path().
  template <typename F>
  void write(F&& write_to) {
    try {
      write_to(temp_);
    } catch (const std::exception& e) {
      fail(e);
    }
    commit();
  }

 private:
  [[noreturn]] void fail(const std::exception& e) const;
  void commit();
  std::string path_, temp_, option_;
  bool committed_ = false;
  struct Guard;
  std::unique_ptr<Guard> guard_;  // removal on a signal
};

}  // namespace fp8moe::cli

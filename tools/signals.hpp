// Ctrl-C (SIGINT) and SIGTERM for the CLI, so that no command leaves half-written files behind.
//
// main() blocks both signals before any thread starts (every thread inherits the mask) and a
// watcher thread takes them with sigwait, outside any signal handler, so that it may lock and
// remove files. What it does with one:
//  - inside a CooperativeStop scope (convert): the first signal only sets stop_flag(); the command
//    polls it, stops, removes its partial output and throws Interrupted; a second signal ends the
//    process at once;
//  - otherwise: it removes the paths registered with CleanupOnSignal (a temporary output file, the
//    demo's temporary folder) and ends the process.
// Either way the exit status is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
#pragma once

#include <atomic>
#include <string>

#include "fp8moe/error.hpp"

namespace fp8moe::cli {

void install_signal_watch();  // once, in main(), before any other thread exists

const std::atomic<bool>& stop_flag();  // set by the first signal inside a CooperativeStop scope
int stop_signal();                     // that signal's number, 0 if none
const char* signal_name(int sig);      // "SIGINT", "SIGTERM"

// The command was stopped by a signal; main() prints the message and exits 128 + signal.
class Interrupted : public Error {
 public:
  Interrupted(int sig, const std::string& message) : Error(message), sig_(sig) {}
  int signal() const { return sig_; }

 private:
  int sig_;
};

// While one lives, the first signal is left to the command (see above).
class CooperativeStop {
 public:
  CooperativeStop();
  ~CooperativeStop();
  CooperativeStop(const CooperativeStop&) = delete;
  CooperativeStop& operator=(const CooperativeStop&) = delete;
};

// Registers `path` (a file or a folder, removed recursively) for removal when a signal ends the
// process, until release() or destruction.
class CleanupOnSignal {
 public:
  explicit CleanupOnSignal(std::string path);
  ~CleanupOnSignal() { release(); }
  void release();
  CleanupOnSignal(const CleanupOnSignal&) = delete;
  CleanupOnSignal& operator=(const CleanupOnSignal&) = delete;

 private:
  std::string path_;
  bool active_ = true;
};

}  // namespace fp8moe::cli

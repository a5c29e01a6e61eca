// The CLI's signal watcher (signals.hpp).
#include "signals.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>

namespace fp8moe::cli {
namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};
std::atomic<int> g_cooperative{0};
std::mutex g_mu;
std::multiset<std::string> g_cleanup;  // guarded by g_mu

// write(2) only: the watcher may run while another thread holds stdio's locks.
void say(const std::string& s) { [[maybe_unused]] const ssize_t n = ::write(2, s.data(), s.size()); }

[[noreturn]] void end_now(int sig) {
  {
    std::lock_guard<std::mutex> lk(g_mu);
    for (const std::string& p : g_cleanup) {
      std::error_code ec;
      // Another thread may still be writing into a folder: a few tries.
      for (int i = 0; i < 3 && std::filesystem::exists(p, ec); ++i) std::filesystem::remove_all(p, ec);
      say(std::filesystem::exists(p, ec) ? "fp8moe: could not remove " + p + "\n" : "fp8moe: removed " + p + "\n");
    }
  }
  ::_exit(128 + sig);
}

void watch(sigset_t set) {
  for (;;) {
    int sig = 0;
    if (::sigwait(&set, &sig) != 0) continue;
    if (g_cooperative.load() > 0 && !g_stop.load()) {
      g_signal = sig;
      g_stop = true;
      say(std::string("\nfp8moe: ") + signal_name(sig) + ": stopping and removing the partial output (again to quit at once)\n");
      continue;
    }
    say(std::string("\nfp8moe: ") + signal_name(sig) + ": stopped\n");
    end_now(sig);
  }
}

}  // namespace

void install_signal_watch() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread(watch, set).detach();
}

const std::atomic<bool>& stop_flag() { return g_stop; }
int stop_signal() { return g_signal.load(); }

const char* signal_name(int sig) {
  switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    default: return "signal";
  }
}

CooperativeStop::CooperativeStop() { ++g_cooperative; }
CooperativeStop::~CooperativeStop() { --g_cooperative; }

CleanupOnSignal::CleanupOnSignal(std::string path) : path_(std::move(path)) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_cleanup.insert(path_);
}

void CleanupOnSignal::release() {
  if (!active_) return;
  active_ = false;
  std::lock_guard<std::mutex> lk(g_mu);
  const auto it = g_cleanup.find(path_);
  if (it != g_cleanup.end()) g_cleanup.erase(it);
}

}  // namespace fp8moe::cli

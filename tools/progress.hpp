// Progress of long CLI work on stderr: bytes done of the total, MB/s and the time left. On a
// terminal a bar redrawn in place (at most ten times a second); otherwise (a log, a pipe) one
// line every few seconds. Notes (a file finished) print on their own line above the bar.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace fp8moe::cli {

inline std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return buf;
}

// "1.2 GiB" / "340.0 MiB"
inline std::string human(uint64_t bytes) {
  char buf[32];
  if (bytes >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1ull << 20));
  return buf;
}

// "1:02:03", "4:05", "7 s"
inline std::string duration(double s) {
  char buf[32];
  const auto t = static_cast<long long>(std::llround(s));
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%lld:%02lld", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lld s", t);
  return buf;
}

class ProgressMeter {
 public:
  ProgressMeter(std::string what, bool tty) : what_(std::move(what)), tty_(tty) {}

  // `seconds` since the work started; `item`: what is being worked on (a file name).
  void update(uint64_t done, uint64_t total, double seconds, const std::string& item) {
    const double every = tty_ ? 0.1 : 5.0;
    if (seconds - last_ < every && done < total) return;
    last_ = seconds;
    const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0.0;  // bytes / s
    const double frac = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    std::string eta = rate > 0 && done < total ? duration(static_cast<double>(total - done) / rate) : "-";
    char buf[256];
    if (tty_) {
      constexpr int kWidth = 30;
      const int fill = static_cast<int>(frac * kWidth);
      std::string bar(static_cast<size_t>(fill), '#');
      bar.append(static_cast<size_t>(kWidth - fill), '.');
      std::snprintf(buf, sizeof buf, "\r\033[K%s [%s] %3.0f%%  %s / %s  %.0f MB/s  ETA %s  %s", what_.c_str(), bar.c_str(),
                    100 * frac, human(done).c_str(), human(total).c_str(), rate / 1e6, eta.c_str(), item.c_str());
      drawn_ = true;
    } else {
      std::snprintf(buf, sizeof buf, "%s: %3.0f%%  %s of %s, %.0f MB/s, ETA %s (%s)\n", what_.c_str(), 100 * frac,
                    human(done).c_str(), human(total).c_str(), rate / 1e6, eta.c_str(), item.c_str());
    }
    std::fputs(buf, stderr);
    std::fflush(stderr);
  }
  // A line of its own ("[2/4] wrote ...").
  void note(const std::string& line) {
    clear();
    std::fprintf(stderr, "%s: %s\n", what_.c_str(), line.c_str());
    if (tty_) last_ = -1e9;  // redraw the bar right away
  }
  // Ends the bar line, if one is drawn.
  void finish() {
    if (drawn_) std::fputs("\n", stderr);
    drawn_ = false;
  }

 private:
  void clear() {
    if (drawn_) std::fputs("\r\033[K", stderr);
    drawn_ = false;
  }
  std::string what_;
  bool tty_;
  bool drawn_ = false;
  double last_ = -1e9;
};

}  // namespace fp8moe::cli

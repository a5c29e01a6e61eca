// fp8moe bench --convert: the converter's throughput on a page-cached synthetic checkpoint.
//
// A Qwen3-MoE-shaped BF16 checkpoint (H 2048, I 768, the experts of Qwen3-30B-A3B) of about
// --mib MiB in two shards is written, read once so that the page cache holds it, then converted
// BF16 -> FP8 per channel, back to BF16, BF16 -> FP8 in 128x128 blocks, and back. Each line gives
// the input bytes over the wall time of the whole convert call (planning, the threads' work, the
// writes and the final fsync of every output file), with the machine it ran on, and the CPU time
// the call used: well below threads x wall time means the disk (the fsync) set the pace, not the
// cores. Dirty pages are flushed (sync) before each step so that one step's writeback does not
// land in the next one's time.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <optional>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/convert.hpp"
#include "fp8moe/synthetic.hpp"
#include "progress.hpp"
#include "signals.hpp"

namespace fs = std::filesystem;

namespace fp8moe::cli {

namespace {

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      return c == std::string::npos ? line : line.substr(c + 2);
    }
  return "unknown CPU";
}

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Reads every file under `dir` once, so that the conversions read from the page cache.
uint64_t read_all(const fs::path& dir) {
  uint64_t total = 0;
  std::vector<char> buf(8 << 20);
  for (const fs::directory_entry& de : fs::recursive_directory_iterator(dir)) {
    if (!de.is_regular_file()) continue;
    const int fd = ::open(de.path().c_str(), O_RDONLY | O_CLOEXEC);
    FP8MOE_CHECK(fd >= 0, "bench --convert: cannot read ", de.path().string());
    for (ssize_t n; (n = ::read(fd, buf.data(), buf.size())) > 0;) total += static_cast<uint64_t>(n);
    ::close(fd);
  }
  return total;
}

}  // namespace

int run_convert_bench(const Args& args) {
  for (const char* o : {"shape", "tokens", "routing", "json", "backend", "reps", "warmup", "seed"})
    FP8MOE_USAGE_CHECK(!args.has(o), "--", o, " applies to the kernel benchmark, not to bench --convert");
  const int64_t target_mib = args.get_int("mib", 2048);
  FP8MOE_USAGE_CHECK(target_mib >= 64 && target_mib <= (1 << 20), "--mib: expected 64 to 1048576, found ", target_mib);
  const int64_t threads = args.get_int("threads", 0);
  FP8MOE_USAGE_CHECK(threads >= 0 && threads <= 1024, "--threads: expected 0 (one per core) to 1024, found ", threads);

  fs::path work;
  std::optional<CleanupOnSignal> cleanup;
  const bool temporary = !args.has("workdir");
  if (temporary) {
    std::string tmpl = (fs::temp_directory_path() / "fp8moe-bench-convert-XXXXXX").string();
    FP8MOE_CHECK(::mkdtemp(tmpl.data()) != nullptr, "bench --convert: cannot create a temporary directory from ", tmpl);
    work = tmpl;
    cleanup.emplace(work.string());
  } else {
    work = *args.get("workdir");
    FP8MOE_CHECK(!fs::exists(work) || (fs::is_directory(work) && fs::is_empty(work)), "--workdir ", work.string(),
                 " must be absent or an empty directory");
    fs::create_directories(work);
  }
  struct Remove {
    fs::path p;
    bool on;
    ~Remove() {
      std::error_code ec;
      if (on) fs::remove_all(p, ec);
    }
  } remove{work, temporary};

  // Qwen3-30B-A3B's expert shapes; the expert count sets the size (9 MiB of BF16 per expert).
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();
  spec.hidden = 2048;
  spec.moe_intermediate = 768;
  spec.top_k = 8;
  spec.layers = std::max<int64_t>(1, (target_mib + 1151) / 1152);  // at most 128 experts a layer
  spec.experts = std::max<int64_t>(8, target_mib / 9 / spec.layers);
  spec.vocab = 4096;
  spec.shards = 2;
  spec.seed = 1;
  const fs::path bf16 = work / "bf16";
  std::fprintf(stderr, "bench --convert: writing a synthetic BF16 checkpoint (%lld layers x %lld experts) to %s\n",
               static_cast<long long>(spec.layers), static_cast<long long>(spec.experts), bf16.string().c_str());
  const SyntheticInfo info = write_synthetic_checkpoint(bf16.string(), spec);
  read_all(bf16);

  const unsigned cores = std::thread::hardware_concurrency();
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("fp8moe %s bench --convert, %s\nmachine: %u cores (nproc), %s\ninput: synthetic Qwen3-MoE-shaped BF16 "
              "checkpoint, H 2048, I 768, %lld layers x %lld experts, 2 shards, %s, page-cached\n",
              version(), date, cores, cpu_model().c_str(), static_cast<long long>(spec.layers),
              static_cast<long long>(spec.experts), human(info.bytes).c_str());

  const CooperativeStop cooperative;
  struct Step {
    const char* what;
    fs::path from, to;
    ConvertTarget target;
    ScaleKind scheme;
  };
  const std::vector<Step> steps = {
      {"bf16 -> fp8 channel  ", bf16, work / "fp8-channel", ConvertTarget::FP8, ScaleKind::Channel},
      {"fp8 channel -> bf16  ", work / "fp8-channel", work / "bf16-from-channel", ConvertTarget::BF16, ScaleKind::Channel},
      {"bf16 -> fp8 block 128", bf16, work / "fp8-block", ConvertTarget::FP8, ScaleKind::Block},
      {"fp8 block -> bf16    ", work / "fp8-block", work / "bf16-from-block", ConvertTarget::BF16, ScaleKind::Channel},
  };
  for (const Step& s : steps) {
    ConvertOptions opt;
    opt.to = s.target;
    opt.scheme = s.scheme;
    opt.threads = static_cast<int>(threads);
    opt.cancel = &stop_flag();
    ConvertReport r;
    ::sync();
    const double cpu0 = cpu_seconds();
    try {
      r = convert_checkpoint(s.from.string(), s.to.string(), opt);
    } catch (const ConvertCancelled&) {
      throw Interrupted(stop_signal(), std::string("interrupted by ") + signal_name(stop_signal()));
    }
    const double cpu = cpu_seconds() - cpu0;
    std::printf("  %s  %10s in %6.2f s  %6.0f MB/s of input  (%s out; %d threads; %.2f s CPU = %.0f%% of them, %.0f MB/s "
                "per CPU second)\n",
                s.what, human(r.bytes_in).c_str(), r.seconds, static_cast<double>(r.bytes_in) / 1e6 / r.seconds,
                human(r.bytes_out).c_str(), r.threads, cpu, 100.0 * cpu / (r.seconds * r.threads),
                static_cast<double>(r.bytes_in) / 1e6 / cpu);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace fp8moe::cli

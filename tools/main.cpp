// fp8moe CLI: dispatches to the registered subcommands (tools/<name>.cpp). Errors become a
// message on stderr and an exit status, never a crash:
//   0 success; 1 a failure while running; 2 a usage error (the command line cannot be run as
//   given); 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
// Error messages are the message alone; `--debug` (anywhere on the command line) or
// FP8MOE_DEBUG=1 adds where the check failed ("[check failed: cond] (file:line)").
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/error.hpp"
#include "signals.hpp"

#ifndef FP8MOE_VERSION
#error "FP8MOE_VERSION must be defined by the build (CMakeLists.txt: project VERSION)"
#endif

namespace fp8moe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}
const char* version() { return FP8MOE_VERSION; }
}  // namespace fp8moe::cli

static void usage(FILE* f) {
  auto cmds = fp8moe::cli::registry();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return std::string(a.name) < b.name; });
  std::fprintf(f,
               "usage: fp8moe <command> [args...]   (fp8moe <command> --help for details)\n"
               "       fp8moe --version\n\ncommands:\n");
  for (const auto& c : cmds) std::fprintf(f, "  %-10s %s\n", c.name, c.summary);
  std::fprintf(f,
               "\n--debug (or FP8MOE_DEBUG=1) adds to error messages where the failed check is in the source.\n"
               "Exit status: 0 ok, 1 failure, 2 usage error, 128+N stopped by signal N.\n");
}

static bool debug_from_env() {
  const char* v = std::getenv("FP8MOE_DEBUG");
  return v && *v && std::strcmp(v, "0") != 0;
}

int main(int argc, char** argv) {
  fp8moe::cli::install_signal_watch();
  std::vector<std::string> args(argv + 1, argv + argc);
  bool debug = debug_from_env();
  for (auto it = args.begin(); it != args.end();)
    if (*it == "--debug") {
      debug = true;
      it = args.erase(it);
    } else {
      ++it;
    }
  if (args.empty()) {
    usage(stderr);
    return 2;
  }
  const std::string name = args[0];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  if (name == "--version" || name == "-V" || name == "version") {
    std::printf("fp8moe %s\n", fp8moe::cli::version());
    return 0;
  }
  for (const auto& c : fp8moe::cli::registry()) {
    if (name != c.name) continue;
    try {
      return c.run(std::vector<std::string>(args.begin() + 1, args.end()));
    } catch (const fp8moe::cli::UsageError& e) {
      std::fprintf(stderr, "fp8moe %s: error: %s\n(fp8moe %s --help prints the usage)\n", c.name, e.message().c_str(),
                   c.name);
      return 2;
    } catch (const fp8moe::cli::Interrupted& e) {
      std::fprintf(stderr, "fp8moe %s: %s\n", c.name, e.message().c_str());
      return 128 + e.signal();
    } catch (const fp8moe::Error& e) {
      std::fprintf(stderr, "fp8moe %s: error: %s%s\n", c.name, e.message().c_str(), debug ? e.internals().c_str() : "");
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fp8moe %s: error: %s\n", c.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "fp8moe: unknown command '%s'\n", name.c_str());
  usage(stderr);
  return 2;
}

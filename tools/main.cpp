// fp8moe CLI: dispatches to the registered subcommands (tools/<name>.cpp). Errors become a
// message on stderr and exit status 1, never a crash.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "command.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe::cli {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}
}  // namespace fp8moe::cli

static void usage(FILE* f) {
  auto cmds = fp8moe::cli::registry();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return std::string(a.name) < b.name; });
  std::fprintf(f, "usage: fp8moe <command> [args...]   (fp8moe <command> --help for details)\n\ncommands:\n");
  for (const auto& c : cmds) std::fprintf(f, "  %-10s %s\n", c.name, c.summary);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  for (const auto& c : fp8moe::cli::registry()) {
    if (name != c.name) continue;
    try {
      return c.run(std::vector<std::string>(argv + 2, argv + argc));
    } catch (const fp8moe::Error& e) {
      std::fprintf(stderr, "fp8moe %s: error: %s\n", c.name, e.what());
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

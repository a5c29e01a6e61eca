// Subcommands of the `fp8moe` CLI register themselves here, one file per subcommand, so that
// main.cpp stays a dispatcher with no logic of its own.
#pragma once

#include <string>
#include <vector>

namespace fp8moe::cli {

struct Command {
  const char* name;
  const char* summary;  // one line for `fp8moe --help`
  int (*run)(const std::vector<std::string>& args);  // args after the subcommand name
};

std::vector<Command>& registry();

// The fp8moe version (CMakeLists.txt's project VERSION), printed by --version and in --json reports.
const char* version();

struct Register {
  explicit Register(Command c) { registry().push_back(c); }
};

}  // namespace fp8moe::cli

// FP8MOE_COMMAND(inspect, "summary", run_inspect);
#define FP8MOE_COMMAND(name, summary, fn) \
  static ::fp8moe::cli::Register fp8moe_register_##name({#name, summary, fn})

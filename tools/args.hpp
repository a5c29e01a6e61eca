// Argument parsing shared by the subcommands: positional arguments, "--name value" (or
// "--name=value") options and "--name" switches, each declared up front so that a typo is an
// error naming the valid options instead of being ignored. Every complaint about the command line
// is a UsageError: exit status 2, where a failure while running exits 1 (main.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fp8moe/error.hpp"

namespace fp8moe::cli {

// The command line cannot be run as given: unknown option, missing or malformed value, wrong
// number of arguments. main() prints it with a pointer to --help and exits 2.
class UsageError : public Error {
 public:
  using Error::Error;
};

}  // namespace fp8moe::cli

// FP8MOE_USAGE_CHECK(cond, "--block: expected ...", value): throws UsageError when cond is false.
#define FP8MOE_USAGE_CHECK(cond, ...) \
  do {                                \
    if (!(cond)) throw ::fp8moe::cli::UsageError(::fp8moe::detail::concat(__VA_ARGS__)); \
  } while (0)
#define FP8MOE_USAGE_FAIL(...) throw ::fp8moe::cli::UsageError(::fp8moe::detail::concat(__VA_ARGS__))

namespace fp8moe::cli {

class Args {
 public:
  // `options` take a value, `switches` do not. "--help" / "-h" is always accepted.
  Args(const std::vector<std::string>& argv, std::set<std::string> options, std::set<std::string> switches = {})
      : options_(std::move(options)), switches_(std::move(switches)) {
    for (size_t i = 0; i < argv.size(); ++i) {
      const std::string& a = argv[i];
      if (a == "--help" || a == "-h") {
        help_ = true;
        continue;
      }
      if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
        positional_.push_back(a);
        continue;
      }
      const size_t eq = a.find('=');
      const std::string name = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      if (switches_.count(name)) {
        FP8MOE_USAGE_CHECK(eq == std::string::npos, "option --", name, " takes no value, found '", a, "'");
        values_[name] = "";
      } else if (options_.count(name)) {
        if (eq != std::string::npos) {
          values_[name] = a.substr(eq + 1);
        } else {
          FP8MOE_USAGE_CHECK(i + 1 < argv.size(), "option --", name, " needs a value");
          values_[name] = argv[++i];
        }
      } else {
        FP8MOE_USAGE_FAIL("unknown option '", a, "'; valid options: ", valid());
      }
    }
  }

  bool help() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  std::optional<std::string> get(const std::string& name) const {
    auto it = values_.find(name);
    return it == values_.end() ? std::nullopt : std::optional<std::string>(it->second);
  }
  std::string get_or(const std::string& name, const std::string& fallback) const { return get(name).value_or(fallback); }
  std::string required(const std::string& name) const {
    auto v = get(name);
    FP8MOE_USAGE_CHECK(v.has_value(), "missing required option --", name);
    return *v;
  }
  int64_t get_int(const std::string& name, int64_t fallback) const {
    auto v = get(name);
    if (!v) return fallback;
    size_t used = 0;
    int64_t x = 0;
    try {
      x = std::stoll(*v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    FP8MOE_USAGE_CHECK(used == v->size() && !v->empty(), "option --", name, ": expected an integer, found '", *v, "'");
    return x;
  }
  uint64_t get_u64(const std::string& name, uint64_t fallback) const {
    auto v = get(name);
    if (!v) return fallback;
    size_t used = 0;
    uint64_t x = 0;
    try {
      x = std::stoull(*v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    FP8MOE_USAGE_CHECK(used == v->size() && !v->empty() && (*v)[0] != '-', "option --", name,
                 ": expected a non-negative integer, found '", *v, "'");
    return x;
  }
  // Throws unless exactly `n` positional arguments were given; `what` names them for the message.
  void expect_positional(size_t n, const char* what) const {
    FP8MOE_USAGE_CHECK(positional_.size() == n, "expected ", n, " positional argument", n == 1 ? "" : "s", " (", what,
                 "), found ", positional_.size());
  }

 private:
  std::string valid() const {
    std::string s;
    for (const auto& o : options_) s += (s.empty() ? "--" : ", --") + o + " VALUE";
    for (const auto& o : switches_) s += (s.empty() ? "--" : ", --") + o;
    return s.empty() ? "none" : s;
  }
  std::set<std::string> options_, switches_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
  bool help_ = false;
};

}  // namespace fp8moe::cli

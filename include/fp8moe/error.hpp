// One error type for the whole library, and the check macros that build its messages.
//
// Every failure names where it happened (file:line), what was checked, and the values involved;
// loader errors additionally name the file and tensor (the caller puts those in the message).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fp8moe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace fp8moe

// FP8MOE_FAIL("tensor ", name, ": expected ", a, ", found ", b)
#define FP8MOE_FAIL(...) ::fp8moe::detail::throw_error(__FILE__, __LINE__, ::fp8moe::detail::concat(__VA_ARGS__))

// FP8MOE_CHECK(cond, "context ", value, ...): throws with the condition text when cond is false.
#define FP8MOE_CHECK(cond, ...)                                                                   \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      ::fp8moe::detail::throw_error(__FILE__, __LINE__,                                           \
                                    ::fp8moe::detail::concat(__VA_ARGS__, " [check failed: " #cond "]")); \
  } while (0)

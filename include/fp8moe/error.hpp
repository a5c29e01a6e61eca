// One error type for the whole library, and the check macros that build its messages.
//
// Every failure names where it happened (file:line), what was checked, and the values involved;
// loader errors additionally name the file and tensor (the caller puts those in the message).
// The two parts are kept apart: message() is what a user reads, internals() the
// " [check failed: cond] (file:line)" a developer wants; what() is both, in that order.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fp8moe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message), message_(message) {}
  Error(const std::string& message, const std::string& internals)
      : std::runtime_error(message + internals), message_(message), internals_(internals) {}
  const std::string& message() const { return message_; }
  const std::string& internals() const { return internals_; }  // "" or " [check failed: c] (f:l)"

 private:
  std::string message_, internals_;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
// `cond`: the failed condition's text, or nullptr for FP8MOE_FAIL.
[[noreturn]] void throw_error(const char* file, int line, const char* cond, const std::string& msg);
}  // namespace detail

}  // namespace fp8moe

// FP8MOE_FAIL("tensor ", name, ": expected ", a, ", found ", b)
#define FP8MOE_FAIL(...) ::fp8moe::detail::throw_error(__FILE__, __LINE__, nullptr, ::fp8moe::detail::concat(__VA_ARGS__))

// FP8MOE_CHECK(cond, "context ", value, ...): throws with the condition text when cond is false.
#define FP8MOE_CHECK(cond, ...)                                                                           \
  do {                                                                                                    \
    if (!(cond)) ::fp8moe::detail::throw_error(__FILE__, __LINE__, #cond, ::fp8moe::detail::concat(__VA_ARGS__)); \
  } while (0)

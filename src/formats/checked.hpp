// Overflow-checked size arithmetic: the one place where a product or sum of sizes that came from
// a file (tensor shapes, byte offsets, config.json counts) is computed. A result that does not fit
// its type is an fp8moe::Error naming what was being computed and the operands, never a wrapped
// value or undefined behaviour (signed overflow).
//
// The message parts come last, as in FP8MOE_FAIL, and are formatted only on failure; a part that
// is costly to build (a shape string) can be passed as a callable, called only then. So a call
// costs one overflow-checking instruction on the happy path. The parts say what is computed; the
// helper appends " overflows 64 bits (operands, as int64)":
//     const int64_t bytes = checked::mul(rows, cols, "tensor ", name, ": rows x cols");
//     const int64_t n = checked::product<int64_t>(dims, "element count of ", [&] { return s.str(); });
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "fp8moe/error.hpp"

namespace fp8moe::checked {

namespace detail {
template <typename T>
std::string type_name() {
  return std::string(std::is_signed_v<T> ? "int" : "uint") + std::to_string(8 * sizeof(T));
}
// A message part as it is streamed: a callable's result, anything else as it is.
template <typename P>
decltype(auto) part(const P& p) {
  if constexpr (std::is_invocable_v<const P&>)
    return p();
  else
    return (p);
}
}  // namespace detail

// a * b.
template <typename T, typename... What>
T mul(T a, std::type_identity_t<T> b, const What&... what) {
  static_assert(std::is_integral_v<T>, "checked::mul is for integer sizes");
  T r;
  if (__builtin_mul_overflow(a, b, &r))
    FP8MOE_FAIL(detail::part(what)..., " overflows ", 8 * sizeof(T), " bits (", +a, " x ", +b, ", as ", detail::type_name<T>(), ")");
  return r;
}

// a + b.
template <typename T, typename... What>
T add(T a, std::type_identity_t<T> b, const What&... what) {
  static_assert(std::is_integral_v<T>, "checked::add is for integer sizes");
  T r;
  if (__builtin_add_overflow(a, b, &r))
    FP8MOE_FAIL(detail::part(what)..., " overflows ", 8 * sizeof(T), " bits (", +a, " + ", +b, ", as ", detail::type_name<T>(), ")");
  return r;
}

// The product of every element of `dims` (1 when empty), in T, multiplied left to right as the
// safetensors reference reader does: [2^62, 2^62, 0] overflows before the zero is reached.
template <typename T, typename Range, typename... What>
T product(const Range& dims, const What&... what) {
  static_assert(std::is_integral_v<T>, "checked::product is for integer sizes");
  T r = 1;
  for (const auto& d : dims) {
    if (std::in_range<T>(d) && !__builtin_mul_overflow(r, static_cast<T>(d), &r)) continue;
    std::ostringstream factors;
    for (const auto& f : dims) factors << (factors.tellp() > 0 ? " x " : "") << +f;
    FP8MOE_FAIL(detail::part(what)..., " overflows ", 8 * sizeof(T), " bits (", factors.str(), ", as ", detail::type_name<T>(), ")");
  }
  return r;
}

// `v` as int64, when it fits (sizes read as u64 from a file).
template <typename... What>
int64_t to_i64(uint64_t v, const What&... what) {
  if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) FP8MOE_FAIL(detail::part(what)..., " (", v, ") exceeds int64");
  return static_cast<int64_t>(v);
}

}  // namespace fp8moe::checked

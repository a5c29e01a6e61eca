#include "fp8moe/error.hpp"

#include <cstring>

namespace fp8moe::detail {

[[noreturn]] void throw_error(const char* file, int line, const char* cond, const std::string& msg) {
  // Keep only the path below the repository's src/ or include/ so messages stay short.
  const char* short_file = file;
  for (const char* anchor : {"/src/", "/include/", "/tools/", "/tests/"}) {
    if (const char* p = std::strstr(file, anchor)) { short_file = p + 1; break; }
  }
  std::string internals = cond ? std::string(" [check failed: ") + cond + "]" : std::string();
  internals += " (" + std::string(short_file) + ":" + std::to_string(line) + ")";
  throw Error(msg, internals);
}

}  // namespace fp8moe::detail

// JSON text from a file, parsed with a nesting limit. nlohmann's parser is iterative, but
// dump() - which error messages use to show the value they refuse - recurses once per level:
// a config.json of 100,000 '[' would overflow the stack while its error is being written.
// Well-formed model configs nest a handful of levels.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "fp8moe/error.hpp"

namespace fp8moe {

constexpr int kMaxJsonDepth = 128;  // serde_json's recursion limit, as the safetensors reader uses

// json::parse of `text`; throws naming `where` for invalid JSON and for nesting deeper than
// kMaxJsonDepth.
inline nlohmann::json parse_json_bounded(std::string_view text, const std::string& where) {
  auto depth_limit = [&where](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > kMaxJsonDepth) FP8MOE_FAIL(where, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
    return true;
  };
  try {
    return nlohmann::json::parse(text.data(), text.data() + text.size(), depth_limit);
  } catch (const nlohmann::json::exception& e) {
    FP8MOE_FAIL(where, ": not valid JSON: ", e.what());
  }
}

}  // namespace fp8moe

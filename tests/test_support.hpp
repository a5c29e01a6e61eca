// What every test file shares: fresh random seeds (every run draws new inputs; print the seed with
// SCOPED_TRACE so a failure can be replayed), the check that a call throws fp8moe::Error with
// a message naming what is wrong (each part must appear, so the test proves the RIGHT check fired),
// and a one-occurrence text edit for tests that mutate config files.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/error.hpp"

namespace fp8moe::test {

// FP8MOE_TEST_SEED replays a seed a failure printed.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("FP8MOE_TEST_SEED"); s != nullptr && *s != '\0') return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

template <typename F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "expected an fp8moe::Error containing \"" << parts.front() << "\", nothing was thrown";
  } catch (const Error& e) {
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "missing \"" << p << "\" in: " << e.what();
  }
}

// Replaces the one occurrence of `from` in `text` (config-editing tests); fails the test when
// `from` is absent, so an edit that no longer applies cannot pass silently.
inline void replace_once(std::string& text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  ASSERT_NE(at, std::string::npos) << from;
  text.replace(at, from.size(), to);
}

}  // namespace fp8moe::test

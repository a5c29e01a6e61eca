// What every test file shares: fresh random seeds (every run draws new inputs; print the seed with
// SCOPED_TRACE so a failure can be replayed), and the check that a call throws fp8moe::Error with
// a message naming what is wrong (each part must appear, so the test proves the RIGHT check fired).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/error.hpp"

namespace fp8moe::test {

inline uint64_t fresh_seed() {
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

}  // namespace fp8moe::test

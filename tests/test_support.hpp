// What every test file shares: the check that a call throws fp8moe::Error with a message naming
// what is wrong (each part must appear in the message, so the test proves the RIGHT check fired).
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "fp8moe/error.hpp"

namespace fp8moe::test {

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

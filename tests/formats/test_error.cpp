// fp8moe::Error keeps what a user reads (message) apart from where the check sits (internals):
// the CLI prints the message alone unless asked for the internals (--debug), and what() keeps
// both for everything else.
#include <gtest/gtest.h>

#include <string>

#include "fp8moe/error.hpp"

namespace fp8moe {
namespace {

TEST(Error, CheckKeepsTheMessageApartFromTheInternals) {
  const int found = 3;
  try {
    FP8MOE_CHECK(found == 4, "tensor x: expected 4 experts, found ", found);
    FAIL() << "nothing thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "tensor x: expected 4 experts, found 3");
    EXPECT_EQ(e.internals().rfind(" [check failed: found == 4] (tests/formats/test_error.cpp:", 0), 0u) << e.internals();
    EXPECT_EQ(e.internals().back(), ')');
    EXPECT_EQ(std::string(e.what()), e.message() + e.internals());
  }
}

TEST(Error, FailHasALocationButNoCondition) {
  try {
    FP8MOE_FAIL("no such file '", "a.json", "'");
    FAIL() << "nothing thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "no such file 'a.json'");
    EXPECT_EQ(e.internals().rfind(" (tests/formats/test_error.cpp:", 0), 0u) << e.internals();
    EXPECT_EQ(std::string(e.what()), e.message() + e.internals());
  }
}

TEST(Error, PlainErrorsHaveNoInternals) {
  const Error e("just a message");
  EXPECT_EQ(e.message(), "just a message");
  EXPECT_EQ(e.internals(), "");
  EXPECT_STREQ(e.what(), "just a message");
}

}  // namespace
}  // namespace fp8moe

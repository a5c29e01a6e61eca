// Overflow-checked size arithmetic (src/formats/checked.hpp) and the size computations built on
// it: Shape::numel, the Tensor allocation size, the ScaleSpec grid.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "formats/checked.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;

namespace fp8moe {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

TEST(Checked, ResultsThatFitAreExact) {
  EXPECT_EQ(checked::mul<int64_t>(3037000499, 3037000499, "x"), int64_t{9223372030926249001});
  EXPECT_EQ(checked::add<int64_t>(kMax - 1, 1, "x"), kMax);
  EXPECT_EQ(checked::mul<uint64_t>(uint64_t{1} << 32, uint64_t{1} << 31, "x"), uint64_t{1} << 63);
  EXPECT_EQ(checked::product<int64_t>(std::vector<int64_t>{}, "x"), 1);
  EXPECT_EQ(checked::product<int64_t>(std::vector<int64_t>{2, 0, kMax}, "x"), 0);  // zero before the overflow
  EXPECT_EQ(checked::to_i64(uint64_t{1} << 62, "x"), int64_t{1} << 62);
}

TEST(Checked, OverflowIsAnErrorNamingWhatAndTheOperands) {
  expect_error([] { checked::mul<int64_t>(kMax, 48, "field n_shared_experts x moe_intermediate_size"); },
               {"field n_shared_experts x moe_intermediate_size overflows 64 bits", "9223372036854775807 x 48",
                "as int64"});
  expect_error([] { checked::add<int64_t>(kMax, 1, "offset"); }, {"offset overflows 64 bits", "as int64"});
  expect_error([] { checked::mul<uint64_t>(uint64_t{1} << 32, uint64_t{1} << 32, "bits"); },
               {"bits overflows 64 bits", "4294967296 x 4294967296", "as uint64"});
  // Left to right, as the safetensors reference reader multiplies: the zero comes too late.
  expect_error([] { checked::product<uint64_t>(std::vector<uint64_t>{1ull << 62, 1ull << 62, 0}, "tensor 'a'"); },
               {"tensor 'a' overflows 64 bits", "4611686018427387904 x 4611686018427387904 x 0"});
  expect_error([] { checked::product<int64_t>(std::vector<uint64_t>{1ull << 63}, "dims"); }, {"dims overflows"});
  expect_error([] { checked::to_i64(uint64_t{1} << 63, "tensor 'b': byte size"); },
               {"tensor 'b': byte size (9223372036854775808) exceeds int64"});
}

TEST(Checked, MessagePartsMayBeBuiltOnlyOnFailure) {
  int built = 0;
  auto costly = [&] { return ++built, std::string("[shape]"); };
  checked::mul<int64_t>(2, 3, "numel of ", costly);
  EXPECT_EQ(built, 0);
  expect_error([&] { checked::mul<int64_t>(kMax, 2, "numel of ", costly); }, {"numel of [shape] overflows"});
  EXPECT_EQ(built, 1);
}

TEST(Checked, ShapeAndTensorSizesCannotOverflow) {
  const Shape big{int64_t{1} << 32, int64_t{1} << 32};
  expect_error([&] { (void)big.numel(); }, {"the element count of shape [4294967296, 4294967296] overflows 64 bits"});
  expect_error([] { Tensor(DType::F32, Shape{int64_t{1} << 61, 2}); },
               {"the byte size of a F32 tensor of shape [2305843009213693952, 2] overflows 64 bits",
                "4611686018427387904 x 4"});
  EXPECT_EQ((Shape{int64_t{1} << 62, 0, 7}).numel(), 0);
}

TEST(Checked, ScaleGridsCannotOverflow) {
  expect_error([] { ScaleSpec::block(kMax - 5, 128, 128, 128).validate("w"); },
               {"w: scale spec block 128x128", "rows + block height overflows"});
  expect_error([] { ScaleSpec::block(128, 128, 128, kMax).validate("w"); }, {"cols + block width overflows"});
  EXPECT_NO_THROW(ScaleSpec::block(4096, 4096, 128, 128).validate("w"));
}

}  // namespace
}  // namespace fp8moe

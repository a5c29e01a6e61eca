// Scale specs, quantize / dequantize / quantize_activations (src/formats/quant.cpp).
//
// The reference side is independent of quant.hpp's index arithmetic: each scheme's block map is
// built by enumerating blocks (segment by segment, edge blocks partial), scales are recomputed
// from that map, and every code is checked to be a nearest FP8 value of w / scale in double
// (within half an FP8 ulp, plus the fp32 division's own rounding).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/error.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/quant.hpp"
#include "test_support.hpp"

namespace fp8moe {
namespace {

// Which scale entry each element of one [N, K] matrix uses, by enumeration.
struct BlockMap {
  int64_t scale_rows = 0, grid_k = 0;
  std::vector<int64_t> row_of;  // [N]: scale row of matrix row n
  std::vector<int64_t> col_of;  // [K]: scale column of matrix column k
  int64_t id(int64_t n, int64_t k) const { return row_of[n] * grid_k + col_of[k]; }
};

// Rows split into `segments` equal parts, each tiled by `row_extent` from its own start;
// columns tiled by `col_extent` from 0. The last tile of each run is partial.
BlockMap enumerate_blocks(int64_t N, int64_t K, int64_t segments, int64_t row_extent, int64_t col_extent) {
  BlockMap m;
  m.row_of.assign(N, -1);
  m.col_of.assign(K, -1);
  const int64_t seg_rows = N / segments;
  for (int64_t seg = 0; seg < segments; ++seg)
    for (int64_t start = seg * seg_rows; start < (seg + 1) * seg_rows; start += row_extent, ++m.scale_rows)
      for (int64_t n = start; n < std::min(start + row_extent, (seg + 1) * seg_rows); ++n) m.row_of[n] = m.scale_rows;
  for (int64_t start = 0; start < K; start += col_extent, ++m.grid_k)
    for (int64_t k = start; k < std::min(start + col_extent, K); ++k) m.col_of[k] = m.grid_k;
  return m;
}

struct Scheme {
  std::string name;
  ScaleSpec spec;
  BlockMap map;
};

Scheme tensor_scheme(int64_t N, int64_t K, int64_t segments = 1) {
  return {"tensor/" + std::to_string(segments), ScaleSpec::tensor(N, K, segments),
          enumerate_blocks(N, K, segments, N / segments, K)};
}
Scheme channel_scheme(int64_t N, int64_t K) { return {"channel", ScaleSpec::channel(N, K), enumerate_blocks(N, K, 1, 1, K)}; }
Scheme block_scheme(int64_t N, int64_t K, int64_t bn, int64_t bk, int64_t segments = 1) {
  return {"block " + std::to_string(bn) + "x" + std::to_string(bk) + "/" + std::to_string(segments),
          ScaleSpec::block(N, K, bn, bk, segments), enumerate_blocks(N, K, segments, bn, bk)};
}
Scheme group_scheme(int64_t N, int64_t K, int64_t g) {
  return {"group " + std::to_string(g), ScaleSpec::group(N, K, g), enumerate_blocks(N, K, 1, 1, g)};
}

// Half an FP8 ulp at |y| (y in code units), the bound on |decode(code) - y| for a nearest code.
double half_fp8_ulp(double y, bool e5m2) {
  const int man = e5m2 ? 2 : 3, min_exp = e5m2 ? -14 : -6;
  const int e = y == 0 ? min_exp : std::max(std::ilogb(std::fabs(y)), min_exp);
  return std::ldexp(0.5, e - man);
}

// Exact round-to-nearest-even of x to bf16 (reference for dequantize's single rounding).
double ref_round_bf16(double x) {
  if (x == 0) return x;
  const int q = std::max(std::ilogb(std::fabs(x)), -126) - 7;
  return std::ldexp(std::nearbyint(std::ldexp(x, -q)), q);
}

// Random [E, N, K] weights of `dt`: normal values with a per-row magnitude spread of 2^+-6 so
// that blocks have very different scales, plus one all-zero block in expert 0 (chosen at random).
Tensor random_weights(std::mt19937& rng, int64_t E, int64_t N, int64_t K, DType dt, const BlockMap& map) {
  Tensor w(dt, {E, N, K});
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> spread(-6, 6);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n) {
      const double row_mag = std::exp2(spread(rng));
      for (int64_t k = 0; k < K; ++k) store_from_double(w.data(), dt, (e * N + n) * K + k, normal(rng) * row_mag);
    }
  const int64_t zn = std::uniform_int_distribution<int64_t>(0, N - 1)(rng);
  const int64_t zk = std::uniform_int_distribution<int64_t>(0, K - 1)(rng);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      if (map.id(n, k) == map.id(zn, zk)) store_from_double(w.data(), dt, n * K + k, 0.0);
  return w;
}

// Quantizes w with the scheme and checks everything against the enumerated block map.
void check_round_trip(const Scheme& s, const Tensor& w, DType fp8) {
  SCOPED_TRACE(s.name + " " + std::string(dtype_name(fp8)) + " from " + std::string(dtype_name(w.dtype())));
  const bool e5m2 = fp8 == DType::F8_E5M2;
  const double max_code = e5m2 ? 57344.0 : 448.0;
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  const BlockMap& map = s.map;

  const QuantWeights q = quantize(w, s.spec, fp8);
  const QuantTensor qt = q.view();
  ASSERT_NO_THROW(qt.validate("quantized weight"));
  ASSERT_EQ(q.data.dtype(), fp8);
  ASSERT_EQ(q.data.shape(), Shape({E, N, K}));
  ASSERT_EQ(q.scale.dtype(), DType::F32);
  ASSERT_EQ(q.scale.shape(), Shape({E, map.scale_rows, map.grid_k}));
  ASSERT_EQ(s.spec.scale_rows(), map.scale_rows);
  ASSERT_EQ(s.spec.grid_k(), map.grid_k);
  ASSERT_EQ(s.spec.numel(), map.scale_rows * map.grid_k);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      ASSERT_EQ(s.spec.index(n, k), map.id(n, k)) << "n " << n << " k " << k;
      ASSERT_EQ(s.spec.row_index(n) + s.spec.col_index(k), map.id(n, k)) << "n " << n << " k " << k;
    }

  const int64_t blocks = map.scale_rows * map.grid_k;
  const auto* codes = q.data.ptr<uint8_t>();
  const auto* scales = q.scale.ptr<float>();
  const Tensor d64 = dequantize(qt, DType::F64), d32 = dequantize(qt, DType::F32), dbf = dequantize(qt, DType::BF16);
  for (int64_t e = 0; e < E; ++e) {
    // Reference amax per block (the value a producer sees: w.float()).
    std::vector<float> amax(blocks, 0.0f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const auto v = static_cast<float>(load_as_double(w.data(), w.dtype(), (e * N + n) * K + k));
        amax[map.id(n, k)] = std::max(amax[map.id(n, k)], std::fabs(v));
      }
    std::vector<double> max_decoded(blocks, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      const float sc = scales[e * blocks + b];
      ASSERT_TRUE(std::isfinite(sc) && sc > 0) << "expert " << e << " block " << b << " scale " << sc;
      if (amax[b] > 0) EXPECT_EQ(sc, amax[b] / static_cast<float>(max_code)) << "expert " << e << " block " << b;
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (e * N + n) * K + k, b = map.id(n, k);
        const double v = load_as_double(w.data(), w.dtype(), i);
        const double sc = scales[e * blocks + b];
        const double c = decode_fp8(codes[i], e5m2);
        const double y = v / sc;  // exact target in code units
        ASSERT_TRUE(std::isfinite(c)) << "e " << e << " n " << n << " k " << k;
        // Half an ulp, plus the fp32 rounding of v / scale that the producer recipe performs.
        const double tol = half_fp8_ulp(std::min(std::fabs(y), max_code), e5m2) + std::fabs(y) * 0x1p-23;
        ASSERT_LE(std::fabs(c - std::clamp(y, -max_code, max_code)), tol)
            << "e " << e << " n " << n << " k " << k << " value " << v << " scale " << sc << " code " << c;
        if (v == 0) ASSERT_EQ(c, 0.0);
        max_decoded[b] = std::max(max_decoded[b], std::fabs(c));
        const double deq = c * sc;
        ASSERT_EQ(qt.at(e, n, k), deq);
        ASSERT_EQ(d64.ptr<double>()[i], deq);
        ASSERT_EQ(d32.ptr<float>()[i], static_cast<float>(deq));
        ASSERT_EQ(static_cast<double>(bf16_bits_to_float(dbf.ptr<uint16_t>()[i])), ref_round_bf16(deq));
      }
    for (int64_t b = 0; b < blocks; ++b)
      EXPECT_EQ(max_decoded[b], amax[b] > 0 ? max_code : 0.0) << "expert " << e << " block " << b;
  }
}

class QuantRoundTrip : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }
  void run(const Scheme& s, DType in, DType fp8, int64_t E = 2) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed_);
    check_round_trip(s, random_weights(rng_, E, s.spec.rows, s.spec.cols, in, s.map), fp8);
  }
  unsigned seed_ = 0;
  std::mt19937 rng_;
};

TEST_F(QuantRoundTrip, Tensor) {
  run(tensor_scheme(300, 200), DType::BF16, DType::F8_E4M3);
  run(tensor_scheme(300, 200), DType::F32, DType::F8_E5M2);
}
TEST_F(QuantRoundTrip, TensorTwoSegments) { run(tensor_scheme(2 * 96, 200, 2), DType::BF16, DType::F8_E4M3); }
TEST_F(QuantRoundTrip, Channel) {
  run(channel_scheme(300, 200), DType::BF16, DType::F8_E4M3);
  run(channel_scheme(300, 200), DType::F16, DType::F8_E5M2);
}
TEST_F(QuantRoundTrip, Block128) {
  run(block_scheme(300, 200, 128, 128), DType::BF16, DType::F8_E4M3);
  run(block_scheme(300, 200, 128, 128), DType::F32, DType::F8_E5M2);
}
TEST_F(QuantRoundTrip, BlockOdd) {
  run(block_scheme(300, 200, 64, 32), DType::BF16, DType::F8_E4M3);
  run(block_scheme(131, 77, 37, 53), DType::F64, DType::F8_E4M3, 3);
  run(block_scheme(50, 40, 128, 128), DType::BF16, DType::F8_E4M3);  // one partial block
}
TEST_F(QuantRoundTrip, Group) {
  run(group_scheme(300, 200, 128), DType::BF16, DType::F8_E4M3);
  run(group_scheme(300, 200, 64), DType::F32, DType::F8_E5M2);
}
// Stacked gate_up [2I, H] with I % 128 != 0: each half has its own block grid.
TEST_F(QuantRoundTrip, BlockTwoSegments) {
  run(block_scheme(2 * 96, 200, 128, 128, 2), DType::BF16, DType::F8_E4M3);
  run(block_scheme(2 * 200, 300, 128, 128, 2), DType::BF16, DType::F8_E4M3);
}

// A block that would straddle the gate/up boundary is split: gate rows and up rows of very
// different magnitude each reach the full code range.
TEST(QuantSegments, BlocksNeverStraddleHalves) {
  const int64_t I = 96, H = 130;
  const ScaleSpec spec = ScaleSpec::block(2 * I, H, 128, 128, 2);
  ASSERT_EQ(spec.scale_rows(), 2);
  for (int64_t k : {0, 127, 128, 129})
    for (int64_t n = 0; n < 2 * I; ++n) EXPECT_EQ(spec.index(n, k), (n < I ? 0 : 2) + k / 128) << n << ", " << k;
  Tensor w(DType::F32, {1, 2 * I, H});
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int64_t n = 0; n < 2 * I; ++n)
    for (int64_t k = 0; k < H; ++k) w.ptr<float>()[n * H + k] = u(rng) * (n < I ? 1e-3f : 10.0f);
  const QuantWeights q = quantize(w, spec);
  for (int64_t half = 0; half < 2; ++half) {
    double mx = 0;
    for (int64_t n = half * I; n < (half + 1) * I; ++n)
      for (int64_t k = 0; k < 128; ++k) mx = std::max(mx, std::fabs(static_cast<double>(decode_e4m3(q.data.ptr<uint8_t>()[n * H + k]))));
    EXPECT_EQ(mx, 448.0) << "half " << half;
  }
}

TEST(QuantZero, AllZeroWeightsGiveZerosAndPositiveScales) {
  for (const ScaleSpec& spec : {ScaleSpec::tensor(10, 7), ScaleSpec::channel(10, 7), ScaleSpec::block(10, 7, 4, 4),
                                ScaleSpec::group(10, 7, 3), ScaleSpec::tensor(10, 7, 2)}) {
    SCOPED_TRACE(spec.str());
    Tensor w = Tensor::zeros(DType::BF16, {2, 10, 7});
    store_from_double(w.data(), DType::BF16, 3, -0.0);  // a negative zero stays a (negative) zero
    for (DType fp8 : {DType::F8_E4M3, DType::F8_E5M2}) {
      const QuantWeights q = quantize(w, spec, fp8);
      for (int64_t i = 0; i < q.scale.numel(); ++i)
        EXPECT_TRUE(std::isfinite(q.scale.ptr<float>()[i]) && q.scale.ptr<float>()[i] > 0) << i;
      const Tensor d = dequantize(q.view(), DType::F32);
      for (int64_t i = 0; i < d.numel(); ++i) {
        EXPECT_EQ(q.data.ptr<uint8_t>()[i] & 0x7F, 0) << i;
        EXPECT_EQ(d.ptr<float>()[i], 0.0f) << i;
      }
      EXPECT_TRUE(std::signbit(d.ptr<float>()[3]));
    }
  }
}

// Blocks whose amax / 448 would underflow fp32's normal range keep a usable scale (no inf/NaN codes).
TEST(QuantZero, TinyBlocksStayFinite) {
  Tensor w(DType::F32, {1, 2, 3});
  const float vals[] = {1e-45f, -3e-45f, 0.0f, 1e-40f, 2e-38f, -1e-39f};
  std::memcpy(w.data(), vals, sizeof vals);
  const QuantWeights q = quantize(w, ScaleSpec::channel(2, 3));
  for (int64_t i = 0; i < 6; ++i) {
    const double d = q.view().at(0, i / 3, i % 3);
    EXPECT_TRUE(std::isfinite(d)) << i;
    // Relative FP8 error, or half the smallest subnormal code at the floor scale (FLT_MIN).
    EXPECT_NEAR(d, vals[i], std::fabs(vals[i]) * 0.0625 + std::ldexp(std::numeric_limits<float>::min(), -10)) << i;
  }
}

TEST(QuantUnquantized, PlainWeightsReadAndCopy) {
  Tensor w(DType::BF16, {1, 3, 4});
  for (int64_t i = 0; i < 12; ++i) store_from_double(w.data(), DType::BF16, i, 0.25 * static_cast<double>(i) - 1);
  const QuantTensor qt{w.view(), TensorView{}, ScaleSpec::none(3, 4)};
  ASSERT_NO_THROW(qt.validate("plain"));
  EXPECT_FALSE(qt.quantized());
  EXPECT_EQ(qt.experts(), 1);
  EXPECT_EQ(qt.at(0, 2, 3), 0.25 * 11 - 1);
  const Tensor d = dequantize(qt, DType::F32);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(d.ptr<float>()[i], 0.25f * static_cast<float>(i) - 1);
}

// ---- activations

void check_activations(const Tensor& x, int64_t group, DType fp8, const std::vector<bool>& zero_group_expected) {
  SCOPED_TRACE(::testing::Message() << "group " << group << " " << dtype_name(fp8) << " from " << dtype_name(x.dtype()));
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t g = group == 0 ? K : group;
  const int64_t groups = group == 0 ? 1 : (K + group - 1) / group;
  const bool e5m2 = fp8 == DType::F8_E5M2;
  const double max_code = e5m2 ? 57344.0 : 448.0;
  Tensor codes(fp8, {M, K}), scales(DType::F32, {M, groups});
  std::memset(codes.data(), 0x7F, codes.nbytes());  // poison: NaN codes
  for (int64_t i = 0; i < scales.numel(); ++i) scales.ptr<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  quantize_activations(x, group, codes, scales);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t k0 = j * g, k1 = std::min(K, k0 + g);
      float amax = 0;
      for (int64_t k = k0; k < k1; ++k)
        amax = std::max(amax, std::fabs(static_cast<float>(load_as_double(x.data(), x.dtype(), m * K + k))));
      const float sc = scales.ptr<float>()[m * groups + j];
      ASSERT_TRUE(std::isfinite(sc) && sc > 0) << "row " << m << " group " << j;
      EXPECT_EQ(amax == 0, static_cast<bool>(zero_group_expected[m * groups + j])) << "row " << m << " group " << j;
      if (amax > 0) EXPECT_EQ(sc, amax / static_cast<float>(max_code));
      double mx = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const double v = load_as_double(x.data(), x.dtype(), m * K + k);
        const double c = decode_fp8(codes.ptr<uint8_t>()[m * K + k], e5m2);
        ASSERT_TRUE(std::isfinite(c)) << "row " << m << " k " << k;
        const double y = v / sc;
        ASSERT_LE(std::fabs(c - std::clamp(y, -max_code, max_code)),
                  half_fp8_ulp(std::min(std::fabs(y), max_code), e5m2) + std::fabs(y) * 0x1p-23)
            << "row " << m << " k " << k;
        mx = std::max(mx, std::fabs(c));
      }
      EXPECT_EQ(mx, amax > 0 ? max_code : 0.0) << "row " << m << " group " << j;
    }
}

TEST(QuantActivations, PerRowAndPerGroup) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> spread(-8, 8);
  const int64_t M = 9, K = 200;
  for (DType xt : {DType::BF16, DType::F32}) {
    Tensor x(xt, {M, K});
    for (int64_t m = 0; m < M; ++m) {
      const double mag = std::exp2(spread(rng));
      for (int64_t k = 0; k < K; ++k) store_from_double(x.data(), xt, m * K + k, normal(rng) * mag);
    }
    for (int64_t k = 0; k < K; ++k) store_from_double(x.data(), xt, 3 * K + k, 0.0);  // all-zero row
    for (int64_t k = 0; k < 64; ++k) store_from_double(x.data(), xt, 5 * K + k, 0.0);  // zero first 64 of row 5
    for (int64_t group : {0, 128, 64, 7, 200, 300}) {
      const int64_t groups = group == 0 ? 1 : (K + group - 1) / group;
      std::vector<bool> zero(M * groups, false);
      for (int64_t j = 0; j < groups; ++j) zero[3 * groups + j] = true;
      if (group != 0 && group <= 64)
        for (int64_t j = 0; j < 64 / group; ++j) zero[5 * groups + j] = true;
      for (DType fp8 : {DType::F8_E4M3, DType::F8_E5M2}) check_activations(x, group, fp8, zero);
    }
  }
}

TEST(QuantActivations, RejectsBadShapesAndValues) {
  Tensor x(DType::F32, {2, 10}), codes(DType::F8_E4M3, {2, 10}), scales(DType::F32, {2, 2});
  for (int64_t i = 0; i < 20; ++i) x.ptr<float>()[i] = static_cast<float>(i);
  EXPECT_NO_THROW(quantize_activations(x, 5, codes, scales));
  // Each refusal must be the right one: the message names the operand and the offending value.
  using test::expect_error;
  expect_error([&] { quantize_activations(x, 4, codes, scales); },  // needs [2, 3] scales
               {"quantize_activations scales", "expected shape [2, 3]", "found [2, 2]"});
  expect_error([&] { quantize_activations(x, 0, codes, scales); },  // needs [2, 1] scales
               {"quantize_activations scales", "expected shape [2, 1]", "found [2, 2]"});
  expect_error([&] { quantize_activations(x, -1, codes, scales); }, {"group must be 0 (per row) or positive", "found -1"});
  Tensor bad_codes(DType::BF16, {2, 10});
  expect_error([&] { quantize_activations(x, 5, bad_codes, scales); },
               {"quantize_activations codes", "expected dtype F8_E4M3|F8_E5M2", "found BF16"});
  x.ptr<float>()[7] = std::numeric_limits<float>::infinity();
  expect_error([&] { quantize_activations(x, 5, codes, scales); },
               {"quantize_activations x", "element at offset 7 is inf", "only finite values"});
}

// ---- specs and validation

TEST(QuantSpec, NamesAndStrings) {
  EXPECT_STREQ(scale_kind_name(ScaleKind::None), "none");
  EXPECT_STREQ(scale_kind_name(ScaleKind::Tensor), "tensor");
  EXPECT_STREQ(scale_kind_name(ScaleKind::Channel), "channel");
  EXPECT_STREQ(scale_kind_name(ScaleKind::Block), "block");
  EXPECT_STREQ(scale_kind_name(ScaleKind::Group), "group");
  EXPECT_EQ(ScaleSpec::block(256, 300, 128, 128, 2).str(), "block 128x128 (2 segments)");
  EXPECT_EQ(ScaleSpec::block(256, 300, 64, 32).str(), "block 64x32");
  EXPECT_EQ(ScaleSpec::group(4, 300, 128).str(), "group 128");
  EXPECT_EQ(ScaleSpec::channel(4, 300).str(), "channel");
  EXPECT_EQ(ScaleSpec::tensor(4, 300, 2).str(), "tensor (2 segments)");
  EXPECT_EQ(ScaleSpec::none(4, 300).str(), "none");
}

// The message of the exception thrown by f, or "" when it does not throw.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(QuantSpec, ValidateNamesTheTensor) {
  EXPECT_NO_THROW(ScaleSpec::block(300, 200, 128, 128).validate("w"));
  EXPECT_NO_THROW(ScaleSpec::none(0, 0).validate("w"));
  EXPECT_NE(error_of([] { ScaleSpec::block(301, 200, 128, 128, 2).validate("layers.0.gate_up"); }).find("layers.0.gate_up"),
            std::string::npos);
  EXPECT_NE(error_of([] { ScaleSpec::block(300, 200, 0, 128).validate("w_zero_block"); }).find("w_zero_block"),
            std::string::npos);
  EXPECT_NE(error_of([] { ScaleSpec::block(-1, 200, 1, 1).validate("w_neg"); }).find("w_neg"), std::string::npos);
  EXPECT_NE(error_of([] { ScaleSpec::block(4, 200, 1, 1, 0).validate("w_seg"); }).find("w_seg"), std::string::npos);
}

TEST(QuantSpec, QuantTensorValidateNamesTheTensor) {
  const ScaleSpec spec = ScaleSpec::block(300, 200, 128, 128);
  Tensor data(DType::F8_E4M3, {2, 300, 200}), scale(DType::F32, {2, 3, 2});
  EXPECT_NO_THROW((QuantTensor{data.view(), scale.view(), spec}.validate("down")));
  Tensor bad_scale(DType::F32, {2, 2, 2}), bf_scale(DType::BF16, {2, 3, 2}), bf_data(DType::BF16, {2, 300, 200});
  Tensor wrong_rows(DType::F8_E4M3, {2, 299, 200}), rank2(DType::F8_E4M3, {300, 200});
  const std::vector<QuantTensor> bad = {
      {data.view(), bad_scale.view(), spec},                    // scale shape
      {data.view(), bf_scale.view(), spec},                     // scale dtype
      {data.view(), TensorView{}, spec},                        // missing scale
      {bf_data.view(), scale.view(), spec},                     // quantized spec on BF16 data
      {wrong_rows.view(), scale.view(), spec},                  // data shape vs spec
      {rank2.view(), scale.view(), spec},                       // rank
      {data.view(), TensorView{}, ScaleSpec::none(300, 200)},   // FP8 without a scale
      {bf_data.view(), scale.view(), ScaleSpec::none(300, 200)},  // plain data with a scale
  };
  for (size_t i = 0; i < bad.size(); ++i)
    EXPECT_NE(error_of([&] { bad[i].validate("mlp.experts.down_proj"); }).find("mlp.experts.down_proj"),
              std::string::npos)
        << "case " << i;
}

TEST(QuantSpec, QuantizeRejectsBadInput) {
  Tensor w(DType::F32, {1, 4, 6});
  for (int64_t i = 0; i < 24; ++i) w.ptr<float>()[i] = static_cast<float>(i) - 3.5f;
  EXPECT_NO_THROW(quantize(w, ScaleSpec::channel(4, 6)));
  using test::expect_error;
  expect_error([&] { quantize(w, ScaleSpec::none(4, 6)); }, {"quantize", "must name a scheme", "found none"});
  expect_error([&] { quantize(w, ScaleSpec::channel(4, 6), DType::BF16); },
               {"target dtype must be F8_E4M3 or F8_E5M2", "found BF16"});
  expect_error([&] { quantize(w, ScaleSpec::channel(5, 6)); }, {"input must be [E, 5, 6] for channel", "found F32[1, 4, 6]"});
  expect_error([&] { quantize(w, ScaleSpec::block(4, 6, 2, 2, 3)); }, {"4 rows do not split into 3 equal segments"});
  w.ptr<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { quantize(w, ScaleSpec::channel(4, 6)); }, {"quantize input", "element at offset 5 is nan", "only finite"});
  expect_error([&] { dequantize(QuantTensor{w.view(), TensorView{}, ScaleSpec::none(4, 6)}, DType::F8_E4M3); },
               {"dequantize", "output dtype must be BF16/F16/F32/F64", "found F8_E4M3"});
}

}  // namespace
}  // namespace fp8moe

// FP8 codecs (include/fp8moe/fp8.hpp) against an independent reference written for clarity:
// decode from the bit fields with std::ldexp, encode by brute force over every finite code
// (nearest value in double, ties to the even code), with PyTorch's overflow rules:
//   e4m3fn: no inf; anything that rounds past 448 becomes NaN (c10's fp8e4m3fn_from_fp32_value
//           sends f >= 480 to NaN and rounds the tie 464 to 448, whose mantissa is even);
//   e5m2:   anything that rounds past 57344 becomes inf (the tie 61440 rounds up: 57344 is odd).
// The saturating encoders clamp to +-max first (NaN stays NaN).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fp8moe/fp8.hpp"

namespace fp8moe {
namespace {

struct Fmt {
  const char* name;
  int man_bits;
  int bias;
  bool e5m2;
  uint8_t max_code;  // largest finite magnitude code
};
constexpr Fmt kE4M3{"e4m3fn", 3, 7, false, 0x7E};
constexpr Fmt kE5M2{"e5m2", 2, 15, true, 0x7B};

// Value of a magnitude code read as a plain normal/subnormal number, ignoring special meanings.
// For max_code + 1 this gives the first value past the range (480 / 65536): the rounding target
// that turns into NaN (e4m3fn) or inf (e5m2).
double ref_magnitude(const Fmt& f, int code) {
  const int exp = code >> f.man_bits;
  const int man = code & ((1 << f.man_bits) - 1);
  if (exp == 0) return std::ldexp(man, 1 - f.bias - f.man_bits);
  return std::ldexp((1 << f.man_bits) + man, exp - f.bias - f.man_bits);
}

double ref_decode(const Fmt& f, uint8_t c) {
  const int mag = c & 0x7F;
  const double sign = (c & 0x80) ? -1.0 : 1.0;
  if (!f.e5m2 && mag == 0x7F) return std::numeric_limits<double>::quiet_NaN();
  if (f.e5m2 && mag >= 0x7C) return mag == 0x7C ? sign * std::numeric_limits<double>::infinity()
                                                : std::numeric_limits<double>::quiet_NaN();
  return sign * ref_magnitude(f, mag);
}

// Brute-force round to nearest, ties to even code. `sat`: clamp to +-max first.
uint8_t ref_encode(const Fmt& f, float x, bool sat) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const uint8_t overflow = f.e5m2 ? 0x7C : 0x7F;  // inf / NaN
  if (std::isnan(x)) return sat ? 0x7F : (sign | 0x7F);
  double a = std::fabs(static_cast<double>(x));
  if (sat) a = std::min(a, ref_magnitude(f, f.max_code));
  // At or past the first out-of-range value it is the nearest candidate (checked apart because
  // the distances below lose their difference in double for huge a).
  if (a >= ref_magnitude(f, f.max_code + 1)) return sign | overflow;
  int best = 0;
  for (int c = 1; c <= f.max_code + 1; ++c) {
    const double d = std::fabs(a - ref_magnitude(f, c)), db = std::fabs(a - ref_magnitude(f, best));
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  if (best > f.max_code) return sign | overflow;
  return sign | static_cast<uint8_t>(best);
}

uint8_t enc_torch(const Fmt& f, float x) { return f.e5m2 ? encode_e5m2_torch(x) : encode_e4m3_torch(x); }
uint8_t enc_sat(const Fmt& f, float x) { return f.e5m2 ? encode_e5m2_sat(x) : encode_e4m3_sat(x); }
float dec(const Fmt& f, uint8_t c) { return f.e5m2 ? decode_e5m2(c) : decode_e4m3(c); }

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Checks both encoders on x against the reference. NaN results are compared as NaN (the
// saturating encoder's NaN sign is unspecified); everything else bit-exactly.
void expect_encodes(const Fmt& f, float x) {
  const uint8_t want_t = ref_encode(f, x, false), got_t = enc_torch(f, x);
  EXPECT_EQ(got_t, want_t) << f.name << " torch encode of " << x << " (bits 0x" << std::hex << bits(x) << ")";
  const uint8_t want_s = ref_encode(f, x, true), got_s = enc_sat(f, x);
  if (std::isnan(x)) {
    EXPECT_TRUE(std::isnan(dec(f, got_s))) << f.name << " sat encode of NaN gave 0x" << std::hex << int(got_s);
  } else {
    EXPECT_EQ(got_s, want_s) << f.name << " sat encode of " << x << " (bits 0x" << std::hex << bits(x) << ")";
  }
}

class Fp8Codec : public ::testing::TestWithParam<Fmt> {};

TEST_P(Fp8Codec, DecodesAll256Codes) {
  const Fmt f = GetParam();
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = ref_decode(f, static_cast<uint8_t>(c));
    const float got = dec(f, static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      ++nans;
      EXPECT_TRUE(std::isnan(got)) << f.name << " code 0x" << std::hex << c;
    } else {
      EXPECT_EQ(static_cast<double>(got), want) << f.name << " code 0x" << std::hex << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << f.name << " sign of code 0x" << std::hex << c;
    }
  }
  EXPECT_EQ(nans, f.e5m2 ? 6 : 2);
  EXPECT_EQ(dec(f, f.max_code), fp8_max(f.e5m2));
  EXPECT_EQ(decode_fp8(f.max_code, f.e5m2), fp8_max(f.e5m2));
}

TEST_P(Fp8Codec, EncodeOfDecodeIsIdentity) {
  const Fmt f = GetParam();
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float v = dec(f, code);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(dec(f, enc_torch(f, v)))) << f.name << " code 0x" << std::hex << c;
      continue;
    }
    EXPECT_EQ(enc_torch(f, v), code) << f.name << " code 0x" << std::hex << c;
    EXPECT_EQ(dec(f, enc_torch(f, v)), v) << f.name << " code 0x" << std::hex << c;
    if (!std::isinf(v)) {
      EXPECT_EQ(enc_sat(f, v), code) << f.name << " code 0x" << std::hex << c;
      EXPECT_EQ(encode_fp8_sat(v, f.e5m2), code) << f.name << " code 0x" << std::hex << c;
    }
  }
}

// Around every midpoint of adjacent representable values (including 0 / min subnormal and
// max / first overflow value), both signs: the midpoint itself, a few ulps either side, and
// random floats in between.
TEST_P(Fp8Codec, MatchesReferenceAroundEveryMidpoint) {
  const Fmt f = GetParam();
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  for (int c = 0; c <= f.max_code; ++c) {
    const double lo = ref_magnitude(f, c), hi = ref_magnitude(f, c + 1);
    const auto mid = static_cast<float>((lo + hi) / 2);  // <= 5 significant bits: exact in float
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
    std::vector<float> xs{mid, static_cast<float>(lo), static_cast<float>(hi)};
    float up = mid, down = mid;
    for (int i = 0; i < 4; ++i) {
      up = std::nextafter(up, INFINITY);
      down = std::nextafter(down, 0.0f);
      xs.push_back(up);
      xs.push_back(down);
    }
    std::uniform_real_distribution<double> between(lo, hi);
    for (int i = 0; i < 64; ++i) xs.push_back(static_cast<float>(between(rng)));
    for (float x : xs) {
      expect_encodes(f, x);
      expect_encodes(f, -x);
    }
  }
}

TEST_P(Fp8Codec, MatchesReferenceOnRandomFloats) {
  const Fmt f = GetParam();
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  // Log-uniform magnitudes over the format's range and a bit beyond, where all the rounding happens.
  const double lo_exp = std::log2(ref_magnitude(f, 1)) - 3, hi_exp = std::log2(ref_magnitude(f, f.max_code)) + 2;
  std::uniform_real_distribution<double> log_mag(lo_exp, hi_exp);
  for (int i = 0; i < 20000; ++i) {
    uint32_t u = any_bits(rng);
    float x;
    std::memcpy(&x, &u, 4);
    expect_encodes(f, x);
    const auto y = static_cast<float>(std::exp2(log_mag(rng)));
    expect_encodes(f, (u & 1) ? -y : y);
  }
}

TEST_P(Fp8Codec, SpecialValues) {
  const Fmt f = GetParam();
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float min_sub = static_cast<float>(ref_magnitude(f, 1));
  const float specials[] = {0.0f, -0.0f, inf, -inf, nan, -nan, min_sub, min_sub / 2, min_sub * 1.5f,
                            std::nextafter(min_sub / 2, 1.0f), std::nextafter(min_sub / 2, 0.0f),
                            std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(), 448.0f, 463.99f, 464.0f, 465.0f, 480.0f,
                            57344.0f, 61440.0f, std::nextafter(61440.0f, 0.0f), 65536.0f, 1e30f};
  for (float x : specials) {
    expect_encodes(f, x);
    expect_encodes(f, -x);
  }
  // Zeros keep their sign; below half the smallest subnormal (and exactly half: tie to even 0)
  // flushes to a signed zero.
  EXPECT_EQ(enc_torch(f, 0.0f), 0x00);
  EXPECT_EQ(enc_torch(f, -0.0f), 0x80);
  EXPECT_EQ(enc_torch(f, min_sub / 2), 0x00);
  EXPECT_EQ(enc_torch(f, -min_sub / 2), 0x80);
  EXPECT_EQ(enc_torch(f, std::nextafter(min_sub / 2, 1.0f)), 0x01);
  EXPECT_EQ(enc_torch(f, min_sub * 1.5f), 0x02);  // tie between codes 1 and 2 -> even
  EXPECT_EQ(enc_torch(f, -std::numeric_limits<float>::denorm_min()), 0x80);
  EXPECT_TRUE(std::isnan(dec(f, enc_sat(f, nan))));
  EXPECT_EQ(enc_sat(f, inf), f.max_code);
  EXPECT_EQ(enc_sat(f, -inf), 0x80 | f.max_code);
  EXPECT_EQ(enc_sat(f, 1e30f), f.max_code);
}

INSTANTIATE_TEST_SUITE_P(Fp8, Fp8Codec, ::testing::Values(kE4M3, kE5M2),
                         [](const auto& info) { return std::string(info.param.e5m2 ? "E5M2" : "E4M3"); });

// The boundaries the project relies on, spelled out (the reference above checks them too).
TEST(Fp8Boundaries, E4M3Overflow) {
  EXPECT_EQ(encode_e4m3_torch(448.0f), 0x7E);
  EXPECT_EQ(encode_e4m3_torch(463.99f), 0x7E);
  EXPECT_EQ(encode_e4m3_torch(464.0f), 0x7E);  // tie 448 | 480: 448 (mantissa 110) is even
  EXPECT_EQ(encode_e4m3_torch(std::nextafter(464.0f, 1e9f)), 0x7F);
  EXPECT_EQ(encode_e4m3_torch(465.0f), 0x7F);
  EXPECT_EQ(encode_e4m3_torch(-465.0f), 0xFF);
  EXPECT_EQ(encode_e4m3_torch(std::numeric_limits<float>::infinity()), 0x7F);
  EXPECT_EQ(encode_e4m3_torch(-std::numeric_limits<float>::infinity()), 0xFF);
  EXPECT_EQ(encode_e4m3_sat(465.0f), 0x7E);
  EXPECT_EQ(encode_e4m3_sat(-1e30f), 0xFE);
  EXPECT_TRUE(std::isnan(decode_e4m3(0x7F)));
  EXPECT_TRUE(std::isnan(decode_e4m3(0xFF)));
  EXPECT_EQ(decode_e4m3(0x01), 0x1p-9f);
  EXPECT_EQ(decode_e4m3(0x08), 0x1p-6f);
}

TEST(Fp8Boundaries, E5M2Overflow) {
  EXPECT_EQ(encode_e5m2_torch(57344.0f), 0x7B);
  EXPECT_EQ(encode_e5m2_torch(std::nextafter(61440.0f, 0.0f)), 0x7B);
  EXPECT_EQ(encode_e5m2_torch(61440.0f), 0x7C);  // tie 57344 | 65536: 57344 (mantissa 11) is odd
  EXPECT_EQ(encode_e5m2_torch(-61440.0f), 0xFC);
  EXPECT_EQ(encode_e5m2_torch(std::numeric_limits<float>::infinity()), 0x7C);
  EXPECT_EQ(encode_e5m2_torch(-std::numeric_limits<float>::infinity()), 0xFC);
  EXPECT_TRUE(std::isnan(decode_e5m2(encode_e5m2_torch(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(encode_e5m2_sat(61440.0f), 0x7B);
  EXPECT_EQ(encode_e5m2_sat(-std::numeric_limits<float>::infinity()), 0xFB);
  EXPECT_TRUE(std::isinf(decode_e5m2(0x7C)));
  EXPECT_TRUE(std::isinf(decode_e5m2(0xFC)) && decode_e5m2(0xFC) < 0);
  for (int c : {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}) EXPECT_TRUE(std::isnan(decode_e5m2(static_cast<uint8_t>(c))));
  EXPECT_EQ(decode_e5m2(0x01), 0x1p-16f);
  EXPECT_EQ(decode_e5m2(0x04), 0x1p-14f);
}

}  // namespace
}  // namespace fp8moe

// dtype table and host conversions (include/fp8moe/dtype.hpp, src/formats/dtype.cpp) against a
// reference written for clarity: decode 16-bit floats from their bit fields with std::ldexp, and
// round a double to any binary format exactly by scaling its significand to integer units of the
// target quantum and calling std::nearbyint (round to nearest even in the default mode).
#include <gtest/gtest.h>

#include <array>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/dtype.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe {
namespace {

struct Binary {
  int man_bits;     // stored mantissa bits
  int min_exp;      // exponent of the smallest normal
  double max;       // largest finite value
  bool saturates;   // overflow -> +-max (FP8 stores) instead of inf
};
constexpr Binary kBF16{7, -126, 0x1.FEp127, false};
constexpr Binary kF16{10, -14, 65504.0, false};
constexpr Binary kE4M3Sat{3, -6, 448.0, true};
constexpr Binary kE5M2Sat{2, -14, 57344.0, true};

// Exact round-to-nearest-even of x into format b (NaN stays NaN, zeros keep their sign).
double ref_round(const Binary& b, double x) {
  if (std::isnan(x) || x == 0) return x;
  const double a = std::fabs(x);
  double r;
  if (std::isinf(a)) {
    r = a;
  } else {
    const int e = std::max(std::ilogb(a), b.min_exp);    // binade, clamped into the subnormal range
    const int q = e - b.man_bits;                        // quantum 2^q
    r = std::ldexp(std::nearbyint(std::ldexp(a, -q)), q);  // exact scaling; one rounding
  }
  if (r > b.max) r = b.saturates ? b.max : std::numeric_limits<double>::infinity();
  return std::copysign(r, x);
}

double ref_decode16(uint16_t h, int exp_bits, int man_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int exp = (h >> man_bits) & ((1 << exp_bits) - 1);
  const int man = h & ((1 << man_bits) - 1);
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == (1 << exp_bits) - 1)
    return man ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(man, 1 - bias - man_bits);
  return sign * std::ldexp((1 << man_bits) + man, exp - bias - man_bits);
}

// Same value and, for zeros, same sign; NaN matches NaN.
::testing::AssertionResult same_value(double got, double want) {
  if (std::isnan(want) ? std::isnan(got) : (got == want && std::signbit(got) == std::signbit(want)))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want;
}

// The library's conversions round to nearest even whatever rounding mode the process runs in (a
// caller, or a library it loads, may change it): they round in integer arithmetic, or to odd first,
// never by the FPU's current mode. Each result under each mode is checked against the reference,
// computed in the default mode (it rounds with nearbyint).
TEST(DTypeConvert, RoundsToNearestEvenInEveryFpRoundingMode) {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  // Doubles at, and a hair either side of, ties of BF16, F16 and the FP8 formats, in several
  // binades and both signs (the subnormal ranges included), and random ones.
  std::vector<double> xs;
  for (int e : {-140, -20, -16, -9, -7, -1, 0, 3, 8, 15})
    for (int bits : {2, 3, 7, 10})
      for (double m : {1.0, 3.0, 5.0, 7.0})
        for (double nudge : {0.0, 1e-12, -1e-12}) {
          const double tie = std::ldexp(1.0 + m * std::ldexp(1.0, -bits - 1), e);
          xs.push_back(tie * (1 + nudge));
          xs.push_back(-tie * (1 + nudge));
        }
  std::uniform_real_distribution<double> u(-8, 8);
  for (int i = 0; i < 2000; ++i) xs.push_back(std::ldexp(u(rng), static_cast<int>(u(rng) * 4)));
  std::vector<float> fs;  // float inputs, built from bits (no conversion that the mode could round)
  for (int i = 0; i < 4000; ++i) {
    uint32_t b = static_cast<uint32_t>(rng());
    b = (b & 0x807fffffu) | ((100u + b % 50u) << 23);  // exponents around 1, ties in the low bits
    if (i % 2) b = (b & 0xffff0000u) | 0x8000u;          // an exact BF16 tie
    float f;
    std::memcpy(&f, &b, 4);
    fs.push_back(f);
  }
  struct Want {
    double bf16, f16, e4m3, e5m2;
  };
  std::vector<Want> want;
  for (double x : xs) want.push_back({ref_round(kBF16, x), ref_round(kF16, x), ref_round(kE4M3Sat, x), ref_round(kE5M2Sat, x)});
  std::vector<std::array<double, 4>> fwant;
  for (float f : fs) fwant.push_back({ref_round(kBF16, f), ref_round(kF16, f), ref_round(kE4M3Sat, f), ref_round(kE5M2Sat, f)});

  struct Restore {
    ~Restore() { std::fesetround(FE_TONEAREST); }
  } restore;
  for (int mode : {FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO, FE_TONEAREST}) {
    SCOPED_TRACE(::testing::Message() << "rounding mode " << mode);
    ASSERT_EQ(std::fesetround(mode), 0);
    for (size_t i = 0; i < xs.size(); ++i) {
      uint16_t h;
      uint8_t c;
      store_from_double(&h, DType::BF16, 0, xs[i]);
      ASSERT_TRUE(same_value(bf16_bits_to_float(h), want[i].bf16)) << "bf16 of " << xs[i];
      store_from_double(&h, DType::F16, 0, xs[i]);
      ASSERT_TRUE(same_value(f16_bits_to_float(h), want[i].f16)) << "f16 of " << xs[i];
      store_from_double(&c, DType::F8_E4M3, 0, xs[i]);
      ASSERT_TRUE(same_value(decode_e4m3(c), want[i].e4m3)) << "e4m3 of " << xs[i];
      store_from_double(&c, DType::F8_E5M2, 0, xs[i]);
      ASSERT_TRUE(same_value(decode_e5m2(c), want[i].e5m2)) << "e5m2 of " << xs[i];
    }
    for (size_t i = 0; i < fs.size(); ++i) {
      ASSERT_TRUE(same_value(bf16_bits_to_float(float_to_bf16_bits(fs[i])), fwant[i][0])) << "bf16 of " << fs[i];
      ASSERT_TRUE(same_value(f16_bits_to_float(float_to_f16_bits(fs[i])), fwant[i][1])) << "f16 of " << fs[i];
      ASSERT_TRUE(same_value(decode_e4m3(encode_e4m3_sat(fs[i])), fwant[i][2])) << "e4m3 of " << fs[i];
      ASSERT_TRUE(same_value(decode_e5m2(encode_e5m2_sat(fs[i])), fwant[i][3])) << "e5m2 of " << fs[i];
    }
  }
}

TEST(DTypeConvert, DecodesAll16BitCodes) {
  for (int c = 0; c < 65536; ++c) {
    const auto h = static_cast<uint16_t>(c);
    EXPECT_TRUE(same_value(bf16_bits_to_float(h), ref_decode16(h, 8, 7))) << "bf16 0x" << std::hex << c;
    EXPECT_TRUE(same_value(f16_bits_to_float(h), ref_decode16(h, 5, 10))) << "f16 0x" << std::hex << c;
  }
}

TEST(DTypeConvert, EncodeOfDecodeIsIdentity) {
  for (int c = 0; c < 65536; ++c) {
    const auto h = static_cast<uint16_t>(c);
    const float b = bf16_bits_to_float(h), f = f16_bits_to_float(h);
    if (std::isnan(b)) EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(b)))) << std::hex << c;
    else EXPECT_EQ(float_to_bf16_bits(b), h) << "bf16 0x" << std::hex << c;
    if (std::isnan(f)) EXPECT_TRUE(std::isnan(f16_bits_to_float(float_to_f16_bits(f)))) << std::hex << c;
    else EXPECT_EQ(float_to_f16_bits(f), h) << "f16 0x" << std::hex << c;
  }
}

void expect_float_rounds(float x) {
  EXPECT_TRUE(same_value(bf16_bits_to_float(float_to_bf16_bits(x)), ref_round(kBF16, x))) << "bf16 of " << x;
  EXPECT_TRUE(same_value(f16_bits_to_float(float_to_f16_bits(x)), ref_round(kF16, x))) << "f16 of " << x;
}

// Around every midpoint of adjacent finite values (both formats, both signs, including the
// max -> inf boundary): the midpoint, a few float ulps either side, and random floats in between.
TEST(DTypeConvert, FloatTo16BitAroundEveryMidpoint) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  struct Fmt { int exp_bits, man_bits; };
  for (const Fmt fm : {Fmt{8, 7}, Fmt{5, 10}}) {
    const int top = ((1 << (fm.exp_bits + fm.man_bits)) - (1 << fm.man_bits));  // +inf code
    for (int c = 0; c < top; ++c) {
      const double lo = ref_decode16(static_cast<uint16_t>(c), fm.exp_bits, fm.man_bits);
      // The step past max continues the binade: the rounding point to inf.
      const double hi = c + 1 < top ? ref_decode16(static_cast<uint16_t>(c + 1), fm.exp_bits, fm.man_bits)
                                    : 2 * lo - ref_decode16(static_cast<uint16_t>(c - 1), fm.exp_bits, fm.man_bits);
      const double mid = (lo + hi) / 2;
      if (mid > std::numeric_limits<float>::max()) continue;  // bf16's overflow point is past float range
      const auto m = static_cast<float>(mid);
      ASSERT_EQ(static_cast<double>(m), mid);
      float up = m, down = m;
      std::vector<float> xs{m};
      for (int i = 0; i < 2; ++i) {
        xs.push_back(up = std::nextafter(up, INFINITY));
        xs.push_back(down = std::nextafter(down, 0.0f));
      }
      xs.push_back(static_cast<float>(std::uniform_real_distribution<double>(lo, hi)(rng)));
      for (float x : xs) {
        expect_float_rounds(x);
        expect_float_rounds(-x);
      }
    }
  }
}

TEST(DTypeConvert, FloatTo16BitRandomAndSpecial) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = any_bits(rng);
    float x;
    std::memcpy(&x, &u, 4);
    expect_float_rounds(x);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 65504.0f, 65519.99f, 65520.0f,
                  1e6f, std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                  std::numeric_limits<float>::denorm_min(), 0x1p-24f, 0x1p-25f, 0x1.8p-24f, 0x1p-133f, 0x1p-134f})
  {
    expect_float_rounds(x);
    expect_float_rounds(-x);
  }
  EXPECT_EQ(float_to_f16_bits(65520.0f), 0x7C00);  // tie 65504 | 65536: 65504 is odd -> inf
  EXPECT_EQ(float_to_f16_bits(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16_bits(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16_bits(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(float_to_f16_bits(0x1p-25f), 0x0000);  // half the smallest subnormal: tie to even 0
  // NaNs with payloads only in the low bits must not truncate to inf.
  uint32_t low_nan = 0x7F800001u;
  float n;
  std::memcpy(&n, &low_nan, 4);
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(n))));
  EXPECT_TRUE(std::isnan(f16_bits_to_float(float_to_f16_bits(n))));
}

// ---- store_from_double / load_as_double

double store_load(DType t, double v) {
  unsigned char buf[16];
  std::memset(buf, 0xFF, sizeof buf);  // poison (NaN in every float format)
  store_from_double(buf, t, 1, v);     // element 1: exercises the offset
  return load_as_double(buf, t, 1);
}

// A double just off a tie of the 16-bit/8-bit format, closer to the tie than half a float ulp:
// converting to float first lands exactly on the tie and rounds to even, which is wrong when the
// double was on the odd side's far half.
TEST(DTypeStore, RoundsOnceFromDouble) {
  struct Case { DType t; Binary b; int man_bits; };
  for (const Case c : {Case{DType::BF16, kBF16, 7}, Case{DType::F16, kF16, 10}, Case{DType::F8_E4M3, kE4M3Sat, 3},
                       Case{DType::F8_E5M2, kE5M2Sat, 2}}) {
    SCOPED_TRACE(dtype_name(c.t));
    const double q = std::ldexp(1.0, -c.man_bits);  // ulp at 1
    const double even_tie = 1 + q / 2;               // between 1 (even) and 1 + q (odd)
    const double odd_tie = 1 + q + q / 2;            // between 1 + q (odd) and 1 + 2q (even)
    const double eps = 0x1p-30;                      // far below float's half ulp (2^-24) at 1
    ASSERT_EQ(static_cast<float>(even_tie + eps), static_cast<float>(even_tie));
    EXPECT_EQ(store_load(c.t, even_tie), 1.0);
    EXPECT_EQ(store_load(c.t, even_tie + eps), 1 + q);
    EXPECT_EQ(store_load(c.t, -(even_tie + eps)), -(1 + q));
    EXPECT_EQ(store_load(c.t, odd_tie), 1 + 2 * q);
    EXPECT_EQ(store_load(c.t, odd_tie - eps), 1 + q);
    EXPECT_EQ(store_load(c.t, -(odd_tie - eps)), -(1 + q));
  }
}

TEST(DTypeStore, MatchesReferenceOnRandomDoubles) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  std::uniform_int_distribution<int> exp_dist(-30, 20);
  struct Case { DType t; Binary b; };
  for (const Case c : {Case{DType::BF16, kBF16}, Case{DType::F16, kF16}, Case{DType::F8_E4M3, kE4M3Sat},
                       Case{DType::F8_E5M2, kE5M2Sat}}) {
    SCOPED_TRACE(dtype_name(c.t));
    for (int i = 0; i < 20000; ++i) {
      // Half the draws sit a hair off a tie of the target (the double-rounding hazard).
      double v = std::ldexp(unit(rng), exp_dist(rng));
      if (i % 2) {
        const int e = std::max(std::ilogb(v), -14) - c.b.man_bits;
        v = std::ldexp(std::floor(std::ldexp(v, -e)) + 0.5, e) * (1 + unit(rng) * 0x1p-40);
      }
      EXPECT_TRUE(same_value(store_load(c.t, v), ref_round(c.b, v))) << "v = " << std::hexfloat << v;
    }
  }
}

TEST(DTypeStore, SpecialValues) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (DType t : {DType::BF16, DType::F16, DType::F32, DType::F64, DType::F8_E4M3, DType::F8_E5M2}) {
    SCOPED_TRACE(dtype_name(t));
    EXPECT_TRUE(std::isnan(store_load(t, nan)));
    EXPECT_TRUE(same_value(store_load(t, -0.0), -0.0));
    EXPECT_TRUE(same_value(store_load(t, 1e-300), t == DType::F64 ? 1e-300 : 0.0));
    EXPECT_EQ(store_load(t, 1.5), 1.5);
  }
  EXPECT_EQ(store_load(DType::BF16, 1e300), inf);
  EXPECT_EQ(store_load(DType::F16, 65520.0), inf);
  EXPECT_EQ(store_load(DType::F16, -inf), -inf);
  EXPECT_EQ(store_load(DType::F32, 1e300), inf);
  EXPECT_EQ(store_load(DType::F64, 0.1), 0.1);
  EXPECT_EQ(store_load(DType::F32, 0.1), static_cast<double>(0.1f));
  // FP8 stores saturate.
  EXPECT_EQ(store_load(DType::F8_E4M3, 465.0), 448.0);
  EXPECT_EQ(store_load(DType::F8_E4M3, -inf), -448.0);
  EXPECT_EQ(store_load(DType::F8_E5M2, 1e300), 57344.0);
  EXPECT_EQ(store_load(DType::I32, -7.0), -7.0);
  EXPECT_EQ(store_load(DType::I64, 1e15), 1e15);
  unsigned char buf[8];
  EXPECT_THROW(store_from_double(buf, DType::C64, 0, 1.0), Error);
  EXPECT_THROW(load_as_double(buf, DType::BOOL, 0), Error);
}

TEST(DTypeStore, LoadsUnalignedElements) {
  unsigned char buf[1 + 8 * 3];
  const double want[3] = {1.25, -3.5, 1e-3};
  for (DType t : {DType::F64, DType::F32, DType::BF16, DType::F16}) {
    const int64_t sz = dtype_size(t);
    for (int i = 0; i < 3; ++i) store_from_double(buf + 1, t, i, want[i]);  // misaligned by one byte
    for (int i = 0; i < 3; ++i) {
      double ref = t == DType::BF16 ? ref_round(kBF16, want[i]) : t == DType::F16 ? ref_round(kF16, want[i]) : want[i];
      if (t == DType::F32) ref = static_cast<float>(want[i]);
      EXPECT_EQ(load_as_double(buf + 1, t, i), ref) << dtype_name(t) << " size " << sz << " element " << i;
    }
  }
}

// ---- the dtype table

TEST(DTypeTable, NamesRoundTripAndBits) {
  struct Row { const char* name; int bits; };
  // Every safetensors dtype string (formats.md section 1) with its width.
  const Row rows[] = {{"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"I16", 16}, {"U16", 16}, {"I32", 32}, {"U32", 32},
                      {"I64", 64}, {"U64", 64}, {"F16", 16}, {"BF16", 16}, {"F32", 32}, {"F64", 64},
                      {"C64", 64}, {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
                      {"F8_E5M2FNUZ", 8}, {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6}};
  std::vector<DType> seen;
  for (const Row& r : rows) {
    SCOPED_TRACE(r.name);
    const std::optional<DType> t = parse_dtype(r.name);
    ASSERT_TRUE(t.has_value());
    EXPECT_EQ(dtype_name(*t), r.name);
    EXPECT_EQ(dtype_bits(*t), r.bits);
    if (r.bits % 8 == 0) EXPECT_EQ(dtype_size(*t), r.bits / 8);
    else EXPECT_THROW(dtype_size(*t), Error);
    for (DType s : seen) EXPECT_NE(s, *t);
    seen.push_back(*t);
  }
  // Every enumerator has a name that parses back to it.
  for (int i = 0; i <= static_cast<int>(DType::F6_E3M2); ++i) {
    const auto t = static_cast<DType>(i);
    EXPECT_EQ(parse_dtype(dtype_name(t)), t) << i;
  }
  for (const char* bad : {"", "f8_e4m3", "F8_E4M3FN", "BFLOAT16", "F8", "float32", "BF16 "})
    EXPECT_FALSE(parse_dtype(bad).has_value()) << '"' << bad << '"';
  EXPECT_THROW(dtype_bits(static_cast<DType>(200)), Error);
}

TEST(DTypeTable, Predicates) {
  EXPECT_TRUE(is_fp8(DType::F8_E4M3));
  EXPECT_TRUE(is_fp8(DType::F8_E5M2));
  EXPECT_FALSE(is_fp8(DType::F8_E4M3FNUZ));
  EXPECT_FALSE(is_fp8(DType::BF16));
  for (DType t : {DType::F16, DType::BF16, DType::F32, DType::F64, DType::F8_E4M3, DType::F8_E5M2})
    EXPECT_TRUE(is_float(t)) << dtype_name(t);
  for (DType t : {DType::I32, DType::U8, DType::C64, DType::F8_E8M0, DType::F4}) EXPECT_FALSE(is_float(t)) << dtype_name(t);
}

}  // namespace
}  // namespace fp8moe

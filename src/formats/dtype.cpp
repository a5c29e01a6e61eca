#include "fp8moe/dtype.hpp"

#include <cmath>

#include "fp8moe/error.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe {

namespace {
struct DTypeInfo {
  DType t;
  std::string_view name;
  int bits;
};
constexpr DTypeInfo kInfo[] = {
    {DType::BOOL, "BOOL", 8},       {DType::U8, "U8", 8},
    {DType::I8, "I8", 8},           {DType::I16, "I16", 16},
    {DType::U16, "U16", 16},        {DType::I32, "I32", 32},
    {DType::U32, "U32", 32},        {DType::I64, "I64", 64},
    {DType::U64, "U64", 64},        {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::F32, "F32", 32},
    {DType::F64, "F64", 64},        {DType::C64, "C64", 64},
    {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E5M2, "F8_E5M2", 8},
    {DType::F8_E8M0, "F8_E8M0", 8}, {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8}, {DType::F4, "F4", 4},
    {DType::F6_E2M3, "F6_E2M3", 6}, {DType::F6_E3M2, "F6_E3M2", 6},
};
const DTypeInfo& info(DType t) {
  for (const auto& i : kInfo)
    if (i.t == t) return i;
  FP8MOE_FAIL("unknown dtype code ", static_cast<int>(t));
}
}  // namespace

int dtype_bits(DType t) { return info(t).bits; }

int64_t dtype_size(DType t) {
  const int b = info(t).bits;
  FP8MOE_CHECK(b % 8 == 0, "dtype ", info(t).name, " is sub-byte (", b, " bits) and has no element size");
  return b / 8;
}

std::string_view dtype_name(DType t) { return info(t).name; }

std::optional<DType> parse_dtype(std::string_view s) {
  for (const auto& i : kInfo)
    if (i.name == s) return i.t;
  return std::nullopt;
}

float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0) {
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  uint32_t bits = exp == 0x1F ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_f16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7E00;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7C00;  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                       // below min normal 2^-14: subnormal or zero
    // value in units of 2^-24, rounded to nearest even in integer arithmetic (std::nearbyint
    // would follow the FPU's current rounding mode, which a caller may have changed)
    const float v = std::fabs(f) * 16777216.0f;  // exact scaling by 2^24
    auto r = static_cast<uint32_t>(v);           // truncates, whatever the mode
    const float rest = v - static_cast<float>(r);  // exact: the fraction of a float
    r += rest > 0.5f || (rest == 0.5f && (r & 1u));
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t m = a + 0xFFFu + ((a >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  return sign | static_cast<uint16_t>(((m >> 13) - (112u << 10)));
}

double load_as_double(const void* data, DType t, int64_t i) {
  const auto* p = static_cast<const unsigned char*>(data);
  switch (t) {
    case DType::F64: { double v; std::memcpy(&v, p + 8 * i, 8); return v; }
    case DType::F32: { float v; std::memcpy(&v, p + 4 * i, 4); return v; }
    case DType::F16: { uint16_t v; std::memcpy(&v, p + 2 * i, 2); return f16_bits_to_float(v); }
    case DType::BF16: { uint16_t v; std::memcpy(&v, p + 2 * i, 2); return bf16_bits_to_float(v); }
    case DType::F8_E4M3: return decode_e4m3(p[i]);
    case DType::F8_E5M2: return decode_e5m2(p[i]);
    case DType::I32: { int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
    case DType::I64: { int64_t v; std::memcpy(&v, p + 8 * i, 8); return static_cast<double>(v); }
    default: FP8MOE_FAIL("cannot read dtype ", dtype_name(t), " as a number");
  }
}

namespace {
// double -> float rounded to odd (truncate toward zero, then set the last bit if anything was
// dropped). Rounding that result to nearest even in any format with at least two fewer significand
// bits (bf16, f16, fp8) equals rounding the double once: plain RNE to float first could land
// exactly on a tie of the narrower format and round twice.
float round_to_odd_float(double v) {
  if (!std::isfinite(v)) return static_cast<float>(v);
  float f = static_cast<float>(v);
  if (static_cast<double>(f) == v) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);  // toward zero
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= 1u;  // sticky: v was not exact
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

void store_from_double(void* data, DType t, int64_t i, double v) {
  auto* p = static_cast<unsigned char*>(data);
  switch (t) {
    case DType::F64: std::memcpy(p + 8 * i, &v, 8); return;
    case DType::F32: { float f = static_cast<float>(v); std::memcpy(p + 4 * i, &f, 4); return; }
    case DType::F16: { uint16_t h = float_to_f16_bits(round_to_odd_float(v)); std::memcpy(p + 2 * i, &h, 2); return; }
    case DType::BF16: { uint16_t b = float_to_bf16_bits(round_to_odd_float(v)); std::memcpy(p + 2 * i, &b, 2); return; }
    case DType::F8_E4M3: p[i] = encode_e4m3_sat(round_to_odd_float(v)); return;
    case DType::F8_E5M2: p[i] = encode_e5m2_sat(round_to_odd_float(v)); return;
    case DType::I32: { int32_t x = static_cast<int32_t>(v); std::memcpy(p + 4 * i, &x, 4); return; }
    case DType::I64: { int64_t x = static_cast<int64_t>(v); std::memcpy(p + 8 * i, &x, 8); return; }
    default: FP8MOE_FAIL("cannot store a number as dtype ", dtype_name(t));
  }
}

}  // namespace fp8moe

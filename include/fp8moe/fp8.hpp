// FP8 codecs, bit-exact with PyTorch's float8_e4m3fn / float8_e5m2 casts.
//
// decode: exact. encode: round to nearest, ties to even. Two encoders, because the two uses differ:
//  - encode_*_torch: what `x.to(torch.float8_*)` does (no saturation: e4m3fn overflow -> NaN,
//    e5m2 overflow -> inf), used to reproduce torch bit-for-bit;
//  - encode_*_sat: clamps to +-max finite first (CUDA's __NV_SATFINITE), used by every quantizer,
//    because a scale of amax/448 can round a value a hair above 448.
// Usable from host and device code (no framework, no CUDA headers needed).
#pragma once

#include <cstdint>
#include <cstring>

#include "fp8moe/dtype.hpp"

namespace fp8moe {

constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

// e4m3fn: bias 7, 3 mantissa bits, no infinities, NaN = 0x7F/0xFF.
FP8MOE_HD float decode_e4m3(uint8_t c) {
  const uint32_t sign = (c & 0x80u) << 24;
  const uint32_t exp = (c >> 3) & 0xFu;
  const uint32_t man = c & 0x7u;
  uint32_t bits;
  if (exp == 0xF && man == 0x7) {
    bits = sign | 0x7fc00000u;  // NaN
  } else if (exp == 0) {
    // subnormal: man * 2^-9, exact in float
    float v = static_cast<float>(man) * (1.0f / 512.0f);
    return (c & 0x80u) ? -v : v;
  } else {
    bits = sign | ((exp + 127 - 7) << 23) | (man << 20);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// e5m2: bias 15, 2 mantissa bits, inf = 0x7C/0xFC, NaN = 0x7D-0x7F/0xFD-0xFF.
FP8MOE_HD float decode_e5m2(uint8_t c) {
  // e5m2 is the top byte of an IEEE half.
  const uint32_t sign = (c & 0x80u) << 24;
  const uint32_t exp = (c >> 2) & 0x1Fu;
  const uint32_t man = c & 0x3u;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7f800000u | (man ? 0x400000u : 0u);
  } else if (exp == 0) {
    float v = static_cast<float>(man) * (1.0f / 65536.0f);  // man * 2^-16
    return (c & 0x80u) ? -v : v;
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 21);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

namespace detail {
// Rounds |x| (finite, non-negative float bits) to a format with `man_bits` mantissa bits,
// exponent bias `bias`, smallest normal exponent 1-bias; returns code magnitude (exp<<man | man)
// which may exceed the largest finite code: the caller handles overflow.
FP8MOE_HD uint32_t round_fp8_magnitude(uint32_t abs_bits, int man_bits, int bias) {
  const int e = static_cast<int>(abs_bits >> 23) - 127;  // unbiased exponent of x
  const int min_e = 1 - bias;
  // Value = 1.m * 2^e. In the target, the quantum is 2^(max(e,min_e) - man_bits).
  uint32_t mant = (abs_bits & 0x7fffffu) | 0x800000u;  // 24-bit significand
  if ((abs_bits >> 23) == 0) return 0;                 // float zero/subnormal -> 0 (far below fp8)
  int shift = 23 - man_bits + ((e < min_e) ? (min_e - e) : 0);
  if (shift > 31) return 0;
  uint32_t q = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  // q is the significand in units of the quantum; convert to code magnitude.
  if (e < min_e) return q;  // subnormal range (q may round up into the first normal: still right)
  // normal: q in [2^man, 2^(man+1)]; exponent field = e + bias (+1 if q overflowed)
  uint32_t exp_field = static_cast<uint32_t>(e + bias);
  if (q >> (man_bits + 1)) { q >>= 1; ++exp_field; }
  return (exp_field << man_bits) | (q & ((1u << man_bits) - 1u));
}
}  // namespace detail

// PyTorch cast semantics: e4m3fn has no inf, so anything that rounds past 448 becomes NaN.
FP8MOE_HD uint8_t encode_e4m3_torch(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | 0x7F;  // inf or NaN -> NaN
  uint32_t m = detail::round_fp8_magnitude(a, 3, 7);
  if (m > 0x7E) return sign | 0x7F;  // past 448 -> NaN
  return sign | static_cast<uint8_t>(m);
}

FP8MOE_HD uint8_t encode_e5m2_torch(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7F;   // NaN
  if (a == 0x7f800000u) return sign | 0x7C;  // inf
  uint32_t m = detail::round_fp8_magnitude(a, 2, 15);
  if (m > 0x7B) return sign | 0x7C;  // overflow -> inf
  return sign | static_cast<uint8_t>(m);
}

// Saturating encoders for quantization: clamp to +-max first, NaN stays NaN.
FP8MOE_HD uint8_t encode_e4m3_sat(float x) {
  if (x != x) return 0x7F;
  x = x > kE4M3Max ? kE4M3Max : (x < -kE4M3Max ? -kE4M3Max : x);
  return encode_e4m3_torch(x);
}
FP8MOE_HD uint8_t encode_e5m2_sat(float x) {
  if (x != x) return 0x7F;
  x = x > kE5M2Max ? kE5M2Max : (x < -kE5M2Max ? -kE5M2Max : x);
  return encode_e5m2_torch(x);
}

FP8MOE_HD float decode_fp8(uint8_t c, bool e5m2) { return e5m2 ? decode_e5m2(c) : decode_e4m3(c); }
FP8MOE_HD uint8_t encode_fp8_sat(float x, bool e5m2) { return e5m2 ? encode_e5m2_sat(x) : encode_e4m3_sat(x); }
FP8MOE_HD float fp8_max(bool e5m2) { return e5m2 ? kE5M2Max : kE4M3Max; }

}  // namespace fp8moe

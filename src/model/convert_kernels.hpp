// The converter's row kernels (model/convert.cpp's workers run them on row chunks), internal to
// model/. Each is bit-identical to quant.hpp's reference, which favours clarity over speed; these
// favour speed: one dtype dispatch per chunk, a decode table, no per-element checks beyond the
// finiteness of quantizer inputs. tests/model/test_convert_kernels.cpp holds them to the
// reference on every code, every rounding tie and the partial edge blocks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fp8moe/dtype.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe::model {

// bf16(p) for p = code x scale, rounded ONCE (what store_from_double(BF16) does): the product of
// a <= 4-bit and a 24-bit significand is exact in a double, and rounding it to fp32 and then to
// BF16 could round twice; so fp32 rounded to odd first, then to nearest even. Branch-free: the
// inexact case is about every other element, a branch on it mispredicts.
inline uint16_t bf16_of_exact_product(double p) {
  float f = static_cast<float>(p);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const double back = static_cast<double>(f);
  const uint32_t inexact = back != p && p == p;                 // NaN stays as it is
  const uint32_t above = inexact & (std::fabs(back) > std::fabs(p));
  u -= above;    // truncate toward zero (|f| > 0 then; an infinite f becomes the largest finite, as nextafter)
  u |= inexact;  // sticky bit
  std::memcpy(&f, &u, 4);
  return float_to_bf16_bits(f);
}

// encode_e4m3_sat(x) for a finite x (fp8.hpp), without its general path: clamp to +-448, then
// round to nearest even on the fp32 bits (normal range) or on x * 2^9 (subnormal range), in
// integer arithmetic like the reference (whatever the FPU's rounding mode).
inline uint8_t encode_e4m3_sat_finite(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const auto sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x43e00000u) return sign | 0x7E;  // |x| >= 448: saturate to 448
  if (a < 0x3c800000u) {  // |x| < 2^-6: subnormal codes m * 2^-9 (8 = the first normal)
    float f;
    std::memcpy(&f, &a, 4);
    // f * 512 is exact (a power of two); round it to nearest even here, not with the FPU's
    // current rounding mode.
    const float q = f * 512.0f;
    auto m = static_cast<uint32_t>(q);  // truncates whatever the mode
    const float rest = q - static_cast<float>(m);
    m += rest > 0.5f || (rest == 0.5f && (m & 1u));
    return sign | static_cast<uint8_t>(m);
  }
  // Normal: round the 23-bit fp32 mantissa to 3 bits, to nearest even (a carry moves into the
  // exponent, as it should); the fp32 exponent bias 127 becomes e4m3's 7.
  a += 0x7ffffu + ((a >> 20) & 1u);
  return sign | static_cast<uint8_t>((a >> 20) - (120u << 3));
}

// One FP8 weight to dequantize: the codes as stored and its scales as F32.
struct DequantSource {
  TensorView codes;  // [lead, N, K] (or [N, K]) F8_E4M3 / F8_E5M2, contiguous, possibly unaligned
  Tensor scale;      // [lead * spec.numel()] F32
  ScaleSpec spec;    // per matrix [N, K]
};
// Rows [r0, r1) of the flattened [lead * N, K] codes -> BF16 out[(r1 - r0) * K]:
// bf16(code x scale), the exact product rounded once (quant.hpp's dequantize).
void dequantize_rows(const DequantSource& d, int64_t r0, int64_t r1, uint16_t* out);

// One plain weight to quantize to F8_E4M3 with (bn x bk) blocks (channel: 1 x K).
struct QuantSource {
  std::string name;  // for messages
  TensorView w;      // [N, K] BF16 / F16 / F32 / F64, contiguous, possibly unaligned
  int64_t bn = 1, bk = 1;
};
// Rows [r0, r1) (whole block rows: r0 % bn == 0, and r1 % bn == 0 or r1 == N) -> codes
// [(r1 - r0) * K] and scales [ceil((r1 - r0) / bn) * ceil(K / bk)], as quant.hpp's quantize: per
// block amax in fp32, scale = max(amax / 448, smallest normal fp32), code = saturating
// round-to-nearest-even of w / scale (an fp32 division, as torch). `band` is scratch. A
// non-finite weight is an error naming the tensor and the element [n, k].
void quantize_rows(const QuantSource& q, int64_t r0, int64_t r1, std::vector<float>& band, uint8_t* codes,
                   float* scales);

}  // namespace fp8moe::model

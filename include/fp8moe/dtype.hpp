// Element types: every dtype a safetensors file may name, with its size and canonical name,
// plus exact host-side conversions for the 16-bit floats (round to nearest even, as PyTorch).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#if defined(__CUDACC__)
#define FP8MOE_HD __host__ __device__ __forceinline__
#else
#define FP8MOE_HD inline
#endif

namespace fp8moe {

enum class DType : uint8_t {
  BOOL, U8, I8, I16, U16, I32, U32, I64, U64,
  F16, BF16, F32, F64, C64,
  F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  F4, F6_E2M3, F6_E3M2,
};

// Bits per element (sub-byte types pack; safetensors requires numel*bits to be a multiple of 8).
int dtype_bits(DType t);
// Bytes per element for byte-sized types; throws for sub-byte types.
int64_t dtype_size(DType t);
// The safetensors spelling ("F8_E4M3", "BF16", ...).
std::string_view dtype_name(DType t);
// Parses the safetensors spelling; nullopt when unknown.
std::optional<DType> parse_dtype(std::string_view s);

inline bool is_fp8(DType t) { return t == DType::F8_E4M3 || t == DType::F8_E5M2; }
inline bool is_float(DType t) {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64 || is_fp8(t);
}

// ---- 16-bit float conversions (host). Round to nearest even; NaN stays NaN.
FP8MOE_HD float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
FP8MOE_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float f16_bits_to_float(uint16_t h);
uint16_t float_to_f16_bits(float f);

// Reads element i of a buffer of float-like dtype (F64/F32/F16/BF16/FP8) as double.
// Unaligned buffers are fine (memcpy). Throws for non-float dtypes.
double load_as_double(const void* data, DType t, int64_t i);
// Stores v into element i (rounding once to the target dtype; FP8 saturates to its max finite).
void store_from_double(void* data, DType t, int64_t i, double v);

}  // namespace fp8moe

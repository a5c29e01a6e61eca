// Device pieces that the W8A8 passes share (w8a8.cu's quantizer, w8a8_epilogue.cu's epilogue
// passes): FP8 rows in 1 x 128 groups as the next GEMM reads them, and the expert of a row.
#pragma once

#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

#include "backends/cuda/gemm_tile.cuh"
#include "fp8moe/backend.hpp"

namespace fp8moe::cuda::w8a8 {

using gemm::Elem;

inline constexpr int kGroup = static_cast<int>(kFp8RowGroup);  // activation scale group along K (CUTLASS's K block)
inline constexpr float kE4m3Max = 448.0f;

// Expert of row r: the largest e with offsets[e] <= r (offsets[0] = 0 <= r).
__device__ __forceinline__ int expert_of(const int32_t* offsets, int E, int64_t r) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The group's scale from its amax: the smallest normal for an all-zero group, whose codes are then
// zero (0 / FLT_MIN = 0), never 0 / 0.
__device__ __forceinline__ float group_scale(float amax) { return fmaxf(amax / kE4m3Max, FLT_MIN); }

// amax of v over the 16 lanes of this half warp (every lane of the warp must call it).
__device__ __forceinline__ float half_warp_amax(const float (&v)[8]) {
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  return amax;
}

// The 8 codes of v / scale (saturating round-to-nearest-even, as the host's quantize_activations,
// so both give the same bits), little-endian in two words.
__device__ __forceinline__ void encode8(const float (&v)[8], float scale, uint32_t (&word)[2]) {
  word[0] = word[1] = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    word[j / 4] |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(v[j] / scale, __NV_SATFINITE, __NV_E4M3)) << (8 * (j % 4));
}

// The first min(8, rem) codes to out (rem > 0): one 8-byte store where the row allows (`vec`: rows
// of a multiple of 8 codes, so out is 8-byte aligned).
__device__ __forceinline__ void store_codes8(uint8_t* out, const uint32_t (&word)[2], int rem, bool vec) {
  if (rem >= 8 && vec) {
    *reinterpret_cast<uint2*>(out) = make_uint2(word[0], word[1]);
  } else {
    for (int j = 0; j < 8 && j < rem; ++j) out[j] = static_cast<uint8_t>(word[j / 4] >> (8 * (j % 4)));
  }
}

// A BF16 or F32 operand's element kind; other dtypes throw, naming the operand.
inline Elem elem_of(DType t, const char* name) {
  switch (t) {
    case DType::BF16: return Elem::BF16;
    case DType::F32: return Elem::F32;
    default: FP8MOE_FAIL("W8A8 grouped GEMM: ", name, " has dtype ", dtype_name(t), "; supported: BF16, F32");
  }
}

}  // namespace fp8moe::cuda::w8a8

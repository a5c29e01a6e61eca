// Device building blocks of the grouped GEMM family (sm_80+): operand element kinds, 8-element
// chunk loads and their conversion to BF16, ldmatrix / mma.sync wrappers, and the expert-tile
// scheduler that finds a CTA's expert and rows from the device-side routing plan.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "fp8moe/dtype.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe::cuda::gemm {

// Storage of an operand element. FP8 codes carry their format; the GEMM feeds BF16 to the
// tensor cores whatever the storage.
enum class Elem : uint8_t { BF16, F32, E4M3, E5M2 };

// Largest E the tile scheduler handles (its block scan holds E counts in registers).
constexpr int kMaxExperts = 1024;

// ---- scalar access (slow paths and epilogues; the kind is uniform across a launch)

__device__ __forceinline__ float load_elem(const void* p, Elem t, int64_t i) {
  switch (t) {
    case Elem::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case Elem::F32: return static_cast<const float*>(p)[i];
    case Elem::E4M3: return decode_e4m3(static_cast<const uint8_t*>(p)[i]);
    default: return decode_e5m2(static_cast<const uint8_t*>(p)[i]);
  }
}
// Element i of a BF16 or F32 array as raw bits, and their value. Loads that must all be in
// flight before the first use land raw and convert afterwards: load_elem converts inside its
// branches, so a run of them waits load by load (bench/NOTES.md, sixth session).
__device__ __forceinline__ uint32_t raw_elem(const void* p, bool f32, int64_t i) {
  return f32 ? __ldg(static_cast<const uint32_t*>(p) + i) : uint32_t{__ldg(static_cast<const unsigned short*>(p) + i)};
}
__device__ __forceinline__ float raw_value(uint32_t x, bool f32) { return f32 ? __uint_as_float(x) : __uint_as_float(x << 16); }
// 8 consecutive BF16 or F32 elements from index i (16-byte aligned), through the read-only path.
__device__ __forceinline__ void load_run8(const void* p, Elem t, int64_t i, float (&v)[8]) {
  if (t == Elem::BF16) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p) + i));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
      v[2 * j] = x.x, v[2 * j + 1] = x.y;
    }
  } else {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = __ldg(q), b = __ldg(q + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
}
// Stores to BF16 or F32 (outputs are never FP8).
__device__ __forceinline__ void store_elem(void* p, Elem t, int64_t i, float v) {
  if (t == Elem::BF16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
// 8 values to consecutive BF16 or F32 elements from index i (16-byte aligned).
__device__ __forceinline__ void store_run8(void* p, Elem t, int64_t i, const float (&v)[8]) {
  if (t == Elem::BF16) {
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p) + i) =
        make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
  } else {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// ---- 8-element chunks held in registers between the global load and the shared-memory store

template <int kBytes>
struct Chunk;
template <>
struct Chunk<1> {  // FP8 codes
  uint2 v;
};
template <>
struct Chunk<2> {  // BF16
  uint4 v;
};
template <>
struct Chunk<4> {  // F32
  uint4 v[2];
};

template <int kBytes>
__device__ __forceinline__ void load_chunk(Chunk<kBytes>& c, const void* p) {
  if constexpr (kBytes == 1) {
    c.v = __ldg(static_cast<const uint2*>(p));
  } else if constexpr (kBytes == 2) {
    c.v = __ldg(static_cast<const uint4*>(p));
  } else {
    c.v[0] = __ldg(static_cast<const uint4*>(p));
    c.v[1] = __ldg(static_cast<const uint4*>(p) + 1);
  }
}
template <int kBytes>
__device__ __forceinline__ void zero_chunk(Chunk<kBytes>& c) {
  if constexpr (kBytes == 1) {
    c.v = make_uint2(0, 0);
  } else if constexpr (kBytes == 2) {
    c.v = make_uint4(0, 0, 0, 0);
  } else {
    c.v[0] = c.v[1] = make_uint4(0, 0, 0, 0);
  }
}

// Four FP8 codes (one word) -> four floats, exactly, up to a power of two the caller folds into
// its scale (fp8_fold). sm_89+ converts in hardware (cvt.rn.f16x2.e4m3x2 / e5m2x2: every code,
// NaN included, is exact in FP16). Older cards re-bias into FP16 by bit moves alone: E5M2 is the
// top byte of an FP16; E4M3 shifted right by one lands in FP16 with the exponent 8 short (2^-8),
// subnormals included, and its NaN code (S.1111.111) is then mapped to an FP16 NaN explicitly
// (the shift alone would read it as 480).
__device__ __forceinline__ void fp8x4_to_float(uint32_t w, bool e5m2, float (&f)[4]) {
  uint32_t h[2];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // h[i] = FP16 pair of bytes 2i, 2i+1 (low byte -> low half)
    const __nv_fp8x2_storage_t x = static_cast<__nv_fp8x2_storage_t>(w >> (16 * i));
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(x, e5m2 ? __NV_E5M2 : __NV_E4M3);
    h[i] = uint32_t{r.x} | (uint32_t{r.y} << 16);
  }
#else
  h[0] = __byte_perm(w, 0, 0x1404);  // codes into FP16 high bytes
  h[1] = __byte_perm(w, 0, 0x3424);
  if (!e5m2)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      h[i] = ((h[i] & 0x7F007F00u) >> 1) | (h[i] & 0x80008000u);
      h[i] |= __vcmpeq2(h[i] & 0x7FFF7FFFu, 0x3F803F80u) & 0x7FFF7FFFu;  // NaN code -> FP16 NaN
    }
#endif
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&h[i]));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
// The factor fp8x4_to_float leaves out.
__device__ __forceinline__ float fp8_fold(bool e5m2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  (void)e5m2;
  return 1.0f;
#else
  return e5m2 ? 1.0f : 256.0f;
#endif
}

// A chunk times `scale` as 8 BF16 (one 16-byte shared-memory store). BF16 chunks are stored as
// they are (plain BF16 operands carry no scale).
__device__ __forceinline__ uint4 chunk_to_bf16(const Chunk<2>& c, float, bool) { return c.v; }
__device__ __forceinline__ uint4 chunk_to_bf16(const Chunk<4>& c, float scale, bool) {
  const float* f = reinterpret_cast<const float*>(c.v);
  return make_uint4(pack_bf16x2(f[0] * scale, f[1] * scale), pack_bf16x2(f[2] * scale, f[3] * scale),
                    pack_bf16x2(f[4] * scale, f[5] * scale), pack_bf16x2(f[6] * scale, f[7] * scale));
}
__device__ __forceinline__ uint4 chunk_to_bf16(const Chunk<1>& c, float scale, bool e5m2) {
  float lo[4], hi[4];
  fp8x4_to_float(c.v.x, e5m2, lo);
  fp8x4_to_float(c.v.y, e5m2, hi);
  const float s = scale * fp8_fold(e5m2);
  return make_uint4(pack_bf16x2(lo[0] * s, lo[1] * s), pack_bf16x2(lo[2] * s, lo[3] * s),
                    pack_bf16x2(hi[0] * s, hi[1] * s), pack_bf16x2(hi[2] * s, hi[3] * s));
}

// ---- tensor-core fragments

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// Asynchronous global -> shared copies (sm_80+). src_bytes < 16 zero-fills the rest, so rows
// past an expert's end cost no load.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  if constexpr (kBytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// D[16x8] += A[16x16] B[16x8], BF16 in, FP32 accumulate.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- expert-tile scheduler

// Row tile `tile` of a grouped launch, tiles numbered expert after expert with ceil(rows_e / BM)
// tiles for expert e. Every thread of the block must call it; it reads the E+1 device offsets
// (the host never does) and returns expert -1 when the tile is past the last one.
struct RowTile {
  int expert, row0, rows;
  int col_tile;  // the CTA's column tile (grid_tile)
};
// CTA b of a grouped launch takes row tile b / n_tiles and column tile b % n_tiles: the column
// tiles of a row tile run side by side, so its A rows come from DRAM once and from L2 for the
// other column tiles. With row tiles fastest, every column pass re-read the whole gathered A
// (12 x 512 MB for Qwen3's gate_up at 16384 tokens), far more than fits in L2.
struct GridTile {
  int row_tile, col_tile;
};
__device__ __forceinline__ GridTile grid_tile(int n_tiles) {
  return {static_cast<int>(blockIdx.x / n_tiles), static_cast<int>(blockIdx.x % n_tiles)};
}
template <int kThreads, int kBM>
__device__ RowTile find_row_tile(const int32_t* offsets, int experts, GridTile gt) {
  const int tile = gt.row_tile;
  constexpr int kItems = (kMaxExperts + kThreads - 1) / kThreads;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ RowTile found;
  if (threadIdx.x == 0) found = {-1, 0, 0, gt.col_tile};
  int tiles[kItems], first[kItems], start[kItems], count[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int e = threadIdx.x * kItems + i;  // blocked: thread t owns experts [t*kItems, (t+1)*kItems)
    start[i] = e < experts ? offsets[e] : 0;
    count[i] = e < experts ? offsets[e + 1] - start[i] : 0;
    tiles[i] = (count[i] + kBM - 1) / kBM;
  }
  Scan(scan_tmp).ExclusiveSum(tiles, first);  // synchronises: `found` is initialised before use
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (tile >= first[i] && tile < first[i] + tiles[i]) {
      const int row0 = start[i] + (tile - first[i]) * kBM;
      found = {static_cast<int>(threadIdx.x) * kItems + i, row0, min(kBM, start[i] + count[i] - row0), gt.col_tile};
    }
  }
  __syncthreads();
  return found;
}

}  // namespace fp8moe::cuda::gemm

// Per-expert reduction over the expert's rows (backend.hpp: GroupedOuter), the LoRA weight
// gradients:  out[e, n, q] = alpha * sum_{r of e} rs(r) * L[r, n] * R[r, q].
//
// Every output element is written by exactly one thread with one fixed summation order over the
// expert's rows, accumulating in fp32: bitwise reproducible without atomics; an expert with no
// rows writes zeros. Plain fp32 FMAs suffice (one side is the LoRA rank). Two kernels, chosen by
// gemm::choose_outer_kernel (gemm_heuristics.cpp):
//   small side  (N or Q <= 32, the LoRA shapes): a lane owns 4 consecutive columns of the
//               wide operand (2 above rank 16) and all their outputs; the expert's rows stream
//               through shared memory in 64-row chunks (cp.async, 3 stages), the 8 warps of a CTA
//               split each chunk's rows and a fixed tree adds their partial sums. The narrow side,
//               times the row scale, sits in shared memory and is read as a broadcast. The wide
//               operand is read once. Where experts x column blocks leave most SMs idle (one
//               group: the dense projections' LoRA gradients), each expert's rows are split
//               into contiguous ranges (gemm::outer_row_splits), one CTA each, writing F32
//               partials; a second pass adds them in split order. Still one fixed order.
//   general     one CTA per [64 x 64] output tile, both operands through shared memory; it
//               re-reads the wide operand once per 64 columns of the other and wastes 3/4 of its
//               tile on a 16-wide side (5.4 ms for the four LoRA gradients of GLM at T 16384
//               on an H100, against ~0.4 ms to read their inputs once).
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/gemm_parts.cuh"  // set_smem_limit
#include "backends/cuda/gemm_tile.cuh"
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda {
namespace {

using gemm::Elem;
using gemm::load_elem;
using gemm::raw_elem;
using gemm::raw_value;

constexpr int kTileN = 64, kTileQ = 64, kRowsPerStep = 32, kThreads = 256;

struct OuterParams {
  int N = 0, Q = 0, top_k = 1;
  const int32_t* offsets = nullptr;       // [E + 1]
  const int32_t* sorted_pairs = nullptr;  // [M]
  const void* left = nullptr;             // [M or T, N]
  Elem left_type = Elem::BF16;
  bool left_tokens = false;
  const void* right = nullptr;            // [M or T, Q]
  Elem right_type = Elem::BF16;
  bool right_tokens = false;
  const void* row_scale = nullptr;        // [M] by pair
  Elem rs_type = Elem::F32;
  float alpha = 1.0f;
  void* out = nullptr;                    // [E, N, Q]
  Elem out_type = Elem::F32;
};

__global__ void __launch_bounds__(kThreads) grouped_outer_kernel(const OuterParams p) {
  __shared__ float Ls[kRowsPerStep][kTileN];  // rs(r) * L[r, n0 + i]
  __shared__ float Rs[kRowsPerStep][kTileQ];  // R[r, q0 + j]
  __shared__ int s_lrow[kRowsPerStep], s_rrow[kRowsPerStep];
  __shared__ float s_rs[kRowsPerStep];

  const int e = blockIdx.y;
  const int q_tiles = (p.Q + kTileQ - 1) / kTileQ;
  const int n0 = (blockIdx.x / q_tiles) * kTileN, q0 = (blockIdx.x % q_tiles) * kTileQ;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;  // thread owns n0+ty+16i, q0+tx+16j
  const int r_begin = p.offsets[e], r_end = p.offsets[e + 1];

  float acc[4][4] = {};
  for (int r0 = r_begin; r0 < r_end; r0 += kRowsPerStep) {
    if (tid < kRowsPerStep) {
      const int r = r0 + tid;
      int lr = -1, rr = -1;
      float rs = 0.0f;
      if (r < r_end) {
        const int pair = p.sorted_pairs[r], tok = pair / p.top_k;
        lr = p.left_tokens ? tok : r;
        rr = p.right_tokens ? tok : r;
        rs = p.row_scale ? load_elem(p.row_scale, p.rs_type, pair) : 1.0f;
      }
      s_lrow[tid] = lr;
      s_rrow[tid] = rr;
      s_rs[tid] = rs;
    }
    __syncthreads();
    for (int i = tid; i < kRowsPerStep * kTileN; i += kThreads) {
      const int rr = i / kTileN, c = i % kTileN;
      const int lrow = s_lrow[rr], rrow = s_rrow[rr];
      Ls[rr][c] = (lrow >= 0 && n0 + c < p.N) ? s_rs[rr] * load_elem(p.left, p.left_type, int64_t{lrow} * p.N + n0 + c) : 0.0f;
      Rs[rr][c] = (rrow >= 0 && q0 + c < p.Q) ? load_elem(p.right, p.right_type, int64_t{rrow} * p.Q + q0 + c) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kRowsPerStep; ++rr) {
      float l[4], rv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) l[i] = Ls[rr][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) rv[j] = Rs[rr][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(l[i], rv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + ty + 16 * i, q = q0 + tx + 16 * j;
      if (n < p.N && q < p.Q)
        gemm::store_elem(p.out, p.out_type, (int64_t{e} * p.N + n) * p.Q + q, p.alpha * acc[i][j]);
    }
}

// The small-side kernel: a lane owns kLaneCols consecutive columns of the wide operand, a CTA
// 32 kLaneCols of them. The expert's rows go through shared memory in chunks (the pipeline
// below); the 8 warps split each chunk's rows, always the same rows to the same warp, and a
// fixed tree over the warps adds their partial sums at the end: one summation order. The narrow
// side, times the row scale, is read as a broadcast from shared memory, converted once per chunk.
constexpr int kSmallWarps = kThreads / 32;
// Columns per lane: 4 up to rank 16 (64 accumulators), 2 up to 32; more columns per load
// means fewer address and load instructions per FMA.
template <int kS>
constexpr int kLaneCols = kS > 16 ? 2 : 4;

// out[e] of the small-side kernel: wide operand `big` [rows, W], narrow `small` [rows, S],
// S <= kS. small_left: out[e, s, w] (the narrow side is L), else out[e, w, s].
struct SmallOuterParams {
  int W = 0, S = 0, top_k = 1;
  const int32_t* offsets = nullptr;
  const int32_t* sorted_pairs = nullptr;
  const void* big = nullptr;  // BF16 or F32: the kernel's kBigF32
  bool big_tokens = false;
  const void* small = nullptr;
  bool small_f32 = false;  // else BF16
  bool small_tokens = false, small_left = false;
  const void* row_scale = nullptr;
  bool rs_f32 = true;
  float alpha = 1.0f;
  void* out = nullptr;
  Elem out_type = Elem::F32;
  int E = 1;
  int splits = 1;             // row ranges per expert (blockIdx.z); > 1: partials, not out
  float* partial = nullptr;   // [splits, E, S, W] unscaled sums when splits > 1
};

// The small-side kernel's pipeline: chunks of kChunk rows; the wide operand's slice of each
// chunk (kChunk rows x the CTA's columns) is copied into one of kStages shared-memory stages by
// cp.async, kStages - 1 chunks ahead of the one being summed. A typical expert (~128 rows in a
// training step) is then in flight at once. The earlier version loaded each warp's rows into
// registers a batch of 8 at a time, with 4 of its 8 warps idle below 256 rows; this one is
// 15-19% faster at 128 rows per expert and within 3% at 1024 (H100, bench/NOTES.md twenty-second
// session), where both run at ~30% of the FP32 FMA rate.
constexpr int kChunk = 64, kStages = 3, kChunkRowsPerWarp = kChunk / kSmallWarps;
static_assert(kChunk % kSmallWarps == 0, "every warp takes the same number of rows of a chunk");

template <int kS, bool kBigF32>
struct SmallOuterSmem {
  static constexpr int kC = kLaneCols<kS>, kCols = 32 * kC;
  static constexpr int kBigBytes = kBigF32 ? 4 : 2, kRowBytes = kCols * kBigBytes;
  static constexpr int kStageBytes = kChunk * kRowBytes;
  static constexpr int kSwFloats = kChunk * kS;  // one chunk's rs(r) * small[r, s]
  static constexpr int kOffBytes = kStages * kChunk * 8;  // each stage's row offsets (int64)
  static constexpr int kPipeBytes = kStages * kStageBytes + 2 * kSwFloats * 4 + kOffBytes;
  static constexpr int kRedBytes = (kSmallWarps / 2) * kS * kCols * 4;  // the warps' tree sum
  static constexpr int kBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;
};

// The wide operand's row offsets are looked up once per row, not once per 16-byte piece: thread
// i < kChunk publishes row i's byte offset of a chunk into that chunk's slot of a small table,
// from a lookup it loaded a chunk earlier. Per piece, the lookup, the division by top_k and the
// 64-bit product had made the copies ~60 instructions each, about as many per chunk as the
// sums (SASS of the first version). The four LoRA gradients of a layer, H100 (bench/NOTES.md,
// twenty-third session): Qwen3 276 -> 249 us at T 2048, 1469 -> 1172 at T 16384; GLM 190 -> 172
// and 959 -> 801.

// Row r of the plan as its wide-operand row's source: the pair (by token) or r itself; -1 past
// r_end. The division by top_k waits for big_row_offset, when the offset is published.
__device__ __forceinline__ int big_row_source(const SmallOuterParams& p, int r, int r_end) {
  if (r >= r_end) return -1;
  return p.big_tokens ? p.sorted_pairs[r] : r;
}
__device__ __forceinline__ int64_t big_row_offset(const SmallOuterParams& p, int src, int bytes) {
  if (src < 0) return -1;
  return int64_t{p.big_tokens ? src / p.top_k : src} * p.W * bytes;
}

// Queues a chunk of the wide operand (its rows' byte offsets `offs`, < 0 past the range),
// columns [w0, w0 + kCols), into `stage`; zeros past the range and past W. kVec: 16-byte cp.async pieces (W a multiple of a
// piece, base aligned); else element by element (odd widths: correctness, not speed).
template <int kS, bool kBigF32, bool kVec>
__device__ __forceinline__ void issue_big_chunk(const SmallOuterParams& p, char* stage, const int64_t* offs, int w0) {
  using Sm = SmallOuterSmem<kS, kBigF32>;
  const char* big = static_cast<const char*>(p.big);
  if constexpr (kVec) {
    constexpr int kPieces = Sm::kRowBytes / 16, kPer = kChunk * kPieces / kThreads;
    static_assert(kChunk * kPieces % kThreads == 0, "whole pieces per thread");
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + kThreads * j, row = i / kPieces, pc = i % kPieces;
      const int col = w0 + pc * (16 / Sm::kBigBytes);
      const int64_t off = offs[row];
      const bool valid = off >= 0 && col < p.W;
      gemm::cp_async16(stage + row * Sm::kRowBytes + pc * 16, valid ? big + off + int64_t{col} * Sm::kBigBytes : big,
                       valid ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < kChunk * Sm::kCols; i += kThreads) {
      const int row = i / Sm::kCols, c = i % Sm::kCols;
      const int64_t off = offs[row];
      const uint32_t x = off >= 0 && w0 + c < p.W ? raw_elem(p.big, kBigF32, off / Sm::kBigBytes + w0 + c) : 0u;
      if constexpr (kBigF32) reinterpret_cast<uint32_t*>(stage)[i] = x;
      else reinterpret_cast<uint16_t*>(stage)[i] = static_cast<uint16_t>(x);
    }
  }
}

// This thread's share of one chunk's narrow values, loaded a chunk ahead into registers: row
// tid / 4 of the chunk, kPer consecutive values from s = (tid % 4) kPer, already times rs(r);
// zero past the range and past S. In the chunk's [kChunk, kS] block that is elements
// [tid kPer, (tid + 1) kPer).
template <int kS>
struct SmallShare {
  static constexpr int kPer = kChunk * kS / kThreads, kThreadsPerRow = kS / kPer;
  static_assert(kThreads == kChunk * kThreadsPerRow, "a thread per share");
  float v[kPer];
};
template <int kS>
__device__ __forceinline__ SmallShare<kS> load_small_chunk(const SmallOuterParams& p, int r0, int r_end) {
  using Share = SmallShare<kS>;
  SmallShare<kS> out;
  const int r = r0 + threadIdx.x / Share::kThreadsPerRow, s0 = threadIdx.x % Share::kThreadsPerRow * Share::kPer;
  uint32_t raw[Share::kPer], rs_raw = __float_as_uint(1.0f);
#pragma unroll
  for (int j = 0; j < Share::kPer; ++j) raw[j] = 0u;
  if (r < r_end) {  // all loads first, then the conversions
    const int pair = p.small_tokens || p.row_scale ? p.sorted_pairs[r] : 0;
    const int64_t base = int64_t{p.small_tokens ? pair / p.top_k : r} * p.S;
#pragma unroll
    for (int j = 0; j < Share::kPer; ++j)
      if (s0 + j < p.S) raw[j] = raw_elem(p.small, p.small_f32, base + s0 + j);
    if (p.row_scale) rs_raw = raw_elem(p.row_scale, p.rs_f32, pair);
  }
  const float rs = p.row_scale ? raw_value(rs_raw, p.rs_f32) : 1.0f;
#pragma unroll
  for (int j = 0; j < Share::kPer; ++j) out.v[j] = rs * raw_value(raw[j], p.small_f32);
  return out;
}

template <int kS, bool kBigF32, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) grouped_outer_small_kernel(const SmallOuterParams p) {
  using Sm = SmallOuterSmem<kS, kBigF32>;
  constexpr int kC = Sm::kC, kCols = Sm::kCols;
  extern __shared__ float4 smem_dyn[];
  char* stages = reinterpret_cast<char*>(smem_dyn);
  float* sw = reinterpret_cast<float*>(stages + kStages * Sm::kStageBytes);  // [2][kChunk][kS]
  int64_t* offs = reinterpret_cast<int64_t*>(sw + 2 * Sm::kSwFloats);         // [kStages][kChunk]
  const int e = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int w0 = blockIdx.x * kCols;
  // This CTA's rows: split blockIdx.z of the expert's, in whole chunks.
  int r_begin = p.offsets[e], r_end = p.offsets[e + 1];
  if (p.splits > 1) {  // in 64 bits: near 2^31 rows, r_begin + z * per would overflow an int
    const int64_t per = ((int64_t{r_end} - r_begin + p.splits - 1) / p.splits + kChunk - 1) / kChunk * kChunk;
    const int64_t begin = std::min<int64_t>(r_end, r_begin + blockIdx.z * per);
    r_end = static_cast<int>(std::min<int64_t>(r_end, begin + per));
    r_begin = static_cast<int>(begin);
  }
  const int chunks = (r_end - r_begin + kChunk - 1) / kChunk;
  float acc[kC][kS];
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int s = 0; s < kS; ++s) acc[c][s] = 0.0f;

  // Chunk t sits in stage t % kStages, its row offsets in slot t % kStages; a group is committed
  // per chunk, empty past the last, so that wait<kStages - 2> always means "chunk t has landed".
  int src_next = -1;  // thread i < kChunk: the source of row i of the next chunk to publish
  if (tid < kChunk) {
#pragma unroll
    for (int t = 0; t < kStages; ++t)
      offs[t * kChunk + tid] = big_row_offset(p, big_row_source(p, r_begin + t * kChunk + tid, r_end), Sm::kBigBytes);
    src_next = big_row_source(p, r_begin + kStages * kChunk + tid, r_end);
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < chunks) issue_big_chunk<kS, kBigF32, kVec>(p, stages + t * Sm::kStageBytes, offs + t * kChunk, w0);
    gemm::cp_async_commit();
  }
  SmallShare<kS> next = load_small_chunk<kS>(p, r_begin, r_end);
  for (int t = 0; t < chunks; ++t) {
    // Chunk t's narrow values into its half of sw. The half was last read for chunk t - 2,
    // before the barrier of chunk t - 1.
    float* swt = sw + (t % 2) * Sm::kSwFloats;
#pragma unroll
    for (int j = 0; j < SmallShare<kS>::kPer; j += 4)
      *reinterpret_cast<float4*>(swt + tid * SmallShare<kS>::kPer + j) = make_float4(next.v[j], next.v[j + 1], next.v[j + 2], next.v[j + 3]);
    gemm::cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk t's stage and narrow values are visible; chunk t - 1 is summed
    if (t + kStages - 1 < chunks)  // into the stage chunk t - 1 used
      issue_big_chunk<kS, kBigF32, kVec>(p, stages + (t + kStages - 1) % kStages * Sm::kStageBytes,
                                         offs + (t + kStages - 1) % kStages * kChunk, w0);
    gemm::cp_async_commit();
    // Chunk t + kStages's offsets into slot t % kStages: chunk t's, read when chunk t was queued
    // (two barriers ago); read in turn after the next barrier, when chunk t + kStages is queued.
    if (tid < kChunk && t + kStages < chunks) {
      offs[t % kStages * kChunk + tid] = big_row_offset(p, src_next, Sm::kBigBytes);
      src_next = big_row_source(p, r_begin + (t + kStages + 1) * kChunk + tid, r_end);
    }
    if (t + 1 < chunks) next = load_small_chunk<kS>(p, r_begin + (t + 1) * kChunk, r_end);
    // Warp w sums rows [w kChunkRowsPerWarp, (w + 1) kChunkRowsPerWarp) of the chunk: a fixed
    // order. A lane reads its kC columns of a row; the narrow values are a broadcast.
    const char* st = stages + t % kStages * Sm::kStageBytes;
#pragma unroll 1
    for (int i = 0; i < kChunkRowsPerWarp; ++i) {
      const int row = warp * kChunkRowsPerWarp + i;
      const char* q = st + row * Sm::kRowBytes + lane * kC * Sm::kBigBytes;
      float v[kC];
      if constexpr (kBigF32) {
        if constexpr (kC == 4) {
          const float4 x = *reinterpret_cast<const float4*>(q);
          v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
        } else {
          const float2 x = *reinterpret_cast<const float2*>(q);
          v[0] = x.x, v[1] = x.y;
        }
      } else {
        if constexpr (kC == 4) {
          const uint2 x = *reinterpret_cast<const uint2*>(q);
          v[0] = __uint_as_float(x.x << 16), v[1] = __uint_as_float(x.x & 0xFFFF0000u);
          v[2] = __uint_as_float(x.y << 16), v[3] = __uint_as_float(x.y & 0xFFFF0000u);
        } else {
          const uint32_t x = *reinterpret_cast<const uint32_t*>(q);
          v[0] = __uint_as_float(x << 16), v[1] = __uint_as_float(x & 0xFFFF0000u);
        }
      }
      const float* srow = swt + row * kS;
#pragma unroll
      for (int s = 0; s < kS; s += 4) {
        const float4 x = *reinterpret_cast<const float4*>(srow + s);
        const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int c = 0; c < kC; ++c) acc[c][s + j] = fmaf(v[c], xs[j], acc[c][s + j]);
      }
    }
  }
  gemm::cp_async_wait<0>();  // nothing may land in the reduction's slots

  // Fixed tree over the warps: in each round the upper half adds into the lower half.
  float(*red)[kS][kCols] = reinterpret_cast<float(*)[kS][kCols]>(smem_dyn);
  for (int half = kSmallWarps / 2; half >= 1; half /= 2) {
    __syncthreads();  // the pipeline's buffers (or the last round's slots) are free
    if (warp >= half && warp < 2 * half)
#pragma unroll
      for (int s = 0; s < kS; ++s)
#pragma unroll
        for (int c = 0; c < kC; ++c) red[warp - half][s][kC * lane + c] = acc[c][s];
    __syncthreads();
    if (warp < half)
#pragma unroll
      for (int s = 0; s < kS; ++s)
#pragma unroll
        for (int c = 0; c < kC; ++c) acc[c][s] += red[warp][s][kC * lane + c];
  }
  __syncthreads();
  if (warp == 0)
#pragma unroll
    for (int s = 0; s < kS; ++s)
#pragma unroll
      for (int c = 0; c < kC; ++c) red[0][s][kC * lane + c] = acc[c][s];
  __syncthreads();
  const int cols = min(kCols, p.W - w0);
  if (p.splits > 1) {  // this split's partial sums, [z, e, s, w]: coalesced along w
    float* part = p.partial + (int64_t{blockIdx.z} * p.E + e) * p.S * p.W;
    for (int i = tid; i < cols * p.S; i += kThreads) {
      const int s = i / cols, c = i % cols;
      part[int64_t{s} * p.W + w0 + c] = red[0][s][c];
    }
    return;
  }
  // Coalesced stores in the output's own order.
  for (int i = tid; i < cols * p.S; i += kThreads) {
    const int s = p.small_left ? i / cols : i % p.S, c = p.small_left ? i % cols : i / p.S;
    const int64_t at = p.small_left ? (int64_t{e} * p.S + s) * p.W + w0 + c : (int64_t{e} * p.W + w0 + c) * p.S + s;
    gemm::store_elem(p.out, p.out_type, at, p.alpha * red[0][s][c]);
  }
}

// out = alpha * (sum of the splits' partials, split 0 first), one thread per output element in
// the output's order.
__global__ void __launch_bounds__(kThreads) outer_split_sum_kernel(const SmallOuterParams p) {
  const int64_t per_expert = int64_t{p.S} * p.W, total = p.E * per_expert;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t e = i / per_expert, j = i % per_expert;
    const int64_t s = p.small_left ? j / p.W : j % p.S, w = p.small_left ? j % p.W : j / p.S;
    const float* src = p.partial + (e * p.S + s) * p.W + w;
    float acc = 0.0f;
    for (int z = 0; z < p.splits; ++z) acc += src[z * p.E * per_expert];
    gemm::store_elem(p.out, p.out_type, i, p.alpha * acc);
  }
}

Elem float_elem(const TensorView& t, const char* name) {
  FP8MOE_CHECK(t.device == Device::CUDA, "grouped_outer: ", name, " must be on the GPU, found ", t.str());
  check_dtype(t, name, {DType::BF16, DType::F32});
  check_contiguous(t, name);
  return t.dtype == DType::BF16 ? Elem::BF16 : Elem::F32;
}

}  // namespace

void grouped_outer(const GroupedOuter& g, Allocator& alloc, cudaStream_t stream) {
  FP8MOE_CHECK(g.plan != nullptr, "grouped_outer: plan is null");
  const RoutingPlan& plan = *g.plan;
  const int64_t M = plan.rows(), E = plan.experts, T = plan.tokens;
  FP8MOE_CHECK(E >= 1 && E < 65536, "grouped_outer: experts = ", E, " outside [1, 65535]");
  FP8MOE_CHECK(g.left.src.rank() == 2 && g.right.src.rank() == 2, "grouped_outer: left and right must be rank 2, found ",
               g.left.src.str(), " and ", g.right.src.str());
  const int64_t N = g.left.src.size(1), Q = g.right.src.size(1);
  OuterParams p;
  p.left_type = float_elem(g.left.src, "grouped_outer left");
  p.right_type = float_elem(g.right.src, "grouped_outer right");
  p.left_tokens = g.left.rows == RowSource::Tokens;
  p.right_tokens = g.right.rows == RowSource::Tokens;
  check_shape(g.left.src, "grouped_outer left", {p.left_tokens ? T : M, N});
  check_shape(g.right.src, "grouped_outer right", {p.right_tokens ? T : M, Q});
  p.out_type = float_elem(g.out, "grouped_outer out");
  check_shape(g.out, "grouped_outer out [E, N, Q]", {E, N, Q});
  if (g.row_scale.defined()) {
    p.rs_type = float_elem(g.row_scale, "grouped_outer row_scale");
    check_shape(g.row_scale, "grouped_outer row_scale", {M});
    p.row_scale = g.row_scale.data;
  }
  FP8MOE_CHECK(N < (int64_t{1} << 30) && Q < (int64_t{1} << 30), "grouped_outer: N = ", N, ", Q = ", Q, " too large");
  if (N == 0 || Q == 0) return;
  p.N = static_cast<int>(N);
  p.Q = static_cast<int>(Q);
  p.top_k = static_cast<int>(plan.top_k);
  p.offsets = plan.offsets.ptr<const int32_t>();
  p.sorted_pairs = plan.sorted_pairs.ptr<const int32_t>();
  p.left = g.left.src.data;
  p.right = g.right.src.data;
  p.alpha = static_cast<float>(g.alpha);
  p.out = g.out.data;

  const gemm::OuterKernel kernel = gemm::choose_outer_kernel(N, Q);
  gemm::log_choice_once([&] {
    return "grouped_outer out [" + std::to_string(g.out.size(0)) + ", " + std::to_string(N) + ", " +
           std::to_string(Q) + "] -> " + gemm::outer_kernel_name(kernel);
  });
  if (kernel != gemm::OuterKernel::General) {
    SmallOuterParams sp;
    sp.small_left = N <= Q;  // the narrow side
    sp.W = static_cast<int>(sp.small_left ? Q : N);
    sp.S = static_cast<int>(sp.small_left ? N : Q);
    sp.top_k = p.top_k;
    sp.offsets = p.offsets;
    sp.sorted_pairs = p.sorted_pairs;
    sp.big = sp.small_left ? p.right : p.left;
    const bool big_f32 = (sp.small_left ? p.right_type : p.left_type) == Elem::F32;
    sp.big_tokens = sp.small_left ? p.right_tokens : p.left_tokens;
    sp.small = sp.small_left ? p.left : p.right;
    sp.small_f32 = (sp.small_left ? p.left_type : p.right_type) == Elem::F32;
    sp.small_tokens = sp.small_left ? p.left_tokens : p.right_tokens;
    sp.row_scale = p.row_scale;
    sp.rs_f32 = p.rs_type == Elem::F32;
    sp.alpha = p.alpha;
    sp.out = p.out;
    sp.out_type = p.out_type;
    sp.E = static_cast<int>(E);
    Tensor partial;  // the splits' sums; lives until the sum pass below is queued
    const auto launch = [&](auto s_tag, auto f32_tag) {
      constexpr int kS = decltype(s_tag)::value;
      constexpr bool kF32 = decltype(f32_tag)::value;
      using Sm = SmallOuterSmem<kS, kF32>;
      const int64_t col_blocks = (sp.W + Sm::kCols - 1) / Sm::kCols;
      sp.splits = gemm::outer_row_splits(M, E, col_blocks);
      if (sp.splits > 1) {
        partial = Tensor(DType::F32, {sp.splits, E, sp.S, sp.W}, alloc);
        sp.partial = partial.ptr<float>();
      }
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(E), static_cast<unsigned>(sp.splits));
      // 16-byte copies of the wide operand: W a multiple of a 16-byte piece, the base aligned.
      const auto run = [&](auto kernel) {
        gemm::set_smem_limit(kernel, Sm::kBytes);  // past the 48 KB default
        kernel<<<grid, kThreads, Sm::kBytes, stream>>>(sp);
      };
      if (sp.W % (16 / Sm::kBigBytes) == 0 && reinterpret_cast<uintptr_t>(sp.big) % 16 == 0)
        run(grouped_outer_small_kernel<kS, kF32, true>);
      else
        run(grouped_outer_small_kernel<kS, kF32, false>);
    };
    const auto by_f32 = [&](auto s_tag) {
      big_f32 ? launch(s_tag, std::true_type{}) : launch(s_tag, std::false_type{});
    };
    if (kernel == gemm::OuterKernel::Narrow16)
      by_f32(std::integral_constant<int, 16>{});
    else
      by_f32(std::integral_constant<int, gemm::kOuterNarrowMax>{});
    FP8MOE_CUDA_LAUNCH_CHECK("grouped_outer_small_kernel");
    if (sp.splits > 1) {
      const int64_t total = E * sp.S * sp.W, blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 4096);
      outer_split_sum_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(sp);
      FP8MOE_CUDA_LAUNCH_CHECK("outer_split_sum_kernel");
    }
    return;
  }
  const int64_t tiles = ((N + kTileN - 1) / kTileN) * ((Q + kTileQ - 1) / kTileQ);
  FP8MOE_CHECK(tiles < (int64_t{1} << 31), "grouped_outer: too many output tiles (", tiles, ")");
  // Launched even when M = 0: every expert then writes zeros.
  grouped_outer_kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(E)), kThreads, 0, stream>>>(p);
  FP8MOE_CUDA_LAUNCH_CHECK("grouped_outer_kernel");
}

}  // namespace fp8moe::cuda

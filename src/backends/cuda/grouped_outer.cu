// Per-expert reduction over the expert's rows (backend.hpp: GroupedOuter), the LoRA weight
// gradients:  out[e, n, q] = alpha * sum_{r of e} rs(r) * L[r, n] * R[r, q].
//
// Every output element is written by exactly one thread with one fixed summation order over the
// expert's rows, accumulating in fp32: bitwise reproducible without atomics; an expert with no
// rows writes zeros. Plain fp32 FMAs suffice (one side is the LoRA rank). Two kernels, chosen by
// gemm::choose_outer_kernel (gemm_heuristics.cpp):
//   small side  (N or Q <= 32, the LoRA shapes): a lane owns 4 consecutive columns of the
//               wide operand (2 above rank 16) and all their outputs; the 8 warps of a CTA split
//               the expert's rows and a fixed tree adds their partial sums. Per step of 32 rows
//               a lane loads its own columns of the wide operand straight from global memory
//               (one vector load per row, a batch of them in flight), while the narrow side,
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
// 32 kLaneCols of them, and its 8 warps split the expert's rows, warp w taking the 32-row steps
// w, w + 8, ...; a fixed tree over the warps then adds their partial sums. Several warps per
// column block keep many loads in flight even for one hot expert; the summation order is fixed.
// Every load lands in a raw register and is converted only after its whole batch is issued: a
// conversion next to its load (inside the branches of a generic element load) made each load
// wait for the one before (ncu: 11.7 cycles per issued instruction, DRAM at 8%). Each row's
// byte offset is computed once, by the lane that looks the row up, and broadcast.
constexpr int kSmallWarps = kThreads / 32, kSmallRows = 32;
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
  bool small_vec = false;  // S == kS and 16-byte aligned rows: a lane stages its own row
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

// A lane's kC columns of one wide-side row as raw words: BF16 two to a word, F32 one.
template <int kC, bool kF32>
struct LaneRun {
  static constexpr int kWords = kF32 ? kC : kC / 2;
  uint32_t w[kWords];
  __device__ __forceinline__ float value(int c) const {
    if constexpr (kF32) return __uint_as_float(w[c]);
    else return __uint_as_float(c % 2 ? w[c / 2] & 0xFFFF0000u : w[c / 2] << 16);
  }
};
// big[row, w .. w + kC - 1] where `off` is the row's byte offset (< 0: no row): zeros past W.
// kVec (W % kC == 0, base aligned): one load at lane_base + off; else element by element.
template <int kC, bool kF32, bool kVec>
__device__ __forceinline__ LaneRun<kC, kF32> load_lane_run(const SmallOuterParams& p, const char* lane_base,
                                                           int64_t off, int w) {
  LaneRun<kC, kF32> v;
#pragma unroll
  for (int i = 0; i < LaneRun<kC, kF32>::kWords; ++i) v.w[i] = 0u;
  if (off < 0 || w >= p.W) return v;
  if constexpr (kVec) {
    constexpr int kWords = LaneRun<kC, kF32>::kWords;
    const void* q = lane_base + off;
    if constexpr (kWords == 1) {
      v.w[0] = __ldg(static_cast<const uint32_t*>(q));
    } else if constexpr (kWords == 2) {
      const uint2 x = __ldg(static_cast<const uint2*>(q));
      v.w[0] = x.x, v.w[1] = x.y;
    } else {
      const uint4 x = __ldg(static_cast<const uint4*>(q));
      v.w[0] = x.x, v.w[1] = x.y, v.w[2] = x.z, v.w[3] = x.w;
    }
  } else {
    const int64_t i = off / (kF32 ? 4 : 2) + w;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const uint32_t x = w + c < p.W ? raw_elem(p.big, kF32, i + c) : 0u;
      if constexpr (kF32) v.w[c] = x;
      else v.w[c / 2] |= x << (16 * (c % 2));
    }
  }
  return v;
}

template <int kS, bool kBigF32, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) grouped_outer_small_kernel(const SmallOuterParams p) {
  constexpr int kC = kLaneCols<kS>, kCols = 32 * kC;
  constexpr int kBatch = LaneRun<kC, kBigF32>::kWords >= 4 ? 4 : 8;  // loads in flight per lane
  static_assert(kSmallRows % kBatch == 0, "a step is whole batches");
  // Per warp: its step's rs(r) * small[r, s] (0 past S or the rows); then the reduction's slots.
  constexpr int kStageFloats = kSmallWarps * kSmallRows * kS, kRedFloats = (kSmallWarps / 2) * kS * kCols;
  __shared__ alignas(16) float smem[kStageFloats > kRedFloats ? kStageFloats : kRedFloats];
  const int e = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int w = blockIdx.x * kCols + kC * lane;  // this lane's first column
  // This CTA's rows: split blockIdx.z of the expert's, in whole 32-row steps.
  int r_begin = p.offsets[e], r_end = p.offsets[e + 1];
  if (p.splits > 1) {  // in 64 bits: near 2^31 rows, r_begin + z * per would overflow an int
    const int64_t per = ((int64_t{r_end} - r_begin + p.splits - 1) / p.splits + kSmallRows - 1) / kSmallRows * kSmallRows;
    const int64_t begin = std::min<int64_t>(r_end, r_begin + blockIdx.z * per);
    r_end = static_cast<int>(std::min<int64_t>(r_end, begin + per));
    r_begin = static_cast<int>(begin);
  }
  float(*Sw)[kS] = reinterpret_cast<float(*)[kS]>(smem + warp * kSmallRows * kS);
  constexpr int kBigBytes = kBigF32 ? 4 : 2;
  const char* lane_base = static_cast<const char*>(p.big) + int64_t{w} * kBigBytes;
  float acc[kC][kS];
#pragma unroll
  for (int c = 0; c < kC; ++c)
#pragma unroll
    for (int s = 0; s < kS; ++s) acc[c][s] = 0.0f;

  for (int r0 = r_begin + warp * kSmallRows; r0 < r_end; r0 += kSmallWarps * kSmallRows) {
    // Lane i looks up row r0 + i; then the warp stages the step's narrow values times the row
    // scale: a lane its own row by 16-byte loads where rows are whole (S == kS), else
    // consecutive lanes on consecutive elements (a lane per row by 2-byte loads made 32 sectors
    // a load instruction).
    const int r = r0 + lane;
    int srow = -1;
    int64_t boff = -1;  // byte offset of the row in big
    uint32_t rs_raw = 0;
    if (r < r_end) {
      const int pair = p.sorted_pairs[r];
      srow = p.small_tokens ? pair / p.top_k : r;
      boff = int64_t{p.big_tokens ? pair / p.top_k : r} * p.W * kBigBytes;
      rs_raw = p.row_scale ? raw_elem(p.row_scale, p.rs_f32, pair) : __float_as_uint(1.0f);
    }
    const float rs = p.row_scale ? raw_value(rs_raw, p.rs_f32) : __uint_as_float(rs_raw);
    if (p.small_vec) {  // S == kS, aligned: lane i copies its own row with 16-byte loads
      constexpr int kVecs = kS * 4 / 16;  // 16-byte words of an F32 row (BF16: half of them)
      float f[kS];
      if (p.small_f32) {
        uint4 x[kVecs];
#pragma unroll
        for (int v = 0; v < kVecs; ++v)
          x[v] = srow >= 0 ? __ldg(static_cast<const uint4*>(p.small) + int64_t{srow} * kVecs + v) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int v = 0; v < kVecs; ++v)
          f[4 * v] = __uint_as_float(x[v].x), f[4 * v + 1] = __uint_as_float(x[v].y),
          f[4 * v + 2] = __uint_as_float(x[v].z), f[4 * v + 3] = __uint_as_float(x[v].w);
      } else {
        uint4 x[kVecs / 2];
#pragma unroll
        for (int v = 0; v < kVecs / 2; ++v)
          x[v] = srow >= 0 ? __ldg(static_cast<const uint4*>(p.small) + int64_t{srow} * (kVecs / 2) + v)
                           : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int v = 0; v < kVecs / 2; ++v) {
          const uint32_t q[4] = {x[v].x, x[v].y, x[v].z, x[v].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) f[8 * v + 2 * j] = raw_value(q[j] & 0xFFFFu, false), f[8 * v + 2 * j + 1] = raw_value(q[j] >> 16, false);
        }
      }
#pragma unroll
      for (int v = 0; v < kS / 4; ++v)
        *reinterpret_cast<float4*>(&Sw[lane][4 * v]) = make_float4(rs * f[4 * v], rs * f[4 * v + 1], rs * f[4 * v + 2], rs * f[4 * v + 3]);
    } else {
#pragma unroll
      for (int j0 = 0; j0 < kS; j0 += 8) {  // 8 loads in flight, then their conversions
        uint32_t sv[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int i = lane + 32 * (j0 + j), rr = i / kS, s = i % kS;
          const int row = __shfl_sync(0xFFFFFFFFu, srow, rr);
          sv[j] = row >= 0 && s < p.S ? raw_elem(p.small, p.small_f32, int64_t{row} * p.S + s) : 0u;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int i = lane + 32 * (j0 + j), rr = i / kS, s = i % kS;
          Sw[rr][s] = __shfl_sync(0xFFFFFFFFu, rs, rr) * raw_value(sv[j], p.small_f32);
        }
      }
    }
    __syncwarp();
#pragma unroll 1  // one batch of loads at a time: unrolled, the hoisted loads spilled
    for (int i0 = 0; i0 < kSmallRows; i0 += kBatch) {
      LaneRun<kC, kBigF32> b[kBatch];  // the whole batch in flight before the first conversion
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        b[i] = load_lane_run<kC, kBigF32, kVec>(p, lane_base, __shfl_sync(0xFFFFFFFFu, boff, i0 + i), w);
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        float v[kC];
#pragma unroll
        for (int c = 0; c < kC; ++c) v[c] = b[i].value(c);
#pragma unroll
        for (int s = 0; s < kS; s += 4) {
          const float4 x = *reinterpret_cast<const float4*>(&Sw[i0 + i][s]);
          const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < kC; ++c) acc[c][s + j] = fmaf(v[c], xs[j], acc[c][s + j]);
        }
      }
    }
    __syncwarp();  // the next step overwrites Sw
  }

  // Fixed tree over the warps: in each round the upper half adds into the lower half.
  float(*red)[kS][kCols] = reinterpret_cast<float(*)[kS][kCols]>(smem);
  for (int half = kSmallWarps / 2; half >= 1; half /= 2) {
    __syncthreads();  // the staging area (or the last round's slots) is free
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
  const int w0 = blockIdx.x * kCols, cols = min(kCols, p.W - w0);
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
      constexpr int kS = decltype(s_tag)::value, kC = kLaneCols<kS>;
      constexpr bool kF32 = decltype(f32_tag)::value;
      sp.small_vec = sp.S == kS && reinterpret_cast<uintptr_t>(sp.small) % 16 == 0;
      const int64_t col_blocks = (sp.W + 32 * kC - 1) / (32 * kC);
      sp.splits = gemm::outer_row_splits(M, E, col_blocks);
      if (sp.splits > 1) {
        partial = Tensor(DType::F32, {sp.splits, E, sp.S, sp.W}, alloc);
        sp.partial = partial.ptr<float>();
      }
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(E), static_cast<unsigned>(sp.splits));
      // Whole lane runs: W % kC == 0 and the base aligned to a run.
      if (sp.W % kC == 0 && reinterpret_cast<uintptr_t>(sp.big) % (kC * (kF32 ? 4 : 2)) == 0)
        grouped_outer_small_kernel<kS, kF32, true><<<grid, kThreads, 0, stream>>>(sp);
      else
        grouped_outer_small_kernel<kS, kF32, false><<<grid, kThreads, 0, stream>>>(sp);
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

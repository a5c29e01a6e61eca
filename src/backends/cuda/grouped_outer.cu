// Per-expert reduction over the expert's rows (backend.hpp: GroupedOuter), the LoRA weight
// gradients:  out[e, n, q] = alpha * sum_{r of e} rs(r) * L[r, n] * R[r, q].
//
// One CTA owns one [64 x 64] output tile of one expert and walks the expert's rows in a fixed
// order, 32 rows at a time through shared memory, accumulating in fp32: every output element
// is written by exactly one thread with one fixed summation order, so results are bitwise
// reproducible without atomics. The sizes are small (N or Q is the LoRA rank), so plain fp32
// FMAs suffice; an expert with no rows writes zeros.
#include <cuda_runtime.h>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/gemm_tile.cuh"
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda {
namespace {

using gemm::Elem;
using gemm::load_elem;

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

Elem float_elem(const TensorView& t, const char* name) {
  FP8MOE_CHECK(t.device == Device::CUDA, "grouped_outer: ", name, " must be on the GPU, found ", t.str());
  check_dtype(t, name, {DType::BF16, DType::F32});
  check_contiguous(t, name);
  return t.dtype == DType::BF16 ? Elem::BF16 : Elem::F32;
}

}  // namespace

void grouped_outer(const GroupedOuter& g, cudaStream_t stream) {
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

  const int64_t tiles = ((N + kTileN - 1) / kTileN) * ((Q + kTileQ - 1) / kTileQ);
  FP8MOE_CHECK(tiles < (int64_t{1} << 31), "grouped_outer: too many output tiles (", tiles, ")");
  // Launched even when M = 0: every expert then writes zeros.
  grouped_outer_kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(E)), kThreads, 0, stream>>>(p);
  FP8MOE_CUDA_LAUNCH_CHECK("grouped_outer_kernel");
}

}  // namespace fp8moe::cuda

// The FP8 dgrad of the W8A8 path (w8a8.cuh: Dgrad): the input-gradient GEMMs of the backward on
// FP8 tensor cores, reading the forward's stored FP8 weights transposed (no transposed copy).
//
// D[r, n] = sum_kb sa[r, kb] * sw_e(kb, n) * sum_{k in kb} qa[r, k] qw_e[k, n]   (W stored [E, K, N])
//
//   tile      128 rows x 128 columns x 128 K (one 128-byte row of E4M3 codes), two consumer
//             warpgroups of m64n128k32 wgmma, every thread also a loader (as the W8A16 sm_90
//             kernel, gemm_kernel_sm90.cuh, whose helpers this file uses).
//   fetch     cp.async, 3 tiles ahead: A's codes (the gradient, quantized in expert order by
//             quantize_rows) straight into the 128-byte-swizzled K-major tile; W's tile [128 K rows
//             x 128 columns] in coalesced 16-byte chunks into a raw tile whose chunks are permuted
//             per 8 rows, so that the transposing reads (8 rows x 8 bytes a thread) hit every bank
//             once a wavefront. The W scale of each K tile is looked up once, before the loop (the
//             lookup divides, and the loop is short: ncu measured it issue-bound).
//   transpose FP8 wgmma reads K-major operands only, and W is stored N-major for this product: each
//             thread transposes its 8 x 8 block in registers (byte permutes) into the K-major tile,
//             one K tile ahead, while the tensor cores work on the current one.
//   promote   each K tile's wgmma sums into its own registers, which are then scaled into the FP32
//             accumulators by the rows' activation scales times the tile's W scale (a 128-wide K
//             block is one W block row: dgrad_fits). Per-channel W scales were folded into A.
//   epilogue  the grouped GEMM family's (gemm_parts.cuh): staged through shared memory, then
//             finish_tile's row scale, bias, Store or GluBackward.
// ncu found this kernel issue-bound (bench/NOTES.md, twenty-first session): its threads load,
// transpose, promote and meet at a barrier per K tile. dgrad_regw_kernel below (Dgrad::Fp8RegW) is
// the other design: W from registers, a producer warpgroup, no transposed tile.
#include <cuda_fp8.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/gemm_kernel_sm90.cuh"
#include "backends/cuda/gemm_kernel_sm90_rega.cuh"
#include "backends/cuda/grouped_gemm.cuh"
#include "backends/cuda/w8a8.cuh"

namespace fp8moe::cuda::w8a8 {
// The kernel's device helpers (named, not anonymous: the sm_80 pass compiles the kernel as a trap
// and would warn about unreferenced internal functions).
namespace dgrad_parts {

// D[64 x 128] (= or +=, scale_d) A[64 x 32] B[32 x 128], E4M3 operands K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),"+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),"+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),"+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31]),"+f"(d[32]),"+f"(d[33]),"+f"(d[34]),"+f"(d[35]),"+f"(d[36]),"+f"(d[37]),"+f"(d[38]),"+f"(d[39]),"+f"(d[40]),"+f"(d[41]),"+f"(d[42]),"+f"(d[43]),"+f"(d[44]),"+f"(d[45]),"+f"(d[46]),"+f"(d[47]),"+f"(d[48]),"+f"(d[49]),"+f"(d[50]),"+f"(d[51]),"+f"(d[52]),"+f"(d[53]),"+f"(d[54]),"+f"(d[55]),"+f"(d[56]),"+f"(d[57]),"+f"(d[58]),"+f"(d[59]),"+f"(d[60]),"+f"(d[61]),"+f"(d[62]),"+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)scale_d;
  __trap();
#endif
}

// D[64 x 128] (= or +=, scale_d) A[64 x 32] (registers: this thread's fragment) B[32 x 128]
// (E4M3, K-major in shared memory).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_rs(float* d, const uint32_t* a, uint64_t desc_b, int scale_d) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),"+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),"+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),"+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31]),"+f"(d[32]),"+f"(d[33]),"+f"(d[34]),"+f"(d[35]),"+f"(d[36]),"+f"(d[37]),"+f"(d[38]),"+f"(d[39]),"+f"(d[40]),"+f"(d[41]),"+f"(d[42]),"+f"(d[43]),"+f"(d[44]),"+f"(d[45]),"+f"(d[46]),"+f"(d[47]),"+f"(d[48]),"+f"(d[49]),"+f"(d[50]),"+f"(d[51]),"+f"(d[52]),"+f"(d[53]),"+f"(d[54]),"+f"(d[55]),"+f"(d[56]),"+f"(d[57]),"+f"(d[58]),"+f"(d[59]),"+f"(d[60]),"+f"(d[61]),"+f"(d[62]),"+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#else
  (void)d, (void)a, (void)desc_b, (void)scale_d;
  __trap();
#endif
}

// The columns c[j] of an 8 x 8 byte block from its rows r[i] (both as two little-endian words:
// .x bytes 0-3, .y bytes 4-7): four 4 x 4 transposes of 8 byte permutes each.
__device__ __forceinline__ void transpose8x8(const uint2 (&r)[8], uint2 (&c)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)      // rows 4h .. 4h+3 -> word h of each column
#pragma unroll
    for (int w = 0; w < 2; ++w) {  // columns 4w .. 4w+3 (word w of each row)
      const uint32_t a0 = w ? r[4 * h].y : r[4 * h].x, a1 = w ? r[4 * h + 1].y : r[4 * h + 1].x;
      const uint32_t a2 = w ? r[4 * h + 2].y : r[4 * h + 2].x, a3 = w ? r[4 * h + 3].y : r[4 * h + 3].x;
      const uint32_t t0 = __byte_perm(a0, a1, 0x5140), t1 = __byte_perm(a0, a1, 0x7362);
      const uint32_t t2 = __byte_perm(a2, a3, 0x5140), t3 = __byte_perm(a2, a3, 0x7362);
      const uint32_t o[4] = {__byte_perm(t0, t2, 0x5410), __byte_perm(t0, t2, 0x7632), __byte_perm(t1, t3, 0x5410),
                             __byte_perm(t1, t3, 0x7632)};
#pragma unroll
      for (int j = 0; j < 4; ++j) (h ? c[4 * w + j].y : c[4 * w + j].x) = o[j];
    }
}

}  // namespace dgrad_parts

namespace {

using gemm::Params;
using namespace dgrad_parts;

constexpr int kBM = 128, kBN = 128, kBK = 128;
constexpr int kThreads = 256;     // two warpgroups
constexpr int kStages = 4;        // A and raw W stages: kStages - 1 tiles in flight
static_assert(kStages >= 3, "a tile is transposed two issues after it is fetched");
constexpr int kTile = 128 * 128;  // bytes of an A tile, a raw W tile, a transposed W tile
constexpr int kSmemBytes = (2 * kStages + 2) * kTile + 1024;  // +1024: the swizzle's alignment
constexpr int kMaxKTiles = 512;   // W scales staged per K tile: K <= 65536 (dgrad_fits)
static_assert(gemm::kStageBytes<kBM, kBN> + 1024 <= kSmemBytes, "the staged epilogue tile must fit");

struct DgradArgs {
  Params p;                     // the family's view of the GEMM: plan, W (stored [E, K, N]), epilogue
  const uint8_t* qa = nullptr;  // [M, K] E4M3 codes of A, expert order
  const float* sa = nullptr;    // [M, groups]
  int groups = 0;
  bool w_scaled = true;  // W's block scales apply; false: unit (per-channel scales folded into A)
};

// The W scale of each K tile for this CTA's columns (1 where the scales were folded into A),
// into shared memory before the K loop: the lookup divides. kBK-wide K tiles (both kernels').
template <int kThreads>
__device__ __forceinline__ void stage_w_scales(const DgradArgs& args, int e, int n0, int nkt, float* w_scale) {
  const Params& p = args.p;
  const float* sw = args.w_scaled ? p.b.scale + e * p.b.scale_stride + p.b.spec.col_index(n0) : nullptr;
  for (int t = threadIdx.x; t < nkt; t += kThreads) w_scale[t] = sw ? __ldg(sw + p.b.spec.row_index(int64_t{t} * kBK)) : 1.0f;
}

__global__ void __launch_bounds__(kThreads, 1) dgrad_kernel(const DgradArgs args) {
#if FP8MOE_SM90A
  const Params& p = args.p;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (gemm::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* As = smem;                      // [kStages][128 rows][128 K], swizzled
  uint8_t* Braw = smem + kStages * kTile;  // [kStages][128 K rows][128 columns], chunks permuted
  uint8_t* Bs = Braw + kStages * kTile;    // [2][128 columns][128 K], swizzled
  __shared__ gemm::TileMaps<kBM, kBN> maps;
  __shared__ float w_scale[kMaxKTiles];  // per K tile (1 for unit W scales)

  const gemm::RowTile rt = gemm::find_row_tile<kThreads, kBM>(p.offsets, p.E, gemm::grid_tile(p.n_tiles));
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = tid / 128;
  gemm::build_tile_maps<kThreads, kBM, kBN, true>(p, rt, kBK, maps);  // row scales and columns for the epilogue
  const int K = p.K, N = p.N, nkt = (K + kBK - 1) / kBK, n0 = rt.col_tile * kBN;
  stage_w_scales<kThreads>(args, e, n0, nkt, w_scale);
  __syncthreads();

  // A: four 16-byte chunks per thread, 8 per 128-byte row; rows past the tile's are zero-filled.
  // The source pointers of both operands advance one K tile per issue (issue takes tiles in order).
  const uint8_t* a_src[4];
  int a_dst[4], a_kc[4];
  bool a_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int id = tid + i * kThreads, row = id / 8, kc = (id % 8) * 16;
    a_ok[i] = row < rt.rows;
    a_kc[i] = kc;
    a_src[i] = a_ok[i] ? args.qa + (int64_t{rt.row0} + row) * K + kc : args.qa;
    a_dst[i] = row * 128 + (((kc >> 4) ^ (row & 7)) << 4);
  }
  // W: four 16-byte chunks per thread, 8 per 128-byte row of the tile (N % 16 == 0, dgrad_fits: a
  // chunk is whole or outside), chunk c of row r stored at c ^ (r / 8 % 8).
  const uint8_t* w_e = static_cast<const uint8_t*>(p.b.ptr) + e * p.b.expert_stride;
  const uint8_t* w_src[4];
  int w_dst[4], w_row[4];
  bool w_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int id = tid + i * kThreads, row = id / 8, c = id % 8, col = n0 + 16 * c;
    w_ok[i] = col < N;
    w_row[i] = row;
    w_src[i] = w_ok[i] ? w_e + int64_t{row} * N + col : w_e;
    w_dst[i] = row * 128 + ((c ^ ((row >> 3) & 7)) << 4);
  }
  // This thread's 8 x 8 block to transpose: K rows 8 kb .. +7, columns 8 cb .. +7 of the tile.
  // Consecutive threads take consecutive K blocks, so a warp's transposed stores cover whole
  // 128-byte rows; its reads (rows 8 kb + i of one chunk column) fall on distinct banks but for
  // kb and kb + 8: two wavefronts for 256 bytes.
  const int64_t w_step = int64_t{kBK} * N;
  const int kb = tid % 16, cb = tid / 16;
  const int raw_rd = 8 * kb * 128 + (((cb >> 1) ^ (kb & 7)) << 4) + (cb & 1) * 8;

  auto issue = [&](int t) {
    if (t >= nkt) return;
    const int stage = t % kStages, k0 = t * kBK;
    uint8_t* a_st = As + stage * kTile;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = a_ok[i] && k0 + a_kc[i] < K;  // K % 16 == 0: whole chunks
      gemm::cp_async16(a_st + a_dst[i], ok ? a_src[i] : args.qa, ok ? 16 : 0);
      a_src[i] += kBK;
    }
    uint8_t* raw = Braw + stage * kTile;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = w_ok[i] && k0 + w_row[i] < K;
      gemm::cp_async16(raw + w_dst[i], ok ? w_src[i] : w_e, ok ? 16 : 0);
      w_src[i] += w_step;
    }
  };
  auto transpose = [&](int t) {
    const uint8_t* raw = Braw + (t % kStages) * kTile + raw_rd;
    uint2 r[8], c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const uint2*>(raw + i * 128);
    transpose8x8(r, c);
    uint8_t* b = Bs + (t & 1) * kTile;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = 8 * cb + j;
      *reinterpret_cast<uint2*>(b + n * 128 + (((kb >> 1) ^ (n & 7)) << 4) + (kb & 1) * 8) = c[j];
    }
  };

  float acc[1][kBN / 8][4];
  float* d = &acc[0][0][0];
  float dt[64];  // one K tile's sum, before its scales
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = dt[i] = 0.0f;
  // This thread's accumulator rows (wgmma's fragment: warp w of the CTA holds rows 16 w .. +15).
  const int lr0 = warp * 16 + lane / 4, lr1 = lr0 + 8;
  const float* sa0 = lr0 < rt.rows ? args.sa + (int64_t{rt.row0} + lr0) * args.groups : nullptr;
  const float* sa1 = lr1 < rt.rows ? args.sa + (int64_t{rt.row0} + lr1) * args.groups : nullptr;

  const uint64_t desc_a0 = gemm::smem_desc(As + wg * 64 * 128), desc_b0 = gemm::smem_desc(Bs);
  const uint32_t da_lo = static_cast<uint32_t>(desc_a0), da_hi = static_cast<uint32_t>(desc_a0 >> 32);
  const uint32_t db_lo = static_cast<uint32_t>(desc_b0), db_hi = static_cast<uint32_t>(desc_b0 >> 32);
  auto matmul = [&](int t) {
    const uint32_t a = da_lo + (t % kStages) * (kTile >> 4), b = db_lo + (t & 1) * (kTile >> 4);
    gemm::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk)  // +32 bytes per K step: 2 in the descriptor's 16-byte units
      wgmma_m64n128k32_e4m3(dt, (uint64_t{da_hi} << 32) | (a + 2 * kk), (uint64_t{db_hi} << 32) | (b + 2 * kk), kk);
    gemm::wgmma_commit();
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(i);
    gemm::cp_async_commit();
  }
  // A raw W tile is written by every thread's copies and read across threads by the transposes:
  // each tile is waited for (own copies) and then published by a barrier before it is transposed.
  gemm::cp_async_wait<kStages - 3>();  // own copies of tiles 0 and 1 have landed
  __syncthreads();
  if (nkt > 0) transpose(0);
  gemm::fence_proxy_async();
  __syncthreads();
  for (int t = 0; t < nkt; ++t) {
    // The scales of tile t, loaded now so that their latency hides behind the MMAs.
    const float w = w_scale[t];
    const float s0 = sa0 ? __ldg(sa0 + t) : 0.0f, s1 = sa1 ? __ldg(sa1 + t) : 0.0f;
    matmul(t);
    // Into tile t-1's stage: its wgmma completed, and its raw W was transposed, before the barrier
    // that ended iteration t-1.
    issue(t + kStages - 1);
    gemm::cp_async_commit();
    if (t + 1 < nkt) transpose(t + 1);  // tile t+1 was published by that barrier; into tile t-1's buffer
    gemm::fence_proxy_async();
    gemm::wgmma_wait<0>();
    gemm::fence_acc(dt);
    const float f0 = s0 * w, f1 = s1 * w;
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = fmaf(dt[i], (i & 2) ? f1 : f0, d[i]);  // i & 2: row + 8
    gemm::cp_async_wait<kStages - 3>();  // own copies of tile t+2 have landed: the barrier publishes them
    __syncthreads();
  }
  gemm::cp_async_wait<0>();
  __syncthreads();

  float* st = reinterpret_cast<float*>(smem);
  gemm::stage_accumulators<kBN>(st, acc, warp * 16, 0);
  __syncthreads();
  gemm::finish_tile<kThreads>(p, rt, maps, st, tid);
#else
  (void)args;
  __trap();
#endif
}

// ---- Dgrad::Fp8RegW: W as wgmma's M side, from registers
//
// FP8 wgmma reads a shared-memory operand K-major only, but an operand in registers in any order
// the fragment is built in. So W, stored [K rows][N columns], becomes the MMA's A (M = output
// columns) straight from the tile as copied, and the quantized gradient rows (K-major as they are)
// its B (N = gradient rows): no transposed tile, no transposing threads. As in the register-A
// W8A16 kernel (gemm_kernel_sm90_rega.cuh), whose pipeline this follows:
//   warps     warpgroup 0 copies (cp.async) the gradient's codes into the 128-byte-swizzled tile,
//             W's bytes as stored into regw_layout::w_unit's layout and the tile's 128 activation scales;
//             warpgroups 1-2 consume, each owning 64 output columns; full / empty mbarriers.
//   W frag    thread (g, q) of a warp needs, per k32 step, K rows 4q .. 4q+3 (and + 16) of two
//             output columns. One ldmatrix.x4.trans, its lanes addressing K rows {0,1,4,5,8,9,12,13}
//             and {2,3,6,7,10,11,14,15} (+ 16) as the rows of its four 8 x 8 b16 matrices, hands the
//             thread K rows 4q, 4q+1 | 4q+2, 4q+3 at columns 2g, 2g+1; two byte permutes make each
//             register's four K bytes of one column. The warp's M rows g and g + 8 are thus output
//             columns 2g and 2g + 1, which the staged epilogue follows.
//   promote   a K tile's sums scaled into FP32 accumulators by the W block scale and each gradient
//             row's activation scale (read from the stage: the rows are the MMA's N here).
// Register budgets: producer 56, consumers 224 (setmaxnreg; 128 x 56 + 256 x 224 <= 64K).
namespace regw {
constexpr int kBM = 128, kBN = 128, kBK = 128;  // gradient rows (N), output columns (M), K per tile
constexpr int kThreads = 384;                   // producer warpgroup + 2 consumer warpgroups
constexpr int kStages = 6;  // the producer runs kStages - 2 tiles ahead of its own arrivals
constexpr int kATile = kBM * kBK, kWTile = kBK * kBN, kScaleBytes = kBM * 4;
constexpr int kStageLd = kBN + 4;  // staged epilogue: the transposed writes conflict-free
constexpr int kSmemBytes = kStages * (kATile + kWTile + kScaleBytes) + 1024;
static_assert(kBM * kStageLd * 4 + 1024 <= kSmemBytes, "the staged epilogue tile must fit the pipeline buffers");
}  // namespace regw
static_assert(regw::kBK == kBK && regw::kBN == kBN, "dgrad_fits and stage_w_scales: one W scale per 128 x 128 tile");

__global__ void __launch_bounds__(regw::kThreads, 1) dgrad_regw_kernel(const DgradArgs args) {
#if FP8MOE_SM90A
  // This kernel's tile (regw), in the names the other kernel's constants have in this file.
  constexpr int kBM = regw::kBM, kBN = regw::kBN, kBK = regw::kBK, kThreads = regw::kThreads,
                kStages = regw::kStages, kLag = kStages - 2, kATile = regw::kATile, kWTile = regw::kWTile,
                kStageLd = regw::kStageLd;
  const Params& p = args.p;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (gemm::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint8_t* As = smem;                                          // [kStages][128 rows][128 K], swizzled
  uint8_t* Ws = As + kStages * kATile;                         // [kStages][128 K rows][128 columns], w_unit
  float* Sa = reinterpret_cast<float*>(Ws + kStages * kWTile);  // [kStages][128 rows]
  __shared__ gemm::TileMaps<kBM, kBN> maps;
  __shared__ float w_scale[kMaxKTiles];
  __shared__ uint64_t full[kStages], empty[kStages];

  const gemm::RowTile rt = gemm::find_row_tile<kThreads, kBM>(p.offsets, p.E, gemm::grid_tile(p.n_tiles));
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x;
  gemm::build_tile_maps<kThreads, kBM, kBN, true>(p, rt, kBK, maps);
  const int K = p.K, N = p.N, nkt = (K + kBK - 1) / kBK, n0 = rt.col_tile * kBN;
  stage_w_scales<kThreads>(args, e, n0, nkt, w_scale);
  if (tid < kBM && tid >= rt.rows)  // rows past the tile's: scale 0 in every stage (their codes are 0)
    for (int s = 0; s < kStages; ++s) Sa[s * kBM + tid] = 0.0f;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      gemm::mbar_init(&full[s], 128);  // every producer thread
      gemm::mbar_init(&empty[s], 256);  // every consumer thread
    }
  }
  __syncthreads();

  if (tid < 128) {
    // ---- producer: tile t into stage t % kStages once its consumers released it. A thread's 8
    // chunks of each operand are 16 rows apart, so their shared-memory offsets differ by a
    // constant (both layouts repeat every 16 rows).
    gemm::setmaxnreg_dec<56>();
    const int row = tid / 8, u = tid % 8;
    const uint8_t* a_src = args.qa + (int64_t{rt.row0} + row) * K + 16 * u;
    const int a_dst = row * 128 + ((u ^ (row & 7)) << 4);
    uint32_t a_rows = 0;  // bit i: gradient row row + 16 i is in the tile
#pragma unroll
    for (int i = 0; i < 8; ++i) a_rows |= uint32_t{row + 16 * i < rt.rows} << i;
    const bool w_col = n0 + 16 * u < N;  // N % 16 == 0 (dgrad_fits): a chunk is whole or outside
    const uint8_t* w_src = static_cast<const uint8_t*>(p.b.ptr) + e * p.b.expert_stride + int64_t{row} * N + n0 + 16 * u;
    const int w_dst = regw_layout::w_unit(row, u);
    const float* sa_src = args.sa + (int64_t{rt.row0} + tid) * args.groups;
    const bool sa_row = tid < rt.rows;
    int s = 0;
    uint32_t phase = 0;
    for (int t = 0; t < nkt; ++t) {
      if (t >= kStages) gemm::mbar_wait(&empty[s], phase ^ 1);
      const int k0 = t * kBK;
      uint8_t* a_st = As + s * kATile;
      uint8_t* w_st = Ws + s * kWTile;
      const bool a_k = k0 + 16 * u < K;  // K % 16 == 0: whole chunks
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool ok = a_k && (a_rows >> i & 1);
        gemm::cp_async16(a_st + a_dst + i * 16 * 128, ok ? a_src + int64_t{16 * i} * K + k0 : args.qa, ok ? 16 : 0);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool ok = w_col && k0 + row + 16 * i < K;
        gemm::cp_async16(w_st + w_dst + i * 16 * 128, ok ? w_src + (int64_t{k0} + 16 * i) * N : p.b.ptr, ok ? 16 : 0);
      }
      if (sa_row) gemm::cp_async<4>(Sa + s * kBM + tid, sa_src + t);
      gemm::cp_async_commit();
      if (t >= kLag) {  // tile t - kLag has landed: visible to the consumers and to wgmma
        gemm::cp_async_wait<kLag>();
        gemm::fence_proxy_async();
        gemm::mbar_arrive(&full[(t - kLag) % kStages]);
      }
      if (++s == kStages) s = 0, phase ^= 1;
    }
    gemm::cp_async_wait<0>();
    gemm::fence_proxy_async();
    for (int t = nkt > kLag ? nkt - kLag : 0; t < nkt; ++t) gemm::mbar_arrive(&full[t % kStages]);
    return;  // the consumers run the epilogue
  } else {
    gemm::setmaxnreg_inc<224>();
    // ---- consumers: warpgroup cw owns output columns 64 cw .. 64 cw + 63 of the tile; warp w of
    // it the 16 of W's 16-byte unit 4 cw + w.
    const int ct = tid - 128, cw = ct / 128, warp = (ct / 32) % 4, lane = ct % 32, q = lane % 4;
    const int ld_off = regw_layout::w_unit(regw_layout::ldsm_row(lane), 4 * cw + warp);  // + 32 rows per k32 step
    const uint64_t desc0 = gemm::smem_desc(As);
    const uint32_t d_lo = static_cast<uint32_t>(desc0), d_hi = static_cast<uint32_t>(desc0 >> 32);
    float acc[64], dt[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = dt[i] = 0.0f;
    uint32_t a[16];  // this thread's W fragments of the tile's 4 k32 steps
    int s = 0;
    uint32_t phase = 0;
    for (int t = 0; t < nkt; ++t) {
      const float w = w_scale[t];
      gemm::mbar_wait(&full[s], phase);
      const uint8_t* wt = Ws + s * kWTile + ld_off;
#pragma unroll
      for (int kk = 0; kk < kBK / 32; ++kk) {
        uint32_t v[4];  // K rows 4q, 4q+1 | 4q+2, 4q+3 | + 16, at columns 2g, 2g+1 (byte pairs)
        gemm::ldmatrix_x4_trans(v, wt + kk * 32 * 128);
        a[4 * kk + 0] = __byte_perm(v[0], v[1], regw_layout::kLow);   // column 2g, K 4q .. 4q+3
        a[4 * kk + 1] = __byte_perm(v[0], v[1], regw_layout::kHigh);  // column 2g + 1
        a[4 * kk + 2] = __byte_perm(v[2], v[3], regw_layout::kLow);   // column 2g, K 16 + 4q ..
        a[4 * kk + 3] = __byte_perm(v[2], v[3], regw_layout::kHigh);
      }
      gemm::wgmma_fence();
      const uint32_t b = d_lo + s * (kATile >> 4);
#pragma unroll
      for (int kk = 0; kk < kBK / 32; ++kk)  // +32 bytes per K step: 2 in the descriptor's 16-byte units
        wgmma_m64n128k32_e4m3_rs(dt, a + 4 * kk, (uint64_t{d_hi} << 32) | (b + 2 * kk), kk);
      gemm::wgmma_commit();
      // Each accumulator's gradient row is 8 jn + 2 q + (i & 1): its activation scale, times W's.
      float2 f[16];
      const float* sa = Sa + s * kBM + 2 * q;
#pragma unroll
      for (int jn = 0; jn < 16; ++jn) f[jn] = *reinterpret_cast<const float2*>(sa + 8 * jn);
      gemm::wgmma_wait<0>();
      gemm::fence_acc(dt);
      gemm::fence_regs(a);
      gemm::mbar_arrive(&empty[s]);  // this thread is done with stage s
#pragma unroll
      for (int jn = 0; jn < 16; ++jn) {
        const float f0 = f[jn].x * w, f1 = f[jn].y * w;
        acc[4 * jn + 0] = fmaf(dt[4 * jn + 0], f0, acc[4 * jn + 0]);
        acc[4 * jn + 1] = fmaf(dt[4 * jn + 1], f1, acc[4 * jn + 1]);
        acc[4 * jn + 2] = fmaf(dt[4 * jn + 2], f0, acc[4 * jn + 2]);
        acc[4 * jn + 3] = fmaf(dt[4 * jn + 3], f1, acc[4 * jn + 3]);
      }
      if (++s == kStages) s = 0, phase ^= 1;
    }
    // Every tile was consumed, so every copy has landed; once both consumer warpgroups' MMAs are
    // done the pipeline buffers are free. acc[4 jn + 2 h + b] is output column 64 cw + 16 warp +
    // 2 g + h of gradient row 8 jn + 2 q + b.
    gemm::consumer_sync();
    float* st = reinterpret_cast<float*>(smem);
    const int col = 64 * cw + 16 * warp + 2 * (lane / 4);
#pragma unroll
    for (int jn = 0; jn < 16; ++jn)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int b = 0; b < 2; ++b) st[(8 * jn + 2 * q + b) * kStageLd + col + h] = acc[4 * jn + 2 * h + b];
    gemm::consumer_sync();
    gemm::finish_tile<256, kBM, kBN, kStageLd>(p, rt, maps, st, ct);
  }
#else
  (void)args;
  __trap();
#endif
}

void launch(DgradArgs& args, cudaStream_t stream) {
  const dim3 grid = gemm::grouped_grid(args.p, kBM, (int64_t{args.p.N} + kBN - 1) / kBN);
  gemm::set_smem_limit(dgrad_kernel, kSmemBytes);
  dgrad_kernel<<<grid, kThreads, kSmemBytes, stream>>>(args);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 dgrad_kernel");
}

void launch_regw(DgradArgs& args, cudaStream_t stream) {
  const dim3 grid = gemm::grouped_grid(args.p, regw::kBM, (int64_t{args.p.N} + regw::kBN - 1) / regw::kBN);
  gemm::set_smem_limit(dgrad_regw_kernel, regw::kSmemBytes);
  dgrad_regw_kernel<<<grid, regw::kThreads, regw::kSmemBytes, stream>>>(args);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 dgrad_regw_kernel");
}

}  // namespace

std::string dgrad_fits(const GroupedGemm& g) {
  if (!g.transpose_b) return "W is not read transposed (the FP8 dgrad takes the backward's input-gradient GEMMs)";
  if (g.epilogue == Epilogue::GluForward) return "GLU-forward epilogue";
  const TensorView& bd = g.b.data;
  if (bd.dtype != DType::F8_E4M3) return "W is " + std::string(dtype_name(bd.dtype)) + ", not F8_E4M3";
  if (bd.rank() != 3) return "W is not [E, K, N]";
  // The stored matrix is [K, N]: a K tile of 128 stored rows and a column tile of 128 must each
  // see one scale (segments restart the row blocks: they must start on a tile).
  const ScaleSpec& s = g.b.spec;
  const bool k_whole = (s.segments == 1 || s.seg_rows() % kBK == 0) && (s.block_n % kBK == 0 || s.block_n >= s.seg_rows());
  const bool n_whole = s.block_k % kBN == 0 || s.block_k >= s.cols;
  const bool blocks = (s.kind == ScaleKind::Block || s.kind == ScaleKind::Tensor) && k_whole && n_whole;
  if (!blocks && s.kind != ScaleKind::Channel)
    return "W's scales are " + s.str() + " (the FP8 dgrad takes blocks whole per 128 x 128 tile, or per-channel scales)";
  const int64_t K = bd.size(1), N = bd.size(2);
  if (K % 16 != 0) return "K = " + std::to_string(K) + " is not a multiple of 16 (16-byte rows of FP8 codes)";
  if (N % 16 != 0) return "N = " + std::to_string(N) + " is not a multiple of 16 (16-byte W chunks)";
  if (K > int64_t{kMaxKTiles} * kBK)
    return "K = " + std::to_string(K) + " is above " + std::to_string(kMaxKTiles * kBK) + " (the W scales staged per K tile)";
  if (!aligned16(bd.data)) return "W is not 16-byte aligned";
  if (!g.a.defined() || (g.a.src.dtype != DType::BF16 && g.a.src.dtype != DType::F32)) return "A is not BF16 or F32";
  return "";
}

void dgrad(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, Dgrad kernel) {
  FP8MOE_CHECK(gemm::sm90_kernels_available(), "W8A8 FP8 dgrad: needs an sm_90 GPU and a library built for sm_90a");
  const std::string why = dgrad_fits(g);
  FP8MOE_CHECK(why.empty(), "W8A8 FP8 dgrad cannot take this problem: ", why);
  FP8MOE_CHECK(kernel != Dgrad::Bf16, "W8A8 FP8 dgrad: asked for the BF16 one (the W8A16 kernels run that)");
  const auto run = [&](DgradArgs& args) { kernel == Dgrad::Fp8RegW ? launch_regw(args, stream) : launch(args, stream); };
  Params p = gemm::checked_params(g, kBK);  // every operand checked as grouped_gemm checks it
  const RoutingPlan& plan = *g.plan;
  const int64_t M = plan.rows(), E = plan.experts, K = p.K, N = p.N;
  const bool channel = g.b.spec.kind == ScaleKind::Channel;
  check_a_fp8(g, K);
  if (g.out_fp8.defined()) check_fp8_rows(g.out_fp8, "W8A8 FP8 dgrad out_fp8", M, g.out.size(1), Device::CUDA);
  if (M == 0 || N == 0) return;

  // 1. The gradient as E4M3 rows in expert order (per-channel W scales folded in: they run along K).
  const TensorView factors = channel ? g.b.scale.reshape({E, K}) : TensorView();
  OwnedFp8Rows own;
  const Fp8Rows a8 = quantized_a(g, K, channel ? &factors : nullptr, alloc, stream, own);
  DgradArgs args;
  args.qa = static_cast<const uint8_t*>(a8.codes.data);
  args.sa = static_cast<const float*>(a8.scales.data);
  args.groups = static_cast<int>((K + kBK - 1) / kBK);
  args.w_scaled = !channel;

  if (!g.lora_a.defined()) {  // 2. the product and the whole epilogue in one kernel
    args.p = p;
    run(args);
    quantize_out(g, stream);
    return;
  }
  // 2'. With LoRA: the product alone into D (BF16; out itself for a BF16 Store), then the family's
  //     rank-r GEMM on the LoRA factors with D as its addend, which runs the whole epilogue.
  GroupedGemm pg = g;
  pg.lora_a = {};
  pg.lora_b = {};
  pg.lora_scale = 0.0;
  pg.row_scale = {};
  pg.bias = {};
  pg.epilogue = Epilogue::Store;
  pg.aux = {};
  pg.out_fp8 = {};
  Tensor d_tmp;
  if (g.epilogue == Epilogue::Store && g.out.dtype == DType::BF16 && aligned16(g.out.data)) {
    pg.out = g.out;  // the addend GEMM reads each element before it writes it (the same thread)
  } else {
    d_tmp = Tensor(DType::BF16, {M, N}, alloc);
    pg.out = d_tmp;
  }
  args.p = gemm::checked_params(pg, kBK);
  run(args);
  lora_addend_gemm(g, pg.out, TensorView(), stream);
  quantize_out(g, stream);
}

}  // namespace fp8moe::cuda::w8a8

// The mma.sync grouped GEMM kernel (sm_80+; grouped_gemm.cu describes the design) and its tile
// shapes. Instantiated per tile shape and storage in generated translation units (gemm_instance.cuh).
// The parts it shares with the wgmma kernel (maps, W chunk pipeline, epilogue) are in
// gemm_parts.cuh.
#pragma once

#include "backends/cuda/gemm_parts.cuh"

namespace fp8moe::cuda::gemm {

constexpr int kPad = 8;  // BF16 elements of row padding: ldmatrix rows hit distinct banks

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_, bool PLAIN_ = false>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = WARPS_M_, kWarpsN = WARPS_N_;
  // Plain sums only (GemmProblem::plain_sum: unscaled W, Store with no row scale, bias, LoRA or
  // addend): the policies' code compiles away (tile_shapes.def, MmaPlain).
  static constexpr bool kPlain = PLAIN_;
  static constexpr int kBK = BK_;                 // K extent of a tile
  static constexpr int kStages = STAGES_;         // A / raw-W pipeline depth (kStages - 1 tiles in flight)
  static constexpr int kMinBlocks = MIN_BLOCKS_;  // CTAs per SM the register budget must allow
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WTM = BM / kWarpsM, WTN = BN / kWarpsN;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;              // mma tiles per warp
  static constexpr int kAChunks = BM * kBK / 8 / kThreads;       // A chunks per thread per tile
  static constexpr int kBChunks = BN * kBK / 8 / kThreads;       // W chunks per thread per tile
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must hold whole 16x16 ldmatrix blocks");
  static_assert(kBK % 16 == 0 && kStages >= 3, "K tile must hold whole mma steps; the pipeline needs 3+ stages");
  static_assert(kAChunks >= 1 && kAChunks * kThreads * 8 == BM * kBK, "A tile must split evenly into chunks");
  static_assert(kBChunks >= 1 && kBChunks * kThreads * 8 == BN * kBK, "W tile must split evenly into chunks");
};

template <class Cfg, int kBBytes, bool kTrans>
struct SmemLayout {
  static constexpr int kBK = Cfg::kBK, kStages = Cfg::kStages;
  static constexpr int kAStride = kBK + kPad;
  static constexpr int kBRows = kTrans ? kBK : Cfg::BN;
  static constexpr int kBStride = kTrans ? Cfg::BN + kPad : kBK + kPad;
  static constexpr int kABytesTotal = kStages * Cfg::BM * kAStride * 2;
  static constexpr int kBBytesTotal = 2 * kBRows * kBStride * 2;
  static constexpr int kRawBytesTotal = kStages * Cfg::kBChunks * Cfg::kThreads * 8 * kBBytes;
  static constexpr int kBytes = kABytesTotal + kBBytesTotal + kRawBytesTotal;
  static_assert(kABytesTotal % 16 == 0 && kBBytesTotal % 16 == 0 && kRawBytesTotal % 16 == 0,
                "shared-memory regions must stay 16-byte aligned");
};

template <class Cfg, int kABytes, int kBBytes, bool kTrans>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) grouped_gemm_kernel(const Params p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MI = Cfg::MI, NI = Cfg::NI, kBK = Cfg::kBK, kStages = Cfg::kStages;
  using Layout = SmemLayout<Cfg, kBBytes, kTrans>;
  constexpr int kAStride = Layout::kAStride, kBRows = Layout::kBRows, kBStride = Layout::kBStride;
  constexpr int kRawChunk = 8 * kBBytes;  // bytes of one raw W chunk
  constexpr int kChunksPerARow = kBK / 8;
  constexpr int kChunksPerBRow = kTrans ? BN / 8 : kBK / 8;
  constexpr bool kPlain = Cfg::kPlain;

  // Dynamic shared memory (SmemLayout): A stages [kStages][BM][kAStride] BF16 read by ldmatrix
  // directly; converted W [2][kBRows][kBStride] BF16; raw W stages [kStages][chunk][thread].
  extern __shared__ __align__(16) uint8_t smem[];
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Bs = reinterpret_cast<__nv_bfloat16*>(smem + Layout::kABytesTotal);
  uint8_t* Braw = smem + Layout::kABytesTotal + Layout::kBBytesTotal;
  __shared__ TileMaps<BM, BN> maps;

  const RowTile rt = find_row_tile<Cfg::kThreads, BM>(p.offsets, p.E, grid_tile(p.n_tiles));
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
  build_tile_maps<Cfg::kThreads, BM, BN, kTrans, kPlain>(p, rt, kBK, maps);
  __syncthreads();

  // Per-thread chunk geometry, fixed across K tiles.
  int a_row[Cfg::kAChunks], a_kc[Cfg::kAChunks];
#pragma unroll
  for (int i = 0; i < Cfg::kAChunks; ++i) {
    const int id = tid + i * Cfg::kThreads;
    a_row[i] = id / kChunksPerARow;
    a_kc[i] = (id % kChunksPerARow) * 8;
  }
  BChunk bc[Cfg::kBChunks];
#pragma unroll
  for (int i = 0; i < Cfg::kBChunks; ++i) {
    const int id = tid + i * Cfg::kThreads;
    bc[i] = make_b_chunk<kTrans>(p, maps, id / kChunksPerBRow, (id % kChunksPerBRow) * 8);
  }

  const char* b_base = static_cast<const char*>(p.b.ptr) + e * p.b.expert_stride * kBBytes;
  const int nkt = (p.K + kBK - 1) / kBK;                // main K tiles
  const int nlt = !kPlain && p.R > 0 ? (p.R + kBK - 1) / kBK : 0;  // LoRA K tiles
  // This CTA's tiles [t_begin, t_end): all of them, or with split K (main tiles only, no LoRA)
  // range blockIdx.z. An empty range still stores its zeros.
  int t_begin = 0, t_end = nkt + nlt;
  if (p.k_splits > 1) {
    const int per = (nkt + p.k_splits - 1) / p.k_splits;
    t_begin = min(nkt, static_cast<int>(blockIdx.z) * per);
    t_end = min(nkt, t_begin + per);
  }
  auto raw_chunk = [&](int stage, int i) { return Braw + ((stage * Cfg::kBChunks + i) * Cfg::kThreads + tid) * kRawChunk; };

  // Queues tile t into stage t % kStages.
  auto issue = [&](int t) {
    if (t >= t_end) return;
    const int stage = t % kStages;
    __nv_bfloat16* a_st = As + stage * BM * kAStride;
#pragma unroll
    for (int i = 0; i < Cfg::kAChunks; ++i) {
      __nv_bfloat16* dst = a_st + a_row[i] * kAStride + a_kc[i];
      if constexpr (kPlain)
        load_plain_a_chunk<kABytes>(p, maps, t, kBK, a_row[i], a_kc[i], dst);
      else
        load_a_chunk<kABytes>(p, maps, t, nkt, kBK, a_row[i], a_kc[i], dst);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i)
      if (b_chunk_mode<kTrans>(p, bc[i], t, nkt, kBK) == 1)
        issue_b_chunk<kBBytes, kTrans>(p, bc[i], t, kBK, b_base, raw_chunk(stage, i));
  };

  // Converts this thread's own W chunks of tile t (so no barrier is needed between its copy and
  // this read) from the raw stage to BF16 in Bs[t % 2].
  auto convert_b = [&](int t) {
    __nv_bfloat16* b_st = Bs + (t % 2) * kBRows * kBStride;
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i) {
      const int mode = b_chunk_mode<kTrans>(p, bc[i], t, nkt, kBK);
      uint4* dst = reinterpret_cast<uint4*>(b_st + bc[i].r * kBStride + bc[i].c);
      if constexpr (kPlain)
        *dst = convert_plain_b_chunk<kBBytes, kTrans>(p, maps, bc[i], mode, raw_chunk(t % kStages, i), t, kBK, e);
      else
        *dst = convert_b_chunk<kBBytes, kTrans>(p, maps, bc[i], mode, raw_chunk(t % kStages, i), t, nkt, kBK, e);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[mi][ni][x] = 0.0f;

  auto matmul = [&](int t) {
    const __nv_bfloat16* a_st = As + (t % kStages) * BM * kAStride;
    const __nv_bfloat16* b_st = Bs + (t % 2) * kBRows * kBStride;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[MI][4], bf[NI / 2][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], &a_st[(wm * Cfg::WTM + mi * 16 + lane % 16) * kAStride + kk + (lane / 16) * 8]);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        const int n = wn * Cfg::WTN + nj * 16 + (lane / 16) * 8;
        const int k = kk + ((lane / 8) % 2) * 8;
        if constexpr (kTrans)
          ldmatrix_x4_trans(bf[nj], &b_st[(k + lane % 8) * kBStride + n]);
        else
          ldmatrix_x4(bf[nj], &b_st[(n + lane % 8) * kBStride + k]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          mma_bf16_16816(acc[mi][ni], af[mi], bf[ni / 2][(ni % 2) * 2], bf[ni / 2][(ni % 2) * 2 + 1]);
    }
  };

  // ---- main loop: kStages-1 tiles in flight; one barrier per tile
  if constexpr (kPlain) {  // one copy of the issue code, not kStages - 1 (the plain kernel is kept small)
#pragma unroll 1
    for (int t = 0; t < kStages - 1; ++t) {
      issue(t_begin + t);
      cp_async_commit();
    }
  } else {
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      issue(t_begin + t);
      cp_async_commit();
    }
  }
  cp_async_wait<kStages - 2>();  // this thread's copies of the first tile have landed
  if (t_end > t_begin) convert_b(t_begin);
  __syncthreads();
  for (int t = t_begin; t < t_end; ++t) {
    issue(t + kStages - 1);  // into the stage tile t-1 used: free since the last barrier
    cp_async_commit();
    cp_async_wait<kStages - 2>();  // own copies of tile t+1 have landed
    matmul(t);
    if (t + 1 < t_end) convert_b(t + 1);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline buffers the staged tile reuses

  float* st = reinterpret_cast<float*>(smem);
  static_assert(kStageBytes<BM, BN> <= Layout::kBytes, "the staged epilogue tile must fit the pipeline's shared memory");
  stage_accumulators<BN>(st, acc, wm * Cfg::WTM, wn * Cfg::WTN);
  __syncthreads();
  if constexpr (kPlain)
    finish_plain_tile<Cfg::kThreads>(p, rt, maps, st, threadIdx.x);
  else
    finish_tile<Cfg::kThreads>(p, rt, maps, st, threadIdx.x);
}

// Tile<BM, BN, BK, warps along M, warps along N, stages, CTAs per SM>; BM, BN, BK must be the
// shape's in tile_shapes.def (launch_instance asserts it).
using TileM64N128 = Tile<64, 128, 32, 2, 4, 4, 2>;  // 8 warps of 32 x 32; two CTAs per SM
using TileM32N128 = Tile<32, 128, 32, 1, 4, 4, 4>;  // 4 warps of 32 x 32; four CTAs per SM
// Narrow N: 4 warps of 32 x 32 stacked along M; 5 stages (66 KB), three CTAs per SM, so ~96 KB
// of A per SM are in flight: these GEMMs are A streams with little math per byte.
using TileM128N32 = Tile<128, 32, 32, 4, 1, 5, 3>;
// The same for plain sums alone (the rank-r projections of a training step): ~2.4k SASS
// instructions against the general instance's ~39k (sm_90a, BF16 A and W). These launches are
// short (8 K tiles per CTA after the split): the dense projections' took 17-38 µs each on the
// general instance and 10-18 µs on this one (H100, layer_profile; bench/NOTES.md, twenty-fourth
// session), with IPC 0.69 against 0.55.
using TileM128N32Plain = Tile<128, 32, 32, 4, 1, 5, 3, true>;

template <class Cfg_, int AB, int BB, bool TR>
struct KernelMma {
  using Cfg = Cfg_;
  static constexpr auto kernel = grouped_gemm_kernel<Cfg_, AB, BB, TR>;
  static constexpr int kSmemBytes = SmemLayout<Cfg_, BB, TR>::kBytes;
};

}  // namespace fp8moe::cuda::gemm

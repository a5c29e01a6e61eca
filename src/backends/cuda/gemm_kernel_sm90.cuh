// The wgmma grouped GEMM kernel (sm_90a): the same problem, policies and W chunk pipeline as the
// mma.sync kernel (gemm_parts.cuh), with Hopper warpgroup MMA as the engine.
//
//   tile      BM = 64 * kWG rows x 128 columns x 64 K; kWG warpgroups, each one m64n128 wgmma
//             fragment (64 fp32 accumulators per thread), every thread also a loader.
//   fetch     cp.async, kStages deep, kStages - 2 tiles ahead: A rows (gathered, zero-filled)
//             straight into the 128-byte-swizzled K-major tile wgmma reads; W raw bytes into a
//             per-thread staging area.
//   convert   each thread dequantizes its own W chunks one K tile ahead into a triple-buffered
//             swizzled BF16 tile. wgmma is asynchronous, so this conversion (and the next copies)
//             overlaps the tensor cores working on the current tile. Transposed W (dgrad) is
//             converted in 4 x 8 (or 8 x 8) blocks and transposed in registers, so the tile is
//             always K-major.
//   sync      one barrier per K tile. Buffers are reused two tiles later: every warpgroup has
//             waited for its wgmma of tile t-1 (wait_group 1) before the barrier that ends
//             iteration t-1... so at iteration t the copies into tile t-2's stage are safe.
//   loops     the main K tiles run in a loop that holds only the lean fast path when the shape
//             allows it; the LoRA tiles (and every tile of odd shapes) run in a second pipeline
//             with the general per-chunk code, so that code never sits in the hot loop.
#pragma once

#include "backends/cuda/gemm_parts.cuh"

// wgmma exists only in the arch-specific sm_90a target; other targets compile a trap (the host
// never launches it there: sm90_kernels_available()).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FP8MOE_SM90A 1
#else
#define FP8MOE_SM90A 0
#endif

namespace fp8moe::cuda::gemm {

template <int kWG_, int kStages_>
struct TileSm90 {
  static constexpr int kWG = kWG_;              // consumer warpgroups along M
  static constexpr int BM = 64 * kWG, BN = 128, kBK = 64;
  static constexpr int kStages = kStages_;      // A / raw W stages with FP8 W (kStages - 2 tiles in flight)
  static constexpr int kBStages = 3;            // converted W tiles (reused two tiles later)
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kAChunks = BM * kBK / 8 / kThreads;  // A chunks per thread per tile
  static constexpr int kBChunks = BN * kBK / 8 / kThreads;  // W chunks per thread per tile
  static constexpr int kATileBytes = BM * kBK * 2, kBTileBytes = BN * kBK * 2;
  static_assert(kStages >= 3, "the pipeline needs 3+ stages");
  static_assert(kBChunks == 4 || kBChunks == 8, "transposed W blocks are 4 or 8 K rows deep");
};

template <class Cfg, int kBBytes>
struct SmemLayoutSm90 {
  // BF16 W stages twice the raw bytes: fewer stages keep it within the 227 KB an SM has.
  static constexpr int kStages = kBBytes == 1 ? Cfg::kStages : 4;
  static constexpr int kABytesTotal = kStages * Cfg::kATileBytes;
  static constexpr int kBBytesTotal = Cfg::kBStages * Cfg::kBTileBytes;
  static constexpr int kRawBytesTotal = kStages * Cfg::kBChunks * Cfg::kThreads * 8 * kBBytes;
  // +1024: the dynamic base is aligned up to the 1024 bytes the 128-byte swizzle pattern needs.
  static constexpr int kBytes = kABytesTotal + kBBytesTotal + kRawBytesTotal + 1024;
};

// Element offset of (row, k) in a [rows][64] BF16 tile with the 128-byte swizzle: the 16-byte
// unit k / 8 of each 128-byte row is XOR-ed with row % 8 (what the descriptor's mode 1 expects).
__device__ __forceinline__ int swz(int row, int k) { return row * 64 + (((k >> 3) ^ (row & 7)) << 3) + (k & 7); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row core groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_addr(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if FP8MOE_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if FP8MOE_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if FP8MOE_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async) visible to the
// async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
#if FP8MOE_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// D[64 x 128] (this warpgroup's fragment, 64 floats per thread) += A[64 x 16] B[16 x 128], both
// operands K-major in shared memory (descriptors), BF16 in, FP32 accumulate.
__device__ __forceinline__ void wgmma_m64n128k16(float* d, uint64_t desc_a, uint64_t desc_b) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#else
  (void)d, (void)desc_a, (void)desc_b;
  __trap();
#endif
}

// Keeps the accumulators in registers across the asynchronous wgmma (the compiler must not move
// them while the tensor cores own them).
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <class Cfg, int kABytes, int kBBytes, bool kTrans>
__global__ void __launch_bounds__(Cfg::kThreads, 1) grouped_gemm_sm90_kernel(const Params p) {
#if FP8MOE_SM90A  // other targets get a trap only: nothing to compile for cards that cannot run it
  using Layout = SmemLayoutSm90<Cfg, kBBytes>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, kBK = Cfg::kBK, kStages = Layout::kStages, kBStages = Cfg::kBStages;
  constexpr int kBChunks = Cfg::kBChunks;
  constexpr int kRawChunk = 8 * kBBytes;

  extern __shared__ uint8_t smem_raw[];
  // Offset from the array itself (not a rounded integer address), so the compiler keeps the
  // shared window: LDS/STS, not generic loads and stores.
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);                        // [kStages][BM][64] swizzled
  __nv_bfloat16* Bs = reinterpret_cast<__nv_bfloat16*>(smem + Layout::kABytesTotal);  // [kBStages][BN][64] swizzled
  uint8_t* Braw = smem + Layout::kABytesTotal + Layout::kBBytesTotal;                // [kStages][chunk][thread]
  __shared__ TileMaps<BM, BN> maps;

  const RowTile rt = find_row_tile<Cfg::kThreads, BM>(p.offsets, p.E, grid_tile(p.n_tiles));
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x, warp = tid / 32, wg = tid / 128;
  build_tile_maps<Cfg::kThreads, BM, BN, kTrans>(p, rt, kBK, maps);
  __syncthreads();

  // Chunk geometry. A: 8 threads per 128-byte row. W non-transposed: likewise, row n of the
  // tile. W transposed: a block of kBChunks consecutive K rows x 8 tile columns per thread;
  // consecutive threads take consecutive K blocks, so the transposed stores of a warp spread
  // over every 16-byte unit of the swizzle (conflict-free).
  constexpr int kKGroups = kBK / kBChunks;  // K blocks per tile (transposed)
  BChunk bc[kBChunks];
#pragma unroll
  for (int i = 0; i < kBChunks; ++i) {
    if constexpr (kTrans) {
      bc[i] = make_b_chunk<true>(p, maps, (tid % kKGroups) * kBChunks + i, (tid / kKGroups) * 8);
    } else {
      const int id = tid + i * Cfg::kThreads;
      bc[i] = make_b_chunk<false>(p, maps, id / 8, (id % 8) * 8);
    }
  }

  const char* b_base = static_cast<const char*>(p.b.ptr) + e * p.b.expert_stride * kBBytes;
  const int nkt = (p.K + kBK - 1) / kBK;
  const int nlt = p.R > 0 ? (p.R + kBK - 1) / kBK : 0;
  const int ntiles = nkt + nlt;
  auto raw_chunk = [&](int stage, int i) { return Braw + ((stage * kBChunks + i) * Cfg::kThreads + tid) * kRawChunk; };

  // Fast path of the main K tiles (CTA-uniform): BF16 A with 16-byte loads, every W chunk either
  // whole (raw copy + one scale) or outside the matrix, K a multiple of the tile and the scale's
  // k-part tabulated per tile or stepping linearly with it. Its addresses are computed once here
  // and advanced per tile, so a K tile costs a few instructions per chunk; the LoRA tiles and
  // every other shape take the general per-chunk path (gemm_parts.cuh).
  const char* a_src[Cfg::kAChunks];
  int a_bytes[Cfg::kAChunks];
  const char* w_src[kBChunks];
  const float* w_scale[kBChunks];
  bool w_ok[kBChunks];
  bool fast = kABytes == 2 && p.vec_a && p.vec_b && p.K % kBK == 0 &&
              (p.b.scale == nullptr || p.b_tile_uniform || p.b_kpart_step > 0);
#pragma unroll
  for (int i = 0; i < Cfg::kAChunks; ++i) {
    const int id = tid + i * Cfg::kThreads, src = maps.arow[id / 8];
    a_bytes[i] = src >= 0 ? 16 : 0;  // zero-fill rows past the expert's end
    a_src[i] = static_cast<const char*>(p.a.ptr) + (src >= 0 ? (src * p.a.ld + (id % 8) * 8) * kABytes : 0);
  }
#pragma unroll
  for (int i = 0; i < kBChunks; ++i) {
    w_ok[i] = b_chunk_mode<kTrans>(p, bc[i], 0, nkt, kBK) == 1;
    fast = fast && (w_ok[i] || bc[i].n < 0);
    const int64_t sr = kTrans ? bc[i].r : bc[i].n, sc = kTrans ? bc[i].n : bc[i].c;  // stored coordinates at tile 0
    w_src[i] = b_base + (w_ok[i] ? (sr * p.b.ld + sc) * kBBytes : 0);
    w_scale[i] = p.b.scale ? p.b.scale + e * p.b.scale_stride + bc[i].npart : nullptr;
    if (p.b.scale && !p.b_tile_uniform)  // linear k-part: its value at tile 0
      w_scale[i] += kTrans ? p.b.spec.row_index(bc[i].r) : p.b.spec.col_index(bc[i].c);
  }
  fast = __syncthreads_and(fast);
  const int64_t w_step = (kTrans ? kBK * p.b.ld : kBK) * kBBytes;  // bytes per K tile
  // Path tags: 0 the general path; 1 the fast path (E4M3 or BF16 W); 2 the fast path, E5M2 W.
  // The FP8 kind is compile-time in the fast loop, so it holds no conversion for the other kind.
  using General = std::integral_constant<int, 0>;

  // Queues tile t into stage t % kStages: the fast path's copies (kFast) or the general ones.
  auto issue = [&](auto fast_tag, int t, int stage, int t_end) {
    if (t >= t_end) return;
    __nv_bfloat16* a_st = As + stage * BM * kBK;
    if constexpr (decltype(fast_tag)::value != 0) {
      // Tiles are issued once each, in order: the source pointers advance one tile per call.
#pragma unroll
      for (int i = 0; i < Cfg::kAChunks; ++i) {
        const int id = tid + i * Cfg::kThreads;
        cp_async16(a_st + swz(id / 8, (id % 8) * 8), a_src[i], a_bytes[i]);
        a_src[i] += kBK * kABytes;
      }
#pragma unroll
      for (int i = 0; i < kBChunks; ++i) {
        if (w_ok[i]) cp_async<8 * kBBytes>(raw_chunk(stage, i), w_src[i]);
        w_src[i] += w_step;
      }
    } else {
#pragma unroll
      for (int i = 0; i < Cfg::kAChunks; ++i) {
        const int id = tid + i * Cfg::kThreads, row = id / 8, kc = (id % 8) * 8;
        load_a_chunk<kABytes>(p, maps, t, nkt, kBK, row, kc, a_st + swz(row, kc));
      }
#pragma unroll
      for (int i = 0; i < kBChunks; ++i)
        if (b_chunk_mode<kTrans>(p, bc[i], t, nkt, kBK) == 1)
          issue_b_chunk<kBBytes, kTrans>(p, bc[i], t, kBK, b_base, raw_chunk(stage, i));
    }
  };

  // Fast path: the scales of tile t, loaded before the tile's wgmma is issued so that their
  // latency hides behind it instead of delaying the conversion.
  float scale[kBChunks];
  auto load_scales = [&](int t) {
    if (t >= nkt) return;
    const int64_t kpart = !p.b.scale ? 0 : p.b_tile_uniform ? maps.ktab[t] : t * p.b_kpart_step;
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) scale[i] = w_ok[i] && w_scale[i] ? __ldg(w_scale[i] + kpart) : 1.0f;
  };

  auto convert_b = [&](auto fast_tag, int t, int stage, int bstage) {
    __nv_bfloat16* b_st = Bs + bstage * BN * kBK;
    uint4 v[kBChunks];
    if constexpr (decltype(fast_tag)::value != 0) {
      constexpr bool kE5M2 = decltype(fast_tag)::value == 2;
#pragma unroll
      for (int i = 0; i < kBChunks; ++i) {
        v[i] = make_uint4(0, 0, 0, 0);
        if (w_ok[i])
          v[i] = chunk_to_bf16(*reinterpret_cast<const Chunk<kBBytes>*>(raw_chunk(stage, i)), scale[i], kE5M2);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBChunks; ++i)
        v[i] = convert_b_chunk<kBBytes, kTrans>(p, maps, bc[i], b_chunk_mode<kTrans>(p, bc[i], t, nkt, kBK),
                                                raw_chunk(stage, i), t, nkt, kBK, e);
    }
    if constexpr (!kTrans) {
#pragma unroll
      for (int i = 0; i < kBChunks; ++i) *reinterpret_cast<uint4*>(b_st + swz(bc[i].r, bc[i].c)) = v[i];
    } else {
      // v[i] holds K row bc[0].r + i, columns c .. c+7: column j of the block becomes tile row
      // c + j, K bc[0].r .. + kBChunks - 1 (kBChunks / 4 eight-byte stores).
      const uint32_t* w = reinterpret_cast<const uint32_t*>(v);  // w[4 i + j / 2]: (row i, cols j, j+1)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t sel = (j % 2) ? 0x7632u : 0x5410u;  // high or low BF16 of each pair
        uint32_t q[kBChunks / 2];
#pragma unroll
        for (int i = 0; i < kBChunks; i += 2) q[i / 2] = __byte_perm(w[4 * i + j / 2], w[4 * (i + 1) + j / 2], sel);
#pragma unroll
        for (int h = 0; h < kBChunks / 4; ++h)
          *reinterpret_cast<uint2*>(b_st + swz(bc[0].c + j, bc[0].r + 4 * h)) = make_uint2(q[2 * h], q[2 * h + 1]);
      }
    }
  };

  float acc[1][BN / 8][4];
  float* d = &acc[0][0][0];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;

  // Descriptors differ only in their start-address field (low word), so the per-tile and per-K-step
  // offsets are 32-bit adds on a precomputed base.
  const uint64_t desc_a0 = smem_desc(As + wg * 64 * kBK), desc_b0 = smem_desc(Bs);
  const uint32_t da_lo = static_cast<uint32_t>(desc_a0), da_hi = static_cast<uint32_t>(desc_a0 >> 32);
  const uint32_t db_lo = static_cast<uint32_t>(desc_b0), db_hi = static_cast<uint32_t>(desc_b0 >> 32);
  auto matmul = [&](int stage, int bstage) {
    const uint32_t a = da_lo + stage * (Cfg::kATileBytes >> 4), b = db_lo + bstage * (Cfg::kBTileBytes >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)  // +32 bytes per K step: 2 in the descriptor's 16-byte units
      wgmma_m64n128k16(d, (uint64_t{da_hi} << 32) | (a + 2 * kk), (uint64_t{db_hi} << 32) | (b + 2 * kk));
    wgmma_commit();
  };

  // ---- main loop (the header comment gives the buffer-reuse argument), run as two pipelines:
  // the fast path over the main K tiles, then the general path over the rest (the LoRA tiles, or
  // every tile when the fast path does not apply). Each loop holds only its own code, so the hot
  // one stays small: with both paths in one loop body the kernel's K loop was ~31,000 SASS
  // instructions and stalled on instruction fetch (bench/NOTES.md).
  auto pipeline = [&](auto fast_tag, int t0, int t1) {
    constexpr bool kFast = decltype(fast_tag)::value != 0;
    if (t0 >= t1) return;
    // Ring positions, advanced by one per tile (tile t sits in stage t % kStages, converted
    // buffer t % kBStages): s_issue for the copies, s_read / b_read for the math, s_conv /
    // b_conv for the conversion.
    int s_issue = t0 % kStages;
#pragma unroll
    for (int i = 0; i < kStages - 2; ++i) {
      issue(fast_tag, t0 + i, s_issue, t1);
      cp_async_commit();
      s_issue = s_issue + 1 == kStages ? 0 : s_issue + 1;
    }
    int s_read = t0 % kStages, b_read = t0 % kBStages;
    int s_conv = s_read + 1 == kStages ? 0 : s_read + 1, b_conv = b_read + 1 == kBStages ? 0 : b_read + 1;
    cp_async_wait<kStages - 3>();  // own copies of tile t0 have landed
    if constexpr (kFast) load_scales(t0);
    convert_b(fast_tag, t0, s_read, b_read);
    fence_proxy_async();
    __syncthreads();
    for (int t = t0; t < t1; ++t) {
      if constexpr (kFast) load_scales(t + 1);
      matmul(s_read, b_read);
      issue(fast_tag, t + kStages - 2, s_issue, t1);  // into tile t-2's stage
      cp_async_commit();
      cp_async_wait<kStages - 3>();  // own copies of tile t+1 have landed
      if (t + 1 < t1) convert_b(fast_tag, t + 1, s_conv, b_conv);  // into tile t-2's converted buffer
      fence_proxy_async();
      wgmma_wait<1>();
      fence_acc(d);
      __syncthreads();
      s_issue = s_issue + 1 == kStages ? 0 : s_issue + 1;
      s_read = s_conv;
      s_conv = s_conv + 1 == kStages ? 0 : s_conv + 1;
      b_read = b_conv;
      b_conv = b_conv + 1 == kBStages ? 0 : b_conv + 1;
    }
    // Drained before the next pipeline reuses the buffers.
    wgmma_wait<0>();
    fence_acc(d);
    cp_async_wait<0>();
    __syncthreads();
  };
  if (fast) {
    if (kBBytes == 1 && p.b.type == Elem::E5M2)
      pipeline(std::integral_constant<int, kBBytes == 1 ? 2 : 1>{}, 0, nkt);
    else
      pipeline(std::integral_constant<int, 1>{}, 0, nkt);
  }
  pipeline(General{}, fast ? nkt : 0, ntiles);  // one copy of the general path
  __syncthreads();  // pipeline() drains its own buffers; this also covers ntiles == 0

  float* st = reinterpret_cast<float*>(smem);
  static_assert(kStageBytes<BM, BN> + 1024 <= Layout::kBytes, "the staged epilogue tile must fit the pipeline's shared memory");
  stage_accumulators<BN>(st, acc, warp * 16, 0);
  __syncthreads();
  finish_tile<Cfg::kThreads>(p, rt, maps, st, threadIdx.x);
#else
  (void)p;
  __trap();
#endif
}

// Two warpgroups (128 x 128 tiles), 6 stages: 4 K tiles of 64 in flight, one CTA per SM.
using TileSm90M128 = TileSm90<2, 6>;

template <class Cfg_, int AB, int BB, bool TR>
struct KernelSm90 {
  using Cfg = Cfg_;
  static constexpr auto kernel = grouped_gemm_sm90_kernel<Cfg_, AB, BB, TR>;
  static constexpr int kSmemBytes = SmemLayoutSm90<Cfg_, BB>::kBytes;
};

}  // namespace fp8moe::cuda::gemm

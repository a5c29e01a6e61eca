// The register-A wgmma grouped GEMM (sm_90a): the FP8 fast path (forward and transposed W) with W
// as the MMA's M side. Same problem, maps and staged epilogue as the other engines (gemm_parts.cuh).
//
// Why a second wgmma kernel: in gemm_kernel_sm90.cuh every thread loads, converts W into a
// BF16 shared-memory tile, fences it into the async proxy and meets every other thread at a
// barrier per K tile; the tensor cores idle ~75% of the time (bench/NOTES.md). Here:
//   roles     W rows are wgmma's M (64 per consumer warpgroup, 128 per CTA) and token rows its
//             N (64, 128, 192, or 2 x 128 with kNT = 2): the accumulator holds the transposed tile, which
//             the epilogue stages transposed. W enters the MMA from registers, so the dequantized W never goes
//             through shared memory: no converted tile, no proxy fence for it, no barrier.
//   warps     warpgroup 0 produces (cp.async of the gathered token rows into the swizzled
//             K-major tile wgmma reads, and of the raw FP8 W bytes), warpgroups 1-2 consume.
//             Full / empty mbarriers per stage replace the CTA-wide barrier.
//   W frag    a thread's A fragment for k16 step j holds rows g, g+8 (g = lane / 4) at
//             k = 16 j + 2q, +1 and 16 j + 8 + 2q, +1 (q = lane % 4): per row, the two words
//             holding those pairs are loaded (LDS.32, conflict-free through a 16-byte-unit XOR
//             swizzle), the pairs picked with one byte_perm and dequantized in fp32 exactly as
//             the other engines do (code * scale -> BF16, the same rounding).
//   pipeline  kStages stages, the producer kLag tiles ahead of its own arrivals. A consumer
//             warpgroup waits for its MMAs before converting the next tile (see run below); the
//             two consumer warpgroups overlap each other's conversion and MMAs.
//   W^T       transposed W (the backward GEMMs) is copied as stored, [64 K rows][128 columns] per
//             tile. ldmatrix.trans on it, reading byte pairs as 16-bit elements, hands thread
//             (g, q) the bytes of K rows 2q, 2q+1 (and + 8) at columns 2g, 2g+1: exactly the A
//             fragment pairs along K, for M rows 2g and 2g+1 in place of g and g+8 (M rows are
//             output columns: the epilogue staging follows the permutation).
//   LoRA      ceil(r / 64) extra K tiles accumulate L . LB^T: the producer copies L's rows into the
//             token slot, the consumers read their LB fragments from global memory (r is small).
// It takes: FP8 W, BF16 A, K % 64 == 0, the scale k-part constant per K tile (or, transposed, a
// scale per K row: kKScale), LoRA only with BF16 L and r % 8 == 0, and with transposed W,
// N % 16 == 0 and no GLU forward (host: rega_fits).
// Everything else runs on the other engines.
#pragma once

#include "backends/cuda/gemm_kernel_sm90.cuh"

namespace fp8moe::cuda::gemm {

// kNT token blocks of kTN (128 or 64) per CTA. With two blocks of 128, each A fragment feeds
// two wgmmas (half the conversion per FLOP) and the consumers need 128 accumulators, so the
// warpgroups trade registers (setmaxnreg: producer 80, consumers 208). One block of 64 serves
// experts with few rows (a 128-token block would be mostly padding): half the MMA work per W
// byte and smaller stages, so more of them stream W.
//
// One block of 192 (kNT 1) serves experts of ~100-190 rows, a full-size model's 2048-token step
// (128 rows per expert on average, uniform routing): one tile per expert like the 256-token tile,
// with a quarter fewer MMAs, all of them on real or near-real rows.
template <int kNT_, int kTN_ = 128>
struct TileSm90RegA {
  static constexpr int kNT = kNT_, kTN = kTN_;
  static_assert(kTN == 128 || (kNT == 1 && (kTN == 64 || kTN == 192)),
                "token blocks: 1 or 2 of 128, or 1 of 64 or 192");
  static constexpr int BM = kTN * kNT;  // token rows per CTA (kNT wgmmas of N = kTN)
  static constexpr int BN = 128;        // W rows = output columns per CTA (2 x wgmma M)
  static constexpr int kBK = 64;
  // More than 64 accumulators per consumer thread: the warpgroups trade registers (setmaxnreg).
  static constexpr bool kWideAcc = BM > 128;
  static constexpr int kStages = kNT == 2 ? 5 : kTN == 192 ? 6 : kTN == 64 ? 12 : 8, kLag = kStages - 2;
  static constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kTokTileBytes = BM * kBK * 2, kWTileBytes = BN * kBK;
  static constexpr int kStageLd = BN + 4;  // staged epilogue: transposed writes conflict-free
  static constexpr int kScaleBytes = kBK * 4;  // per-K-row scales of a tile (kKScale)
  static constexpr int kSmemBytes = kStages * (kTokTileBytes + kWTileBytes + kScaleBytes) + 1024;
  static_assert(BM * kStageLd * 4 + 1024 <= kSmemBytes, "the staged epilogue tile must fit the pipeline buffers");
};

// D[64 x 128] += A[64 x 16] (registers, this thread's fragment) B[16 x 128] (descriptor).
__device__ __forceinline__ void wgmma_m64n128k16_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  (void)d, (void)a, (void)desc_b;
  __trap();
#endif
}

// D[64 x 64] += A[64 x 16] (registers) B[16 x 64] (descriptor).
__device__ __forceinline__ void wgmma_m64n64k16_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  (void)d, (void)a, (void)desc_b;
  __trap();
#endif
}
// D[64 x 192] += A[64 x 16] (registers) B[16 x 192] (descriptor).
__device__ __forceinline__ void wgmma_m64n192k16_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
#if FP8MOE_SM90A
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}, "
      "{%96, %97, %98, %99}, %100, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),"+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),"+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),"+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31]),"+f"(d[32]),"+f"(d[33]),"+f"(d[34]),"+f"(d[35]),"+f"(d[36]),"+f"(d[37]),"+f"(d[38]),"+f"(d[39]),"+f"(d[40]),"+f"(d[41]),"+f"(d[42]),"+f"(d[43]),"+f"(d[44]),"+f"(d[45]),"+f"(d[46]),"+f"(d[47]),"+f"(d[48]),"+f"(d[49]),"+f"(d[50]),"+f"(d[51]),"+f"(d[52]),"+f"(d[53]),"+f"(d[54]),"+f"(d[55]),"+f"(d[56]),"+f"(d[57]),"+f"(d[58]),"+f"(d[59]),"+f"(d[60]),"+f"(d[61]),"+f"(d[62]),"+f"(d[63]),"+f"(d[64]),"+f"(d[65]),"+f"(d[66]),"+f"(d[67]),"+f"(d[68]),"+f"(d[69]),"+f"(d[70]),"+f"(d[71]),"+f"(d[72]),"+f"(d[73]),"+f"(d[74]),"+f"(d[75]),"+f"(d[76]),"+f"(d[77]),"+f"(d[78]),"+f"(d[79]),"+f"(d[80]),"+f"(d[81]),"+f"(d[82]),"+f"(d[83]),"+f"(d[84]),"+f"(d[85]),"+f"(d[86]),"+f"(d[87]),"+f"(d[88]),"+f"(d[89]),"+f"(d[90]),"+f"(d[91]),"+f"(d[92]),"+f"(d[93]),"+f"(d[94]),"+f"(d[95])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  (void)d, (void)a, (void)desc_b;
  __trap();
#endif
}
// The m64nNk16 MMA of a kTN-token block.
template <int kTN>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (kTN == 64)
    wgmma_m64n64k16_rs(d, a, desc_b);
  else if constexpr (kTN == 192)
    wgmma_m64n192k16_rs(d, a, desc_b);
  else
    wgmma_m64n128k16_rs(d, a, desc_b);
}

// ---- mbarriers (CTA scope): arrive releases, wait acquires.
__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(b)) : "memory");
}
// Waits until the phase with parity `parity` of barrier b has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred P;\nmbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2;\nselp.u32 %0, 1, 0, P;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(b)), "r"(parity)
        : "memory");
  } while (!done);
}

// Warpgroup register budgets (all threads of the warpgroup execute it).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#if FP8MOE_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#if FP8MOE_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
// Named barrier 1 over the 256 consumer threads (the producer may have exited).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// Keeps A-fragment registers live and unmoved until the wgmma reading them has completed.
template <int kN>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// kKScale (transposed only): W's scale depends on the stored row alone and changes inside a K
// tile (per-channel scales read transposed: the backward GEMMs of GLM-style checkpoints). The
// producer copies the tile's 64 row scales next to it; the consumers scale each element by its
// K row instead of each M row.
template <class Cfg, bool kTrans, bool kKScale>
__global__ void __launch_bounds__(Cfg::kThreads, 1) grouped_gemm_sm90_rega_kernel(const Params p) {
  static_assert(kTrans || !kKScale, "per-K-row scales exist only for transposed W");
#if FP8MOE_SM90A
  constexpr int BM = Cfg::BM, BN = Cfg::BN, kBK = Cfg::kBK, kStages = Cfg::kStages, kLag = Cfg::kLag, kNT = Cfg::kNT,
                kTN = Cfg::kTN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  __nv_bfloat16* Tok = reinterpret_cast<__nv_bfloat16*>(smem);  // [kStages][BM][64] swizzled, K-major
  uint8_t* Wraw = smem + kStages * Cfg::kTokTileBytes;          // [kStages] x [BN][64] or [64][BN] (kTrans) FP8
  float* Ksc = reinterpret_cast<float*>(Wraw + kStages * Cfg::kWTileBytes);  // [kStages][64] (kKScale)
  __shared__ TileMaps<BM, BN> maps;
  __shared__ uint64_t full[kStages], empty[kStages];

  const RowTile rt = find_row_tile<Cfg::kThreads, BM>(p.offsets, p.E, grid_tile(p.n_tiles));
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x;
  build_tile_maps<Cfg::kThreads, BM, BN, kTrans>(p, rt, kBK, maps);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 128);  // every producer thread
      mbar_init(&empty[s], 256);  // every consumer thread
    }
  }
  __syncthreads();
  const int nkt = p.K / kBK, ntiles = nkt + (p.R + kBK - 1) / kBK;  // main K tiles, then LoRA tiles
  // Byte offset of 16-byte unit u of stored row r in a W tile. Forward: rows of 64 bytes, unit u
  // at u ^ ((r / 2) % 4), so the consumers' word loads hit 32 distinct banks. Transposed: rows of
  // 128 bytes, unit u at u ^ (r % 8), so each 8-row ldmatrix is conflict-free.
  auto w_unit = [](int r, int u) {
    return kTrans ? r * BN + ((u ^ (r & 7)) << 4) : r * kBK + ((u ^ ((r >> 1) & 3)) << 4);
  };
  // The two M rows (tile columns) of a consumer thread: r0 and r0 + 8, or 2g and 2g + 1 of its
  // warp's 16 with transposed W.
  auto m_rows = [](int ct, int (&r)[2]) {
    const int base = 64 * (ct / 128) + 16 * ((ct / 32) % 4), g = (ct % 32) / 4;
    r[0] = kTrans ? base + 2 * g : base + g;
    r[1] = kTrans ? r[0] + 1 : r[0] + 8;
  };

  if (tid < 128) {
    // ---- producer: tile t into stage t % kStages once its consumers released it
    if constexpr (Cfg::kWideAcc) setmaxnreg_dec<80>();
    constexpr int kTokChunks = BM * kBK / 8 / 128, kWChunks = BN * kBK / 16 / 128;
    // Chunk i of a thread is 16 tile rows (tokens; transposed W) or 32 (forward W) past chunk
    // 0, so its shared-memory offset is chunk 0's plus a constant (the swizzles repeat every 8
    // rows); sources are kept per chunk, zero-fill flags as bit masks (few registers: the
    // producer runs on 80 beside wide accumulators).
    const char* a_src[kTokChunks];
    uint32_t a_valid = 0;
    const int a_dst = swz(tid / 8, (tid % 8) * 8) * 2;  // chunk i: + i * 16 rows * 128 bytes
#pragma unroll
    for (int i = 0; i < kTokChunks; ++i) {
      const int row = tid / 8 + 16 * i, kc = (tid % 8) * 8, src = maps.arow[row];
      a_valid |= uint32_t{src >= 0} << i;  // zero-fill rows past the expert's end
      a_src[i] = static_cast<const char*>(p.a.ptr) + (src >= 0 ? (int64_t{src} * p.a.ld + kc) * 2 : 0);
    }
    const char* b_base = static_cast<const char*>(p.b.ptr) + e * p.b.expert_stride;
    const char* w_src[kWChunks];
    uint32_t w_valid = 0;
    // Forward: row tid / 4 + 32 i, unit tid % 4. Transposed: stored row tid / 8 + 16 i of the
    // tile, columns 16 (tid % 8) .. + 15 (N % 16 == 0).
    const int w_dst = kTrans ? w_unit(tid / 8, tid % 8) : w_unit(tid / 4, tid % 4);
    constexpr int kWDstStep = kTrans ? 16 * BN : 32 * kBK;
#pragma unroll
    for (int i = 0; i < kWChunks; ++i) {
      if constexpr (kTrans) {
        const int r = tid / 8 + 16 * i, n = maps.col[16 * (tid % 8)];
        w_valid |= uint32_t{n >= 0} << i;  // columns past N are zeros
        w_src[i] = b_base + (n >= 0 ? int64_t{r} * p.b.ld + n : 0);
      } else {
        const int r = tid / 4 + 32 * i, n = maps.col[r];
        w_valid |= uint32_t{n >= 0} << i;  // W rows past N are zeros
        w_src[i] = b_base + (n >= 0 ? int64_t{n} * p.b.ld + (tid % 4) * 16 : 0);
      }
    }
    const int64_t w_step = kTrans ? kBK * p.b.ld : kBK;  // bytes per K tile
    // kKScale: producer thread tid < 64 copies the scale of K row tid of each tile (linear k-part).
    const float* ks_src = kKScale ? p.b.scale + e * p.b.scale_stride + p.b.spec.row_index(tid % kBK) : nullptr;
    int s = 0;
    uint32_t phase = 0;  // parity of stage s's current use
    // Tile t into stage s: wait until its previous use is consumed, queue the copies, then release
    // the tile kLag behind (landed: made visible to wgmma first).
    auto step = [&](int t, auto&& copies) {
      if (t >= kStages) mbar_wait(&empty[s], phase ^ 1);
      copies(reinterpret_cast<uint8_t*>(Tok) + s * Cfg::kTokTileBytes, Wraw + s * Cfg::kWTileBytes, Ksc + s * kBK);
      cp_async_commit();
      if (t >= kLag) {
        cp_async_wait<kLag>();
        fence_proxy_async();
        mbar_arrive(&full[(t - kLag) % kStages]);
      }
      if (++s == kStages) s = 0, phase ^= 1;
    };
    for (int t = 0; t < nkt; ++t)
      step(t, [&](uint8_t* tok, uint8_t* w, float* ksc) {
        if (kKScale && tid < kBK) {
          cp_async<4>(ksc + tid, ks_src);
          ks_src += p.b_kpart_step;
        }
#pragma unroll
        for (int i = 0; i < kTokChunks; ++i) {
          cp_async16(tok + a_dst + i * 16 * kBK * 2, a_src[i], (a_valid >> i & 1) * 16);
          a_src[i] += kBK * 2;
        }
#pragma unroll
        for (int i = 0; i < kWChunks; ++i) {
          cp_async16(w + w_dst + i * kWDstStep, w_src[i], (w_valid >> i & 1) * 16);
          w_src[i] += w_step;
        }
      });
    // LoRA tiles: L's rows (r % 8 == 0, zero past r) in the token slot; LB goes to the consumers
    // straight from global memory.
    for (int t = nkt; t < ntiles; ++t)
      step(t, [&](uint8_t* tok, uint8_t*, float*) {
#pragma unroll
        for (int i = 0; i < kTokChunks; ++i) {
          const int row = tid / 8 + 16 * i, k = (t - nkt) * kBK + (tid % 8) * 8, src = maps.larow[row];
          const bool valid = src >= 0 && k < p.R;
          cp_async16(tok + a_dst + i * 16 * kBK * 2,
                     static_cast<const char*>(p.la.ptr) + (valid ? (int64_t{src} * p.la.ld + k) * 2 : 0), valid ? 16 : 0);
        }
      });
    cp_async_wait<0>();
    fence_proxy_async();
    for (int t = ntiles > kLag ? ntiles - kLag : 0; t < ntiles; ++t) mbar_arrive(&full[t % kStages]);
    return;  // the consumers run the epilogue
  } else {
    // The CTA holds 384 x 168 registers (launch bounds): 128 x 80 + 256 x 208 fit in them. An
    // increase past the pool would block forever.
    if constexpr (Cfg::kWideAcc) setmaxnreg_inc<208>();
    float acc[kNT][kTN / 2];  // per token block: the m64 x kTN fragment
#pragma unroll
    for (int tt = 0; tt < kNT; ++tt)
#pragma unroll
      for (int i = 0; i < kTN / 2; ++i) acc[tt][i] = 0.0f;
    // ---- consumers: warpgroup cw owns W rows 64 cw .. 64 cw + 63 of the tile
    const int ct = tid - 128, cw = ct / 128, warp = (ct / 32) % 4, lane = ct % 32, q = lane % 4;
    int rows[2];
    m_rows(ct, rows);
    const int n0 = maps.col[rows[0]], n1 = maps.col[rows[1]];
    const float* sc_base = p.b.scale + e * p.b.scale_stride;
    auto npart = [&](int n) { return n < 0 ? 0 : kTrans ? p.b.spec.col_index(n) : p.b.spec.row_index(n); };
    // kKScale: the k-part is per element (Ksc); an M row's part is 0 (the scale has one column).
    const float* sp0 = sc_base + (kKScale ? 0 : npart(n0));
    const float* sp1 = sc_base + (kKScale ? 0 : npart(n1));
    const uint32_t sel = (q & 1) ? 0x7632u : 0x5410u;  // this thread's pair in each word
    // Forward W: word (16 j + 4 (q / 2)) of row rows[h] is at w_base + 512 h + ((j ^ w_xor) << 4).
    const int w_base = rows[0] * kBK + 4 * (q >> 1), w_xor = (rows[0] >> 1) & 3;
    // Transposed: lane l addresses row 8 (l / 8) + l % 8 (+ 32 for the second half of the tile)
    // of matrix l / 8, in this warp's 16-byte column unit.
    const int ld_off = w_unit(lane, 4 * cw + warp);
    const uint64_t desc0 = smem_desc(Tok);
    const uint32_t d_lo = static_cast<uint32_t>(desc0), d_hi = static_cast<uint32_t>(desc0 >> 32);
    const bool e5m2 = p.b.type == Elem::E5M2;

    uint32_t a[16];  // this thread's A fragments of the 4 k16 steps of a tile
    int s = 0;
    uint32_t phase = 0;
    // The 4 MMAs of the tile in stage s with fragments a[], then the stage's release. The MMAs are
    // waited for before the next fragments are written: ptxas serializes every wgmma of the kernel
    // when registers an in-flight wgmma may read are redefined (C7513), so the overlap of
    // conversion and MMA comes from the two consumer warpgroups taking turns instead.
    auto mma_tile = [&]() {
      wgmma_fence();
      const uint32_t b = d_lo + s * (Cfg::kTokTileBytes >> 4);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int tt = 0; tt < kNT; ++tt)  // token block tt: kTN rows further
          wgmma_rs<kTN>(acc[tt], reinterpret_cast<const uint32_t(&)[4]>(a[4 * j]),
                        (uint64_t{d_hi} << 32) | (b + tt * (kTN * kBK * 2 >> 4) + 2 * j));
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int tt = 0; tt < kNT; ++tt) fence_acc(acc[tt]);
      fence_regs(a);
      mbar_arrive(&empty[s]);  // this thread is done with stage s
      if (++s == kStages) s = 0, phase ^= 1;
    };
    float sc[2] = {1.0f, 1.0f};
    if (!kKScale) sc[0] = __ldg(sp0 + maps.ktab[0]), sc[1] = __ldg(sp1 + maps.ktab[0]);
    // The main K tiles: dequantize this thread's fragment of W tile t, then its MMAs.
    auto run = [&](auto kE5M2) {
      constexpr bool kE = decltype(kE5M2)::value;
      for (int t = 0; t < nkt; ++t) {
        float nsc[2] = {1.0f, 1.0f};  // next tile's scales, loaded early
        if (!kKScale && t + 1 < nkt) nsc[0] = __ldg(sp0 + maps.ktab[t + 1]), nsc[1] = __ldg(sp1 + maps.ktab[t + 1]);
        mbar_wait(&full[s], phase);
        const uint8_t* w = Wraw + s * Cfg::kWTileBytes;
        // Step by step (few registers live beside the accumulators): xw[h] = FP8 codes of M row h
        // at k 16j + 2q, 2q+1, 2q+8, 2q+9, dequantized into a[4j + h] and a[4j + 2 + h].
        [[maybe_unused]] uint32_t v[4];  // transposed: v[m] = K rows 32 (j / 2) + 8 m + 2q, +1 at columns 2g, 2g+1
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t xw[2];
          if constexpr (kTrans) {
            if (j % 2 == 0) ldmatrix_x4_trans(v, w + ld_off + (j / 2) * 32 * BN);
            const int m = 2 * (j % 2);
            xw[0] = __byte_perm(v[m], v[m + 1], 0x6420);  // column 2g
            xw[1] = __byte_perm(v[m], v[m + 1], 0x7531);  // column 2g + 1
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint8_t* wj = w + w_base + h * 8 * kBK + ((j ^ w_xor) << 4);
              const uint32_t lo = *reinterpret_cast<const uint32_t*>(wj);      // k 16j + 4(q/2) ..
              const uint32_t hi = *reinterpret_cast<const uint32_t*>(wj + 8);  // k 16j + 8 + 4(q/2) ..
              xw[h] = __byte_perm(lo, hi, sel);
            }
          }
          [[maybe_unused]] float ks[4];  // kKScale: the scales of k 16j + 2q, 2q+1, 2q+8, 2q+9
          if constexpr (kKScale) {
            const float* kst = Ksc + s * kBK + 16 * j + 2 * q;
            const float2 lo = *reinterpret_cast<const float2*>(kst), hi = *reinterpret_cast<const float2*>(kst + 8);
            const float fold = fp8_fold(kE);
            ks[0] = lo.x * fold, ks[1] = lo.y * fold, ks[2] = hi.x * fold, ks[3] = hi.y * fold;
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float f[4];
            fp8x4_to_float(xw[h], kE, f);
            if constexpr (kKScale) {
#pragma unroll
              for (int i = 0; i < 4; ++i) f[i] *= ks[i];
            } else {
              const float m = sc[h] * fp8_fold(kE);
#pragma unroll
              for (int i = 0; i < 4; ++i) f[i] *= m;
            }
            a[4 * j + h] = pack_bf16x2(f[0], f[1]);      // M row h, k 2q, 2q+1
            a[4 * j + 2 + h] = pack_bf16x2(f[2], f[3]);  // M row h, k 2q+8, 2q+9
          }
        }
        mma_tile();
        sc[0] = nsc[0], sc[1] = nsc[1];
      }
    };
    if (e5m2)
      run(std::true_type{});
    else
      run(std::false_type{});
    // The LoRA tiles: fragments of LB (times lora_scale), read from global memory; 0 past r or N.
    // An M row's 16 loads are all issued, as raw bits, before any conversion: a conversion inside
    // each element load's branches made every load wait for the one before (the grouped_outer
    // profile, sixth session), and the LoRA tile cost gemm2 +21%.
    const int ns[2] = {n0, n1};
    const bool lb_f32 = p.lb.type == Elem::F32;  // else BF16 (vec_lora / rega_fits)
    const float lb_mult = p.lb.mult;
    for (int t = nkt; t < ntiles; ++t) {
      const int k0 = (t - nkt) * kBK + 2 * q;
      mbar_wait(&full[s], phase);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // one M row at a time: 32 raw words at once spilled (T256)
        uint32_t raw[4][4];           // [j][i]: k = k0 + 16 j + {0, 1, 8, 9}[i]
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int k = k0 + 16 * j + (i % 2) + 8 * (i / 2), n = ns[h];
            const int64_t at = e * p.lb.expert_stride + (kTrans ? int64_t{k} * p.lb.ld + n : int64_t{n} * p.lb.ld + k);
            raw[j][i] = n < 0 || k >= p.R ? 0u
                        : lb_f32      ? __ldg(static_cast<const uint32_t*>(p.lb.ptr) + at)
                                      : uint32_t{__ldg(static_cast<const unsigned short*>(p.lb.ptr) + at)} << 16;
          }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float f[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(raw[j][i]) * lb_mult;  // BF16 bits moved up: exact
          a[4 * j + h] = pack_bf16x2(f[0], f[1]);      // M row h, k 2q, 2q+1
          a[4 * j + 2 + h] = pack_bf16x2(f[2], f[3]);  // M row h, k 2q+8, 2q+9
        }
      }
      mma_tile();
    }
    // Every tile was consumed, so every copy has landed; once both consumer warpgroups' MMAs
    // are done the pipeline buffers are free. Stage the transposed accumulators:
    // acc[tt][4 j + 2 h + b] is M row (tile column) rows[h] and token kTN tt + 8 j + 2 q + b.
    consumer_sync();
    float* st = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int tt = 0; tt < kNT; ++tt)
#pragma unroll
      for (int j = 0; j < kTN / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int b = 0; b < 2; ++b)
            st[(kTN * tt + 8 * j + 2 * q + b) * Cfg::kStageLd + rows[h]] = acc[tt][4 * j + 2 * h + b];
    consumer_sync();
    finish_tile<256, BM, BN, Cfg::kStageLd>(p, rt, maps, st, ct);
  }
#else
  (void)p;
  __trap();
#endif
}

template <int kNT, int kTN, bool kTrans, bool kKScale = false>
struct KernelSm90RegA {
  using Cfg = TileSm90RegA<kNT, kTN>;
  static constexpr auto kernel = grouped_gemm_sm90_rega_kernel<Cfg, kTrans, kKScale>;
  static constexpr int kSmemBytes = Cfg::kSmemBytes;
  // The transposed kernel's variant for per-K-row scales (Params::k_row_scale).
  using WithKRowScale = KernelSm90RegA<kNT, kTN, kTrans, true>;
};

}  // namespace fp8moe::cuda::gemm

// The grouped GEMM kernel template (grouped_gemm.cu describes the design) and its launch
// parameters. Instantiated per tile shape in grouped_gemm_<shape>.cu, so the shapes compile in
// parallel; grouped_gemm.cu holds the host side and calls launch_<shape>.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/gemm_tile.cuh"
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::gemm {

constexpr int kPad = 8;         // BF16 elements of row padding: ldmatrix rows hit distinct banks
constexpr int kMaxKTiles = 256; // K tiles whose scale k-part is tabulated (K <= 256 * BK)

// A[r, k] (or L[r, q]): row r is src[r] (Rows) or src[sorted_pairs[r] / top_k] (Tokens).
struct OperandA {
  const void* ptr = nullptr;
  Elem type = Elem::BF16;
  int64_t ld = 0;  // row length of the source
  bool tokens = false;
};
// W_e[n, k] (or LB_e[n, q]): stored [E, N, K], or [E, K, N] when the launch is transposed.
struct OperandB {
  const void* ptr = nullptr;
  Elem type = Elem::BF16;
  int64_t expert_stride = 0;  // elements per expert
  int64_t ld = 0;             // stored row length: K, or N when transposed
  const float* scale = nullptr;  // [E, spec.numel()] F32, or null for plain weights
  int64_t scale_stride = 0;
  ScaleSpec spec;  // of the stored matrix (rows = stored rows)
  float mult = 1.0f;
};

struct Params {
  int64_t M = 0;
  int N = 0, K = 0, E = 0, top_k = 1, R = 0;  // N: columns of v; R: LoRA rank (0: none)
  const int32_t* offsets = nullptr;       // [E + 1]
  const int32_t* sorted_pairs = nullptr;  // [M]
  OperandA a, la;
  OperandB b, lb;
  bool vec_a = false;         // A chunks may use 16-byte loads
  bool vec_b = false;         // W chunks may use vector loads with one scale per chunk
  bool b_tile_uniform = false;  // the scale's k-part is constant over every K tile: tabulated
  const void* row_scale = nullptr;  // [T * k]
  Elem rs_type = Elem::F32;
  const void* bias = nullptr;  // [E, N]
  Elem bias_type = Elem::F32;
  Epilogue epi = Epilogue::Store;
  ActivationSpec act;
  void* aux = nullptr;  // GluForward: [M, N] (optional); GluBackward: [M, 2N]
  Elem aux_type = Elem::BF16;
  void* out = nullptr;  // [M, N], [M, N/2] or [M, 2N]
  Elem out_type = Elem::BF16;
  bool out_vec2 = false, aux_vec2 = false;  // paired stores allowed (even row length, aligned)
};

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = WARPS_M_, kWarpsN = WARPS_N_;
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

// ---- activation policies (the CPU backend's act_forward / act_backward are the reference)

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_forward(const ActivationSpec& a, float gate, float up) {
  if (a.kind == Activation::SiluGlu) return gate * sigmoidf(gate) * up;
  const float g = fminf(gate, a.limit), u = fminf(fmaxf(up, -a.limit), a.limit);
  return (u + 1.0f) * g * sigmoidf(a.alpha * g);
}
// Clamp gradients pass where min <= x <= max, boundaries included (torch.clamp's convention).
__device__ __forceinline__ void act_backward(const ActivationSpec& a, float gate, float up, float& dgate, float& dup) {
  if (a.kind == Activation::SiluGlu) {
    const float s = sigmoidf(gate);
    dgate = s * (1.0f + gate * (1.0f - s)) * up;
    dup = gate * s;
    return;
  }
  const float g = fminf(gate, a.limit), u = fminf(fmaxf(up, -a.limit), a.limit);
  const float s = sigmoidf(a.alpha * g);
  dgate = gate <= a.limit ? (u + 1.0f) * (s + a.alpha * g * s * (1.0f - s)) : 0.0f;
  dup = (up >= -a.limit && up <= a.limit) ? g * s : 0.0f;
}

// ---- per-element paths: odd shapes, misaligned chunks and the LoRA tiles

__device__ __forceinline__ uint4 slow_a_chunk(const OperandA& o, int src_row, int k, int klimit) {
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    v[j] = (src_row >= 0 && k + j < klimit) ? load_elem(o.ptr, o.type, src_row * o.ld + k + j) : 0.0f;
  return make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}

// W_e[n, k] dequantized: code * scale * mult; 0 outside the matrix (n < 0 or k >= klimit).
template <bool kTrans>
__device__ __forceinline__ float slow_b_elem(const OperandB& o, int e, int n, int k, int klimit) {
  if (n < 0 || k >= klimit) return 0.0f;
  const int64_t sr = kTrans ? k : n, sc = kTrans ? n : k;  // stored coordinates
  float v = load_elem(o.ptr, o.type, e * o.expert_stride + sr * o.ld + sc) * o.mult;
  if (o.scale) v *= o.scale[e * o.scale_stride + o.spec.index(sr, sc)];
  return v;
}

// ---- the kernel

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
  constexpr int kAStride = kBK + kPad;                   // As row: [BM][kBK + pad]
  constexpr int kBRows = SmemLayout<Cfg, kBBytes, kTrans>::kBRows;      // Bs: [BN][kBK + pad] or [kBK][BN + pad]
  constexpr int kBStride = SmemLayout<Cfg, kBBytes, kTrans>::kBStride;
  constexpr int kRawChunk = 8 * kBBytes;                 // bytes of one raw W chunk
  constexpr int kChunksPerARow = kBK / 8;
  constexpr int kChunksPerBRow = kTrans ? BN / 8 : kBK / 8;

  // Dynamic shared memory (SmemLayout): A stages [kStages][BM][kAStride] BF16 read by ldmatrix
  // directly; converted W [2][kBRows][kBStride] BF16; raw W stages [kStages][chunk][thread].
  extern __shared__ __align__(16) uint8_t smem[];
  using Layout = SmemLayout<Cfg, kBBytes, kTrans>;
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Bs = reinterpret_cast<__nv_bfloat16*>(smem + Layout::kABytesTotal);
  uint8_t* Braw = smem + Layout::kABytesTotal + Layout::kBBytesTotal;
  __shared__ int s_arow[BM];   // source row of A for each tile row (-1: padding)
  __shared__ int s_larow[BM];  // source row of L
  __shared__ float s_rs[BM];   // row scale
  __shared__ int s_col[BN];    // column n of v for each tile column (-1: past N)
  __shared__ int s_ktab[kMaxKTiles];  // scale k-part of each K tile (b_tile_uniform)

  const RowTile rt = find_row_tile<Cfg::kThreads, BM>(p.offsets, p.E, blockIdx.x);
  if (rt.expert < 0) return;  // uniform across the block
  const int e = rt.expert, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
  const bool glu_fwd = p.epi == Epilogue::GluForward;

  // ---- prologue: row gather indices, row scales, column map, scale table
  for (int i = tid; i < BM; i += Cfg::kThreads) {
    int ar = -1, lr = -1;
    float rs = 0.0f;
    if (i < rt.rows) {
      const int r = rt.row0 + i, pair = p.sorted_pairs[r], tok = pair / p.top_k;
      ar = p.a.tokens ? tok : r;
      lr = p.la.tokens ? tok : r;
      rs = p.row_scale ? load_elem(p.row_scale, p.rs_type, pair) : 1.0f;
    }
    s_arow[i] = ar;
    s_larow[i] = lr;
    s_rs[i] = rs;
  }
  for (int c = tid; c < BN; c += Cfg::kThreads) {
    int n;
    if (glu_fwd) {
      // Each 16 columns hold 8 gate columns then their 8 up columns, so a thread's accumulators
      // for n-tiles 2q and 2q+1 are the gate and up of the same output column j.
      const int I = p.N / 2, j = blockIdx.y * (BN / 2) + (c / 16) * 8 + c % 8;
      n = j < I ? static_cast<int>((c % 16) >= 8 ? p.act.up_row(j, I) : p.act.gate_row(j, I)) : -1;
    } else {
      n = blockIdx.y * BN + c;
      n = n < p.N ? n : -1;
    }
    s_col[c] = n;
  }
  if (p.b_tile_uniform)
    for (int t = tid; t < (p.K + kBK - 1) / kBK; t += Cfg::kThreads)
      s_ktab[t] = static_cast<int>(kTrans ? p.b.spec.row_index(int64_t{t} * kBK) : p.b.spec.col_index(int64_t{t} * kBK));
  __syncthreads();

  // Per-thread chunk geometry, fixed across K tiles.
  int a_row[Cfg::kAChunks], a_kc[Cfg::kAChunks];
#pragma unroll
  for (int i = 0; i < Cfg::kAChunks; ++i) {
    const int id = tid + i * Cfg::kThreads;
    a_row[i] = id / kChunksPerARow;
    a_kc[i] = (id % kChunksPerARow) * 8;
  }
  // Non-transposed: chunk = W row n (tile row b_r), k = k0 + b_c .. +7.
  // Transposed:     chunk = W^T row k = k0 + b_r, columns b_c .. b_c+7 of the tile.
  int b_r[Cfg::kBChunks], b_c[Cfg::kBChunks], b_n[Cfg::kBChunks];
  bool b_vec[Cfg::kBChunks];     // chunk may take the vector path
  int64_t b_npart[Cfg::kBChunks];  // scale index part fixed by n
#pragma unroll
  for (int i = 0; i < Cfg::kBChunks; ++i) {
    const int id = tid + i * Cfg::kThreads;
    b_r[i] = id / kChunksPerBRow;
    b_c[i] = (id % kChunksPerBRow) * 8;
    if constexpr (kTrans) {
      const int n0 = s_col[b_c[i]];
      b_n[i] = n0;
      b_vec[i] = p.vec_b && n0 >= 0 && n0 % 8 == 0 && s_col[b_c[i] + 7] == n0 + 7;
      b_npart[i] = (p.b.scale && n0 >= 0) ? p.b.spec.col_index(n0) : 0;
    } else {
      const int n = s_col[b_r[i]];
      b_n[i] = n;
      b_vec[i] = p.vec_b;
      b_npart[i] = (p.b.scale && n >= 0) ? p.b.spec.row_index(n) : 0;
    }
  }

  const char* a_base = static_cast<const char*>(p.a.ptr);
  const char* b_base = static_cast<const char*>(p.b.ptr) + e * p.b.expert_stride * kBBytes;
  const float* b_scale = p.b.scale ? p.b.scale + e * p.b.scale_stride : nullptr;
  const bool e5m2 = p.b.type == Elem::E5M2;

  const int nkt = (p.K + kBK - 1) / kBK;                 // main K tiles
  const int nlt = p.R > 0 ? (p.R + kBK - 1) / kBK : 0;   // LoRA K tiles
  const int ntiles = nkt + nlt;

  // How chunk i of W tile t is produced: 0 zeros, 1 raw copy + vector conversion, 2 per element
  // (odd shapes, LoRA tiles). A pure function of (t, i): the copy and the conversion agree.
  auto b_mode = [&](int t, int i) {
    if (t >= nkt) return 2;
    const int k = t * kBK + (kTrans ? b_r[i] : b_c[i]);
    if (k >= p.K || (!kTrans && b_n[i] < 0)) return 0;
    return b_vec[i] ? 1 : 2;
  };

  // Queues tile t into stage t % kStages: A by cp.async (zero-filled past the rows / K), or
  // converted in place (F32 A, per-element chunks); W raw bytes by cp.async.
  auto issue = [&](int t) {
    if (t >= ntiles) return;
    const int stage = t % kStages;
    const bool lora = t >= nkt;
    const int k0 = (lora ? t - nkt : t) * kBK;
    __nv_bfloat16* a_st = As + stage * BM * kAStride;
#pragma unroll
    for (int i = 0; i < Cfg::kAChunks; ++i) {
      __nv_bfloat16* dst = a_st + a_row[i] * kAStride + a_kc[i];
      const int src = s_arow[a_row[i]], k = k0 + a_kc[i];
      if (!lora && p.vec_a) {
        const bool valid = src >= 0 && k < p.K;
        const char* g = a_base + (valid ? (src * p.a.ld + k) * kABytes : 0);
        if constexpr (kABytes == 2) {
          cp_async16(dst, g, valid ? 16 : 0);
        } else {
          Chunk<kABytes> c;
          if (valid) load_chunk(c, g); else zero_chunk(c);
          *reinterpret_cast<uint4*>(dst) = chunk_to_bf16(c, 1.0f, false);
        }
      } else {
        *reinterpret_cast<uint4*>(dst) = lora ? slow_a_chunk(p.la, s_larow[a_row[i]], k, p.R)
                                              : slow_a_chunk(p.a, src, k, p.K);
      }
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i) {
      if (b_mode(t, i) != 1) continue;
      const int k = k0 + (kTrans ? b_r[i] : b_c[i]);
      const int64_t sr = kTrans ? k : b_n[i], sc = kTrans ? b_n[i] : k;
      uint8_t* dst = Braw + ((stage * Cfg::kBChunks + i) * Cfg::kThreads + tid) * kRawChunk;
      cp_async<kRawChunk>(dst, b_base + (sr * p.b.ld + sc) * kBBytes);
    }
  };

  // Converts this thread's own W chunks of tile t (so no barrier is needed between its copy and
  // this read) from the raw stage to BF16 in Bs[t % 2].
  auto convert_b = [&](int t) {
    const bool lora = t >= nkt;
    const int k0 = (lora ? t - nkt : t) * kBK, klimit = lora ? p.R : p.K;
    const OperandB& ob = lora ? p.lb : p.b;
    const int stage = t % kStages;
    __nv_bfloat16* b_st = Bs + (t % 2) * kBRows * kBStride;
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i) {
      const int mode = b_mode(t, i);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (mode == 1) {
        const int k = k0 + (kTrans ? b_r[i] : b_c[i]);
        const Chunk<kBBytes> c =
            *reinterpret_cast<const Chunk<kBBytes>*>(Braw + ((stage * Cfg::kBChunks + i) * Cfg::kThreads + tid) * kRawChunk);
        float scale = 1.0f;
        if (b_scale) {
          const int64_t kpart = p.b_tile_uniform ? s_ktab[t] : (kTrans ? p.b.spec.row_index(k) : p.b.spec.col_index(k));
          scale = __ldg(b_scale + b_npart[i] + kpart);
        }
        v = chunk_to_bf16(c, scale, e5m2);
      } else if (mode == 2) {
        float f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          f[j] = kTrans ? slow_b_elem<true>(ob, e, s_col[b_c[i] + j], k0 + b_r[i], klimit)
                        : slow_b_elem<false>(ob, e, b_n[i], k0 + b_c[i] + j, klimit);
        v = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                       pack_bf16x2(f[6], f[7]));
      }
      *reinterpret_cast<uint4*>(b_st + b_r[i] * kBStride + b_c[i]) = v;
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
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    issue(t);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();  // this thread's copies of tile 0 have landed
  if (ntiles > 0) convert_b(0);
  __syncthreads();
  for (int t = 0; t < ntiles; ++t) {
    issue(t + kStages - 1);  // into the stage tile t-1 used: free since the last barrier
    cp_async_commit();
    cp_async_wait<kStages - 2>();  // own copies of tile t+1 have landed
    matmul(t);
    if (t + 1 < ntiles) convert_b(t + 1);
    __syncthreads();
  }
  cp_async_wait<0>();

  // ---- epilogue: v = rs * acc + bias, then the policy
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lr = wm * Cfg::WTM + mi * 16 + h * 8 + lane / 4;
      if (lr >= rt.rows) continue;
      const int64_t r = rt.row0 + lr;
      const float rs = s_rs[lr];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = s_col[wn * Cfg::WTN + ni * 8 + 2 * (lane % 4) + j];
          float& v = acc[mi][ni][2 * h + j];
          v *= rs;
          if (p.bias && n >= 0) v += load_elem(p.bias, p.bias_type, int64_t{e} * p.N + n);
        }

      if (p.epi == Epilogue::Store || (glu_fwd && p.aux)) {
        void* dst = glu_fwd ? p.aux : p.out;
        const Elem dt = glu_fwd ? p.aux_type : p.out_type;
        const bool vec2 = glu_fwd ? p.aux_vec2 : p.out_vec2;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int c = wn * Cfg::WTN + ni * 8 + 2 * (lane % 4);
          const int n0 = s_col[c], n1 = s_col[c + 1];
          const float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
          if (n0 >= 0 && n1 == n0 + 1) {
            store_elem2(dst, dt, r * p.N + n0, v0, v1, vec2 && n0 % 2 == 0);
          } else {
            if (n0 >= 0) store_elem(dst, dt, r * p.N + n0, v0);
            if (n1 >= 0) store_elem(dst, dt, r * p.N + n1, v1);
          }
        }
      }
      if (glu_fwd) {
        const int I = p.N / 2;
#pragma unroll
        for (int ni = 0; ni < NI; ni += 2) {
          const int c = wn * Cfg::WTN + ni * 8 + 2 * (lane % 4);  // gate column; its up is c + 8
          const int j0 = blockIdx.y * (BN / 2) + (c / 16) * 8 + c % 8;
          const float o0 = act_forward(p.act, acc[mi][ni][2 * h], acc[mi][ni + 1][2 * h]);
          const float o1 = act_forward(p.act, acc[mi][ni][2 * h + 1], acc[mi][ni + 1][2 * h + 1]);
          if (j0 + 1 < I) {
            store_elem2(p.out, p.out_type, r * I + j0, o0, o1, p.out_vec2);
          } else if (j0 < I) {
            store_elem(p.out, p.out_type, r * I + j0, o0);
          }
        }
      }
      if (p.epi == Epilogue::GluBackward) {
        const int I = p.N;  // v = dL/dact [M, N]; aux and out are [M, 2N]
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int n = s_col[wn * Cfg::WTN + ni * 8 + 2 * (lane % 4) + j];
            if (n < 0) continue;
            const int64_t gr = r * 2 * I + p.act.gate_row(n, I), ur = r * 2 * I + p.act.up_row(n, I);
            float dg, du;
            act_backward(p.act, load_elem(p.aux, p.aux_type, gr), load_elem(p.aux, p.aux_type, ur), dg, du);
            const float v = acc[mi][ni][2 * h + j];
            store_elem(p.out, p.out_type, gr, v * dg);
            store_elem(p.out, p.out_type, ur, v * du);
          }
      }
    }
}

// ---- launch

// Raises a kernel's dynamic shared-memory limit past the 48 KB default (a host-side attribute,
// not a stream operation: safe under graph capture).
template <typename Kernel>
void set_smem_limit(Kernel kernel, int bytes) {
  FP8MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// One instantiation per (A element bytes, W element bytes, orientation); F32 weights take the
// per-element path of the 2-byte instantiation (they are small: LoRA matrices used as W).
template <class Cfg>
void launch_tile(const Params& p, int64_t n_tiles, bool trans, int a_bytes, int b_bytes, cudaStream_t stream) {
  const int64_t row_tiles = (p.M + Cfg::BM - 1) / Cfg::BM + std::min<int64_t>(p.E, p.M);
  FP8MOE_CHECK(row_tiles < (int64_t{1} << 31) && n_tiles < 65536, "grouped_gemm: grid too large (", row_tiles,
               " row tiles, ", n_tiles, " column tiles)");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(n_tiles));
  auto go = [&](auto kernel, int smem_bytes) {
    set_smem_limit(kernel, smem_bytes);
    kernel<<<grid, Cfg::kThreads, smem_bytes, stream>>>(p);
    FP8MOE_CUDA_LAUNCH_CHECK("grouped_gemm_kernel");
  };
  auto by_trans = [&](auto a, auto b) {
    constexpr int AB = decltype(a)::value, BB = decltype(b)::value;
    if (trans)
      go(grouped_gemm_kernel<Cfg, AB, BB, true>, SmemLayout<Cfg, BB, true>::kBytes);
    else
      go(grouped_gemm_kernel<Cfg, AB, BB, false>, SmemLayout<Cfg, BB, false>::kBytes);
  };
  auto by_b = [&](auto a) {
    if (b_bytes == 1)
      by_trans(a, std::integral_constant<int, 1>{});
    else
      by_trans(a, std::integral_constant<int, 2>{});
  };
  if (a_bytes == 2)
    by_b(std::integral_constant<int, 2>{});
  else
    by_b(std::integral_constant<int, 4>{});
}

// Defined in grouped_gemm_<shape>.cu, one per TileShape.
void launch_m64n128(const Params& p, int64_t n_tiles, bool trans, int a_bytes, int b_bytes, cudaStream_t stream);
// Tile<BM, BN, BK, warps along M, warps along N, stages, CTAs per SM>; BK must equal tile_bk().
using TileM64N128 = Tile<64, 128, 32, 2, 4, 4, 2>;      // 8 warps of 32 x 32; two CTAs per SM

}  // namespace fp8moe::cuda::gemm

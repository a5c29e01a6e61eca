// The parts every grouped GEMM kernel of the family shares (grouped_gemm.cu describes the
// design): launch parameters, the per-CTA row / column maps, the W chunk pipeline (raw copy ->
// dequantized BF16 chunk), the A chunk loads, and the epilogue policies applied to an
// accumulator fragment. The kernels (gemm_kernel.cuh: mma.sync, sm_80+; gemm_kernel_sm90.cuh:
// wgmma, sm_90a) differ only in their shared-memory layout, chunk assignment and MMA engine.
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/gemm_tile.cuh"
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::gemm {


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
  int n_tiles = 1;                            // column tiles of the launch (grid_tile)
  const int32_t* offsets = nullptr;       // [E + 1]
  const int32_t* sorted_pairs = nullptr;  // [M]
  OperandA a, la;
  OperandB b, lb;
  bool vec_a = false;         // A chunks may use 16-byte loads
  bool vec_b = false;         // W chunks may use vector loads with one scale per chunk
  bool vec_lora = false;      // L BF16, LB BF16/F32, r % 8 == 0, aligned: whole 16-byte chunks
  bool wide_b = false;        // W is plain F32 with an 8-multiple row and aligned: wide_chunk loads
  bool b_tile_uniform = false;  // the scale's k-part is constant over every K tile: tabulated
  // Else, when > 0: each W chunk's scale k-part grows by this much per K tile (channel scales read
  // transposed, groups dividing the K tile), so the kernel advances a pointer instead.
  int64_t b_kpart_step = 0;
  // Sm90RegA, transposed W: the scale depends on the stored row alone and steps linearly
  // (b_kpart_step) inside the K tile: a scale per K row, copied with the tile.
  bool k_row_scale = false;
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
  bool out_vec8 = false, aux_vec8 = false;  // 16-byte 8-element stores allowed (row length % 8 == 0, aligned)
  // Split K (mma.sync kernel, plain sums only: gemm_k_splits): CTA z of grid.z sums the z-th range
  // of the main K tiles and stores it, unscaled, into out + z * M * N ([k_splits, M, N] F32).
  int k_splits = 1;
  // A product computed elsewhere (grouped_gemm with a GemmAddend): before the row scale, the sum
  // becomes acc_scale * sum + addend[r, n] * addend_chan[e, n] (addend_chan null: 1).
  const void* addend = nullptr;        // BF16 [M, N]
  const float* addend_chan = nullptr;  // [E, N]
  float acc_scale = 1.0f;
  bool addend_vec8 = false, addend_chan_vec8 = false;
};

// `g` checked (as grouped_gemm checks it) and described as this family's kernels see it, for a
// kernel of another path that runs its own main loop over K tiles of `bk` and this family's tile
// maps and epilogue (build_tile_maps, finish_tile): the W8A8 FP8 dgrad (w8a8_dgrad.cu).
Params checked_params(const GroupedGemm& g, int64_t bk);

// ---- activation policies (the CPU backend's act_forward / act_backward are the reference)

// ex2.approx and rcp.approx: a few instructions instead of expf's and the IEEE division's ~25
// (the activation runs once per output element in the epilogue, which the MMAs do not hide);
// relative error ~1e-6, far below the BF16 rounding of the outputs. Saturates
// correctly: __fdividef gives 0 for a divisor past 2^126 (or inf), exp(-x) = 0 gives 1.
__device__ __forceinline__ float sigmoidf(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

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

// ---- per-CTA maps, built once before the K loop

template <int BM, int BN>
struct alignas(16) TileMaps {  // 16-byte aligned: the epilogue reads col[] as int4
  int arow[BM];   // source row of A for each tile row (-1: padding)
  int larow[BM];  // source row of L
  float rs[BM];   // row scale
  int col[BN];    // column n of v for each tile column (-1: past N)
  int ktab[kMaxKTiles];  // scale k-part of each K tile (b_tile_uniform)
};

// Fills `m` for row tile `rt` and its column tile; the caller synchronises afterwards. kPlain: a
// plain sum (no row scale, LoRA, GLU or scales), whose maps are the A rows and the columns alone.
template <int kThreads, int BM, int BN, bool kTrans, bool kPlain = false>
__device__ void build_tile_maps(const Params& p, const RowTile& rt, int kBK, TileMaps<BM, BN>& m) {
  const int tid = threadIdx.x;
  for (int i = tid; i < BM; i += kThreads) {
    int ar = -1, lr = -1;
    float rs = 0.0f;
    if (i < rt.rows) {
      const int r = rt.row0 + i;
      if constexpr (kPlain) {
        ar = p.a.tokens ? p.sorted_pairs[r] / p.top_k : r;
        rs = 1.0f;
      } else {
        const int pair = p.sorted_pairs[r], tok = pair / p.top_k;
        ar = p.a.tokens ? tok : r;
        lr = p.la.tokens ? tok : r;
        rs = p.row_scale ? load_elem(p.row_scale, p.rs_type, pair) : 1.0f;
      }
    }
    m.arow[i] = ar;
    m.larow[i] = lr;
    m.rs[i] = rs;
  }
  for (int c = tid; c < BN; c += kThreads) {
    int n;
    if (!kPlain && p.epi == Epilogue::GluForward) {
      // Each 16 columns hold 8 gate columns then their 8 up columns, so a thread's accumulators
      // for n-tiles 2q and 2q+1 are the gate and up of the same output column j.
      const int I = p.N / 2, j = rt.col_tile * (BN / 2) + (c / 16) * 8 + c % 8;
      n = j < I ? static_cast<int>((c % 16) >= 8 ? p.act.up_row(j, I) : p.act.gate_row(j, I)) : -1;
    } else {
      n = rt.col_tile * BN + c;
      n = n < p.N ? n : -1;
    }
    m.col[c] = n;
  }
  if (!kPlain && p.b_tile_uniform)
    for (int t = tid; t < (p.K + kBK - 1) / kBK; t += kThreads)
      m.ktab[t] = static_cast<int>(kTrans ? p.b.spec.row_index(int64_t{t} * kBK) : p.b.spec.col_index(int64_t{t} * kBK));
}

// ---- W chunks: 8 consecutive stored elements, copied raw and dequantized to 8 BF16
//
// Non-transposed: chunk = W row n (tile row r), k = k0 + c .. +7.
// Transposed:     chunk = W^T row k = k0 + r, tile columns c .. c+7.
struct BChunk {
  int r = 0, c = 0, n = -1;
  bool vec = false;     // may take the vector path
  int64_t npart = 0;    // scale index part fixed by n
};

template <bool kTrans, int BM, int BN>
__device__ __forceinline__ BChunk make_b_chunk(const Params& p, const TileMaps<BM, BN>& m, int r, int c) {
  BChunk b;
  b.r = r;
  b.c = c;
  if constexpr (kTrans) {
    const int n0 = m.col[c];
    b.n = n0;
    b.vec = p.vec_b && n0 >= 0 && n0 % 8 == 0 && m.col[c + 7] == n0 + 7;
    b.npart = (p.b.scale && n0 >= 0) ? p.b.spec.col_index(n0) : 0;
  } else {
    const int n = m.col[r];
    b.n = n;
    b.vec = p.vec_b;
    b.npart = (p.b.scale && n >= 0) ? p.b.spec.row_index(n) : 0;
  }
  return b;
}

// How chunk `b` of W tile t is produced: 0 zeros, 1 raw copy + vector conversion, 2 per element
// (odd shapes, LoRA tiles). A pure function of (t, chunk): the copy and the conversion agree.
template <bool kTrans>
__device__ __forceinline__ int b_chunk_mode(const Params& p, const BChunk& b, int t, int nkt, int kBK) {
  if (t >= nkt) return 2;
  const int k = t * kBK + (kTrans ? b.r : b.c);
  if (k >= p.K || (!kTrans && b.n < 0)) return 0;
  return b.vec ? 1 : 2;
}

// A whole chunk of a plain BF16 or F32 operand (LoRA B, unquantized F32 W) at stored row/column
// k (< klimit, the K extent) as 8 BF16 times o.mult, by one or two 16-byte loads; false when the
// chunk is not whole (past N, past the K extent, or columns that are not 8 consecutive ones), for
// the per-element path.
// The caller's flag (Params::vec_lora / wide_b) guarantees alignment and a K extent % 8 == 0.
template <bool kTrans, int BM, int BN>
__device__ __forceinline__ bool wide_chunk(const OperandB& o, const TileMaps<BM, BN>& m, const BChunk& b, int e, int k,
                                           int klimit, uint4& out) {
  int n0 = b.n;
  bool whole = k < klimit && n0 >= 0;
  if constexpr (kTrans) {
    n0 = m.col[b.c];
    whole = k < klimit && n0 >= 0 && n0 % 8 == 0 && m.col[b.c + 7] == n0 + 7;
  }
  if (!whole) return false;
  const int64_t off = e * o.expert_stride + (kTrans ? int64_t{k} * o.ld + n0 : int64_t{n0} * o.ld + k);
  float f[8];
  load_run8(o.ptr, o.type, off, f);
  out = make_uint4(pack_bf16x2(f[0] * o.mult, f[1] * o.mult), pack_bf16x2(f[2] * o.mult, f[3] * o.mult),
                   pack_bf16x2(f[4] * o.mult, f[5] * o.mult), pack_bf16x2(f[6] * o.mult, f[7] * o.mult));
  return true;
}

// Queues the raw bytes of a mode-1 chunk of main K tile t into `dst` (cp.async).
template <int kBBytes, bool kTrans>
__device__ __forceinline__ void issue_b_chunk(const Params& p, const BChunk& b, int t, int kBK, const char* b_base,
                                              uint8_t* dst) {
  const int k = t * kBK + (kTrans ? b.r : b.c);
  const int64_t sr = kTrans ? k : b.n, sc = kTrans ? b.n : k;
  cp_async<8 * kBBytes>(dst, b_base + (sr * p.b.ld + sc) * kBBytes);
}

// The 8 BF16 of chunk `b` of tile t (main or LoRA): the raw bytes at `raw` dequantized with their
// scale (mode 1), per element (mode 2) or zeros (mode 0).
template <int kBBytes, bool kTrans, int BM, int BN>
__device__ __forceinline__ uint4 convert_b_chunk(const Params& p, const TileMaps<BM, BN>& m, const BChunk& b, int mode,
                                                 const uint8_t* raw, int t, int nkt, int kBK, int e) {
  if (mode == 0) return make_uint4(0, 0, 0, 0);
  const bool lora = t >= nkt;
  const int k0 = (lora ? t - nkt : t) * kBK;
  if (mode == 1) {
    const int k = k0 + (kTrans ? b.r : b.c);
    const Chunk<kBBytes> c = *reinterpret_cast<const Chunk<kBBytes>*>(raw);
    float scale = 1.0f;
    if (p.b.scale) {
      const int64_t kpart = p.b_tile_uniform ? m.ktab[t] : (kTrans ? p.b.spec.row_index(k) : p.b.spec.col_index(k));
      scale = __ldg(p.b.scale + e * p.b.scale_stride + b.npart + kpart);
    }
    return chunk_to_bf16(c, scale, p.b.type == Elem::E5M2);
  }
  uint4 wide;
  if ((lora ? p.vec_lora : p.wide_b) && wide_chunk<kTrans>(lora ? p.lb : p.b, m, b, e, k0 + (kTrans ? b.r : b.c),
                                                                  lora ? p.R : p.K, wide))
    return wide;
  const OperandB& ob = lora ? p.lb : p.b;
  const int klimit = lora ? p.R : p.K;
  float f[8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
    f[j] = kTrans ? slow_b_elem<true>(ob, e, m.col[b.c + j], k0 + b.r, klimit)
                  : slow_b_elem<false>(ob, e, b.n, k0 + b.c + j, klimit);
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
}

// Element i of W in the storage of a kBBytes instance without Elem's four-way switch (the plain
// kernel's per-element path): FP8 codes for 1 byte, BF16 or F32 for 2 (dispatch_storage).
template <int kBBytes>
__device__ __forceinline__ float plain_w_elem(const OperandB& o, int64_t i) {
  if constexpr (kBBytes == 1) {
    const uint8_t c = static_cast<const uint8_t*>(o.ptr)[i];
    return o.type == Elem::E5M2 ? decode_e5m2(c) : decode_e4m3(c);
  } else {
    return o.type == Elem::F32 ? static_cast<const float*>(o.ptr)[i]
                               : __bfloat162float(static_cast<const __nv_bfloat16*>(o.ptr)[i]);
  }
}

// convert_b_chunk for a plain sum (Tile::kPlain): unscaled W, main K tiles only.
template <int kBBytes, bool kTrans, int BM, int BN>
__device__ __forceinline__ uint4 convert_plain_b_chunk(const Params& p, const TileMaps<BM, BN>& m, const BChunk& b,
                                                       int mode, const uint8_t* raw, int t, int kBK, int e) {
  if (mode == 0) return make_uint4(0, 0, 0, 0);
  if (mode == 1) return chunk_to_bf16(*reinterpret_cast<const Chunk<kBBytes>*>(raw), 1.0f, p.b.type == Elem::E5M2);
  const int k0 = t * kBK;
  uint4 wide;
  if (p.wide_b && wide_chunk<kTrans>(p.b, m, b, e, k0 + (kTrans ? b.r : b.c), p.K, wide)) return wide;
  float f[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int n = kTrans ? m.col[b.c + j] : b.n, k = k0 + (kTrans ? b.r : b.c + j);
    const int64_t sr = kTrans ? k : n, sc = kTrans ? n : k;  // stored coordinates
    f[j] = n >= 0 && k < p.K ? plain_w_elem<kBBytes>(p.b, e * p.b.expert_stride + sr * p.b.ld + sc) : 0.0f;
  }
  return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
}

// ---- A chunks: 8 BF16 of a tile row at K offset k, into shared memory at `dst`.

// The A chunk of source row `src` (< 0: none) at K offset k when A's rows allow whole 16-byte
// chunks (Params::vec_a): BF16 by cp.async, zero-filled past the rows / K; F32 loaded and converted.
template <int kABytes>
__device__ __forceinline__ void load_vec_a_chunk(const Params& p, int src, int k, __nv_bfloat16* dst) {
  const bool valid = src >= 0 && k < p.K;
  const char* g = static_cast<const char*>(p.a.ptr) + (valid ? (src * p.a.ld + k) * kABytes : 0);
  if constexpr (kABytes == 2) {
    cp_async16(dst, g, valid ? 16 : 0);
  } else {
    Chunk<kABytes> c;
    if (valid) load_chunk(c, g); else zero_chunk(c);
    *reinterpret_cast<uint4*>(dst) = chunk_to_bf16(c, 1.0f, false);
  }
}

// Tile row `row`'s chunk at K offset kc of K tile t (main or LoRA): by cp.async (zero-filled past
// the rows / K), or converted in place (F32 A, per-element chunks, LoRA tiles).
template <int kABytes, int BM, int BN>
__device__ __forceinline__ void load_a_chunk(const Params& p, const TileMaps<BM, BN>& m, int t, int nkt, int kBK,
                                             int row, int kc, __nv_bfloat16* dst) {
  const bool lora = t >= nkt;
  const int k = (lora ? t - nkt : t) * kBK + kc;
  if (!lora && p.vec_a) {
    load_vec_a_chunk<kABytes>(p, m.arow[row], k, dst);
  } else if (lora && p.vec_lora) {
    const int src = m.larow[row];
    const bool valid = src >= 0 && k < p.R;  // r % 8 == 0: whole chunks
    cp_async16(dst, static_cast<const char*>(p.la.ptr) + (valid ? (int64_t{src} * p.la.ld + k) * 2 : 0), valid ? 16 : 0);
  } else {
    *reinterpret_cast<uint4*>(dst) = lora ? slow_a_chunk(p.la, m.larow[row], k, p.R) : slow_a_chunk(p.a, m.arow[row], k, p.K);
  }
}

// load_a_chunk for a plain sum (Tile::kPlain): main K tiles only, and a per-element path typed by
// the instance (A is BF16 for 2 bytes, F32 for 4) instead of Elem's switch.
template <int kABytes, int BM, int BN>
__device__ __forceinline__ void load_plain_a_chunk(const Params& p, const TileMaps<BM, BN>& m, int t, int kBK, int row,
                                                   int kc, __nv_bfloat16* dst) {
  const int k = t * kBK + kc, src = m.arow[row];
  if (p.vec_a) {
    load_vec_a_chunk<kABytes>(p, src, k, dst);
    return;
  }
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t i = src * p.a.ld + k + j;
    if (src < 0 || k + j >= p.K) v[j] = 0.0f;
    else if constexpr (kABytes == 4) v[j] = static_cast<const float*>(p.a.ptr)[i];
    else v[j] = __bfloat162float(static_cast<const __nv_bfloat16*>(p.a.ptr)[i]);
  }
  *reinterpret_cast<uint4*>(dst) =
      make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}

// ---- epilogue: v = rs * acc + bias, then the policy, staged through shared memory
//
// Each engine first writes its accumulators to an fp32 tile in shared memory (its pipeline
// buffers are free by then); finish_tile then walks the tile 8 columns per step, so the stores
// are 16-byte and coalesced and the policy code exists once. Applied straight to the unrolled
// fragment, the policies were ~25,000 SASS instructions of the wgmma kernel and executed about as
// many instructions per CTA as its whole K loop (bench/NOTES.md).

// fp32 row stride of the staged tile: +8 floats keep a half-warp's float2 writes conflict-free.
template <int BN>
constexpr int kStageLd = BN + 8;
template <int BM, int BN>
constexpr int kStageBytes = BM * kStageLd<BN> * 4;

// Writes a warp's m16n8 accumulator fragment (mma.sync, and wgmma's per warp) into `st`:
// acc[mi][ni][2h + j] is tile row row0 + 16 mi + 8 h + lane / 4, column col0 + 8 ni + 2 (lane % 4) + j.
template <int BN, int MI, int NI>
__device__ __forceinline__ void stage_accumulators(float* st, float (&acc)[MI][NI][4], int row0, int col0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int row = row0 + mi * 16 + h * 8 + lane / 4, col = col0 + ni * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(st + row * kStageLd<BN> + col) = make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
}

// Whether columns n[0..7] are 8 consecutive ones starting on a multiple of 8.
__device__ __forceinline__ bool run_of_8(const int (&n)[8]) {
  bool ok = n[0] >= 0 && n[0] % 8 == 0;
#pragma unroll
  for (int j = 1; j < 8; ++j) ok = ok && n[j] == n[0] + j;
  return ok;
}
// v[j] -> row[n[j]] (n < 0: skipped). `vec`: the row allows 16-byte-aligned 8-element stores.
__device__ __forceinline__ void store8(void* p, Elem t, int64_t row, const int (&n)[8], const float (&v)[8], bool vec) {
  if (vec && run_of_8(n)) {
    store_run8(p, t, row + n[0], v);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (n[j] >= 0) store_elem(p, t, row + n[j], v[j]);
}
// row[n[j]] -> v[j] (0 where n < 0); BF16 or F32.
__device__ __forceinline__ void load8(const void* p, Elem t, int64_t row, const int (&n)[8], float (&v)[8], bool vec) {
  if (vec && run_of_8(n)) {
    load_run8(p, t, row + n[0], v);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = n[j] >= 0 ? load_elem(p, t, row + n[j]) : 0.0f;
}

// f[j] (the sum for columns n[j] of row r of expert e) -> acc_scale * f[j] + addend * chan (Params).
__device__ __forceinline__ void add_addend(const Params& p, int64_t r, int64_t e, const int (&n)[8], float (&f)[8]) {
  float ad[8], ch[8];
  load8(p.addend, Elem::BF16, r * p.N, n, ad, p.addend_vec8);
  if (p.addend_chan) load8(p.addend_chan, Elem::F32, e * p.N, n, ch, p.addend_chan_vec8);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = p.acc_scale * f[j] + (p.addend_chan ? ad[j] * ch[j] : ad[j]);
}

// The epilogue over the staged tile `st` (all threads of the CTA, after a barrier). A step covers
// 8 columns of one row, or for GLU forward one 16-column group (8 gate columns, then their 8 up
// columns: TileMaps) and its 8 outputs. kLd: the tile's row stride (floats, a multiple of 4).
// `tid`: this thread's index among the kThreads that run it.
template <int kThreads, int BM, int BN, int kLd = kStageLd<BN>>
__device__ __forceinline__ void finish_tile(const Params& p, const RowTile& rt, const TileMaps<BM, BN>& m, const float* st,
                                            int tid) {
  const bool glu_fwd = p.epi == Epilogue::GluForward;
  const int step_cols = glu_fwd ? 16 : 8, steps_per_row = BN / step_cols, items = rt.rows * steps_per_row;
  const int64_t e = rt.expert;
  // The 8 columns of v that half h of step u covers (-1 past N). Step u is tile row
  // u / steps_per_row, tile columns from (u % steps_per_row) * step_cols.
  auto columns = [&](int u, int (&n)[8], int h) {
    const int c0 = (u % steps_per_row) * step_cols;
    const int4* cm = reinterpret_cast<const int4*>(m.col + c0 + 8 * h);  // c0 % 8 == 0
    const int4 ca = cm[0], cb = cm[1];
    n[0] = ca.x, n[1] = ca.y, n[2] = ca.z, n[3] = ca.w, n[4] = cb.x, n[5] = cb.y, n[6] = cb.z, n[7] = cb.w;
  };
  // v = rs * staged + bias for half h (the up columns of a GLU-forward step: h = 1), the staged sum
  // first combined with the addend where there is one.
  auto values = [&](int u, const int (&n)[8], int h, float (&v)[8]) {
    const int lr = u / steps_per_row, c0 = (u % steps_per_row) * step_cols;
    const float rs = m.rs[lr];
    const float4* s = reinterpret_cast<const float4*>(st + lr * kLd + c0 + 8 * h);
    const float4 a = s[0], b = s[1];
    float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    if (p.addend) add_addend(p, rt.row0 + lr, e, n, f);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = f[j] * rs;
      if (p.bias && n[j] >= 0) v[j] += load_elem(p.bias, p.bias_type, e * p.N + n[j]);
    }
  };
  if (p.epi == Epilogue::GluBackward) {  // v = dL/d act [M, N]; aux (pre-activation) and out are [M, 2N]
    const int I = p.N;
    for (int u = tid; u < items; u += kThreads) {
      const int64_t r = rt.row0 + u / steps_per_row;
      int n[8], gn[8], un[8];
      float v[8], g[8], up[8], dg[8], du[8];
      columns(u, n, 0);
      values(u, n, 0, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        gn[j] = n[j] >= 0 ? static_cast<int>(p.act.gate_row(n[j], I)) : -1;
        un[j] = n[j] >= 0 ? static_cast<int>(p.act.up_row(n[j], I)) : -1;
      }
      load8(p.aux, p.aux_type, r * 2 * I, gn, g, p.aux_vec8);
      load8(p.aux, p.aux_type, r * 2 * I, un, up, p.aux_vec8);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float da, db;
        act_backward(p.act, g[j], up[j], da, db);
        dg[j] = v[j] * da;
        du[j] = v[j] * db;
      }
      store8(p.out, p.out_type, r * 2 * I, gn, dg, p.out_vec8);
      store8(p.out, p.out_type, r * 2 * I, un, du, p.out_vec8);
    }
    return;
  }
  for (int u = tid; u < items; u += kThreads) {
    const int64_t r = rt.row0 + u / steps_per_row;
    int n[2][8];
    float v[2][8];
    columns(u, n[0], 0);
    values(u, n[0], 0, v[0]);
    if (p.epi == Epilogue::Store) {
      const int64_t split = p.k_splits > 1 ? int64_t{blockIdx.z} * p.M : 0;  // this split's [M, N] slice
      store8(p.out, p.out_type, (split + r) * p.N, n[0], v[0], p.out_vec8);
      continue;
    }
    columns(u, n[1], 1);  // GLU forward: the up half of the step
    values(u, n[1], 1, v[1]);
    if (p.aux) {
      store8(p.aux, p.aux_type, r * p.N, n[0], v[0], p.aux_vec8);
      store8(p.aux, p.aux_type, r * p.N, n[1], v[1], p.aux_vec8);
    }
    const int I = p.N / 2, j0 = rt.col_tile * (BN / 2) + (u % steps_per_row) * step_cols / 2;
    float o[8];
    int jn[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      o[j] = act_forward(p.act, v[0][j], v[1][j]);
      jn[j] = j0 + j < I ? j0 + j : -1;
    }
    store8(p.out, p.out_type, r * I, jn, o, p.out_vec8);
  }
}

// finish_tile for a plain sum (Tile::kPlain; Store with no row scale, bias or addend): the staged
// tile into out, 8 columns per step; with split K, into this split's [M, N] slice of partials.
template <int kThreads, int BM, int BN, int kLd = kStageLd<BN>>
__device__ __forceinline__ void finish_plain_tile(const Params& p, const RowTile& rt, const TileMaps<BM, BN>& m,
                                                  const float* st, int tid) {
  constexpr int kSteps = BN / 8;
  const int64_t split = p.k_splits > 1 ? int64_t{blockIdx.z} * p.M : 0;
  for (int u = tid; u < rt.rows * kSteps; u += kThreads) {
    const int lr = u / kSteps, c0 = (u % kSteps) * 8;
    const int4* cm = reinterpret_cast<const int4*>(m.col + c0);  // c0 % 8 == 0
    const int4 ca = cm[0], cb = cm[1];
    const int n[8] = {ca.x, ca.y, ca.z, ca.w, cb.x, cb.y, cb.z, cb.w};
    const float4* s = reinterpret_cast<const float4*>(st + lr * kLd + c0);
    const float4 a = s[0], b = s[1];
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    store8(p.out, p.out_type, (split + rt.row0 + lr) * p.N, n, v, p.out_vec8);
  }
}

// ---- launch helpers

// Raises a kernel's dynamic shared-memory limit past the 48 KB default (a host-side attribute,
// not a stream operation: safe under graph capture).
template <typename Kernel>
void set_smem_limit(Kernel kernel, int bytes) {
  FP8MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Calls f(integral_constant<A bytes>, integral_constant<W bytes>, integral_constant<bool trans>):
// one kernel instantiation per storage combination. F32 weights take the per-element path of the
// 2-byte instantiation (they are small: LoRA matrices used as W).
template <class F>
void dispatch_storage(int a_bytes, int b_bytes, bool trans, F&& f) {
  auto by_trans = [&](auto a, auto b) {
    if (trans)
      f(a, b, std::true_type{});
    else
      f(a, b, std::false_type{});
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

// Launches one compiled kernel: tile shape x A element bytes x W element bytes x W orientation.
// Defined in gemm_instance.cuh; instantiated once per combination in generated translation units
// (CMakeLists.txt), so the slow sm_90a compiles run in parallel.
template <TileShape S, int AB, int BB, bool TR>
void launch_instance(const Params& p, dim3 grid, cudaStream_t stream);

// Grid of a grouped launch, one dimension (grid_tile): an upper bound on the row tiles (CTAs past
// the last exit at once) times the column tiles, which it records in p.n_tiles.
inline dim3 grouped_grid(Params& p, int bm, int64_t n_tiles) {
  const int64_t row_tiles = (p.M + bm - 1) / bm + std::min<int64_t>(p.E, p.M);
  FP8MOE_CHECK(n_tiles >= 1 && row_tiles * n_tiles < (int64_t{1} << 31), "grouped_gemm: grid too large (", row_tiles,
               " row tiles x ", n_tiles, " column tiles)");
  p.n_tiles = static_cast<int>(n_tiles);
  return dim3(static_cast<unsigned>(row_tiles * n_tiles));
}

}  // namespace fp8moe::cuda::gemm

// The W8A8 forward path (w8a8.cuh describes it): host side (conditions, checks, the three
// phases), the quantize kernel and the epilogue kernel. The CUTLASS GEMM is in
// cutlass/fp8_grouped_sm90.cu, built only when CUTLASS headers and an sm_90a target are there
// (FP8MOE_HAS_W8A8); without it, available() says why and grouped_gemm() refuses.
#include "backends/cuda/w8a8.cuh"

#include <cuda_fp8.h>

#include <cfloat>

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/gemm_parts.cuh"
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::w8a8 {
namespace {

using gemm::Elem;

constexpr int kGroup = static_cast<int>(kFp8RowGroup);  // activation scale group along K (CUTLASS's K block)
constexpr float kE4m3Max = 448.0f;

// ---- kernels

struct QuantizeParams {
  const void* src = nullptr;  // [rows, K] BF16 / F32 (rows = M, or T when read by token)
  Elem type = Elem::BF16;
  // Tokens: src row t fills rows row_of_pair[t * top_k + j], j < top_k (read once, written k
  // times; each row is one pair's, so every row is written once). Rows: src row r fills row r.
  bool tokens = false;
  bool vec = false;  // 8-element vector loads (quantize_rows sets when the rows allow them)
  const int32_t* row_of_pair = nullptr;
  int top_k = 1;
  int64_t src_rows = 0;  // T (tokens) or M
  int K = 0, groups = 0;
  uint8_t* codes = nullptr;  // [M, K]
  float* scales = nullptr;   // [M, groups]
  // Optional per-expert column factors f [E, K]: row r of expert e is quantized as A[r, k] * f[e, k]
  // (quantize_rows_scaled). The k rows of a token then differ, so the kernel runs over the M rows
  // (src_rows = M), each gathered from its token when `tokens` (sorted_pairs[r] / top_k).
  const float* col_factors = nullptr;
  const int32_t* offsets = nullptr;       // [E + 1]
  const int32_t* sorted_pairs = nullptr;  // [M]
  int E = 0;
};

// Expert of row r: the largest e with offsets[e] <= r (offsets[0] = 0 <= r).
__device__ __forceinline__ int expert_of(const int32_t* offsets, int E, int64_t r) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// v[j] = A[i + j] for j < rem (rem: the row's columns left from i, <= 0 past its end), else 0.
__device__ __forceinline__ void load8(const QuantizeParams& q, int64_t i, int rem, float (&v)[8]) {
  if (q.vec && rem >= 8) {
    if (q.type == Elem::BF16) {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(q.src) + i);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
        v[2 * j] = f.x, v[2 * j + 1] = f.y;
      }
    } else {
      const float4* f = reinterpret_cast<const float4*>(static_cast<const float*>(q.src) + i);
      const float4 a = f[0], b = f[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = j < rem ? gemm::load_elem(q.src, q.type, i + j) : 0.0f;
}

// The group's scale from its amax: the smallest normal for an all-zero group, whose codes are then
// zero (0 / FLT_MIN = 0), never 0 / 0.
__device__ __forceinline__ float group_scale(float amax) { return fmaxf(amax / kE4m3Max, FLT_MIN); }

// amax of v over the 16 lanes of this half warp (every lane of the warp must call it).
__device__ __forceinline__ float half_warp_amax(const float (&v)[8]) {
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  return amax;
}

// The 8 codes of v / scale (saturating round-to-nearest-even, as the host's quantize_activations,
// so both give the same bits), little-endian in two words.
__device__ __forceinline__ void encode8(const float (&v)[8], float scale, uint32_t (&word)[2]) {
  word[0] = word[1] = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    word[j / 4] |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(v[j] / scale, __NV_SATFINITE, __NV_E4M3)) << (8 * (j % 4));
}

// The first min(8, rem) codes to out (rem > 0): one 8-byte store where the row allows (`vec`: rows
// of a multiple of 8 codes, so out is 8-byte aligned).
__device__ __forceinline__ void store_codes8(uint8_t* out, const uint32_t (&word)[2], int rem, bool vec) {
  if (rem >= 8 && vec) {
    *reinterpret_cast<uint2*>(out) = make_uint2(word[0], word[1]);
  } else {
    for (int j = 0; j < 8 && j < rem; ++j) out[j] = static_cast<uint8_t>(word[j / 4] >> (8 * (j % 4)));
  }
}

// Half a warp per (source row, 128-wide group), 8 elements (one 16-byte BF16 load) per lane: a
// max over the 16 lanes gives the group's scale, then every lane encodes its 8 codes (encode8) and
// stores them as one 8-byte word into each row the source row fills. Reading a token
// once rather than once per row it fills cuts GEMM1's input traffic from k reads of [T, K] to one
// (the gathered reads of 2-4 KB rows missed L2 at full-size token counts: bench/NOTES.md).
__global__ void quantize_rows_kernel(QuantizeParams q) {
  const int64_t half = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 16;
  const int lane = threadIdx.x % 16;
  // Both halves of a warp take part in the shuffles; a half past the end works on nothing.
  const bool live = half < q.src_rows * q.groups;
  const int64_t src_row = live ? half / q.groups : 0;
  const int g = live ? static_cast<int>(half % q.groups) : 0;
  // The columns left from k, compared as they are: no max(0, min(8, rem)). ptxas (CUDA 12.0-13.3)
  // fused such a clamp and the `== 8` test into one VIMNMX.RELU whose predicate it gets wrong on
  // sm_90 (NVIDIA/cccl#11306): lanes past a partial last group then took the vector load.
  const int k = g * kGroup + 8 * lane, rem = live ? q.K - k : 0;
  float v[8];
  // With column factors, src_row is an output row r, read from its token when gathered.
  const bool scaled = q.col_factors != nullptr;
  const int64_t read_row = scaled && q.tokens && live ? q.sorted_pairs[src_row] / q.top_k : src_row;
  load8(q, read_row * q.K + k, rem, v);
  if (scaled && live) {
    // Rows at or past offsets[E] (out-of-range ids) belong to no expert: quantized as they are.
    const bool in_expert = src_row < q.offsets[q.E];
    const float* f = q.col_factors + static_cast<int64_t>(in_expert ? expert_of(q.offsets, q.E, src_row) : 0) * q.K + k;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (in_expert && j < rem) v[j] *= __ldg(f + j);
  }
  const float amax = half_warp_amax(v);
  if (!live) return;
  const float scale = group_scale(amax);
  uint32_t word[2];
  encode8(v, scale, word);
  const int copies = q.tokens && !scaled ? q.top_k : 1;
  for (int c = 0; c < copies; ++c) {
    const int64_t r = q.tokens && !scaled ? q.row_of_pair[src_row * q.top_k + c] : src_row;
    if (lane == 0) q.scales[r * q.groups + g] = scale;
    if (rem > 0) store_codes8(q.codes + r * q.K + k, word, rem, q.K % 8 == 0);
  }
}

struct EpilogueParams {
  int64_t M = 0;
  int N = 0, E = 0;
  const int32_t* offsets = nullptr;       // [E + 1]
  const int32_t* sorted_pairs = nullptr;  // [M]
  const __nv_bfloat16* d = nullptr;       // [M, N] the FP8 GEMM's result
  const float* chan = nullptr;            // [E, N] per-channel weight scales (else null)
  const void* row_scale = nullptr;        // [T * k] by pair
  Elem rs_type = Elem::F32;
  const void* bias = nullptr;             // [E, N]
  Elem bias_type = Elem::F32;
  Epilogue epi = Epilogue::Store;
  ActivationSpec act;
  void* aux = nullptr;  // GluForward: [M, N] pre-activation (optional; may alias d)
  Elem aux_type = Elem::BF16;
  bool aux_store = false;  // aux is written: it is not D itself holding v already
  void* out = nullptr;     // [M, N] or [M, N / 2]
  Elem out_type = Elem::BF16;
  bool out_vec8 = false, aux_vec8 = false, chan_vec8 = false;
  int rows_per_block = 1;
  // out's Fp8Rows, written from the values as stored (else null).
  uint8_t* q_codes = nullptr;  // [M, cols]
  float* q_scales = nullptr;   // [M, ceil(cols / 128)]
  // LoRA delta (vector_epilogue_kernel with kR > 0): + lora_scale * sum_q L[row, q] LB_e[n, q],
  // before the row scale, as GroupedGemm's v.
  const void* l = nullptr;  // [M, R], or [T, R] read through the plan (l_tokens)
  Elem l_type = Elem::BF16;
  bool l_tokens = false;
  int top_k = 1;
  const void* lb = nullptr;  // [E, N, R]
  Elem lb_type = Elem::F32;
  int R = 0;
  float lora_scale = 0.0f;
};

// GroupedGemm's v from D = the FP8 product: ch, the channel scale (1 without); delta, the scaled
// LoRA term (0 without); rs, the row scale; bias (0 without). v_run8 applies the same terms.
__device__ __forceinline__ float epilogue_value(float d, float ch, float delta, float rs, float bias) {
  return (d * ch + delta) * rs + bias;
}

// v[j] for columns n[j] of row r (n < 0: 0), without LoRA. The 8
// values of D and the channel scales come as vector loads where n is a run of 8 (the halves
// layout, or a Store); e is only read when there are channel scales or a bias.
__device__ __forceinline__ void v8(const EpilogueParams& p, int64_t r, int e, float rs, const int (&n)[8], float (&v)[8]) {
  gemm::load8(p.d, Elem::BF16, r * p.N, n, v, true);
  float ch[8];
  if (p.chan) gemm::load8(p.chan, Elem::F32, static_cast<int64_t>(e) * p.N, n, ch, p.chan_vec8);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (n[j] < 0) continue;
    const float bias = p.bias ? gemm::load_elem(p.bias, p.bias_type, static_cast<int64_t>(e) * p.N + n[j]) : 0.0f;
    v[j] = epilogue_value(v[j], p.chan ? ch[j] : 1.0f, 0.0f, rs, bias);
  }
}

// A block covers a run of EpilogueParams::rows_per_block rows, one thread per 8 output columns of a
// row at a time. Rows ascend within a thread, so its expert is found once by a binary search and
// then advanced, not searched per item. Store writes v; GluForward reads the 8 gate and 8 up
// columns of its 8 outputs, keeps them in aux (unless aux is D itself and v = D) and writes
// act(gate, up). Rows at or past offsets[E] (pairs whose id was out of range) hold no product and
// are not written, as in GroupedGemm.
// With q_codes, the outputs are also quantized as the next GEMM reads them (GroupedGemm::out_fp8),
// which saves that GEMM a pass over them: a row's chunks are padded to a multiple of 16, so each
// half warp holds one row's 128-wide group (blockDim and the warps' first items are multiples of
// 32) and takes its amax with shuffles, as quantize_rows_kernel does.
__global__ void epilogue_kernel(EpilogueParams p) {
  const bool glu = p.epi == Epilogue::GluForward;
  const int cols = glu ? p.N / 2 : p.N, chunks = (cols + 7) / 8;
  const int stride = p.q_codes ? (chunks + 15) / 16 * 16 : chunks;  // items per row
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t r_end = min(static_cast<int64_t>(p.offsets[p.E]), min(p.M, r0 + p.rows_per_block));
  if (r0 >= r_end) return;
  const int items = static_cast<int>(r_end - r0) * stride;
  const bool need_e = p.chan || p.bias;
  const int lane = threadIdx.x % 32;
  int e = need_e ? expert_of(p.offsets, p.E, r0 + threadIdx.x / stride) : 0;
  // Whole warps iterate together (the shuffles need every lane); a lane past the items idles.
  for (int base = threadIdx.x - lane; base < items; base += blockDim.x) {
    const int i = base + lane;
    const bool live = i < items;
    const int64_t r = r0 + (live ? i / stride : 0);
    const int c0 = (i % stride) * 8;
    int n[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) n[j] = live && c0 + j < cols ? c0 + j : -1;
    float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n[0] >= 0) {
      if (need_e)
        while (p.offsets[e + 1] <= r) ++e;
      const float rs = p.row_scale ? gemm::load_elem(p.row_scale, p.rs_type, p.sorted_pairs[r]) : 1.0f;
      if (!glu) {
        v8(p, r, e, rs, n, o);
      } else {
        int gn[8], un[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          gn[j] = n[j] >= 0 ? static_cast<int>(p.act.gate_row(n[j], cols)) : -1;
          un[j] = n[j] >= 0 ? static_cast<int>(p.act.up_row(n[j], cols)) : -1;
        }
        float g[8], u[8];
        v8(p, r, e, rs, gn, g);
        v8(p, r, e, rs, un, u);
        if (p.aux_store) {
          gemm::store8(p.aux, p.aux_type, r * p.N, gn, g, p.aux_vec8);
          gemm::store8(p.aux, p.aux_type, r * p.N, un, u, p.aux_vec8);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = n[j] >= 0 ? gemm::act_forward(p.act, g[j], u[j]) : 0.0f;
      }
      gemm::store8(p.out, p.out_type, r * cols, n, o, p.out_vec8);
    }
    if (!p.q_codes) continue;
    // The values as stored (the next GEMM's quantize pass would read those), then their codes.
    if (p.out_type == Elem::BF16) {
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = __bfloat162float(__float2bfloat16_rn(o[j]));
    }
    const float amax = half_warp_amax(o);
    if (n[0] < 0) continue;  // padding past the row's end, or past the items
    const float scale = group_scale(amax);
    if (c0 % kGroup == 0) p.q_scales[r * ((cols + kGroup - 1) / kGroup) + c0 / kGroup] = scale;
    uint32_t word[2];
    encode8(o, scale, word);
    store_codes8(p.q_codes + r * cols + c0, word, cols - c0, cols % 8 == 0);
  }
}

// ---- the vector pass (EpilogueForm::Vector; w8a8.cuh: vector_tile)

namespace vt = vector_tile;

// The 8 v values of row r at v columns col .. col + 7 (col a multiple of 8): GroupedGemm's
// (d * ch + lora_scale * delta) * rs + bias, as epilogue_value, each term a 16-byte run. `delta`:
// the run in the block's F32 delta tile (kLora only). Terms are applied one by one rather than
// through epilogue_value: that call with arrays of neutral defaults doubled the kernel's registers.
template <bool kLora>
__device__ __forceinline__ void v_run8(const EpilogueParams& p, int64_t r, int e, float rs, int col, const float* delta,
                                       float (&v)[8]) {
  gemm::load_run8(p.d, Elem::BF16, r * p.N + col, v);
  if (p.chan) {
    float ch[8];
    gemm::load_run8(p.chan, Elem::F32, static_cast<int64_t>(e) * p.N + col, ch);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] *= ch[j];
  }
  if constexpr (kLora) {
    const float4 a = reinterpret_cast<const float4*>(delta)[0], b = reinterpret_cast<const float4*>(delta)[1];
    const float dl[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = fmaf(p.lora_scale, dl[j], v[j]);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] *= rs;
  if (p.bias) {
    float b[8];
    gemm::load_run8(p.bias, p.bias_type, static_cast<int64_t>(e) * p.N + col, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] += b[j];
  }
}

// The block's LoRA delta tile: delta[lr][j] = sum_q L[r0 + lr, q] LB_e[v_col(j), q] for each row
// lr < rows, e the row's expert. L's rows (read through the plan) are staged once; then, for each
// expert the rows hold, LB_e's rows for the tile's v columns, and one MMA of the whole tile whose
// rows of that expert are kept. Ranks past R are zero in both operands.
template <int kR, bool kGlu, bool kInter>
__device__ void lora_delta_tile(const EpilogueParams& p, int64_t r0, int rows, int tile, int cols, uint32_t* smem) {
  constexpr int kW = vt::words(kR), kPairs = kR / 2, kVc = vt::v_cols(kGlu), kNt = vt::n_tiles(kGlu);
  uint32_t* ls = smem;
  uint32_t* lbs = ls + vt::kRows * kW;
  float* delta = reinterpret_cast<float*>(lbs + kVc * kW);
  for (int i = threadIdx.x; i < vt::kRows * kPairs; i += vt::kThreads) {
    const int lr = i / kPairs, w = i % kPairs, q = 2 * w;
    float x0 = 0.0f, x1 = 0.0f;
    if (lr < rows) {
      const int64_t r = r0 + lr, src = p.l_tokens ? p.sorted_pairs[r] / p.top_k : r;
      if (q < p.R) x0 = gemm::load_elem(p.l, p.l_type, src * p.R + q);
      if (q + 1 < p.R) x1 = gemm::load_elem(p.l, p.l_type, src * p.R + q + 1);
    }
    ls[lr * kW + w] = gemm::pack_bf16x2(x0, x1);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int e_first = expert_of(p.offsets, p.E, r0), e_last = expert_of(p.offsets, p.E, r0 + rows - 1);
  for (int e = e_first; e <= e_last; ++e) {
    const int64_t lo = p.offsets[e], hi = p.offsets[e + 1];
    if (lo == hi) continue;  // the same for the whole block: no barrier is skipped by part of it
    __syncthreads();         // L staged; the last expert's reads of lbs done
    for (int i = threadIdx.x; i < kVc * kPairs; i += vt::kThreads) {
      const int j = i / kPairs, w = i % kPairs, q = 2 * w;
      const int n = vt::v_col(j, tile, cols, kGlu, kInter);
      float x0 = 0.0f, x1 = 0.0f;
      if (n >= 0) {
        const int64_t base = (static_cast<int64_t>(e) * p.N + n) * p.R;
        if (q < p.R) x0 = gemm::load_elem(p.lb, p.lb_type, base + q);
        if (q + 1 < p.R) x1 = gemm::load_elem(p.lb, p.lb_type, base + q + 1);
      }
      lbs[j * kW + w] = gemm::pack_bf16x2(x0, x1);
    }
    __syncthreads();
    float acc[2][kNt][4] = {};
#pragma unroll
    for (int kk = 0; kk < kR / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mh = 0; mh < 2; ++mh)
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) a[mh][reg] = ls[vt::a_row(16 * mh, reg, lane) * kW + vt::a_word(reg, lane, kk)];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        const int n0 = (warp * kNt + nt) * 8;
        const uint32_t b0 = lbs[vt::b_row(n0, lane) * kW + vt::b_word(0, lane, kk)];
        const uint32_t b1 = lbs[vt::b_row(n0, lane) * kW + vt::b_word(1, lane, kk)];
#pragma unroll
        for (int mh = 0; mh < 2; ++mh) gemm::mma_bf16_16816(acc[mh][nt], a[mh], b0, b1);
      }
    }
#pragma unroll
    for (int mh = 0; mh < 2; ++mh)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = vt::c_row(16 * mh, h, lane);
        if (r0 + lr < lo || r0 + lr >= hi) continue;  // another expert's row, or past the rows
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
          const int col = (warp * kNt + nt) * 8 + vt::c_col(lane);
          *reinterpret_cast<float2*>(delta + lr * vt::delta_ld(kGlu) + col) =
              make_float2(acc[mh][nt][2 * h], acc[mh][nt][2 * h + 1]);
        }
      }
  }
  __syncthreads();  // the delta tile complete
}

// epilogue_kernel's work in tiles of 32 rows x 128 outputs (blockIdx.x: the row tile, .y: the column
// tile), with the LoRA delta where kR > 0 (the rank rounded up to 16 or 32). kGlu: GluForward;
// kInter: its gate and up columns interleaved (GPT-OSS), else halves; template arguments, so that
// every run index is a constant (a runtime choice would index the runs in local memory). Every
// item reads and writes 16-byte runs, with no index arrays: 40 to 63 registers (sm_90a, CUDA 13.0)
// against epilogue_kernel's 93, which left that pass latency-bound at two blocks per SM
// (bench/NOTES.md, twenty-seventh session).
// Rows at or past offsets[E] are not written. With q_codes, a half warp holds one row's 128-wide
// group (16 chunks) and takes its amax with shuffles, as epilogue_kernel does.
template <int kR, bool kGlu, bool kInter>
__global__ void __launch_bounds__(vt::kThreads, 4) vector_epilogue_kernel(EpilogueParams p) {
  constexpr bool kLora = kR > 0;
  extern __shared__ uint32_t lora_smem[];
  const int cols = kGlu ? p.N / 2 : p.N, tile = static_cast<int>(blockIdx.y);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * vt::kRows;
  const int64_t r_end = min(static_cast<int64_t>(p.offsets[p.E]), min(p.M, r0 + vt::kRows));
  if (r0 >= r_end) return;  // the whole block: no barrier is skipped by part of it
  const int rows = static_cast<int>(r_end - r0);
  const float* delta = nullptr;
  if constexpr (kLora) {
    lora_delta_tile<kR, kGlu, kInter>(p, r0, rows, tile, cols, lora_smem);
    delta = reinterpret_cast<const float*>(lora_smem + (vt::kRows + vt::v_cols(kGlu)) * vt::words(kR));
  }
  const bool need_e = p.chan || p.bias;
  // A thread's items ascend by row: its expert is searched once, then advanced.
  int e = need_e ? expert_of(p.offsets, p.E, r0 + threadIdx.x / vt::kChunks) : 0;
#pragma unroll
  for (int s = 0; s < vt::kItemsPerThread; ++s) {
    const int i = static_cast<int>(threadIdx.x) + s * vt::kThreads, lr = i / vt::kChunks, chunk = i % vt::kChunks;
    const int c0 = tile * vt::kCols + 8 * chunk;  // the item's first output
    const bool live = lr < rows && c0 < cols;     // cols % 8 == 0: a live item is 8 outputs
    const int64_t r = r0 + lr;
    float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (live) {
      if (need_e)
        while (p.offsets[e + 1] <= r) ++e;
      const float rs = p.row_scale ? gemm::load_elem(p.row_scale, p.rs_type, p.sorted_pairs[r]) : 1.0f;
      const int ja = vt::run_a(chunk, kGlu, kInter);
      const float* drow = kLora ? delta + lr * vt::delta_ld(kGlu) : nullptr;
      if constexpr (!kGlu) {
        v_run8<kLora>(p, r, e, rs, c0, kLora ? drow + ja : nullptr, o);
      } else {
        const int jb = vt::run_b(chunk, kInter);
        const int na = vt::v_col(ja, tile, cols, true, kInter), nb = vt::v_col(jb, tile, cols, true, kInter);
        float a[8], b[8];
        v_run8<kLora>(p, r, e, rs, na, kLora ? drow + ja : nullptr, a);
        v_run8<kLora>(p, r, e, rs, nb, kLora ? drow + jb : nullptr, b);
        if (p.aux_store) {
          gemm::store_run8(p.aux, p.aux_type, r * p.N + na, a);
          gemm::store_run8(p.aux, p.aux_type, r * p.N + nb, b);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const bool kGateB = vt::glu_in_b(j, false, kInter), kUpB = vt::glu_in_b(j, true, kInter);  // j unrolled: constants
          const float gate = kGateB ? b[vt::glu_index(j, false, kInter)] : a[vt::glu_index(j, false, kInter)];
          const float up = kUpB ? b[vt::glu_index(j, true, kInter)] : a[vt::glu_index(j, true, kInter)];
          o[j] = gemm::act_forward(p.act, gate, up);
        }
      }
      gemm::store_run8(p.out, p.out_type, r * cols + c0, o);
    }
    if (!p.q_codes) continue;
    // The values as stored, then their codes (epilogue_kernel's quantization, with no padding
    // past the row: a tile is one group).
    if (p.out_type == Elem::BF16) {
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = __bfloat162float(__float2bfloat16_rn(o[j]));
    }
    const float amax = half_warp_amax(o);
    if (!live) continue;
    const float scale = group_scale(amax);
    if (chunk == 0) p.q_scales[r * ((cols + kGroup - 1) / kGroup) + tile] = scale;
    uint32_t word[2];
    encode8(o, scale, word);
    store_codes8(p.q_codes + r * cols + c0, word, 8, true);
  }
}

// One vector_epilogue_kernel launch for the problem's shape; kR: 0 (no LoRA), 16 or 32.
template <int kR>
void launch_vector_epilogue(const EpilogueParams& ep, bool glu, bool inter, dim3 grid, cudaStream_t stream) {
  const auto launch = [&](auto kernel, bool kernel_glu) {
    const int smem = kR > 0 ? vt::smem_bytes(kR, kernel_glu) : 0;
    if (smem > 48 * 1024) gemm::set_smem_limit(kernel, smem);
    kernel<<<grid, vt::kThreads, smem, stream>>>(ep);
  };
  if (!glu)
    launch(vector_epilogue_kernel<kR, false, false>, false);
  else if (inter)
    launch(vector_epilogue_kernel<kR, true, true>, true);
  else
    launch(vector_epilogue_kernel<kR, true, false>, true);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 vector_epilogue_kernel");
}

// ---- host side

Elem elem_of(DType t, const char* name) {
  switch (t) {
    case DType::BF16: return Elem::BF16;
    case DType::F32: return Elem::F32;
    default: FP8MOE_FAIL("W8A8 grouped GEMM: ", name, " has dtype ", dtype_name(t), "; supported: BF16, F32");
  }
}

void check_view(const TensorView& t, const char* name, const Shape& shape) {
  FP8MOE_CHECK(t.device == Device::CUDA, "W8A8 grouped GEMM: ", name, " must be on the GPU, found ", t.str());
  check_shape(t, name, shape);
  check_dtype(t, name, {DType::BF16, DType::F32});
  check_contiguous(t, name);
}

}  // namespace

bool available() { return unavailable_reason().empty(); }

std::string unavailable_reason() {
#if FP8MOE_HAS_W8A8
  if (!gemm::sm90_kernels_available()) return "the W8A8 kernel needs an sm_90 (Hopper) GPU; this device is not one";
  return "";
#else
  return "this fp8moe was built without the W8A8 kernel (it needs -DFP8MOE_W8A8=ON, the CUTLASS headers - pip "
         "install nvidia-cutlass, or -DFP8MOE_CUTLASS_DIR - and an sm_90a target in FP8MOE_CUDA_ARCHS)";
#endif
}

std::string fits(const GroupedGemm& g) {
  if (g.transpose_b) return "transposed W (a backward GEMM)";
  if (g.epilogue == Epilogue::GluBackward) return "GLU-backward epilogue (a backward GEMM)";
  const TensorView& bd = g.b.data;
  if (bd.dtype != DType::F8_E4M3) return "W is " + std::string(dtype_name(bd.dtype)) + ", not F8_E4M3";
  if (bd.rank() != 3) return "W is not [E, N, K]";
  const ScaleSpec& s = g.b.spec;
  const bool blocks = s.kind == ScaleKind::Block && s.block_n == 128 && s.block_k == 128 &&
                      (s.segments == 1 || s.seg_rows() % 128 == 0);
  if (!blocks && s.kind != ScaleKind::Channel)
    return "W's scales are " + s.str() + " (W8A8 takes 128x128 blocks, whole blocks per segment, or per-channel)";
  const int64_t N = bd.size(1), K = bd.size(2);
  if (K % 16 != 0) return "K = " + std::to_string(K) + " is not a multiple of 16 (TMA needs 16-byte FP8 rows)";
  if (N % 8 != 0) return "N = " + std::to_string(N) + " is not a multiple of 8 (TMA needs 16-byte BF16 rows)";
  if (!aligned16(bd.data)) return "W is not 16-byte aligned";
  if (!g.a.defined() || (g.a.src.dtype != DType::BF16 && g.a.src.dtype != DType::F32)) return "A is not BF16 or F32";
  return "";
}

std::string epilogue_vector_fits(const GroupedGemm& g) {
  const bool glu = g.epilogue == Epilogue::GluForward;
  const int64_t N = g.b.data.rank() == 3 ? g.b.data.size(1) : 0, cols = glu ? N / 2 : N;
  if (cols % 8 != 0) return std::to_string(cols) + " output columns, not a multiple of 8";
  if (!aligned16(g.out.data)) return "out is not 16-byte aligned";
  if (g.aux.defined() && !aligned16(g.aux.data)) return "aux is not 16-byte aligned";
  if (g.bias.defined() && !aligned16(g.bias.data)) return "bias is not 16-byte aligned";
  if (g.b.spec.kind == ScaleKind::Channel && !aligned16(g.b.scale.data)) return "W's channel scales are not 16-byte aligned";
  return "";
}

std::string lora_pass_fits(const GroupedGemm& g) {
  const int64_t R = g.lora_a.src.rank() == 2 ? g.lora_a.src.size(1) : 0;
  if (R < 1 || R > kMaxPassRank)
    return "the pass takes rank 1 to " + std::to_string(kMaxPassRank) + ", found r = " + std::to_string(R);
  return epilogue_vector_fits(g);
}

namespace {
// quantize_rows with optional column factors (quantize_rows_scaled): checks, then one launch.
void quantize_rows_impl(const GemmOperand& a, const RoutingPlan& plan, const TensorView* col_factors,
                        const TensorView& codes, const TensorView& scales, cudaStream_t stream) {
  const int64_t M = plan.rows(), K = a.src.rank() == 2 ? a.src.size(1) : 0, groups = (K + kGroup - 1) / kGroup;
  const int64_t src_rows = a.rows == RowSource::Tokens ? plan.tokens : M;
  check_view(a.src, "W8A8 quantize A", {src_rows, K});
  check_device_operand(codes, "W8A8 quantize codes", {DType::F8_E4M3});
  check_shape(codes, "W8A8 quantize codes", {M, K});
  check_device_operand(scales, "W8A8 quantize scales", {DType::F32});
  check_shape(scales, "W8A8 quantize scales", {M, groups});
  FP8MOE_CHECK(K <= (int64_t{1} << 30), "W8A8 quantize: K = ", K, " too large");
  if (col_factors) {
    check_device_operand(*col_factors, "W8A8 quantize column factors", {DType::F32});
    check_shape(*col_factors, "W8A8 quantize column factors [E, K]", {plan.experts, K});
  }
  if (M == 0 || K == 0) return;
  QuantizeParams q;
  q.src = a.src.data;
  q.type = elem_of(a.src.dtype, "A");
  q.tokens = a.rows == RowSource::Tokens;
  // 16-byte loads of 8 BF16 or two of 4 F32 from 8-element-aligned columns.
  q.vec = (q.type == Elem::BF16 ? K % 8 == 0 : K % 4 == 0) && aligned16(a.src.data);
  q.row_of_pair = static_cast<const int32_t*>(plan.row_of_pair.data());
  q.top_k = static_cast<int>(plan.top_k);
  q.src_rows = src_rows;
  q.K = static_cast<int>(K);
  q.groups = static_cast<int>(groups);
  q.codes = static_cast<uint8_t*>(codes.data);
  q.scales = static_cast<float*>(scales.data);
  if (col_factors) {  // a row's factors are its expert's: the kernel runs over the M rows
    q.col_factors = static_cast<const float*>(col_factors->data);
    q.offsets = static_cast<const int32_t*>(plan.offsets.data());
    q.sorted_pairs = static_cast<const int32_t*>(plan.sorted_pairs.data());
    q.E = static_cast<int>(plan.experts);
    q.src_rows = M;
    FP8MOE_CHECK(q.offsets && (!q.tokens || q.sorted_pairs), "W8A8 quantize: the plan has no offsets or sorted_pairs");
  }
  FP8MOE_CHECK(!q.tokens || q.row_of_pair, "W8A8 quantize: the plan has no row_of_pair");
  constexpr int kThreads = 256;
  FP8MOE_CHECK(q.src_rows * groups <= (int64_t{1} << 35), "W8A8 quantize: ", q.src_rows, " rows x ", groups,
               " groups too many for one grid");
  quantize_rows_kernel<<<grid_blocks(q.src_rows * groups * 16, kThreads), kThreads, 0, stream>>>(q);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 quantize_rows_kernel");
}
}  // namespace

void quantize_rows(const GemmOperand& a, const RoutingPlan& plan, const TensorView& codes, const TensorView& scales,
                   cudaStream_t stream) {
  quantize_rows_impl(a, plan, nullptr, codes, scales, stream);
}

void quantize_rows_scaled(const GemmOperand& a, const RoutingPlan& plan, const TensorView& col_factors,
                          const TensorView& codes, const TensorView& scales, cudaStream_t stream) {
  quantize_rows_impl(a, plan, &col_factors, codes, scales, stream);
}

void check_a_fp8(const GroupedGemm& g, int64_t K) {
  if (!g.a.fp8.defined()) return;
  FP8MOE_CHECK(g.plan != nullptr, "W8A8 grouped GEMM: plan is null");
  FP8MOE_CHECK(g.a.rows == RowSource::Rows, "W8A8 grouped GEMM: a.fp8 is given for an operand read by token; it "
               "holds the operand's rows in expert order");
  check_fp8_rows(g.a.fp8, "W8A8 grouped GEMM a.fp8", g.plan->rows(), K, Device::CUDA);
}

Fp8Rows quantized_a(const GroupedGemm& g, int64_t K, const TensorView* col_factors, Allocator& alloc,
                    cudaStream_t stream, OwnedFp8Rows& own) {
  const RoutingPlan& plan = *g.plan;
  const int64_t M = plan.rows();
  if (g.a.fp8.defined() && !col_factors) return g.a.fp8;  // factors change the values: quantized anew below
  own.codes = Tensor(DType::F8_E4M3, {M, K}, alloc);
  own.scales = Tensor(DType::F32, {M, (K + kGroup - 1) / kGroup}, alloc);
  if (col_factors)
    quantize_rows_scaled(g.a, plan, *col_factors, own.codes, own.scales, stream);
  else
    quantize_rows(g.a, plan, own.codes, own.scales, stream);
  return {own.codes, own.scales};
}

void lora_addend_gemm(const GroupedGemm& g, const TensorView& d, const TensorView& chan, cudaStream_t stream) {
  GroupedGemm lg = g;
  lg.a = g.lora_a;
  const TensorView& lb = g.lora_b;  // [E, N, r], or [E, r, N] read transposed: K = r either way
  lg.b = {lb, {}, ScaleSpec::none(lb.rank() == 3 ? lb.size(1) : 0, lb.rank() == 3 ? lb.size(2) : 0)};
  lg.lora_a = {};
  lg.lora_b = {};
  lg.lora_scale = 0.0;
  lg.out_fp8 = {};
  lg.role = GemmRole::Other;
  GemmAddend add;
  add.d = d;
  add.chan = chan;
  add.acc_scale = g.lora_scale;
  cuda::grouped_gemm(lg, add, stream);
}

void quantize_out(const GroupedGemm& g, cudaStream_t stream) {
  if (!g.out_fp8.defined()) return;
  FP8MOE_CHECK(g.plan != nullptr, "grouped_gemm out_fp8: the GEMM has no plan");
  quantize_rows({g.out}, *g.plan, g.out_fp8.codes, g.out_fp8.scales, stream);
}

const char* sm90_tile_name(Sm90Tile t) {
  switch (t) {
    case Sm90Tile::Auto: return "auto";
    case Sm90Tile::M128: return "m128";
    case Sm90Tile::M64: return "m64";
  }
  return "?";
}

const char* epilogue_form_name(EpilogueForm f) {
  switch (f) {
    case EpilogueForm::Auto: return "auto";
    case EpilogueForm::General: return "general";
    case EpilogueForm::Vector: return "vector";
  }
  return "?";
}

const char* lora_path_name(LoraPath p) {
  switch (p) {
    case LoraPath::Auto: return "auto";
    case LoraPath::AddendGemm: return "addend-gemm";
    case LoraPath::Pass: return "pass";
  }
  return "?";
}

void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, const Options& options) {
  LoraPath lora = options.lora;
  FP8MOE_CHECK(available(), "W8A8 grouped GEMM: ", unavailable_reason());
  const std::string why = fits(g);
  FP8MOE_CHECK(why.empty(), "W8A8 grouped GEMM cannot take this problem: ", why);
  FP8MOE_CHECK(g.plan != nullptr, "W8A8 grouped GEMM: plan is null");
  const RoutingPlan& plan = *g.plan;
  const int64_t M = plan.rows(), E = plan.experts, N = g.b.data.size(1), K = g.b.data.size(2);
  FP8MOE_CHECK(g.b.data.size(0) == E, "W8A8 grouped GEMM: W has ", g.b.data.size(0), " experts, the plan ", E);
  FP8MOE_CHECK(g.b.data.device == Device::CUDA, "W8A8 grouped GEMM: W must be on the GPU, found ", g.b.data.str());
  g.b.validate("W8A8 grouped GEMM b");
  FP8MOE_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "W8A8 grouped GEMM: M = ", M, " too large");
  const bool glu = g.epilogue == Epilogue::GluForward;
  FP8MOE_CHECK(!glu || N % 2 == 0, "W8A8 grouped GEMM GluForward: N = ", N, " must be even");
  const int64_t out_cols = glu ? N / 2 : N;
  check_view(g.out, "W8A8 grouped GEMM out", {M, out_cols});
  if (g.aux.defined()) {
    FP8MOE_CHECK(glu, "W8A8 grouped GEMM: aux is used by GluForward only");
    check_view(g.aux, "W8A8 grouped GEMM aux [M, N]", {M, N});
  }
  if (g.row_scale.defined()) check_view(g.row_scale, "W8A8 grouped GEMM row_scale", {M});
  if (g.bias.defined()) check_view(g.bias, "W8A8 grouped GEMM bias", {E, N});
  FP8MOE_CHECK(g.lora_a.defined() == g.lora_b.defined(), "W8A8 grouped GEMM: lora_a and lora_b must be given together");
  int64_t R = 0;
  if (g.lora_a.defined()) {
    if (lora == LoraPath::Auto) lora = choose_lora_path(g);
    FP8MOE_CHECK(g.lora_a.src.rank() == 2, "W8A8 grouped GEMM lora_a: expected [*, r], found ", g.lora_a.src.str());
    R = g.lora_a.src.size(1);
    check_view(g.lora_a.src, "W8A8 grouped GEMM lora_a", {g.lora_a.rows == RowSource::Tokens ? plan.tokens : M, R});
    check_view(g.lora_b, "W8A8 grouped GEMM lora_b [E, N, r]", {E, N, R});
    if (lora == LoraPath::Pass) {
      const std::string pass_why = lora_pass_fits(g);
      FP8MOE_CHECK(pass_why.empty(), "W8A8 grouped GEMM: the LoRA pass cannot take this problem: ", pass_why,
                   " (the addend GEMM takes any)");
    }
  }
  check_a_fp8(g, K);
  if (g.out_fp8.defined()) check_fp8_rows(g.out_fp8, "W8A8 grouped GEMM out_fp8", M, out_cols, Device::CUDA);
  if (M == 0 || N == 0) return;  // nothing to compute, nothing to write
  // out's Fp8Rows by a pass over out, where no pass of this file holds the values (below).
  const auto quantize_out = [&] { w8a8::quantize_out(g, stream); };

  // 1. A -> FP8 codes and 1x128 scales, gathered through the plan (or as the GEMM that wrote A
  //    quantized them).
  OwnedFp8Rows own;
  const Fp8Rows a8 = quantized_a(g, K, nullptr, alloc, stream, own);

  // 2. The FP8 grouped GEMM into D (BF16): the BF16 [M, N] output itself where there is one (aux
  //    for GluForward, out for Store; the epilogue then rewrites each element in place, read
  //    before written by the same thread), else a temporary.
  Tensor d_tmp;
  void* d = nullptr;
  if (glu && g.aux.defined() && g.aux.dtype == DType::BF16 && aligned16(g.aux.data)) {
    d = g.aux.data;
  } else if (!glu && g.out.dtype == DType::BF16 && aligned16(g.out.data)) {
    d = g.out.data;
  } else {
    d_tmp = Tensor(DType::BF16, {M, N}, alloc);
    d = d_tmp.data();
  }
  const bool channel = g.b.spec.kind == ScaleKind::Channel;
  Sm90Fp8Grouped p;
  p.E = static_cast<int>(E);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.M = M;
  p.offsets = static_cast<const int32_t*>(plan.offsets.data());
  p.a = static_cast<const uint8_t*>(a8.codes.data);
  p.sa = static_cast<const float*>(a8.scales.data);
  p.b = static_cast<const uint8_t*>(g.b.data.data);
  p.sb = channel ? nullptr : static_cast<const float*>(g.b.scale.data);
  p.d = d;
  p.tile = options.tile == Sm90Tile::Auto ? choose_sm90_tile(M, E, N, K) : options.tile;
#if FP8MOE_HAS_W8A8
  Tensor scratch(DType::U8, {static_cast<int64_t>(sm90_fp8_grouped_scratch(p))}, alloc);
  sm90_fp8_grouped(p, scratch.data(), stream);
#endif

  // 3. The epilogue policies on D. With a LoRA delta on LoraPath::AddendGemm: the W8A16 family's
  //    rank-r GEMM (K = r, the LoRA factors as its operands) with D as its addend, so that the
  //    whole epilogue (channel scales, the delta, row scale, bias, GLU) runs in that kernel's and
  //    the delta [M, N] is never stored. Otherwise one of this file's passes: vector_epilogue_kernel
  //    with the delta on tensor cores (LoraPath::Pass), or without LoRA it or epilogue_kernel
  //    (EpilogueForm).
  if (g.lora_a.defined() && lora == LoraPath::AddendGemm) {
    lora_addend_gemm(g, TensorView(d, DType::BF16, {M, N}, Device::CUDA), channel ? g.b.scale : TensorView(), stream);
    quantize_out();
    return;
  }
  EpilogueParams ep;
  ep.M = M;
  ep.N = static_cast<int>(N);
  ep.E = static_cast<int>(E);
  ep.offsets = p.offsets;
  ep.sorted_pairs = static_cast<const int32_t*>(plan.sorted_pairs.data());
  ep.d = static_cast<const __nv_bfloat16*>(d);
  ep.chan = channel ? static_cast<const float*>(g.b.scale.data) : nullptr;  // [E, N, 1]
  if (g.row_scale.defined()) ep.row_scale = g.row_scale.data, ep.rs_type = elem_of(g.row_scale.dtype, "row_scale");
  if (g.bias.defined()) ep.bias = g.bias.data, ep.bias_type = elem_of(g.bias.dtype, "bias");
  ep.epi = g.epilogue;
  ep.act = g.act;
  ep.chan_vec8 = aligned16(ep.chan);  // rows of N % 8 == 0 (fits) floats
  const bool nothing_to_apply = !ep.chan && !ep.row_scale && !ep.bias && R == 0;
  if (g.aux.defined()) {
    ep.aux = g.aux.data;
    ep.aux_type = elem_of(g.aux.dtype, "aux");
    ep.aux_vec8 = aligned16(ep.aux);  // N % 8 == 0 (fits)
    // D is aux and already holds v: rewriting it would cost a full write of [M, N] for nothing.
    ep.aux_store = !(nothing_to_apply && d == g.aux.data);
  }
  ep.out = g.out.data;
  ep.out_type = elem_of(g.out.dtype, "out");
  ep.out_vec8 = out_cols % 8 == 0 && aligned16(ep.out);
  if (R > 0) {  // LoraPath::Pass (lora_pass_fits held above)
    ep.l = g.lora_a.src.data;
    ep.l_type = elem_of(g.lora_a.src.dtype, "lora_a");
    ep.l_tokens = g.lora_a.rows == RowSource::Tokens;
    ep.top_k = static_cast<int>(plan.top_k);
    ep.lb = g.lora_b.data;
    ep.lb_type = elem_of(g.lora_b.dtype, "lora_b");
    ep.R = static_cast<int>(R);
    ep.lora_scale = static_cast<float>(g.lora_scale);
  }
  // A Store into D itself with nothing to apply (GEMM2 of a layer without LoRA or bias): done, but
  // for out's codes (a read of out, cheaper than the pass's rewrite of it).
  if (!glu && d == g.out.data && nothing_to_apply) {
    quantize_out();
    return;
  }
  if (g.out_fp8.defined()) {
    ep.q_codes = static_cast<uint8_t*>(g.out_fp8.codes.data);
    ep.q_scales = static_cast<float*>(g.out_fp8.scales.data);
  }
  // With LoRA the vector form always (lora_pass_fits held above: epilogue_kernel has no delta).
  EpilogueForm form = R > 0 ? EpilogueForm::Vector : options.form == EpilogueForm::Auto ? choose_epilogue_form(g) : options.form;
  if (R == 0 && form == EpilogueForm::Vector && !epilogue_vector_fits(g).empty()) form = EpilogueForm::General;
  if (form == EpilogueForm::Vector) {
    const int64_t row_tiles = (M + vector_tile::kRows - 1) / vector_tile::kRows;
    const int64_t col_tiles = (out_cols + vector_tile::kCols - 1) / vector_tile::kCols;
    FP8MOE_CHECK(row_tiles <= INT32_MAX && col_tiles <= 65535, "W8A8 epilogue: M = ", M, ", N = ", N, " too large");
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    const bool inter = glu && g.act.layout == GateUpLayout::Interleaved;
    if (R == 0)
      launch_vector_epilogue<0>(ep, glu, inter, grid, stream);
    else if (R <= 16)
      launch_vector_epilogue<16>(ep, glu, inter, grid, stream);
    else
      launch_vector_epilogue<32>(ep, glu, inter, grid, stream);
    return;
  }
  // Items of 8 outputs; with codes, a row's items are padded to a multiple of 16 (epilogue_kernel).
  constexpr int kThreads = 256;  // a multiple of 32: epilogue_kernel's half warps
  const int64_t chunks = (out_cols + 7) / 8, stride = ep.q_codes ? (chunks + 15) / 16 * 16 : chunks;
  ep.rows_per_block = epilogue_rows_per_block(M, stride, kThreads);
  const int64_t blocks = (M + ep.rows_per_block - 1) / ep.rows_per_block;
  FP8MOE_CHECK(blocks <= INT32_MAX, "W8A8 epilogue: M = ", M, " too large");
  epilogue_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ep);
  FP8MOE_CUDA_LAUNCH_CHECK("w8a8 epilogue_kernel");
}

}  // namespace fp8moe::cuda::w8a8

// The W8A8 forward path's epilogue passes (w8a8.cuh: epilogue_pass, EpilogueForm, LoraPath::Pass):
// GroupedGemm's policies applied to D, the CUTLASS GEMM's BF16 product, and out's FP8 rows for the
// next GEMM written from the values as stored. Two forms: epilogue_kernel (any shape, index arrays)
// and vector_epilogue_kernel (32 x 128 tiles of 16-byte runs, with the LoRA delta on mma.sync).
#include <cuda_fp8.h>

#include <string>

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/gemm_parts.cuh"
#include "backends/cuda/w8a8.cuh"
#include "backends/cuda/w8a8_rows.cuh"

namespace fp8moe::cuda::w8a8 {
namespace {

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
  bool l_pairs = false, lb_pairs = false;  // R even and the array aligned to two elements (load_pair)
  float lora_scale = 0.0f;
};

// GroupedGemm's v from D = the FP8 product without LoRA: ch, the channel scale (1 without); rs, the
// row scale; bias (0 without). v_run8 applies the same terms with the LoRA delta before rs.
__device__ __forceinline__ float epilogue_value(float d, float ch, float rs, float bias) { return d * ch * rs + bias; }

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
    v[j] = epilogue_value(v[j], p.chan ? ch[j] : 1.0f, rs, bias);
  }
}

// out's FP8 codes for an item's 8 values o (row r, columns c0 ..), quantized from the values as
// stored (what the next GEMM's quantize pass would read): both passes lay their items out so that
// a half warp holds one row's 128-wide group, whose amax it takes with shuffles. Every lane of the
// warp calls it; a lane with `live` false (o zero) only takes part in the shuffles.
__device__ __forceinline__ void store_item_codes(const EpilogueParams& p, float (&o)[8], bool live, int64_t r, int c0,
                                                 int cols) {
  if (p.out_type == Elem::BF16) {
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = __bfloat162float(__float2bfloat16_rn(o[j]));
  }
  const float amax = half_warp_amax(o);
  if (!live) return;
  const float scale = group_scale(amax);
  if (c0 % kGroup == 0) p.q_scales[r * ((cols + kGroup - 1) / kGroup) + c0 / kGroup] = scale;
  uint32_t word[2];
  encode8(o, scale, word);
  store_codes8(p.q_codes + r * cols + c0, word, cols - c0, cols % 8 == 0);
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
    // n[0] < 0: padding past the row's end, or past the items.
    if (p.q_codes) store_item_codes(p, o, n[0] >= 0, r, c0, cols);
  }
}

// ---- the vector pass (EpilogueForm::Vector; w8a8.cuh: vector_tile)

namespace vt = vector_tile;

// The 8 v values of row r at v columns col .. col + 7 (col a multiple of 8): GroupedGemm's
// (d * ch + lora_scale * delta) * rs + bias, each term a 16-byte run. `delta`: the run in the
// block's F32 delta tile (kLora only). Terms are applied one by one rather than through a per-element
// helper: one with arrays of neutral defaults doubled the kernel's registers.
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

// Elements q and q + 1 (q even) of the row of R starting at `base` of a BF16 or F32 array, as a
// BF16 pair (q low), zero past R: one 4- or 8-byte load where `pairs` (R even, the array aligned to
// two elements), else two.
__device__ __forceinline__ uint32_t load_pair(const void* p, Elem t, int64_t base, int q, int R, bool pairs) {
  if (pairs && q < R) {
    if (t == Elem::BF16) return __ldg(reinterpret_cast<const uint32_t*>(static_cast<const __nv_bfloat16*>(p) + base + q));
    const float2 f = __ldg(reinterpret_cast<const float2*>(static_cast<const float*>(p) + base + q));
    return gemm::pack_bf16x2(f.x, f.y);
  }
  return gemm::pack_bf16x2(q < R ? gemm::load_elem(p, t, base + q) : 0.0f, q + 1 < R ? gemm::load_elem(p, t, base + q + 1) : 0.0f);
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
    const int lr = i / kPairs, w = i % kPairs;
    uint32_t x = 0;
    if (lr < rows) {
      const int64_t r = r0 + lr, src = p.l_tokens ? p.sorted_pairs[r] / p.top_k : r;
      x = load_pair(p.l, p.l_type, src * p.R, 2 * w, p.R, p.l_pairs);
    }
    ls[lr * kW + w] = x;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int e_first = expert_of(p.offsets, p.E, r0), e_last = expert_of(p.offsets, p.E, r0 + rows - 1);
  for (int e = e_first; e <= e_last; ++e) {
    const int64_t lo = p.offsets[e], hi = p.offsets[e + 1];
    if (lo == hi) continue;  // the same for the whole block: no barrier is skipped by part of it
    __syncthreads();         // L staged; the last expert's reads of lbs done
    for (int i = threadIdx.x; i < kVc * kPairs; i += vt::kThreads) {
      const int j = i / kPairs, w = i % kPairs;
      const int n = vt::v_col(j, tile, cols, kGlu, kInter);
      lbs[j * kW + w] = n >= 0 ? load_pair(p.lb, p.lb_type, (static_cast<int64_t>(e) * p.N + n) * p.R, 2 * w, p.R, p.lb_pairs) : 0u;
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
// item reads and writes 16-byte runs, with no index arrays: 40 to 64 registers (sm_90a, CUDA 13.0)
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
    if (p.q_codes) store_item_codes(p, o, live, r, c0, cols);  // a tile is one group: a half warp, one row's
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

}  // namespace

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

const char* epilogue_form_name(EpilogueForm f) {
  switch (f) {
    case EpilogueForm::Auto: return "auto";
    case EpilogueForm::General: return "general";
    case EpilogueForm::Vector: return "vector";
  }
  return "?";
}

void epilogue_pass(const GroupedGemm& g, const void* d, EpilogueForm asked, cudaStream_t stream) {
  FP8MOE_CHECK(g.plan != nullptr, "W8A8 epilogue pass: plan is null");
  const RoutingPlan& plan = *g.plan;
  const int64_t M = plan.rows(), E = plan.experts, N = g.b.data.size(1);
  const bool glu = g.epilogue == Epilogue::GluForward, channel = g.b.spec.kind == ScaleKind::Channel;
  const int64_t out_cols = glu ? N / 2 : N, R = g.lora_a.defined() ? g.lora_a.src.size(1) : 0;
  if (R > 0) {
    const std::string why = lora_pass_fits(g);
    FP8MOE_CHECK(why.empty(), "W8A8 epilogue pass: the LoRA pass cannot take this problem: ", why);
  }
  if (M == 0 || N == 0) return;
  EpilogueParams ep;
  ep.M = M;
  ep.N = static_cast<int>(N);
  ep.E = static_cast<int>(E);
  ep.offsets = static_cast<const int32_t*>(plan.offsets.data());
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
  if (R > 0) {  // LoraPath::Pass
    ep.l = g.lora_a.src.data;
    ep.l_type = elem_of(g.lora_a.src.dtype, "lora_a");
    ep.l_tokens = g.lora_a.rows == RowSource::Tokens;
    ep.top_k = static_cast<int>(plan.top_k);
    ep.lb = g.lora_b.data;
    ep.lb_type = elem_of(g.lora_b.dtype, "lora_b");
    ep.R = static_cast<int>(R);
    ep.lora_scale = static_cast<float>(g.lora_scale);
    const auto pairs = [&](const void* ptr, Elem t) {
      return R % 2 == 0 && reinterpret_cast<uintptr_t>(ptr) % (t == Elem::BF16 ? 4 : 8) == 0;
    };
    ep.l_pairs = pairs(ep.l, ep.l_type);
    ep.lb_pairs = pairs(ep.lb, ep.lb_type);
  }
  // A Store into D itself with nothing to apply (GEMM2 of a layer without LoRA or bias): done, but
  // for out's codes, by a pass over out (a read of it, cheaper than this pass's rewrite).
  if (!glu && d == g.out.data && nothing_to_apply) {
    quantize_out(g, stream);
    return;
  }
  if (g.out_fp8.defined()) {
    ep.q_codes = static_cast<uint8_t*>(g.out_fp8.codes.data);
    ep.q_scales = static_cast<float*>(g.out_fp8.scales.data);
  }
  // With LoRA the vector form always (epilogue_kernel has no delta).
  EpilogueForm form = R > 0 ? EpilogueForm::Vector : asked == EpilogueForm::Auto ? choose_epilogue_form(g) : asked;
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

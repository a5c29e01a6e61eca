// The W8A8 forward path (w8a8.cuh describes it): host side (conditions, checks, the three
// phases) and the quantize kernel; the epilogue passes are in w8a8_epilogue.cu. The CUTLASS GEMM is in
// cutlass/fp8_grouped_sm90.cu, built only when CUTLASS headers and an sm_90a target are there
// (FP8MOE_HAS_W8A8); without it, available() says why and grouped_gemm() refuses.
#include "backends/cuda/w8a8.cuh"

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/gemm_parts.cuh"
#include "backends/cuda/grouped_gemm.cuh"
#include "backends/cuda/w8a8_rows.cuh"

namespace fp8moe::cuda::w8a8 {
namespace {

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

// ---- host side

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
  //    the delta [M, N] is never stored (out's FP8 rows then by a pass over out). Otherwise one of
  //    w8a8_epilogue.cu's passes: the vector form with the delta on tensor cores (LoraPath::Pass),
  //    or without LoRA the form EpilogueForm picks.
  if (g.lora_a.defined() && lora == LoraPath::AddendGemm) {
    lora_addend_gemm(g, TensorView(d, DType::BF16, {M, N}, Device::CUDA), channel ? g.b.scale : TensorView(), stream);
    quantize_out(g, stream);
    return;
  }
  epilogue_pass(g, d, options.form, stream);
}

}  // namespace fp8moe::cuda::w8a8

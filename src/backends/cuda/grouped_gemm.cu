// Grouped GEMM over experts (backend.hpp: GroupedGemm), one kernel family for every variant.
//
// Canonical problem: v[r, n] = rs(r) * (A[r, :] . W_e[n, :] + lora_scale * L[r, :] . LB_e[n, :]) + bias_e[n]
// for the rows r of expert e, then an epilogue policy (store / GLU forward / GLU backward).
//
// Structure (sm_80+, BF16 mma.sync m16n8k16, fp32 accumulators):
//   schedule  each CTA takes one row tile of one expert (found from the device offsets) and one
//             N tile; CTAs past the last tile exit at once.
//   fetch     cp.async, kStages deep: A rows (gathered through the plan, zero-filled past the
//             expert's rows) straight into the BF16 tile that ldmatrix reads; W as raw bytes
//             (FP8 codes or BF16) into a per-thread staging area.
//   convert   each thread dequantizes its own W chunks (code * scale -> BF16) into a
//             double-buffered tile one K step ahead of the math: one barrier per K tile.
//             F32 A is loaded and converted synchronously (no cp.async); odd shapes (K % 8,
//             split scale blocks) and the LoRA tiles take a per-element path.
//   matmul    ldmatrix (.trans when W is stored [K, N]) + mma.sync over the tile.
//   lora      the LoRA delta is r/BK extra K tiles of the same accumulation (L and LB with
//             lora_scale folded into LB's conversion).
//   epilogue  row scale, bias, then the policy; stores straight from the accumulators.
// On sm_90a two more engines run the same problem with asynchronous wgmma: gemm_kernel_sm90.cuh
// (128 x 128 tiles, W converted into shared memory; any shape) and gemm_kernel_sm90_rega.cuh
// (W dequantized into the MMA's A registers, warp-specialized; FP8 W with BF16 A, the fast
// path wherever it fits: GemmProblem::rega_fits).
// Template parameters: tile shape, A element bytes, W element bytes, W orientation. Everything
// else (FP8 format, scale scheme, epilogue, activation, output dtypes) is a launch-uniform
// runtime value, so the variants share one compiled loop per storage type.
// This file: the host side (checks, descriptor -> Params, fast-path conditions, shape choice).
// The kernels are in gemm_kernel.cuh / gemm_kernel_sm90.cuh, their shared parts in gemm_parts.cuh
// and gemm_tile.cuh.
#include "backends/cuda/grouped_gemm.cuh"

#include <algorithm>
#include <string>

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/gemm_parts.cuh"

namespace fp8moe::cuda {
namespace gemm {
namespace {

// ---- host side

Elem elem_of(DType t, const char* name) {
  switch (t) {
    case DType::BF16: return Elem::BF16;
    case DType::F32: return Elem::F32;
    case DType::F8_E4M3: return Elem::E4M3;
    case DType::F8_E5M2: return Elem::E5M2;
    default: FP8MOE_FAIL("grouped_gemm: ", name, " has dtype ", dtype_name(t), "; supported: BF16, F32 (FP8 E4M3/E5M2 for b)");
  }
}

void check_view(const TensorView& t, const char* name, const Shape& shape, std::initializer_list<DType> dtypes) {
  FP8MOE_CHECK(t.device == Device::CUDA, "grouped_gemm: ", name, " must be on the GPU, found ", t.str());
  check_shape(t, name, shape);
  check_dtype(t, name, dtypes);
  check_contiguous(t, name);
}

// Whether W's scale k-part is constant over each K tile of bk and the per-CTA table of it
// (TileMaps::ktab) covers K. Read transposed, K runs along the stored rows, segment by segment:
// segment and block boundaries must fall on tile edges.
bool k_tile_uniform(const ScaleSpec& s, bool trans, int64_t K, int64_t bk) {
  if ((K + bk - 1) / bk > kMaxKTiles) return false;
  return trans ? s.seg_rows() % bk == 0 && (s.block_n % bk == 0 || s.block_n >= s.seg_rows())
               : s.block_k % bk == 0 || s.block_k >= s.cols;
}

// Read transposed, whether W's scale depends on the stored row alone (one scale column) and its
// k-part steps linearly inside a 64-row K tile: Sm90RegA's per-K-row scales.
bool k_row_scale(const ScaleSpec& s) {
  return s.grid_k() == 1 && 64 % s.block_n == 0 && s.seg_rows() % s.block_n == 0;
}

// The sizes of a checked descriptor.
struct GemmDims {
  int64_t M = 0, E = 0;  // rows (T * top_k) and experts of the plan
  int64_t N = 0, K = 0;  // columns of v and the reduction length
  int64_t R = 0;         // LoRA rank (0: no LoRA)
  int64_t out_cols = 0;  // N, N / 2 (GLU forward) or 2N (GLU backward)
};

// Rows of an A-side operand: the plan's tokens (gathered) or its rows.
int64_t operand_rows(const GemmOperand& op, const RoutingPlan& plan) {
  return op.rows == RowSource::Tokens ? plan.tokens : plan.rows();
}

// Throws an fp8moe::Error naming the first operand of `g` that the kernels cannot take.
GemmDims check_gemm(const GroupedGemm& g) {
  FP8MOE_CHECK(g.plan != nullptr, "grouped_gemm: plan is null");
  const RoutingPlan& plan = *g.plan;
  GemmDims d;
  const int64_t M = d.M = plan.rows(), E = d.E = plan.experts;
  FP8MOE_CHECK(E >= 1 && E <= kMaxExperts, "grouped_gemm: experts = ", E, " outside [1, ", kMaxExperts, "]");
  FP8MOE_CHECK(M < (int64_t{1} << 31), "grouped_gemm: M = ", M, " rows exceed int32 row indices");

  // W: [E, N, K] or [E, K, N]
  const TensorView& bd = g.b.data;
  FP8MOE_CHECK(bd.rank() == 3 && bd.size(0) == E, "grouped_gemm b: expected [E=", E, ", *, *], found ", bd.str());
  check_view(bd, "grouped_gemm b", bd.shape, {DType::F8_E4M3, DType::F8_E5M2, DType::BF16, DType::F32});
  const int64_t N = d.N = g.transpose_b ? bd.size(2) : bd.size(1);
  const int64_t K = d.K = g.transpose_b ? bd.size(1) : bd.size(2);
  FP8MOE_CHECK(N < (int64_t{1} << 30) && K < (int64_t{1} << 30), "grouped_gemm: N = ", N, ", K = ", K, " too large");
  const bool quant = g.b.quantized();
  FP8MOE_CHECK(quant == is_fp8(bd.dtype), "grouped_gemm b: FP8 data needs a scale scheme and plain data none; found ",
               dtype_name(bd.dtype), " with scales '", scale_kind_name(g.b.spec.kind), "'");
  if (quant) {
    const ScaleSpec& s = g.b.spec;
    s.validate("grouped_gemm b");
    FP8MOE_CHECK(s.rows == bd.size(1) && s.cols == bd.size(2), "grouped_gemm b: scale spec covers [", s.rows, ", ",
                 s.cols, "] but the stored matrices are ", bd.str());
    check_view(g.b.scale, "grouped_gemm b.scale", {E, s.scale_rows(), s.grid_k()}, {DType::F32});
  }
  check_view(g.a.src, "grouped_gemm a", {operand_rows(g.a, plan), K}, {DType::BF16, DType::F32});

  FP8MOE_CHECK(g.lora_a.defined() == g.lora_b.defined(), "grouped_gemm: lora_a and lora_b must be given together");
  if (g.lora_a.defined()) {
    FP8MOE_CHECK(g.lora_a.src.rank() == 2, "grouped_gemm lora_a: expected [*, r], found ", g.lora_a.src.str());
    const int64_t R = d.R = g.lora_a.src.size(1);
    FP8MOE_CHECK(R >= 1 && R <= 4096, "grouped_gemm lora_a: rank r = ", R, " outside [1, 4096]");
    check_view(g.lora_a.src, "grouped_gemm lora_a", {operand_rows(g.lora_a, plan), R}, {DType::BF16, DType::F32});
    check_view(g.lora_b, g.transpose_b ? "grouped_gemm lora_b [E, r, N]" : "grouped_gemm lora_b [E, N, r]",
               g.transpose_b ? Shape{E, R, N} : Shape{E, N, R}, {DType::BF16, DType::F32});
  }
  if (g.row_scale.defined()) check_view(g.row_scale, "grouped_gemm row_scale", {M}, {DType::BF16, DType::F32});
  if (g.bias.defined()) check_view(g.bias, "grouped_gemm bias", {E, N}, {DType::BF16, DType::F32});

  d.out_cols = N;
  switch (g.epilogue) {
    case Epilogue::Store: break;
    case Epilogue::GluForward:
      FP8MOE_CHECK(N % 2 == 0, "grouped_gemm GluForward: N = ", N, " must be even (gate and up rows)");
      d.out_cols = N / 2;
      if (g.aux.defined()) check_view(g.aux, "grouped_gemm aux (GluForward) [M, N]", {M, N}, {DType::BF16, DType::F32});
      break;
    case Epilogue::GluBackward:
      d.out_cols = 2 * N;
      check_view(g.aux, "grouped_gemm aux (GluBackward) [M, 2N]", {M, 2 * N}, {DType::BF16, DType::F32});
      break;
  }
  check_view(g.out, "grouped_gemm out", {M, d.out_cols}, {DType::BF16, DType::F32});
  return d;
}

// The kernels' view of a checked descriptor: pointers, element kinds and the fast-path
// conditions for a kernel of K step `kBK` (`rega`: an Sm90RegA kernel) (where one fails, the
// per-element path: same results, slower).
Params gemm_params(const GroupedGemm& g, const GemmDims& d, int64_t kBK, bool rega) {
  const RoutingPlan& plan = *g.plan;
  const TensorView& bd = g.b.data;
  const int64_t N = d.N, K = d.K;
  const bool quant = g.b.quantized();
  Params p;
  p.M = d.M;
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.E = static_cast<int>(d.E);
  p.top_k = static_cast<int>(plan.top_k);
  p.offsets = plan.offsets.ptr<const int32_t>();
  p.sorted_pairs = plan.sorted_pairs.ptr<const int32_t>();
  p.a = {g.a.src.data, elem_of(g.a.src.dtype, "grouped_gemm a"), K, g.a.rows == RowSource::Tokens};
  p.b = {bd.data, elem_of(bd.dtype, "grouped_gemm b"), N * K, g.transpose_b ? N : K,
         quant ? g.b.scale.ptr<const float>() : nullptr, quant ? g.b.spec.numel() : 0, g.b.spec, 1.0f};
  if (d.R > 0) {
    const int64_t R = d.R;
    p.R = static_cast<int>(R);
    p.la = {g.lora_a.src.data, elem_of(g.lora_a.src.dtype, "grouped_gemm lora_a"), R,
            g.lora_a.rows == RowSource::Tokens};
    p.lb = {g.lora_b.data, elem_of(g.lora_b.dtype, "grouped_gemm lora_b"), N * R, g.transpose_b ? N : R, nullptr, 0,
            ScaleSpec::none(g.transpose_b ? R : N, g.transpose_b ? N : R), static_cast<float>(g.lora_scale)};
  }
  if (g.row_scale.defined()) {
    p.row_scale = g.row_scale.data;
    p.rs_type = elem_of(g.row_scale.dtype, "grouped_gemm row_scale");
  }
  if (g.bias.defined()) {
    p.bias = g.bias.data;
    p.bias_type = elem_of(g.bias.dtype, "grouped_gemm bias");
  }
  p.epi = g.epilogue;
  p.act = g.act;
  p.out = g.out.data;
  p.out_type = elem_of(g.out.dtype, "grouped_gemm out");
  p.out_vec8 = d.out_cols % 8 == 0 && aligned16(p.out);
  if (g.aux.defined()) {
    p.aux = g.aux.data;
    p.aux_type = elem_of(g.aux.dtype, "grouped_gemm aux");
    p.aux_vec8 = g.aux.size(1) % 8 == 0 && aligned16(p.aux);
  }

  p.vec_a = K % 8 == 0 && aligned16(p.a.ptr);
  // Whole 16-byte chunks of the LoRA factors and of plain F32 weights (wide_chunk): rows of a
  // multiple of 8 elements, 16-byte aligned bases.
  p.vec_lora = p.R > 0 && p.R % 8 == 0 && p.la.type == Elem::BF16 && p.lb.type != Elem::E4M3 &&
               p.lb.type != Elem::E5M2 && aligned16(p.la.ptr) && aligned16(p.lb.ptr) && p.lb.ld % 8 == 0;
  p.wide_b = !quant && bd.dtype == DType::F32 && p.b.ld % 8 == 0 && aligned16(bd.data);
  const ScaleSpec& s = g.b.spec;
  // One scale per 8-element chunk along the stored rows: blocks along the stored columns are
  // multiples of 8 or span them all.
  const bool chunk_uniform = !quant || s.block_k % 8 == 0 || s.block_k >= s.cols;
  // F32 weights never take the fast loop (dispatch_storage gives them the 2-byte kernel); their
  // whole chunks load through wide_chunk.
  p.vec_b = chunk_uniform && bd.dtype != DType::F32 && (g.transpose_b ? N : K) % 8 == 0 && aligned16(bd.data);
  // The scale's k-part is constant over each K tile of kBK: tabulate it per CTA.
  if (quant) {
    p.b_tile_uniform = k_tile_uniform(s, g.transpose_b, K, kBK);
    // Linear k-part per chunk: k0 + r lies in scale block (k0 + r) / block, block | kBK, and no
    // segment boundary moves it (stored rows, read as k with transpose_b, restart at segments).
    if (!p.b_tile_uniform) {
      if (g.transpose_b && kBK % s.block_n == 0 && s.seg_rows() % s.block_n == 0)
        p.b_kpart_step = kBK / s.block_n * s.grid_k();
      else if (!g.transpose_b && kBK % s.block_k == 0 && s.block_k % 8 == 0)
        p.b_kpart_step = kBK / s.block_k;
    }
  }
  p.k_row_scale = rega && g.transpose_b && !p.b_tile_uniform;
  return p;
}
Params gemm_params(const GroupedGemm& g, const GemmDims& d, TileShape shape) {
  return gemm_params(g, d, tile_bk(shape), is_rega(shape));
}

// Checks that `shape` can run `g` on this device, then queues its kernel on `stream`.
void launch_gemm(const GroupedGemm& g, Params& p, TileShape shape, cudaStream_t stream) {
  const TensorView& bd = g.b.data;
  if (p.k_row_scale)  // describe() admitted it: k_row_scale(spec), so gemm_params set the step
    FP8MOE_CHECK(p.b_kpart_step > 0 && k_row_scale(g.b.spec), "grouped_gemm: internal: per-K-row scales without a linear step");
  if (is_sm90(shape))
    FP8MOE_CHECK(sm90_kernels_available(), "grouped_gemm: tile shape ", tile_shape_name(shape),
                 " needs an sm_90 GPU and a library built for sm_90a");
  if (is_rega(shape))
    FP8MOE_CHECK(describe(g).rega_fits, "grouped_gemm: tile shape ", tile_shape_name(shape),
                 " takes only FP8 W, BF16 A, K % 64 == 0, one scale per 64-wide K tile, LoRA with BF16 L and r % 8 == 0 "
                 "(transposed: N % 16 == 0, no GLU forward); found ",
                 dtype_name(bd.dtype), " W", g.transpose_b ? " (transposed)" : "", ", ", dtype_name(g.a.src.dtype),
                 " A, N = ", p.N, ", K = ", p.K, g.lora_a.defined() ? ", LoRA r = " + std::to_string(g.lora_a.src.size(1)) : "");
  if (is_plain(shape))  // its kernel has no code for the rest
    FP8MOE_CHECK(p.epi == Epilogue::Store && !p.b.scale && !p.row_scale && !p.bias && p.R == 0 && !p.addend,
                 "grouped_gemm: tile shape ", tile_shape_name(shape), " takes plain sums only (unscaled W, a stored "
                 "result, no row scale, bias, LoRA or addend); found ", p.b.scale ? "scaled W" : "unscaled W",
                 p.epi != Epilogue::Store ? ", an activation epilogue" : "", p.row_scale ? ", a row scale" : "",
                 p.bias ? ", a bias" : "", p.R > 0 ? ", LoRA" : "", p.addend ? ", an addend" : "");
  const int a_bytes = static_cast<int>(dtype_size(g.a.src.dtype));
  const int b_bytes = is_fp8(bd.dtype) ? 1 : 2;
  const int64_t N = p.N, bn = tile_bn(shape);  // GLU forward: bn / 2 gate + bn / 2 up columns
  const int64_t n_tiles = g.epilogue == Epilogue::GluForward ? (N / 2 + bn / 2 - 1) / (bn / 2) : (N + bn - 1) / bn;
  dim3 grid = grouped_grid(p, tile_bm(shape), n_tiles);
  grid.z = static_cast<unsigned>(p.k_splits);
  dispatch_storage(a_bytes, b_bytes, g.transpose_b, [&](auto a, auto b, auto tr) {
    constexpr int AB = decltype(a)::value, BB = decltype(b)::value;
    constexpr bool TR = decltype(tr)::value;
    // One case per row of tile_shapes.def. The Sm90RegA shapes are built for BF16 A and FP8 W
    // alone, and the rega_fits check above lets nothing else reach them.
    switch (shape) {
#define FP8MOE_TILE_SHAPE(id, ...)                                                  \
  case TileShape::id:                                                               \
    if constexpr (tile_takes_storage(TileShape::id, AB, BB))                        \
      launch_instance<TileShape::id, AB, BB, TR>(p, grid, stream);                  \
    break;
#include "backends/cuda/tile_shapes.def"
#undef FP8MOE_TILE_SHAPE
    }
  });
}

// out[r, n] = the sum of the split-K partials [splits, M, N] in split order, for the rows the
// GEMM writes (those of the experts: below offsets[E]; rows past it are left alone, as there).
__global__ void __launch_bounds__(256) split_k_sum_kernel(const float* partial, int splits, int64_t M, int N,
                                                          const int32_t* rows_end, void* out, Elem out_type) {
  const int64_t n = int64_t{*rows_end} * N, slice = M * N;
  for (int64_t i = blockIdx.x * int64_t{256} + threadIdx.x; i < n; i += int64_t{gridDim.x} * 256) {
    float acc = 0.0f;
    for (int z = 0; z < splits; ++z) acc += partial[z * slice + i];
    store_elem(out, out_type, i, acc);
  }
}

}  // namespace

Params checked_params(const GroupedGemm& g, int64_t bk) { return gemm_params(g, check_gemm(g), bk, false); }

}  // namespace gemm

void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream) {
  using namespace gemm;
  const GemmProblem gp = describe(g);  // describe checks plan and b
  const TileShape shape = choose_tile_shape(gp);
  grouped_gemm(g, alloc, stream, shape, choose_k_splits(gp, shape));
}

void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, gemm::TileShape shape, int splits) {
  using namespace gemm;
  if (splits == 1) return grouped_gemm(g, stream, shape);
  const bool plain = describe(g).plain_sum;
  FP8MOE_CHECK(splits > 1 && splits <= kMaxKSplits && is_narrow(shape) && plain,
               "grouped_gemm: a K split needs 2..", kMaxKSplits, " splits of a plain sum (no scales, epilogue, row "
               "scale, bias or LoRA) on a narrow shape (", tile_shape_name(TileShape::M128N32), ", ",
               tile_shape_name(TileShape::M128N32Plain), "); found ", splits,
               " splits, shape ", tile_shape_name(shape), ", ", plain ? "a plain sum" : "not a plain sum");
  const GemmDims d = check_gemm(g);
  Params p = gemm_params(g, d, shape);
  if (d.M == 0 || d.N == 0) return;
  // The partials live until the sum pass is queued; the allocator's frees are stream-ordered.
  Tensor partial(DType::F32, {splits, d.M, d.N}, alloc);
  p.k_splits = splits;
  p.out = partial.data();
  p.out_type = Elem::F32;
  p.out_vec8 = d.N % 8 == 0;
  launch_gemm(g, p, shape, stream);
  const int64_t blocks = std::min<int64_t>((d.M * d.N + 255) / 256, 4096);
  split_k_sum_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      partial.ptr<const float>(), splits, d.M, static_cast<int>(d.N), p.offsets + d.E, g.out.data,
      elem_of(g.out.dtype, "grouped_gemm out"));
  FP8MOE_CUDA_LAUNCH_CHECK("split_k_sum_kernel");
}

gemm::GemmProblem gemm::describe(const GroupedGemm& g) {
  FP8MOE_CHECK(g.plan != nullptr, "grouped_gemm: plan is null");
  const TensorView& bd = g.b.data;
  FP8MOE_CHECK(bd.rank() == 3, "grouped_gemm b: expected [E, *, *], found ", bd.str());
  GemmProblem p;
  p.rows = g.plan->rows();
  p.experts = g.plan->experts;
  p.n = g.transpose_b ? bd.size(2) : bd.size(1);
  p.k = g.transpose_b ? bd.size(1) : bd.size(2);
  p.plain_sum = !g.b.quantized() && g.epilogue == Epilogue::Store && !g.row_scale.defined() && !g.bias.defined() &&
                !g.lora_a.defined();
  const ScaleSpec& s = g.b.spec;
  if (g.b.quantized()) {
    // Read transposed, K runs along the stored rows (blocks of block_n within a segment).
    p.fine_k_scale = g.transpose_b ? s.block_n < 64 && s.block_n < s.seg_rows() : s.block_k < 64 && s.block_k < s.cols;
    const int64_t K = p.k, N = p.n;  // transposed, K runs along the stored rows, segment by segment
    const bool uniform = k_tile_uniform(s, g.transpose_b, K, 64);
    const bool row_scales = g.transpose_b && !uniform && k_row_scale(s);
    const TensorView& la = g.lora_a.src;
    const bool lora_ok = !g.lora_a.defined() ||
                         (la.dtype == DType::BF16 && la.rank() == 2 && la.size(1) % 8 == 0 && aligned16(la.data));
    p.rega_fits = is_fp8(bd.dtype) && g.a.src.dtype == DType::BF16 && lora_ok && K >= 64 &&
                  K % 64 == 0 && K <= 64 * kMaxKTiles && (uniform || row_scales) && aligned16(bd.data) &&
                  aligned16(g.a.src.data) && (!g.transpose_b || (N % 16 == 0 && g.epilogue != Epilogue::GluForward));
  }
  return p;
}

void grouped_gemm(const GroupedGemm& g, const GemmAddend& addend, cudaStream_t stream) {
  gemm::GemmProblem gp = gemm::describe(g);
  gp.plain_sum = false;  // the sum is not the whole result: no split K
  grouped_gemm(g, addend, stream, gemm::choose_tile_shape(gp));
}

void grouped_gemm(const GroupedGemm& g, const GemmAddend& addend, cudaStream_t stream, gemm::TileShape shape) {
  using namespace gemm;
  const GemmDims d = check_gemm(g);
  check_view(addend.d, "grouped_gemm addend", {d.M, d.N}, {DType::BF16});
  Params p = gemm_params(g, d, shape);
  p.addend = addend.d.data;
  p.addend_vec8 = d.N % 8 == 0 && aligned16(p.addend);
  if (addend.chan.defined()) {
    check_view(addend.chan, "grouped_gemm addend channel factors", {d.E, d.N, 1}, {DType::F32});
    p.addend_chan = addend.chan.ptr<const float>();
    p.addend_chan_vec8 = d.N % 8 == 0 && aligned16(p.addend_chan);
  }
  p.acc_scale = static_cast<float>(addend.acc_scale);
  if (d.M == 0 || d.N == 0) return;
  launch_gemm(g, p, shape, stream);
}

void grouped_gemm(const GroupedGemm& g, cudaStream_t stream, gemm::TileShape shape) {
  using namespace gemm;
  const GemmDims d = check_gemm(g);
  Params p = gemm_params(g, d, shape);
  if (d.M == 0 || d.N == 0) return;  // nothing to compute, nothing to write
  launch_gemm(g, p, shape, stream);
}

}  // namespace fp8moe::cuda

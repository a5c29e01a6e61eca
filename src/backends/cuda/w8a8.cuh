// The W8A8 forward path of the grouped GEMM on Hopper (issue #13): FP8 activations x FP8 weights
// on FP8 tensor cores, for the forward GEMMs of backend.hpp's GroupedGemm
// (transpose_b = false, Epilogue Store / GluForward). The backward GEMMs stay on the W8A16 kernels
// (grouped_gemm.cuh: FP8 W dequantized to BF16 in the kernel), the precise option, unless the FP8
// dgrad is asked for (Dgrad, below).
//
// One call runs three phases, all queued on the stream, nothing read back by the host:
//   quantize  A rows (expert order, or each token once, stored into the k rows the plan gives it) ->
//             e4m3 codes [M, K] and one F32 scale per row and 128-wide K group, sa [M, ceil(K/128)]
//             (scale = max(amax / 448, FLT_MIN), as quantize_activations on the host: an all-zero
//             group gives zero codes, never NaN); skipped when A comes quantized (GemmOperand::fp8:
//             the layer's GEMM2 gets its input from GEMM1's epilogue)
//   gemm      CUTLASS 4.2's Hopper grouped GEMM with blockwise scales (w8a8_sm90.cu):
//             D[r, n] = sum_kb sa[r, kb] * sb_e[n/128, kb] * sum_{k in kb} qa[r, k] qb_e[n, k]
//             in FP32 per 128-wide K block, stored as BF16 [M, N]. Per-channel weight scales run
//             the mainloop with unit block scales and are applied in the epilogue phase (free
//             there; bench/fp8_lab measured a 15-20% loss when they sit in the mainloop).
//   epilogue  exactly GroupedGemm's semantics on D: (channel scale), + lora_scale * L LB^T, row
//             scale, bias, then Store or GluForward (aux = pre-activation, out = act(gate, up)).
//             D is the BF16 output itself where there is one (out of a Store, aux of a GLU), the
//             epilogue rewriting it in place. Without LoRA, a pass of this path's
//             (w8a8_epilogue.cu, EpilogueForm), which a Store with nothing to apply skips and a GLU
//             whose D is aux does not rewrite. With LoRA (LoraPath), either the W8A16 family's
//             rank-r GEMM (K = r) on the LoRA factors with D as an addend (grouped_gemm.cuh:
//             GemmAddend), or this path's pass with the rank-r product computed in it on tensor
//             cores (r <= kMaxPassRank). Neither stores the delta.
//             GroupedGemm::out_fp8 (out's E4M3 rows for the next GEMM): written by the pass from the
//             values it stores; after the addend GEMM, and where no pass runs, by quantize_rows
//             over out.
//
// What it takes (w8a8_fits says which condition failed): b F8_E4M3 with 128x128 block scales
// (one grid, or two segments each a multiple of 128 rows: then the grid is the plain one) or
// per-channel scales; K % 16 == 0 and N % 8 == 0 (TMA needs 16-byte rows of FP8 A/W and of the
// BF16 D); 16-byte aligned W. Partial last N tiles and K blocks are fine (TMA zero-fills).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fp8moe/backend.hpp"

namespace fp8moe::cuda::w8a8 {

// Whether this library holds the CUTLASS kernel (built with CUTLASS headers and an sm_90a target)
// and the current device is an sm_90 card that runs it.
bool available();
// Why not, in words ("" when available()).
std::string unavailable_reason();

// The path decision (w8a8_dispatch.cpp, apart from the kernels): whether `g` runs on W8A8 under
// `precision`. Under W8A8, a forward FP8 GEMM that W8A8 declines is said once per distinct problem
// on stderr (with the reason); every decision goes to the dispatch log (FP8MOE_LOG_DISPATCH=1).
bool choose(const GroupedGemm& g, GemmPrecision precision);

// Empty when the W8A8 path takes `g`; else the first condition it fails, in words.
std::string fits(const GroupedGemm& g);

// Where the LoRA delta of a W8A8 GEMM is added to the FP8 product D:
//   AddendGemm  the W8A16 family's rank-r GEMM (K = r, an mma.sync tile) with D as its addend;
//   Pass        this path's vector epilogue pass (EpilogueForm::Vector, below) with the rank-r product
//               of its tile computed in it on tensor cores (r <= kMaxPassRank; lora_pass_fits);
//   Auto        choose_lora_path.
enum class LoraPath : uint8_t { Auto, AddendGemm, Pass };
inline constexpr int kMaxPassRank = 32;
const char* lora_path_name(LoraPath p);
// The choice (w8a8_dispatch.cpp): AddendGemm, which takes any rank and every shape, until a GPU run
// has measured the tensor-core pass against it (bench/NOTES.md, twenty-eighth session).
// FP8MOE_W8A8_LORA=pass | addend-gemm forces one (the pass only where lora_pass_fits), for timing
// both in a whole layer.
LoraPath choose_lora_path(const GroupedGemm& g);
// FP8MOE_W8A8_LORA's value: null or "" -> Auto, "pass", "addend-gemm"; anything else throws, naming
// the value and the accepted ones (never a silent default).
LoraPath parse_lora_path_env(const char* value);
// Empty when the pass takes g's LoRA delta: rank 1 to kMaxPassRank and what epilogue_vector_fits
// asks; else the first condition it fails, in words.
std::string lora_pass_fits(const GroupedGemm& g);

// How the epilogue pass after the CUTLASS GEMM walks its outputs (without LoRA, or with
// LoraPath::Pass):
//   General  epilogue_kernel: items of 8 outputs at any column, index arrays per item, rows per
//            block by epilogue_rows_per_block; any shape and alignment.
//   Vector   vector_epilogue_kernel: tiles of 32 rows x 128 outputs (vector_tile below), every
//            read and write a 16-byte run, the tile's LoRA delta from an MMA in shared memory.
//            Needs epilogue_vector_fits.
//   Auto     choose_epilogue_form.
enum class EpilogueForm : uint8_t { Auto, General, Vector };
const char* epilogue_form_name(EpilogueForm f);
// Empty when the vector form takes g: output columns (N, or N / 2 for a GLU) a multiple of 8 and
// out, aux, bias and per-channel scales 16-byte aligned; else the first condition it fails.
std::string epilogue_vector_fits(const GroupedGemm& g);
// The choice (w8a8_dispatch.cpp): General, until a GPU run has measured Vector (bench/NOTES.md,
// twenty-eighth session); FP8MOE_W8A8_EPILOGUE=vector | general forces one (Vector only where it
// fits; a problem it does not fit takes General, logged).
EpilogueForm choose_epilogue_form(const GroupedGemm& g);
// FP8MOE_W8A8_EPILOGUE's value: null or "" -> Auto, "vector", "general"; anything else throws.
EpilogueForm parse_epilogue_form_env(const char* value);

// The CUTLASS kernel's tile (cutlass/fp8_grouped_sm90.cu):
//   M128  cooperative 128 x 128 x 128, both consumer warpgroups on one tile;
//   M64   ping-pong 64 x 128 x 128, a tile per consumer warpgroup: half the padded MMA work where
//         experts hold few rows (16 per expert at 256 Qwen3 tokens);
//   Auto  choose_sm90_tile.
enum class Sm90Tile : uint8_t { Auto, M128, M64 };
const char* sm90_tile_name(Sm90Tile t);
// The choice (w8a8_dispatch.cpp) from the rows and experts the host knows (the rows per expert
// stay on the device): M64 at 32 rows per expert or fewer on average, else M128.
// FP8MOE_W8A8_TILE=m64 | m128 forces one, for timing both in a whole layer.
Sm90Tile choose_sm90_tile(int64_t rows, int64_t experts, int64_t n, int64_t k);
// FP8MOE_W8A8_TILE's value: null or "" -> Auto, "m64", "m128"; anything else throws, naming the
// value and the accepted ones.
Sm90Tile parse_tile_env(const char* value);

// Rows per block of the epilogue pass without LoRA (w8a8_dispatch.cpp): `items_per_row` chunks of 8
// outputs per row, `threads` per block. About 8 items per thread, but at least ~512 blocks where
// `rows` allows (a small batch would otherwise leave SMs idle and threads walking items serially).
int epilogue_rows_per_block(int64_t rows, int64_t items_per_row, int threads);

// How one call runs; Auto leaves a choice to the functions above.
struct Options {
  LoraPath lora = LoraPath::Auto;  // where a LoRA delta is added (Pass where lora_pass_fits fails is refused)
  Sm90Tile tile = Sm90Tile::Auto;  // the CUTLASS kernel's tile
  EpilogueForm form = EpilogueForm::Auto;  // the pass without LoRA (Vector where it does not fit: General)
};

// Runs `g` on the W8A8 path (fits(g) must be empty and available() true; both are checked).
// Temporaries (codes, scales, D, the CUTLASS argument arrays) come from `alloc`, stream-ordered.
void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, const Options& options = {});

// ---- the input-gradient GEMMs under W8A8 (issue #13, item 4)
//
// The backward's dgrad GEMMs read the forward's FP8 weights transposed (transpose_b: stored [E, K, N],
// K the reduction). FP8 wgmma takes only K-major operands, so an FP8 dgrad needs W^T tiles: this
// path transposes each 128 x 128 W tile in shared memory (no transposed copy of the expert stack).
//   Bf16  the W8A16 kernels: W dequantized to BF16 tiles, the BF16 gradient as it is. The precise
//         engine and the default.
//   Fp8   w8a8_dgrad.cu: the gradient quantized to E4M3 in 1 x 128 groups along K (quantize_rows),
//         W's E4M3 tiles transposed in shared memory, FP8 wgmma (m64n128k32) with each 128-wide K
//         block's partial sums scaled into FP32 accumulators (activation scale x W block scale),
//         then this family's epilogue (row scale, bias, Store or GluBackward) from the staged tile.
//         Per-channel W scales run along the reduction, where an FP8 MMA cannot apply them: they
//         are folded into the gradient before it is quantized (quantize_rows_scaled). A LoRA delta
//         goes through the W8A16 family's rank-r GEMM with the FP8 product as its addend.
//   Fp8RegW  the same product with W as the MMA's M side from registers (no transposed tile, a
//         producer warpgroup and two consumers: w8a8_dgrad.cu, dgrad_regw_kernel). Both FP8
//         kernels pass the same tests and take the same time, slower than Bf16 (4.20 against
//         3.67 ms per Qwen3 layer at 16384 tokens, H100, bench/NOTES.md twenty-second session):
//         what they share, one tile per CTA with its fill and epilogue, is the limit.
// FP8MOE_W8A8_DGRAD=fp8 | fp8-regw | bf16 picks one (unset: bf16); only under GemmPrecision::W8A8.
enum class Dgrad : uint8_t { Bf16, Fp8, Fp8RegW };
// FP8MOE_W8A8_DGRAD's value: null or "" -> Bf16, "bf16", "fp8", "fp8-regw"; anything else throws,
// naming the value and the accepted ones.
Dgrad parse_dgrad_env(const char* value);
// The process's setting: FP8MOE_W8A8_DGRAD at the first call, or the last set_dgrad_setting.
Dgrad dgrad_setting();
void set_dgrad_setting(Dgrad d);
// Empty when the FP8 dgrad takes `g`; else the first condition it fails, in words.
std::string dgrad_fits(const GroupedGemm& g);
// Whether `g` runs on an FP8 dgrad: precision W8A8, `setting` Fp8 or Fp8RegW, an sm_90 card with this
// library's sm_90a code, a transposed FP8 GEMM that dgrad_fits. Logged as choose() logs (a declined one once on stderr, with the reason).
bool choose_dgrad(const GroupedGemm& g, GemmPrecision precision, Dgrad setting = dgrad_setting());
// Runs `g` on an FP8 dgrad kernel (dgrad_fits(g) must be empty; checked). g.out_fp8 is written by a pass.
void dgrad(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, Dgrad kernel = dgrad_setting());

// The register-W kernel's addressing, shared with a host test of its fragment algebra.
namespace regw_layout {
// Byte offset of 16-byte unit u of stored K row r in the W tile (128-byte rows): u ^ f(r), f
// injective on each 8-row set one ldmatrix matrix reads ({0,1,4,5,8,9,12,13}, {2,3,6,7,10,11,14,15},
// plus multiples of 16), so every ldmatrix is conflict-free.
__host__ __device__ constexpr int w_unit(int r, int u) { return r * 128 + ((u ^ ((r & 1) | ((r >> 1) & 6))) << 4); }
// The K row of a k32 step whose 16 bytes lane `lane` addresses in ldmatrix.x4.trans: row j = lane % 8
// of matrix lane / 8, so that thread (g, q) receives K rows 4q, 4q+1 (matrix 0), 4q+2, 4q+3 (1), and
// the same + 16 (2, 3), each at columns 2g, 2g + 1.
__host__ __device__ constexpr int ldsm_row(int lane) {
  return 16 * (lane / 16) + 4 * (lane % 8 / 2) + lane % 2 + 2 * (lane / 8 % 2);
}
// Byte permutes making a register's four K bytes of column 2g (kLow) or 2g + 1 (kHigh) from the
// matrices holding K rows 4q, 4q+1 and 4q+2, 4q+3.
constexpr uint32_t kLow = 0x6420, kHigh = 0x7531;
}  // namespace regw_layout

// The vector epilogue pass's tile (w8a8.cu, vector_epilogue_kernel) and its rank-r MMA's operand
// addressing, shared with a host test that replays the tile (CI runs GemmDispatch.*).
//
// A block takes kRows rows and kCols outputs (one 128-wide quantization group of out's FP8 rows) of
// column tile `tile`. Its v columns (the GEMM's N side: the outputs themselves for a Store; for a GLU
// the gate and up columns of its outputs) are tile columns j < v_cols(glu). An item is 8 outputs of
// a row: chunk c (kChunks per row, so a half warp holds one row's group) reads runs of 8 v columns
// at tile columns run_a(c) and run_b(c) (a GLU's second run). With LoRA, L's rows and LB_e's rows for
// the tile's v columns are staged as BF16 pairs (`words(kR)` 32-bit words a row) and multiplied on
// mma.sync m16n8k16 (A = L [rows, r], B = LB_e^T), each warp kNTiles(glu) n8 tiles of both m16
// halves, into an F32 tile [kRows, delta_ld(glu)] in shared memory.
namespace vector_tile {
inline constexpr int kRows = 32, kCols = 128, kThreads = 256, kChunks = kCols / 8;
inline constexpr int kItemsPerThread = kRows * kChunks / kThreads;
__host__ __device__ constexpr int v_cols(bool glu) { return glu ? 2 * kCols : kCols; }
// n8 tiles per warp (8 warps over the v columns).
__host__ __device__ constexpr int n_tiles(bool glu) { return v_cols(glu) / 8 / (kThreads / 32); }
// Row strides: 4 words past a multiple of 8, so the 8 rows a fragment load touches (g = lane / 4,
// word q = lane % 4) fall on distinct bank quads; 8 floats past the tile, so that a half warp's
// float2 stores of rows g and g + 4 do not collide.
__host__ __device__ constexpr int words(int rank) { return rank / 2 + 4; }
__host__ __device__ constexpr int delta_ld(bool glu) { return v_cols(glu) + 8; }
// Shared memory of a block with rank kR (L rows, LB rows, the F32 delta tile).
__host__ __device__ constexpr int smem_bytes(int rank, bool glu) {
  return 4 * ((kRows + v_cols(glu)) * words(rank) + kRows * delta_ld(glu));
}
// The GEMM column (v column) of tile column j, or -1 where the tile runs past the outputs. `cols`:
// the outputs (N for a Store, N / 2 for a GLU).
__host__ __device__ constexpr int v_col(int j, int tile, int cols, bool glu, bool interleaved) {
  if (!glu) return tile * kCols + j < cols ? tile * kCols + j : -1;
  if (interleaved) return 2 * tile * kCols + j < 2 * cols ? 2 * tile * kCols + j : -1;  // gate 2n, up 2n + 1
  const int n = tile * kCols + j % kCols;  // halves: gate n, up cols + n
  return n < cols ? (j < kCols ? n : cols + n) : -1;
}
// Tile columns of chunk c's runs: a Store's outputs; a GLU's gate and up runs (halves), or its
// 16 interleaved columns (gate, up, gate, ...) as two runs.
__host__ __device__ constexpr int run_a(int c, bool glu, bool interleaved) { return glu && interleaved ? 16 * c : 8 * c; }
__host__ __device__ constexpr int run_b(int c, bool interleaved) { return interleaved ? 16 * c + 8 : kCols + 8 * c; }
// Where output o (0..7) of a GLU item finds its gate (up = false) or up value: in run b or a
// (glu_in_b), at index glu_index of the run.
__host__ __device__ constexpr bool glu_in_b(int o, bool up, bool interleaved) { return interleaved ? o >= 4 : up; }
__host__ __device__ constexpr int glu_index(int o, bool up, bool interleaved) {
  return interleaved ? 2 * (o % 4) + (up ? 1 : 0) : o;
}
// mma.sync m16n8k16 fragments of lane `lane` (g = lane / 4, q = lane % 4) at k step kk, as row and
// word of the staged operand: A register reg (0..3) of the m16 half at row0; B register reg (0..1)
// of the n8 tile at column n0 (B's column n is LB row n); accumulator pair h (0: row g, 1: g + 8)
// at tile column n0 + c_col.
__host__ __device__ constexpr int a_row(int row0, int reg, int lane) { return row0 + lane / 4 + 8 * (reg % 2); }
__host__ __device__ constexpr int a_word(int reg, int lane, int kk) { return 8 * kk + lane % 4 + 4 * (reg / 2); }
__host__ __device__ constexpr int b_row(int n0, int lane) { return n0 + lane / 4; }
__host__ __device__ constexpr int b_word(int reg, int lane, int kk) { return 8 * kk + lane % 4 + 4 * reg; }
__host__ __device__ constexpr int c_row(int row0, int h, int lane) { return row0 + lane / 4 + 8 * h; }
__host__ __device__ constexpr int c_col(int lane) { return 2 * (lane % 4); }
}  // namespace vector_tile

// ---- the phases, exposed for tests and benchmarks

// codes [M, K] F8_E4M3, scales [M, ceil(K/128)] F32 from `a` (BF16 or F32) read through `plan`.
void quantize_rows(const GemmOperand& a, const RoutingPlan& plan, const TensorView& codes, const TensorView& scales,
                   cudaStream_t stream);

// Throws unless g.a.fp8, where given, holds A's rows in expert order as [M, K] Fp8Rows on the GPU
// (K the reduction length). Callers check before their early return for an empty problem.
void check_a_fp8(const GroupedGemm& g, int64_t K);
// g's A as E4M3 rows in expert order, as an FP8 GEMM of this path reads them (after check_a_fp8):
// g.a.fp8 where the GEMM that wrote A handed them over and no column factors apply; else
// quantize_rows (quantize_rows_scaled with `col_factors` [E, K]) into `own`, allocated from `alloc`.
struct OwnedFp8Rows {
  Tensor codes, scales;
};
Fp8Rows quantized_a(const GroupedGemm& g, int64_t K, const TensorView* col_factors, Allocator& alloc,
                    cudaStream_t stream, OwnedFp8Rows& own);

// g's LoRA delta and its whole epilogue (row scale, bias, policy, into g.out / g.aux) on a product
// D computed elsewhere, BF16 [M, N]: the W8A16 family's rank-r GEMM on g's LoRA factors (K = r,
// LB as g stores it) with D as its addend, D's columns times `chan` [E, N, 1] where defined (the
// forward's per-channel scales). D may be g.out itself (read before written, by one thread).
// The W8A8 forward and the FP8 dgrad add their LoRA delta this way; out_fp8 is the caller's.
void lora_addend_gemm(const GroupedGemm& g, const TensorView& d, const TensorView& chan, cudaStream_t stream);

// quantize_rows of a[r, k] * col_factors[e, k] for the rows r of expert e (col_factors [E, K] F32):
// the FP8 dgrad's per-channel weight scales, folded into the gradient. Rows at or past offsets[E]
// are quantized unscaled. Runs over the M rows (a token's k rows differ), gathered when by token.
void quantize_rows_scaled(const GemmOperand& a, const RoutingPlan& plan, const TensorView& col_factors,
                          const TensorView& codes, const TensorView& scales, cudaStream_t stream);

// The epilogue policies of g (channel scales, its LoRA delta, row scale, bias, Store or GluForward)
// on D, the FP8 product (BF16 [M, N]; may be g.out or g.aux itself, rewritten in place), into
// g.out, g.aux and g.out_fp8 by one of w8a8_epilogue.cu's passes: with LoRA the vector form with the
// delta (g must pass lora_pass_fits: LoraPath::Pass), else the form `form` asks (Auto:
// choose_epilogue_form; Vector where it does not fit: General). A Store into D itself with nothing
// to apply writes out_fp8 alone.
void epilogue_pass(const GroupedGemm& g, const void* d, EpilogueForm form, cudaStream_t stream);

// g.out_fp8 (when defined) from g.out, by a quantize_rows pass over it: for the GEMMs whose
// epilogue does not write them (the W8A16 kernels, W8A8 with LoRA).
void quantize_out(const GroupedGemm& g, cudaStream_t stream);

// The CUTLASS kernel's problem in raw device pointers (w8a8_sm90.cu includes CUTLASS and nothing
// of the engine's tensor types beyond this).
struct Sm90Fp8Grouped {
  int E = 0, N = 0, K = 0;
  int64_t M = 0;                     // rows of A and D (offsets[E] <= M)
  const int32_t* offsets = nullptr;  // [E + 1] device
  const uint8_t* a = nullptr;        // [M, K] e4m3
  const float* sa = nullptr;         // [M, ceil(K/128)]
  const uint8_t* b = nullptr;        // [E, N, K] e4m3
  const float* sb = nullptr;         // [E, ceil(N/128), ceil(K/128)]; null: unit scales (channel scales later)
  void* d = nullptr;                 // [M, N] BF16
  Sm90Tile tile = Sm90Tile::M128;    // M128 or M64 (Auto is refused: the caller chooses)
};
// Device bytes of the scratch sm90_fp8_grouped needs for `p` (argument arrays, unit scales,
// CUTLASS's workspace), 256-byte aligned.
size_t sm90_fp8_grouped_scratch(const Sm90Fp8Grouped& p);
// Queues the per-expert argument fill and the grouped GEMM on `stream`. Throws on a CUTLASS error.
void sm90_fp8_grouped(const Sm90Fp8Grouped& p, void* scratch, cudaStream_t stream);

}  // namespace fp8moe::cuda::w8a8

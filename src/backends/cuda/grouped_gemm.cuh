// The grouped GEMM family of the CUDA backend: one expert per group, rows in expert order
// (backend.hpp states the math). CudaBackend::grouped_gemm / grouped_outer call these.
//
// Both launchers check their descriptor on the host, read nothing of the routing plan there
// (offsets, sorted_pairs stay on the device), queue their kernels on `stream` and return:
// everything is capturable in a CUDA graph. Results are deterministic (no atomics).
//
// Supported operands (anything else throws an fp8moe::Error naming the field):
//   a        BF16 or F32, RowSource Rows or Tokens (the token gather is fused into the load)
//   b        FP8 E4M3/E5M2 with any ScaleSpec (dequantized inside the kernel, never copied),
//            or plain BF16/F32; stored [E, N, K], or [E, K, N] with transpose_b
//   lora_a   BF16 or F32 [*, r], Rows or Tokens; lora_b BF16/F32 [E, N, r] (or [E, r, N])
//   row_scale, bias: BF16/F32; out, aux: BF16/F32; every Epilogue and Activation, both layouts.
// Any K works. The fast vectorised loads need K % 8 == 0 (N % 8 == 0 with transpose_b),
// 16-byte aligned operands and scale blocks that do not split an 8-element chunk; other shapes
// take a correct per-element path (slower, not a silent change of result).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fp8moe/backend.hpp"

namespace fp8moe::cuda {

// The chosen path (tile shape, split K); temporaries from `alloc`, stream-ordered.
void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream);

// A product computed elsewhere, folded into g's epilogue: g's sum over K becomes
//   acc_scale * sum + d[r, n] * chan_e[n]
// before g's row scale, bias and epilogue policy. The W8A8 path (w8a8.cu) runs its LoRA delta this
// way: the rank-r GEMM (K = r) takes CUTLASS's FP8 product as d, so that GroupedGemm's whole
// epilogue runs once, in this family's kernels, and the delta is never stored. d may be g.out or
// g.aux itself (each element is read and then written by one thread).
struct GemmAddend {
  TensorView d;     // BF16 [M, N]
  TensorView chan;  // per-channel factors, F32 [E, N, 1] (the FP8 weights' channel scales); optional
  double acc_scale = 1.0;
};
void grouped_gemm(const GroupedGemm& g, const GemmAddend& addend, cudaStream_t stream);
void grouped_outer(const GroupedOuter& g, Allocator& alloc, cudaStream_t stream);

namespace gemm {

// Tile shapes of the grouped GEMM family, one row each in tile_shapes.def. The mma.sync shapes run
// on every GPU from sm_80; the wgmma shapes need sm_90a code and an sm_90 card (bench/NOTES.md has
// the measurements behind choose_tile_shape).
enum class TileShape : uint8_t {
#define FP8MOE_TILE_SHAPE(shape, ...) shape,
#include "backends/cuda/tile_shapes.def"
#undef FP8MOE_TILE_SHAPE
};
inline constexpr TileShape kTileShapes[] = {
#define FP8MOE_TILE_SHAPE(shape, ...) TileShape::shape,
#include "backends/cuda/tile_shapes.def"
#undef FP8MOE_TILE_SHAPE
};
// The kernel family a shape runs on (tile_shapes.def: engine).
enum class Engine : uint8_t { Mma, MmaPlain, Sm90, Sm90RegA };
// The operand storage a shape is compiled for (tile_shapes.def: storage).
enum class Storage : uint8_t { AnyStorage, Bf16AFp8W };
struct TileTraits {
  int bm, bn, bk;  // rows x columns of v x K step per CTA (GLU forward: bn / 2 gate + bn / 2 up columns)
  Engine engine;
  Storage storage;
  const char* name;
};
inline constexpr TileTraits kTileTraits[] = {
#define FP8MOE_TILE_SHAPE(shape, bm, bn, bk, engine, storage, name, ...) {bm, bn, bk, Engine::engine, Storage::storage, name},
#include "backends/cuda/tile_shapes.def"
#undef FP8MOE_TILE_SHAPE
};
constexpr const TileTraits& tile_traits(TileShape s) { return kTileTraits[static_cast<int>(s)]; }
constexpr const char* tile_shape_name(TileShape s) { return tile_traits(s).name; }
constexpr bool is_rega(TileShape s) { return tile_traits(s).engine == Engine::Sm90RegA; }
constexpr bool is_sm90(TileShape s) { return tile_traits(s).engine == Engine::Sm90 || is_rega(s); }
// Whether `s` runs plain sums alone (GemmProblem::plain_sum; tile_shape_fits).
constexpr bool is_plain(TileShape s) { return tile_traits(s).engine == Engine::MmaPlain; }
constexpr int tile_bm(TileShape s) { return tile_traits(s).bm; }
constexpr int tile_bn(TileShape s) { return tile_traits(s).bn; }
constexpr int tile_bk(TileShape s) { return tile_traits(s).bk; }
// Whether shape `s` is compiled for A of `a_bytes` and W of `b_bytes` per element (the 2-byte W
// instance also takes F32 W: dispatch_storage).
constexpr bool tile_takes_storage(TileShape s, int a_bytes, int b_bytes) {
  return tile_traits(s).storage == Storage::AnyStorage || (a_bytes == 2 && b_bytes == 1);
}
// The widest N that choose_tile_shape gives the narrow tile.
constexpr int64_t kNarrowN = 32;
// Whether `s` is a narrow-N tile (M128N32 and its plain twin: gemm_k_splits may split their K).
constexpr bool is_narrow(TileShape s) { return tile_bn(s) <= kNarrowN && !is_sm90(s); }
// The longest reduction that choose_tile_shape treats as one K step (the epilogue is the work).
constexpr int64_t kShortK = 32;
// Whether `s` can run on the current device (tests and benchmarks skip the others).
bool tile_shape_supported(TileShape s);
// Whether this process can run the wgmma kernels on the current device: the card is sm_90 and
// the library holds sm_90a code for them (not only the trap other targets compile).
bool sm90_kernels_available();
// What the tile-shape choice looks at: host-known facts only (the routing stays on the device).
struct GemmProblem {
  int64_t rows = 0, experts = 0;  // rows = T * top_k over `experts` groups
  int64_t n = 0;                   // columns of v (GLU forward: gate + up)
  bool fine_k_scale = false;       // W's scale changes inside a 64-wide K tile
  // Sm90RegA can take it: FP8 W, BF16 A, K a multiple of 64, one scale k-part per 64-wide K
  // tile (or, transposed, a scale per stored row), LoRA only with BF16 L and r % 8 == 0, 16-byte
  // aligned operands; transposed W also needs N % 16 == 0 and no GLU forward.
  bool rega_fits = false;
  int64_t k = 0;               // the reduction length
  // Plain W (no scales), Store with no row scale, bias or LoRA: the sum over K is the whole
  // result, so partial sums over K ranges can be added afterwards (split K).
  bool plain_sum = false;
};
GemmProblem describe(const GroupedGemm& g);
// Whether shape `s` can run problem `p` on this device (every shape but the Sm90RegA ones takes any
// problem).
bool tile_shape_fits(TileShape s, const GemmProblem& p);
// The one place that picks a tile shape: for this device, or (pure, host-testable) for a device
// that can (`sm90`) or cannot run the wgmma kernels, with (`t192`) or without the 192-token
// register-A tile. FP8MOE_GEMM_T192=off leaves that tile out on this device, for the A/B against
// the 256-token tile in whole training steps (bench/NOTES.md, twenty-sixth to twenty-eighth sessions).
TileShape choose_tile_shape(const GemmProblem& p);
TileShape choose_tile_shape(const GemmProblem& p, bool sm90, bool t192 = true);
// FP8MOE_GEMM_T192's value: null, "" or "on" -> true, "off" -> false; anything else throws, naming
// the value and the accepted ones.
bool parse_t192_env(const char* value);
// How many K ranges the chosen launch splits the reduction into (1: none), each a CTA writing F32
// partial sums that a second pass adds in split order (deterministic). Only for plain sums on the
// narrow tile: the rank-r projections of a dense layer's LoRA (one group, 2048 rows: 16 CTAs
// of a 2048- or 4096-long K each). A function of the problem alone, the same on every card.
int gemm_k_splits(const GemmProblem& p, TileShape s);
// gemm_k_splits, logged once per distinct problem (as choose_tile_shape) where it splits.
int choose_k_splits(const GemmProblem& p, TileShape s);
constexpr int kMaxKSplits = 16;

// grouped_outer's kernels (grouped_outer.cu says how each works): the narrow-side kernel,
// instantiated for a narrow side of up to 16 and up to kOuterNarrowMax columns, and the general
// tiled one.
enum class OuterKernel : uint8_t { Narrow16, Narrow32, General };
constexpr int64_t kOuterNarrowMax = 32;
// The one place that picks grouped_outer's kernel, for out [E, N, Q] (pure, host-testable).
OuterKernel choose_outer_kernel(int64_t n, int64_t q);
const char* outer_kernel_name(OuterKernel k);
// How many contiguous row ranges of each expert the narrow-side kernel splits its work into
// (1: none), for `rows` rows over `experts` experts and `col_blocks` column blocks of the wide
// side. More than one where the grid would leave most SMs idle: one group (the dense
// projections' LoRA gradients) has a column block per 128 columns and nothing else to spread
// over. A function of the problem alone, not of the card, so results are the same bits on
// every GPU.
int outer_row_splits(int64_t rows, int64_t experts, int64_t col_blocks);
constexpr int kOuterMaxSplits = 32;

// With FP8MOE_LOG_DISPATCH set (not "0"), or `always`, writes the line `make_line()` returns to
// stderr the first time it is seen: the kernel chosen for each distinct problem, once.
// choose_tile_shape(p) logs through it. The line is built only when it may be written: the
// choices run on every GEMM call, and a training step makes thousands.
bool dispatch_log_enabled();
// Rows per expert as the heuristics see it, rounded down to a power of two: a distinct problem
// for the log, not every token count of a training run.
int64_t rows_bucket(int64_t rows, int64_t experts);
void log_line_once(const std::string& line);
template <class MakeLine>
void log_choice_once(MakeLine&& make_line, bool always = false) {
  if (always || dispatch_log_enabled()) log_line_once(make_line());
}

}  // namespace gemm

// grouped_gemm with an explicit tile shape instead of choose_tile_shape's (benchmarks and tests
// run every shape; the result is the same up to fp32 summation order).
void grouped_gemm(const GroupedGemm& g, cudaStream_t stream, gemm::TileShape shape);
void grouped_gemm(const GroupedGemm& g, const GemmAddend& addend, cudaStream_t stream, gemm::TileShape shape);
// ... and K split `splits` ways (> 1: F32 partials from `alloc`, summed in split order by a second
// pass; only plain sums on the M128N32 shape, as gemm_k_splits allows).
void grouped_gemm(const GroupedGemm& g, Allocator& alloc, cudaStream_t stream, gemm::TileShape shape, int splits);

}  // namespace fp8moe::cuda

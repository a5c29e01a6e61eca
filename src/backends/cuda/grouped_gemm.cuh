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

#include "fp8moe/backend.hpp"

namespace fp8moe::cuda {

void grouped_gemm(const GroupedGemm& g, cudaStream_t stream);
void grouped_outer(const GroupedOuter& g, cudaStream_t stream);

namespace gemm {

// Tile shapes of the grouped GEMM family. The mma.sync shapes run on every GPU from sm_80; the
// wgmma shapes need sm_90a code and an sm_90 card (bench/NOTES.md has the measurements behind
// choose_tile_shape).
enum class TileShape : uint8_t {
  M32N128,      // mma.sync: 32 x 128, K step 32, 4 warps of 32 x 32, four CTAs per SM (few rows per expert)
  M64N128,      // mma.sync: 64 x 128, K step 32, 8 warps of 32 x 32, two CTAs per SM
  Sm90M128N128, // wgmma: 128 x 128, K step 64, two warpgroups, one CTA per SM
  Sm90RegA,     // wgmma with W from registers: 128 W rows x 128 tokens, K step 64, producer +
                // two consumer warpgroups (gemm_kernel_sm90_rega.cuh); FP8 W only (rega_fits)
  Sm90RegAT256, // the same with 256 tokens per CTA: each W fragment feeds two wgmmas
  Sm90RegAT64,  // the same with 64 tokens per CTA (few rows per expert)
  M128N32,      // mma.sync: 128 x 32, K step 32, 4 warps of 32 x 32, three CTAs per SM: narrow N
                // (the LoRA rank-r projections), where a 128-wide tile would be mostly padding
};
inline constexpr TileShape kTileShapes[] = {TileShape::M32N128,     TileShape::M64N128,  TileShape::Sm90M128N128,
                                            TileShape::Sm90RegA,    TileShape::Sm90RegAT256, TileShape::Sm90RegAT64,
                                            TileShape::M128N32};
const char* tile_shape_name(TileShape s);
constexpr bool is_rega(TileShape s) {
  return s == TileShape::Sm90RegA || s == TileShape::Sm90RegAT256 || s == TileShape::Sm90RegAT64;
}
constexpr bool is_sm90(TileShape s) { return s == TileShape::Sm90M128N128 || is_rega(s); }
constexpr int tile_bm(TileShape s) {
  if (s == TileShape::Sm90RegAT256) return 256;
  if (s == TileShape::Sm90RegAT64 || s == TileShape::M64N128) return 64;
  return is_sm90(s) || s == TileShape::M128N32 ? 128 : 32;
}
constexpr int tile_bk(TileShape s) { return is_sm90(s) ? 64 : 32; }
// Columns of v per CTA (GLU forward: half of them gate, half up).
constexpr int tile_bn(TileShape s) { return s == TileShape::M128N32 ? 32 : 128; }
// The widest N that choose_tile_shape gives the narrow tile.
constexpr int64_t kNarrowN = 32;
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
};
GemmProblem describe(const GroupedGemm& g);
// Whether shape `s` can run problem `p` on this device (every shape but the Sm90RegA ones takes any
// problem).
bool tile_shape_fits(TileShape s, const GemmProblem& p);
// The one place that picks a tile shape: for this device, or (pure, host-testable) for a device
// that can (`sm90`) or cannot run the wgmma kernels.
TileShape choose_tile_shape(const GemmProblem& p);
TileShape choose_tile_shape(const GemmProblem& p, bool sm90);

}  // namespace gemm

// grouped_gemm with an explicit tile shape instead of choose_tile_shape's (benchmarks and tests
// run every shape; the result is the same up to fp32 summation order).
void grouped_gemm(const GroupedGemm& g, cudaStream_t stream, gemm::TileShape shape);

}  // namespace fp8moe::cuda

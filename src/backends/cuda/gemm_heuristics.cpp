// Kernel choice for the grouped GEMM family (the GEMM's tile shape, grouped_outer's kernel),
// apart from the kernels.
#include "backends/cuda/grouped_gemm.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

namespace fp8moe::cuda::gemm {

bool dispatch_log_enabled() {
  // Off unless asked for: a library must not write to stderr on its own (log_choice_once's
  // `always` is for what the caller must hear).
  static const bool on = [] {
    const char* v = std::getenv("FP8MOE_LOG_DISPATCH");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

void log_line_once(const std::string& line) {
  static std::mutex m;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(m);
  if (seen.insert(line).second) std::fprintf(stderr, "fp8moe: %s\n", line.c_str());
}

int64_t rows_bucket(int64_t rows, int64_t experts) {
  int64_t per = experts > 0 ? rows / experts : rows, b = 1;
  while (b * 2 <= per) b *= 2;
  return per == 0 ? 0 : b;
}

bool tile_shape_supported(TileShape s) { return is_sm90(s) ? sm90_kernels_available() : true; }

bool tile_shape_fits(TileShape s, const GemmProblem& p) {
  return tile_shape_supported(s) && (!is_rega(s) || p.rega_fits) && (!is_plain(s) || p.plain_sum);
}

bool parse_t192_env(const char* v) {
  if (v == nullptr || *v == '\0' || std::strcmp(v, "on") == 0) return true;
  if (std::strcmp(v, "off") == 0) return false;
  FP8MOE_FAIL("FP8MOE_GEMM_T192='", v, "' is not one of: on, off (unset: on)");
}

TileShape choose_tile_shape(const GemmProblem& p) {
  // Read once per process, as the W8A8 settings are.
  static const bool t192 = parse_t192_env(std::getenv("FP8MOE_GEMM_T192"));
  const TileShape s = choose_tile_shape(p, sm90_kernels_available(), t192);
  log_choice_once([&] {
    return "grouped_gemm N " + std::to_string(p.n) + ", " + std::to_string(p.experts) + " experts, ~" +
           std::to_string(rows_bucket(p.rows, p.experts)) + " rows each" + (p.fine_k_scale ? ", fine K scale" : "") +
           (p.rega_fits ? ", reg-A fits" : "") + " -> " + tile_shape_name(s) + (t192 ? "" : " (FP8MOE_GEMM_T192=off)");
  });
  return s;
}

TileShape choose_tile_shape(const GemmProblem& p, bool sm90, bool t192) {
  const int64_t rows = p.rows, experts = p.experts;
  // Measured on H100 (bench/gemm_lab, bench/NOTES.md), all four GEMMs of both model shapes:
  // - wgmma beats mma.sync everywhere once experts average a full 128-row tile (1.4-3.3x);
  // - a scale that changes inside the K tile (per-channel scales read transposed, the backward
  //   GEMMs) has a linear fast path only in the wgmma kernel: 1.7-3.3x faster at every size;
  // - at ~16 rows per expert the 32-row mma.sync tile is ~10% faster than the 64-row one.
  // - the register-A wgmma engine, where it fits, beats every other shape at every size measured
  //   (16-1024 rows per expert): 1.5x the first wgmma kernel, 1.5-1.7x mma.sync at 16 rows; its
  //   256-token tile is another 1.15-1.3x from 256 rows per expert on (all eight GEMMs); its
  //   64-token tile is 5-15% faster than the 128-token one at 16 rows per expert and 15-20%
  //   slower at 64 (fifth session). At 128 rows per expert (a full-size model's 2048-token
  //   sequence, uniform routing) the 256-token tile still beats the 128-token one on all eight,
  //   by 4-10% (H100, twelfth session): one tile takes an expert of 129-256 rows that the
  //   128-token tile needs two for.
  // - 112-175 rows per expert on average: the 192-token tile takes nearly every expert in one
  //   tile (uniform routing at 128 rows: the largest of 128 experts is ~170), like the 256-token
  //   tile, with a quarter fewer MMAs. At 128 rows per expert it was 6-15% faster than the
  //   256-token tile on all eight GEMMs (H100, twenty-sixth session); the edges 112 and 176 are
  //   not measured. In the graphed 2048-token steps GLM gained 5 ms and Qwen3 lost 1-3.
  if (sm90 && p.rega_fits) {
    if (t192 && rows >= 112 * experts && rows < 176 * experts) return TileShape::Sm90RegAT192;
    if (rows >= 128 * experts) return TileShape::Sm90RegAT256;
    return rows >= 64 * experts ? TileShape::Sm90RegA : TileShape::Sm90RegAT64;
  }
  // - N no wider than 32 (the LoRA rank-r projections, plain BF16 weights): every 128-wide tile
  //   is at least 3/4 padding; the narrow mma.sync tile streams A with 3 CTAs per SM. The four
  //   projections of Qwen3's LoRA at T 16384: 3.84 ms on the 128-wide wgmma tile, 1.22 ms on
  //   this one (sixth session).
  //   Plain sums (all of a training step's LoRA projections) take the same tile compiled without
  //   the policies' code.
  if (p.n <= kNarrowN) return p.plain_sum ? TileShape::M128N32Plain : TileShape::M128N32;
  // - K no longer than one mma.sync K step (W8A8's LoRA GEMM, K = r, adding CUTLASS's product
  //   in its epilogue): the epilogue's loads and stores are the work, and the mma.sync tiles fit
  //   more CTAs per SM than the wgmma one. Qwen3's pair at 16384 tokens: 1.08 + 1.15 ms on the
  //   64-row tile, 1.75 + 1.87 ms on the 128 x 128 wgmma tile; at 2048 tokens (128 rows per
  //   expert) 0.17 + 0.18 against 0.29 + 0.30 (H100, fourteenth session).
  if (p.k <= kShortK) return rows <= 32 * experts ? TileShape::M32N128 : TileShape::M64N128;
  if (sm90 && (rows >= 128 * experts || p.fine_k_scale)) return TileShape::Sm90M128N128;
  if (rows <= 32 * experts) return TileShape::M32N128;
  return TileShape::M64N128;
}

int gemm_k_splits(const GemmProblem& p, TileShape s) {
  if (!p.plain_sum || !is_narrow(s) || p.rows <= 0) return 1;
  // Up to ~3 CTAs per SM of an H100/H200 (the narrow tile's occupancy); each split keeps at
  // least 64 of K (two K tiles). At 17 CTAs (one group of 2048 rows) and K 512, the plain tile
  // takes 22.3 us unsplit, 13.7 at 2 splits, 10.0 at 4 and 9.1 at 8 (ncu, cold caches, H100,
  // twenty-fourth session): a short range per split costs less than the idle SMs. Measured on an
  // H100 (gemm_lab, twenty-second session), Qwen3's expert projections at 128 rows per expert
  // (256 CTAs, about half of them an expert's short last tile): 2 splits take U 52 -> 40 us,
  // Q 83 -> 56, R 71 -> 56, V 27 -> 26; 4 and 8 are slower than 2. At 256 rows per expert
  // (384 CTAs) and above, no split.
  constexpr int64_t kTargetCtas = 384, kMinK = 64;
  const int64_t ctas = ((p.rows + tile_bm(s) - 1) / tile_bm(s) + std::min(p.experts, p.rows)) * ((p.n + tile_bn(s) - 1) / tile_bn(s));
  if (ctas >= kTargetCtas) return 1;
  const int64_t by_grid = (kTargetCtas + ctas - 1) / ctas, by_k = p.k / kMinK;
  return static_cast<int>(std::clamp<int64_t>(std::min(by_grid, by_k), 1, kMaxKSplits));
}

int choose_k_splits(const GemmProblem& p, TileShape s) {
  const int splits = gemm_k_splits(p, s);
  if (splits > 1)
    log_choice_once([&] {
      return "grouped_gemm N " + std::to_string(p.n) + ", K " + std::to_string(p.k) + ", " +
             std::to_string(p.experts) + " experts, ~" + std::to_string(rows_bucket(p.rows, p.experts)) +
             " rows each -> " + tile_shape_name(s) + ", K split " + std::to_string(splits) + " ways";
    });
  return splits;
}

const char* outer_kernel_name(OuterKernel k) {
  switch (k) {
    case OuterKernel::Narrow16: return "outer_narrow16";
    case OuterKernel::Narrow32: return "outer_narrow32";
    case OuterKernel::General: return "outer_general";
  }
  return "?";
}

OuterKernel choose_outer_kernel(int64_t n, int64_t q) {
  // The narrow-side kernel reads the wide operand once; the general one re-reads it per 64
  // columns of the other side and wastes most of its tile on a narrow one (grouped_outer.cu has
  // the measurement).
  const int64_t narrow = std::min(n, q);
  if (narrow > kOuterNarrowMax) return OuterKernel::General;
  return narrow <= 16 ? OuterKernel::Narrow16 : OuterKernel::Narrow32;
}

int outer_row_splits(int64_t rows, int64_t experts, int64_t col_blocks) {
  // A grid of at least ~2 CTAs per SM of an H100/H200 (the kernel runs two per SM); each split
  // keeps at least 128 rows on average, so that its 8 warps have rows to stream and the extra
  // pass (the fixed-order sum of the splits' partials) stays small next to the main one.
  constexpr int64_t kTargetCtas = 256, kMinRowsPerSplit = 128;
  const int64_t ctas = std::max<int64_t>(1, experts * col_blocks);
  if (ctas >= kTargetCtas || experts <= 0) return 1;
  const int64_t by_grid = (kTargetCtas + ctas - 1) / ctas;
  const int64_t by_rows = rows / (experts * kMinRowsPerSplit);
  return static_cast<int>(std::clamp<int64_t>(std::min(by_grid, by_rows), 1, kOuterMaxSplits));
}

}  // namespace fp8moe::cuda::gemm

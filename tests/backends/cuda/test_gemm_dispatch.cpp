// The host-side facts the grouped GEMM family's kernel choice rests on (gemm::describe, the tile
// table, gemm_heuristics.cpp): which problems the register-A wgmma engine takes, which shape and
// which grouped_outer kernel the heuristics pick. A wrong "fits" would send a problem to a kernel
// that cannot run it, so the boundaries are pinned here. Pure host logic on descriptors with
// placeholder device pointers (never dereferenced): these tests run without a GPU (ctest label cpu).
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <utility>

#include "backends/cuda/grouped_gemm.cuh"
#include "fp8moe/backend.hpp"

namespace fp8moe {
namespace {

// A 256-byte-aligned placeholder address; `offset` bytes further to make it misaligned.
void* fake_ptr(uintptr_t offset = 0) { return reinterpret_cast<void*>(uintptr_t{1} << 20 | offset); }

TensorView dev(DType t, Shape s, uintptr_t offset = 0) { return TensorView(fake_ptr(offset), t, s, Device::CUDA); }

struct Problem {
  RoutingPlan plan;
  GroupedGemm g;
};

// W stored [E, N, K] (or [E, K, N] transposed) FP8 E4M3 with `spec` over the stored matrix.
Problem make(int64_t N, int64_t K, const ScaleSpec& spec, bool trans) {
  Problem p;
  p.plan.tokens = 4096, p.plan.top_k = 8, p.plan.experts = 128;
  const int64_t E = p.plan.experts, M = p.plan.rows();
  const int64_t sr = trans ? K : N, sc = trans ? N : K;
  p.g.a = {dev(DType::BF16, {M, K}), RowSource::Rows};
  p.g.b = {dev(DType::F8_E4M3, {E, sr, sc}), dev(DType::F32, {E, spec.scale_rows(), spec.grid_k()}), spec};
  p.g.transpose_b = trans;
  p.g.out = dev(DType::BF16, {M, N});
  return p;
}

cuda::gemm::GemmProblem describe(Problem& p) {
  p.g.plan = &p.plan;
  return cuda::gemm::describe(p.g);
}

TEST(GemmDispatch, ModelShapesTakeTheRegisterAEngine) {
  // Qwen3 gate_up forward and its dgrad (128x128 blocks, two segments), GLM with channel
  // scales forward and transposed (a scale per K row).
  Problem q = make(1536, 2048, ScaleSpec::block(1536, 2048, 128, 128, 2), false);
  Problem qt = make(2048, 1536, ScaleSpec::block(1536, 2048, 128, 128, 2), true);
  Problem g = make(2048, 1536, ScaleSpec::channel(2048, 1536), false);
  Problem gt = make(1536, 2048, ScaleSpec::channel(2048, 1536), true);
  for (Problem* p : {&q, &qt, &g, &gt}) EXPECT_TRUE(describe(*p).rega_fits) << p->g.b.spec.str();
  EXPECT_FALSE(describe(q).fine_k_scale);
  EXPECT_TRUE(describe(gt).fine_k_scale);  // the older engines' fast path needs the wgmma kernel
  EXPECT_EQ(describe(q).rows, 4096 * 8);
  EXPECT_EQ(describe(q).experts, 128);
  EXPECT_EQ(describe(q).n, 1536);  // columns of v: stored rows, or stored columns when transposed
  EXPECT_EQ(describe(qt).n, 2048);
}

TEST(GemmDispatch, ScaleSchemesOutsideTheEngine) {
  // Forward: K groups narrower than the 64-wide K tile.
  Problem a = make(256, 512, ScaleSpec::group(256, 512, 32), false);
  EXPECT_FALSE(describe(a).rega_fits);
  Problem a64 = make(256, 512, ScaleSpec::group(256, 512, 64), false);
  EXPECT_TRUE(describe(a64).rega_fits);
  // Transposed: stored-row blocks that neither fill a K tile nor divide it.
  Problem b = make(256, 384, ScaleSpec::block(384, 256, 96, 256), true);
  EXPECT_FALSE(describe(b).rega_fits);
  // Transposed: 32-row blocks with one scale column divide the tile: per-K-row scales.
  Problem c = make(256, 512, ScaleSpec::block(512, 256, 32, 256, 2), true);
  EXPECT_TRUE(describe(c).rega_fits);
  // Transposed: 32-row blocks with two scale columns (the scale depends on N too).
  Problem d = make(256, 512, ScaleSpec::block(512, 256, 32, 128), true);
  EXPECT_FALSE(describe(d).rega_fits);
}

TEST(GemmDispatch, ShapesAndOperandsOutsideTheEngine) {
  const ScaleSpec blk = ScaleSpec::block(256, 512, 128, 128);
  auto fits = [](Problem p) { return describe(p).rega_fits; };
  EXPECT_TRUE(fits(make(256, 512, blk, false)));
  EXPECT_FALSE(fits(make(256, 72, ScaleSpec::block(256, 72, 128, 128), false)));   // K % 64
  EXPECT_FALSE(fits(make(256, 64 * 300, ScaleSpec::block(256, 64 * 300, 128, 128), false)));  // > 256 K tiles
  EXPECT_FALSE(fits(make(256, 64 * 300, ScaleSpec::channel(64 * 300, 256), true)));  // also with per-row scales
  EXPECT_FALSE(fits(make(200, 512, ScaleSpec::block(512, 200, 128, 128), true)));  // transposed, N % 16
  EXPECT_TRUE(fits(make(200, 512, ScaleSpec::block(200, 512, 128, 128), false)));  // forward: any N
  {
    Problem p = make(256, 512, blk, false);
    p.g.a.src = dev(DType::F32, p.g.a.src.shape);
    EXPECT_FALSE(fits(p)) << "F32 A";
  }
  {
    Problem p = make(256, 512, blk, false);
    p.g.a.src = dev(DType::BF16, p.g.a.src.shape, 8);
    EXPECT_FALSE(fits(p)) << "A not 16-byte aligned";
  }
  {
    Problem p = make(256, 512, ScaleSpec::none(256, 512), false);
    p.g.b = {dev(DType::BF16, {128, 256, 512}), TensorView(), ScaleSpec::none(256, 512)};
    EXPECT_FALSE(fits(p)) << "plain BF16 W";
  }
  {
    Problem p = make(256, 512, ScaleSpec::block(512, 256, 128, 128), true);
    p.g.epilogue = Epilogue::GluForward;
    EXPECT_FALSE(fits(p)) << "GLU forward reading W transposed";
  }
}

TEST(GemmDispatch, LoraOnlyWithWholeBf16Chunks) {
  const ScaleSpec blk = ScaleSpec::block(256, 512, 128, 128);
  auto with_lora = [&](DType la, int64_t r, uintptr_t offset = 0) {
    Problem p = make(256, 512, blk, false);
    p.g.lora_a = {dev(la, {p.plan.rows(), r}, offset), RowSource::Rows};
    p.g.lora_b = dev(DType::F32, {128, 256, r});
    p.g.lora_scale = 2.0;
    return describe(p).rega_fits;
  };
  EXPECT_TRUE(with_lora(DType::BF16, 16));
  EXPECT_TRUE(with_lora(DType::BF16, 72));
  EXPECT_FALSE(with_lora(DType::BF16, 13));  // r % 8
  EXPECT_FALSE(with_lora(DType::F32, 16));
  EXPECT_FALSE(with_lora(DType::BF16, 16, 8));  // L not 16-byte aligned
}

// The thresholds of choose_tile_shape (measured in bench/NOTES.md), on both kinds of device.
TEST(GemmDispatch, TileShapeChoice) {
  using cuda::gemm::TileShape;
  auto choose = [](int64_t rows_per_expert, bool rega, bool fine_k, bool sm90, int64_t n = 2048, int64_t k = 2048,
                   bool plain = false) {
    cuda::gemm::GemmProblem p;
    p.plain_sum = plain;
    p.experts = 128;
    p.n = n;
    p.k = k;
    p.rows = rows_per_expert * p.experts;
    p.rega_fits = rega;
    p.fine_k_scale = fine_k;
    return cuda::gemm::choose_tile_shape(p, sm90);
  };
  // The register-A engine where it fits: 64 tokens below 64 rows per expert, 192 at 112-175,
  // 256 from 176 on.
  EXPECT_EQ(choose(16, true, false, true), TileShape::Sm90RegAT64);
  EXPECT_EQ(choose(63, true, false, true), TileShape::Sm90RegAT64);
  EXPECT_EQ(choose(64, true, false, true), TileShape::Sm90RegA);
  EXPECT_EQ(choose(111, true, false, true), TileShape::Sm90RegA);
  EXPECT_EQ(choose(112, true, false, true), TileShape::Sm90RegAT192);
  EXPECT_EQ(choose(128, true, false, true), TileShape::Sm90RegAT192);  // a 2048-token step
  EXPECT_EQ(choose(175, true, false, true), TileShape::Sm90RegAT192);
  EXPECT_EQ(choose(176, true, false, true), TileShape::Sm90RegAT256);
  EXPECT_EQ(choose(256, true, false, true), TileShape::Sm90RegAT256);
  EXPECT_EQ(choose(0, true, false, true), TileShape::Sm90RegAT64);  // T = 0
  {  // Without the 192-token tile (FP8MOE_GEMM_T192=off): 128 tokens below 128 rows, 256 from 128.
    cuda::gemm::GemmProblem p;
    p.experts = 128;
    p.n = p.k = 2048;
    p.rega_fits = true;
    for (const auto& [per, want] : {std::pair{111, TileShape::Sm90RegA}, {112, TileShape::Sm90RegA},
                                    {127, TileShape::Sm90RegA}, {128, TileShape::Sm90RegAT256},
                                    {175, TileShape::Sm90RegAT256}, {16, TileShape::Sm90RegAT64}}) {
      p.rows = per * p.experts;
      EXPECT_EQ(cuda::gemm::choose_tile_shape(p, true, false), want) << per << " rows per expert";
    }
  }
  EXPECT_TRUE(cuda::gemm::parse_t192_env(nullptr));
  EXPECT_TRUE(cuda::gemm::parse_t192_env(""));
  EXPECT_TRUE(cuda::gemm::parse_t192_env("on"));
  EXPECT_FALSE(cuda::gemm::parse_t192_env("off"));
  for (const char* bad : {"0", "OFF", "false", "no"}) {
    try {
      cuda::gemm::parse_t192_env(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "' is not one of: on, off"), std::string::npos) << e.what();
    }
  }
  // Else the shared-memory wgmma kernel from 128 rows per expert, or for fine K scales.
  EXPECT_EQ(choose(128, false, false, true), TileShape::Sm90M128N128);
  EXPECT_EQ(choose(16, false, true, true), TileShape::Sm90M128N128);
  EXPECT_EQ(choose(64, false, false, true), TileShape::M64N128);
  EXPECT_EQ(choose(32, false, false, true), TileShape::M32N128);
  // Without sm_90a code only mma.sync, whatever fits the wgmma engines.
  EXPECT_EQ(choose(1024, true, true, false), TileShape::M64N128);
  EXPECT_EQ(choose(16, true, false, false), TileShape::M32N128);
  // N up to 32 (the LoRA projections) takes the narrow tile on every device, unless the
  // register-A engine fits.
  for (const bool sm90 : {false, true}) {
    EXPECT_EQ(choose(1024, false, false, sm90, 16), TileShape::M128N32);
    EXPECT_EQ(choose(16, false, true, sm90, 32), TileShape::M128N32);
    EXPECT_EQ(choose(0, false, false, sm90, 1), TileShape::M128N32);
    EXPECT_NE(choose(1024, false, false, sm90, 33), TileShape::M128N32);
    // Plain sums (a training step's LoRA projections) on its twin without the policies' code;
    // wider N takes the usual tiles.
    EXPECT_EQ(choose(128, false, false, sm90, 16, 2048, true), TileShape::M128N32Plain);
    EXPECT_EQ(choose(0, false, false, sm90, 1, 2048, true), TileShape::M128N32Plain);
    EXPECT_NE(choose(128, false, false, sm90, 33, 2048, true), TileShape::M128N32Plain);
  }
  EXPECT_EQ(choose(1024, true, false, true, 16), TileShape::Sm90RegAT256);
  // K of one mma.sync step (W8A8's rank-r GEMM with its addend): an mma.sync tile at every size.
  for (const bool sm90 : {false, true}) {
    EXPECT_EQ(choose(1024, false, false, sm90, 2048, 16), TileShape::M64N128);
    EXPECT_EQ(choose(128, false, true, sm90, 1536, cuda::gemm::kShortK), TileShape::M64N128);
    EXPECT_EQ(choose(16, false, false, sm90, 2048, 16), TileShape::M32N128);
    EXPECT_EQ(choose(1024, false, false, sm90, 16, 16), TileShape::M128N32);  // narrow N first
  }
  EXPECT_EQ(choose(1024, false, false, true, 2048, cuda::gemm::kShortK + 1), TileShape::Sm90M128N128);
}

// The traits the build and the dispatch read from tile_shapes.def, where the kernels assume them.
TEST(GemmDispatch, TileShapeTable) {
  using namespace cuda::gemm;
  for (TileShape s : kTileShapes) {
    SCOPED_TRACE(tile_shape_name(s));
    EXPECT_EQ(tile_bk(s), is_sm90(s) ? 64 : 32);  // the wgmma K step, the mma.sync K step
    EXPECT_TRUE(tile_takes_storage(s, 2, 1));       // every shape takes the FP8 forward (BF16 A, FP8 W)
    EXPECT_EQ(tile_takes_storage(s, 4, 2), !is_rega(s));
  }
  EXPECT_STREQ(tile_shape_name(TileShape::M128N32), "m128n32k32");
  EXPECT_EQ(tile_bn(TileShape::M128N32), kNarrowN);
  // The plain twin: the same tile, mma.sync, narrow; the only plain shape.
  EXPECT_EQ(tile_bm(TileShape::M128N32Plain), tile_bm(TileShape::M128N32));
  EXPECT_EQ(tile_bn(TileShape::M128N32Plain), kNarrowN);
  EXPECT_TRUE(is_plain(TileShape::M128N32Plain) && !is_sm90(TileShape::M128N32Plain));
  for (TileShape s : kTileShapes) EXPECT_EQ(is_narrow(s), s == TileShape::M128N32 || s == TileShape::M128N32Plain);
  for (TileShape s : kTileShapes) EXPECT_EQ(is_plain(s), s == TileShape::M128N32Plain);
  // A plain shape fits plain sums alone.
  GemmProblem plain, general;
  plain.plain_sum = true;
  EXPECT_TRUE(tile_shape_fits(TileShape::M128N32Plain, plain));
  EXPECT_FALSE(tile_shape_fits(TileShape::M128N32Plain, general));
  EXPECT_TRUE(tile_shape_fits(TileShape::M128N32, general));
  EXPECT_EQ(tile_bm(TileShape::Sm90RegAT256), 256);
}

// grouped_outer's kernel: the narrow-side one up to kOuterNarrowMax on either side (its 16- or
// 32-wide instance), the general one above.
TEST(GemmDispatch, OuterKernelChoice) {
  using cuda::gemm::choose_outer_kernel;
  using cuda::gemm::OuterKernel;
  EXPECT_EQ(choose_outer_kernel(2048, 16), OuterKernel::Narrow16);
  EXPECT_EQ(choose_outer_kernel(1, 4096), OuterKernel::Narrow16);
  EXPECT_EQ(choose_outer_kernel(17, 600), OuterKernel::Narrow32);
  EXPECT_EQ(choose_outer_kernel(600, 32), OuterKernel::Narrow32);
  EXPECT_EQ(choose_outer_kernel(300, 33), OuterKernel::General);
  EXPECT_EQ(choose_outer_kernel(64, 64), OuterKernel::General);
}

// Split K on the narrow tile: plain sums only, where the row tiles leave the card idle, never
// below 64 of K a split.
TEST(GemmDispatch, KSplits) {
  using cuda::gemm::gemm_k_splits;
  using cuda::gemm::GemmProblem;
  using cuda::gemm::TileShape;
  GemmProblem p;
  p.rows = 2048, p.experts = 1, p.n = 16, p.k = 2048, p.plain_sum = true;  // q/k/v LoRA U = X A^T
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 16);                     // 17 CTAs -> 16 x 128 of K
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32Plain), 16);                // the plain twin alike
  p.k = 4096;                                                                // the B-side dgrad of q_proj
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 16);
  p.k = 512;                                           // the B-side dgrad of k_proj and v_proj
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32Plain), 8);
  p.k = 200;
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 3);  // three 64-long ranges at most
  p.k = 100;
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 1);  // one 64-long range only
  p.k = 4096, p.plain_sum = false;                     // an epilogue, a row scale, LoRA, FP8 W
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 1);
  p.plain_sum = true;
  EXPECT_EQ(gemm_k_splits(p, TileShape::M64N128), 1);  // only the narrow tile splits
  p.rows = 32768, p.experts = 128;                     // experts at 256 rows each: 384 CTAs
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 1);
  p.rows = 16384;  // 128 rows each (a 2048-token step of Qwen3): 256 CTAs, half of them short
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 2);
  p.rows = 2048;  // 16 rows each: 144 CTAs
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 3);
  p.rows = 0;
  EXPECT_EQ(gemm_k_splits(p, TileShape::M128N32), 1);
}

// The narrow-side kernel's row splits: one group of 2048 rows (a dense projection's LoRA
// gradient) splits until the grid fills the card, never below 128 rows a split; 128 experts, or
// too few rows, do not split.
TEST(GemmDispatch, OuterRowSplits) {
  using cuda::gemm::outer_row_splits;
  EXPECT_EQ(outer_row_splits(2048, 1, 4), 16);    // k_proj / v_proj B: 4 column blocks
  EXPECT_EQ(outer_row_splits(2048, 1, 16), 16);   // an A gradient, K 2048
  EXPECT_EQ(outer_row_splits(2048, 1, 32), 8);    // q_proj B, 4096 columns: 8 x 32 = 256 CTAs
  EXPECT_EQ(outer_row_splits(16384, 128, 6), 1);  // experts: 768 CTAs already
  EXPECT_EQ(outer_row_splits(2048, 128, 1), 1);   // 16 rows per expert
  EXPECT_EQ(outer_row_splits(200, 1, 1), 1);      // fewer than 2 x 128 rows
  EXPECT_EQ(outer_row_splits(0, 1, 1), 1);
  EXPECT_EQ(outer_row_splits(1 << 20, 1, 1), cuda::gemm::kOuterMaxSplits);
  EXPECT_EQ(outer_row_splits(4096, 2, 2), 16);
}

}  // namespace
}  // namespace fp8moe

TEST(GemmDispatch, OuterKernelNames) {
  // The dispatch log (FP8MOE_LOG_DISPATCH) names every kernel grouped_outer can choose.
  EXPECT_STREQ(fp8moe::cuda::gemm::outer_kernel_name(fp8moe::cuda::gemm::choose_outer_kernel(4096, 16)), "outer_narrow16");
  EXPECT_STREQ(fp8moe::cuda::gemm::outer_kernel_name(fp8moe::cuda::gemm::choose_outer_kernel(32, 4096)), "outer_narrow32");
  EXPECT_STREQ(fp8moe::cuda::gemm::outer_kernel_name(fp8moe::cuda::gemm::choose_outer_kernel(768, 2048)), "outer_general");
}

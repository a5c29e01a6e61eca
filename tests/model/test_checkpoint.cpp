// Checkpoint loading (src/model/checkpoint.cpp): every supported layout and format, written fresh
// by ckpt_builder.hpp with random codes and scales, loaded and compared element by element with
// the builder's independent code x scale reference; and every broken variant refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>

#include "fp8moe/checkpoint.hpp"
#include "formats/safetensors_test_util.hpp"
#include "model/ckpt_builder.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;
using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

using testing::CkptBuilder;
using testing::CkptOptions;
using testing::TempDir;

// Elements of the loaded stacks (routed, or shared) that differ from the builder's reference.
int64_t mismatches(const MoeLayerWeights& w, const CkptBuilder& b, bool shared = false) {
  const ExpertStack& s = shared ? *w.shared : w.routed;
  const QuantTensor gu = s.gate_up.view(), dn = s.down.view();
  const int64_t E = s.experts(), H = b.options().H, I = b.options().I;
  EXPECT_EQ(gu.data.shape, (Shape{E, 2 * I, H}));
  EXPECT_EQ(dn.data.shape, (Shape{E, H, I}));
  gu.validate("loaded gate_up");
  dn.validate("loaded down");
  int64_t bad = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < 2 * I; ++n)
      for (int64_t k = 0; k < H; ++k) bad += gu.at(e, n, k) != b.gate_up(w.layer, e, n, k, shared);
    for (int64_t n = 0; n < H; ++n)
      for (int64_t k = 0; k < I; ++k) bad += dn.at(e, n, k) != b.down(w.layer, e, n, k, shared);
  }
  return bad;
}

bool any_contains(const std::vector<std::string>& v, const std::string& part) {
  for (const std::string& s : v)
    if (s.find(part) != std::string::npos) return true;
  return false;
}

void expect_bytes_equal(const Tensor& loaded, const Tensor& stored) {
  ASSERT_EQ(loaded.shape(), stored.shape());
  ASSERT_EQ(loaded.dtype(), stored.dtype());
  EXPECT_EQ(std::memcmp(loaded.data(), stored.data(), static_cast<size_t>(stored.nbytes())), 0);
}

void expect_f32_equal(const Tensor& loaded, const Tensor& stored) {
  ASSERT_TRUE(loaded.defined());
  ASSERT_EQ(loaded.dtype(), DType::F32);
  ASSERT_EQ(loaded.shape(), stored.shape());
  for (int64_t i = 0; i < stored.numel(); ++i)
    EXPECT_EQ(loaded.ptr<float>()[i], load_as_double(stored.data(), stored.dtype(), i)) << "element " << i;
}

// ---------------------------------------------------------------------------------------------
TEST(CheckpointFp8, Qwen3BlockScalesWithABf16Layer) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;  // qwen3_moe, fp8 32x32 blocks, E 4, H 96, I 40: partial edge blocks everywhere
  o.bf16_layers = {1};
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));

  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  ASSERT_TRUE(ck.config().has_value());
  EXPECT_EQ(ck.quant().method, QuantMethod::Fp8);
  EXPECT_EQ(ck.moe_layers(), (std::vector<int64_t>{0, 1}));

  const MoeLayerWeights w0 = ck.load_moe_layer(0);
  EXPECT_EQ(w0.layout, ExpertLayout::PerExpert);
  const ScaleSpec& gs = w0.routed.gate_up.spec;
  EXPECT_EQ(gs.kind, ScaleKind::Block);
  EXPECT_EQ(gs.segments, 2);  // gate and up keep their own grids: 40 % 32 != 0
  EXPECT_EQ(gs.block_n, 32);
  EXPECT_EQ(gs.block_k, 32);
  EXPECT_EQ(w0.routed.gate_up.data.dtype(), DType::F8_E4M3);
  EXPECT_EQ(w0.routed.gate_up.scale.shape(), (Shape{4, 2 * 2, 3}));
  EXPECT_EQ(w0.routed.down.scale.shape(), (Shape{4, 3, 2}));
  EXPECT_EQ(mismatches(w0, b), 0);

  // Excluded by modules_to_not_convert and stored BF16: plain weights, no scale, never FP8.
  const MoeLayerWeights w1 = ck.load_moe_layer(1);
  EXPECT_EQ(w1.routed.gate_up.spec.kind, ScaleKind::None);
  EXPECT_EQ(w1.routed.gate_up.data.dtype(), DType::BF16);
  EXPECT_FALSE(w1.routed.gate_up.scale.defined());
  EXPECT_FALSE(w1.routed.down.scale.defined());
  EXPECT_EQ(mismatches(w1, b), 0);

  expect_bytes_equal(w0.router.weight, b.tensors.at("model.layers.0.mlp.gate.weight"));
  const RouterSpec r = w0.router.view();
  EXPECT_EQ(r.kind, RouterKind::SoftmaxTopK);
  EXPECT_EQ(r.top_k, 2);
  EXPECT_TRUE(r.normalize);
  EXPECT_FALSE(r.correction_bias.defined());
  EXPECT_FALSE(w0.shared.has_value());

  const ExpertWeights ev = w0.routed.view();
  ev.gate_up.validate("gate_up");
  EXPECT_EQ(ev.experts(), 4);
  EXPECT_EQ(ev.hidden(), 96);
  EXPECT_EQ(ev.intermediate(), 40);
  EXPECT_EQ(ev.act.layout, GateUpLayout::Halves);
  EXPECT_FALSE(ev.gate_up_bias.defined());

  const InspectionReport rep = ck.inspect();
  EXPECT_TRUE(rep.ok()) << rep.str();
  ASSERT_EQ(rep.layers.size(), 2u);
  EXPECT_EQ(rep.layers[0].kind, LayerKind::Moe);
  EXPECT_EQ(rep.layers[0].experts, 4);
  ASSERT_EQ(rep.layers[0].projections.size(), 2u);
  EXPECT_TRUE(rep.layers[0].projections[0].fp8());
  EXPECT_EQ(rep.layers[0].projections[0].spec.str(), "block 32x32 (2 segments)");
  EXPECT_FALSE(rep.layers[1].projections[0].fp8());
  EXPECT_TRUE(any_contains(rep.notes, "layer 1"));
  EXPECT_NE(rep.str().find("block 32x32"), std::string::npos);

  // A single file beside its config.json is a checkpoint too.
  const Checkpoint file = Checkpoint::open(d.file("ck/model.safetensors"));
  EXPECT_EQ(mismatches(file.load_moe_layer(0), b), 0);
}

// The reference check is not vacuous: scales swapped between two experts load (shapes agree)
// but no longer reproduce the source values; a dropped scale does not load at all.
TEST(CheckpointFp8, SwappedOrDroppedScalesAreCaught) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  CkptBuilder b(o, seed);
  std::swap(b.tensors.at("model.layers.0.mlp.experts.0.up_proj.weight_scale_inv"),
            b.tensors.at("model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"));
  TempDir d;
  b.write(d.file("swapped"));
  const MoeLayerWeights w = Checkpoint::open(d.file("swapped")).load_moe_layer(0);
  EXPECT_GT(mismatches(w, b), 0);

  b.tensors.erase("model.layers.0.mlp.experts.1.up_proj.weight_scale_inv");
  b.write(d.file("dropped"));
  expect_error([&] { Checkpoint::open(d.file("dropped")).load_moe_layer(0); },
               {"model.layers.0.mlp.experts.1.up_proj.weight", "has no scale"});
}

TEST(CheckpointFp8, ShardedBlock128WithPartialEdgesAndBf16Scales) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.block = 128;
  o.I = 72;
  o.scale_dtype = DType::BF16;
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"), 3);
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  EXPECT_EQ(ck.store().files().size(), 3u);
  for (int64_t l : {0, 1}) {
    const MoeLayerWeights w = ck.load_moe_layer(l);
    EXPECT_EQ(w.routed.gate_up.scale.shape(), (Shape{4, 2, 1}));  // one partial block per half
    EXPECT_EQ(w.routed.down.scale.shape(), (Shape{4, 1, 1}));
    EXPECT_EQ(mismatches(w, b), 0);
  }
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
}

// transformers' fine-grained FP8 writer saves the scale of a matrix that fits in one block as a
// rank-0 tensor ([] instead of [1, 1]); one value for one block is unambiguous, so it loads. A
// scalar where the grid has more than one block stays an error.
TEST(CheckpointFp8, OneBlockMatricesWithRank0Scales) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.block = 128;  // H 96, I 40: every expert matrix is a single partial block
  CkptBuilder b(o, seed);
  int rewritten = 0;
  for (auto& [name, t] : b.tensors) {
    if (name.find("experts.") != std::string::npos && name.ends_with("_scale_inv") && t.shape() == Shape{1, 1}) {
      Tensor scalar(t.dtype(), Shape{});
      std::memcpy(scalar.data(), t.data(), static_cast<size_t>(t.nbytes()));
      t = std::move(scalar);
      ++rewritten;
    }
  }
  ASSERT_GT(rewritten, 0);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
  for (int64_t l : {0, 1}) EXPECT_EQ(mismatches(ck.load_moe_layer(l), b), 0);

  CkptOptions wide = o;
  wide.I = 200;  // down [96, 200]: a 1 x 2 grid, so one value is not enough
  CkptBuilder w(wide, seed);
  const std::string down = w.prefix(0) + ".experts.0.down_proj.weight_scale_inv";
  ASSERT_EQ(w.tensors.at(down).shape(), (Shape{1, 2}));
  w.tensors.at(down) = Tensor(w.tensors.at(down).dtype(), Shape{});
  TempDir d2;
  w.write(d2.file("ck"));
  expect_error([&] { Checkpoint::open(d2.file("ck")).load_moe_layer(0); }, {down, "expected shape [1, 2]", "found []"});
}

// Tensors at offsets that are not multiples of their element size (odd FP8 byte counts).
TEST(CheckpointFp8, UnalignedTensors) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.E = 3, o.H = 95, o.I = 41;
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  int unaligned = 0;
  for (const std::string& n : ck.store().names()) {
    const SafetensorsEntry& e = ck.store().entry(n);
    unaligned += e.dtype == DType::F32 && (e.begin % 4) != 0;
  }
  ASSERT_GT(unaligned, 0) << "the test needs F32 scales at unaligned offsets";
  EXPECT_EQ(mismatches(ck.load_moe_layer(0), b), 0);
}

// ---------------------------------------------------------------------------------------------
TEST(CheckpointCompressedTensors, GlmChannelShardedWithDenseMtpAndSharedExperts) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.model_type = "glm4_moe_lite";
  o.method = QuantMethod::CompressedTensors;
  o.scheme = ScaleKind::Channel;
  o.scale_dtype = DType::BF16;
  o.layers = 4;
  o.first_dense = 1;
  o.bf16_layers = {2};  // ignored with a re: entry
  o.shared = true;
  o.mtp = true;  // model.layers.4.*
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"), 2);
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  EXPECT_EQ(ck.moe_layers(), (std::vector<int64_t>{1, 2, 3}));

  const MoeLayerWeights w1 = ck.load_moe_layer(1);
  EXPECT_EQ(w1.routed.gate_up.spec.kind, ScaleKind::Channel);
  EXPECT_EQ(w1.routed.gate_up.scale.shape(), (Shape{4, 80, 1}));
  EXPECT_EQ(mismatches(w1, b), 0);
  ASSERT_TRUE(w1.shared.has_value());
  EXPECT_EQ(w1.shared->experts(), 1);
  EXPECT_EQ(mismatches(w1, b, /*shared=*/true), 0);
  expect_f32_equal(w1.router.correction_bias, b.tensors.at("model.layers.1.mlp.gate.e_score_correction_bias"));
  const RouterSpec r = w1.router.view();
  EXPECT_EQ(r.kind, RouterKind::SigmoidBiasTopK);
  EXPECT_DOUBLE_EQ(r.scaling, 1.8);
  EXPECT_TRUE(r.correction_bias.defined());

  const MoeLayerWeights w2 = ck.load_moe_layer(2);
  EXPECT_EQ(w2.routed.gate_up.spec.kind, ScaleKind::None);
  EXPECT_EQ(w2.shared->gate_up.spec.kind, ScaleKind::None);
  EXPECT_EQ(mismatches(w2, b), 0);
  EXPECT_EQ(mismatches(w2, b, true), 0);
  EXPECT_EQ(mismatches(ck.load_moe_layer(3), b), 0);

  expect_error([&] { ck.load_moe_layer(0); }, {"layer 0 is not a MoE layer", "dense"});
  expect_error([&] { ck.load_moe_layer(4); }, {"layer 4 is not a MoE layer", "beyond num_hidden_layers 4"});

  const InspectionReport rep = ck.inspect();
  EXPECT_TRUE(rep.ok()) << rep.str();
  ASSERT_EQ(rep.layers.size(), 5u);
  EXPECT_EQ(rep.layers[0].kind, LayerKind::Dense);
  EXPECT_EQ(rep.layers[1].kind, LayerKind::Moe);
  EXPECT_TRUE(rep.layers[1].shared_experts);
  EXPECT_EQ(rep.layers[1].projections.size(), 4u);
  EXPECT_EQ(rep.layers[4].kind, LayerKind::Skipped);
  EXPECT_TRUE(any_contains(rep.notes, "layer 4"));
  EXPECT_GT(rep.layers[4].bytes, 0);
}

struct StrategyCase {
  ScaleKind scheme;
  DType scale_dtype;
  bool rank0;
  const char* spec;  // expected gate_up ScaleSpec::str()
};

class CheckpointCompressedTensorsStrategy : public ::testing::TestWithParam<StrategyCase> {};

TEST_P(CheckpointCompressedTensorsStrategy, LoadsEveryElement) {
  const StrategyCase c = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.method = QuantMethod::CompressedTensors;
  o.scheme = c.scheme;
  o.scale_dtype = c.scale_dtype;
  o.rank0_tensor_scale = c.rank0;
  o.I = 72;
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  const MoeLayerWeights w = ck.load_moe_layer(0);
  EXPECT_EQ(w.routed.gate_up.spec.str(), c.spec);
  EXPECT_EQ(mismatches(w, b), 0);
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
}

INSTANTIATE_TEST_SUITE_P(Schemes, CheckpointCompressedTensorsStrategy,
                         ::testing::Values(StrategyCase{ScaleKind::Tensor, DType::F32, true, "tensor (2 segments)"},
                                           StrategyCase{ScaleKind::Tensor, DType::F16, false, "tensor (2 segments)"},
                                           StrategyCase{ScaleKind::Channel, DType::F16, false, "channel"},
                                           StrategyCase{ScaleKind::Block, DType::BF16, false, "block 32x32 (2 segments)"},
                                           StrategyCase{ScaleKind::Group, DType::F16, false, "group 32"}));

// ---------------------------------------------------------------------------------------------
// One Linear module (the Python loader's FP8 projections), the routed experts alone, the layout
// query, and stored copies: each against the builder's independent reference.
TEST(CheckpointParts, LinearRoutedOnlyLayoutAndStoredCopies) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.model_type = "glm4_moe_lite";
  o.method = QuantMethod::CompressedTensors;
  o.scheme = ScaleKind::Channel;
  o.scale_dtype = DType::BF16;
  o.shared = true;
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  const int64_t H = o.H, I = o.I;

  const LinearStack lin = ck.load_linear("model.layers.0.mlp.shared_experts.down_proj");
  const QuantTensor q = lin.weight.view();
  ASSERT_EQ(q.data.shape, (Shape{1, H, I}));
  EXPECT_EQ(q.spec.kind, ScaleKind::Channel);
  EXPECT_FALSE(lin.bias.defined());
  int64_t bad = 0;
  for (int64_t n = 0; n < H; ++n)
    for (int64_t k = 0; k < I; ++k) bad += q.at(0, n, k) != b.down(0, 0, n, k, /*shared=*/true);
  EXPECT_EQ(bad, 0);
  expect_error([&] { ck.load_linear("model.layers.0.self_attn.nothing"); }, {"model.layers.0.self_attn.nothing.weight"});

  const MoeLayerWeights all = ck.load_moe_layer(0);
  const MoeLayerWeights routed = ck.load_moe_layer(0, Checkpoint::Parts::RoutedExperts);
  EXPECT_EQ(mismatches(routed, b), 0);
  EXPECT_TRUE(all.shared.has_value());
  EXPECT_FALSE(routed.shared.has_value());
  EXPECT_FALSE(routed.router.weight.defined());
  EXPECT_EQ(ck.expert_layout(0), all.layout);

  const std::string fp8 = "model.layers.0.mlp.shared_experts.down_proj.weight";
  expect_bytes_equal(ck.load_stored(fp8), b.tensors.at(fp8));
  expect_error([&] { ck.load_tensor(fp8); }, {fp8, "load_linear"});
  const std::string norm = "model.layers.0.input_layernorm.weight";
  expect_bytes_equal(ck.load_tensor(norm), b.tensors.at(norm));
}

TEST(CheckpointFused, TransformersFusedBlockScales) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.layout = ExpertLayout::Fused;
  o.I = 64;  // a multiple of the 32 block: stacked block scales are valid
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  const MoeLayerWeights w = ck.load_moe_layer(0);
  EXPECT_EQ(w.layout, ExpertLayout::Fused);
  EXPECT_EQ(w.routed.gate_up.spec.str(), "block 32x32 (2 segments)");
  EXPECT_EQ(mismatches(w, b), 0);
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
}

// Trap 13: stacked block scales are refused when I is not a multiple of the block.
TEST(CheckpointFused, StackedBlockScalesNeedIMultipleOfBlock) {
  CkptOptions o;
  o.layout = ExpertLayout::Fused;
  o.I = 40;
  CkptBuilder b(o, fresh_seed());
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  expect_error([&] { ck.load_moe_layer(0); },
               {"model.layers.0.mlp.experts.gate_up_proj_scale_inv", "multiple of the block height 32"});
  EXPECT_TRUE(any_contains(ck.inspect().problems, "multiple of the block height"));
}

TEST(CheckpointFused, ChannelAndPerTensorScales) {
  for (const auto& [scheme, per_part, spec] :
       {std::tuple{ScaleKind::Channel, false, "channel"}, std::tuple{ScaleKind::Tensor, true, "tensor (2 segments)"},
        std::tuple{ScaleKind::Tensor, false, "tensor"}}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + ", " + spec);
    CkptOptions o;
    o.layout = ExpertLayout::Fused;
    o.method = QuantMethod::CompressedTensors;
    o.scheme = scheme;
    o.per_part_scales = per_part;
    CkptBuilder b(o, seed);
    TempDir d;
    b.write(d.file("ck"));
    const MoeLayerWeights w = Checkpoint::open(d.file("ck")).load_moe_layer(1);
    EXPECT_EQ(w.routed.gate_up.spec.str(), spec);
    EXPECT_EQ(mismatches(w, b), 0);
  }
}

// ---------------------------------------------------------------------------------------------
TEST(CheckpointGptOss, Bf16TransposedInterleavedWithBiases) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.model_type = "gpt_oss";
  o.method = QuantMethod::None;
  o.H = 96, o.I = 72;
  CkptBuilder b(o, seed);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  const MoeLayerWeights w = ck.load_moe_layer(1);
  EXPECT_EQ(w.layout, ExpertLayout::GptOss);
  EXPECT_EQ(w.routed.act.kind, Activation::GptOssGlu);
  EXPECT_EQ(w.routed.act.layout, GateUpLayout::Interleaved);
  EXPECT_FLOAT_EQ(w.routed.act.alpha, 1.702f);
  EXPECT_FLOAT_EQ(w.routed.act.limit, 7.0f);
  EXPECT_EQ(w.routed.gate_up.spec.kind, ScaleKind::None);
  EXPECT_EQ(mismatches(w, b), 0);
  expect_f32_equal(w.routed.gate_up_bias, b.tensors.at("model.layers.1.mlp.experts.gate_up_proj_bias"));
  expect_f32_equal(w.routed.down_bias, b.tensors.at("model.layers.1.mlp.experts.down_proj_bias"));
  expect_f32_equal(w.router.bias, b.tensors.at("model.layers.1.mlp.router.bias"));
  expect_bytes_equal(w.router.weight, b.tensors.at("model.layers.1.mlp.router.weight"));
  EXPECT_EQ(w.router.view().kind, RouterKind::TopKSoftmax);
  const ExpertWeights ev = w.routed.view();
  EXPECT_TRUE(ev.gate_up_bias.defined());
  EXPECT_EQ(ev.gate_up_bias.shape, (Shape{4, 144}));
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
}

TEST(CheckpointGptOss, Fp8ScalesLaidOnTheStoredOrientation) {
  for (const auto& [method, scheme, spec] :
       {std::tuple{QuantMethod::Fp8, ScaleKind::Block, "block 32x32"},
        std::tuple{QuantMethod::CompressedTensors, ScaleKind::Channel, "channel"},
        std::tuple{QuantMethod::CompressedTensors, ScaleKind::Tensor, "tensor"}}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + ", " + spec);
    CkptOptions o;
    o.model_type = "gpt_oss";
    o.method = method;
    o.scheme = scheme;
    o.H = 96, o.I = 72;  // stored gate_up [4, 96, 144]: a non-square 3 x 5 block grid
    CkptBuilder b(o, seed);
    TempDir d;
    b.write(d.file("ck"));
    const MoeLayerWeights w = Checkpoint::open(d.file("ck")).load_moe_layer(0);
    EXPECT_EQ(w.routed.gate_up.spec.str(), spec);
    EXPECT_EQ(w.routed.gate_up.data.shape(), (Shape{4, 144, 96}));
    EXPECT_EQ(mismatches(w, b), 0);
  }
}

// Mixtral names its MoE block block_sparse_moe and its projections w1 (gate), w3 (up), w2 (down).
TEST(CheckpointMixtral, BlockSparseMoeNaming) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  CkptBuilder b(o, seed);
  std::map<std::string, Tensor> renamed;
  for (auto& [name, t] : b.tensors) {
    std::string n = name;
    for (const auto& [from, to] : {std::pair{".mlp.", ".block_sparse_moe."}, std::pair{"gate_proj", "w1"},
                                   std::pair{"up_proj", "w3"}, std::pair{"down_proj", "w2"}})
      if (const size_t at = n.find(from); at != std::string::npos) n.replace(at, std::string(from).size(), to);
    renamed[n] = t;
  }
  b.tensors = renamed;
  b.config = {{"model_type", "mixtral"},     {"hidden_size", o.H},         {"intermediate_size", o.I},
              {"num_local_experts", o.E},    {"num_experts_per_tok", 2},   {"num_hidden_layers", o.layers},
              {"quantization_config", b.config["quantization_config"]}};
  b.config["quantization_config"]["modules_to_not_convert"] = {"lm_head"};
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  const MoeLayerWeights w = ck.load_moe_layer(1);
  EXPECT_EQ(mismatches(w, b), 0);
  expect_bytes_equal(w.router.weight, b.tensors.at("model.layers.1.block_sparse_moe.gate.weight"));
  EXPECT_TRUE(w.router.view().normalize);
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
}

// ---------------------------------------------------------------------------------------------
// A single .safetensors file without config.json: inspectable with inferred facts, not loadable.
TEST(CheckpointInspect, SingleFileWithoutConfig) {
  CkptOptions o;
  o.block = 128;
  o.H = 200, o.I = 72;
  CkptBuilder b(o, fresh_seed());
  TempDir d;
  b.write(d.file("ck"));
  std::filesystem::rename(d.file("ck/model.safetensors"), d.file("alone.safetensors"));
  const Checkpoint ck = Checkpoint::open(d.file("alone.safetensors"));
  EXPECT_FALSE(ck.config().has_value());
  EXPECT_EQ(ck.moe_layers(), (std::vector<int64_t>{0, 1}));
  const InspectionReport rep = ck.inspect();
  EXPECT_TRUE(rep.ok()) << rep.str();
  ASSERT_EQ(rep.layers.size(), 2u);
  EXPECT_EQ(rep.layers[0].experts, 4);
  EXPECT_EQ(rep.layers[0].projections[0].spec.str(), "block 128x128 (2 segments)");
  EXPECT_EQ(rep.layers[0].projections[0].shape, (Shape{4, 144, 200}));
  expect_error([&] { ck.load_moe_layer(0); }, {"needs config.json"});
}

TEST(CheckpointOpen, DirectoryNeedsConfigAndIndexStaysInside) {
  CkptOptions o;
  CkptBuilder b(o, fresh_seed());
  TempDir d;
  b.write(d.file("ck"), 2);
  std::filesystem::remove(d.file("ck/config.json"));
  expect_error([&] { Checkpoint::open(d.file("ck")); }, {"config.json", "missing"});

  b.write(d.file("escape"), 2);
  // A shard named outside the checkpoint directory, even one that exists.
  std::filesystem::copy_file(d.file("escape/" + CkptBuilder::shard_name(0, 2)), d.file("evil.safetensors"));
  std::ifstream in(d.file("escape/model.safetensors.index.json"));
  nlohmann::json index = nlohmann::json::parse(in);
  for (auto& [name, shard] : index["weight_map"].items())
    if (shard == CkptBuilder::shard_name(0, 2)) shard = "../evil.safetensors";
  std::ofstream(d.file("escape/model.safetensors.index.json")) << index.dump();
  expect_error([&] { Checkpoint::open(d.file("escape")); }, {"evil.safetensors", "inside the checkpoint directory"});
}

// ---------------------------------------------------------------------------------------------
// Broken checkpoints: each refused at load with a message naming the tensor, and reported by
// inspect() without throwing.
struct BrokenCase {
  const char* what;
  int64_t layer;
  std::function<void(CkptBuilder&)> mutate;
  std::vector<std::string> message;
  bool inspect_sees_it = true;  // value problems (NaN scales) are found only when loading
};

Tensor filled(DType dt, Shape s, double v) {
  Tensor t(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, v);
  return t;
}

const std::string kE = "model.layers.0.mlp.experts.";

std::vector<BrokenCase> broken_cases() {
  return {
      {"missing scale", 0, [](CkptBuilder& b) { b.tensors.erase(kE + "2.up_proj.weight_scale_inv"); },
       {kE + "2.up_proj.weight is F8_E4M3 but has no scale", "refusing"}},
      {"orphan scale", 0,
       [](CkptBuilder& b) { b.tensors[kE + "gate_up_proj_scale_inv"] = filled(DType::F32, Shape{4, 4, 3}, 0.01); },
       {"orphan scale " + kE + "gate_up_proj_scale_inv", "does not exist"}},
      {"two scales", 0,
       [](CkptBuilder& b) { b.tensors[kE + "1.gate_proj.weight_scale"] = b.tensors.at(kE + "1.gate_proj.weight_scale_inv"); },
       {kE + "1.gate_proj.weight has two scales"}},
      {"wrong scale shape", 0,
       [](CkptBuilder& b) { b.tensors[kE + "1.down_proj.weight_scale_inv"] = filled(DType::F32, Shape{3, 3}, 0.01); },
       {"scale " + kE + "1.down_proj.weight_scale_inv", "expected shape [3, 2]", "found [3, 3]"}},
      {"scale dtype I32", 0,
       [](CkptBuilder& b) { b.tensors[kE + "0.gate_proj.weight_scale_inv"] = Tensor::zeros(DType::I32, Shape{2, 3}); },
       {"scale " + kE + "0.gate_proj.weight_scale_inv", "expected dtype F32, BF16 or F16, found I32"}},
      {"scale dtype FP8", 0,
       [](CkptBuilder& b) { b.tensors[kE + "3.down_proj.weight_scale_inv"] = filled(DType::F8_E4M3, Shape{3, 2}, 1); },
       {"expected dtype F32, BF16 or F16, found F8_E4M3"}},
      {"FP8 codes without scales in a BF16 layer", 1,
       [](CkptBuilder& b) {
         for (int e = 0; e < 4; ++e)
           for (const char* p : {"gate_proj", "up_proj", "down_proj"}) {
             const std::string n = "model.layers.1.mlp.experts." + std::to_string(e) + "." + p + ".weight";
             b.tensors[n] = filled(DType::F8_E4M3, b.tensors.at(n).shape(), 2);
           }
       },
       {"model.layers.1.mlp.experts.0.gate_proj.weight is F8_E4M3 but has no scale", "refusing"}},
      {"BF16 weight with a scale", 1,
       [](CkptBuilder& b) {
         b.tensors["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"] = filled(DType::F32, Shape{3, 2}, 0.01);
       },
       {"model.layers.1.mlp.experts.2.down_proj.weight is BF16 but has a scale"}},
      {"FP8 in a module the config excludes", 0,
       [](CkptBuilder& b) {
         b.config["quantization_config"]["modules_to_not_convert"].push_back("model.layers.0.mlp.experts");
       },
       {"excludes module model.layers.0.mlp.experts.0.gate_proj"}},
      {"missing expert", 0,
       [](CkptBuilder& b) {
         b.tensors.erase(kE + "3.down_proj.weight");
         b.tensors.erase(kE + "3.down_proj.weight_scale_inv");
       },
       {"missing tensor " + kE + "3.down_proj.weight", "E 4, I 40, H 96"}},
      {"extra expert", 0,
       [](CkptBuilder& b) { b.tensors[kE + "4.gate_proj.weight"] = b.tensors.at(kE + "0.gate_proj.weight"); },
       {kE + "4.gate_proj.weight", "expert index 4 is out of range", "4 experts"}},
      {"experts of mixed dtype", 0,
       [](CkptBuilder& b) {
         for (const char* p : {"gate_proj", "up_proj"}) {
           const std::string n = kE + "2." + p + ".weight";
           b.tensors[n] = filled(DType::BF16, b.tensors.at(n).shape(), 0.5);
           b.tensors.erase(n + "_scale_inv");
         }
       },
       {kE + "2.gate_proj.weight", "must share dtype and scale scheme", "found BF16, none"}},
      {"gate and up of mixed dtype", 0,
       [](CkptBuilder& b) {
         b.tensors[kE + "1.up_proj.weight"] = filled(DType::BF16, Shape{40, 96}, 0.5);
         b.tensors.erase(kE + "1.up_proj.weight_scale_inv");
       },
       {kE + "1.up_proj.weight", "gate and up stack into one gate_up"}},
      {"wrong weight shape", 0,
       [](CkptBuilder& b) { b.tensors[kE + "0.down_proj.weight"] = filled(DType::F8_E4M3, Shape{96, 41}, 1); },
       {"tensor " + kE + "0.down_proj.weight", "expected shape [96, 40]", "found [96, 41]"}},
      {"static input scale", 0,
       [](CkptBuilder& b) { b.tensors[kE + "0.gate_proj.input_scale"] = filled(DType::F32, Shape{1}, 0.1); },
       {kE + "0.gate_proj.input_scale", "static activation scales"}},
      {"missing router", 0, [](CkptBuilder& b) { b.tensors.erase("model.layers.0.mlp.gate.weight"); },
       {"missing tensor model.layers.0.mlp.gate.weight"}},
      {"NaN scale", 0,
       [](CkptBuilder& b) {
         Tensor s = filled(DType::F32, Shape{2, 3}, 0.01);
         s.ptr<float>()[4] = std::numeric_limits<float>::quiet_NaN();
         b.tensors[kE + "2.gate_proj.weight_scale_inv"] = s;
       },
       {"scale " + kE + "2.gate_proj.weight_scale_inv", "element 4", "must be finite"}, false},
  };
}

TEST(CheckpointBroken, EachVariantIsRefusedByName) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir d;
  int i = 0;
  for (const BrokenCase& c : broken_cases()) {
    SCOPED_TRACE(c.what);
    CkptOptions o;
    o.bf16_layers = {1};
    CkptBuilder b(o, seed);
    c.mutate(b);
    const std::string dir = d.file("broken" + std::to_string(i++));
    b.write(dir);
    const Checkpoint ck = Checkpoint::open(dir);
    expect_error([&] { ck.load_moe_layer(c.layer); }, c.message);
    const InspectionReport rep = ck.inspect();
    EXPECT_EQ(rep.ok(), !c.inspect_sees_it) << rep.str();
    if (c.inspect_sees_it) EXPECT_TRUE(any_contains(rep.problems, c.message.front())) << rep.str();
  }
}

// Outside the experts, the per-tensor rule still holds: inspect() reports an FP8 attention weight
// without its scale and a scale whose weight is gone.
TEST(CheckpointInspect, ReportsProblemsOutsideTheExperts) {
  CkptOptions o;
  CkptBuilder b(o, fresh_seed());
  b.tensors.erase("model.layers.0.self_attn.o_proj.weight_scale_inv");
  b.tensors.erase("model.layers.1.self_attn.o_proj.weight");
  TempDir d;
  b.write(d.file("ck"));
  const InspectionReport rep = Checkpoint::open(d.file("ck")).inspect();
  EXPECT_FALSE(rep.ok());
  EXPECT_TRUE(any_contains(rep.problems, "model.layers.0.self_attn.o_proj.weight is F8_E4M3 but has no scale"))
      << rep.str();
  EXPECT_TRUE(any_contains(rep.problems, "orphan scale model.layers.1.self_attn.o_proj.weight_scale_inv")) << rep.str();
}

}  // namespace
}  // namespace fp8moe

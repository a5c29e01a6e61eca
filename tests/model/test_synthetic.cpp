// Synthetic checkpoints (src/model/synthetic.cpp): the tensor names and configs the loader and
// converter expect, random non-zero weights, a seed that replays them, and a shard split that does
// not change the values.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>

#include "formats/safetensors_test_util.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/synthetic.hpp"
#include "test_support.hpp"

using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

// Byte-exact equality of two tensor views.
bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.dtype == b.dtype && a.shape == b.shape && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

// Mean and standard deviation of a float tensor.
std::pair<double, double> moments(const TensorView& t) {
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = load_as_double(t.data, t.dtype, i);
    s += v;
    s2 += v * v;
  }
  const double n = static_cast<double>(t.numel()), mean = s / n;
  return {mean, std::sqrt(std::max(0.0, s2 / n - mean * mean))};
}

TEST(SyntheticTest, GlmShapeNamesAndConfig) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = seed;
  const SyntheticInfo info = write_synthetic_checkpoint(dir.file("glm"), spec);
  EXPECT_EQ(info.seed, seed);

  const ModelConfig cfg = load_model_config(dir.file("glm/config.json"));
  EXPECT_EQ(cfg.model_type, "glm4_moe_lite");
  EXPECT_EQ(cfg.hidden_size, spec.hidden);
  EXPECT_EQ(cfg.moe_intermediate_size, spec.moe_intermediate);
  EXPECT_EQ(cfg.num_experts, spec.experts);
  EXPECT_EQ(cfg.top_k, spec.top_k);
  EXPECT_EQ(cfg.router, RouterKind::SigmoidBiasTopK);
  EXPECT_EQ(cfg.moe_layers(), (std::vector<int64_t>{1, 2}));  // layer 0 dense; MTP layer 3 not part of the model
  EXPECT_FALSE(fs::exists(dir.file("glm/model.safetensors.index.json")));

  const TensorStore st = TensorStore::open(dir.file("glm"));
  EXPECT_EQ(static_cast<int64_t>(st.names().size()), info.tensors);
  const int64_t H = spec.hidden, I = spec.moe_intermediate, E = spec.experts;
  EXPECT_EQ(st.entry("model.layers.0.mlp.gate_proj.weight").shape, (Shape{spec.dense_intermediate, H}));
  EXPECT_FALSE(st.contains("model.layers.0.mlp.gate.weight"));
  for (int64_t l : {1, 2, 3}) {  // 3 = the MTP layer
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    SCOPED_TRACE(p);
    EXPECT_EQ(st.entry(p + "gate.weight").shape, (Shape{E, H}));
    EXPECT_EQ(st.entry(p + "gate.weight").dtype, DType::BF16);
    EXPECT_EQ(st.entry(p + "gate.e_score_correction_bias").shape, (Shape{E}));
    EXPECT_EQ(st.entry(p + "gate.e_score_correction_bias").dtype, DType::F32);
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = p + "experts." + std::to_string(e) + ".";
      EXPECT_EQ(st.entry(x + "gate_proj.weight").shape, (Shape{I, H}));
      EXPECT_EQ(st.entry(x + "up_proj.weight").shape, (Shape{I, H}));
      EXPECT_EQ(st.entry(x + "down_proj.weight").shape, (Shape{H, I}));
    }
    EXPECT_EQ(st.entry(p + "shared_experts.gate_proj.weight").shape, (Shape{I * spec.shared_experts, H}));
    EXPECT_EQ(st.entry(p + "shared_experts.down_proj.weight").shape, (Shape{H, I * spec.shared_experts}));
  }
  for (const char* n : {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
                        "model.layers.3.shared_head.head.weight", "model.layers.1.self_attn.q_a_proj.weight",
                        "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(st.contains(n)) << n;
  EXPECT_FALSE(st.contains("model.layers.4.mlp.gate.weight"));

  // Random, never zero: every tensor has spread; Linear weights have std ~ 1/sqrt(fan_in).
  for (const std::string& n : st.names()) {
    const TensorView t = st.view(n);
    const auto [mean, sd] = moments(t);
    EXPECT_GT(sd, 0.0) << n;
    if (t.rank() == 2) {
      const double want = 1.0 / std::sqrt(static_cast<double>(t.size(1)));
      EXPECT_NEAR(sd, want, 0.25 * want) << n;
    }
    if (n.find("norm") != std::string::npos) EXPECT_NEAR(mean, 1.0, 0.05) << n;
  }
}

TEST(SyntheticTest, QwenAllLayersMoeAndLoadable) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();
  spec.seed = seed;
  write_synthetic_checkpoint(dir.file("qwen"), spec);

  const Checkpoint ck = Checkpoint::open(dir.file("qwen"));
  ASSERT_TRUE(ck.config().has_value());
  EXPECT_EQ(ck.config()->model_type, "qwen3_moe");
  EXPECT_EQ(ck.config()->router, RouterKind::SoftmaxTopK);
  EXPECT_EQ(ck.moe_layers(), (std::vector<int64_t>{0, 1}));
  EXPECT_FALSE(ck.store().contains("model.layers.0.mlp.gate.e_score_correction_bias"));
  EXPECT_FALSE(ck.store().contains("model.layers.0.mlp.shared_experts.gate_proj.weight"));
  EXPECT_TRUE(ck.store().contains("model.layers.1.self_attn.q_norm.weight"));
  const InspectionReport rep = ck.inspect();
  EXPECT_TRUE(rep.ok()) << rep.str();

  // The loader stacks expert e's gate rows first, then up, exactly as stored.
  const MoeLayerWeights w = ck.load_moe_layer(1);
  const int64_t I = spec.moe_intermediate, H = spec.hidden;
  EXPECT_EQ(w.routed.gate_up.data.shape(), (Shape{spec.experts, 2 * I, H}));
  EXPECT_FALSE(w.routed.gate_up.view().quantized());
  const int64_t e = spec.experts - 1;
  const TensorView up = ck.store().view("model.layers.1.mlp.experts." + std::to_string(e) + ".up_proj.weight");
  const TensorView stacked = w.routed.gate_up.data.view().select0(e);
  for (int64_t j = 0; j < I; j += 17)
    for (int64_t k = 0; k < H; k += 13)
      ASSERT_EQ(load_as_double(stacked.data, stacked.dtype, (I + j) * H + k), load_as_double(up.data, up.dtype, j * H + k));
}

TEST(SyntheticTest, ShardsKeepValuesAndSeedReplays) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = seed;
  write_synthetic_checkpoint(dir.file("one"), spec);
  spec.shards = 3;
  const SyntheticInfo sharded = write_synthetic_checkpoint(dir.file("three"), spec);
  spec.shards = 1;
  spec.seed = seed + 1;
  write_synthetic_checkpoint(dir.file("other"), spec);

  EXPECT_TRUE(fs::exists(dir.file("three/model.safetensors.index.json")));
  for (const char* f : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                        "model-00003-of-00003.safetensors"})
    EXPECT_TRUE(fs::exists(dir.path() / "three" / f)) << f;
  const TensorStore one = TensorStore::open(dir.file("one"));
  const TensorStore three = TensorStore::open(dir.file("three"));
  const TensorStore other = TensorStore::open(dir.file("other"));
  EXPECT_EQ(three.files().size(), 3u);
  for (const auto& f : three.files()) EXPECT_FALSE(f->names().empty());
  ASSERT_EQ(one.names(), three.names());
  EXPECT_EQ(static_cast<int64_t>(three.names().size()), sharded.tensors);
  int64_t differing = 0;
  for (const std::string& n : one.names()) {
    EXPECT_TRUE(same_bytes(one.view(n), three.view(n))) << n;
    differing += !same_bytes(one.view(n), other.view(n));
  }
  EXPECT_EQ(differing, static_cast<int64_t>(one.names().size())) << "another seed must change every tensor";
}

TEST(SyntheticTest, RejectsBadSpecsAndOccupiedDirectories) {
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();
  spec.top_k = spec.experts + 1;
  EXPECT_THROW(write_synthetic_checkpoint(dir.file("a"), spec), Error);
  spec = SyntheticSpec::glm4_moe_lite();
  spec.first_dense = spec.layers;  // no MoE layer left
  EXPECT_THROW(write_synthetic_checkpoint(dir.file("b"), spec), Error);
  spec = SyntheticSpec::qwen3_moe();
  write_synthetic_checkpoint(dir.file("c"), spec);
  try {
    write_synthetic_checkpoint(dir.file("c"), spec);
    FAIL() << "a second write into a non-empty directory must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("empty directory"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fp8moe

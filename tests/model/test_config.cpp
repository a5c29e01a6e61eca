// config.json parsing (src/model/config.cpp) on Qwen3-, GLM-4.7-Flash- and GPT-OSS-shaped
// configs with their real field names.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <string>

#include "formats/safetensors_test_util.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/synthetic.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;
using fp8moe::test::replace_once;

namespace fp8moe {
namespace {


// Qwen3-30B-A3B (second-hand config, formats.md section 3), trimmed to the MoE fields.
const char* kQwen3 = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
  "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
  "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
  "num_hidden_layers": 48, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936
})";

const char* kGlm = R"({
  "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
  "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
  "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4,
  "num_hidden_layers": 47, "first_k_dense_replace": 1, "routed_scaling_factor": 1.8,
  "norm_topk_prob": true, "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 1
})";

const char* kGptOss = R"({
  "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
  "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
  "num_experts_per_tok": 4, "experts_per_token": 4, "num_hidden_layers": 24, "swiglu_limit": 7.0
})";

TEST(ConfigQwen3, FieldsAndAllLayersMoe) {
  const ModelConfig c = parse_model_config(kQwen3, "qwen/config.json");
  EXPECT_EQ(c.model_type, "qwen3_moe");
  EXPECT_EQ(c.architectures, std::vector<std::string>{"Qwen3MoeForCausalLM"});
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.moe_intermediate_size, 768);  // not intermediate_size (dense)
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.moe_layers().size(), 48u);
  EXPECT_FALSE(c.is_moe_layer(48));
  const RouterSpec r = c.router_spec();
  EXPECT_EQ(r.kind, RouterKind::SoftmaxTopK);
  EXPECT_EQ(r.top_k, 8);
  EXPECT_EQ(c.act.kind, Activation::SiluGlu);
  EXPECT_EQ(c.act.layout, GateUpLayout::Halves);
  EXPECT_EQ(c.n_shared_experts, 0);
}

TEST(ConfigQwen3, SparseStepAndMlpOnlyLayers) {
  std::string j = kQwen3;
  replace_once(j, "\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2");
  replace_once(j, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [5]");
  const ModelConfig c = parse_model_config(j, "cfg");
  // MoE iff L not in mlp_only_layers and (L + 1) % 2 == 0: 1, 3, 7, 9, ... (5 is dense)
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(3));
  EXPECT_FALSE(c.is_moe_layer(5));
  EXPECT_TRUE(c.is_moe_layer(7));
  EXPECT_EQ(c.moe_layers().size(), 23u);
}

TEST(ConfigGlm, DenseFirstLayerMtpAndSigmoidRouter) {
  const ModelConfig c = parse_model_config(kGlm, "glm/config.json");
  EXPECT_EQ(c.num_experts, 64);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.moe_intermediate_size, 1536);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.shared_intermediate_size, 1536);
  EXPECT_FALSE(c.is_moe_layer(0));  // first_k_dense_replace 1
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(46));
  EXPECT_FALSE(c.is_moe_layer(47));  // the MTP layer model.layers.47.* is not part of the model
  EXPECT_EQ(c.moe_layers().size(), 46u);
  const RouterSpec r = c.router_spec();
  EXPECT_EQ(r.kind, RouterKind::SigmoidBiasTopK);
  EXPECT_DOUBLE_EQ(r.scaling, 1.8);
  EXPECT_TRUE(r.normalize);
}

// What transformers 5.x writes for GLM-4.7-Flash (save_pretrained, llmcompressor): the layer kinds
// as mlp_layer_types, and no first_k_dense_replace.
std::string glm_v5(const std::string& types) {
  std::string j = kGlm;
  replace_once(j, "\"first_k_dense_replace\": 1, ", "\"mlp_layer_types\": " + types + ", ");
  return j;
}
std::string dense_first(int dense, int layers) {
  std::string s = "[";
  for (int l = 0; l < layers; ++l) s += std::string(l ? ", " : "") + (l < dense ? "\"dense\"" : "\"sparse\"");
  return s + "]";
}

TEST(ConfigGlm, Transformers5MlpLayerTypes) {
  const ModelConfig c = parse_model_config(glm_v5(dense_first(1, 47)), "glm5/config.json");
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(46));
  EXPECT_FALSE(c.is_moe_layer(47));
  EXPECT_EQ(c.moe_layers().size(), 46u);

  // Any pattern, not only a dense prefix.
  std::string types = dense_first(1, 47);
  replace_once(types, "\"dense\", \"sparse\", \"sparse\", \"sparse\"", "\"dense\", \"sparse\", \"sparse\", \"dense\"");
  const ModelConfig d = parse_model_config(glm_v5(types), "c.json");
  EXPECT_TRUE(d.is_moe_layer(2));
  EXPECT_FALSE(d.is_moe_layer(3));
  EXPECT_EQ(d.moe_layers().size(), 45u);
}

TEST(ConfigGlm, BothLayerKeysMustAgree) {
  std::string j = kGlm;  // first_k_dense_replace 1
  replace_once(j, "\"num_hidden_layers\": 47,", "\"num_hidden_layers\": 47, \"mlp_layer_types\": " + dense_first(1, 47) + ",");
  EXPECT_EQ(parse_model_config(j, "c.json").moe_layers().size(), 46u);
  j = kGlm;
  replace_once(j, "\"num_hidden_layers\": 47,", "\"num_hidden_layers\": 47, \"mlp_layer_types\": " + dense_first(2, 47) + ",");
  expect_error([&] { parse_model_config(j, "c.json"); },
               {"c.json", "mlp_layer_types makes layer 1 \"dense\"", "first_k_dense_replace 1", "must agree"});
}

TEST(ConfigGlm, MalformedMlpLayerTypesAreNamed) {
  expect_error([&] { parse_model_config(glm_v5(dense_first(1, 46)), "c.json"); },
               {"c.json", "mlp_layer_types", "one entry per layer", "47"});
  std::string types = dense_first(1, 47);
  replace_once(types, "\"dense\"", "\"moe\"");
  expect_error([&] { parse_model_config(glm_v5(types), "c.json"); }, {"mlp_layer_types[0]", "\"moe\""});
}

// With neither key, transformers' per-type default: glm4_moe_lite / glm4_moe one dense layer,
// deepseek_v3 three (not "every layer MoE", which refused real checkpoints).
TEST(ConfigGlm, AbsentLayerKeysTakeTransformersDefaults) {
  std::string j = kGlm;
  replace_once(j, "\"first_k_dense_replace\": 1, ", "");
  EXPECT_FALSE(parse_model_config(j, "c.json").is_moe_layer(0));
  EXPECT_TRUE(parse_model_config(j, "c.json").is_moe_layer(1));
  replace_once(j, "\"glm4_moe_lite\"", "\"deepseek_v3\"");
  const ModelConfig d = parse_model_config(j, "c.json");
  EXPECT_FALSE(d.is_moe_layer(2));
  EXPECT_TRUE(d.is_moe_layer(3));
}

// The issue's case end to end: a GLM checkpoint whose config.json was re-saved by transformers 5.x
// inspects clean and loads its first MoE layer (it used to ask for layer 0's experts).
TEST(ConfigGlm, Transformers5CheckpointLoads) {
  testing::TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = test::fresh_seed();
  spec.layers = 4;
  spec.first_dense = 2;  // not the default of 1: only mlp_layer_types says so
  write_synthetic_checkpoint(dir.file("glm"), spec);
  const std::string cfg_path = dir.file("glm/config.json");
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(testing::read_file(cfg_path));
  cfg.erase("first_k_dense_replace");
  cfg["mlp_layer_types"] = nlohmann::json::array();
  for (int64_t l = 0; l < spec.layers; ++l) cfg["mlp_layer_types"].push_back(l < spec.first_dense ? "dense" : "sparse");
  testing::write_file(cfg_path, cfg.dump(2));
  const Checkpoint ck = Checkpoint::open(dir.file("glm"));
  const InspectionReport r = ck.inspect();
  EXPECT_TRUE(r.ok()) << r.str();
  EXPECT_EQ(ck.moe_layers().front(), spec.first_dense);
  EXPECT_EQ(ck.load_moe_layer(spec.first_dense).routed.experts(), spec.experts);
}

TEST(ConfigGptOss, InterleavedClampedActivation) {
  const ModelConfig c = parse_model_config(kGptOss, "gpt/config.json");
  EXPECT_EQ(c.num_experts, 32);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.moe_intermediate_size, 2880);  // GPT-OSS names it intermediate_size
  EXPECT_EQ(c.moe_layers().size(), 24u);
  EXPECT_EQ(c.router, RouterKind::TopKSoftmax);
  EXPECT_EQ(c.act.kind, Activation::GptOssGlu);
  EXPECT_EQ(c.act.layout, GateUpLayout::Interleaved);
  EXPECT_FLOAT_EQ(c.act.alpha, 1.702f);
  EXPECT_FLOAT_EQ(c.act.limit, 7.0f);

  std::string j = kGptOss;
  replace_once(j, ", \"swiglu_limit\": 7.0", "");
  replace_once(j, "\"num_experts_per_tok\": 4, ", "");
  const ModelConfig d = parse_model_config(j, "cfg");
  EXPECT_FLOAT_EQ(d.act.limit, 7.0f);  // default
  EXPECT_EQ(d.top_k, 4);               // from experts_per_token

  // transformers 5.x states the GLU's alpha as swiglu_alpha.
  replace_once(j, "\"num_hidden_layers\": 24", "\"num_hidden_layers\": 24, \"swiglu_alpha\": 1.5");
  EXPECT_FLOAT_EQ(parse_model_config(j, "cfg").act.alpha, 1.5f);
}

TEST(ConfigErrors, MissingOrInvalidFieldsNameFileAndField) {
  std::string j = kGlm;
  replace_once(j, "\"n_routed_experts\": 64, ", "");
  expect_error([&] { parse_model_config(j, "glm/config.json"); },
               {"glm/config.json", "num_experts | n_routed_experts | num_local_experts", "missing"});
  j = kGlm;
  replace_once(j, "\"routed_scaling_factor\": 1.8,", "");
  expect_error([&] { parse_model_config(j, "c.json"); }, {"c.json", "routed_scaling_factor"});
  j = kQwen3;
  replace_once(j, "\"hidden_size\": 2048", "\"hidden_size\": \"2048\"");
  expect_error([&] { parse_model_config(j, "c.json"); }, {"hidden_size", "must be an integer"});
  expect_error([&] { parse_model_config(R"({"model_type": "llama", "hidden_size": 8})", "l.json"); },
               {"l.json", "model_type \"llama\" is not supported"});
  expect_error([&] { parse_model_config("{not json", "bad.json"); }, {"bad.json", "not valid JSON"});
  j = kQwen3;
  replace_once(j, "\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 200");
  expect_error([&] { parse_model_config(j, "c.json"); }, {"experts per token must be in [1, 128]"});
}

TEST(ConfigErrors, GroupLimitedRoutingIsRefused) {
  std::string j = kGlm;
  replace_once(j, "\"n_group\": 1, \"topk_group\": 1", "\"n_group\": 8, \"topk_group\": 4");
  const ModelConfig c = parse_model_config(j, "ds.json");
  expect_error([&] { c.router_spec(); }, {"ds.json", "group-limited routing"});
}

}  // namespace
}  // namespace fp8moe

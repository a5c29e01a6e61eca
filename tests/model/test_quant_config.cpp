// quantization_config parsing (src/model/quant_config.cpp): both families, module matching as
// each producer does it, and clear errors for unsupported settings.
#include <gtest/gtest.h>

#include <string>

#include "fp8moe/checkpoint.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;
using fp8moe::test::replace_once;

namespace fp8moe {
namespace {


const char* kFp8 = R"({"model_type": "qwen3_moe", "quantization_config": {
  "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "model.layers.3.mlp.experts", "mlp.gate"]}})";

// GLM-4.7-Flash-FP8-Dynamic style (the FP8_DYNAMIC preset).
const char* kCt = R"({"model_type": "glm4_moe_lite", "quantization_config": {
  "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
  "config_groups": {"group_0": {"targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true, "symmetric": true}}},
  "ignore": ["lm_head", "re:.*mlp\\.gate$", "re:model\\.layers\\.(5|9)\\.mlp\\.experts\\.", "model.layers.0.mlp.down_proj"]}})";

TEST(QuantConfigNone, AbsentMeansPlain) {
  const QuantConfig q = parse_quant_config(R"({"model_type": "qwen3_moe"})", "c.json");
  EXPECT_EQ(q.method, QuantMethod::None);
  EXPECT_EQ(q.scheme_for("model.layers.0.mlp.experts.0.gate_proj").kind, ScaleKind::None);
  EXPECT_FALSE(q.excluded("lm_head"));
}

TEST(QuantConfigFp8, BlockSchemeAndModulesToNotConvert) {
  const QuantConfig q = parse_quant_config(kFp8, "q.json");
  EXPECT_EQ(q.method, QuantMethod::Fp8);
  EXPECT_EQ(q.activation_scheme, "dynamic");
  const WeightQuantScheme s = q.scheme_for("model.layers.0.mlp.experts.7.down_proj");
  EXPECT_EQ(s.kind, ScaleKind::Block);
  EXPECT_EQ(s.block_n, 128);
  EXPECT_EQ(s.block_k, 128);
  EXPECT_EQ(s.dtype, DType::F8_E4M3);
  EXPECT_EQ(s.str(), "block 128x128");
  const ScaleSpec spec = s.spec(768, 2048);
  EXPECT_EQ(spec.scale_rows(), 6);
  EXPECT_EQ(spec.grid_k(), 16);
  // transformers: re.match(entry, name) (a prefix) or name.endswith(entry)
  EXPECT_TRUE(q.excluded("lm_head"));
  EXPECT_TRUE(q.excluded("model.layers.3.mlp.experts.0.gate_proj"));
  EXPECT_FALSE(q.excluded("model.layers.31.mlp.experts.0.gate_proj"));
  EXPECT_TRUE(q.excluded("model.layers.12.mlp.gate"));  // suffix
  EXPECT_FALSE(q.excluded("model.layers.12.mlp.gate_proj"));
  EXPECT_EQ(q.scheme_for("model.layers.3.mlp.experts.0.up_proj").kind, ScaleKind::None);

  std::string j = kFp8;
  replace_once(j, R"("weight_block_size": [128, 128], )", "");
  EXPECT_EQ(parse_quant_config(j, "q.json").fp8_weights.block_n, 128);  // transformers' default
  j = kFp8;
  replace_once(j, "[128, 128]", "[64, 32]");
  replace_once(j, "e4m3", "e5m2");
  const QuantConfig r = parse_quant_config(j, "q.json");
  EXPECT_EQ(r.fp8_weights.str(), "block 64x32");
  EXPECT_EQ(r.fp8_weights.dtype, DType::F8_E5M2);
}

TEST(QuantConfigCompressedTensors, ChannelGroupAndIgnoreList) {
  const QuantConfig q = parse_quant_config(kCt, "glm.json");
  EXPECT_EQ(q.method, QuantMethod::CompressedTensors);
  EXPECT_EQ(q.format, "float-quantized");
  EXPECT_EQ(q.quantization_status, "compressed");
  ASSERT_EQ(q.groups.size(), 1u);
  EXPECT_EQ(q.groups[0].name, "group_0");
  EXPECT_EQ(q.groups[0].activation_strategy, "token");
  EXPECT_EQ(q.scheme_for("model.layers.1.mlp.experts.0.gate_proj").kind, ScaleKind::Channel);
  EXPECT_EQ(q.scheme_for("model.layers.1.mlp.shared_experts.down_proj").kind, ScaleKind::Channel);
  // exact entries
  EXPECT_TRUE(q.excluded("lm_head"));
  EXPECT_TRUE(q.excluded("model.layers.0.mlp.down_proj"));
  EXPECT_FALSE(q.excluded("model.layers.0.mlp.up_proj"));
  // "re:" entries use re.match: anchored at the start, not a full match
  EXPECT_TRUE(q.excluded("model.layers.5.mlp.experts.12.gate_proj"));
  EXPECT_TRUE(q.excluded("model.layers.9.mlp.experts.0.down_proj"));
  EXPECT_FALSE(q.excluded("model.layers.59.mlp.experts.0.down_proj"));
  EXPECT_FALSE(q.excluded("xmodel.layers.5.mlp.experts.0.down_proj"));
  EXPECT_TRUE(q.excluded("model.layers.2.mlp.gate"));
  EXPECT_FALSE(q.excluded("model.layers.2.mlp.gate_proj"));  // `$` anchors the end
  EXPECT_EQ(q.scheme_for("model.layers.5.mlp.experts.12.gate_proj").kind, ScaleKind::None);
}

TEST(QuantConfigCompressedTensors, BlockTensorGroupStrategiesAndTargets) {
  std::string j = kCt;
  replace_once(j, R"("strategy": "channel")", R"("strategy": "block", "block_structure": [128, 64])");
  EXPECT_EQ(parse_quant_config(j, "c").scheme_for("x.experts.0.gate_proj").str(), "block 128x64");
  j = kCt;
  replace_once(j, R"("strategy": "channel")", R"("strategy": "block", "block_structure": "32x16")");
  EXPECT_EQ(parse_quant_config(j, "c").scheme_for("x.experts.0.gate_proj").str(), "block 32x16");
  j = kCt;
  replace_once(j, R"("strategy": "channel")", R"("strategy": "group", "group_size": 64)");
  EXPECT_EQ(parse_quant_config(j, "c").scheme_for("m.experts.0.up_proj").str(), "group 64");
  j = kCt;
  replace_once(j, R"("strategy": "channel")", R"("strategy": "tensor")");
  EXPECT_EQ(parse_quant_config(j, "c").scheme_for("m").kind, ScaleKind::Tensor);
  // Targets by regex instead of class: only matching modules get a scheme.
  j = kCt;
  replace_once(j, R"("targets": ["Linear"])", R"("targets": ["re:.*experts.*"])");
  const QuantConfig q = parse_quant_config(j, "c");
  EXPECT_EQ(q.scheme_for("model.layers.1.mlp.experts.0.gate_proj").kind, ScaleKind::Channel);
  EXPECT_EQ(q.scheme_for("model.layers.1.self_attn.q_proj").kind, ScaleKind::None);
}

TEST(QuantConfigErrors, UnsupportedSettingsAreRefusedByName) {
  struct Case {
    const char* from;
    const char* to;
    std::vector<std::string> message;
  };
  const std::vector<Case> cases = {
      {R"("weights": {"num_bits": 8)", R"("weights": {"num_bits": 4)", {"weights", "only num_bits 8"}},
      {R"("type": "float", "strategy": "channel")", R"("type": "int", "strategy": "channel")", {"only type \"float\""}},
      {R"("symmetric": true, "dynamic": false)", R"("symmetric": false, "dynamic": false)", {"only symmetric"}},
      {R"("strategy": "channel")", R"("strategy": "tensor_group")", {"strategy \"tensor_group\" is not supported"}},
      {R"("strategy": "channel")", R"("strategy": "block")", {"strategy block needs block_structure"}},
      {R"("strategy": "channel")", R"("strategy": "group")", {"positive group_size"}},
      {R"("format": "float-quantized")", R"("format": "pack-quantized")", {"format \"pack-quantized\" is not supported"}},
      {R"("strategy": "token", "dynamic": true)", R"("strategy": "tensor", "dynamic": false)", {"static activation scales"}},
      {R"("quant_method": "compressed-tensors")", R"("quant_method": "awq")", {"quant_method \"awq\" is not supported"}},
      {R"("re:.*mlp\\.gate$")", R"("re:(unclosed")", {"ignore entry \"(unclosed\""}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.to);
    std::string j = kCt;
    replace_once(j, c.from, c.to);
    std::vector<std::string> parts = c.message;
    parts.push_back("glm.json");
    expect_error([&] { parse_quant_config(j, "glm.json"); }, parts);
  }
  std::string j = kFp8;
  replace_once(j, R"("activation_scheme": "dynamic")", R"("activation_scheme": "static")");
  expect_error([&] { parse_quant_config(j, "q.json"); }, {"q.json", "activation_scheme \"static\" is not supported"});
  j = kFp8;
  replace_once(j, "e4m3", "e3m4");
  expect_error([&] { parse_quant_config(j, "q.json"); }, {"fmt \"e3m4\""});
}

}  // namespace
}  // namespace fp8moe

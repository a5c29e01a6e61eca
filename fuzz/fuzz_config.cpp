// libFuzzer target: config.json (parse_model_config) and both quantization-config readers
// (parse_quant_config: "fp8" and "compressed-tensors"), on any text.
//
// Properties: each reader either refuses the text with fp8moe::Error or returns a config whose
// every use is bounded and consistent - the MoE layers are valid ascending indices below
// num_hidden_layers, is_moe_layer agrees with them, and the declared weight scheme of any
// expert module gives a ScaleSpec that validates on the shapes a checkpoint of that config has.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "fuzz_util.hpp"

namespace fp8moe::fuzz {
namespace {

void check_model_config(const ModelConfig& c) {
  const std::vector<int64_t> layers = c.moe_layers();
  int64_t previous = -1;
  for (int64_t l : layers) {
    if (l <= previous || l >= c.num_hidden_layers || !c.is_moe_layer(l)) fuzz_fail("moe_layers() is inconsistent");
    previous = l;
  }
  if (c.is_moe_layer(-1) || c.is_moe_layer(c.num_hidden_layers)) fuzz_fail("is_moe_layer outside the layers");
  try {
    const RouterSpec r = c.router_spec();
    if (r.top_k < 1 || r.top_k > c.num_experts) fuzz_fail("router_spec: top_k outside [1, E]");
  } catch (const Error&) {
    // group-limited routing: refused by name
  }
}

void check_quant_config(const QuantConfig& q, const ModelConfig* c) {
  const int64_t H = c ? c->hidden_size : 2048, I = c ? c->moe_intermediate_size : 768;
  const std::string p = "model.layers.1.mlp.";
  const std::string modules[] = {p + "experts.0.gate_proj", p + "experts.7.down_proj", p + "experts.gate_up_proj",
                                 p + "shared_experts.up_proj", p + "gate", "model.layers.0.self_attn.o_proj",
                                 "lm_head"};
  for (const std::string& m : modules) {
    (void)q.excluded(m);
    const WeightQuantScheme s = q.scheme_for(m);
    (void)s.str();
    for (const auto& [rows, cols] : {std::pair{I, H}, std::pair{H, I}, std::pair{2 * I, H}})
      s.spec(rows, cols).validate("fuzzed scheme");  // a bounded block or group always fits
  }
}

}  // namespace
}  // namespace fp8moe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fp8moe;
  using namespace fp8moe::fuzz;
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::optional<ModelConfig> model;
  try {
    model = parse_model_config(text, "fuzz/config.json");
  } catch (const Error&) {
  }
  if (model) check_model_config(*model);
  std::optional<QuantConfig> quant;
  try {
    quant = parse_quant_config(text, "fuzz/config.json");
  } catch (const Error&) {
  }
  if (quant) {
    try {
      check_quant_config(*quant, model ? &*model : nullptr);
    } catch (const Error& e) {
      fuzz_fail(std::string("an accepted quantization config fails in use: ") + e.what());
    }
  }
  return 0;
}

// Small synthetic MoE checkpoints with the real tensor names and config.json of the two model
// families fp8moe targets, filled with random BF16 weights. They exercise the loader, the
// converter and the engine end to end without downloading a 30B model.
//
//  - GLM-4.7-Flash shape (model_type glm4_moe_lite): the first `first_dense` layers dense, then
//    MoE layers with routed experts, one shared expert, a sigmoid router with
//    e_score_correction_bias, MLA attention projections, and the MTP layer stored at index
//    num_hidden_layers (as the real checkpoint does; transformers ignores it).
//  - Qwen3-MoE shape (model_type qwen3_moe): every layer MoE, softmax router mlp.gate, GQA
//    attention with q_norm / k_norm.
//
// Per-expert tensors are stored one by one, as the released checkpoints store them:
// model.layers.L.mlp.experts.e.{gate_proj,up_proj,down_proj}.weight.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace fp8moe {

enum class SyntheticFamily : uint8_t { Glm4MoeLite, Qwen3Moe };
const char* synthetic_family_name(SyntheticFamily f);  // "glm4_moe_lite" / "qwen3_moe"

struct SyntheticSpec {
  SyntheticFamily family = SyntheticFamily::Glm4MoeLite;
  int64_t hidden = 256;               // hidden_size H
  int64_t moe_intermediate = 96;      // moe_intermediate_size I (deliberately not a multiple of 128)
  int64_t dense_intermediate = 320;   // intermediate_size of the dense MLP layers (GLM)
  int64_t experts = 8;                // routed experts E
  int64_t top_k = 4;                  // num_experts_per_tok
  int64_t shared_experts = 1;         // n_shared_experts (GLM; ignored for Qwen3)
  int64_t layers = 3;                 // num_hidden_layers (GLM adds the MTP layer after these)
  int64_t first_dense = 1;            // first_k_dense_replace (GLM; ignored for Qwen3)
  int64_t vocab = 512;                // vocab_size
  double routed_scaling = 1.8;        // routed_scaling_factor (GLM)
  int64_t shards = 1;                 // > 1: model-0000i-of-0000n.safetensors + index
  std::optional<uint64_t> seed;       // nullopt: a fresh seed from std::random_device

  static SyntheticSpec glm4_moe_lite();  // the defaults above
  static SyntheticSpec qwen3_moe();      // H 256, I 96, E 8, top-2, 2 layers, all MoE
  // Throws unless every size is positive and the layer counts are consistent.
  void validate() const;
};

// What was written.
struct SyntheticInfo {
  uint64_t seed = 0;         // the seed actually used (print it: it replays the weights)
  int64_t tensors = 0;       // tensors written
  uint64_t bytes = 0;        // tensor bytes written
  std::string config_json;   // the config.json text
};

// Writes config.json and the safetensors file(s) into `dir` (created if absent; it must not
// already hold a checkpoint). Each tensor is drawn from its own generator seeded by (seed, name),
// so the values do not depend on the shard split. Weights: normal with std 1/sqrt(fan_in)
// (never all zero); norms: 1 + small noise; e_score_correction_bias: F32, small.
SyntheticInfo write_synthetic_checkpoint(const std::string& dir, const SyntheticSpec& spec);

}  // namespace fp8moe

// Checkpoint -> MoE layer weights: config.json and its quantization_config, expert naming,
// stacking, and an inspection report.
//
// The loader's contract is ../shared/docs/formats.md. Its rules, in one place:
//  - FP8 or not is decided per tensor: FP8 iff the dtype is F8_E4M3/F8_E5M2 AND its scale exists
//    (`<w>_scale_inv` or `<w>_scale`; both are multipliers, never inverted). An FP8 weight without
//    a scale, a scale without a weight, a scale of the wrong shape or dtype, a non-FP8 weight with
//    a scale, and a missing expert are errors naming the tensor, expected vs found.
//  - Experts are stacked into the canonical gate_up [E, 2I, H] and down [E, H, I] (D = X @ W^T),
//    scales held as F32. Gate and up of the per-expert layout keep separate scale grids
//    (ScaleSpec segments = 2), so a block never straddles gate and up rows.
//  - A MoE layer left unquantized (the quantization config's ignore list) loads as plain
//    BF16/F16/F32 weights with ScaleSpec none: never dequantized on the fly, never FP8.
//  - FP8 experts are never materialised in BF16: the stacks hold the stored codes.
//
// Layouts accepted for the routed experts of layer L (prefix P = model.layers.L.mlp, Mixtral:
// model.layers.L.block_sparse_moe):
//  - per-expert: P.experts.e.{gate_proj,up_proj,down_proj}.weight [I, H] / [H, I] (Mixtral w1/w3/w2);
//  - transformers-fused: P.experts.gate_up_proj [E, 2I, H] (gate rows first), P.experts.down_proj
//    [E, H, I], optional `_scale_inv`/`_scale` and `_bias` siblings;
//  - GPT-OSS: P.experts.gate_up_proj [E, H, 2I] stored transposed (x @ W) with gate/up
//    interleaved, down_proj [E, I, H], `_bias` [E, 2I] / [E, H]; transposed once at load.
// Shared experts (P.shared_experts.*, Qwen2-MoE P.shared_expert.*) load as a 1-expert stack.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "fp8moe/linear.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

// =============================================================================================
// config.json
// =============================================================================================

// The MoE facts of a model, read from config.json. Field names follow transformers; aliases
// (num_experts | n_routed_experts | num_local_experts, ...) are resolved here once.
struct ModelConfig {
  std::string source;                      // the config.json path, for messages
  std::string model_type;                  // qwen3_moe, qwen2_moe, mixtral, glm4_moe_lite, glm4_moe, deepseek_v3, gpt_oss
  std::vector<std::string> architectures;  // e.g. Glm4MoeLiteForCausalLM
  int64_t hidden_size = 0;                 // H
  int64_t moe_intermediate_size = 0;       // I of one routed expert (GPT-OSS, Mixtral: intermediate_size)
  int64_t num_experts = 0;                 // E, routed experts
  int64_t top_k = 0;                       // experts per token
  int64_t num_hidden_layers = 0;           // layers >= this (GLM's MTP layer) are not part of the model
  bool norm_topk_prob = false;             // renormalise the k kept weights
  double routed_scaling_factor = 1.0;      // SigmoidBiasTopK weight multiplier
  int64_t n_shared_experts = 0;            // GLM/DeepSeek shared experts (one MLP of n * I); Qwen2-MoE: 1
  int64_t shared_intermediate_size = 0;    // intermediate of that shared MLP (0: none)
  int64_t first_k_dense_replace = 0;       // GLM/DeepSeek: layers < k are dense
  int64_t moe_layer_freq = 1;              // DeepSeek: MoE where L % freq == 0
  std::vector<int64_t> mlp_only_layers;    // dense layers by index: Qwen's mlp_only_layers, GLM/DeepSeek's
                                           // "dense" entries of mlp_layer_types (transformers 5.x)
  int64_t decoder_sparse_step = 1;         // Qwen: MoE where (L + 1) % step == 0
  int64_t n_group = 1, topk_group = 1;     // DeepSeek group-limited routing (only n_group 1 supported)
  RouterKind router = RouterKind::SoftmaxTopK;
  ActivationSpec act;                      // SiLU-GLU halves; GPT-OSS: clamped GLU, interleaved

  bool is_moe_layer(int64_t layer) const;  // false for layer >= num_hidden_layers
  std::vector<int64_t> moe_layers() const;  // ascending
  // Router kind, top-k, normalisation and scaling. The correction bias comes from the checkpoint
  // (MoeLayerWeights::router). Throws for group-limited routing (n_group > 1), which RouterSpec
  // cannot express.
  RouterSpec router_spec() const;
};

// Parses config.json text; `source` names the file in messages. Throws naming the file and the
// missing/invalid field, and for model types whose MoE routing is not supported.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
ModelConfig load_model_config(const std::string& path);
// The model types parse_model_config reads (the MoE families above).
bool is_supported_moe_model_type(const std::string& model_type);

// =============================================================================================
// quantization_config
// =============================================================================================

enum class QuantMethod : uint8_t {
  None,               // no quantization_config: a plain checkpoint
  Fp8,                // "fp8": fine-grained block FP8, scales named weight_scale_inv
  CompressedTensors,  // "compressed-tensors", format float-quantized, scales named weight_scale
};
const char* quant_method_name(QuantMethod m);

// How the config declares one Linear module's weight to be quantized (shapes come from the
// checkpoint; this holds only the scheme).
struct WeightQuantScheme {
  ScaleKind kind = ScaleKind::None;  // None: not quantized (no scheme, or excluded by the config)
  int64_t block_n = 0;               // Block: extent along out (rows)
  int64_t block_k = 0;               // Block: extent along in (cols)
  int64_t group_size = 0;            // Group: extent along in
  DType dtype = DType::F8_E4M3;      // code type the config names (fp8 "fmt")

  // The per-matrix ScaleSpec for an [rows, cols] weight (segments 1).
  ScaleSpec spec(int64_t rows, int64_t cols) const;
  std::string str() const;  // "block 128x128", "channel", "none"
};

// An entry of a module list in a quantization config (ignore, targets, modules_to_not_convert).
struct ModulePattern {
  std::string text;                      // as written in config.json
  std::shared_ptr<const std::regex> re;  // the compiled regex ("re:" entries; every fp8 entry)
};

// One compressed-tensors config group.
struct QuantGroup {
  std::string name;                    // "group_0"
  std::vector<ModulePattern> targets;  // "Linear" (class), exact names or "re:<regex>"
  WeightQuantScheme weights;
  std::string activation_strategy;   // "token", "tensor", "group", or empty (weight-only)
};

struct QuantConfig {
  QuantMethod method = QuantMethod::None;
  std::string source;  // config.json path
  // fp8
  WeightQuantScheme fp8_weights;                    // block weight_block_size (default 128x128)
  std::string activation_scheme;                    // "dynamic" (static is refused)
  // Matched as transformers does: re.match(entry, name) (anchored at the start only) or
  // name.endswith(entry).
  std::vector<ModulePattern> modules_to_not_convert;
  // compressed-tensors
  std::string format;               // "float-quantized"
  std::string quantization_status;  // "compressed", ...
  std::vector<QuantGroup> groups;
  // Matched as compressed-tensors' match_name does: an exact name, "re:<regex>" with re.match
  // (anchored at the start, NOT a full match), or a class name ("Linear": every expert projection).
  std::vector<ModulePattern> ignore;

  // True when the config explicitly keeps Linear module `module` unquantized
  // (e.g. "model.layers.3.mlp.experts.0.gate_proj").
  bool excluded(const std::string& module) const;
  // The scheme the config declares for Linear module `module`; kind None when there is no
  // quantization_config, the module is excluded, or no group targets it.
  WeightQuantScheme scheme_for(const std::string& module) const;
};

// Reads the quantization_config of a whole config.json text (absent -> method None). Throws
// naming the file and the setting for unsupported ones: num_bits != 8, type int, asymmetric,
// unknown strategy, method or format, static activation scales.
QuantConfig parse_quant_config(const std::string& config_json_text, const std::string& source);

// =============================================================================================
// Loaded weights
// =============================================================================================

enum class ExpertLayout : uint8_t { PerExpert, Fused, GptOss };
const char* expert_layout_name(ExpertLayout l);

// One stack of experts, owning its host memory, in the canonical orientation.
struct ExpertStack {
  QuantWeights gate_up;  // data [E, 2I, H] (FP8 codes or plain), scale [E, rows, cols] F32
  QuantWeights down;     // data [E, H, I], scale F32
  Tensor gate_up_bias;   // [E, 2I] F32, or undefined
  Tensor down_bias;      // [E, H] F32, or undefined
  ActivationSpec act;

  int64_t experts() const { return gate_up.data.size(0); }
  // Views for MoeLayer; valid while this stack lives.
  ExpertWeights view() const;
  // A copy of this stack on `backend`'s device (FP8 codes stay FP8: nothing is dequantized).
  ExpertStack upload(Backend& backend) const;
};

// The router of one MoE layer, as stored.
struct RouterWeights {
  Tensor weight;           // [E, H] in its stored dtype (BF16/F16/F32)
  Tensor bias;             // [E] F32 (GPT-OSS), or undefined
  Tensor correction_bias;  // [E] F32 (GLM/DeepSeek e_score_correction_bias), or undefined
  RouterSpec spec;         // from the config; correction_bias is filled by view()

  RouterSpec view() const;
};

struct MoeLayerWeights {
  int64_t layer = 0;
  ExpertLayout layout = ExpertLayout::PerExpert;
  ExpertStack routed;
  std::optional<ExpertStack> shared;  // shared expert(s) as one expert, SiLU-GLU halves
  Tensor shared_gate;                 // Qwen2-MoE shared_expert_gate [1, H] as stored, or undefined
  RouterWeights router;
};

// A dense Linear module's weight (attention and dense-MLP projections, lm_head), FP8 with its
// scales or plain, as the one-matrix stack LinearLayer takes.
struct LinearStack {
  QuantWeights weight;  // data [1, N, K] (FP8 codes or plain), scale [1, rows, cols] F32
  Tensor bias;          // [1, N] F32, or undefined

  LinearWeights view() const { return {weight.view(), bias.view()}; }
};

// =============================================================================================
// Inspection
// =============================================================================================

enum class LayerKind : uint8_t {
  Dense,    // no routed experts
  Moe,      // routed experts
  Skipped,  // index >= num_hidden_layers (GLM's MTP layer): present in the files, not in the model
};
const char* layer_kind_name(LayerKind k);

struct ProjectionReport {
  std::string name;  // "gate_up", "down", "shared gate_up", "shared down"
  Shape shape;       // canonical [E, N, K]
  DType dtype;       // stored weight dtype
  ScaleSpec spec;    // canonical (stacked) scheme; kind None: plain weights
  int64_t bytes = 0;  // weights + scales as stored

  bool fp8() const { return spec.kind != ScaleKind::None; }
};

struct LayerReport {
  int64_t index = 0;
  LayerKind kind = LayerKind::Dense;
  ExpertLayout layout = ExpertLayout::PerExpert;  // Moe only
  int64_t experts = 0;                            // routed experts (Moe)
  bool shared_experts = false;                    // a shared expert MLP is present
  std::vector<ProjectionReport> projections;      // Moe: routed gate_up, down, then shared ones
  int64_t bytes = 0;                              // every tensor named model.layers.<index>.*
  std::string note;                               // e.g. why a layer is skipped
};

struct InspectionReport {
  std::string path;
  std::string model_type;  // empty without config.json
  QuantMethod method = QuantMethod::None;
  int64_t tensors = 0;
  int64_t bytes = 0;  // all tensor data
  std::vector<LayerReport> layers;  // ascending index
  std::vector<std::string> problems;  // each names its tensor; a checkpoint with problems will not load
  std::vector<std::string> notes;     // facts worth knowing that are not errors

  bool ok() const { return problems.empty(); }
  std::string str() const;  // a human-readable table
};

// =============================================================================================
// Checkpoint
// =============================================================================================

class Checkpoint {
 public:
  // `path`: a directory with config.json and safetensors files (sharded with
  // model.safetensors.index.json, or not), or a single .safetensors file (its directory's
  // config.json is used when present; without one the file can be inspected but not loaded).
  static Checkpoint open(const std::string& path);

  const std::string& path() const { return path_; }
  // The MoE facts of config.json; empty without config.json and for a dense model.
  const std::optional<ModelConfig>& config() const { return config_; }
  // config.json's model_type ("" without config.json). A model type that is no MoE family and
  // whose config declares no routed experts (llama, qwen3, ...) is a dense model: it inspects and
  // converts, and has no MoE layer to load.
  const std::string& model_type() const { return model_type_; }
  bool dense() const { return !model_type_.empty() && !config_; }
  const QuantConfig& quant() const { return quant_; }
  const TensorStore& store() const { return *store_; }

  // MoE layer indices: from config.json, or without it the layers holding routed experts.
  std::vector<int64_t> moe_layers() const;
  // Checks every layer and tensor without copying weights; never throws for checkpoint problems.
  InspectionReport inspect() const;
  // Loads the routed experts (and, with parts All, the shared experts and the router) of MoE
  // layer `layer` into host memory. Needs config.json. Throws naming the tensor for any of the
  // problems listed at the top. RoutedExperts serves callers whose own modules hold the router and
  // the shared experts (the Python loader), so those are not read twice.
  enum class Parts : uint8_t { All, RoutedExperts };
  MoeLayerWeights load_moe_layer(int64_t layer, Parts parts = Parts::All) const;
  // The stored layout of MoE layer `layer`'s routed experts, as the loader plans it (no copies).
  ExpertLayout expert_layout(int64_t layer) const;
  // Loads the weight of Linear module `module` ("model.layers.0.self_attn.q_proj": reads
  // `<module>.weight`, its scale and `<module>.bias`) under the per-tensor FP8 rule and the scheme
  // the quantization config declares for that module. Throws naming the tensor.
  LinearStack load_linear(const std::string& module) const;
  // A copy in host memory of tensor `name` as stored (norms, embeddings, routers). Refuses FP8
  // tensors, whose values need their scales (load_linear).
  Tensor load_tensor(const std::string& name) const;
  // The same for any tensor, FP8 codes included: for writers that pass a tensor through unchanged.
  Tensor load_stored(const std::string& name) const;

 private:
  Checkpoint() = default;
  std::string path_;
  std::optional<ModelConfig> config_;
  std::string model_type_;
  QuantConfig quant_;
  std::shared_ptr<TensorStore> store_;
  std::map<int64_t, std::vector<std::string>> layer_names_;  // model.layers.<L>.* names, per L

  // The checks load_moe_layer and expert_layout share; the stored names of `layer`.
  const std::vector<std::string>& moe_layer_names(int64_t layer) const;
};

}  // namespace fp8moe

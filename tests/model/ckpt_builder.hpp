// Small MoE checkpoints for the loader tests, written with SafetensorsWriter: real tensor names
// and config.json fields of each family, random FP8 codes and random scales in a chosen dtype,
// and an independent reference of every expert element (code x scale, with its own index
// arithmetic: no ScaleSpec involved), so a loaded stack can be checked element by element.
//
// Tests edit `tensors` / `config` before write() to build the broken variants. The references
// hold their own handles to the generated buffers, so renaming or swapping entries of `tensors`
// does not change what the reference expects.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fp8moe/checkpoint.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/safetensors.hpp"

namespace fp8moe::testing {

struct CkptOptions {
  std::string model_type = "qwen3_moe";  // qwen3_moe, glm4_moe_lite, gpt_oss
  QuantMethod method = QuantMethod::Fp8;  // None: every weight BF16
  ScaleKind scheme = ScaleKind::Block;    // compressed-tensors strategy (fp8: always Block)
  int64_t block = 32;                     // square block edge (Block) / group size (Group)
  DType scale_dtype = DType::F32;
  bool rank0_tensor_scale = false;  // Tensor scheme: shape [] instead of [1]
  bool per_part_scales = false;     // fused gate_up with Tensor scheme: [E, 2] instead of [E]
  int64_t E = 4, H = 96, I = 40;
  int64_t layers = 2;                // num_hidden_layers
  int64_t first_dense = 0;           // glm4_moe_lite: first_k_dense_replace
  std::set<int64_t> bf16_layers;     // MoE layers excluded by the config and stored BF16
  ExpertLayout layout = ExpertLayout::PerExpert;
  bool shared = false;  // glm4_moe_lite: one shared expert (intermediate I)
  bool mtp = false;     // glm4_moe_lite: an MTP layer stored at index `layers`
};

// One stored tensor and its scale, viewed as [E?, R, C] in the stored orientation. The scale of
// stored element (e, r, c) is flat element e * gR * gC + (r / br) * gC + c / bc of `scale`.
struct SourceTensor {
  Tensor weight;
  Tensor scale;  // undefined: plain weight
  int64_t R = 0, C = 0, br = 1, bc = 1;

  double value(int64_t e, int64_t r, int64_t c) const {
    const int64_t i = (e * R + r) * C + c;
    const double w = load_as_double(weight.data(), weight.dtype(), i);
    if (!scale.defined()) return w;
    const int64_t gR = (R + br - 1) / br, gC = (C + bc - 1) / bc;
    return w * load_as_double(scale.data(), scale.dtype(), e * gR * gC + (r / br) * gC + c / bc);
  }
};

class CkptBuilder {
 public:
  CkptBuilder(CkptOptions o, uint64_t seed) : o_(std::move(o)), rng_(seed) { build(); }

  std::map<std::string, Tensor> tensors;  // what write() stores
  nlohmann::json config;                  // what write() stores as config.json

  const CkptOptions& options() const { return o_; }
  std::string prefix(int64_t layer) const { return "model.layers." + std::to_string(layer) + ".mlp"; }
  std::string scale_suffix() const { return o_.method == QuantMethod::Fp8 ? "_scale_inv" : "_scale"; }

  // The canonical element (e, n, k) of the routed gate_up [E, 2I, H] / down [E, H, I] of `layer`,
  // or of the shared expert's (e = 0).
  double gate_up(int64_t layer, int64_t e, int64_t n, int64_t k, bool shared = false) const {
    const int64_t I = o_.I;
    if (shared || per_expert()) {
      const std::string base = shared ? prefix(layer) + ".shared_experts." : expert(layer, e);
      return src_.at(base + (n < I ? "gate_proj" : "up_proj")).value(0, n % I, k);
    }
    const SourceTensor& s = src_.at(prefix(layer) + ".experts.gate_up_proj");
    return gpt() ? s.value(e, k, n) : s.value(e, n, k);
  }
  double down(int64_t layer, int64_t e, int64_t n, int64_t k, bool shared = false) const {
    if (shared || per_expert())
      return src_.at((shared ? prefix(layer) + ".shared_experts." : expert(layer, e)) + "down_proj").value(0, n, k);
    const SourceTensor& s = src_.at(prefix(layer) + ".experts.down_proj");
    return gpt() ? s.value(e, k, n) : s.value(e, n, k);
  }
  const SourceTensor& source(const std::string& name) const { return src_.at(name); }

  // Writes config.json and model.safetensors, or `shards` files + model.safetensors.index.json
  // (names dealt round-robin in sorted order, so a weight and its scale often land apart).
  void write(const std::string& dir, int shards = 1) const {
    std::filesystem::create_directories(dir);
    std::ofstream(dir + "/config.json") << config.dump(2);
    if (shards == 1) {
      SafetensorsWriter w;
      for (const auto& [name, t] : tensors) w.add(name, t);
      w.write(dir + "/model.safetensors");
      return;
    }
    std::vector<SafetensorsWriter> ws(static_cast<size_t>(shards));
    nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
    int64_t i = 0;
    for (const auto& [name, t] : tensors) {
      const int s = static_cast<int>(i++ % shards);
      ws[static_cast<size_t>(s)].add(name, t);
      index["weight_map"][name] = shard_name(s, shards);
    }
    for (int s = 0; s < shards; ++s) ws[static_cast<size_t>(s)].write(dir + "/" + shard_name(s, shards));
    std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  }
  static std::string shard_name(int s, int n) {
    return "model-0000" + std::to_string(s + 1) + "-of-0000" + std::to_string(n) + ".safetensors";
  }

 private:
  std::string expert(int64_t layer, int64_t e) const { return prefix(layer) + ".experts." + std::to_string(e) + "."; }
  bool glm() const { return o_.model_type == "glm4_moe_lite"; }
  bool gpt() const { return o_.model_type == "gpt_oss"; }  // always stacked, whatever `layout` says
  bool per_expert() const { return o_.layout == ExpertLayout::PerExpert && !gpt(); }
  bool quantized_layer(int64_t layer) const { return o_.method != QuantMethod::None && !o_.bf16_layers.count(layer); }

  Tensor random_plain(const Shape& s, DType dt) {
    std::normal_distribution<double> nd(0.0, 0.5);
    Tensor t(dt, s);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, nd(rng_));
    return t;
  }
  // FP8 codes: every non-NaN code, so subnormals, zeros and +-448 all occur.
  Tensor random_codes(const Shape& s) {
    std::uniform_int_distribution<int> d(0, 253);
    Tensor t(DType::F8_E4M3, s);
    auto* p = t.ptr<uint8_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      int c = d(rng_);
      if (c >= 0x7F) ++c;  // skip 0x7F
      p[i] = static_cast<uint8_t>(c);  // 0x00..0xFE without 0x7F (0xFF is out of range)
    }
    return t;
  }
  Tensor random_scales(const Shape& s) {
    std::uniform_real_distribution<double> d(-12.0, -4.0);
    Tensor t(o_.scale_dtype, s);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), o_.scale_dtype, i, std::exp2(d(rng_)));
    return t;
  }

  // A Linear weight [R, C] (module `module`): FP8 + scale in the configured scheme, or BF16.
  void linear(const std::string& module, int64_t R, int64_t C, bool quantized) {
    SourceTensor s;
    s.R = R, s.C = C;
    if (!quantized) {
      s.weight = random_plain(Shape{R, C}, DType::BF16);
    } else {
      s.weight = random_codes(Shape{R, C});
      Shape ss;
      const int64_t b = o_.block;
      const ScaleKind k = o_.method == QuantMethod::Fp8 ? ScaleKind::Block : o_.scheme;
      switch (k) {
        case ScaleKind::Tensor: s.br = R, s.bc = C, ss = o_.rank0_tensor_scale ? Shape{} : Shape{1}; break;
        case ScaleKind::Channel: s.br = 1, s.bc = C, ss = Shape{R, 1}; break;
        case ScaleKind::Block: s.br = b, s.bc = b, ss = Shape{(R + b - 1) / b, (C + b - 1) / b}; break;
        case ScaleKind::Group: s.br = 1, s.bc = b, ss = Shape{R, (C + b - 1) / b}; break;
        case ScaleKind::None: break;
      }
      s.scale = random_scales(ss);
      tensors[module + ".weight" + scale_suffix()] = s.scale;
    }
    tensors[module + ".weight"] = s.weight;
    src_[module] = s;
  }

  // A fused / GPT-OSS stack stored [E, R, C] with a stacked scale.
  void stack(const std::string& name, int64_t R, int64_t C, bool quantized, bool halves) {
    const int64_t E = o_.E;
    SourceTensor s;
    s.R = R, s.C = C;
    if (!quantized) {
      s.weight = random_plain(Shape{E, R, C}, DType::BF16);
    } else {
      s.weight = random_codes(Shape{E, R, C});
      const int64_t b = o_.block;
      Shape ss;
      switch (o_.method == QuantMethod::Fp8 ? ScaleKind::Block : o_.scheme) {
        case ScaleKind::Tensor:
          if (halves && o_.per_part_scales) s.br = R / 2, s.bc = C, ss = Shape{E, 2};
          else s.br = R, s.bc = C, ss = Shape{E};
          break;
        case ScaleKind::Channel:
          // per output channel: rows of [N, K]; GPT-OSS stores [K, N], so its columns
          if (gpt()) s.br = R, s.bc = 1, ss = Shape{E, 1, C};
          else s.br = 1, s.bc = C, ss = Shape{E, R, 1};
          break;
        case ScaleKind::Block: s.br = b, s.bc = b, ss = Shape{E, (R + b - 1) / b, (C + b - 1) / b}; break;
        case ScaleKind::Group: s.br = 1, s.bc = b, ss = Shape{E, R, (C + b - 1) / b}; break;
        case ScaleKind::None: break;
      }
      s.scale = random_scales(ss);
      tensors[name + scale_suffix()] = s.scale;
    }
    tensors[name] = s.weight;
    src_[name] = s;
  }

  void build() {
    const int64_t E = o_.E, H = o_.H, I = o_.I;
    std::normal_distribution<double> nd(0.0, 1.0);
    tensors["model.embed_tokens.weight"] = random_plain(Shape{16, H}, DType::BF16);
    tensors["lm_head.weight"] = random_plain(Shape{16, H}, DType::BF16);
    tensors["model.norm.weight"] = random_plain(Shape{H}, DType::BF16);
    const int64_t stored_layers = o_.layers + (o_.mtp ? 1 : 0);
    for (int64_t l = 0; l < stored_layers; ++l) {
      const std::string P = prefix(l);
      const std::string L = "model.layers." + std::to_string(l);
      const bool q = quantized_layer(l) && l < o_.layers;
      tensors[L + ".input_layernorm.weight"] = random_plain(Shape{H}, DType::BF16);
      linear(L + ".self_attn.o_proj", H, H, o_.method != QuantMethod::None && l < o_.layers);
      if (l < o_.first_dense) {  // GLM's dense MLP
        linear(P + ".gate_proj", 2 * I, H, q);
        linear(P + ".up_proj", 2 * I, H, q);
        linear(P + ".down_proj", H, 2 * I, q);
        continue;
      }
      if (gpt()) {
        stack(P + ".experts.gate_up_proj", H, 2 * I, q, false);  // [E, H, 2I], x @ W
        stack(P + ".experts.down_proj", I, H, q, false);         // [E, I, H]
        tensors[P + ".experts.gate_up_proj_bias"] = random_plain(Shape{E, 2 * I}, DType::BF16);
        tensors[P + ".experts.down_proj_bias"] = random_plain(Shape{E, H}, DType::BF16);
        tensors[P + ".router.weight"] = random_plain(Shape{E, H}, DType::BF16);
        tensors[P + ".router.bias"] = random_plain(Shape{E}, DType::BF16);
        continue;
      }
      if (o_.layout == ExpertLayout::Fused) {
        stack(P + ".experts.gate_up_proj", 2 * I, H, q, true);
        stack(P + ".experts.down_proj", H, I, q, false);
      } else {
        for (int64_t e = 0; e < E; ++e) {
          linear(expert(l, e) + "gate_proj", I, H, q);
          linear(expert(l, e) + "up_proj", I, H, q);
          linear(expert(l, e) + "down_proj", H, I, q);
        }
      }
      tensors[P + ".gate.weight"] = random_plain(Shape{E, H}, DType::BF16);
      if (glm()) {
        Tensor b(DType::F32, Shape{E});
        for (int64_t e = 0; e < E; ++e) b.ptr<float>()[e] = static_cast<float>(0.1 * nd(rng_));
        tensors[P + ".gate.e_score_correction_bias"] = b;
      }
      if (o_.shared) {
        linear(P + ".shared_experts.gate_proj", I, H, q);
        linear(P + ".shared_experts.up_proj", I, H, q);
        linear(P + ".shared_experts.down_proj", H, I, q);
      }
    }
    build_config();
  }

  void build_config() {
    using nlohmann::json;
    json c = {{"model_type", o_.model_type}, {"hidden_size", o_.H}, {"num_hidden_layers", o_.layers},
              {"vocab_size", 16}, {"torch_dtype", "bfloat16"}};
    if (o_.model_type == "qwen3_moe") {
      c["architectures"] = {"Qwen3MoeForCausalLM"};
      c["num_experts"] = o_.E;
      c["num_experts_per_tok"] = 2;
      c["moe_intermediate_size"] = o_.I;
      c["intermediate_size"] = 3 * o_.H;
      c["norm_topk_prob"] = true;
      c["decoder_sparse_step"] = 1;
      c["mlp_only_layers"] = json::array();
    } else if (glm()) {
      c["architectures"] = {"Glm4MoeLiteForCausalLM"};
      c["n_routed_experts"] = o_.E;
      c["n_shared_experts"] = o_.shared ? 1 : 0;
      c["num_experts_per_tok"] = 2;
      c["moe_intermediate_size"] = o_.I;
      c["intermediate_size"] = 2 * o_.I;
      c["first_k_dense_replace"] = o_.first_dense;
      c["routed_scaling_factor"] = 1.8;
      c["norm_topk_prob"] = true;
      c["n_group"] = 1;
      c["topk_group"] = 1;
      c["num_nextn_predict_layers"] = o_.mtp ? 1 : 0;
    } else {
      c["architectures"] = {"GptOssForCausalLM"};
      c["num_local_experts"] = o_.E;
      c["num_experts_per_tok"] = 2;
      c["experts_per_token"] = 2;
      c["intermediate_size"] = o_.I;
      c["swiglu_limit"] = 7.0;
    }
    if (o_.method == QuantMethod::Fp8) {
      json skip = {"lm_head"};
      for (int64_t l : o_.bf16_layers) skip.push_back(prefix(l) + ".experts");
      if (o_.bf16_layers.count(0) && o_.first_dense > 0) skip.push_back(prefix(0));
      c["quantization_config"] = {{"quant_method", "fp8"},
                                  {"fmt", "e4m3"},
                                  {"activation_scheme", "dynamic"},
                                  {"weight_block_size", {o_.block, o_.block}},
                                  {"modules_to_not_convert", skip}};
    } else if (o_.method == QuantMethod::CompressedTensors) {
      json w = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"dynamic", false},
                {"strategy", scale_kind_name(o_.scheme)}};
      if (o_.scheme == ScaleKind::Block) w["block_structure"] = {o_.block, o_.block};
      if (o_.scheme == ScaleKind::Group) w["group_size"] = o_.block;
      json ignore = {"lm_head", "re:.*mlp\\.gate$"};
      for (int64_t l : o_.bf16_layers) ignore.push_back("re:model\\.layers\\." + std::to_string(l) + "\\.mlp\\.");
      if (o_.mtp) ignore.push_back("re:model\\.layers\\." + std::to_string(o_.layers) + "\\.");
      c["quantization_config"] = {
          {"quant_method", "compressed-tensors"},
          {"format", "float-quantized"},
          {"quantization_status", "compressed"},
          {"config_groups",
           {{"group_0",
             {{"targets", {"Linear"}},
              {"weights", w},
              {"input_activations",
               {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", true}, {"symmetric", true}}}}}}},
          {"ignore", ignore}};
    }
    config = c;
  }

  CkptOptions o_;
  std::mt19937_64 rng_;
  std::map<std::string, SourceTensor> src_;
};

}  // namespace fp8moe::testing

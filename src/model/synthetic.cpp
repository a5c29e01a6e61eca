// Synthetic GLM-4.7-Flash- and Qwen3-MoE-shaped checkpoints (include/fp8moe/synthetic.hpp).
//
// The tensor list is built first (names, shapes, how to fill), then written shard by shard, each
// tensor generated just before it is added, so memory stays at one shard.
#include "fp8moe/synthetic.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/dtype.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/tensor.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace fp8moe {

const char* synthetic_family_name(SyntheticFamily f) {
  return f == SyntheticFamily::Glm4MoeLite ? "glm4_moe_lite" : "qwen3_moe";
}

SyntheticSpec SyntheticSpec::glm4_moe_lite() { return SyntheticSpec{}; }

SyntheticSpec SyntheticSpec::qwen3_moe() {
  SyntheticSpec s;
  s.family = SyntheticFamily::Qwen3Moe;
  s.top_k = 2;
  s.layers = 2;
  s.first_dense = 0;
  s.shared_experts = 0;
  s.routed_scaling = 1.0;
  return s;
}

void SyntheticSpec::validate() const {
  FP8MOE_CHECK(hidden > 0 && moe_intermediate > 0 && dense_intermediate > 0 && vocab > 0,
               "synthetic model: sizes must be positive (hidden ", hidden, ", moe_intermediate ",
               moe_intermediate, ", dense_intermediate ", dense_intermediate, ", vocab ", vocab, ")");
  FP8MOE_CHECK(experts > 0 && top_k > 0 && top_k <= experts, "synthetic model: top_k ", top_k,
               " must be in [1, experts = ", experts, "]");
  FP8MOE_CHECK(layers > 0, "synthetic model: layers must be positive, found ", layers);
  FP8MOE_CHECK(shards > 0, "synthetic model: shards must be positive, found ", shards);
  if (family == SyntheticFamily::Glm4MoeLite) {
    FP8MOE_CHECK(first_dense >= 0 && first_dense < layers, "synthetic GLM model: first_dense ", first_dense,
                 " must leave at least one MoE layer among ", layers);
    FP8MOE_CHECK(shared_experts >= 0, "synthetic GLM model: shared_experts must be >= 0, found ", shared_experts);
  }
}

namespace {

// Attention sizes: small, and not multiples of 128, so block scales get partial edge blocks.
struct Attn {
  // GLM (MLA)
  int64_t heads = 2, q_lora = 64, kv_lora = 32, qk_nope = 16, qk_rope = 8, v_head = 16;
  // Qwen3 (GQA)
  int64_t q_heads = 4, kv_heads = 2, head_dim = 32;
};

enum class Fill : uint8_t {
  Linear,  // normal, std 1/sqrt(fan_in) (shape[1]): what a trained layer's weights look like in scale
  Norm,    // 1 + N(0, 0.05): RMSNorm weights
  Bias,    // N(0, 0.01) in F32: e_score_correction_bias
};

struct Desc {
  std::string name;
  DType dtype;
  Shape shape;
  Fill fill;
  uint64_t bytes() const { return static_cast<uint64_t>(shape.numel() * dtype_size(dtype)); }
};

void add_linear(std::vector<Desc>& out, const std::string& module, int64_t out_f, int64_t in_f) {
  out.push_back({module + ".weight", DType::BF16, Shape{out_f, in_f}, Fill::Linear});
}
void add_norm(std::vector<Desc>& out, const std::string& name, int64_t n) {
  out.push_back({name, DType::BF16, Shape{n}, Fill::Norm});
}

void add_glm_attention(std::vector<Desc>& d, const std::string& p, int64_t H, const Attn& a) {
  add_linear(d, p + "self_attn.q_a_proj", a.q_lora, H);
  add_norm(d, p + "self_attn.q_a_layernorm.weight", a.q_lora);
  add_linear(d, p + "self_attn.q_b_proj", a.heads * (a.qk_nope + a.qk_rope), a.q_lora);
  add_linear(d, p + "self_attn.kv_a_proj_with_mqa", a.kv_lora + a.qk_rope, H);
  add_norm(d, p + "self_attn.kv_a_layernorm.weight", a.kv_lora);
  add_linear(d, p + "self_attn.kv_b_proj", a.heads * (a.qk_nope + a.v_head), a.kv_lora);
  add_linear(d, p + "self_attn.o_proj", H, a.heads * a.v_head);
}

void add_qwen_attention(std::vector<Desc>& d, const std::string& p, int64_t H, const Attn& a) {
  add_linear(d, p + "self_attn.q_proj", a.q_heads * a.head_dim, H);
  add_linear(d, p + "self_attn.k_proj", a.kv_heads * a.head_dim, H);
  add_linear(d, p + "self_attn.v_proj", a.kv_heads * a.head_dim, H);
  add_linear(d, p + "self_attn.o_proj", H, a.q_heads * a.head_dim);
  add_norm(d, p + "self_attn.q_norm.weight", a.head_dim);
  add_norm(d, p + "self_attn.k_norm.weight", a.head_dim);
}

void add_mlp(std::vector<Desc>& d, const std::string& p, int64_t H, int64_t I) {
  add_linear(d, p + ".gate_proj", I, H);
  add_linear(d, p + ".up_proj", I, H);
  add_linear(d, p + ".down_proj", H, I);
}

void add_moe(std::vector<Desc>& d, const std::string& p, const SyntheticSpec& s) {
  const int64_t H = s.hidden, I = s.moe_intermediate;
  add_linear(d, p + "mlp.gate", s.experts, H);  // router
  if (s.family == SyntheticFamily::Glm4MoeLite)
    d.push_back({p + "mlp.gate.e_score_correction_bias", DType::F32, Shape{s.experts}, Fill::Bias});
  for (int64_t e = 0; e < s.experts; ++e) add_mlp(d, p + "mlp.experts." + std::to_string(e), H, I);
  if (s.family == SyntheticFamily::Glm4MoeLite && s.shared_experts > 0)
    add_mlp(d, p + "mlp.shared_experts", H, I * s.shared_experts);
}

std::vector<Desc> tensor_list(const SyntheticSpec& s, const Attn& a) {
  const int64_t H = s.hidden;
  const bool glm = s.family == SyntheticFamily::Glm4MoeLite;
  std::vector<Desc> d;
  d.push_back({"model.embed_tokens.weight", DType::BF16, Shape{s.vocab, H}, Fill::Linear});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add_norm(d, p + "input_layernorm.weight", H);
    add_norm(d, p + "post_attention_layernorm.weight", H);
    if (glm) {
      add_glm_attention(d, p, H, a);
      if (l < s.first_dense)
        add_mlp(d, p + "mlp", H, s.dense_intermediate);
      else
        add_moe(d, p, s);
    } else {
      add_qwen_attention(d, p, H, a);
      add_moe(d, p, s);
    }
  }
  if (glm) {
    // The MTP (next-token prediction) layer, DeepSeek-V3 style: a full MoE decoder layer plus the
    // embedding/hidden projections and its own head.
    const std::string p = "model.layers." + std::to_string(s.layers) + ".";
    d.push_back({p + "embed_tokens.weight", DType::BF16, Shape{s.vocab, H}, Fill::Linear});
    add_norm(d, p + "enorm.weight", H);
    add_norm(d, p + "hnorm.weight", H);
    add_linear(d, p + "eh_proj", H, 2 * H);
    add_norm(d, p + "input_layernorm.weight", H);
    add_norm(d, p + "post_attention_layernorm.weight", H);
    add_glm_attention(d, p, H, a);
    add_moe(d, p, s);
    add_norm(d, p + "shared_head.norm.weight", H);
    add_linear(d, p + "shared_head.head", s.vocab, H);
  }
  add_norm(d, "model.norm.weight", H);
  add_linear(d, "lm_head", s.vocab, H);
  return d;
}

json config_for(const SyntheticSpec& s, const Attn& a) {
  json c;
  if (s.family == SyntheticFamily::Glm4MoeLite) {
    c["architectures"] = {"Glm4MoeLiteForCausalLM"};
    c["model_type"] = "glm4_moe_lite";
    c["hidden_size"] = s.hidden;
    c["intermediate_size"] = s.dense_intermediate;
    c["moe_intermediate_size"] = s.moe_intermediate;
    c["n_routed_experts"] = s.experts;
    c["n_shared_experts"] = s.shared_experts;
    c["num_experts_per_tok"] = s.top_k;
    c["first_k_dense_replace"] = s.first_dense;
    c["num_hidden_layers"] = s.layers;
    c["num_nextn_predict_layers"] = 1;
    c["routed_scaling_factor"] = s.routed_scaling;
    c["norm_topk_prob"] = true;
    c["n_group"] = 1;
    c["topk_group"] = 1;
    c["topk_method"] = "noaux_tc";
    c["scoring_func"] = "sigmoid";
    c["num_attention_heads"] = a.heads;
    c["num_key_value_heads"] = a.heads;
    c["q_lora_rank"] = a.q_lora;
    c["kv_lora_rank"] = a.kv_lora;
    c["qk_nope_head_dim"] = a.qk_nope;
    c["qk_rope_head_dim"] = a.qk_rope;
    c["v_head_dim"] = a.v_head;
    c["attention_bias"] = false;
  } else {
    c["architectures"] = {"Qwen3MoeForCausalLM"};
    c["model_type"] = "qwen3_moe";
    c["hidden_size"] = s.hidden;
    c["intermediate_size"] = s.dense_intermediate;
    c["moe_intermediate_size"] = s.moe_intermediate;
    c["num_experts"] = s.experts;
    c["num_experts_per_tok"] = s.top_k;
    c["norm_topk_prob"] = true;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = json::array();
    c["num_hidden_layers"] = s.layers;
    c["num_attention_heads"] = a.q_heads;
    c["num_key_value_heads"] = a.kv_heads;
    c["head_dim"] = a.head_dim;
    c["attention_bias"] = false;
  }
  c["hidden_act"] = "silu";
  c["vocab_size"] = s.vocab;
  c["max_position_embeddings"] = 4096;
  c["rms_norm_eps"] = 1e-6;
  c["rope_theta"] = 1000000.0;
  c["tie_word_embeddings"] = false;
  c["torch_dtype"] = "bfloat16";
  return c;
}

// splitmix64's finalizer: a bijection that spreads every input bit over the whole word.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Per-tensor generator: the values depend on (seed, name) only, not on the shard split. Both
// inputs go through a full mix: a shift-and-add combine made neighbouring seeds give some
// tensors the same stream (seen with seeds s and s + 1).
uint64_t tensor_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return mix64(mix64(seed) ^ h);
}

Tensor generate(const Desc& d, uint64_t seed) {
  std::mt19937_64 rng(tensor_seed(seed, d.name));
  std::normal_distribution<double> normal(0.0, 1.0);
  Tensor t(d.dtype, d.shape);
  double mean = 0.0, sd = 1.0;
  switch (d.fill) {
    case Fill::Linear: sd = 1.0 / std::sqrt(static_cast<double>(d.shape[d.shape.rank - 1])); break;
    case Fill::Norm: mean = 1.0; sd = 0.05; break;
    case Fill::Bias: sd = 0.01; break;
  }
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), d.dtype, i, mean + sd * normal(rng));
  return t;
}

std::string shard_name(int64_t i, int64_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05lld-of-%05lld.safetensors", static_cast<long long>(i + 1),
                static_cast<long long>(n));
  return buf;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  FP8MOE_CHECK(f.good(), "cannot create ", path.string());
  f << text;
  f.close();
  FP8MOE_CHECK(f.good(), "cannot write ", path.string());
}

}  // namespace

SyntheticInfo write_synthetic_checkpoint(const std::string& dir, const SyntheticSpec& spec) {
  spec.validate();
  const fs::path root(dir);
  FP8MOE_CHECK(!fs::exists(root) || (fs::is_directory(root) && fs::is_empty(root)), "synthetic checkpoint: ",
               dir, " must be absent or an empty directory");
  fs::create_directories(root);

  SyntheticInfo info;
  info.seed = spec.seed ? *spec.seed : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  const Attn attn;
  const std::vector<Desc> descs = tensor_list(spec, attn);
  FP8MOE_CHECK(spec.shards <= static_cast<int64_t>(descs.size()), "synthetic checkpoint: ", spec.shards,
               " shards requested for only ", descs.size(), " tensors");

  uint64_t total = 0;
  for (const Desc& d : descs) total += d.bytes();

  // Contiguous shard split with roughly equal bytes, every shard non-empty.
  json weight_map = json::object();
  size_t next = 0;
  uint64_t done = 0;
  for (int64_t s = 0; s < spec.shards; ++s) {
    const std::string file = spec.shards == 1 ? "model.safetensors" : shard_name(s, spec.shards);
    const uint64_t target = total / spec.shards * (s + 1);
    const size_t remaining_shards = static_cast<size_t>(spec.shards - s - 1);
    SafetensorsWriter w;
    do {
      const Desc& d = descs[next++];
      Tensor t = generate(d, info.seed);
      w.add(d.name, t.view());
      weight_map[d.name] = file;
      done += d.bytes();
      ++info.tensors;
    } while (next < descs.size() - remaining_shards && (s == spec.shards - 1 || done < target));
    w.set_metadata("format", "pt");
    w.write((root / file).string());
  }
  info.bytes = total;

  if (spec.shards > 1) {
    json index;
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = weight_map;
    write_text(root / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  info.config_json = config_for(spec, attn).dump(2) + "\n";
  write_text(root / "config.json", info.config_json);
  return info;
}

}  // namespace fp8moe

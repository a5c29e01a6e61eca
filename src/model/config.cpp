// config.json -> ModelConfig: field aliases across model families, which layers are MoE, and
// the router / activation each family uses.
#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "formats/checked.hpp"
#include "formats/json_bounded.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "model/limits.hpp"

namespace fp8moe {

namespace {

using nlohmann::json;

// The first of `keys` present and not null, or nullptr.
const json* find_field(const json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys) {
    auto it = j.find(k);
    if (it != j.end() && !it->is_null()) return &*it;
  }
  return nullptr;
}

std::string key_list(std::initializer_list<const char*> keys) {
  std::string s;
  for (const char* k : keys) s += (s.empty() ? "" : " | ") + std::string(k);
  return s;
}

int64_t get_int(const json& j, const std::string& src, std::initializer_list<const char*> keys,
                std::optional<int64_t> fallback = std::nullopt) {
  const json* v = find_field(j, keys);
  if (!v) {
    FP8MOE_CHECK(fallback.has_value(), src, ": required field ", key_list(keys), " is missing");
    return *fallback;
  }
  FP8MOE_CHECK(v->is_number_integer(), src, ": field ", key_list(keys), " must be an integer, found ", v->dump());
  FP8MOE_CHECK(!v->is_number_unsigned() || v->get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), src, ": field ",
               key_list(keys), " must be an integer within int64, found ", v->dump());
  return v->get<int64_t>();
}

double get_double(const json& j, const std::string& src, std::initializer_list<const char*> keys,
                  std::optional<double> fallback = std::nullopt) {
  const json* v = find_field(j, keys);
  if (!v) {
    FP8MOE_CHECK(fallback.has_value(), src, ": required field ", key_list(keys), " is missing");
    return *fallback;
  }
  FP8MOE_CHECK(v->is_number(), src, ": field ", key_list(keys), " must be a number, found ", v->dump());
  return v->get<double>();
}

bool get_bool(const json& j, const std::string& src, const char* key, bool fallback) {
  const json* v = find_field(j, {key});
  if (!v) return fallback;
  FP8MOE_CHECK(v->is_boolean(), src, ": field ", key, " must be true or false, found ", v->dump());
  return v->get<bool>();
}

// ---- Range checks against model/limits.hpp, before anything sizes a loop or an allocation.
using model::kMaxExperts, model::kMaxHidden, model::kMaxIntermediate, model::kMaxLayers, model::kMaxRoutedScaling,
    model::kMaxSharedExperts, model::kMaxSwigluLimit;

// The key of `keys` the file uses (for messages), or all of them when none is present (a default).
std::string field_name(const json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (find_field(j, {k})) return k;
  return key_list(keys);
}

void check_range(const json& j, const std::string& src, std::initializer_list<const char*> keys, int64_t v,
                 int64_t lo, int64_t hi, const char* why) {
  FP8MOE_CHECK(v >= lo && v <= hi, src, ": field ", field_name(j, keys), " must be in [", lo, ", ", hi, "] (", why,
               "), found ", v);
}

void check_range(const json& j, const std::string& src, std::initializer_list<const char*> keys, double v,
                 double lo, double hi, const char* why) {
  FP8MOE_CHECK(std::isfinite(v) && v > lo && v <= hi, src, ": field ", field_name(j, keys), " must be in (", lo,
               ", ", hi, "] (", why, "), found ", v);
}

// The fields parse_model_config read, against the limits above and against each other (the two
// that feed arithmetic at once, n_shared_experts and swiglu_limit, are checked where they are read).
void check_ranges(const json& j, const ModelConfig& c) {
  const std::string& s = c.source;
  check_range(j, s, {"num_hidden_layers"}, c.num_hidden_layers, 1, kMaxLayers, "released models have at most ~128");
  check_range(j, s, {"hidden_size"}, c.hidden_size, 1, kMaxHidden, "released models stay below 20000");
  check_range(j, s, {"moe_intermediate_size", "intermediate_size"}, c.moe_intermediate_size, 1, kMaxIntermediate,
              "released models stay below 80000");
  check_range(j, s, {"num_experts", "n_routed_experts", "num_local_experts"}, c.num_experts, 1, kMaxExperts,
              "released models have at most 512 routed experts");
  check_range(j, s, {"shared_expert_intermediate_size"}, c.shared_intermediate_size, 0,
              c.n_shared_experts * kMaxIntermediate, "at most n_shared_experts x the largest intermediate size");
  check_range(j, s, {"first_k_dense_replace"}, c.first_k_dense_replace, 0, c.num_hidden_layers,
              "at most num_hidden_layers");
  check_range(j, s, {"moe_layer_freq"}, c.moe_layer_freq, 1, c.num_hidden_layers, "at most num_hidden_layers");
  check_range(j, s, {"decoder_sparse_step"}, c.decoder_sparse_step, 1, c.num_hidden_layers,
              "at most num_hidden_layers");
  check_range(j, s, {"n_group"}, c.n_group, 1, c.num_experts, "groups of the routed experts");
  check_range(j, s, {"topk_group"}, c.topk_group, 1, c.num_experts, "groups of the routed experts");
  FP8MOE_CHECK(static_cast<int64_t>(c.mlp_only_layers.size()) <= c.num_hidden_layers, s,
               ": field mlp_only_layers lists ", c.mlp_only_layers.size(), " layers, more than num_hidden_layers ",
               c.num_hidden_layers);
  for (int64_t l : c.mlp_only_layers)
    check_range(j, s, {"mlp_only_layers"}, l, 0, c.num_hidden_layers - 1, "entries are layer indices");
  check_range(j, s, {"routed_scaling_factor"}, c.routed_scaling_factor, 0.0, kMaxRoutedScaling,
              "released models use 1 to 16");
}

enum class Family { Qwen, Mixtral, DeepSeek, GptOss };

Family family_of(const std::string& model_type, const std::string& src) {
  if (model_type == "qwen3_moe" || model_type == "qwen2_moe") return Family::Qwen;
  if (model_type == "mixtral") return Family::Mixtral;
  if (model_type == "glm4_moe_lite" || model_type == "glm4_moe" || model_type == "deepseek_v3") return Family::DeepSeek;
  if (model_type == "gpt_oss") return Family::GptOss;
  FP8MOE_FAIL(src, ": model_type \"", model_type,
              "\" is not supported (expected qwen3_moe, qwen2_moe, mixtral, glm4_moe_lite, glm4_moe, deepseek_v3 "
              "or gpt_oss)");
}

}  // namespace

bool is_supported_moe_model_type(const std::string& model_type) {
  for (const char* t : {"qwen3_moe", "qwen2_moe", "mixtral", "glm4_moe_lite", "glm4_moe", "deepseek_v3", "gpt_oss"})
    if (model_type == t) return true;
  return false;
}

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (layer < 0 || layer >= num_hidden_layers) return false;
  switch (router) {
    case RouterKind::SoftmaxTopK:  // Qwen / Mixtral (Mixtral: no mlp_only_layers, step 1)
      for (int64_t d : mlp_only_layers)
        if (d == layer) return false;
      return (layer + 1) % decoder_sparse_step == 0;
    case RouterKind::SigmoidBiasTopK:  // GLM / DeepSeek (dense layers from mlp_layer_types in mlp_only_layers)
      for (int64_t d : mlp_only_layers)
        if (d == layer) return false;
      return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
    case RouterKind::TopKSoftmax:  // GPT-OSS: every layer
      return true;
  }
  return false;
}

std::vector<int64_t> ModelConfig::moe_layers() const {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < num_hidden_layers; ++l)
    if (is_moe_layer(l)) out.push_back(l);
  return out;
}

RouterSpec ModelConfig::router_spec() const {
  FP8MOE_CHECK(n_group <= 1 || topk_group >= n_group, source, ": group-limited routing (n_group ", n_group,
               ", topk_group ", topk_group, ") is not supported; only n_group 1 (or topk_group == n_group)");
  RouterSpec r;
  r.kind = router;
  r.top_k = top_k;
  r.normalize = norm_topk_prob;
  r.scaling = routed_scaling_factor;
  return r;
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json j = parse_json_bounded(json_text, source);
  FP8MOE_CHECK(j.is_object(), source, ": expected a JSON object at the top level, found ", j.type_name());

  ModelConfig c;
  c.source = source;
  const json* mt = find_field(j, {"model_type"});
  FP8MOE_CHECK(mt && mt->is_string(), source, ": required field model_type is missing or not a string");
  c.model_type = mt->get<std::string>();
  if (const json* a = find_field(j, {"architectures"})) {
    FP8MOE_CHECK(a->is_array(), source, ": field architectures must be a list, found ", a->dump());
    for (const json& s : *a) {
      FP8MOE_CHECK(s.is_string(), source, ": architectures entries must be strings, found ", s.dump());
      c.architectures.push_back(s.get<std::string>());
    }
  }
  const Family fam = family_of(c.model_type, source);

  c.hidden_size = get_int(j, source, {"hidden_size"});
  c.num_hidden_layers = get_int(j, source, {"num_hidden_layers"});
  c.num_experts = get_int(j, source, {"num_experts", "n_routed_experts", "num_local_experts"});
  c.top_k = get_int(j, source, {"num_experts_per_tok", "experts_per_token"});
  // Mixtral and GPT-OSS name the expert width intermediate_size; the others keep
  // intermediate_size for their dense layers.
  if (fam == Family::Mixtral || fam == Family::GptOss)
    c.moe_intermediate_size = get_int(j, source, {"intermediate_size"});
  else
    c.moe_intermediate_size = get_int(j, source, {"moe_intermediate_size"});

  FP8MOE_CHECK(c.hidden_size > 0, source, ": hidden_size must be positive, found ", c.hidden_size);
  FP8MOE_CHECK(c.moe_intermediate_size > 0, source, ": the expert intermediate size must be positive, found ",
               c.moe_intermediate_size);
  FP8MOE_CHECK(c.num_hidden_layers > 0, source, ": num_hidden_layers must be positive, found ", c.num_hidden_layers);
  FP8MOE_CHECK(c.num_experts > 0, source, ": the number of routed experts must be positive, found ", c.num_experts);
  FP8MOE_CHECK(c.top_k > 0 && c.top_k <= c.num_experts, source, ": experts per token must be in [1, ", c.num_experts,
               "], found ", c.top_k);

  switch (fam) {
    case Family::Qwen: {
      c.router = RouterKind::SoftmaxTopK;
      c.norm_topk_prob = get_bool(j, source, "norm_topk_prob", false);  // transformers' default
      c.decoder_sparse_step = get_int(j, source, {"decoder_sparse_step"}, 1);
      FP8MOE_CHECK(c.decoder_sparse_step >= 1, source, ": decoder_sparse_step must be >= 1, found ",
                   c.decoder_sparse_step);
      if (const json* m = find_field(j, {"mlp_only_layers"})) {
        FP8MOE_CHECK(m->is_array(), source, ": field mlp_only_layers must be a list, found ", m->dump());
        for (const json& v : *m) {
          FP8MOE_CHECK(v.is_number_integer(), source, ": mlp_only_layers entries must be integers, found ", v.dump());
          c.mlp_only_layers.push_back(v.get<int64_t>());
        }
      }
      if (c.model_type == "qwen2_moe") {
        c.shared_intermediate_size = get_int(j, source, {"shared_expert_intermediate_size"}, 0);
        c.n_shared_experts = c.shared_intermediate_size > 0 ? 1 : 0;
      }
      break;
    }
    case Family::Mixtral:
      c.router = RouterKind::SoftmaxTopK;
      c.norm_topk_prob = true;  // Mixtral always renormalises the kept weights
      break;
    case Family::DeepSeek: {
      c.router = RouterKind::SigmoidBiasTopK;
      c.norm_topk_prob = get_bool(j, source, "norm_topk_prob", true);
      // transformers' defaults differ across these families (1.0 vs 2.5): require it.
      c.routed_scaling_factor = get_double(j, source, {"routed_scaling_factor"});
      // Absent, transformers' default applies: 3 dense layers for deepseek_v3, 1 for the GLM types
      // (glm4_moe_lite says it as mlp_layer_types = ["dense", "sparse", ...]).
      c.first_k_dense_replace = get_int(j, source, {"first_k_dense_replace"}, c.model_type == "deepseek_v3" ? 3 : 1);
      c.moe_layer_freq = get_int(j, source, {"moe_layer_freq"}, 1);
      FP8MOE_CHECK(c.moe_layer_freq >= 1, source, ": moe_layer_freq must be >= 1, found ", c.moe_layer_freq);
      // transformers 5.x configs (save_pretrained, llmcompressor) list every layer's kind instead,
      // and may carry no first_k_dense_replace. Where both are given they must agree.
      if (const json* m = find_field(j, {"mlp_layer_types"})) {
        FP8MOE_CHECK(m->is_array() && static_cast<int64_t>(m->size()) == c.num_hidden_layers, source,
                     ": field mlp_layer_types must list one entry per layer (num_hidden_layers ", c.num_hidden_layers,
                     "), found ", m->dump());
        const bool rule = find_field(j, {"first_k_dense_replace"}) || find_field(j, {"moe_layer_freq"});
        for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
          const json& t = (*m)[static_cast<size_t>(l)];
          FP8MOE_CHECK(t == "dense" || t == "sparse", source, ": mlp_layer_types[", l, "] must be \"dense\" or \"sparse\", found ",
                       t.dump());
          const bool sparse = t == "sparse", by_rule = l >= c.first_k_dense_replace && l % c.moe_layer_freq == 0;
          FP8MOE_CHECK(!rule || sparse == by_rule, source, ": mlp_layer_types makes layer ", l, " ", t.dump(),
                       " but first_k_dense_replace ", c.first_k_dense_replace, " / moe_layer_freq ", c.moe_layer_freq,
                       " make it ", by_rule ? "\"sparse\"" : "\"dense\"", "; the two must agree");
          if (!sparse) c.mlp_only_layers.push_back(l);
        }
        c.first_k_dense_replace = 0;  // the list decides alone
        c.moe_layer_freq = 1;
      }
      c.n_shared_experts = get_int(j, source, {"n_shared_experts"}, 0);
      check_range(j, source, {"n_shared_experts"}, c.n_shared_experts, 0, kMaxSharedExperts,
                  "released models have a few at most");
      c.shared_intermediate_size = checked::mul(c.n_shared_experts, c.moe_intermediate_size, source,
                                                ": the shared intermediate size n_shared_experts x moe_intermediate_size");
      c.n_group = get_int(j, source, {"n_group"}, 1);
      c.topk_group = get_int(j, source, {"topk_group"}, 1);
      break;
    }
    case Family::GptOss: {
      c.router = RouterKind::TopKSoftmax;
      c.norm_topk_prob = true;  // softmax over the k kept sums to one
      c.act.kind = Activation::GptOssGlu;
      c.act.layout = GateUpLayout::Interleaved;
      // transformers 5.x names the sigmoid slope swiglu_alpha; both must fit a float (and be sane).
      const double alpha = get_double(j, source, {"swiglu_alpha"}, 1.702);
      check_range(j, source, {"swiglu_alpha"}, alpha, 0.0, kMaxSwigluLimit, "GPT-OSS uses 1.702");
      c.act.alpha = static_cast<float>(alpha);
      const double limit = get_double(j, source, {"swiglu_limit"}, 7.0);
      check_range(j, source, {"swiglu_limit"}, limit, 0.0, kMaxSwigluLimit, "GPT-OSS uses 7");
      c.act.limit = static_cast<float>(limit);
      break;
    }
  }
  check_ranges(j, c);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FP8MOE_CHECK(f.good(), path, ": cannot open the model config");
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse_model_config(ss.str(), path);
}

}  // namespace fp8moe

// Writes the seed corpus of every fuzz target: make_seeds OUT_DIR -> OUT_DIR/<target>/<seed>.
// The committed corpus (fuzz/corpus/) is its output; rerun it when a format feature is added so
// that the fuzzers start from an input that reaches it.
//
// Seeds are small valid inputs covering each feature once: every expert layout and quantization
// scheme, sharded and single-file checkpoints, every dtype the readers take, and the optional
// parts of the `layer` inputs (backward, LoRA).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fp8moe/convert.hpp"
#include "fp8moe/dtype.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/synthetic.hpp"
#include "fp8moe/tensor.hpp"
#include "fuzz_util.hpp"

namespace fp8moe::fuzz {
namespace {

namespace fs = std::filesystem;

// A tensor of `dtype` filled with small varied values (codes for FP8, indices in [0, mod) for
// integer types).
Tensor filled(DType dtype, Shape shape, int64_t mod = 4) {
  Tensor t(dtype, shape);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == DType::I32) t.ptr<int32_t>()[i] = static_cast<int32_t>(i % mod);
    else if (dtype == DType::I64) t.ptr<int64_t>()[i] = i % mod;
    else if (dtype_size(dtype) == 1) t.ptr<uint8_t>()[i] = static_cast<uint8_t>(17 * i + 3);  // U8, I8, FP8 codes
    else store_from_double(t.data(), dtype, i, 0.25 * static_cast<double>((i * 7) % 11) - 1.0);
  }
  return t;
}

std::string file_bytes(const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
  SafetensorsWriter w;
  for (const auto& [k, v] : metadata) w.set_metadata(k, v);
  for (const auto& [name, t] : tensors) w.add(name, t);
  const fs::path p = scratch_dir() / "seed.safetensors";
  w.write(p.string());
  return read_file(p);
}

void put(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  write_file(dir / name, bytes);
  std::printf("%s/%s: %zu bytes\n", dir.string().c_str(), name.c_str(), bytes.size());
}

// A checkpoint directory as one fuzz_checkpoint input (the file order that target reads).
std::string pack(const fs::path& ck) {
  const char* files[] = {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"};
  std::string out;
  size_t last = 0;  // parts up to the last present file
  std::vector<std::string> parts;
  for (size_t i = 0; i < std::size(files); ++i) {
    parts.push_back(fs::exists(ck / files[i]) ? read_file(ck / files[i]) : std::string());
    if (fs::exists(ck / files[i])) last = i;
  }
  for (size_t i = 0; i <= last; ++i) out += (i ? std::string(kFileSeparator) : std::string()) + parts[i];
  return out;
}

// Rewrites the shards of `ck` without the attention projections other than o_proj and without
// the embeddings: the fuzzer's mutations should land on the tensors the loader judges, and a
// small seed keeps every execution fast. The index follows.
void compact(const fs::path& ck) {
  auto keep = [](const std::string& n) {
    return n.find(".self_attn.") == std::string::npos || n.find(".o_proj.") != std::string::npos;
  };
  std::vector<std::string> dropped;
  for (const char* shard : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    const fs::path p = ck / shard;
    if (!fs::exists(p)) continue;
    SafetensorsWriter w;
    {
      const auto f = SafetensorsFile::open(p.string());
      for (const auto& [k, v] : f->metadata()) w.set_metadata(k, v);
      for (const std::string& n : f->names()) {
        if (keep(n) && n.find("embed") == std::string::npos && n.find("lm_head") == std::string::npos)
          w.add(n, f->view(n));
        else
          dropped.push_back(n);
      }
    }
    w.write(p.string());
  }
  const fs::path index = ck / "model.safetensors.index.json";
  if (!fs::exists(index)) return;
  nlohmann::json j = nlohmann::json::parse(read_file(index));
  for (const std::string& n : dropped) j["weight_map"].erase(n);
  write_file(index, j.dump(1));
}

// A tiny synthetic checkpoint (sharded into the two file names fuzz_checkpoint uses), optionally
// converted to FP8, then compacted.
fs::path synthetic(const std::string& name, SyntheticSpec s, const ConvertOptions* to_fp8) {
  const fs::path dir = scratch_dir() / name;
  s.hidden = 8, s.moe_intermediate = 6, s.dense_intermediate = 8, s.experts = 3, s.top_k = 2, s.vocab = 8;
  s.seed = 15;
  s.shards = 2;
  write_synthetic_checkpoint((dir / "bf16").string(), s);
  fs::path out = dir / "bf16";
  if (to_fp8) {
    out = dir / "fp8";
    convert_checkpoint((dir / "bf16").string(), out.string(), *to_fp8);
  }
  compact(out);
  return out;
}

// GPT-OSS: fused experts stored transposed with interleaved gate/up and biases, a router with a
// bias; plain BF16. Hand-written: the synthetic models cover GLM and Qwen3 only.
fs::path gpt_oss() {
  const int64_t E = 4, H = 8, I = 6;
  const fs::path dir = scratch_dir() / "gpt_oss";
  fs::create_directories(dir);
  const std::string p = "model.layers.0.mlp.";
  SafetensorsWriter w;
  w.add(p + "experts.gate_up_proj", filled(DType::BF16, Shape{E, H, 2 * I}));
  w.add(p + "experts.gate_up_proj_bias", filled(DType::BF16, Shape{E, 2 * I}));
  w.add(p + "experts.down_proj", filled(DType::BF16, Shape{E, I, H}));
  w.add(p + "experts.down_proj_bias", filled(DType::BF16, Shape{E, H}));
  w.add(p + "router.weight", filled(DType::BF16, Shape{E, H}));
  w.add(p + "router.bias", filled(DType::BF16, Shape{E}));
  w.write((dir / "model-00001-of-00002.safetensors").string());
  write_file(dir / "config.json", nlohmann::json{{"model_type", "gpt_oss"}, {"hidden_size", H}, {"intermediate_size", I},
                                                 {"num_local_experts", E}, {"experts_per_token", 2},
                                                 {"num_hidden_layers", 1}, {"swiglu_limit", 7.0}}
                                      .dump());
  return dir;
}

void safetensors_seeds(const fs::path& out, const fs::path& fp8_ck) {
  put(out, "mixed_dtypes", file_bytes({{"a", filled(DType::F32, Shape{2, 3})}, {"b", filled(DType::BF16, Shape{4})},
                                       {"c", filled(DType::I64, Shape{2}, 99)}, {"d", filled(DType::U8, Shape{3})}},
                                      {{"format", "pt"}}));
  put(out, "fp8_with_scale", file_bytes({{"w.weight", filled(DType::F8_E4M3, Shape{4, 4})},
                                         {"w.weight_scale_inv", filled(DType::F32, Shape{1, 1})},
                                         {"v.weight", filled(DType::F8_E5M2, Shape{2, 4})},
                                         {"v.weight_scale", filled(DType::F16, Shape{2, 1})}}));
  put(out, "empty_and_scalar", file_bytes({{"empty", Tensor(DType::F32, Shape{0, 5})},
                                           {"scalar", filled(DType::F32, Shape{})},
                                           {"rank6", filled(DType::I8, Shape{1, 2, 1, 2, 1, 2})}}));
  // Sub-byte dtypes are readable but not writable: a hand-made header, unpadded (the tensor
  // starts unaligned).
  const std::string header = R"({"f4":{"dtype":"F4","shape":[4],"data_offsets":[0,2]},)"
                             R"("e8":{"dtype":"F8_E8M0","shape":[3],"data_offsets":[2,5]}})";
  std::string raw(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(raw.data(), &n, 8);
  put(out, "sub_byte_unaligned", raw + header + "\x12\x34\x7f\x80\x81");
  put(out, "model_shard", read_file(fp8_ck / "model-00001-of-00002.safetensors"));
}

void config_seeds(const fs::path& out) {
  using nlohmann::json;
  const json ct_weights = {{"num_bits", 8}, {"type", "float"}, {"symmetric", true}, {"dynamic", false}};
  auto ct = [&](json weights) {
    return json{{"quant_method", "compressed-tensors"}, {"format", "float-quantized"},
                {"quantization_status", "compressed"}, {"ignore", {"lm_head", "re:.*mlp\\.gate$"}},
                {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", weights},
                                                {"input_activations", {{"num_bits", 8}, {"type", "float"},
                                                                       {"strategy", "token"}, {"dynamic", true}}}}}}}};
  };
  json block = ct_weights, group = ct_weights, tensor = ct_weights;
  block["strategy"] = "block", block["block_structure"] = {128, 128};
  group["strategy"] = "group", group["group_size"] = 64;
  tensor["strategy"] = "tensor";
  const json mixtral = {{"model_type", "mixtral"}, {"architectures", {"MixtralForCausalLM"}}, {"hidden_size", 4096},
                        {"intermediate_size", 14336}, {"num_local_experts", 8}, {"num_experts_per_tok", 2},
                        {"num_hidden_layers", 32}, {"quantization_config", ct(block)}};
  const json qwen2 = {{"model_type", "qwen2_moe"}, {"hidden_size", 2048}, {"moe_intermediate_size", 1408},
                      {"num_experts", 60}, {"num_experts_per_tok", 4}, {"num_hidden_layers", 24},
                      {"decoder_sparse_step", 2}, {"mlp_only_layers", {0, 5}}, {"norm_topk_prob", false},
                      {"shared_expert_intermediate_size", 5632}, {"quantization_config", ct(group)}};
  const json deepseek = {{"model_type", "deepseek_v3"}, {"hidden_size", 7168}, {"moe_intermediate_size", 2048},
                         {"n_routed_experts", 256}, {"n_shared_experts", 1}, {"num_experts_per_tok", 8},
                         {"num_hidden_layers", 61}, {"first_k_dense_replace", 3}, {"moe_layer_freq", 1},
                         {"routed_scaling_factor", 2.5}, {"n_group", 8}, {"topk_group", 4},
                         {"quantization_config", {{"quant_method", "fp8"}, {"fmt", "e4m3"},
                                                  {"activation_scheme", "dynamic"},
                                                  {"weight_block_size", {128, 128}},
                                                  {"modules_to_not_convert", {"lm_head", "model.layers.0.mlp"}}}}};
  const json gpt = {{"model_type", "gpt_oss"}, {"hidden_size", 2880}, {"intermediate_size", 2880},
                    {"num_local_experts", 32}, {"experts_per_token", 4}, {"num_hidden_layers", 24},
                    {"swiglu_limit", 7.0}, {"quantization_config", ct(tensor)}};
  put(out, "mixtral_ct_block", mixtral.dump(1));
  put(out, "qwen2_ct_group", qwen2.dump(1));
  put(out, "deepseek_fp8", deepseek.dump(1));
  put(out, "gpt_oss_ct_tensor", gpt.dump(1));
}

void layer_inputs_seeds(const fs::path& out) {
  const int64_t T = 3, H = 16, I = 12, E = 4, r = 2;
  const std::vector<std::pair<std::string, Tensor>> base = {{"hidden_states", filled(DType::BF16, Shape{T, H})},
                                                            {"topk_ids", filled(DType::I32, Shape{T, 2}, E)},
                                                            {"topk_weights", filled(DType::F32, Shape{T, 2})}};
  put(out, "forward", file_bytes(base));
  auto backward = base;
  backward.push_back({"grad_output", filled(DType::F32, Shape{T, H})});
  put(out, "backward", file_bytes(backward));
  auto lora = backward;
  lora.push_back({"gate_up_proj.lora_A", filled(DType::F32, Shape{E * r, H})});
  lora.push_back({"gate_up_proj.lora_B", filled(DType::F32, Shape{2 * I, E * r})});
  lora.push_back({"down_proj.lora_A", filled(DType::F32, Shape{E * r, I})});
  lora.push_back({"down_proj.lora_B", filled(DType::F32, Shape{H, E * r})});
  lora.push_back({"lora_scaling", filled(DType::F32, Shape{})});
  put(out, "backward_lora", file_bytes(lora));
  put(out, "forward_i64_bf16_f16_lora",
      file_bytes({{"hidden_states", filled(DType::F32, Shape{T, H})},
                  {"topk_ids", filled(DType::I64, Shape{T, 2}, E)},
                  {"topk_weights", filled(DType::BF16, Shape{T, 2})},
                  {"down_proj.lora_A", filled(DType::F16, Shape{E * r, I})},
                  {"down_proj.lora_B", filled(DType::F16, Shape{H, E * r})},
                  {"lora_scaling", filled(DType::F32, Shape{})}}));
  put(out, "no_tokens", file_bytes({{"hidden_states", Tensor(DType::BF16, Shape{0, H})},
                                    {"topk_ids", Tensor(DType::I32, Shape{0, 2})},
                                    {"topk_weights", Tensor(DType::F32, Shape{0, 2})},
                                    {"grad_output", Tensor(DType::F32, Shape{0, H})}}));
}

}  // namespace
}  // namespace fp8moe::fuzz

int main(int argc, char** argv) {
  using namespace fp8moe;
  using namespace fp8moe::fuzz;
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds OUT_DIR\n");
    return 2;
  }
  const fs::path out = argv[1];
  ConvertOptions block, channel;
  block.to = channel.to = ConvertTarget::FP8;
  block.scheme = ScaleKind::Block, block.block = 8;
  channel.scheme = ScaleKind::Channel;
  SyntheticSpec glm = SyntheticSpec::glm4_moe_lite();
  glm.layers = 2;
  const fs::path glm_block = synthetic("glm_block", glm, &block);
  const fs::path qwen_channel = synthetic("qwen_channel", SyntheticSpec::qwen3_moe(), &channel);
  const fs::path glm_plain = synthetic("glm_plain", glm, nullptr);
  const fs::path gpt = gpt_oss();
  const std::pair<const char*, fs::path> checkpoints[] = {
      {"glm_fp8_block", glm_block}, {"qwen3_ct_channel", qwen_channel}, {"glm_bf16", glm_plain}, {"gpt_oss_bf16", gpt}};
  for (const auto& [name, ck] : checkpoints) {
    put(out / "checkpoint", name, pack(ck));
    if (ck != gpt) put(out / "config", name, read_file(ck / "config.json"));
  }
  safetensors_seeds(out / "safetensors", glm_block);
  config_seeds(out / "config");
  layer_inputs_seeds(out / "layer_inputs");
  return 0;
}

// A PEFT LoRA adapter folder (peft_adapter.hpp).
#include "peft_adapter.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <vector>

#include "fp8moe/error.hpp"

namespace fs = std::filesystem;

namespace fp8moe::cli {

namespace {

bool ends_with_at_dot(const std::string& s, const std::string& tail) {
  if (tail.size() > s.size() || s.compare(s.size() - tail.size(), tail.size(), tail) != 0) return false;
  return tail.size() == s.size() || s[s.size() - tail.size() - 1] == '.';
}

// The expert parameters of layer `layer` that target_parameters names, in the order listed (the
// first one listed is the innermost wrapper).
std::vector<std::string> targeted(const std::vector<std::string>& targets, const std::string& experts_module) {
  std::vector<std::string> out;
  for (const std::string& t : targets)
    for (const char* p : {"gate_up_proj", "down_proj"}) {
      const std::string full = experts_module + "." + p;
      if (ends_with_at_dot(full, t) && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    }
  return out;
}

}  // namespace

PeftAdapter PeftAdapter::open(const std::string& dir) {
  PeftAdapter a;
  a.dir_ = dir;
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  const fs::path st_path = fs::path(dir) / "adapter_model.safetensors";
  FP8MOE_CHECK(fs::is_directory(dir), "--adapter '", dir, "': expected a PEFT adapter folder (adapter_config.json + "
                                      "adapter_model.safetensors)");
  FP8MOE_CHECK(fs::is_regular_file(cfg_path), "--adapter '", dir, "': no adapter_config.json in it");
  FP8MOE_CHECK(fs::is_regular_file(st_path), "--adapter '", dir, "': no adapter_model.safetensors in it");
  std::ifstream f(cfg_path);
  std::stringstream ss;
  ss << f.rdbuf();
  nlohmann::json c;
  try {
    c = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    FP8MOE_FAIL(cfg_path.string(), ": not valid JSON: ", e.what());
  }
  const std::string src = cfg_path.string();
  FP8MOE_CHECK(c.is_object(), src, ": expected a JSON object");
  if (c.contains("peft_type") && !c["peft_type"].is_null())
    FP8MOE_CHECK(c["peft_type"] == "LORA", src, ": peft_type ", c["peft_type"].dump(), " is not supported (expected \"LORA\")");
  FP8MOE_CHECK(c.contains("r") && c["r"].is_number_integer() && c["r"].get<int64_t>() > 0, src,
               ": field r must be a positive integer, found ", c.contains("r") ? c["r"].dump() : std::string("none"));
  a.r_ = c["r"].get<int64_t>();
  FP8MOE_CHECK(c.contains("lora_alpha") && c["lora_alpha"].is_number(), src, ": field lora_alpha must be a number, found ",
               c.contains("lora_alpha") ? c["lora_alpha"].dump() : std::string("none"));
  const double alpha = c["lora_alpha"].get<double>();
  const bool rslora = c.value("use_rslora", false);
  a.scaling_ = rslora ? alpha / std::sqrt(static_cast<double>(a.r_)) : alpha / static_cast<double>(a.r_);
  for (const char* unsupported : {"use_dora", "lora_bias"})
    FP8MOE_CHECK(!c.contains(unsupported) || !c[unsupported].is_boolean() || !c[unsupported].get<bool>(), src, ": ",
                 unsupported, " true is not supported");
  for (const char* pattern : {"rank_pattern", "alpha_pattern"})
    FP8MOE_CHECK(!c.contains(pattern) || c[pattern].is_null() || c[pattern].empty(), src, ": ", pattern, " ",
                 c[pattern].dump(), " is not supported (one rank and alpha for every module)");
  std::vector<std::string> targets;
  if (c.contains("target_parameters") && c["target_parameters"].is_array())
    for (const auto& t : c["target_parameters"]) {
      FP8MOE_CHECK(t.is_string(), src, ": target_parameters entries must be strings, found ", t.dump());
      targets.push_back(t.get<std::string>());
    }
  FP8MOE_CHECK(!targets.empty(), src, ": no target_parameters; expected the experts' parameters (e.g. "
                                      "[\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"])");

  a.file_ = SafetensorsFile::open(st_path.string());
  // [base_model.model.]model.layers.L.(mlp|block_sparse_moe).experts.(base_layer.)*lora_(A|B)[.adapter].weight
  static const std::regex key(
      R"(^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts)\.((?:base_layer\.)*)lora_([AB])(?:\.[^.]+)?\.weight$)");
  for (const std::string& k : a.file_->names()) {
    std::smatch m;
    if (!std::regex_match(k, m, key)) continue;
    const int64_t layer = std::stoll(m[2].str());
    const std::vector<std::string> params = targeted(targets, m[1].str());
    const int64_t depth = static_cast<int64_t>(m[3].length() / std::string("base_layer.").size());
    FP8MOE_CHECK(depth < static_cast<int64_t>(params.size()), st_path.string(), ": tensor ", k, " is nested ", depth,
                 " wrapper(s) deep, but target_parameters names ", params.size(), " parameter(s) of ", m[1].str(),
                 " (expected one per wrapper)");
    const std::string& param = params[params.size() - 1 - static_cast<size_t>(depth)];
    Pair& p = a.pairs_[{layer, param}];
    (m[4] == "A" ? p.a : p.b) = k;
  }
  for (const auto& [where, p] : a.pairs_)
    FP8MOE_CHECK(!p.a.empty() && !p.b.empty(), st_path.string(), ": layer ", where.first, " ", where.second, ": found ",
                 p.a.empty() ? p.b : p.a, " without its ", p.a.empty() ? "lora_A" : "lora_B");
  FP8MOE_CHECK(!a.pairs_.empty(), st_path.string(), ": no LoRA tensors on routed experts (expected keys like "
                                  "base_model.model.model.layers.L.mlp.experts.lora_A.weight)");
  return a;
}

std::set<int64_t> PeftAdapter::layers() const {
  std::set<int64_t> out;
  for (const auto& [where, p] : pairs_) out.insert(where.first);
  return out;
}

std::optional<PeftAdapter::Pair> PeftAdapter::find(int64_t layer, const std::string& param) const {
  const auto it = pairs_.find({layer, param});
  if (it == pairs_.end()) return std::nullopt;
  return it->second;
}

}  // namespace fp8moe::cli

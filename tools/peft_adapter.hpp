// A PEFT LoRA adapter folder as PEFT saves it (adapter_config.json + adapter_model.safetensors),
// read for the expert parameters it targets with `target_parameters`.
//
// PEFT wraps each targeted parameter of a module in a ParamWrapper; several targeted parameters
// of one module (experts.gate_up_proj and experts.down_proj) nest, the first one listed in
// target_parameters innermost. The saved keys therefore tell them apart by depth:
//   base_model.model.model.layers.L.mlp.experts.base_layer.lora_A.weight  (first listed, here gate_up_proj)
//   base_model.model.model.layers.L.mlp.experts.lora_A.weight             (last listed, here down_proj)
// (one "base_layer." per wrapper outside it; an adapter name such as ".default" may follow lora_A).
// lora_A is [E*r, in] and lora_B [out, E*r], PEFT's flattened layout (lora.hpp); the scaling is
// lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "fp8moe/safetensors.hpp"

namespace fp8moe::cli {

class PeftAdapter {
 public:
  // Reads and checks DIR/adapter_config.json and opens DIR/adapter_model.safetensors.
  static PeftAdapter open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  int64_t rank() const { return r_; }
  double scaling() const { return scaling_; }
  // The layers whose routed experts the adapter holds LoRA pairs for.
  std::set<int64_t> layers() const;
  // The lora_A / lora_B keys of parameter `param` ("gate_up_proj" or "down_proj") of layer
  // `layer`'s experts, or nullopt when the adapter does not target it there.
  struct Pair {
    std::string a, b;
  };
  std::optional<Pair> find(int64_t layer, const std::string& param) const;
  const SafetensorsFile& file() const { return *file_; }

 private:
  std::string dir_;
  int64_t r_ = 0;
  double scaling_ = 1.0;
  std::shared_ptr<SafetensorsFile> file_;
  // (layer, parameter) -> keys
  std::map<std::pair<int64_t, std::string>, Pair> pairs_;
};

}  // namespace fp8moe::cli

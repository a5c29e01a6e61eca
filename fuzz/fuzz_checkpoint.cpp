// libFuzzer target: a whole checkpoint, opened from a temporary directory - config.json with its
// quantization_config, one or two safetensors shards, and optionally model.safetensors.index.json
// - then inspected, every MoE layer the config names loaded, and every Linear weight and stored
// tensor loaded by name.
//
// An input is the files' bytes joined by kFileSeparator, in this order (absent parts: no file):
//   config.json, model-00001-of-00002.safetensors, model-00002-of-00002.safetensors,
//   model.safetensors.index.json
// Properties: open, inspect, load_moe_layer, load_linear and load_tensor either throw
// fp8moe::Error or succeed; inspect() never throws; a loaded layer's (or Linear's) stacks
// validate against their scale specs, and a layer's have the experts, widths and hidden size the
// report announced.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "fuzz_util.hpp"

namespace fp8moe::fuzz {
namespace {

constexpr const char* kFiles[] = {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                  "model.safetensors.index.json"};

void check_loaded(const MoeLayerWeights& w, const LayerReport& r) {
  const ExpertStack& s = w.routed;
  s.gate_up.view().validate("loaded gate_up");
  s.down.view().validate("loaded down");
  if (s.experts() != r.experts || r.projections.size() < 2 || s.gate_up.data.shape() != r.projections[0].shape ||
      s.down.data.shape() != r.projections[1].shape)
    fuzz_fail("layer " + std::to_string(w.layer) + ": the loaded stacks differ from the inspection report");
  if (w.shared) {
    w.shared->gate_up.view().validate("loaded shared gate_up");
    w.shared->down.view().validate("loaded shared down");
  }
  (void)s.view();
  (void)w.router.view();
}

}  // namespace
}  // namespace fp8moe::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fp8moe;
  using namespace fp8moe::fuzz;
  namespace fs = std::filesystem;
  const fs::path dir = scratch_dir() / "ckpt";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::vector<std::string_view> parts = split_files({reinterpret_cast<const char*>(data), size});
  for (size_t i = 0; i < parts.size() && i < std::size(kFiles); ++i) write_file(dir / kFiles[i], parts[i]);

  std::optional<Checkpoint> ck;
  try {
    ck.emplace(Checkpoint::open(dir.string()));
  } catch (const Error&) {
    return 0;
  }
  InspectionReport report;
  try {
    report = ck->inspect();
  } catch (const std::exception& e) {
    fuzz_fail(std::string("inspect() threw: ") + e.what());
  }
  (void)report.str();
  for (const LayerReport& lr : report.layers) {
    if (lr.kind != LayerKind::Moe) continue;
    std::optional<MoeLayerWeights> w;
    try {
      w = ck->load_moe_layer(lr.index);
    } catch (const Error&) {
      continue;  // a layer inspect judged loadable may still fail on its values (a NaN scale)
    }
    if (lr.projections.empty()) fuzz_fail("layer " + std::to_string(lr.index) + " loads but inspect found a problem");
    try {
      check_loaded(*w, lr);
    } catch (const Error& e) {
      fuzz_fail("layer " + std::to_string(lr.index) + " loaded stacks that do not validate: " + e.what());
    }
  }
  // The rest of the public loader: every Linear weight and every stored tensor by name.
  for (const std::string& name : ck->store().names()) {
    constexpr std::string_view kWeight = ".weight";
    if (name.size() > kWeight.size() && name.compare(name.size() - kWeight.size(), kWeight.size(), kWeight) == 0) {
      std::optional<LinearStack> lin;
      try {
        lin = ck->load_linear(name.substr(0, name.size() - kWeight.size()));
      } catch (const Error&) {
      }
      if (lin) {
        try {
          lin->weight.view().validate("loaded Linear");
        } catch (const Error& e) {
          fuzz_fail("Linear " + name + " loaded a stack that does not validate: " + e.what());
        }
      }
    }
    try {
      (void)ck->load_tensor(name);
    } catch (const Error&) {
    }
  }
  return 0;
}

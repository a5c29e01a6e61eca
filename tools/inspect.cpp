// fp8moe inspect PATH [--json]
//
// What a checkpoint holds and whether fp8moe can load it: architecture, quantization format and
// scheme, per layer MoE or dense with its experts' dtypes, scale schemes and bytes, shared experts,
// and every problem found. Exit status 0 when loadable, 1 otherwise (problems on stderr). With
// --json, stdout always holds one JSON report, also when the checkpoint cannot even be opened.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "command.hpp"
#include "files.hpp"
#include "fp8moe/checkpoint.hpp"

namespace fp8moe::cli {
namespace {

using json = nlohmann::ordered_json;

constexpr const char* kUsage =
    "usage: fp8moe inspect PATH [--json]\n"
    "\n"
    "PATH: a checkpoint directory (config.json + safetensors, sharded or not) or one .safetensors file.\n"
    "Prints the architecture, the quantization format and scheme, each layer (MoE or dense, experts,\n"
    "dtype, scale scheme, FP8 or plain, bytes, shared experts) and every problem found.\n"
    "--json prints the same as one JSON object (always one, with \"loadable\": false and an \"error\" where\n"
    "the checkpoint could not be read). Exit status: 0 loadable, 1 not (or unreadable).\n";

// One line for the quantization format as config.json declares it.
std::string format_line(const QuantConfig& q) {
  switch (q.method) {
    case QuantMethod::None: return "none (no quantization_config: plain weights)";
    case QuantMethod::Fp8:
      return "fp8 (fine-grained), weights " + std::string(dtype_name(q.fp8_weights.dtype)) + " " + q.fp8_weights.str() +
             ", activations " + (q.activation_scheme.empty() ? std::string("dynamic") : q.activation_scheme);
    case QuantMethod::CompressedTensors: {
      std::string s = "compressed-tensors " + q.format + " (" + q.quantization_status + ")";
      for (const QuantGroup& g : q.groups)
        s += ", " + g.name + ": weights " + std::string(dtype_name(g.weights.dtype)) + " " + g.weights.str() +
             ", activations " + (g.activation_strategy.empty() ? std::string("none") : "dynamic per " + g.activation_strategy);
      return s;
    }
  }
  return quant_method_name(q.method);
}

json to_json(const InspectionReport& r, const std::string& format) {
  json j;
  j["fp8moe_version"] = version();
  j["path"] = r.path;
  j["model_type"] = r.model_type;
  j["quant_method"] = quant_method_name(r.method);
  j["format"] = format;
  j["loadable"] = r.ok();
  j["tensors"] = r.tensors;
  j["bytes"] = r.bytes;
  j["layers"] = json::array();
  for (const LayerReport& l : r.layers) {
    json lj;
    lj["index"] = l.index;
    lj["kind"] = layer_kind_name(l.kind);
    if (l.kind == LayerKind::Moe) {
      lj["layout"] = expert_layout_name(l.layout);
      lj["experts"] = l.experts;
      lj["shared_experts"] = l.shared_experts;
    }
    lj["bytes"] = l.bytes;
    if (!l.note.empty()) lj["note"] = l.note;
    lj["projections"] = json::array();
    for (const ProjectionReport& p : l.projections)
      lj["projections"].push_back({{"name", p.name},
                                   {"shape", p.shape.vec()},
                                   {"dtype", dtype_name(p.dtype)},
                                   {"fp8", p.fp8()},
                                   {"scale", p.fp8() ? p.spec.str() : std::string("none")},
                                   {"bytes", p.bytes}});
    j["layers"].push_back(lj);
  }
  j["problems"] = r.problems;
  j["notes"] = r.notes;
  return j;
}

int run_inspect(const std::vector<std::string>& argv) {
  const Args args(argv, {}, {"json"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(1, "PATH");
  const std::string& path = args.positional()[0];
  std::optional<Checkpoint> ck;
  try {
    expect_not_json(path, "checkpoint");
    ck = Checkpoint::open(path);
  } catch (const Error& e) {
    if (!args.has("json")) throw;
    // Reading stopped early: still one report, saying where.
    json j;
    j["fp8moe_version"] = version();
    j["path"] = path;
    j["loadable"] = false;
    j["problems"] = json::array({e.message()});
    j["notes"] = json::array();
    j["error"] = e.message();
    std::printf("%s\n", j.dump(2).c_str());
    throw;
  }
  InspectionReport r = ck->inspect();
  // A lone .safetensors file without config.json can be inspected, but nothing can load it: the
  // router, the activation and the quantization scheme come from config.json.
  const bool has_config = !ck->model_type().empty();
  if (!has_config)
    r.problems.push_back("no config.json beside " + r.path +
                         ": the tensors were inspected, but loading needs the checkpoint's config.json");
  const std::string format = has_config ? format_line(ck->quant()) : "unknown (no config.json)";
  if (args.has("json")) {
    std::printf("%s\n", to_json(r, format).dump(2).c_str());
  } else {
    std::printf("format       %s\n%s", format.c_str(), r.str().c_str());
  }
  if (r.ok()) return 0;
  std::fprintf(stderr, "fp8moe inspect: error: %s: %zu problem%s; the checkpoint will not load:\n", r.path.c_str(),
               r.problems.size(), r.problems.size() == 1 ? "" : "s");
  for (const std::string& p : r.problems) std::fprintf(stderr, "  - %s\n", p.c_str());
  return 1;
}

}  // namespace

FP8MOE_COMMAND(inspect, "show a checkpoint's format, layers, experts and problems (exit 1 if not loadable)", run_inspect);

}  // namespace fp8moe::cli

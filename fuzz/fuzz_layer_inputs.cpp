// libFuzzer target: the inputs file of `fp8moe layer` (hidden_states, topk_ids, topk_weights,
// optional grad_output and PEFT LoRA adapters with lora_scaling), run through the CLI command
// itself (tools/layer.cpp, linked in) on a small FP8 checkpoint made once at start-up:
// Qwen3-style, H 16, I 12 (not a multiple of the 8-wide blocks), 4 experts, block-FP8 experts.
//
// Properties: the command either refuses the file with fp8moe::Error or runs forward (and
// backward when grad_output is given) on the CPU backend and writes an output file holding
// `output` [T, 16] F32.
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "command.hpp"
#include "fp8moe/convert.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/synthetic.hpp"
#include "fuzz_util.hpp"

namespace fp8moe::cli {
std::vector<Command>& registry() {  // tools/main.cpp's, which this target does not link
  static std::vector<Command> r;
  return r;
}
}  // namespace fp8moe::cli

namespace fp8moe::fuzz {
namespace {

constexpr int64_t kHidden = 16;

// The checkpoint every input runs against, written once per process.
const std::string& checkpoint_dir() {
  static const std::string dir = [] {
    const auto bf16 = scratch_dir() / "bf16", fp8 = scratch_dir() / "fp8";
    SyntheticSpec s = SyntheticSpec::qwen3_moe();
    s.hidden = kHidden, s.moe_intermediate = 12, s.experts = 4, s.top_k = 2, s.layers = 1, s.vocab = 8;
    s.dense_intermediate = 16;
    s.seed = 15;
    write_synthetic_checkpoint(bf16.string(), s);
    ConvertOptions o;
    o.to = ConvertTarget::FP8;
    o.scheme = ScaleKind::Block;
    o.block = 8;
    convert_checkpoint(bf16.string(), fp8.string(), o);
    return fp8.string();
  }();
  return dir;
}

const cli::Command& layer_command() {
  for (const cli::Command& c : cli::registry())
    if (std::string_view(c.name) == "layer") return c;
  fuzz_fail("the layer command is not registered");
}

}  // namespace
}  // namespace fp8moe::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The command reports each run on stdout; libFuzzer reports on stderr.
  if (!std::freopen("/dev/null", "w", stdout)) fp8moe::fuzz::fuzz_fail("cannot silence stdout");
  (void)fp8moe::fuzz::checkpoint_dir();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fp8moe;
  using namespace fp8moe::fuzz;
  const std::string in = (scratch_dir() / "inputs.safetensors").string();
  const std::string out = (scratch_dir() / "out.safetensors").string();
  write_file(in, {reinterpret_cast<const char*>(data), size});
  std::remove(out.c_str());
  try {
    layer_command().run({checkpoint_dir(), "--layer", "0", "--inputs", in, "--out", out, "--backend", "cpu"});
  } catch (const Error&) {
    return 0;
  }
  try {
    const auto f = SafetensorsFile::open(out);
    const SafetensorsEntry& o = f->entry("output");
    if (o.dtype != DType::F32 || o.shape.rank != 2 || o.shape[1] != kHidden)
      fuzz_fail("the output is not [T, 16] F32: " + o.shape.str());
  } catch (const Error& e) {
    fuzz_fail(std::string("the layer command succeeded without a readable output: ") + e.what());
  }
  return 0;
}

// Hostile config.json values (issue 15): counts that used to hang the loader for minutes, a
// product that overflowed (undefined behaviour), and every range check and cross-check that now
// refuses them at once with a message naming the file, the field, the limit and the value.
//
// The hangs are run in a child process with a deadline, so that a regression fails in seconds
// instead of stalling the suite; the overflow is caught by the sanitizer build
// (scripts/sanitize_fuzz.sh), where the old code reports "signed integer overflow".
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "formats/safetensors_test_util.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/safetensors.hpp"
#include "model/ckpt_builder.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

using fp8moe::test::expect_error;
using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

using testing::CkptBuilder;
using testing::CkptOptions;
using testing::TempDir;

// What a child process made of one call: the fp8moe::Error message, or why there is none.
struct Outcome {
  bool finished = false;  // within the deadline
  int exit_code = -1;     // 0: threw fp8moe::Error, 1: returned, 2: another exception; -1: signal
  std::string message;    // the Error's what()
  double seconds = 0;
};

// Waits for child `pid` at most `deadline_s` seconds, then kills it. True when it finished.
bool wait_bounded(pid_t pid, int& status, double deadline_s) {
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < deadline_s) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return true;
    ::usleep(5'000);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return false;
}

// Runs `fn` in a child process and waits at most `deadline_s` (the old code took minutes, the
// fixed one milliseconds; the slack covers sanitizer builds on a loaded machine).
template <typename F>
Outcome run_bounded(F&& fn, double deadline_s = 10.0) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("test: pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("test: fork failed");
  if (pid == 0) {
    ::close(fds[0]);
    int code = 1;
    std::string msg;
    try {
      fn();
    } catch (const Error& e) {
      code = 0, msg = e.what();
    } catch (const std::exception& e) {
      code = 2, msg = e.what();
    }
    for (size_t off = 0; off < msg.size();) {
      const ssize_t w = ::write(fds[1], msg.data() + off, msg.size() - off);
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    ::_exit(code);
  }
  ::close(fds[1]);
  Outcome out;
  int status = 0;
  const auto t0 = std::chrono::steady_clock::now();
  out.finished = wait_bounded(pid, status, deadline_s);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  char buf[4096];
  for (ssize_t r; (r = ::read(fds[0], buf, sizeof buf)) > 0;) out.message.append(buf, static_cast<size_t>(r));
  ::close(fds[0]);
  if (out.finished && WIFEXITED(status)) out.exit_code = WEXITSTATUS(status);
  return out;
}

// Opens and inspects `dir` in a child: it must finish in time and throw fp8moe::Error naming
// every one of `parts`.
void expect_prompt_error(const std::string& dir, const std::vector<std::string>& parts) {
  const Outcome o = run_bounded([&] {
    const Checkpoint ck = Checkpoint::open(dir);
    (void)ck.inspect();
    for (int64_t l : ck.moe_layers()) (void)ck.load_moe_layer(l);
  });
  ASSERT_TRUE(o.finished) << "Checkpoint::open + inspect on " << dir << " ran past the deadline (" << o.seconds
                          << " s): a loop bounded by an unvalidated config value";
  ASSERT_EQ(o.exit_code, 0) << "expected fp8moe::Error (0); 1 = accepted, 2 = another exception, -1 = signal: "
                            << o.message;
  for (const std::string& p : parts) EXPECT_NE(o.message.find(p), std::string::npos) << "missing \"" << p << "\" in: " << o.message;
}

// A small valid checkpoint of `model_type` whose config field `field` is replaced by the JSON
// number `value` (written verbatim: 2^64 - 1 does not fit the builder's int64 JSON).
std::string hostile_checkpoint(const TempDir& d, const std::string& name, const std::string& model_type,
                               const std::string& field, const std::string& value) {
  CkptOptions o;
  o.model_type = model_type;
  if (model_type == "glm4_moe_lite") o.shared = true;
  CkptBuilder b(o, fresh_seed());
  b.config[field] = 12345;  // a marker replaced below by the verbatim value
  const std::string dir = d.file(name);
  b.write(dir);
  std::string text = b.config.dump(2);
  fp8moe::test::replace_once(text, "\"" + field + "\": 12345", "\"" + field + "\": " + value);
  testing::write_file(dir + "/config.json", text);
  return dir;
}

// ---- 1. the hangs of the issue: huge layer and expert counts --------------------------------

TEST(HostileConfig, HugeLayerCountIsRefusedAtOnce) {
  TempDir d;
  for (const std::string v : {"2147483648", "9223372036854775807"}) {
    SCOPED_TRACE(v);
    const std::string dir = hostile_checkpoint(d, "layers" + v, "qwen3_moe", "num_hidden_layers", v);
    expect_prompt_error(dir, {dir + "/config.json", "field num_hidden_layers", "must be in [1, 1024]", "found " + v});
  }
  const std::string dir = hostile_checkpoint(d, "layers-u64", "qwen3_moe", "num_hidden_layers", "18446744073709551615");
  expect_prompt_error(dir, {"num_hidden_layers", "within int64", "found 18446744073709551615"});
}

TEST(HostileConfig, HugeExpertCountIsRefusedAtOnce) {
  TempDir d;
  const std::pair<std::string, std::string> fields[] = {
      {"qwen3_moe", "num_experts"}, {"glm4_moe_lite", "n_routed_experts"}, {"gpt_oss", "num_local_experts"}};
  for (const auto& [model_type, field] : fields)
    for (const std::string v : {"2147483648", "4294967296", "9223372036854775807"}) {
      SCOPED_TRACE(field + " = " + v);
      const std::string dir = hostile_checkpoint(d, field + v, model_type, field, v);
      expect_prompt_error(dir, {"config.json", "field " + field, "must be in [1, 4096]", "found " + v});
    }
}

// ---- 2. the overflow of the issue: n_shared_experts x moe_intermediate_size ------------------

TEST(HostileConfig, SharedExpertCountCannotOverflowTheSharedWidth) {
  TempDir d;
  for (const std::string v : {"9223372036854775807", "192153584101141163", "65", "-1"}) {
    SCOPED_TRACE(v);
    const std::string dir = hostile_checkpoint(d, "shared" + v, "glm4_moe_lite", "n_shared_experts", v);
    expect_prompt_error(dir, {"config.json", "field n_shared_experts", "must be in [0, 64]", "found " + v});
  }
}

// ---- 3. every range check of config.json ----------------------------------------------------

const char* kGlm = R"({
  "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
  "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
  "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4,
  "num_hidden_layers": 47, "first_k_dense_replace": 1, "routed_scaling_factor": 1.8, "moe_layer_freq": 1,
  "norm_topk_prob": true, "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 1
})";
const char* kQwen2 = R"({
  "model_type": "qwen2_moe", "hidden_size": 2048, "moe_intermediate_size": 1408, "num_experts": 60,
  "num_experts_per_tok": 4, "num_hidden_layers": 24, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "shared_expert_intermediate_size": 5632
})";
const char* kGptOss = R"({
  "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
  "num_experts_per_tok": 4, "num_hidden_layers": 24, "swiglu_limit": 7.0
})";

struct RangeCase {
  const char* base;
  const char* from;
  const char* to;
  std::vector<std::string> message;
};

TEST(HostileConfig, EveryFieldIsRangeChecked) {
  const RangeCase cases[] = {
      {kGlm, "\"hidden_size\": 2048", "\"hidden_size\": 65537", {"field hidden_size", "[1, 65536]", "found 65537"}},
      {kGlm, "\"moe_intermediate_size\": 1536", "\"moe_intermediate_size\": 262145",
       {"field moe_intermediate_size", "[1, 262144]", "found 262145"}},
      {kGptOss, "\"intermediate_size\": 2880", "\"intermediate_size\": 1099511627776",
       {"field intermediate_size", "[1, 262144]"}},
      {kGlm, "\"num_hidden_layers\": 47", "\"num_hidden_layers\": 1025", {"field num_hidden_layers", "[1, 1024]"}},
      {kGlm, "\"n_routed_experts\": 64", "\"n_routed_experts\": 4097", {"field n_routed_experts", "[1, 4096]"}},
      {kGlm, "\"first_k_dense_replace\": 1", "\"first_k_dense_replace\": 48",
       {"field first_k_dense_replace", "[0, 47]", "found 48"}},
      {kGlm, "\"first_k_dense_replace\": 1", "\"first_k_dense_replace\": -1", {"field first_k_dense_replace", "found -1"}},
      {kGlm, "\"moe_layer_freq\": 1", "\"moe_layer_freq\": 9223372036854775807", {"field moe_layer_freq", "[1, 47]"}},
      {kGlm, "\"n_group\": 1", "\"n_group\": 0", {"field n_group", "[1, 64]", "found 0"}},
      {kGlm, "\"topk_group\": 1", "\"topk_group\": 65", {"field topk_group", "[1, 64]", "found 65"}},
      {kGlm, "\"routed_scaling_factor\": 1.8", "\"routed_scaling_factor\": 0", {"field routed_scaling_factor", "(0, 1000]"}},
      {kGlm, "\"routed_scaling_factor\": 1.8", "\"routed_scaling_factor\": 1e300", {"field routed_scaling_factor", "found 1e+300"}},
      {kGlm, "\"routed_scaling_factor\": 1.8", "\"routed_scaling_factor\": -2.5", {"field routed_scaling_factor", "found -2.5"}},
      {kQwen2, "\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 25", {"field decoder_sparse_step", "[1, 24]"}},
      {kQwen2, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [3, 24]", {"field mlp_only_layers", "[0, 23]", "found 24"}},
      {kQwen2, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [-1]", {"field mlp_only_layers", "found -1"}},
      {kQwen2, "\"shared_expert_intermediate_size\": 5632", "\"shared_expert_intermediate_size\": 9223372036854775807",
       {"field shared_expert_intermediate_size", "[0, 262144]"}},
      // a double beyond float: the cast to the float ActivationSpec::limit would be undefined
      {kGptOss, "\"swiglu_limit\": 7.0", "\"swiglu_limit\": 1e300", {"field swiglu_limit", "(0, 1e+06]"}},
      {kGptOss, "\"swiglu_limit\": 7.0", "\"swiglu_limit\": -7", {"field swiglu_limit", "found -7"}},
  };
  for (const RangeCase& c : cases) {
    SCOPED_TRACE(c.to);
    std::string j = c.base;
    fp8moe::test::replace_once(j, c.from, c.to);
    std::vector<std::string> parts = c.message;
    parts.insert(parts.begin(), "m/config.json");
    expect_error([&] { parse_model_config(j, "m/config.json"); }, parts);
  }
  // The limits leave released models alone.
  EXPECT_EQ(parse_model_config(kGlm, "glm").num_experts, 64);
  EXPECT_EQ(parse_model_config(kQwen2, "qwen2").shared_intermediate_size, 5632);
  EXPECT_EQ(parse_model_config(kGptOss, "gpt").act.limit, 7.0f);
}

TEST(HostileConfig, QuantizationBlockSizesAreBounded) {
  const std::string head = R"({"model_type": "qwen3_moe", "quantization_config": )";
  const std::pair<std::string, std::vector<std::string>> cases[] = {
      {R"({"quant_method": "fp8", "weight_block_size": [9223372036854775807, 128]})",
       {"weight_block_size must be in [1, 65536]"}},
      {R"({"quant_method": "fp8", "weight_block_size": "128x99999999999"})", {"weight_block_size must be in [1, 65536]"}},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"targets": ["Linear"],
          "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 65537]}}}})",
       {"config_groups.g.weights.block_structure must be in [1, 65536]"}},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"targets": ["Linear"],
          "weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 1099511627776}}}})",
       {"group_size must be in [1, 65536]", "found 1099511627776"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.first);
    std::vector<std::string> parts = c.second;
    parts.insert(parts.begin(), "q/config.json");
    expect_error([&] { parse_quant_config(head + c.first + "}", "q/config.json"); }, parts);
  }
}

// ---- 4. hostile structure: nesting that overflowed the stack, patterns that backtracked ------

// nlohmann's dump(), which error messages use, recurses once per level: 100,000 levels of '['
// crashed with a stack overflow (found by fuzz_config).
TEST(HostileConfig, DeepNestingIsRefusedBeforeAnythingRecurses) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string model = R"({"model_type": "qwen3_moe", "architectures": [)" + deep + "]}";
  const std::string quant =
      R"({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8", "weight_block_size": )" + deep + "}}";
  for (const std::string& text : {model, quant}) {
    expect_error([&] { parse_model_config(text, "deep/config.json"); },
                 {"deep/config.json", "JSON nested deeper than 128 levels"});
    expect_error([&] { parse_quant_config(text, "deep/config.json"); },
                 {"deep/config.json", "JSON nested deeper than 128 levels"});
  }
}

// A backtracking regex takes exponential time on a module name it does not match: "(.*)*Z" on
// model.layers.0.mlp.experts.0.gate_proj ran for minutes (found by fuzz_config). Every pattern
// kind of both quantization configs is tried, through the whole loader.
TEST(HostileConfig, BacktrackingModulePatternsAnswerAtOnce) {
  TempDir d;
  for (const QuantMethod method : {QuantMethod::Fp8, QuantMethod::CompressedTensors}) {
    SCOPED_TRACE(quant_method_name(method));
    CkptOptions o;
    o.method = method;
    o.scheme = ScaleKind::Channel;
    CkptBuilder b(o, fresh_seed());
    nlohmann::json& q = b.config["quantization_config"];
    if (method == QuantMethod::Fp8)
      q["modules_to_not_convert"] = {"lm_head", "(.*)*Z", "(.|.)*Z", "(((.*)*)*)*Z"};
    else
      q["ignore"] = {"lm_head", "re:(.*)*Z", "re:(.|.)*Z"}, q["config_groups"]["group_0"]["targets"] = {"re:(.*)*j", "Linear"};
    const std::string dir = d.file(std::string("ck-") + quant_method_name(method));
    b.write(dir);
    const Outcome o2 = run_bounded([&] {
      const Checkpoint ck = Checkpoint::open(dir);
      const InspectionReport r = ck.inspect();
      if (!r.ok()) FP8MOE_FAIL("inspect found problems: ", r.str());
      for (int64_t l : ck.moe_layers()) (void)ck.load_moe_layer(l);
    });
    ASSERT_TRUE(o2.finished) << "inspect + load ran past the deadline: a backtracking module pattern";
    EXPECT_EQ(o2.exit_code, 1) << "expected the checkpoint to load: " << o2.message;
  }
}

TEST(HostileConfig, ModuleListsAndPatternsAreBounded) {
  const std::string head = R"({"model_type": "qwen3_moe", "quantization_config": )";
  const std::string long_pattern = std::string(513, 'a');
  nlohmann::json many = nlohmann::json::array();
  for (int i = 0; i < 4097; ++i) many.push_back("model.layers." + std::to_string(i) + ".mlp.gate");
  const std::pair<std::string, std::vector<std::string>> cases[] = {
      {R"({"quant_method": "fp8", "modules_to_not_convert": [")" + long_pattern + R"("]})",
       {"modules_to_not_convert entry of 513 characters exceeds the limit of 512"}},
      {R"({"quant_method": "fp8", "modules_to_not_convert": )" + many.dump() + "}",
       {"modules_to_not_convert has 4097 entries, more than the limit of 4096"}},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": )" + many.dump() +
           R"(, "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
           "strategy": "channel"}}}})",
       {"quantization_config.ignore has 4097 entries, more than the limit of 4096"}},
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["re:)" + long_pattern +
           R"("], "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
           "strategy": "channel"}}}})",
       {"quantization_config.ignore entry of 513 characters"}},
      // libstdc++ reads a repetition count into a long unchecked (UB; found by fuzz_config).
      {R"({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["re:.*mlp.\\.g{55555555555555555064,"],
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}})",
       {"holds a number of 20 digits; at most 9 are accepted"}},
      {R"({"quant_method": "fp8", "modules_to_not_convert": ["x\\99999999999999999999"]})", {"a number of 20 digits"}},
      // The polynomial executor refuses back-references: an error, not a silent mismatch.
      {R"({"quant_method": "fp8", "modules_to_not_convert": ["(a)\\1"]})",
       {"modules_to_not_convert entry \"(a)\\1\" is not a regex std::regex accepts"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.second.front());
    std::vector<std::string> parts = c.second;
    parts.insert(parts.begin(), "q/config.json");
    expect_error([&] { parse_quant_config(head + c.first + "}", "q/config.json"); }, parts);
  }
}

// ---- 5. config.json against the tensors ------------------------------------------------------

TEST(ConfigAgainstTensors, LayerCountBeyondTheTensorsIsRefusedAtOpen) {
  TempDir d;
  CkptBuilder b(CkptOptions{}, fresh_seed());  // layers 0 and 1
  b.config["num_hidden_layers"] = 1000;
  b.write(d.file("ck"));
  expect_error([&] { Checkpoint::open(d.file("ck")); },
               {"config.json: field num_hidden_layers is 1000", "hold layers up to model.layers.1.*",
                "expected num_hidden_layers <= 2"});
}

TEST(ConfigAgainstTensors, ExpertCountBeyondTheFirstMoeLayerIsRefusedAtOpen) {
  TempDir d;
  for (const ExpertLayout layout : {ExpertLayout::PerExpert, ExpertLayout::Fused}) {
    SCOPED_TRACE(expert_layout_name(layout));
    CkptOptions o;
    o.layout = layout;
    CkptBuilder b(o, fresh_seed());  // 4 experts
    b.config["num_experts"] = 4000;
    const std::string dir = d.file(std::string("ck-") + expert_layout_name(layout));
    b.write(dir);
    expect_error([&] { Checkpoint::open(dir); },
                 {"config.json: the routed expert count", "is 4000", "the first MoE layer 0 holds 4 experts",
                  layout == ExpertLayout::Fused ? "tensor model.layers.0.mlp.experts.gate_up_proj [4, 80, 96]"
                                                : "4 distinct expert indices"});
  }
}

// The first MoE layer of a GLM model is the one after the dense ones.
TEST(ConfigAgainstTensors, TheFirstMoeLayerIsTheOneTheConfigSays) {
  TempDir d;
  CkptOptions o;
  o.model_type = "glm4_moe_lite";
  o.layers = 3;
  o.first_dense = 1;
  CkptBuilder b(o, fresh_seed());
  b.config["n_routed_experts"] = 5;
  b.write(d.file("ck"));
  expect_error([&] { Checkpoint::open(d.file("ck")); }, {"is 5", "the first MoE layer 1 holds 4 experts"});
}

// ---- 6. without config.json: the counts inferred from tensor names and shapes ---------------

// A lone .safetensors file: an expert index that only a stray name claims must not size a loop,
// and an empty tensor's huge dimension must not reach the 2I arithmetic.
TEST(HostileTensors, InferredCountsAreBounded) {
  TempDir d;
  CkptBuilder b(CkptOptions{}, fresh_seed());
  const std::string e0 = "model.layers.0.mlp.experts.0.gate_proj.weight";
  b.tensors["model.layers.0.mlp.experts.9223372036854775807.gate_proj.weight"] = b.tensors.at(e0);
  SafetensorsWriter w;
  for (const auto& [name, t] : b.tensors) w.add(name, t);
  w.write(d.file("lone.safetensors"));
  const Outcome o = run_bounded([&] {
    const InspectionReport r = Checkpoint::open(d.file("lone.safetensors")).inspect();
    std::string all;
    for (const std::string& p : r.problems) all += p + "\n";
    FP8MOE_FAIL(all);  // hand the problems to the parent
  });
  ASSERT_TRUE(o.finished) << "inspect ran past the deadline: a loop up to an expert index from a tensor name";
  EXPECT_NE(o.message.find("missing tensor model.layers.0.mlp.experts.4.gate_proj.weight"), std::string::npos) << o.message;
  EXPECT_NE(o.message.find("go up to index 9223372036854775807"), std::string::npos) << o.message;

  // An empty expert 0 of shape [2^62, 0]: I = 2^62 would overflow 2I.
  SafetensorsWriter e;
  e.add("model.layers.0.mlp.experts.0.gate_proj.weight", Tensor(DType::BF16, Shape{int64_t{1} << 62, 0}));
  e.write(d.file("empty.safetensors"));
  const InspectionReport r = Checkpoint::open(d.file("empty.safetensors")).inspect();
  ASSERT_EQ(r.problems.size(), 1u) << r.str();
  EXPECT_NE(r.problems[0].find("inferred intermediate size I = 4611686018427387904, expected [1, 262144]"),
            std::string::npos)
      << r.problems[0];
}

// load_linear takes [N, K] from the file: an empty FP8 weight of 2^63 - 2 rows reached the scale
// grid's ceil-division (signed overflow) before anything bounded it.
TEST(HostileTensors, LinearWeightDimensionsAreBounded) {
  TempDir d;
  SafetensorsWriter w;
  w.add("lin.weight", Tensor(DType::F8_E4M3, Shape{std::numeric_limits<int64_t>::max() - 1, 0}));
  w.add("lin.weight_scale_inv", Tensor::zeros(DType::F32, Shape{2, 3}));
  w.write(d.file("lin.safetensors"));
  const Checkpoint ck = Checkpoint::open(d.file("lin.safetensors"));
  expect_error([&] { ck.load_linear("lin"); },
               {"tensor lin.weight: matrix [9223372036854775806, 0] exceeds the limit of 16777216 rows or columns"});
}

// ---- 7. the CLI answers at once -------------------------------------------------------------

TEST(HostileConfig, InspectCommandAnswersAtOnce) {
  TempDir d;
  const std::string dir = hostile_checkpoint(d, "ck", "glm4_moe_lite", "num_hidden_layers", "9223372036854775807");
  const std::string err = d.file("stderr.txt");
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (!std::freopen(err.c_str(), "w", stderr) || !std::freopen("/dev/null", "w", stdout)) ::_exit(126);
    ::execl(FP8MOE_CLI, FP8MOE_CLI, "inspect", dir.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ASSERT_TRUE(wait_bounded(pid, status, 10.0)) << "fp8moe inspect ran past the deadline";
  ASSERT_TRUE(WIFEXITED(status)) << "fp8moe inspect was killed by a signal";
  EXPECT_EQ(WEXITSTATUS(status), 1);
  const std::string text = testing::read_file(err);
  EXPECT_NE(text.find("fp8moe inspect: error: "), std::string::npos) << text;
  EXPECT_NE(text.find("field num_hidden_layers must be in [1, 1024]"), std::string::npos) << text;
}

}  // namespace
}  // namespace fp8moe

// The fp8moe CLI (tools/*.cpp), run as a subprocess exactly as a user runs it: inspect on good
// and malformed checkpoints (a plain exit status 1 with a message naming the problem, never a
// signal), convert round trips checked tensor by tensor, the layer command against the engine
// called directly, and the demo.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "formats/safetensors_test_util.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/lora.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/synthetic.hpp"
#include "model/convert_test_util.hpp"

namespace fp8moe {
namespace {

using testing::fresh_seed;
using testing::read_file;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;

struct RunResult {
  int status = -1;  // raw wait status
  std::string out, err;
  bool exited() const { return WIFEXITED(status); }
  int code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : -1; }
  std::string describe() const {
    std::string s = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                        : "exit " + std::to_string(code());
    return s + "\n--- stdout:\n" + out + "\n--- stderr:\n" + err;
  }
};

// A CLI process started by spawn_cli; wait_cli collects it.
struct Child {
  pid_t pid = -1;
  std::string out_path, err_path;
};

// Starts the CLI binary with `args` (no shell), stdout and stderr going to files in `dir`, with
// `env` ("NAME=value") added to this process's environment.
Child spawn_cli(const TempDir& dir, const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  Child c{-1, dir.file(".cli_stdout"), dir.file(".cli_stderr")};
  std::vector<std::string> argv_s{FP8MOE_CLI};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const bool overridden = std::any_of(env.begin(), env.end(), [&](const std::string& x) {
      return kv.compare(0, x.find('=') + 1, x, 0, x.find('=') + 1) == 0;
    });
    if (!overridden) env_s.push_back(kv);
  }
  env_s.insert(env_s.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (std::string& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  c.pid = fork();
  if (c.pid == 0) {
    const int o = ::open(c.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(c.err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  return c;
}

RunResult wait_cli(const Child& c) {
  RunResult r;
  if (c.pid < 0) return r;
  waitpid(c.pid, &r.status, 0);
  r.out = read_file(c.out_path);
  r.err = read_file(c.err_path);
  return r;
}

RunResult run_cli(const TempDir& dir, const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  return wait_cli(spawn_cli(dir, args, env));
}

// Entries of `dir` whose names start with '.' (temporary and staging files), the test's own
// stdout / stderr captures excepted.
std::vector<std::string> hidden_entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& de : fs::directory_iterator(dir)) {
    const std::string n = de.path().filename().string();
    if (n[0] == '.' && n != ".cli_stdout" && n != ".cli_stderr") out.push_back(n);
  }
  return out;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Expects a plain failure: exit status 1 (not a signal, not a usage error) and stderr naming
// every one of `parts`.
void expect_failure(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_FALSE(WIFSIGNALED(r.status)) << r.describe();
  EXPECT_EQ(r.code(), 1) << r.describe();
  EXPECT_TRUE(contains(r.err, "error")) << r.describe();
  for (const std::string& p : parts) EXPECT_TRUE(contains(r.err, p)) << "'" << p << "' not in stderr\n" << r.describe();
}

// Expects a usage error: exit status 2, stderr naming every one of `parts` and pointing to --help.
void expect_usage_error(const RunResult& r, std::initializer_list<std::string> parts) {
  EXPECT_FALSE(WIFSIGNALED(r.status)) << r.describe();
  EXPECT_EQ(r.code(), 2) << r.describe();
  EXPECT_TRUE(contains(r.err, "error")) << r.describe();
  EXPECT_TRUE(contains(r.err, "--help")) << r.describe();
  for (const std::string& p : parts) EXPECT_TRUE(contains(r.err, p)) << "'" << p << "' not in stderr\n" << r.describe();
}

// Synthetic BF16 checkpoints and their FP8 conversions, written once per test.
struct Models {
  TempDir dir;
  uint64_t seed = fresh_seed();
  std::string glm_bf16 = dir.file("glm-bf16"), glm_fp8 = dir.file("glm-fp8");     // channel, 2 shards
  std::string qwen_bf16 = dir.file("qwen-bf16"), qwen_fp8 = dir.file("qwen-fp8");  // block, 1 file
  Models() {
    SyntheticSpec g = SyntheticSpec::glm4_moe_lite();
    g.seed = seed;
    g.shards = 2;
    write_synthetic_checkpoint(glm_bf16, g);
    SyntheticSpec q = SyntheticSpec::qwen3_moe();
    q.seed = seed + 1;
    write_synthetic_checkpoint(qwen_bf16, q);
    ConvertOptions o;
    o.to = ConvertTarget::FP8;
    o.scheme = ScaleKind::Channel;
    convert_checkpoint(glm_bf16, glm_fp8, o);
    o.scheme = ScaleKind::Block;
    convert_checkpoint(qwen_bf16, qwen_fp8, o);
  }
};

TEST(CliTest, HelpListsTheCommands) {
  TempDir dir;
  const RunResult r = run_cli(dir, {"--help"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  for (const char* c : {"inspect", "convert", "demo", "layer"}) {
    EXPECT_TRUE(contains(r.out, c)) << c;
    const RunResult h = run_cli(dir, {c, "--help"});
    EXPECT_EQ(h.code(), 0) << h.describe();
    EXPECT_TRUE(contains(h.out, std::string("usage: fp8moe ") + c)) << h.describe();
  }
  expect_usage_error(run_cli(dir, {"inspect", "--bogus", "x"}), {"unknown option '--bogus'"});
}

TEST(CliTest, InspectGoodCheckpoints) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  RunResult r = run_cli(m.dir, {"inspect", m.glm_fp8});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "compressed-tensors")) << r.out;
  EXPECT_TRUE(contains(r.out, "glm4_moe_lite")) << r.out;
  EXPECT_TRUE(contains(r.out, "channel")) << r.out;
  EXPECT_TRUE(contains(r.out, "+shared")) << r.out;
  EXPECT_TRUE(contains(r.out, "problems     0")) << r.out;

  r = run_cli(m.dir, {"inspect", m.qwen_fp8});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "fp8 (fine-grained)")) << r.out;
  EXPECT_TRUE(contains(r.out, "block 128x128")) << r.out;

  r = run_cli(m.dir, {"inspect", m.glm_bf16});  // sharded BF16
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "none")) << r.out;

  r = run_cli(m.dir, {"inspect", m.qwen_fp8 + "/model.safetensors", "--json"});  // one file, config beside it
  ASSERT_EQ(r.code(), 0) << r.describe();
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["quant_method"], "fp8");
  EXPECT_EQ(j["loadable"], true);
  EXPECT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["layers"][0]["kind"], "moe");
  EXPECT_EQ(j["layers"][0]["experts"], 8);
  EXPECT_EQ(j["layers"][0]["projections"][0]["dtype"], "F8_E4M3");
  EXPECT_TRUE(j["problems"].empty());
}

TEST(CliTest, InspectMalformedExitsWithStatusOne) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const fs::path root = m.dir.path();

  // Truncated safetensors.
  fs::copy(m.qwen_fp8, root / "trunc");
  fs::resize_file(root / "trunc/model.safetensors", fs::file_size(root / "trunc/model.safetensors") - 100);
  expect_failure(run_cli(m.dir, {"inspect", (root / "trunc").string()}), {"model.safetensors", "truncated"});

  // A missing scale: one expert's weight_scale_inv dropped from the file.
  {
    const std::string missing = "model.layers.1.mlp.experts.5.down_proj.weight_scale_inv";
    const TensorStore src = TensorStore::open(m.qwen_fp8);
    SafetensorsWriter w;
    for (const std::string& n : src.names())
      if (n != missing) {
        const TensorView v = src.view(n);
        Tensor copy(v.dtype, v.shape);  // aligned copy of the mapped bytes
        std::memcpy(copy.data(), v.data, static_cast<size_t>(v.nbytes()));
        w.add(n, copy);
      }
    fs::create_directories(root / "noscale");
    w.write((root / "noscale/model.safetensors").string());
    fs::copy_file(fs::path(m.qwen_fp8) / "config.json", root / "noscale/config.json");
    const RunResult r = run_cli(m.dir, {"inspect", (root / "noscale").string()});
    expect_failure(r, {"model.layers.1.mlp.experts.5.down_proj.weight"});
  }

  // An index naming a shard outside the checkpoint directory.
  fs::copy(m.glm_fp8, root / "badindex");
  {
    std::string index = read_file((root / "badindex/model.safetensors.index.json").string());
    const std::string shard = "model-00002-of-00002.safetensors";
    index.replace(index.find(shard), shard.size(), "../" + shard);
    write_file((root / "badindex/model.safetensors.index.json").string(), index);
    fs::copy_file(root / "badindex" / shard, root / shard);
  }
  expect_failure(run_cli(m.dir, {"inspect", (root / "badindex").string()}), {"../model-00002-of-00002.safetensors"});

  // A directory without config.json.
  fs::create_directories(root / "noconfig");
  fs::copy_file(fs::path(m.qwen_fp8) / "model.safetensors", root / "noconfig/model.safetensors");
  expect_failure(run_cli(m.dir, {"inspect", (root / "noconfig").string()}), {"config.json"});
  // ... and its file alone: inspected, but not loadable.
  const RunResult lone = run_cli(m.dir, {"inspect", (root / "noconfig/model.safetensors").string()});
  expect_failure(lone, {"no config.json"});
  EXPECT_TRUE(contains(lone.out, "F8_E4M3")) << "the report is still printed\n" << lone.describe();

  // A path that does not exist, and an empty file.
  expect_failure(run_cli(m.dir, {"inspect", (root / "nope").string()}), {"nope", "no such file"});
  write_file((root / "empty.safetensors").string(), "");
  expect_failure(run_cli(m.dir, {"inspect", (root / "empty.safetensors").string()}), {"empty.safetensors", "shorter than 8 bytes"});
}

TEST(CliTest, ConvertRoundTrips) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const std::string d = m.dir.path().string();
  // The FP8 checkpoints of `Models` came from the library; here the CLI writes its own.
  RunResult r = run_cli(m.dir, {"convert", m.glm_bf16, d + "/c-fp8", "--to", "fp8", "--scheme", "channel"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.err, "[2/2] wrote model-00002-of-00002.safetensors")) << r.err;
  r = run_cli(m.dir, {"convert", d + "/c-fp8", d + "/c-back", "--to", "bf16"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  {
    const TensorStore orig = TensorStore::open(m.glm_bf16), fp8 = TensorStore::open(d + "/c-fp8");
    EXPECT_EQ(fp8.files().size(), 2u);
    testing::expect_fp8_from_bf16(orig, fp8, ScaleKind::Channel, 128);
    testing::expect_bf16_round_trip(orig, fp8, TensorStore::open(d + "/c-back"), ScaleKind::Channel, 128);
  }
  r = run_cli(m.dir, {"convert", m.qwen_bf16, d + "/b-fp8", "--to", "fp8", "--scheme", "block", "--block", "128", "--quiet"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(r.err.empty()) << r.err;
  r = run_cli(m.dir, {"convert", d + "/b-fp8", d + "/b-back", "--to", "bf16"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  {
    const TensorStore orig = TensorStore::open(m.qwen_bf16), fp8 = TensorStore::open(d + "/b-fp8");
    testing::expect_fp8_from_bf16(orig, fp8, ScaleKind::Block, 128);
    testing::expect_bf16_round_trip(orig, fp8, TensorStore::open(d + "/b-back"), ScaleKind::Block, 128);
  }

  // Refusals: an occupied destination, the source itself, bad arguments.
  expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/b-fp8", "--to", "fp8"}), {"not an empty directory"});
  expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, m.qwen_bf16, "--to", "fp8"}), {"is the source checkpoint"});
  expect_usage_error(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x", "--to", "fp4"}), {"--to", "fp4"});
  expect_usage_error(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x", "--to", "fp8", "--scheme", "tensor"}),
                     {"--scheme", "tensor"});
  expect_usage_error(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x"}), {"--to"});
  expect_failure(run_cli(m.dir, {"convert", m.qwen_fp8, d + "/x", "--to", "fp8"}), {"already declares quant_method"});
  EXPECT_FALSE(fs::exists(d + "/x"));
}

// ---- layer -----------------------------------------------------------------------------------

Tensor randn(std::mt19937_64& rng, DType dt, Shape s, double sd) {
  std::normal_distribution<double> n(0.0, sd);
  Tensor t(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, n(rng));
  return t;
}

std::vector<double> values(const TensorView& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = load_as_double(t.data, t.dtype, i);
  return v;
}

TEST(CliTest, LayerMatchesTheEngine) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  std::mt19937_64 rng(m.seed);
  const int64_t layer = 1, T = 37, k = 4, r = 3;
  const Checkpoint ck = Checkpoint::open(m.glm_fp8);
  const MoeLayerWeights lw = ck.load_moe_layer(layer);
  const ExpertWeights w = lw.routed.view();
  const int64_t E = w.experts(), H = w.hidden(), I = w.intermediate();

  // Inputs: BF16 hidden states, I64 ids (distinct per token, one expert left without tokens),
  // BF16 routing weights, an output gradient, PEFT-layout adapters on both projections.
  Tensor hidden = randn(rng, DType::BF16, {T, H}, 1.0);
  Tensor ids(DType::I64, {T, k});
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> experts(E - 1);
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t j = 0; j < k; ++j) ids.ptr<int64_t>()[t * k + j] = experts[j];
  }
  Tensor weights = randn(rng, DType::BF16, {T, k}, 0.5);
  Tensor grad_out = randn(rng, DType::F32, {T, H}, 1.0);
  const PeftExpertLoraLayout gu_l = PeftExpertLoraLayout::of(w, LoraProjection::GateUp, r, "gate_up_proj");
  const PeftExpertLoraLayout dn_l = PeftExpertLoraLayout::of(w, LoraProjection::Down, r, "down_proj");
  Tensor gu_A = randn(rng, DType::F32, {E * r, H}, 0.1), gu_B = randn(rng, DType::F32, {2 * I, E * r}, 0.1);
  Tensor dn_A = randn(rng, DType::F32, {E * r, I}, 0.1), dn_B = randn(rng, DType::F32, {H, E * r}, 0.1);
  Tensor scaling(DType::F32, Shape(std::vector<int64_t>{}));
  scaling.ptr<float>()[0] = 1.5f;

  const std::string in_path = m.dir.file("in.safetensors"), out_path = m.dir.file("out.safetensors");
  {
    SafetensorsWriter in;
    in.add("hidden_states", hidden);
    in.add("topk_ids", ids);
    in.add("topk_weights", weights);
    in.add("grad_output", grad_out);
    in.add("gate_up_proj.lora_A", gu_A);
    in.add("gate_up_proj.lora_B", gu_B);
    in.add("down_proj.lora_A", dn_A);
    in.add("down_proj.lora_B", dn_B);
    in.add("lora_scaling", scaling);
    in.write(in_path);
  }
  const RunResult run = run_cli(m.dir, {"layer", m.glm_fp8, "--layer", "1", "--inputs", in_path, "--out", out_path,
                                        "--backend", "cpu"});
  ASSERT_EQ(run.code(), 0) << run.describe();

  // The engine called directly on the same inputs.
  auto be = make_cpu_backend();
  const ExpertLoraPair gu = import_peft_expert_lora(gu_l, gu_A, gu_B), dn = import_peft_expert_lora(dn_l, dn_A, dn_B);
  const MoeLayer moe(*be, w, LoraAdapters{gu.A.view(), gu.B.view(), dn.A.view(), dn.B.view(), 1.5});
  const MoeInputs mi{hidden.view(), ids.view(), weights.view()};
  Tensor out(DType::F32, {T, H}), g_h(DType::F32, {T, H}), g_w(DType::F32, {T, k});
  Tensor g_guA(DType::F32, gu.A.shape()), g_guB(DType::F32, gu.B.shape()), g_dA(DType::F32, dn.A.shape()),
      g_dB(DType::F32, dn.B.shape());
  MoeSaved saved;
  moe.forward(mi, out, &saved);
  moe.backward(mi, saved, grad_out, MoeGrads{g_h.view(), g_w.view(), {g_guA.view(), g_guB.view(), g_dA.view(), g_dB.view()}});
  const PeftLoraPair peft_gu = export_peft_expert_lora(gu_l, g_guA, g_guB), peft_dn = export_peft_expert_lora(dn_l, g_dA, g_dB);

  const auto file = SafetensorsFile::open(out_path);
  const std::pair<const char*, const Tensor*> expected[] = {
      {"output", &out},
      {"grad_hidden_states", &g_h},
      {"grad_topk_weights", &g_w},
      {"gate_up_proj.lora_A.grad", &peft_gu.lora_A},
      {"gate_up_proj.lora_B.grad", &peft_gu.lora_B},
      {"down_proj.lora_A.grad", &peft_dn.lora_A},
      {"down_proj.lora_B.grad", &peft_dn.lora_B}};
  EXPECT_EQ(file->names().size(), std::size(expected));
  for (const auto& [name, want] : expected) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(file->contains(name));
    const TensorView got = file->view(name);
    EXPECT_EQ(got.dtype, DType::F32);
    ASSERT_EQ(got.shape, want->shape());
    const std::vector<double> a = values(got), b = values(*want);
    double nonzero = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i], b[i]) << "element " << i;  // same backend, same inputs: bit-identical
      nonzero += std::fabs(b[i]);
    }
    EXPECT_GT(nonzero, 0.0);
  }

  // Forward only: just the output, equal to the forward above.
  {
    SafetensorsWriter in;
    in.add("hidden_states", hidden);
    in.add("topk_ids", ids);
    in.add("topk_weights", weights);
    in.add("gate_up_proj.lora_A", gu_A);
    in.add("gate_up_proj.lora_B", gu_B);
    in.add("down_proj.lora_A", dn_A);
    in.add("down_proj.lora_B", dn_B);
    in.add("lora_scaling", scaling);
    in.write(m.dir.file("in2.safetensors"));
  }
  const RunResult fwd = run_cli(m.dir, {"layer", m.glm_fp8, "--layer", "1", "--inputs", m.dir.file("in2.safetensors"),
                                        "--out", m.dir.file("out2.safetensors"), "--backend", "cpu"});
  ASSERT_EQ(fwd.code(), 0) << fwd.describe();
  const auto f2 = SafetensorsFile::open(m.dir.file("out2.safetensors"));
  EXPECT_EQ(f2->names(), std::vector<std::string>{"output"});
  EXPECT_EQ(values(f2->view("output")), values(out));
}

TEST(CliTest, LayerValidatesEveryInput) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  std::mt19937_64 rng(m.seed);
  const int64_t T = 5, H = 256, I = 96, E = 8, k = 2;
  const Tensor hidden = randn(rng, DType::F32, {T, H}, 1.0);
  Tensor ids(DType::I32, {T, k});
  for (int64_t i = 0; i < T * k; ++i) ids.ptr<int32_t>()[i] = static_cast<int32_t>(i % E);
  const Tensor weights = randn(rng, DType::F32, {T, k}, 0.5);

  // Writes an input file from (name, tensor) pairs and runs the layer command on it.
  auto run = [&](const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& layer = "0") {
    SafetensorsWriter w;
    for (const auto& [n, t] : tensors) w.add(n, t);
    w.write(m.dir.file("bad.safetensors"));
    // --force: every run writes the same --out (an existing --out is refused otherwise).
    return run_cli(m.dir, {"layer", m.qwen_fp8, "--layer", layer, "--inputs", m.dir.file("bad.safetensors"), "--out",
                           m.dir.file("bad-out.safetensors"), "--backend", "cpu", "--force"});
  };
  const auto good = std::vector<std::pair<std::string, Tensor>>{{"hidden_states", hidden}, {"topk_ids", ids}, {"topk_weights", weights}};
  ASSERT_EQ(run(good).code(), 0) << run(good).describe();

  expect_failure(run({{"hidden_states", randn(rng, DType::F32, {T, H + 1}, 1.0)}, {"topk_ids", ids}, {"topk_weights", weights}}),
                 {"hidden_states", "[*, 256]", "[5, 257]"});
  expect_failure(run({{"hidden_states", randn(rng, DType::F16, {T, H}, 1.0)}, {"topk_ids", ids}, {"topk_weights", weights}}),
                 {"hidden_states", "BF16|F32", "F16"});
  expect_failure(run({{"hidden_states", hidden}, {"topk_weights", weights}}), {"missing tensor 'topk_ids'"});
  expect_failure(run({{"hidden_states", hidden}, {"topk_ids", weights}, {"topk_weights", weights}}), {"topk_ids", "I32|I64", "F32"});
  expect_failure(run({{"hidden_states", hidden}, {"topk_ids", ids}, {"topk_weights", randn(rng, DType::F32, {T, k + 1}, 1.0)}}),
                 {"topk_weights", "[5, 2]", "[5, 3]"});
  Tensor bad_ids(DType::I32, {T, k});
  for (int64_t i = 0; i < T * k; ++i) bad_ids.ptr<int32_t>()[i] = i == 7 ? E : 0;
  expect_failure(run({{"hidden_states", hidden}, {"topk_ids", bad_ids}, {"topk_weights", weights}}), {"topk_ids", "[0, 8)", "8 at [3, 1]"});
  auto with = [&](std::vector<std::pair<std::string, Tensor>> extra) {
    auto v = good;
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_failure(run(with({{"extra", hidden}})), {"unexpected tensor 'extra'"});
  expect_failure(run(with({{"grad_output", randn(rng, DType::F32, {T + 1, H}, 1.0)}})), {"grad_output", "[5, 256]", "[6, 256]"});
  Tensor scaling(DType::F32, Shape(std::vector<int64_t>{}));
  scaling.ptr<float>()[0] = 1.0f;
  const Tensor dA = randn(rng, DType::F32, {E * 2, I}, 0.1), dB = randn(rng, DType::F32, {H, E * 2}, 0.1);
  expect_failure(run(with({{"down_proj.lora_A", dA}, {"down_proj.lora_B", dB}})), {"lora_scaling", "required"});
  expect_failure(run(with({{"down_proj.lora_A", dA}, {"lora_scaling", scaling}})), {"down_proj.lora_B", "together"});
  expect_failure(run(with({{"down_proj.lora_A", randn(rng, DType::F32, {E * 2 + 1, I}, 0.1)}, {"down_proj.lora_B", dB},
                           {"lora_scaling", scaling}})),
                 {"down_proj.lora_A", "[17, 96]"});
  expect_failure(run(with({{"down_proj.lora_A", dA}, {"down_proj.lora_B", randn(rng, DType::F32, {H, E * 3}, 0.1)},
                           {"lora_scaling", scaling}})),
                 {"down_proj.lora_B", "[256, 16]", "[256, 24]"});
  expect_failure(run(with({{"lora_scaling", scaling}})), {"lora_scaling", "without any LoRA"});
  EXPECT_EQ(run(with({{"down_proj.lora_A", dA}, {"down_proj.lora_B", dB}, {"lora_scaling", scaling}})).code(), 0);
  expect_failure(run(good, "2"), {"layer 2"});  // beyond num_hidden_layers
}

TEST(CliTest, DemoRuns) {
  TempDir dir;
  const RunResult r = run_cli(dir, {"demo", "--steps", "5", "--backend", "cpu", "--workdir", dir.file("work")});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_FALSE(WIFSIGNALED(r.status));
  EXPECT_TRUE(contains(r.out, "all checks passed")) << r.out;
  EXPECT_TRUE(contains(r.out, "step   5/5")) << r.out;
  EXPECT_TRUE(contains(r.out, "held-out loss: initial")) << r.out;
  EXPECT_TRUE(fs::exists(dir.file("work/glm-fp8/config.json")));  // --workdir is kept
  expect_usage_error(run_cli(dir, {"demo", "--steps", "0"}), {"--steps"});
}

// ---- conventions: versions, exit status, messages (issue 12 items 9-11) ---------------------

// The version CMakeLists.txt gives the project, read from the file itself.
std::string project_version() {
  const std::string cmake = read_file(std::string(FP8MOE_SOURCE_DIR) + "/CMakeLists.txt");
  std::smatch m;
  EXPECT_TRUE(std::regex_search(cmake, m, std::regex(R"(project\(fp8moe VERSION ([0-9.]+))")));
  return m[1].str();
}

TEST(CliTest, VersionAndExitStatus) {
  TempDir dir;
  const RunResult v = run_cli(dir, {"--version"});
  ASSERT_EQ(v.code(), 0) << v.describe();
  EXPECT_EQ(v.out, "fp8moe " + project_version() + "\n");

  EXPECT_EQ(run_cli(dir, {}).code(), 2);
  EXPECT_EQ(run_cli(dir, {"frobnicate"}).code(), 2);
  // Usage errors exit 2, for every subcommand.
  expect_usage_error(run_cli(dir, {"inspect"}), {"expected 1 positional argument"});
  expect_usage_error(run_cli(dir, {"convert", "a", "b", "--to", "fp8", "--bogus"}), {"unknown option '--bogus'"});
  expect_usage_error(run_cli(dir, {"layer", "ckpt", "--layer", "-1", "--inputs", "i", "--out", "o"}),
                     {"--layer: expected a non-negative MoE layer index, found -1"});
  expect_usage_error(run_cli(dir, {"layer", "ckpt", "--inputs", "i", "--out", "o"}), {"--layer"});
  expect_usage_error(run_cli(dir, {"demo", "--backend", "gpu"}), {"--backend", "gpu"});
  expect_usage_error(run_cli(dir, {"bench", "--bogus"}), {"unknown option '--bogus'"});
  expect_usage_error(run_cli(dir, {"bench", "--convert", "--mib", "1"}), {"--mib"});
  // Failures while running exit 1.
  expect_failure(run_cli(dir, {"inspect", dir.file("nope")}), {"nope"});
  expect_failure(run_cli(dir, {"convert", dir.file("nope"), dir.file("out"), "--to", "bf16"}), {"nope"});
}

TEST(CliTest, ErrorsShowInternalsOnlyWhenDebugging) {
  TempDir dir;
  const std::vector<std::string> cmd = {"inspect", dir.file("nope")};
  const RunResult plain = run_cli(dir, cmd);
  expect_failure(plain, {"no such file or directory"});
  EXPECT_FALSE(contains(plain.err, "[check failed")) << plain.err;
  EXPECT_FALSE(contains(plain.err, ".cpp:")) << plain.err;
  for (const RunResult& r : {run_cli(dir, {"--debug", "inspect", dir.file("nope")}), run_cli(dir, {"inspect", dir.file("nope"), "--debug"}),
                             run_cli(dir, cmd, {"FP8MOE_DEBUG=1"})}) {
    expect_failure(r, {"no such file or directory", "[check failed: ", ".cpp:"});
  }
  EXPECT_FALSE(contains(run_cli(dir, cmd, {"FP8MOE_DEBUG=0"}).err, "[check failed"));
}

TEST(CliTest, MessagesNameTheRealProblem) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  // A config.json given where a checkpoint is expected: not "a huge header length".
  const RunResult cfg = run_cli(m.dir, {"inspect", m.qwen_fp8 + "/config.json"});
  expect_failure(cfg, {"config.json", "is a JSON file", "give the checkpoint directory"});
  EXPECT_FALSE(contains(cfg.err, "header")) << cfg.err;
  // --out into a folder that does not exist: the user's path, not a temporary name.
  {
    SafetensorsWriter in;
    in.add("hidden_states", Tensor::zeros(DType::F32, {1, 256}));
    in.write(m.dir.file("in.safetensors"));
  }
  const RunResult out = run_cli(m.dir, {"layer", m.qwen_fp8, "--layer", "0", "--inputs", m.dir.file("in.safetensors"),
                                        "--out", m.dir.file("missing/out.safetensors"), "--backend", "cpu"});
  expect_failure(out, {m.dir.file("missing/out.safetensors"), "does not exist"});
  EXPECT_FALSE(contains(out.err, ".tmp") || contains(out.err, "XXXXXX")) << out.err;
  // bench on a machine without a GPU names the missing GPU (or the missing CUDA build), not a driver
  // version.
  if (!cuda_available()) {
    const RunResult b = run_cli(m.dir, {"bench", "--shape", "glm", "--tokens", "256"});
    expect_failure(b, {"CUDA"});
    EXPECT_FALSE(contains(b.err, "insufficient")) << b.err;
  }
}

TEST(CliTest, InspectJsonAlwaysPrintsOneReport) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const fs::path root = m.dir.path();
  fs::copy(m.qwen_fp8, root / "trunc");
  fs::resize_file(root / "trunc/model.safetensors", fs::file_size(root / "trunc/model.safetensors") - 100);
  for (const std::string& path : {(root / "trunc").string(), (root / "nope").string(), m.qwen_fp8 + "/config.json"}) {
    SCOPED_TRACE(path);
    const RunResult r = run_cli(m.dir, {"inspect", path, "--json"});
    EXPECT_EQ(r.code(), 1) << r.describe();  // the exit status stays as it was
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(r.out)) << r.describe();
    EXPECT_EQ(j["loadable"], false);
    EXPECT_EQ(j["path"], path);
    EXPECT_EQ(j["fp8moe_version"], project_version());
    ASSERT_TRUE(j["error"].is_string());
    EXPECT_FALSE(j["error"].get<std::string>().empty());
    EXPECT_EQ(j["problems"].size(), 1u);
  }
  // A readable checkpoint that will not load: the full report, its problems, and the version.
  const RunResult ok = run_cli(m.dir, {"inspect", m.qwen_fp8, "--json"});
  ASSERT_EQ(ok.code(), 0) << ok.describe();
  EXPECT_EQ(nlohmann::json::parse(ok.out)["fp8moe_version"], project_version());
}

// ---- layer: the output never destroys anything (item 1) -------------------------------------

TEST(CliTest, LayerOutputNeverClobbers) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  std::mt19937_64 rng(m.seed);
  const int64_t T = 3;
  Tensor ids(DType::I32, {T, 2});
  for (int64_t i = 0; i < 2 * T; ++i) ids.ptr<int32_t>()[i] = static_cast<int32_t>(i % 8);
  const std::string in_path = m.dir.file("in.safetensors");
  {
    SafetensorsWriter in;
    in.add("hidden_states", randn(rng, DType::F32, {T, 256}, 1.0));
    in.add("topk_ids", ids);
    in.add("topk_weights", randn(rng, DType::F32, {T, 2}, 0.5));
    in.write(in_path);
  }
  const std::string inputs_before = read_file(in_path);
  const std::string shard = m.qwen_fp8 + "/model.safetensors";
  const std::string shard_before = read_file(shard);
  auto layer = [&](const std::string& out, bool force = false) {
    std::vector<std::string> a = {"layer", m.qwen_fp8, "--layer", "0", "--inputs", in_path, "--out", out, "--backend", "cpu"};
    if (force) a.push_back("--force");
    return run_cli(m.dir, a);
  };
  expect_failure(layer(in_path, true), {"is the --inputs file"});
  EXPECT_EQ(read_file(in_path), inputs_before);
  expect_failure(layer(shard, true), {"lies in the checkpoint folder"});
  EXPECT_EQ(read_file(shard), shard_before);
  expect_failure(layer(m.qwen_fp8 + "/extra.safetensors"), {"lies in the checkpoint folder"});
  EXPECT_FALSE(fs::exists(m.qwen_fp8 + "/extra.safetensors"));

  const std::string out = m.dir.file("out.safetensors");
  write_file(out, "precious");
  expect_failure(layer(out), {out, "already exists", "--force"});
  EXPECT_EQ(read_file(out), "precious");
  ASSERT_EQ(layer(out, true).code(), 0);
  EXPECT_EQ(SafetensorsFile::open(out)->names(), std::vector<std::string>{"output"});
  // A failing run leaves the previous output as it was (atomic replacement).
  const std::string good = read_file(out);
  {
    SafetensorsWriter bad;
    bad.add("hidden_states", randn(rng, DType::F32, {T, 255}, 1.0));
    bad.add("topk_ids", ids);
    bad.add("topk_weights", randn(rng, DType::F32, {T, 2}, 0.5));
    bad.write(m.dir.file("bad.safetensors"));
  }
  expect_failure(run_cli(m.dir, {"layer", m.qwen_fp8, "--layer", "0", "--inputs", m.dir.file("bad.safetensors"), "--out",
                                 out, "--backend", "cpu", "--force"}),
                 {"hidden_states"});
  EXPECT_EQ(read_file(out), good);
  EXPECT_EQ(hidden_entries(m.dir.path()), std::vector<std::string>{});  // no temporary file left
  EXPECT_EQ(hidden_entries(m.qwen_fp8), std::vector<std::string>{});
}

// ---- layer --adapter: a PEFT adapter folder as saved (item 5) --------------------------------

TEST(CliTest, LayerTakesAPeftAdapterAsSaved) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  std::mt19937_64 rng(m.seed);
  const int64_t layer = 1, T = 9, k = 4, r = 3, E = 8, H = 256, I = 96;
  Tensor ids(DType::I64, {T, k});
  for (int64_t i = 0; i < T * k; ++i) ids.ptr<int64_t>()[i] = (i * 3 + i / k) % E;
  const Tensor hidden = randn(rng, DType::BF16, {T, H}, 1.0), weights = randn(rng, DType::F32, {T, k}, 0.5);
  const Tensor grad = randn(rng, DType::F32, {T, H}, 1.0);
  const Tensor gu_A = randn(rng, DType::BF16, {E * r, H}, 0.1), gu_B = randn(rng, DType::BF16, {2 * I, E * r}, 0.1);
  const Tensor dn_A = randn(rng, DType::BF16, {E * r, I}, 0.1), dn_B = randn(rng, DType::BF16, {H, E * r}, 0.1);

  // The adapter as PEFT saves target_parameters = [gate_up_proj, down_proj] on the experts:
  // gate_up_proj, listed first, is the inner wrapper (base_layer.).
  const fs::path adapter = m.dir.path() / "adapter";
  fs::create_directories(adapter);
  write_file((adapter / "adapter_config.json").string(),
             R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": null,
                 "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                 "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": false, "use_dora": false})");
  const std::string pre = "base_model.model.model.layers." + std::to_string(layer) + ".mlp.experts.";
  auto write_adapter = [&](const std::string& prefix) {
    SafetensorsWriter w;
    w.add(prefix + "base_layer.lora_A.weight", gu_A);
    w.add(prefix + "base_layer.lora_B.weight", gu_B);
    w.add(prefix + "lora_A.weight", dn_A);
    w.add(prefix + "lora_B.weight", dn_B);
    w.add("base_model.model.model.layers.1.self_attn.q_a_proj.lora_A.weight", gu_A);  // not an expert: ignored
    w.write((adapter / "adapter_model.safetensors").string());
  };
  write_adapter(pre);
  {
    SafetensorsWriter in;
    in.add("hidden_states", hidden);
    in.add("topk_ids", ids);
    in.add("topk_weights", weights);
    in.add("grad_output", grad);
    in.write(m.dir.file("in.safetensors"));
  }
  // The layer comes from the adapter's key names (no --layer).
  const RunResult a = run_cli(m.dir, {"layer", m.glm_fp8, "--adapter", adapter.string(), "--inputs", m.dir.file("in.safetensors"),
                                      "--out", m.dir.file("a.safetensors"), "--backend", "cpu"});
  ASSERT_EQ(a.code(), 0) << a.describe();
  EXPECT_TRUE(contains(a.out, "LoRA")) << a.out;

  // The same adapters renamed by hand into the inputs file, with scaling lora_alpha / r = 2.
  Tensor scaling(DType::F32, Shape(std::vector<int64_t>{}));
  scaling.ptr<float>()[0] = 2.0f;
  {
    SafetensorsWriter in;
    in.add("hidden_states", hidden);
    in.add("topk_ids", ids);
    in.add("topk_weights", weights);
    in.add("grad_output", grad);
    in.add("gate_up_proj.lora_A", gu_A);
    in.add("gate_up_proj.lora_B", gu_B);
    in.add("down_proj.lora_A", dn_A);
    in.add("down_proj.lora_B", dn_B);
    in.add("lora_scaling", scaling);
    in.write(m.dir.file("in-renamed.safetensors"));
  }
  const RunResult b = run_cli(m.dir, {"layer", m.glm_fp8, "--layer", "1", "--inputs", m.dir.file("in-renamed.safetensors"),
                                      "--out", m.dir.file("b.safetensors"), "--backend", "cpu"});
  ASSERT_EQ(b.code(), 0) << b.describe();
  const auto fa = SafetensorsFile::open(m.dir.file("a.safetensors")), fb = SafetensorsFile::open(m.dir.file("b.safetensors"));
  ASSERT_EQ(fa->names(), fb->names());
  EXPECT_EQ(fa->names().size(), 7u);  // output, two gradients, four adapter gradients
  for (const std::string& n : fa->names()) EXPECT_EQ(values(fa->view(n)), values(fb->view(n))) << n;

  // Adapters given twice, a layer the adapter lacks, an adapter over two layers without --layer.
  expect_failure(run_cli(m.dir, {"layer", m.glm_fp8, "--adapter", adapter.string(), "--inputs",
                                 m.dir.file("in-renamed.safetensors"), "--out", m.dir.file("c.safetensors"), "--backend", "cpu"}),
                 {"one way only"});
  expect_failure(run_cli(m.dir, {"layer", m.glm_fp8, "--layer", "2", "--adapter", adapter.string(), "--inputs",
                                 m.dir.file("in.safetensors"), "--out", m.dir.file("c.safetensors"), "--backend", "cpu"}),
                 {"no expert LoRA for layer 2", "layers 1"});
  {
    SafetensorsWriter w;
    for (int l : {1, 2}) {
      const std::string p = "base_model.model.model.layers." + std::to_string(l) + ".mlp.experts.";
      w.add(p + "base_layer.lora_A.weight", gu_A);
      w.add(p + "base_layer.lora_B.weight", gu_B);
    }
    w.write((adapter / "adapter_model.safetensors").string());
  }
  expect_usage_error(run_cli(m.dir, {"layer", m.glm_fp8, "--adapter", adapter.string(), "--inputs", m.dir.file("in.safetensors"),
                                     "--out", m.dir.file("c.safetensors"), "--backend", "cpu"}),
                     {"layers 1, 2", "--layer"});
  // A rank that disagrees with adapter_config.json.
  write_adapter(pre);
  std::string cfg = read_file((adapter / "adapter_config.json").string());
  cfg.replace(cfg.find("\"r\": 3"), 6, "\"r\": 4");
  write_file((adapter / "adapter_config.json").string(), cfg);
  expect_failure(run_cli(m.dir, {"layer", m.glm_fp8, "--adapter", adapter.string(), "--inputs", m.dir.file("in.safetensors"),
                                 "--out", m.dir.file("c.safetensors"), "--backend", "cpu"}),
                 {"rank 3", "r 4"});
}

// ---- convert: destinations, failures, signals, progress, block sizes (items 2, 3, 7, 8, 12) ----

TEST(CliTest, ConvertRefusesADestinationInsideItsSource) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  for (const std::string& dst : {m.qwen_bf16 + "/fp8", m.qwen_bf16 + "/a/b"}) {
    expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, dst, "--to", "fp8"}), {"inside the source checkpoint"});
    EXPECT_FALSE(fs::exists(dst));
  }
  EXPECT_FALSE(fs::exists(m.qwen_bf16 + "/a"));
  EXPECT_EQ(hidden_entries(m.qwen_bf16), std::vector<std::string>{});
}

TEST(CliTest, ConvertFailureLeavesNothingAndNamesTheElement) {
  TempDir dir;
  // Two files, the second with an inf in a weight: the first is written before the failure.
  fs::create_directories(dir.path() / "src");
  write_file(dir.file("src/config.json"), R"({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1})");
  std::mt19937_64 rng(fresh_seed());
  {
    SafetensorsWriter a;
    a.add("model.layers.0.self_attn.q_proj.weight", randn(rng, DType::BF16, {16, 16}, 1.0));
    a.write(dir.file("src/a.safetensors"));
  }
  Tensor bad = randn(rng, DType::BF16, {8, 16}, 1.0);
  store_from_double(bad.data(), DType::BF16, 2 * 16 + 5, std::numeric_limits<double>::infinity());
  {
    SafetensorsWriter b;
    b.add("model.layers.0.mlp.down_proj.weight", bad);
    b.write(dir.file("src/b.safetensors"));
  }
  const RunResult r = run_cli(dir, {"convert", dir.file("src"), dir.file("dst"), "--to", "fp8"});
  expect_failure(r, {"model.layers.0.mlp.down_proj.weight", "element [2, 5]", "inf", "nothing was written to"});
  EXPECT_FALSE(fs::exists(dir.file("dst")));
  EXPECT_EQ(hidden_entries(dir.path()), std::vector<std::string>{});
  // Mended, the same command succeeds.
  {
    SafetensorsWriter b;
    b.add("model.layers.0.mlp.down_proj.weight", randn(rng, DType::BF16, {8, 16}, 1.0));
    b.write(dir.file("src/b.safetensors"));
  }
  ASSERT_EQ(run_cli(dir, {"convert", dir.file("src"), dir.file("dst"), "--to", "fp8"}).code(), 0);
}

TEST(CliTest, ConvertInterruptedLeavesNothingAndARerunWorks) {
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();  // about 100 MiB: long enough to be stopped midway
  spec.hidden = 1024;
  spec.moe_intermediate = 512;
  spec.experts = 32;
  spec.layers = 1;
  spec.seed = fresh_seed();
  write_synthetic_checkpoint(dir.file("src"), spec);
  const std::string dst = dir.file("dst");
  for (int sig : {SIGTERM, SIGINT}) {
    SCOPED_TRACE(sig);
    const Child c = spawn_cli(dir, {"convert", dir.file("src"), dst, "--to", "fp8", "--scheme", "block", "--threads", "1"});
    // Wait until output is being written into the staging folder, then stop it.
    const std::string staging = "." + fs::path(dst).filename().string() + ".fp8moe-partial-" + std::to_string(c.pid);
    const auto t0 = std::chrono::steady_clock::now();
    bool writing = false;
    while (!writing && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20)) {
      std::error_code ec;
      writing = fs::file_size(dir.path() / staging / "model.safetensors", ec) > 0 && !ec;
      if (!writing) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(writing) << "the conversion never started writing";
    ::kill(c.pid, sig);
    const RunResult r = wait_cli(c);
    ASSERT_FALSE(WIFSIGNALED(r.status)) << r.describe();
    EXPECT_EQ(r.code(), 128 + sig) << r.describe();
    EXPECT_TRUE(contains(r.err, sig == SIGTERM ? "interrupted by SIGTERM" : "interrupted by SIGINT")) << r.describe();
    EXPECT_TRUE(contains(r.err, "partial output was removed")) << r.describe();
    EXPECT_FALSE(fs::exists(dst));
    EXPECT_EQ(hidden_entries(dir.path()), std::vector<std::string>{});
  }
  // A staging folder left by a process that was killed outright is cleaned up by the next run.
  pid_t dead = 4000000;
  while (::kill(dead, 0) == 0 || errno != ESRCH) ++dead;
  fs::create_directories(dir.path() / (".dst.fp8moe-partial-" + std::to_string(dead)) / "junk");
  const RunResult again = run_cli(dir, {"convert", dir.file("src"), dst, "--to", "fp8", "--scheme", "block"});
  ASSERT_EQ(again.code(), 0) << again.describe();
  EXPECT_TRUE(contains(again.err, "killed")) << again.err;
  EXPECT_EQ(hidden_entries(dir.path()), std::vector<std::string>{});
  EXPECT_TRUE(Checkpoint::open(dst).inspect().ok());
}

TEST(CliTest, ConvertProgressCountsEveryTensorAndByte) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const std::string d = m.dir.path().string();
  RunResult r = run_cli(m.dir, {"convert", m.glm_bf16, d + "/p-fp8", "--to", "fp8"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  r = run_cli(m.dir, {"convert", d + "/p-fp8", d + "/p-back", "--to", "bf16"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  // The per-file line counts what that file holds, in and out (the FP8 file holds the scales too).
  const auto in = SafetensorsFile::open(d + "/p-fp8/model-00002-of-00002.safetensors");
  const auto out = SafetensorsFile::open(d + "/p-back/model-00002-of-00002.safetensors");
  EXPECT_TRUE(contains(r.err, "[2/2] wrote model-00002-of-00002.safetensors (" + std::to_string(in->names().size()) +
                                  " tensors in, " + std::to_string(out->names().size()) + " tensors out"))
      << r.err;
  EXPECT_GT(in->names().size(), out->names().size());
  // Bytes done of the total, MB/s and ETA; the last line at 100 %.
  EXPECT_TRUE(std::regex_search(r.err, std::regex(R"(convert: 100%  [0-9.]+ MiB of [0-9.]+ MiB, [0-9]+ MB/s, ETA)"))) << r.err;
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(in [0-9.]+ s \([0-9]+ MB/s of input, [0-9]+ threads?\))"))) << r.out;
}

TEST(CliTest, ConvertBlockSizesTheLoadersRead) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const std::string d = m.dir.path().string();
  for (const char* b : {"7", "100000", "0", "96"})
    expect_usage_error(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x", "--to", "fp8", "--scheme", "block", "--block", b}),
                       {"--block", b, "16, 32, 64, 128, 256"});
  EXPECT_FALSE(fs::exists(d + "/x"));
  ASSERT_EQ(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/b64", "--to", "fp8", "--scheme", "block", "--block", "64"}).code(), 0);
  EXPECT_EQ(run_cli(m.dir, {"inspect", d + "/b64"}).code(), 0);
}

// ---- inspect and convert agree (item 6) ------------------------------------------------------

TEST(CliTest, DenseModelsInspectConvertAndRefuseLayer) {
  TempDir dir;
  std::mt19937_64 rng(fresh_seed());
  fs::create_directories(dir.path() / "llama");
  write_file(dir.file("llama/config.json"), R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "vocab_size": 32})");
  {
    SafetensorsWriter w;
    w.add("model.embed_tokens.weight", randn(rng, DType::BF16, {32, 64}, 1.0));
    w.add("model.layers.0.input_layernorm.weight", randn(rng, DType::BF16, {64}, 1.0));
    w.add("model.layers.0.self_attn.q_proj.weight", randn(rng, DType::BF16, {64, 64}, 0.1));
    w.add("model.layers.0.mlp.gate_proj.weight", randn(rng, DType::BF16, {96, 64}, 0.1));
    w.add("model.layers.0.mlp.down_proj.weight", randn(rng, DType::BF16, {64, 96}, 0.1));
    w.add("lm_head.weight", randn(rng, DType::BF16, {32, 64}, 0.1));
    w.write(dir.file("llama/model.safetensors"));
  }
  RunResult r = run_cli(dir, {"inspect", dir.file("llama")});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "llama") && contains(r.out, "dense model")) << r.out;
  ASSERT_EQ(run_cli(dir, {"convert", dir.file("llama"), dir.file("llama-fp8"), "--to", "fp8"}).code(), 0);
  r = run_cli(dir, {"inspect", dir.file("llama-fp8"), "--json"});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_EQ(nlohmann::json::parse(r.out)["quant_method"], "compressed-tensors");
  ASSERT_EQ(run_cli(dir, {"convert", dir.file("llama-fp8"), dir.file("llama-back"), "--to", "bf16"}).code(), 0);
  SafetensorsWriter in;
  in.add("hidden_states", Tensor::zeros(DType::F32, {1, 64}));
  in.write(dir.file("in.safetensors"));
  expect_failure(run_cli(dir, {"layer", dir.file("llama-fp8"), "--layer", "0", "--inputs", dir.file("in.safetensors"), "--out",
                               dir.file("out.safetensors"), "--backend", "cpu"}),
                 {"llama", "dense model"});
}

// Rewrites checkpoint `dir`'s config.json without its quantization_config.
void drop_quantization_config(const std::string& dir) {
  nlohmann::ordered_json c = nlohmann::ordered_json::parse(read_file(dir + "/config.json"));
  c.erase("quantization_config");
  write_file(dir + "/config.json", c.dump(2));
}

TEST(CliTest, Fp8WithoutQuantizationConfigInspectsAsConvertTreatsIt) {
  Models m;
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  const fs::path root = m.dir.path();
  // FP8 tensors and their scales, no quantization_config: the scale shapes say the scheme; both
  // commands read it the same way, and convert --to bf16 gives the same bytes as with the config.
  fs::copy(m.qwen_fp8, root / "noqc");
  drop_quantization_config((root / "noqc").string());
  RunResult r = run_cli(m.dir, {"inspect", (root / "noqc").string()});
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_TRUE(contains(r.out, "no quantization_config")) << r.out;
  ASSERT_EQ(run_cli(m.dir, {"convert", (root / "noqc").string(), (root / "noqc-bf16").string(), "--to", "bf16"}).code(), 0);
  ASSERT_EQ(run_cli(m.dir, {"convert", m.qwen_fp8, (root / "qc-bf16").string(), "--to", "bf16"}).code(), 0);
  const TensorStore a = TensorStore::open((root / "noqc-bf16").string()), b = TensorStore::open((root / "qc-bf16").string());
  ASSERT_EQ(a.names(), b.names());
  for (const std::string& n : a.names()) EXPECT_TRUE(testing::same_bytes(a.view(n), b.view(n))) << n;
  expect_failure(run_cli(m.dir, {"convert", (root / "noqc").string(), (root / "x").string(), "--to", "fp8"}),
                 {"already F8_E4M3", "bf16 first"});

  // A scale whose shape states no scheme, outside any MoE layer: inspect reports what convert
  // refuses, naming the same tensor.
  {
    const TensorStore src = TensorStore::open((root / "noqc").string());
    SafetensorsWriter w;
    for (const std::string& n : src.names()) {
      const TensorView v = src.view(n);
      Tensor copy(v.dtype, v.shape);
      std::memcpy(copy.data(), v.data, static_cast<size_t>(v.nbytes()));
      w.add(n, n == "model.layers.0.self_attn.q_proj.weight_scale_inv" ? Tensor::zeros(DType::F32, {3, 3}) : copy);
    }
    fs::create_directories(root / "badscale");
    w.write((root / "badscale/model.safetensors").string());
    fs::copy_file(root / "noqc/config.json", root / "badscale/config.json");
  }
  r = run_cli(m.dir, {"inspect", (root / "badscale").string()});
  expect_failure(r, {"model.layers.0.self_attn.q_proj.weight", "[3, 3]"});
  expect_failure(run_cli(m.dir, {"convert", (root / "badscale").string(), (root / "y").string(), "--to", "bf16"}),
                 {"model.layers.0.self_attn.q_proj.weight", "[3, 3]"});
}

// ---- demo: Ctrl-C removes the temporary folder (item 12) -------------------------------------

TEST(CliTest, DemoInterruptedRemovesItsTemporaryFolder) {
  TempDir dir;
  const Child c = spawn_cli(dir, {"demo", "--steps", "100000", "--backend", "cpu"}, {"TMPDIR=" + dir.path().string()});
  std::string work;
  const auto t0 = std::chrono::steady_clock::now();
  const std::regex line(R"(workdir (\S+) \(temporary\))");
  while (work.empty() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20)) {
    std::smatch mm;
    const std::string out = fs::exists(c.out_path) ? read_file(c.out_path) : std::string();  // the child may not have opened it yet
    if (std::regex_search(out, mm, line)) work = mm[1].str();
    else std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_FALSE(work.empty()) << "the demo never named its workdir";
  while (!fs::exists(fs::path(work) / "glm-bf16") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ::kill(c.pid, SIGINT);
  const RunResult r = wait_cli(c);
  EXPECT_EQ(r.code(), 130) << r.describe();
  EXPECT_FALSE(fs::exists(work)) << r.describe();
}

}  // namespace
}  // namespace fp8moe

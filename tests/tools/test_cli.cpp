// The fp8moe CLI (tools/*.cpp), run as a subprocess exactly as a user runs it: inspect on good
// and malformed checkpoints (a plain exit status 1 with a message naming the problem, never a
// signal), convert round trips checked tensor by tensor, the layer command against the engine
// called directly, and the demo.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
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

// Runs the CLI binary with `args` (no shell), capturing stdout and stderr through files in `dir`.
RunResult run_cli(const TempDir& dir, const std::vector<std::string>& args) {
  const std::string out_path = dir.file(".cli_stdout"), err_path = dir.file(".cli_stderr");
  std::vector<std::string> argv_s{FP8MOE_CLI};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
    execv(argv[0], argv.data());
    _exit(127);
  }
  RunResult r;
  if (pid < 0) return r;
  waitpid(pid, &r.status, 0);
  r.out = read_file(out_path);
  r.err = read_file(err_path);
  return r;
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
  expect_failure(run_cli(dir, {"inspect", "--bogus", "x"}), {"unknown option '--bogus'"});
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
  expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x", "--to", "fp4"}), {"--to", "fp4"});
  expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x", "--to", "fp8", "--scheme", "tensor"}), {"--scheme", "tensor"});
  expect_failure(run_cli(m.dir, {"convert", m.qwen_bf16, d + "/x"}), {"--to"});
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
    return run_cli(m.dir, {"layer", m.qwen_fp8, "--layer", layer, "--inputs", m.dir.file("bad.safetensors"), "--out",
                           m.dir.file("bad-out.safetensors"), "--backend", "cpu"});
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
  expect_failure(run_cli(dir, {"demo", "--steps", "0"}), {"--steps"});
}

}  // namespace
}  // namespace fp8moe

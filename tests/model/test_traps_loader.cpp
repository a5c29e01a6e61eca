// The loader-side traps of the reference system (../shared/docs/reference-system.md, "What went
// wrong"), each proven by a test that fails if fp8moe falls into it: scales dropped at load (1),
// FP8 codes used without a scale (2), weight_scale_inv inverted (3), BF16 layers pushed through
// FP8 dequantization (6), sharded checkpoints and missing keys (7), PEFT LoRA orientation guessed
// from shapes (12), gate/up block scales concatenated when I % 128 != 0 (13), and 32-bit index
// and offset arithmetic past 2^31 / 2^32 elements (14). docs/traps.md maps every trap to its tests.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/moe_test_util.hpp"
#include "formats/safetensors_test_util.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/lora.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/safetensors.hpp"
#include "model/ckpt_builder.hpp"
#include "model/experts.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;

namespace fp8moe {
namespace {

namespace fs = std::filesystem;
using moetest::count_nan;
using moetest::fresh_seed;
using moetest::nan_tensor;
using moetest::randn;
using moetest::rel_err;
using moetest::to_vec;
using testing::CkptBuilder;
using testing::CkptOptions;
using testing::TempDir;

bool any_contains(const std::vector<std::string>& v, const std::string& part) {
  for (const std::string& s : v)
    if (s.find(part) != std::string::npos) return true;
  return false;
}

// Elements of the loaded routed stacks that differ from the builder's independent code x scale
// reference.
int64_t mismatches(const MoeLayerWeights& w, const CkptBuilder& b) {
  const QuantTensor gu = w.routed.gate_up.view(), dn = w.routed.down.view();
  const int64_t E = w.routed.experts(), H = b.options().H, I = b.options().I;
  int64_t bad = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < 2 * I; ++n)
      for (int64_t k = 0; k < H; ++k) bad += gu.at(e, n, k) != b.gate_up(w.layer, e, n, k);
    for (int64_t n = 0; n < H; ++n)
      for (int64_t k = 0; k < I; ++k) bad += dn.at(e, n, k) != b.down(w.layer, e, n, k);
  }
  return bad;
}

// A plain F64 stack [E, N, K] whose element (e, n, k) is f(e, n, k).
template <typename F>
QuantWeights f64_stack(int64_t E, int64_t N, int64_t K, F&& f) {
  QuantWeights q;
  q.data = Tensor(DType::F64, {E, N, K});
  q.spec = ScaleSpec::none(N, K);
  double* p = q.data.ptr<double>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) p[(e * N + n) * K + k] = f(e, n, k);
  return q;
}

// The layer output [T, H] of experts `w` on the CPU backend.
std::vector<double> forward(const ExpertWeights& w, const Tensor& hidden, const Tensor& ids, const Tensor& weights) {
  auto be = make_cpu_backend();
  const MoeLayer layer(*be, w);
  Tensor out = nan_tensor(DType::F64, {hidden.size(0), w.hidden()});
  layer.forward({hidden, ids, weights}, out);
  EXPECT_EQ(count_nan(out), 0);
  return to_vec(out);
}

struct Inputs {
  Tensor hidden, ids, weights;  // [T, H] F64, [T, k] I32, [T, k] F64
};
Inputs random_inputs(int64_t T, int64_t k, int64_t E, int64_t H, std::mt19937_64& gen) {
  Inputs in;
  in.hidden = randn(DType::F64, {T, H}, gen);
  in.ids = Tensor(DType::I32, {T, k});
  const std::vector<int64_t> ids = moetest::random_ids(T, k, E, gen);
  for (int64_t i = 0; i < T * k; ++i) in.ids.ptr<int32_t>()[i] = static_cast<int32_t>(ids[i]);
  in.weights = moetest::uniform(DType::F64, {T, k}, gen, 0.1, 1.0);
  return in;
}

// =============================================================================================
// Trap 1: scales silently dropped at load, FP8 codes then used as values.

// Every scale of a MoE layer dropped (what the reference system's loader did): refused at load,
// naming the first expert weight, and reported by inspect().
TEST(Trap01ScalesDropped, AllScalesOfALayerDropped) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;  // qwen3_moe, fp8 blocks, per-expert tensors
  CkptBuilder b(o, seed);
  for (auto it = b.tensors.begin(); it != b.tensors.end();)
    it = it->first.rfind("model.layers.0.mlp.experts.", 0) == 0 && it->first.find("_scale") != std::string::npos
             ? b.tensors.erase(it)
             : std::next(it);
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  expect_error([&] { ck.load_moe_layer(0); },
               {"model.layers.0.mlp.experts.0.gate_proj.weight is F8_E4M3 but has no scale", "refusing"});
  const InspectionReport rep = ck.inspect();
  EXPECT_FALSE(rep.ok());
  EXPECT_TRUE(any_contains(rep.problems, "has no scale")) << rep.str();
  EXPECT_EQ(mismatches(ck.load_moe_layer(1), b), 0);  // the intact layer still loads exactly
}

// The transformers failure mode: per-expert weight_scale tensors renamed to parameters that do
// not exist. A compressed-tensors GLM checkpoint with fused experts whose scales were renamed:
// the FP8 stacks are refused, the renamed tensors are not silently ignored.
TEST(Trap01ScalesDropped, ScalesRenamedToUnknownKeys) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.model_type = "glm4_moe_lite";
  o.method = QuantMethod::CompressedTensors;
  o.scheme = ScaleKind::Channel;
  o.layout = ExpertLayout::Fused;
  CkptBuilder b(o, seed);
  for (const char* proj : {"gate_up_proj", "down_proj"}) {
    const std::string from = "model.layers.0.mlp.experts." + std::string(proj) + "_scale";
    b.tensors["model.layers.0.mlp.experts." + std::string(proj) + ".weight_scale"] = b.tensors.at(from);
    b.tensors.erase(from);
  }
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  expect_error([&] { ck.load_moe_layer(0); }, {"model.layers.0.mlp.experts.gate_up_proj", "has no scale"});
  const InspectionReport rep = ck.inspect();
  EXPECT_FALSE(rep.ok());
  EXPECT_TRUE(any_contains(rep.problems, "gate_up_proj is F8_E4M3 but has no scale")) << rep.str();
}

// =============================================================================================
// Trap 2: a weight without a scale cast straight to BF16.

// A checkpoint without quantization_config whose experts hold FP8 codes and no scales: the
// per-tensor rule still refuses them (FP8 needs its scale whatever the config says).
TEST(Trap02WeightWithoutScale, PlainConfigWithFp8CodesIsRefused) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  o.method = QuantMethod::None;
  CkptBuilder b(o, seed);
  const std::string w = "model.layers.0.mlp.experts.1.down_proj.weight";
  Tensor codes(DType::F8_E4M3, b.tensors.at(w).shape());
  for (int64_t i = 0; i < codes.numel(); ++i) codes.ptr<uint8_t>()[i] = static_cast<uint8_t>(0x30 + i % 16);
  b.tensors[w] = codes;
  TempDir d;
  b.write(d.file("ck"));
  const Checkpoint ck = Checkpoint::open(d.file("ck"));
  EXPECT_EQ(ck.quant().method, QuantMethod::None);
  expect_error([&] { ck.load_moe_layer(0); }, {w + " is F8_E4M3 but has no scale", "refusing"});
  EXPECT_TRUE(any_contains(ck.inspect().problems, w + " is F8_E4M3 but has no scale"));
}

// Below the loader, no layer accepts FP8 codes described as plain weights: stacking, validation,
// dequantization and the layer itself all refuse them.
TEST(Trap02WeightWithoutScale, EveryLayerBelowTheLoaderRefusesUnscaledCodes) {
  const int64_t E = 2, N = 8, K = 16;
  Tensor codes(DType::F8_E4M3, {E, N, K});
  for (int64_t i = 0; i < codes.numel(); ++i) codes.ptr<uint8_t>()[i] = static_cast<uint8_t>(0x38);  // 1.0
  const QuantTensor unscaled{codes.view(), TensorView(), ScaleSpec::none(N, K)};
  expect_error([&] { unscaled.validate("experts.gate_up_proj"); }, {"experts.gate_up_proj", "an FP8 weight needs a scale"});
  expect_error([&] { dequantize(unscaled, DType::BF16); }, {"an FP8 weight needs a scale"});
  expect_error([&] { model::copy_stacked("experts.gate_up_proj", codes, "", TensorView(), ScaleSpec::none(N, K)); },
               {"experts.gate_up_proj", "FP8 codes without their scale are not values"});

  Tensor down_codes(DType::F8_E4M3, {E, K, N / 2});
  ExpertWeights w;
  w.gate_up = unscaled;
  w.down = {down_codes.view(), TensorView(), ScaleSpec::none(K, N / 2)};
  auto be = make_cpu_backend();
  expect_error([&] { MoeLayer(*be, w); }, {"experts gate_up", "needs a scale"});
}

// =============================================================================================
// Trap 3: weight_scale_inv inverted. It is a multiplier, like weight_scale.

// The layer computed from the loaded FP8 stacks equals the layer computed from plain fp64 weights
// code x scale, and is far from the one computed with code / scale; for the "fp8" format
// (weight_scale_inv) and compressed-tensors (weight_scale), in F32, BF16 and F16 scales.
TEST(Trap03ScaleInvIsAMultiplier, LayerOutputUsesCodeTimesScale) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  for (const auto& [method, scale_dtype] : {std::pair{QuantMethod::Fp8, DType::F32}, std::pair{QuantMethod::Fp8, DType::BF16},
                                             std::pair{QuantMethod::CompressedTensors, DType::F16}}) {
    SCOPED_TRACE(std::string(quant_method_name(method)) + " scales " + std::string(dtype_name(scale_dtype)));
    CkptOptions o;
    o.method = method;
    o.scheme = ScaleKind::Block;
    o.scale_dtype = scale_dtype;
    CkptBuilder b(o, gen());
    TempDir d;
    b.write(d.file("ck"));
    const MoeLayerWeights lw = Checkpoint::open(d.file("ck")).load_moe_layer(0);
    EXPECT_EQ(b.tensors.count("model.layers.0.mlp.experts.0.gate_proj.weight" + b.scale_suffix()), 1u);
    const int64_t E = o.E, H = o.H, I = o.I;

    // Plain weights from the builder's reference (code x scale) and from the inverted reading.
    const auto code_of = [&](bool gate_up, int64_t e, int64_t n, int64_t k) {
      const std::string base = "model.layers.0.mlp.experts." + std::to_string(e) + ".";
      const std::string w = gate_up ? base + (n < I ? "gate_proj" : "up_proj") : base + "down_proj";
      const testing::SourceTensor& s = b.source(w);
      const int64_t r = gate_up ? n % I : n;
      const double code = load_as_double(s.weight.data(), s.weight.dtype(), r * s.C + k);
      const int64_t gC = (s.C + s.bc - 1) / s.bc;
      const double scale = load_as_double(s.scale.data(), s.scale.dtype(), (r / s.br) * gC + k / s.bc);
      return std::pair{code, scale};
    };
    const QuantWeights gu = f64_stack(E, 2 * I, H, [&](int64_t e, int64_t n, int64_t k) {
      const auto [c, s] = code_of(true, e, n, k);
      return c * s;
    });
    const QuantWeights dn = f64_stack(E, H, I, [&](int64_t e, int64_t n, int64_t k) {
      const auto [c, s] = code_of(false, e, n, k);
      return c * s;
    });
    const QuantWeights gu_inv = f64_stack(E, 2 * I, H, [&](int64_t e, int64_t n, int64_t k) {
      const auto [c, s] = code_of(true, e, n, k);
      return c / s;
    });
    const QuantWeights dn_inv = f64_stack(E, H, I, [&](int64_t e, int64_t n, int64_t k) {
      const auto [c, s] = code_of(false, e, n, k);
      return c / s;
    });

    ExpertWeights plain, inverted;
    plain.gate_up = gu.view(), plain.down = dn.view();
    inverted.gate_up = gu_inv.view(), inverted.down = dn_inv.view();
    const Inputs in = random_inputs(9, 2, E, H, gen);
    const std::vector<double> got = forward(lw.routed.view(), in.hidden, in.ids, in.weights);
    const std::vector<double> want = forward(plain, in.hidden, in.ids, in.weights);
    EXPECT_LT(rel_err(got, want), 1e-13);
    EXPECT_GT(rel_err(want, forward(inverted, in.hidden, in.ids, in.weights)), 0.5)
        << "the inverted reading must be far off, or this test could not tell the two apart";
  }
}

// =============================================================================================
// Trap 4: the FP8 weight layout handed to the fast GEMM "fixed" into the wrong stride order.

// Whatever the stored layout (per-expert, transformers-fused, GPT-OSS stored transposed), the
// loader hands over one canonical layout: codes [E, N, K] row-major and contiguous, scales
// [E, scale_rows, grid_k] F32 contiguous. QuantTensor::at honours strides, so element checks
// alone would not notice a transposed view; the CUDA GEMM refuses non-contiguous weights.
TEST(Trap04WeightLayout, LoadedStacksAreCanonicalAndContiguous) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  struct Case {
    const char* what;
    std::string model_type;
    ExpertLayout layout;
    QuantMethod method;
  };
  for (const Case& c : {Case{"per-expert fp8", "qwen3_moe", ExpertLayout::PerExpert, QuantMethod::Fp8},
                        Case{"fused fp8", "qwen3_moe", ExpertLayout::Fused, QuantMethod::Fp8},
                        Case{"gpt-oss fp8 (stored transposed)", "gpt_oss", ExpertLayout::GptOss, QuantMethod::Fp8},
                        Case{"gpt-oss bf16 (stored transposed)", "gpt_oss", ExpertLayout::GptOss, QuantMethod::None}}) {
    SCOPED_TRACE(c.what);
    CkptOptions o;
    o.model_type = c.model_type;
    o.layout = c.layout;
    o.method = c.method;
    o.I = 64;  // fused block scales need I % 32 == 0
    CkptBuilder b(o, gen());
    TempDir d;
    b.write(d.file("ck"));
    const MoeLayerWeights w = Checkpoint::open(d.file("ck")).load_moe_layer(0);
    EXPECT_EQ(w.layout, c.layout);
    const std::pair<const QuantWeights*, Shape> stacks[] = {{&w.routed.gate_up, Shape{o.E, 2 * o.I, o.H}},
                                                            {&w.routed.down, Shape{o.E, o.H, o.I}}};
    for (const auto& [q, shape] : stacks) {
      const TensorView& v = q->data.view();
      EXPECT_EQ(v.shape, shape);
      EXPECT_TRUE(v.is_contiguous());
      EXPECT_EQ(v.strides[0], shape[1] * shape[2]);
      EXPECT_EQ(v.strides[1], shape[2]);
      EXPECT_EQ(v.strides[2], 1);
      EXPECT_EQ(q->spec.rows, shape[1]);
      EXPECT_EQ(q->spec.cols, shape[2]);
      if (q->spec.kind == ScaleKind::None) continue;
      EXPECT_EQ(q->scale.shape(), (Shape{o.E, q->spec.scale_rows(), q->spec.grid_k()}));
      EXPECT_TRUE(q->scale.view().is_contiguous());
      EXPECT_EQ(q->scale.dtype(), DType::F32);
    }
    EXPECT_EQ(mismatches(w, b), 0);
  }
}

// =============================================================================================
// Trap 6: non-FP8 models routed through the FP8 path (dequantized on every call).

// A plain BF16 checkpoint, and a BF16 layer of an FP8 checkpoint left out by its ignore list, load
// as the stored BF16 bytes (not a dequantized or re-quantized copy) with ScaleSpec none and no
// scale tensor: there is nothing for an FP8 path to dequantize.
TEST(Trap06Bf16NeverDequantized, PlainLayersLoadAsTheStoredBytes) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  struct Case {
    const char* what;
    CkptOptions o;
    int64_t layer;
  };
  CkptOptions plain;
  plain.method = QuantMethod::None;
  CkptOptions glm;
  glm.model_type = "glm4_moe_lite";
  glm.method = QuantMethod::CompressedTensors;
  glm.scheme = ScaleKind::Channel;
  glm.layers = 3;
  glm.first_dense = 1;
  glm.shared = true;
  glm.bf16_layers = {2};
  for (const Case& c : {Case{"plain checkpoint", plain, 0}, Case{"ignored layer of a compressed-tensors checkpoint", glm, 2}}) {
    SCOPED_TRACE(c.what);
    CkptBuilder b(c.o, gen());
    TempDir d;
    b.write(d.file("ck"));
    const Checkpoint ck = Checkpoint::open(d.file("ck"));
    const MoeLayerWeights w = ck.load_moe_layer(c.layer);
    for (const ExpertStack* s : {&w.routed, w.shared ? &*w.shared : nullptr}) {
      if (!s) continue;
      for (const QuantWeights* q : {&s->gate_up, &s->down}) {
        EXPECT_EQ(q->spec.kind, ScaleKind::None);
        EXPECT_EQ(q->data.dtype(), DType::BF16);
        EXPECT_FALSE(q->scale.defined());
        EXPECT_FALSE(q->view().quantized());
      }
    }
    // Byte for byte the stored tensors: expert e of gate_up is gate_proj then up_proj.
    const int64_t I = c.o.I, H = c.o.H;
    const std::string P = "model.layers." + std::to_string(c.layer) + ".mlp.experts.";
    const auto* gu = static_cast<const unsigned char*>(w.routed.gate_up.data.data());
    const auto* dn = static_cast<const unsigned char*>(w.routed.down.data.data());
    for (int64_t e = 0; e < c.o.E; ++e) {
      const std::string base = P + std::to_string(e) + ".";
      const size_t half = static_cast<size_t>(I * H * 2);
      EXPECT_EQ(std::memcmp(gu + 2 * e * half, b.tensors.at(base + "gate_proj.weight").data(), half), 0) << "expert " << e;
      EXPECT_EQ(std::memcmp(gu + (2 * e + 1) * half, b.tensors.at(base + "up_proj.weight").data(), half), 0) << "expert " << e;
      EXPECT_EQ(std::memcmp(dn + e * half, b.tensors.at(base + "down_proj.weight").data(), half), 0) << "expert " << e;
    }
    const InspectionReport rep = ck.inspect();
    EXPECT_TRUE(rep.ok()) << rep.str();
    for (const LayerReport& l : rep.layers)
      if (l.index == c.layer)
        for (const ProjectionReport& p : l.projections) EXPECT_FALSE(p.fp8()) << p.name;
  }
}

// =============================================================================================
// Trap 7: sharded checkpoints unsupported; missing keys crashed the patch.

// Weights and their scales in different shards load exactly; every way a key can go missing is a
// clear error naming the key (or shard), never a crash.
TEST(Trap07ShardedAndMissingKeys, ShardedLoadsAndMissingKeysNameTheKey) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  CkptOptions o;
  CkptBuilder b(o, seed);
  TempDir d;
  const int shards = 3;
  b.write(d.file("ok"), shards);
  {
    const Checkpoint ck = Checkpoint::open(d.file("ok"));
    ASSERT_EQ(ck.store().files().size(), 3u);
    const std::string w = "model.layers.0.mlp.experts.0.gate_proj.weight";
    EXPECT_NE(ck.store().file_of(w).path(), ck.store().file_of(w + "_scale_inv").path())
        << "the test wants a weight and its scale in different shards";
    for (int64_t l : ck.moe_layers()) EXPECT_EQ(mismatches(ck.load_moe_layer(l), b), 0) << "layer " << l;
    EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
  }
  const auto index_of = [&](const std::string& dir) {
    std::ifstream in(d.file(dir + "/model.safetensors.index.json"));
    return nlohmann::json::parse(in);
  };
  const auto write_index = [&](const std::string& dir, const nlohmann::json& j) {
    std::ofstream(d.file(dir + "/model.safetensors.index.json")) << j.dump();
  };
  const std::string scale = "model.layers.0.mlp.experts.2.up_proj.weight_scale_inv";
  const std::string weight = "model.layers.1.mlp.experts.3.down_proj.weight";

  // The index names a tensor its shard lacks.
  b.write(d.file("ghost"), shards);
  nlohmann::json idx = index_of("ghost");
  idx["weight_map"]["model.layers.0.mlp.experts.9.gate_proj.weight"] = CkptBuilder::shard_name(1, shards);
  write_index("ghost", idx);
  expect_error([&] { Checkpoint::open(d.file("ghost")); },
               {"model.layers.0.mlp.experts.9.gate_proj.weight", CkptBuilder::shard_name(1, shards), "does not contain it"});

  // A shard holds a tensor the index does not list.
  b.write(d.file("unlisted"), shards);
  idx = index_of("unlisted");
  idx["weight_map"].erase(scale);
  write_index("unlisted", idx);
  expect_error([&] { Checkpoint::open(d.file("unlisted")); }, {scale, "absent from the weight_map"});

  // A shard file missing or truncated.
  b.write(d.file("noshard"), shards);
  fs::remove(d.file("noshard/" + CkptBuilder::shard_name(2, shards)));
  expect_error([&] { Checkpoint::open(d.file("noshard")); }, {CkptBuilder::shard_name(2, shards), "does not exist"});
  b.write(d.file("cut"), shards);
  fs::resize_file(d.file("cut/" + CkptBuilder::shard_name(0, shards)),
                  fs::file_size(d.file("cut/" + CkptBuilder::shard_name(0, shards))) - 5);
  expect_error([&] { Checkpoint::open(d.file("cut")); }, {CkptBuilder::shard_name(0, shards), "truncated"});

  // A scale or a weight absent from both the shards and the index: open works (the checkpoint is
  // readable), loading the layer names the key, inspect() reports it.
  CkptBuilder no_scale = b;
  no_scale.tensors.erase(scale);
  no_scale.write(d.file("noscale"), shards);
  const Checkpoint ns = Checkpoint::open(d.file("noscale"));
  expect_error([&] { ns.load_moe_layer(0); }, {"model.layers.0.mlp.experts.2.up_proj.weight is F8_E4M3 but has no scale"});
  EXPECT_TRUE(any_contains(ns.inspect().problems, "up_proj.weight is F8_E4M3 but has no scale"));
  EXPECT_EQ(mismatches(ns.load_moe_layer(1), b), 0);

  CkptBuilder no_weight = b;
  no_weight.tensors.erase(weight);
  no_weight.tensors.erase(weight + "_scale_inv");
  no_weight.write(d.file("noweight"), shards);
  const Checkpoint nw = Checkpoint::open(d.file("noweight"));
  expect_error([&] { nw.load_moe_layer(1); }, {"missing tensor " + weight});
  EXPECT_TRUE(any_contains(nw.inspect().problems, "missing tensor " + weight));
}

// =============================================================================================
// Trap 12: LoRA orientation guessed from shapes (wrong when in > out, ambiguous when square).

// PEFT adapters imported for square experts and for in > out, applied by the engine's grouped
// GEMM (the LoRA delta s * (X A_e^T) B_e^T on a zero base), equal the PEFT definition evaluated
// straight from the flattened tensors: lora_A [E*r, in] expert-major, lora_B [out, E*r] with the
// expert as the fast axis. Orientation comes from the declared projection only.
TEST(Trap12LoraOrientation, SquareAndInGreaterThanOutMatchPeft) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  struct Case {
    const char* what;
    LoraProjection proj;
    int64_t H, I;
  };
  const int64_t E = 3, r = 2, T = 11, k = 2;
  const double s = 1.5;
  for (const Case& c : {Case{"down square (H == I)", LoraProjection::Down, 12, 12},
                        Case{"down in > out (I > H)", LoraProjection::Down, 8, 20},
                        Case{"gate_up square (H == 2I)", LoraProjection::GateUp, 16, 8},
                        Case{"gate_up in > out (H > 2I)", LoraProjection::GateUp, 24, 5}}) {
    SCOPED_TRACE(c.what);
    const Tensor gu(DType::BF16, {E, 2 * c.I, c.H}), dn(DType::BF16, {E, c.H, c.I});
    ExpertWeights base;
    base.gate_up = {gu.view(), TensorView(), ScaleSpec::none(2 * c.I, c.H)};
    base.down = {dn.view(), TensorView(), ScaleSpec::none(c.H, c.I)};
    const PeftExpertLoraLayout layout = PeftExpertLoraLayout::of(base, c.proj, r, "model.layers.0.mlp.experts");
    const int64_t in = layout.in_features, out = layout.out_features;
    EXPECT_EQ(in, c.proj == LoraProjection::Down ? c.I : c.H);
    EXPECT_EQ(out, c.proj == LoraProjection::Down ? c.H : 2 * c.I);

    const Tensor lora_A = randn(DType::F64, {E * r, in}, gen), lora_B = randn(DType::F64, {out, E * r}, gen);
    const ExpertLoraPair p = import_peft_expert_lora(layout, lora_A, lora_B);

    // Engine: U = X A_e^T, then v = X 0^T + s U B_e^T, rows in expert order.
    auto be = make_cpu_backend();
    const Inputs x = random_inputs(T, k, E, in, gen);
    RoutingPlan plan;
    be->build_plan(x.ids, E, plan);
    const int64_t M = T * k;
    Tensor u = nan_tensor(DType::F64, {M, r}), v = nan_tensor(DType::F64, {M, out});
    const Tensor zero = Tensor::zeros(DType::F64, {E, out, in});
    GroupedGemm g1;
    g1.plan = &plan;
    g1.a = {x.hidden, RowSource::Tokens};
    g1.b = {p.A.view(), TensorView(), ScaleSpec::none(r, in)};
    g1.out = u;
    be->grouped_gemm(g1);
    GroupedGemm g2;
    g2.plan = &plan;
    g2.a = {x.hidden, RowSource::Tokens};
    g2.b = {zero.view(), TensorView(), ScaleSpec::none(out, in)};
    g2.lora_a = {u};
    g2.lora_b = p.B;
    g2.lora_scale = s;
    g2.out = v;
    be->grouped_gemm(g2);

    // PEFT's definition, read straight from the flattened tensors; and the expert-major misreading.
    const double* la = lora_A.ptr<double>();
    const double* lb = lora_B.ptr<double>();
    std::vector<double> want, wrong, got = to_vec(v);
    for (int64_t row = 0; row < M; ++row) {
      const int64_t pair = plan.sorted_pairs.ptr<int32_t>()[row], t = pair / k;
      const int64_t e = x.ids.ptr<int32_t>()[pair];
      for (int64_t o = 0; o < out; ++o) {
        double d = 0.0, dw = 0.0;
        for (int64_t q = 0; q < r; ++q) {
          double ax = 0.0;
          for (int64_t i = 0; i < in; ++i) ax += la[(e * r + q) * in + i] * x.hidden.ptr<double>()[t * in + i];
          d += lb[o * E * r + q * E + e] * ax;
          dw += lb[o * E * r + e * r + q] * ax;
        }
        want.push_back(s * d);
        wrong.push_back(s * dw);
      }
    }
    EXPECT_LT(rel_err(got, want), 1e-13);
    EXPECT_GT(rel_err(wrong, want), 0.1) << "the expert-major misreading must differ, or the test proves nothing";
  }
}

// =============================================================================================
// Trap 13: gate and up block scales concatenated even when I is not a multiple of the block.

// Per-expert checkpoints with I % 128 != 0 (and I > 128, so each half has a partial last block)
// keep one scale grid per half: the first up row starts its own grid row, every element equals the
// builder's code x scale. The same scales stored fused ([E, 2*ceil(I/128), ...]) are ambiguous and
// refused; with I % 128 == 0 they load.
TEST(Trap13GateUpBlockScales, SeparateGridsWhenINotAMultipleOfTheBlock) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  CkptOptions o;
  o.block = 128;
  o.E = 2, o.H = 300, o.I = 200;
  o.layers = 1;
  CkptBuilder b(o, gen());
  TempDir d;
  b.write(d.file("per_expert"));
  const MoeLayerWeights w = Checkpoint::open(d.file("per_expert")).load_moe_layer(0);
  const ScaleSpec& spec = w.routed.gate_up.spec;
  EXPECT_EQ(spec.segments, 2);
  EXPECT_EQ(w.routed.gate_up.scale.shape(), (Shape{2, 4, 3}));  // 2 halves x ceil(200/128) rows
  EXPECT_EQ(spec.index(o.I, 0), 2 * 3);      // up row 0: its own grid's first row
  EXPECT_EQ(spec.index(o.I - 1, 0), 1 * 3);  // gate row 199: gate's partial second block
  EXPECT_EQ(mismatches(w, b), 0);

  CkptOptions f = o;
  f.layout = ExpertLayout::Fused;
  CkptBuilder fb(f, gen());
  fb.write(d.file("fused_200"));
  expect_error([&] { Checkpoint::open(d.file("fused_200")).load_moe_layer(0); },
               {"model.layers.0.mlp.experts.gate_up_proj_scale_inv", "multiple of the block height 128"});
  f.I = 256;
  CkptBuilder fb256(f, gen());
  fb256.write(d.file("fused_256"));
  const MoeLayerWeights w256 = Checkpoint::open(d.file("fused_256")).load_moe_layer(0);
  EXPECT_EQ(w256.routed.gate_up.spec.segments, 2);
  EXPECT_EQ(mismatches(w256, fb256), 0);
}

// Quantizing a stacked gate_up with two segments is quantizing gate and up apart, bit for bit,
// for I below, above and at a multiple of the block.
TEST(Trap13GateUpBlockScales, StackedQuantizationEqualsSeparateHalves) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  const int64_t E = 2, H = 136;
  for (int64_t I : {72, 200, 256}) {
    SCOPED_TRACE("I " + std::to_string(I));
    const Tensor stacked = randn(DType::BF16, {E, 2 * I, H}, gen);
    const QuantWeights q = quantize(stacked, ScaleSpec::block(2 * I, H, 128, 128, 2));
    const int64_t gn = (I + 127) / 128, gk = (H + 127) / 128;
    for (int64_t half = 0; half < 2; ++half) {
      Tensor part(DType::BF16, {E, I, H});
      for (int64_t e = 0; e < E; ++e)
        std::memcpy(static_cast<char*>(part.data()) + e * I * H * 2,
                    static_cast<const char*>(stacked.data()) + (e * 2 * I + half * I) * H * 2, static_cast<size_t>(I * H * 2));
      const QuantWeights qp = quantize(part, ScaleSpec::block(I, H, 128, 128));
      for (int64_t e = 0; e < E; ++e) {
        EXPECT_EQ(std::memcmp(q.data.ptr<uint8_t>() + (e * 2 * I + half * I) * H, qp.data.ptr<uint8_t>() + e * I * H,
                              static_cast<size_t>(I * H)),
                  0);
        EXPECT_EQ(std::memcmp(q.scale.ptr<float>() + (e * 2 * gn + half * gn) * gk, qp.scale.ptr<float>() + e * gn * gk,
                              static_cast<size_t>(gn * gk * 4)),
                  0);
      }
    }
  }
}

// =============================================================================================
// Trap 14: int32 index arithmetic overflowed past 2^31 elements.

// The scale index of every scheme, element counts and strides, for matrices past 2^31 and 2^32
// elements: pure arithmetic, no allocation.
TEST(Trap14LargeIndices, ScaleSpecAndShapeArithmeticPast2Pow32) {
  constexpr int64_t kTwo31 = int64_t{1} << 31, kTwo32 = int64_t{1} << 32;
  const int64_t N = 70001, K = 70003;  // N * K = 4.9e9
  ASSERT_GT(N * K, kTwo32);
  const ScaleSpec g1 = ScaleSpec::group(N, K, 1);  // one scale per element
  EXPECT_EQ(g1.numel(), N * K);
  EXPECT_EQ(g1.index(N - 1, K - 1), N * K - 1);
  EXPECT_EQ(g1.index(30678, 1), 30678 * K + 1);  // just past 2^31
  EXPECT_GT(g1.index(30678, 1), kTwo31);
  const ScaleSpec seg = ScaleSpec::block(2 * N, K, 1, 1, 2);  // two row segments of 1x1 blocks
  EXPECT_EQ(seg.index(2 * N - 1, K - 1), 2 * N * K - 1);
  EXPECT_EQ(seg.index(N, 5), N * K + 5);
  const ScaleSpec blk = ScaleSpec::block(3 * kTwo31, 256, 2, 128, 3);  // grid 3 x 2^30 rows x 2
  EXPECT_EQ(blk.scale_rows(), 3 * (kTwo31 / 2));
  EXPECT_EQ(blk.index(3 * kTwo31 - 1, 255), blk.numel() - 1);
  EXPECT_EQ(blk.index(2 * kTwo31 + 2, 0), (2 * (kTwo31 / 2) + 1) * 2);
  const ScaleSpec ch = ScaleSpec::channel(5 * kTwo31, 7);
  EXPECT_EQ(ch.index(5 * kTwo31 - 1, 6), 5 * kTwo31 - 1);

  const Shape s{3, N, K};
  EXPECT_EQ(s.numel(), 3 * N * K);
  const TensorView v(nullptr, DType::F8_E4M3, s);
  EXPECT_EQ(v.strides[0], N * K);
  EXPECT_EQ(v.nbytes(), 3 * N * K);
}

// A safetensors file past 4 GiB (sparse: a few pages of real data) holding an FP8 expert stack of
// 4.8e9 codes and its block scales at a byte offset past 2^32: the reader maps and indexes the
// views correctly, and QuantTensor::at reads codes and scales at element offsets past 2^31 and
// 2^32, without reading the rest of the data.
TEST(Trap14LargeIndices, SparseCheckpointPast4GiB) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 gen(seed);
  const int64_t E = 2, N = 40001, K = 60001;  // E*N*K = 4,800,200,002 codes; N*K > 2^31
  const ScaleSpec spec = ScaleSpec::block(N, K, 128, 128);
  const int64_t gr = spec.scale_rows(), gc = spec.grid_k();
  const uint64_t code_bytes = static_cast<uint64_t>(E * N * K), scale_bytes = static_cast<uint64_t>(E * gr * gc * 4);
  ASSERT_GT(code_bytes, uint64_t{1} << 32);
  const uint64_t tail_begin = code_bytes + scale_bytes;
  const nlohmann::json header = {
      {"experts", {{"dtype", "F8_E4M3"}, {"shape", {E, N, K}}, {"data_offsets", {0, code_bytes}}}},
      {"experts_scale", {{"dtype", "F32"}, {"shape", {E, gr, gc}}, {"data_offsets", {code_bytes, tail_begin}}}},
      {"tail", {{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {tail_begin, tail_begin + 12}}}}};
  const std::string text = header.dump();
  const uint64_t data_start = 8 + text.size();

  TempDir d;
  const std::string path = d.file("big.safetensors");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  const auto put = [&](uint64_t off, const void* p, size_t n) {
    ASSERT_EQ(::pwrite(fd, p, n, static_cast<off_t>(off)), static_cast<ssize_t>(n)) << "pwrite at " << off;
  };
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(data_start + tail_begin + 12)), 0);
  const uint64_t n = text.size();
  put(0, &n, 8);
  put(8, text.data(), text.size());
  // Scales: powers of two, all of them (1.2 MB), written past 2^32 at an offset that is 2 mod 4.
  std::vector<float> scales(static_cast<size_t>(E * gr * gc));
  std::uniform_int_distribution<int> ex(-12, 2);
  for (float& s : scales) s = std::ldexp(1.0f, ex(gen));
  put(data_start + code_bytes, scales.data(), scale_bytes);
  const float tail[3] = {1.5f, -2.25f, 3.0f};
  put(data_start + tail_begin, tail, 12);
  // Codes at chosen elements: offsets below 2^31, between 2^31 and 2^32, past 2^32, the last one.
  struct At {
    int64_t e, n, k;
    uint8_t code;
  };
  std::vector<At> at = {{0, 0, 0, 0}, {0, 35791, 394, 0}, {0, 39999, 60000, 0}, {1, 0, 0, 0},
                        {1, 30000, 123, 0}, {1, 33000, 7, 0}, {1, N - 1, K - 1, 0}};
  std::uniform_int_distribution<int64_t> rn(31000, N - 1), rk(0, K - 1);
  for (int i = 0; i < 8; ++i) at.push_back({1, rn(gen), rk(gen), 0});
  std::uniform_int_distribution<int> code(1, 0x7E);
  for (At& a : at) {
    a.code = static_cast<uint8_t>(code(gen) | (gen() & 0x80));
    put(data_start + static_cast<uint64_t>((a.e * N + a.n) * K + a.k), &a.code, 1);
  }
  ::close(fd);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_LT(static_cast<int64_t>(st.st_blocks) * 512, int64_t{64} << 20) << "the file should be sparse";

  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->file_size(), data_start + tail_begin + 12);
  EXPECT_EQ(f->entry("tail").begin, tail_begin);
  const TensorView tv = f->view("tail");
  for (int i = 0; i < 3; ++i) EXPECT_EQ(load_as_double(tv.data, tv.dtype, i), tail[i]);

  const TensorView data = f->view("experts");
  const TensorView scale = f->view("experts_scale");
  EXPECT_EQ(data.shape, (Shape{E, N, K}));
  EXPECT_EQ(data.strides[0], N * K);
  EXPECT_EQ(static_cast<const unsigned char*>(scale.data) - static_cast<const unsigned char*>(data.data),
            static_cast<std::ptrdiff_t>(code_bytes));
  const QuantTensor q{data, scale, spec};
  q.validate("sparse experts");
  for (const At& a : at) {
    const double s = scales[static_cast<size_t>((a.e * gr + a.n / 128) * gc + a.k / 128)];
    EXPECT_EQ(q.at(a.e, a.n, a.k), static_cast<double>(decode_e4m3(a.code)) * s)
        << "element (" << a.e << ", " << a.n << ", " << a.k << ") at byte " << (a.e * N + a.n) * K + a.k;
  }
  EXPECT_EQ(q.at(1, 31000, 1), 0.0);  // a hole reads as code 0

  const TensorStore store = TensorStore::open(d.path().string());
  EXPECT_EQ(store.entry("experts_scale").begin, code_bytes);
  EXPECT_EQ(load_as_double(store.view("tail").data, DType::F32, 2), 3.0);
}

}  // namespace
}  // namespace fp8moe

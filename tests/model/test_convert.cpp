// Checkpoint conversion (src/model/convert.cpp): BF16 -> FP8 (channel, block) -> BF16 on fresh
// synthetic checkpoints, sharded and not, checked tensor by tensor against references built from
// the fp8 codec (tests/model/convert_test_util.hpp); the configs written; and the refusals.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "formats/safetensors_test_util.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/convert.hpp"
#include "fp8moe/safetensors.hpp"
#include "fp8moe/synthetic.hpp"
#include "model/convert_test_util.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;

namespace fp8moe {
namespace {

using json = nlohmann::json;
using testing::fresh_seed;
using testing::read_file;
using testing::TempDir;
namespace fs = std::filesystem;

ConvertOptions to_fp8(ScaleKind scheme, int64_t block = 128) {
  ConvertOptions o;
  o.to = ConvertTarget::FP8;
  o.scheme = scheme;
  o.block = block;
  return o;
}
ConvertOptions to_bf16() { return ConvertOptions{}; }

json config_of(const fs::path& dir) { return json::parse(read_file((dir / "config.json").string())); }

TEST(ConvertTest, GlmChannelRoundTripSharded) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = seed;
  spec.shards = 2;
  write_synthetic_checkpoint(dir.file("bf16"), spec);
  testing::write_file(dir.file("bf16/tokenizer.json"), "{\"version\": \"1.0\"}");

  const ConvertReport r = convert_checkpoint(dir.file("bf16"), dir.file("fp8"), to_fp8(ScaleKind::Channel));
  EXPECT_EQ(r.files, 2);
  EXPECT_GT(r.converted, 0);
  EXPECT_EQ(r.tensors_out, r.tensors_in + r.converted);  // one scale per quantized weight
  const TensorStore orig = TensorStore::open(dir.file("bf16"));
  const TensorStore fp8 = TensorStore::open(dir.file("fp8"));
  testing::expect_fp8_from_bf16(orig, fp8, ScaleKind::Channel, 128);

  // Same shard split; a weight's scale lives in its weight's shard.
  ASSERT_EQ(fp8.files().size(), 2u);
  for (const std::string& n : orig.names())
    EXPECT_EQ(fs::path(fp8.file_of(n).path()).filename(), fs::path(orig.file_of(n).path()).filename()) << n;
  for (const std::string& n : fp8.names())
    if (n.size() > 6 && n.compare(n.size() - 6, 6, "_scale") == 0)
      EXPECT_EQ(&fp8.file_of(n), &fp8.file_of(n.substr(0, n.size() - 6))) << n;
  const json index = json::parse(read_file(dir.file("fp8/model.safetensors.index.json")));
  EXPECT_EQ(index["weight_map"].size(), fp8.names().size());
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), r.bytes_out);
  EXPECT_EQ(read_file(dir.file("fp8/tokenizer.json")), read_file(dir.file("bf16/tokenizer.json")));

  // The FP8_DYNAMIC preset, with the modules left in BF16 named in `ignore`.
  json cfg = config_of(dir.path() / "fp8");
  const json q = cfg["quantization_config"];
  EXPECT_EQ(q["quant_method"], "compressed-tensors");
  EXPECT_EQ(q["format"], "float-quantized");
  EXPECT_EQ(q["quantization_status"], "compressed");
  EXPECT_EQ(q["config_groups"]["group_0"]["targets"], json::array({"Linear"}));
  EXPECT_EQ(q["config_groups"]["group_0"]["weights"],
            json({{"num_bits", 8}, {"type", "float"}, {"strategy", "channel"}, {"symmetric", true}, {"dynamic", false}}));
  EXPECT_EQ(q["config_groups"]["group_0"]["input_activations"],
            json({{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", true}}));
  const auto ignore = q["ignore"].get<std::vector<std::string>>();
  for (const char* m : {"lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "model.layers.3.mlp.gate",
                        "model.layers.3.shared_head.head"})
    EXPECT_NE(std::find(ignore.begin(), ignore.end(), m), ignore.end()) << m;
  for (const std::string& m : ignore) EXPECT_EQ(m.find("experts"), std::string::npos) << m;
  cfg.erase("quantization_config");
  EXPECT_EQ(cfg, config_of(dir.path() / "bf16"));

  // The loader reads the result as channel-scaled FP8 experts.
  const Checkpoint ck = Checkpoint::open(dir.file("fp8"));
  EXPECT_EQ(ck.quant().method, QuantMethod::CompressedTensors);
  EXPECT_TRUE(ck.inspect().ok()) << ck.inspect().str();
  const MoeLayerWeights w = ck.load_moe_layer(1);
  EXPECT_EQ(w.routed.gate_up.spec.kind, ScaleKind::Channel);
  EXPECT_EQ(w.routed.gate_up.data.dtype(), DType::F8_E4M3);

  const ConvertReport back = convert_checkpoint(dir.file("fp8"), dir.file("back"), to_bf16());
  EXPECT_EQ(back.converted, r.converted);
  EXPECT_EQ(back.tensors_out, r.tensors_in);
  testing::expect_bf16_round_trip(orig, fp8, TensorStore::open(dir.file("back")), ScaleKind::Channel, 128);
  EXPECT_EQ(config_of(dir.path() / "back"), config_of(dir.path() / "bf16"));
  EXPECT_TRUE(fs::exists(dir.file("back/model.safetensors.index.json")));
}

TEST(ConvertTest, QwenBlockRoundTripPartialBlocks) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();  // I = 96, H = 256: partial 128-blocks everywhere
  spec.seed = seed;
  write_synthetic_checkpoint(dir.file("bf16"), spec);
  const ConvertReport r = convert_checkpoint(dir.file("bf16"), dir.file("fp8"), to_fp8(ScaleKind::Block));
  EXPECT_EQ(r.files, 1);
  const TensorStore orig = TensorStore::open(dir.file("bf16"));
  const TensorStore fp8 = TensorStore::open(dir.file("fp8"));
  testing::expect_fp8_from_bf16(orig, fp8, ScaleKind::Block, 128);
  EXPECT_EQ(fp8.entry("model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv").shape, (Shape{1, 2}));
  EXPECT_EQ(fp8.entry("model.layers.0.mlp.experts.0.down_proj.weight_scale_inv").shape, (Shape{2, 1}));
  EXPECT_FALSE(fs::exists(dir.file("fp8/model.safetensors.index.json")));

  const json q = config_of(dir.path() / "fp8")["quantization_config"];
  EXPECT_EQ(q["quant_method"], "fp8");
  EXPECT_EQ(q["fmt"], "e4m3");
  EXPECT_EQ(q["activation_scheme"], "dynamic");
  EXPECT_EQ(q["weight_block_size"], json::array({128, 128}));
  const auto keep = q["modules_to_not_convert"].get<std::vector<std::string>>();
  EXPECT_EQ(keep, (std::vector<std::string>{"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}));

  const Checkpoint ck = Checkpoint::open(dir.file("fp8"));
  EXPECT_EQ(ck.quant().method, QuantMethod::Fp8);
  EXPECT_EQ(ck.load_moe_layer(0).routed.down.spec.kind, ScaleKind::Block);

  convert_checkpoint(dir.file("fp8"), dir.file("back"), to_bf16());
  testing::expect_bf16_round_trip(orig, fp8, TensorStore::open(dir.file("back")), ScaleKind::Block, 128);
}

TEST(ConvertTest, SmallBlocks) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();
  spec.seed = seed;
  spec.layers = 1;
  write_synthetic_checkpoint(dir.file("bf16"), spec);
  convert_checkpoint(dir.file("bf16"), dir.file("fp8"), to_fp8(ScaleKind::Block, 40));
  const TensorStore orig = TensorStore::open(dir.file("bf16"));
  const TensorStore fp8 = TensorStore::open(dir.file("fp8"));
  testing::expect_fp8_from_bf16(orig, fp8, ScaleKind::Block, 40);
  EXPECT_EQ(config_of(dir.path() / "fp8")["quantization_config"]["weight_block_size"], json::array({40, 40}));
  convert_checkpoint(dir.file("fp8"), dir.file("back"), to_bf16());
  testing::expect_bf16_round_trip(orig, fp8, TensorStore::open(dir.file("back")), ScaleKind::Block, 40);
}

// A hand-made "fp8" checkpoint: one [N, K] weight with BF16 block scales (a dtype real releases
// use too), so the BF16 scale path is read and the result checked element by element.
TEST(ConvertTest, Bf16ScalesAndExactProducts) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  TempDir dir;
  fs::create_directories(dir.path() / "src");
  const int64_t N = 130, K = 5;  // two row blocks, the second with 2 rows
  Tensor codes(DType::F8_E4M3, Shape{N, K}), scale(DType::BF16, Shape{2, 1});
  std::uniform_int_distribution<int> code(0, 255);
  for (int64_t i = 0; i < N * K; ++i) {
    uint8_t c;
    do c = static_cast<uint8_t>(code(rng)); while ((c & 0x7F) == 0x7F);  // no NaN codes
    codes.ptr<uint8_t>()[i] = c;
  }
  std::uniform_real_distribution<double> u(1e-3, 1e-1);
  for (int i = 0; i < 2; ++i) store_from_double(scale.data(), DType::BF16, i, u(rng));
  SafetensorsWriter w;
  w.add("model.layers.0.mlp.experts.0.down_proj.weight", codes);
  w.add("model.layers.0.mlp.experts.0.down_proj.weight_scale_inv", scale);
  w.write(dir.file("src/model.safetensors"));
  testing::write_file(dir.file("src/config.json"),
                      R"({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                          "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})");
  convert_checkpoint(dir.file("src"), dir.file("dst"), to_bf16());
  const TensorStore out = TensorStore::open(dir.file("dst"));
  ASSERT_EQ(out.names(), std::vector<std::string>{"model.layers.0.mlp.experts.0.down_proj.weight"});
  const TensorView b = out.view("model.layers.0.mlp.experts.0.down_proj.weight");
  ASSERT_EQ(b.dtype, DType::BF16);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const double exact = decode_e4m3(codes.ptr<uint8_t>()[n * K + k]) * load_as_double(scale.data(), DType::BF16, n / 128);
      uint16_t want;
      store_from_double(&want, DType::BF16, 0, exact);
      ASSERT_EQ(static_cast<const uint16_t*>(b.data)[n * K + k], want) << n << ", " << k;
    }
  EXPECT_FALSE(config_of(dir.path() / "dst").contains("quantization_config"));
}

// Writes a one-tensor-pair "fp8" checkpoint into dir/name with the given scale shape (or none).
void write_fp8_pair(const TempDir& dir, const std::string& name, const std::optional<Shape>& scale_shape) {
  fs::create_directories(dir.path() / name);
  Tensor codes = Tensor::zeros(DType::F8_E4M3, Shape{4, 8});
  SafetensorsWriter w;
  w.add("model.layers.0.mlp.experts.0.gate_proj.weight", codes);
  if (scale_shape) w.add("model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv", Tensor::zeros(DType::F32, *scale_shape));
  w.write(dir.file(name + "/model.safetensors"));
  testing::write_file(dir.file(name + "/config.json"),
                      R"({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8",
                          "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})");
}

TEST(ConvertTest, RefusesAndCleansUp) {
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::qwen3_moe();
  spec.layers = 1;
  write_synthetic_checkpoint(dir.file("bf16"), spec);

  // Source and destination checks.
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("bf16"), to_fp8(ScaleKind::Channel)); },
               {"is the source checkpoint"});
  fs::create_directories(dir.path() / "full");
  testing::write_file(dir.file("full/x"), "x");
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("full"), to_fp8(ScaleKind::Channel)); },
               {"not an empty directory"});
  EXPECT_TRUE(fs::exists(dir.file("full/x")));
  expect_error([&] { convert_checkpoint(dir.file("nope"), dir.file("o1"), to_bf16()); }, {"nope"});
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("o2"), to_bf16()); }, {"no quantization_config"});
  EXPECT_FALSE(fs::exists(dir.file("o2")));
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("o3"), to_fp8(ScaleKind::Group)); }, {"channel or block"});

  convert_checkpoint(dir.file("bf16"), dir.file("fp8"), to_fp8(ScaleKind::Channel));
  expect_error([&] { convert_checkpoint(dir.file("fp8"), dir.file("o4"), to_fp8(ScaleKind::Block)); },
               {"already declares quant_method", "compressed-tensors"});

  // Broken FP8 checkpoints: each error names the tensor; nothing is left behind.
  write_fp8_pair(dir, "noscale", std::nullopt);
  expect_error([&] { convert_checkpoint(dir.file("noscale"), dir.file("o5"), to_bf16()); },
               {"model.layers.0.mlp.experts.0.gate_proj.weight", "no scale"});
  EXPECT_FALSE(fs::exists(dir.file("o5")));
  write_fp8_pair(dir, "badscale", Shape{2, 1});
  expect_error([&] { convert_checkpoint(dir.file("badscale"), dir.file("o6"), to_bf16()); },
               {"gate_proj.weight_scale_inv", "[1, 1]", "[2, 1]"});
  EXPECT_FALSE(fs::exists(dir.file("o6")));
  fs::create_directories(dir.path() / "empty_dst");
  expect_error([&] { convert_checkpoint(dir.file("badscale"), dir.file("empty_dst"), to_bf16()); }, {"[2, 1]"});
  EXPECT_TRUE(fs::is_directory(dir.file("empty_dst")) && fs::is_empty(dir.file("empty_dst")));
}

TEST(ConvertTest, WhichWeightsAreQuantized) {
  for (const char* n : {"model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
                        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                        "model.layers.0.mlp.gate_proj.weight", "model.layers.47.eh_proj.weight"})
    EXPECT_TRUE(fp8_convertible_weight(n, 2)) << n;
  for (const char* n : {"model.layers.0.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight",
                        "model.layers.47.shared_head.head.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                        "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.router.weight",
                        "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.self_attn.q_a_layernorm.weight"})
    EXPECT_FALSE(fp8_convertible_weight(n, 2)) << n;
  EXPECT_FALSE(fp8_convertible_weight("model.layers.0.mlp.experts.gate_up_proj", 3));
  EXPECT_FALSE(fp8_convertible_weight("model.layers.0.input_layernorm.weight", 1));
}


// Every output file is what SafetensorsWriter writes for the same tensors and metadata, byte for
// byte (the converter streams its files instead of assembling them, but writes the same header);
// and the output does not depend on the number of threads.
TEST(ConvertTest, FilesAreByteIdenticalToTheWriterAndToOneThread) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = seed;
  spec.shards = 2;
  write_synthetic_checkpoint(dir.file("bf16"), spec);
  for (const auto& [name, opt] : std::vector<std::pair<std::string, ConvertOptions>>{
           {"channel", to_fp8(ScaleKind::Channel)}, {"block", to_fp8(ScaleKind::Block, 64)}}) {
    SCOPED_TRACE(name);
    ConvertOptions one = opt, many = opt;
    one.threads = 1;
    many.threads = 5;
    convert_checkpoint(dir.file("bf16"), dir.file(name + "-1"), one);
    convert_checkpoint(dir.file("bf16"), dir.file(name + "-5"), many);
    ConvertOptions back = to_bf16();
    back.threads = 3;
    convert_checkpoint(dir.file(name + "-5"), dir.file(name + "-back"), back);
    for (const std::string& out : {name + "-1", name + "-5", name + "-back"})
      for (const char* shard : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
        SCOPED_TRACE(out + "/" + shard);
        const std::string path = dir.file(out + "/" + shard);
        const auto f = SafetensorsFile::open(path);
        SafetensorsWriter w;
        for (const auto& [k, v] : f->metadata()) w.set_metadata(k, v);
        for (const std::string& n : f->names()) {
          const TensorView v = f->view(n);
          Tensor copy(v.dtype, v.shape);
          std::memcpy(copy.data(), v.data, static_cast<size_t>(v.nbytes()));
          w.add(n, copy);
        }
        w.write(dir.file("rewritten.safetensors"));
        EXPECT_TRUE(read_file(path) == read_file(dir.file("rewritten.safetensors")));
        if (out == name + "-5") EXPECT_TRUE(read_file(path) == read_file(dir.file(name + "-1/" + shard)));
      }
  }
}

TEST(ConvertTest, ProgressCancellationAndPlacement) {
  TempDir dir;
  SyntheticSpec spec = SyntheticSpec::glm4_moe_lite();
  spec.seed = fresh_seed();
  spec.shards = 3;
  write_synthetic_checkpoint(dir.file("bf16"), spec);

  // Progress: bytes never go back, end at the total; one "file done" per file, in order.
  std::vector<ConvertProgress> seen;
  ConvertOptions o = to_fp8(ScaleKind::Channel);
  o.progress = [&](const ConvertProgress& p) { seen.push_back(p); };
  const ConvertReport r = convert_checkpoint(dir.file("bf16"), dir.file("fp8"), o);
  ASSERT_FALSE(seen.empty());
  uint64_t last = 0;
  int64_t files_done = 0;
  for (const ConvertProgress& p : seen) {
    EXPECT_GE(p.bytes_done, last);
    EXPECT_LE(p.bytes_done, p.bytes_total);
    EXPECT_EQ(p.bytes_total, r.bytes_in);
    EXPECT_EQ(p.files, 3);
    last = p.bytes_done;
    if (p.file_done) EXPECT_EQ(p.file, ++files_done);
  }
  EXPECT_EQ(files_done, 3);
  EXPECT_EQ(seen.back().bytes_done, r.bytes_in);
  EXPECT_TRUE(seen.back().file_done);

  // Cancelled after the first file: nothing at the destination, no staging folder left.
  std::atomic<bool> cancel{false};
  ConvertOptions c = to_fp8(ScaleKind::Channel);
  c.cancel = &cancel;
  c.progress = [&](const ConvertProgress& p) {
    if (p.file_done) cancel = true;
  };
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("cancelled"), c); }, {"cancelled", "was not written"});
  EXPECT_THROW(
      {
        cancel = false;
        convert_checkpoint(dir.file("bf16"), dir.file("cancelled"), c);
      },
      ConvertCancelled);
  EXPECT_FALSE(fs::exists(dir.file("cancelled")));
  for (const auto& de : fs::directory_iterator(dir.path()))
    EXPECT_NE(de.path().filename().string()[0], '.') << de.path();

  // A destination inside the source is refused before anything is written.
  expect_error([&] { convert_checkpoint(dir.file("bf16"), dir.file("bf16/out"), to_fp8(ScaleKind::Channel)); },
               {"inside the source checkpoint"});
  EXPECT_FALSE(fs::exists(dir.file("bf16/out")));
  // "out/" is "out".
  convert_checkpoint(dir.file("fp8"), dir.file("back") + "/", to_bf16());
  EXPECT_TRUE(fs::exists(dir.file("back/config.json")));
}

TEST(ConvertTest, NonFiniteWeightIsNamedWithItsElement) {
  TempDir dir;
  fs::create_directories(dir.path() / "src");
  testing::write_file(dir.file("src/config.json"), R"({"model_type": "qwen3", "hidden_size": 8, "num_hidden_layers": 1})");
  Tensor w = Tensor::zeros(DType::F32, Shape{4, 8});
  for (int64_t i = 0; i < 32; ++i) w.ptr<float>()[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
  w.ptr<float>()[3 * 8 + 6] = std::nanf("");
  SafetensorsWriter sw;
  sw.add("model.layers.0.self_attn.o_proj.weight", w);
  sw.write(dir.file("src/model.safetensors"));
  for (ScaleKind k : {ScaleKind::Channel, ScaleKind::Block})
    expect_error([&] { convert_checkpoint(dir.file("src"), dir.file("dst"), to_fp8(k, 16)); },
                 {"tensor model.layers.0.self_attn.o_proj.weight", "F32[4, 8]", "element [3, 6]", "nan"});
  EXPECT_FALSE(fs::exists(dir.file("dst")));
}
}  // namespace
}  // namespace fp8moe

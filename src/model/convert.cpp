// Checkpoint conversion BF16 <-> FP8 (include/fp8moe/convert.hpp).
//
// Which tensors are FP8 is decided per tensor, as the loader does (formats.md section 8): dtype
// F8_E4M3/F8_E5M2 AND a `<name>_scale` / `<name>_scale_inv` sibling. The scale grid comes from
// the quantization_config (parse_quant_config) and must match the stored scale's shape.
#include "fp8moe/convert.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "fp8moe/checkpoint.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/safetensors.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace fp8moe {

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  FP8MOE_CHECK(f.good(), "cannot read ", p.string());
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  FP8MOE_CHECK(f.good(), "cannot create ", p.string());
  f << text;
  f.close();
  FP8MOE_CHECK(f.good(), "cannot write ", p.string());
}

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

// The module a weight belongs to: "X.weight" -> "X"; a fused stack ("...experts.gate_up_proj")
// is its own module.
std::string module_of(const std::string& weight) {
  return ends_with(weight, ".weight") ? weight.substr(0, weight.size() - 7) : weight;
}

// A source tensor's scale sibling, if any: "<name>_scale_inv" (fp8) or "<name>_scale"
// (compressed-tensors). Both present is ambiguous, hence an error.
std::string scale_of(const TensorStore& store, const std::string& name) {
  const bool inv = store.contains(name + "_scale_inv"), plain = store.contains(name + "_scale");
  FP8MOE_CHECK(!(inv && plain), "tensor ", name, ": has both ", name, "_scale_inv and ", name,
               "_scale; expected exactly one scale");
  return inv ? name + "_scale_inv" : plain ? name + "_scale" : std::string();
}

// If `name` is a scale (`<w>_scale` / `<w>_scale_inv` with tensor <w> present), returns <w>.
// A ".weight_scale[_inv]" whose weight is absent is an error: a scale without a weight.
std::string weight_of_scale(const TensorStore& store, const std::string& name) {
  for (const char* suffix : {"_scale_inv", "_scale"}) {
    if (!ends_with(name, suffix)) continue;
    const std::string w = name.substr(0, name.size() - std::string(suffix).size());
    if (store.contains(w)) return w;
    FP8MOE_CHECK(!ends_with(w, ".weight"), "tensor ", name, ": a weight scale without its weight (expected tensor ", w,
                 " in the checkpoint, found none)");
  }
  return {};
}

// F32 copy [lead, scale_rows, grid_k] of a stored scale (F32/BF16/F16), checked against `spec`.
Tensor scale_as_f32(const TensorStore& store, const std::string& scale_name, const std::string& weight_name,
                    int64_t lead, const ScaleSpec& spec) {
  const TensorView s = store.view(scale_name);
  FP8MOE_CHECK(s.dtype == DType::F32 || s.dtype == DType::BF16 || s.dtype == DType::F16, "tensor ", scale_name,
               ": expected an F32/BF16/F16 scale, found ", dtype_name(s.dtype));
  const Shape want = lead == 1 ? Shape{spec.scale_rows(), spec.grid_k()} : Shape{lead, spec.scale_rows(), spec.grid_k()};
  // A per-tensor scale may be stored as [] or [1] (or [E] / [E, 1] for a stack).
  const bool ok = spec.kind == ScaleKind::Tensor ? s.numel() == lead : s.shape == want;
  FP8MOE_CHECK(ok, "tensor ", scale_name, ": expected shape ", want.str(), " (", spec.str(), " scales of ", weight_name,
               ") found ", s.shape.str());
  Tensor out(DType::F32, Shape{lead, spec.scale_rows(), spec.grid_k()});
  for (int64_t i = 0; i < out.numel(); ++i)
    out.ptr<float>()[i] = static_cast<float>(load_as_double(s.data, s.dtype, i));
  return out;
}

// Dequantizes FP8 weight `name` (rank 2 [N, K] or a stack [E, N, K]) to BF16 of the same shape.
Tensor dequantize_weight(const TensorStore& store, const QuantConfig& qc, const std::string& name,
                         const std::string& scale_name) {
  const TensorView w = store.view(name);
  FP8MOE_CHECK(w.rank() == 2 || w.rank() == 3, "tensor ", name, ": expected an FP8 weight [out, in] or a stack [E, out, in], found ",
               w.str());
  const WeightQuantScheme scheme = qc.scheme_for(module_of(name));
  FP8MOE_CHECK(scheme.kind != ScaleKind::None, "tensor ", name, ": stored as ", dtype_name(w.dtype), " with scale ",
               scale_name, ", but the quantization_config of ", qc.source,
               " declares no quantization for module ", module_of(name), " (excluded or not targeted)");
  const int64_t lead = w.rank() == 3 ? w.size(0) : 1, N = w.size(-2), K = w.size(-1);
  const ScaleSpec spec = scheme.spec(N, K);
  const Tensor scale = scale_as_f32(store, scale_name, name, lead, spec);
  const QuantTensor q{w.reshape(Shape{lead, N, K}), scale.view(), spec};
  q.validate(name.c_str());
  return dequantize(q, DType::BF16);
}

// Quantizes a plain [N, K] weight: codes [N, K] F8_E4M3 and the format's scale tensor.
struct Quantized {
  Tensor codes;  // [N, K] F8_E4M3
  Tensor scale;  // channel: [N, 1]; block: [ceil(N/b), ceil(K/b)]; F32
};
Quantized quantize_weight(const TensorView& w, const ConvertOptions& opt) {
  const int64_t N = w.size(0), K = w.size(1);
  const ScaleSpec spec = opt.scheme == ScaleKind::Channel ? ScaleSpec::channel(N, K)
                                                          : ScaleSpec::block(N, K, opt.block, opt.block);
  QuantWeights q = quantize(w.reshape(Shape{1, N, K}), spec, DType::F8_E4M3);
  // The owning tensors are [1, ...]; the files store them without the stack dimension.
  Quantized out{Tensor(DType::F8_E4M3, Shape{N, K}), Tensor(DType::F32, Shape{spec.scale_rows(), spec.grid_k()})};
  std::memcpy(out.codes.data(), q.data.data(), static_cast<size_t>(out.codes.nbytes()));
  std::memcpy(out.scale.data(), q.scale.data(), static_cast<size_t>(out.scale.nbytes()));
  return out;
}

json quantization_config_json(const ConvertOptions& opt, const std::vector<std::string>& left_bf16) {
  json q;
  if (opt.scheme == ScaleKind::Channel) {
    // compressed-tensors' FP8_DYNAMIC preset (formats.md section 4).
    q["quant_method"] = "compressed-tensors";
    q["format"] = "float-quantized";
    q["quantization_status"] = "compressed";
    json weights = {{"num_bits", 8}, {"type", "float"}, {"strategy", "channel"}, {"symmetric", true}, {"dynamic", false}};
    json acts = {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", true}};
    q["config_groups"] = {{"group_0", {{"targets", {"Linear"}}, {"weights", weights}, {"input_activations", acts}}}};
    q["ignore"] = left_bf16;
  } else {
    // Fine-grained FP8 as the Qwen3 FP8 releases write it (formats.md section 3).
    q["quant_method"] = "fp8";
    q["fmt"] = "e4m3";
    q["activation_scheme"] = "dynamic";
    q["weight_block_size"] = {opt.block, opt.block};
    q["modules_to_not_convert"] = left_bf16;
  }
  return q;
}

// Creates `dst` (or checks it is empty) and removes what was written if the conversion fails.
class Output {
 public:
  Output(const fs::path& src, const fs::path& dst) : root_(dst) {
    std::error_code ec;
    if (fs::exists(dst, ec)) {
      FP8MOE_CHECK(!fs::equivalent(src, dst), "convert: destination ", dst.string(), " is the source checkpoint; refusing to overwrite it");
      FP8MOE_CHECK(fs::is_directory(dst) && fs::is_empty(dst), "convert: destination ", dst.string(),
                   " already exists and is not an empty directory");
    } else {
      fs::create_directories(dst);
      created_root_ = true;
    }
  }
  ~Output() {
    if (committed_) return;
    std::error_code ec;  // best effort: the conversion's own error is what the caller sees
    for (const fs::path& p : written_) fs::remove(p, ec);
    if (created_root_) fs::remove_all(root_, ec);
  }
  // Path for relative name `rel` (parent folders created); remembered for the clean-up.
  fs::path file(const fs::path& rel) {
    const fs::path p = root_ / rel;
    fs::create_directories(p.parent_path());
    written_.push_back(p);
    return p;
  }
  void commit() { committed_ = true; }

 private:
  fs::path root_;
  std::vector<fs::path> written_;
  bool created_root_ = false, committed_ = false;
};

}  // namespace

bool fp8_convertible_weight(const std::string& name, int rank) {
  if (rank != 2 || !ends_with(name, ".weight")) return false;
  const std::string m = module_of(name);
  // Routers (mlp.gate, Mixtral's block_sparse_moe.gate, GPT-OSS's mlp.router), Qwen2-MoE's
  // shared_expert_gate [1, H], embeddings, the output heads, and any norm stay as they are.
  for (const char* keep : {".gate", ".router", "shared_expert_gate", "embed_tokens", "lm_head", "shared_head.head"})
    if (ends_with(m, keep)) return false;
  const size_t dot = m.rfind('.');
  return m.find("norm", dot == std::string::npos ? 0 : dot) == std::string::npos;
}

ConvertReport convert_checkpoint(const std::string& src_path, const std::string& dst_path, const ConvertOptions& opt) {
  const fs::path src(src_path), dst(dst_path);
  FP8MOE_CHECK(fs::is_directory(src), "convert: source ", src_path, " must be a checkpoint directory (config.json + safetensors)");
  const fs::path config_path = src / "config.json";
  FP8MOE_CHECK(fs::is_regular_file(config_path), "convert: source ", src_path, " has no config.json");
  if (opt.to == ConvertTarget::FP8) {
    FP8MOE_CHECK(opt.scheme == ScaleKind::Channel || opt.scheme == ScaleKind::Block, "convert: FP8 scheme must be channel or block, found ",
                 scale_kind_name(opt.scheme));
    FP8MOE_CHECK(opt.block > 0, "convert: block size must be positive, found ", opt.block);
  }

  const std::string config_text = read_text(config_path);
  json config;
  try {
    config = json::parse(config_text);
  } catch (const json::exception& e) {
    FP8MOE_FAIL(config_path.string(), ": invalid JSON: ", e.what());
  }
  FP8MOE_CHECK(config.is_object(), config_path.string(), ": expected a JSON object");
  const QuantConfig qc = parse_quant_config(config_text, config_path.string());
  if (opt.to == ConvertTarget::BF16)
    FP8MOE_CHECK(qc.method != QuantMethod::None, "convert --to bf16: ", config_path.string(),
                 " has no quantization_config; the checkpoint is not FP8");
  else
    FP8MOE_CHECK(qc.method == QuantMethod::None, "convert --to fp8: ", config_path.string(), " already declares quant_method ",
                 quant_method_name(qc.method), "; convert it to bf16 first");

  const TensorStore store = TensorStore::open(src.string());
  const fs::path root(store.root());
  const bool indexed = fs::exists(root / kIndexName);

  Output out(fs::canonical(src), dst);
  ConvertReport rep;
  json weight_map = json::object();
  std::set<std::string> left_bf16;  // Linear modules kept in BF16 (FP8 direction)
  // Source files by their name relative to the checkpoint: output order and progress are stable.
  std::vector<std::pair<fs::path, const SafetensorsFile*>> files;
  for (const auto& f : store.files()) files.emplace_back(fs::relative(fs::canonical(f->path()), root), f.get());
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  using clock = std::chrono::steady_clock;
  auto last_note = clock::now();

  for (size_t fi = 0; fi < files.size(); ++fi) {
    const fs::path& rel = files[fi].first;
    const SafetensorsFile& f = *files[fi].second;
    SafetensorsWriter w;
    for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
    uint64_t file_bytes = 0;
    int64_t done = 0;
    // Adds one output tensor and notes it in the index.
    auto emit = [&](const std::string& name, const TensorView& t) {
      w.add(name, t);
      weight_map[name] = rel.generic_string();
      file_bytes += static_cast<uint64_t>(t.nbytes());
      ++rep.tensors_out;
    };
    for (const std::string& name : f.names()) {
      const TensorView t = f.view(name);
      ++rep.tensors_in;
      rep.bytes_in += f.entry(name).end - f.entry(name).begin;
      if (opt.to == ConvertTarget::BF16) {
        if (!weight_of_scale(store, name).empty()) continue;  // scales are folded into their weight
        const std::string scale = scale_of(store, name);
        if (is_fp8(t.dtype)) {
          FP8MOE_CHECK(!scale.empty(), "tensor ", name, ": stored as ", dtype_name(t.dtype), " but has no scale (expected ",
                       name, "_scale or ", name, "_scale_inv); refusing to read FP8 codes as values");
          emit(name, dequantize_weight(store, qc, name, scale).view().reshape(t.shape));
          ++rep.converted;
        } else {
          FP8MOE_CHECK(scale.empty(), "tensor ", name, ": has scale ", scale, " but is stored as ", dtype_name(t.dtype),
                       ", not FP8");
          emit(name, t);
        }
      } else {
        FP8MOE_CHECK(!is_fp8(t.dtype), "convert --to fp8: tensor ", name, " is already ", dtype_name(t.dtype),
                     " in a checkpoint without quantization_config");
        if (fp8_convertible_weight(name, t.rank()) && is_float(t.dtype)) {
          const Quantized q = quantize_weight(t, opt);
          emit(name, q.codes);
          emit(name + (opt.scheme == ScaleKind::Channel ? "_scale" : "_scale_inv"), q.scale);
          ++rep.converted;
        } else {
          if (t.rank() == 2 && ends_with(name, ".weight") && !ends_with(module_of(name), "embed_tokens"))
            left_bf16.insert(module_of(name));
          emit(name, t);
        }
      }
      ++done;
      if (opt.progress && clock::now() - last_note > std::chrono::seconds(2)) {
        std::ostringstream line;
        line << rel.string() << ": " << done << '/' << f.names().size() << " tensors";
        opt.progress(line.str());
        last_note = clock::now();
      }
    }
    w.write(out.file(rel).string());
    rep.bytes_out += file_bytes;
    ++rep.files;
    if (opt.progress) {
      std::ostringstream line;
      line << '[' << fi + 1 << '/' << files.size() << "] wrote " << rel.string() << " (" << done << " tensors, "
           << mib(file_bytes) << ')';
      opt.progress(line.str());
      last_note = clock::now();
    }
  }

  if (indexed) {
    json index;
    index["metadata"] = {{"total_size", rep.bytes_out}};
    index["weight_map"] = weight_map;
    write_text(out.file(kIndexName), index.dump(2) + "\n");
  }
  if (opt.to == ConvertTarget::BF16)
    config.erase("quantization_config");
  else
    config["quantization_config"] = quantization_config_json(opt, {left_bf16.begin(), left_bf16.end()});
  write_text(out.file("config.json"), config.dump(2) + "\n");

  // The rest of the checkpoint (tokenizer, generation config, ...) travels unchanged.
  for (const fs::directory_entry& de : fs::directory_iterator(src)) {
    const std::string fname = de.path().filename().string();
    if (!de.is_regular_file() || fname == "config.json" || fname == kIndexName || de.path().extension() == ".safetensors")
      continue;
    fs::copy_file(de.path(), out.file(fname));
  }
  out.commit();
  return rep;
}

}  // namespace fp8moe

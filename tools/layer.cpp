// fp8moe layer CKPT --layer L --inputs IN.safetensors --out OUT.safetensors [--adapter DIR] [--force]
//                   [--backend cpu|cuda|auto]
//
// Runs the routed experts of MoE layer L on the given hidden states and routing, optionally with
// PEFT-layout LoRA adapters (in the inputs file, or a PEFT adapter folder as saved) and an output
// gradient, and writes the results. The router and the shared expert are not applied: the caller
// supplies the routing, as a framework's MoE block does. The output is written atomically and
// never over the inputs or a file of the checkpoint.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <filesystem>

#include "args.hpp"
#include "command.hpp"
#include "files.hpp"
#include "peft_adapter.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/lora.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/safetensors.hpp"

namespace fp8moe::cli {
namespace {

constexpr const char* kUsage =
    "usage: fp8moe layer CKPT --layer L --inputs IN.safetensors --out OUT.safetensors [--adapter DIR] [--force]\n"
    "                    [--backend cpu|cuda|auto]\n"
    "\n"
    "Runs the routed experts of MoE layer L of checkpoint CKPT (router and shared expert not applied).\n"
    "IN.safetensors holds:\n"
    "  hidden_states [T, H] BF16|F32, topk_ids [T, k] I32|I64, topk_weights [T, k] F32|BF16\n"
    "  optional grad_output [T, H] BF16|F32: also run backward\n"
    "  optional LoRA adapters in PEFT's fused-expert layout (expert-major A, expert-fast B) + lora_scaling F32 []:\n"
    "    gate_up_proj.lora_A [E*r, H], gate_up_proj.lora_B [2I, E*r], down_proj.lora_A [E*r, I], down_proj.lora_B [H, E*r]\n"
    "--adapter DIR: the LoRA adapters from a PEFT adapter folder as saved (adapter_config.json with\n"
    "  target_parameters on mlp.experts.gate_up_proj / down_proj, adapter_model.safetensors), scaling\n"
    "  lora_alpha / r; --layer may then be left out when the adapter covers one layer.\n"
    "OUT.safetensors gets (all F32): output [T, H]; with grad_output also grad_hidden_states [T, H],\n"
    "grad_topk_weights [T, k] and <adapter>.grad for each LoRA pair (gate_up_proj.lora_A.grad, ...), in\n"
    "the PEFT layout. OUT is written atomically; an existing OUT is refused unless --force, and OUT may\n"
    "never be IN or lie inside CKPT.\n"
    "--backend: auto (default: CUDA when a GPU is present), cpu, cuda.\n";

const std::set<std::string> kKnown = {"hidden_states",        "topk_ids",          "topk_weights",
                                      "grad_output",          "lora_scaling",      "gate_up_proj.lora_A",
                                      "gate_up_proj.lora_B",  "down_proj.lora_A",  "down_proj.lora_B"};

std::string list(std::initializer_list<DType> ds) {
  std::string s;
  for (DType d : ds) s += (s.empty() ? "" : "|") + std::string(dtype_name(d));
  return s;
}

// The input file, validated tensor by tensor; every message names the file, the tensor, what was
// expected and what was found.
class Inputs {
 public:
  explicit Inputs(const std::string& path) : file_(SafetensorsFile::open(path)) {
    for (const std::string& n : file_->names()) {
      FP8MOE_CHECK(kKnown.count(n), where(n), ": unexpected tensor '", n,
                   "'; expected hidden_states, topk_ids, topk_weights, grad_output, lora_scaling, "
                   "gate_up_proj.lora_A/B, down_proj.lora_A/B");
      tensors_[n] = {file_->view(n), "inputs '" + file_->path() + "'"};
    }
  }
  // Tensor `n` taken from elsewhere (a PEFT adapter): `from` names it in messages.
  void provide(const std::string& n, const TensorView& v, const std::string& from, std::shared_ptr<void> keep_alive) {
    tensors_[n] = {v, from};
    keep_.push_back(std::move(keep_alive));
  }
  bool has(const std::string& n) const { return tensors_.count(n) != 0; }
  // An aligned host copy of tensor `n`, checked for dtype and shape (-1 = any extent).
  Tensor get(const std::string& n, std::initializer_list<DType> dtypes, const std::vector<int64_t>& shape) const {
    FP8MOE_CHECK(has(n), where(n), ": missing tensor '", n, "'");
    const TensorView v = tensors_.at(n).view;
    bool dtype_ok = false;
    for (DType d : dtypes) dtype_ok |= v.dtype == d;
    FP8MOE_CHECK(dtype_ok, where(n), ": tensor '", n, "': expected dtype ", list(dtypes), ", found ", dtype_name(v.dtype));
    bool shape_ok = v.rank() == static_cast<int>(shape.size());
    for (int i = 0; shape_ok && i < v.rank(); ++i) shape_ok = shape[i] < 0 || shape[i] == v.shape[i];
    FP8MOE_CHECK(shape_ok, where(n), ": tensor '", n, "': expected shape ", shape_str(shape), ", found ", v.shape.str());
    Tensor t(v.dtype, v.shape);
    if (t.nbytes()) std::memcpy(t.data(), v.data, static_cast<size_t>(t.nbytes()));  // views may be unaligned
    return t;
  }
  std::string where(const std::string& n) const {
    const auto it = tensors_.find(n);
    return it != tensors_.end() ? it->second.from : "inputs '" + file_->path() + "'";
  }

 private:
  static std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + (s[i] < 0 ? std::string("*") : std::to_string(s[i]));
    return out + "]";
  }
  struct Entry {
    TensorView view;
    std::string from;
  };
  std::shared_ptr<SafetensorsFile> file_;
  std::map<std::string, Entry> tensors_;
  std::vector<std::shared_ptr<void>> keep_;
};

// One LoRA projection read from the inputs: PEFT layout -> per-expert, on the device.
struct DeviceLora {
  PeftExpertLoraLayout layout;
  Tensor A, B;  // device [E, r, in], [E, out, r]
};

std::optional<DeviceLora> read_lora(const Inputs& in, Backend& be, const ExpertWeights& w, LoraProjection proj,
                                    const std::string& prefix) {
  const std::string an = prefix + ".lora_A", bn = prefix + ".lora_B";
  FP8MOE_CHECK(in.has(an) == in.has(bn), in.where(an), ": LoRA tensors '", an, "' and '", bn,
               "' must be given together (found only '", in.has(an) ? an : bn, "')");
  if (!in.has(an)) return std::nullopt;
  const int64_t E = w.experts();
  const int64_t in_f = proj == LoraProjection::GateUp ? w.hidden() : w.intermediate();
  const int64_t out_f = proj == LoraProjection::GateUp ? 2 * w.intermediate() : w.hidden();
  const auto floats = {DType::F32, DType::BF16, DType::F16};
  const Tensor a = in.get(an, floats, {-1, in_f});
  FP8MOE_CHECK(a.size(0) > 0 && a.size(0) % E == 0, in.where(an), ": tensor '", an, "': expected [E*r, ", in_f,
               "] with E = ", E, " experts, found ", a.shape().str(), " (rows not a positive multiple of ", E, ")");
  const int64_t r = a.size(0) / E;
  const Tensor b = in.get(bn, floats, {out_f, E * r});
  FP8MOE_CHECK(a.dtype() == b.dtype(), in.where(an), ": '", an, "' is ", dtype_name(a.dtype()), " but '", bn, "' is ",
               dtype_name(b.dtype()), "; expected the same dtype");
  DeviceLora l;
  l.layout = PeftExpertLoraLayout::of(w, proj, r, prefix);
  const ExpertLoraPair pair = import_peft_expert_lora(l.layout, a, b);
  l.A = be.upload(pair.A);
  l.B = be.upload(pair.B);
  return l;
}

Tensor to_host(Backend& be, const Tensor& t) {
  Tensor h(t.dtype(), t.shape());
  be.copy(h, t);
  return h;
}

std::string layer_list(const std::set<int64_t>& layers) {
  std::string s;
  for (int64_t l : layers) s += (s.empty() ? "" : ", ") + std::to_string(l);
  return s;
}

// Refuses an output path that would destroy what this command reads: the inputs file, or any file
// in the checkpoint's folder (a shard, or a new .safetensors that would join the checkpoint).
void check_out_path(const std::string& out, const std::string& inputs, const Checkpoint& ck) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path o = fs::weakly_canonical(fs::absolute(out), ec);
  FP8MOE_CHECK(!(fs::exists(out, ec) && fs::exists(inputs, ec) && fs::equivalent(out, inputs, ec)), "--out '", out,
               "' is the --inputs file; refusing to overwrite it (choose another --out)");
  const fs::path root = fs::canonical(ck.store().root(), ec);
  const auto [r_end, o_at] = std::mismatch(root.begin(), root.end(), o.begin(), o.end());
  FP8MOE_CHECK(ec || r_end != root.end(), "--out '", out, "' lies in the checkpoint folder '", root.string(),
               "'; refusing to write into the checkpoint (choose a folder outside it)");
}

int run_layer(const std::vector<std::string>& argv) {
  const Args args(argv, {"layer", "inputs", "out", "backend", "adapter"}, {"force"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(1, "CKPT");
  const std::optional<std::string> adapter_dir = args.get("adapter");
  FP8MOE_USAGE_CHECK(args.has("layer") || adapter_dir, "missing required option --layer (the MoE layer to run)");
  const int64_t given_layer = args.get_int("layer", -1);
  FP8MOE_USAGE_CHECK(!args.has("layer") || given_layer >= 0, "--layer: expected a non-negative MoE layer index, found ",
                     given_layer);
  const std::string in_path = args.required("inputs"), out_path = args.required("out");
  const std::string backend = args.get_or("backend", "auto");
  FP8MOE_USAGE_CHECK(backend == "auto" || backend == "cpu" || backend == "cuda", "--backend: expected auto, cpu or cuda, found '",
                     backend, "'");

  expect_not_json(args.positional()[0], "checkpoint");
  expect_not_json(in_path, "--inputs");
  const Checkpoint ck = Checkpoint::open(args.positional()[0]);
  check_out_path(out_path, in_path, ck);
  AtomicOutput out_file(out_path, args.has("force"), "--out");  // checks the folder and an existing file now, not after the work

  std::optional<PeftAdapter> adapter;
  int64_t layer = given_layer;
  if (adapter_dir) {
    adapter = PeftAdapter::open(*adapter_dir);
    const std::set<int64_t> layers = adapter->layers();
    if (layer < 0) {
      FP8MOE_USAGE_CHECK(layers.size() == 1, "--adapter '", *adapter_dir, "' holds expert LoRA for layers ",
                         layer_list(layers), ": choose one with --layer");
      layer = *layers.begin();
    }
    FP8MOE_CHECK(layers.count(layer), "--adapter '", *adapter_dir, "' holds no expert LoRA for layer ", layer,
                 " (it has layers ", layer_list(layers), ")");
  }
  const MoeLayerWeights lw = ck.load_moe_layer(layer);
  auto be = make_backend(backend);
  const ExpertStack experts = lw.routed.upload(*be);
  const ExpertWeights w = experts.view();
  const int64_t E = w.experts(), H = w.hidden();

  Inputs in(in_path);
  if (adapter) {
    for (const char* n : {"lora_scaling", "gate_up_proj.lora_A", "gate_up_proj.lora_B", "down_proj.lora_A", "down_proj.lora_B"})
      FP8MOE_CHECK(!in.has(n), in.where(n), " holds '", n, "' and --adapter is given; give the LoRA adapters one way only");
    const std::string from = "adapter '" + adapter->dir() + "'";
    const auto keep = std::make_shared<PeftAdapter>(*adapter);
    for (const char* param : {"gate_up_proj", "down_proj"})
      if (const auto pair = adapter->find(layer, param)) {
        in.provide(std::string(param) + ".lora_A", adapter->file().view(pair->a), from + " tensor " + pair->a, keep);
        in.provide(std::string(param) + ".lora_B", adapter->file().view(pair->b), from + " tensor " + pair->b, keep);
      }
    auto scaling = std::make_shared<float>(static_cast<float>(adapter->scaling()));
    in.provide("lora_scaling", TensorView(scaling.get(), DType::F32, Shape(std::vector<int64_t>{})),
               from + " (lora_alpha / r)", scaling);
  }
  const Tensor hidden = in.get("hidden_states", {DType::BF16, DType::F32}, {-1, H});
  const int64_t T = hidden.size(0);
  const Tensor ids = in.get("topk_ids", {DType::I32, DType::I64}, {T, -1});
  const int64_t k = ids.size(1);
  FP8MOE_CHECK(k >= 1, "inputs: tensor 'topk_ids': expected [", T, ", k] with k >= 1, found ", ids.shape().str());
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t id = ids.dtype() == DType::I32 ? ids.ptr<int32_t>()[i] : ids.ptr<int64_t>()[i];
    FP8MOE_CHECK(id >= 0 && id < E, "inputs: tensor 'topk_ids': expected values in [0, ", E, "), found ", id, " at [", i / k,
                 ", ", i % k, "]");
  }
  const Tensor weights = in.get("topk_weights", {DType::F32, DType::BF16}, {T, k});

  LoraAdapters lora;
  const auto gu = read_lora(in, *be, w, LoraProjection::GateUp, "gate_up_proj");
  const auto dn = read_lora(in, *be, w, LoraProjection::Down, "down_proj");
  if (adapter)
    for (const auto* l : {gu ? &*gu : nullptr, dn ? &*dn : nullptr})
      FP8MOE_CHECK(!l || l->layout.rank == adapter->rank(), "adapter '", adapter->dir(), "': ", l->layout.name,
                   " has rank ", l ? l->layout.rank : 0, " (lora_A rows / ", E, " experts), but adapter_config.json says r ",
                   adapter->rank());
  FP8MOE_CHECK(in.has("lora_scaling") == (gu || dn), "inputs: 'lora_scaling' ",
               in.has("lora_scaling") ? "given without any LoRA adapter" : "is required with LoRA adapters (F32 scalar)");
  if (gu) lora.gate_up_A = gu->A.view(), lora.gate_up_B = gu->B.view();
  if (dn) lora.down_A = dn->A.view(), lora.down_B = dn->B.view();
  if (gu || dn) {
    const Tensor s = in.get("lora_scaling", {DType::F32}, {});
    lora.scaling = s.ptr<float>()[0];
  }
  const bool backward = in.has("grad_output");
  const Tensor grad_out = backward ? in.get("grad_output", {DType::BF16, DType::F32}, {T, H}) : Tensor();

  const Tensor d_hidden = be->upload(hidden), d_ids = be->upload(ids), d_weights = be->upload(weights);
  const MoeInputs mi{d_hidden.view(), d_ids.view(), d_weights.view()};
  const MoeLayer moe(*be, w, lora);
  Tensor out = be->empty(DType::F32, Shape{T, H});  // [T, H]
  MoeSaved saved;
  moe.forward(mi, out, backward ? &saved : nullptr);

  SafetensorsWriter writer;
  writer.set_metadata("checkpoint", ck.path());
  writer.set_metadata("layer", std::to_string(layer));
  writer.set_metadata("backend", be->name());
  writer.add("output", to_host(*be, out));
  std::string wrote = "output";
  if (backward) {
    const Tensor d_grad_out = be->upload(grad_out);
    Tensor g_hidden = be->empty(DType::F32, Shape{T, H}), g_weights = be->empty(DType::F32, Shape{T, k});
    MoeGrads grads{g_hidden.view(), g_weights.view(), {}};
    Tensor g_gu_a, g_gu_b, g_d_a, g_d_b;  // per-expert [E, r, in] / [E, out, r]
    if (gu) {
      g_gu_a = be->empty(DType::F32, gu->A.shape()), g_gu_b = be->empty(DType::F32, gu->B.shape());
      grads.lora.gate_up_A = g_gu_a.view(), grads.lora.gate_up_B = g_gu_b.view();
    }
    if (dn) {
      g_d_a = be->empty(DType::F32, dn->A.shape()), g_d_b = be->empty(DType::F32, dn->B.shape());
      grads.lora.down_A = g_d_a.view(), grads.lora.down_B = g_d_b.view();
    }
    moe.backward(mi, saved, d_grad_out, grads);
    writer.add("grad_hidden_states", to_host(*be, g_hidden));
    writer.add("grad_topk_weights", to_host(*be, g_weights));
    wrote += ", grad_hidden_states, grad_topk_weights";
    // LoRA gradients go back in the layout the adapters came in.
    auto add_lora = [&](const DeviceLora& l, const Tensor& ga, const Tensor& gb, const std::string& prefix) {
      const PeftLoraPair p = export_peft_expert_lora(l.layout, to_host(*be, ga), to_host(*be, gb));
      writer.add(prefix + ".lora_A.grad", p.lora_A);
      writer.add(prefix + ".lora_B.grad", p.lora_B);
      wrote += ", " + prefix + ".lora_A.grad, " + prefix + ".lora_B.grad";
    };
    if (gu) add_lora(*gu, g_gu_a, g_gu_b, "gate_up_proj");
    if (dn) add_lora(*dn, g_d_a, g_d_b, "down_proj");
  }
  out_file.write([&](const std::string& tmp) { writer.write(tmp); });
  const std::string format =
      w.gate_up.quantized() ? "fp8 " + w.gate_up.spec.str() : std::string(dtype_name(w.gate_up.data.dtype));
  std::printf("layer %lld of %s (%s, %lld experts, H %lld, I %lld) on %s: T %lld, k %lld%s -> %s: %s\n",
              static_cast<long long>(layer), ck.path().c_str(), format.c_str(),
              static_cast<long long>(E), static_cast<long long>(H), static_cast<long long>(w.intermediate()), be->name(),
              static_cast<long long>(T), static_cast<long long>(k), (gu || dn) ? ", LoRA" : "", out_path.c_str(),
              wrote.c_str());
  return 0;
}

}  // namespace

FP8MOE_COMMAND(layer, "run one MoE expert layer of a checkpoint on given inputs (forward, backward)", run_layer);

}  // namespace fp8moe::cli

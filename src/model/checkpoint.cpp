// Checkpoint: names -> validated plans of each MoE layer (no copies) -> owning stacks.
//
// Planning resolves every tensor of a layer's experts, router and shared experts, checks dtype,
// shape and scale of each one (the per-tensor FP8 rule of formats.md section 8), and accounts for
// every tensor under the layer's MoE prefixes, so an orphan scale or a stray expert cannot hide.
// inspect() runs the planner on every layer and collects its errors; load_moe_layer() runs it and
// then copies (model/experts.cpp).
#include "fp8moe/checkpoint.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <set>
#include <tuple>
#include <sstream>

#include <nlohmann/json.hpp>

#include "formats/checked.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/error.hpp"
#include "model/experts.hpp"
#include "model/limits.hpp"

namespace fp8moe {

namespace {

namespace fs = std::filesystem;
using model::StoredMatrix;

bool starts_with(const std::string& s, std::string_view p) { return s.size() >= p.size() && s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, std::string_view p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Parses the non-negative integer at s[pos..] up to the next '.', or nullopt (a sign, other
// characters, or a value beyond int64).
std::optional<int64_t> index_at(const std::string& s, size_t pos) {
  const size_t dot = s.find('.', pos);
  if (dot == std::string::npos || dot == pos || s[pos] < '0' || s[pos] > '9') return std::nullopt;
  int64_t v = 0;
  const auto [p, ec] = std::from_chars(s.data() + pos, s.data() + dot, v);
  if (ec != std::errc() || p != s.data() + dot) return std::nullopt;
  return v;
}

constexpr std::string_view kLayers = "model.layers.";

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FP8MOE_CHECK(f.good(), path, ": cannot open");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool is_plain_float(DType t) { return t == DType::BF16 || t == DType::F16 || t == DType::F32; }

// ---------------------------------------------------------------------------------------------
// Naming of one MoE block.
struct Naming {
  std::string prefix;  // model.layers.L.mlp (Mixtral: model.layers.L.block_sparse_moe)
  std::string gate = "gate_proj", up = "up_proj", down = "down_proj";
  bool gpt_oss = false;

  std::string expert(int64_t e, const std::string& proj) const { return prefix + ".experts." + std::to_string(e) + "." + proj; }
  // Sub-prefixes whose every tensor belongs to the MoE block and must be used by the loader.
  std::vector<std::string> owned() const {
    return {prefix + ".experts.", prefix + ".shared_experts.", prefix + ".shared_expert.",
            prefix + ".shared_expert_gate.", prefix + ".gate.", prefix + ".router."};
  }
};

Naming naming_for(const std::string& model_type, int64_t layer) {
  Naming n;
  const std::string base = std::string(kLayers) + std::to_string(layer);
  if (model_type == "mixtral") {
    n.prefix = base + ".block_sparse_moe";
    n.gate = "w1", n.up = "w3", n.down = "w2";
  } else {
    n.prefix = base + ".mlp";
  }
  n.gpt_oss = model_type == "gpt_oss";
  return n;
}

// The scale of weight `w`: w + "_scale_inv" or w + "_scale" (both multipliers), or "" if none.
std::string find_scale(const TensorStore& st, const std::string& w) {
  const std::string inv = w + "_scale_inv", plain = w + "_scale";
  const bool has_inv = st.contains(inv), has_plain = st.contains(plain);
  FP8MOE_CHECK(!(has_inv && has_plain), "tensor ", w, " has two scales, ", inv, " and ", plain,
               "; expected exactly one");
  return has_inv ? inv : has_plain ? plain : std::string();
}

Shape drop_first(const Shape& s) {
  Shape r;
  r.rank = s.rank - 1;
  for (int i = 1; i < s.rank; ++i) r.dims[i - 1] = s.dims[i];
  return r;
}

// How a scale tensor's shape relates to the [N, K] matrix of one expert.
enum class Grid {
  PerMatrix,          // scale of one [N, K] weight
  Stacked,            // [E, ...] over an [E, N, K] stack
  StackedTransposed,  // [E, ...] laid on the stored [E, K, N] orientation (GPT-OSS)
};
struct ScaleLookup {
  Grid grid = Grid::PerMatrix;
  int64_t experts = 1;
  bool halves = false;  // N = 2I stacked gate/up rows (transformers-fused gate_up_proj)
};

// The per-matrix scale spec for a scale grid `g` (already in canonical [N, K] orientation).
ScaleSpec match_scale(const std::string& scale, const std::string& found, const Shape& g, const std::string& weight,
                      int64_t N, int64_t K, const WeightQuantScheme& declared, const std::string& config) {
  const bool scalar = g.numel() == 1 && g.rank <= 2;
  const std::string mat = "[" + std::to_string(N) + ", " + std::to_string(K) + "]";
  if (declared.kind != ScaleKind::None) {
    const ScaleSpec s = declared.spec(N, K);
    if (s.kind == ScaleKind::Tensor) {
      FP8MOE_CHECK(scalar, "scale ", scale, " of ", weight, " ", mat, ": expected one value ([] or [1]) for ",
                   s.str(), " (declared by ", config, "), found ", found);
      return s;
    }
    const Shape want{s.scale_rows(), s.grid_k()};
    // A matrix within one block has one scale; transformers' fine-grained FP8 writer stores it
    // rank-0 ([]), which says the same thing as [1, 1].
    FP8MOE_CHECK(g == want || (scalar && want.numel() == 1), "scale ", scale, " of ", weight, " ", mat,
                 ": expected shape ", want.str(), " for ", s.str(), " (declared by ", config, "), found ", found);
    return s;
  }
  // No declared scheme (no quantization_config): the shapes that are unambiguous.
  if (scalar) return ScaleSpec::tensor(N, K);
  if (g == Shape{N, 1}) return ScaleSpec::channel(N, K);
  const ScaleSpec b = ScaleSpec::block(N, K, 128, 128);
  if (g == Shape{b.scale_rows(), b.grid_k()}) return b;
  FP8MOE_FAIL("scale ", scale, " of ", weight, " ", mat, ": cannot infer the scale scheme from shape ", found,
              " (expected [] or [1] per tensor, [", N, ", 1] per channel, or ", Shape{b.scale_rows(), b.grid_k()}.str(),
              " for 128x128 blocks; no quantization_config declares another)");
}

// Applies the per-tensor FP8 rule to weight `weight` (module `module`, scale `scale` or "") and
// returns the per-matrix scale spec (kind None: plain weight).
ScaleSpec classify(const TensorStore& st, const QuantConfig& q, const std::string& module, const std::string& weight,
                   const std::string& scale, int64_t N, int64_t K, const ScaleLookup& how) {
  // N and K may come straight from a file's shape (load_linear): bounded before any scale-grid
  // arithmetic (ceil-divisions) runs on them.
  FP8MOE_CHECK(N >= 0 && K >= 0 && N <= model::kMaxMatrixDim && K <= model::kMaxMatrixDim, "tensor ", weight,
               ": matrix [", N, ", ", K, "] exceeds the limit of ", model::kMaxMatrixDim, " rows or columns");
  const DType wdt = st.entry(weight).dtype;
  if (!is_fp8(wdt)) {
    FP8MOE_CHECK(is_plain_float(wdt), "tensor ", weight, ": expected an FP8 (F8_E4M3/F8_E5M2) or BF16/F16/F32 weight, found ",
                 dtype_name(wdt));
    FP8MOE_CHECK(scale.empty(), "tensor ", weight, " is ", dtype_name(wdt), " but has a scale ", scale,
                 ": only FP8 weights carry scales (expected an F8_E4M3/F8_E5M2 weight, or no scale)");
    return ScaleSpec::none(N, K);
  }
  FP8MOE_CHECK(!scale.empty(), "tensor ", weight, " is ", dtype_name(wdt), " but has no scale (expected ", weight,
               "_scale_inv or ", weight, "_scale): FP8 codes without their scale are not values, refusing to use them");
  FP8MOE_CHECK(!q.excluded(module), "tensor ", weight, " is FP8 with scale ", scale, ", but ", q.source,
               " excludes module ", module, " from quantization");
  const SafetensorsEntry& se = st.entry(scale);
  FP8MOE_CHECK(is_plain_float(se.dtype), "scale ", scale, " of ", weight, ": expected dtype F32, BF16 or F16, found ",
               dtype_name(se.dtype));
  const std::string found = se.shape.str();
  Shape g = se.shape;
  if (how.grid != Grid::PerMatrix) {
    FP8MOE_CHECK(g.rank >= 1 && g[0] == how.experts, "scale ", scale, " of ", weight, ": expected a leading expert dimension of ",
                 how.experts, ", found ", found);
    g = drop_first(g);
    if (how.grid == Grid::StackedTransposed && g.rank == 2) g = Shape{g[1], g[0]};
  }
  const WeightQuantScheme declared = q.scheme_for(module);
  const std::string config = q.source.empty() ? std::string("the quantization config") : q.source;
  if (how.halves) {
    // One scale per sub-projection ([E, 2], vLLM's per-tensor w13).
    if (g == Shape{2} && (declared.kind == ScaleKind::None || declared.kind == ScaleKind::Tensor))
      return ScaleSpec::tensor(N, K, 2);
    // Stacked block scales (trap 13): a block must not straddle gate and up rows.
    const bool blocky = g.rank == 2 && g != Shape{N, 1} &&
                        (declared.kind == ScaleKind::Block || declared.kind == ScaleKind::None);
    const int64_t bn = declared.kind == ScaleKind::Block ? declared.block_n : 128;
    FP8MOE_CHECK(!blocky || (N / 2) % bn == 0, "scale ", scale, " of ", weight, ": stacked gate_up block scales ",
                 found, " are only valid when I (", N / 2, ") is a multiple of the block height ", bn,
                 "; otherwise a block straddles gate and up rows. Store the experts one by one instead");
  }
  ScaleSpec s = match_scale(scale, found, g, weight, N, K, declared, config);
  // Same layout as one grid when I % block_n == 0; two segments state that gate and up are apart.
  // (One scalar for the whole stacked gate_up stays one segment: it is what the producer used.)
  if (how.halves && s.kind == ScaleKind::Block) s.segments = 2;
  return s;
}

int64_t stored_bytes(const TensorStore& st, const std::string& name) {
  if (name.empty()) return 0;
  const SafetensorsEntry& e = st.entry(name);
  return checked::to_i64(e.end - e.begin, "tensor ", name, ": byte size");
}

void expect_shape(const TensorStore& st, const std::string& name, const Shape& want, const std::string& why) {
  FP8MOE_CHECK(st.contains(name), "missing tensor ", name, ": expected ", want.str(), why);
  const Shape& got = st.entry(name).shape;
  FP8MOE_CHECK(got == want, "tensor ", name, ": expected shape ", want.str(), why, ", found ", got.str());
}

// ---------------------------------------------------------------------------------------------
// Plans.
struct Dims {
  int64_t E = 0, I = 0, H = 0;
  int64_t Is = 0;  // shared expert intermediate; 0 = infer from the tensors
  std::string why;  // where the dims come from, for messages
};

struct ProjPlan {
  ProjectionReport report;
  std::vector<std::vector<StoredMatrix>> matrices;  // per-expert layout: [E][parts]
  StoredMatrix stacked;                             // fused / GPT-OSS: whole [E, ...] tensor and scale
  bool transposed = false;
};

struct LayerPlan {
  int64_t layer = 0;
  ExpertLayout layout = ExpertLayout::PerExpert;
  int64_t E = 0, H = 0;
  ProjPlan gate_up, down;
  std::optional<ProjPlan> shared_gate_up, shared_down;
  std::string gate_up_bias, down_bias;  // "" when absent
  std::string router_weight, router_bias, correction_bias, shared_gate;
};

class Planner {
 public:
  Planner(const TensorStore& st, const QuantConfig& q, const ModelConfig* cfg, const Naming& n, std::set<std::string>& used)
      : st_(st), q_(q), cfg_(cfg), n_(n), used_(used) {}

  StoredMatrix matrix(const std::string& module, int64_t N, int64_t K, const std::string& why) {
    const std::string w = module + ".weight";
    expect_shape(st_, w, Shape{N, K}, why);
    StoredMatrix m;
    m.name = w;
    m.weight = st_.view(w);
    m.scale_name = find_scale(st_, w);
    m.spec = classify(st_, q_, module, w, m.scale_name, N, K, {});
    if (!m.scale_name.empty()) m.scale = st_.view(m.scale_name);
    use(w);
    use(m.scale_name);
    return m;
  }

  // Experts e = 0..E-1 of one MLP, stored one by one: {gate, up} and {down}.
  void per_expert(const std::vector<std::string>& modules, int64_t E, int64_t I, int64_t H,
                  const std::string& why, ProjPlan& gu, ProjPlan& dn, const std::string& label) {
    gu.matrices.resize(static_cast<size_t>(E));
    dn.matrices.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      const std::string& base = modules[static_cast<size_t>(e)];
      StoredMatrix g = matrix(base + n_.gate, I, H, why);
      StoredMatrix u = matrix(base + n_.up, I, H, why);
      FP8MOE_CHECK(g.weight.dtype == u.weight.dtype && g.spec.kind == u.spec.kind && g.spec.block_n == u.spec.block_n &&
                       g.spec.block_k == u.spec.block_k,
                   "tensor ", u.name, ": expected the dtype and scale scheme of ", g.name, " (", dtype_name(g.weight.dtype),
                   ", ", g.spec.str(), ") since gate and up stack into one gate_up, found ", dtype_name(u.weight.dtype),
                   ", ", u.spec.str());
      StoredMatrix d = matrix(base + n_.down, H, I, why);
      if (e > 0) {
        same_as(gu.matrices[0][0], g, label + "gate_up");
        same_as(dn.matrices[0][0], d, label + "down");
      }
      dn.matrices[static_cast<size_t>(e)] = {std::move(d)};
      gu.matrices[static_cast<size_t>(e)] = {std::move(g), std::move(u)};
    }
    fill_report(gu, label + "gate_up", E, checked::mul<int64_t>(2, I, label, "gate_up width 2I"), H, /*halves=*/true);
    fill_report(dn, label + "down", E, H, I, false);
  }

  LayerPlan plan(int64_t layer, Dims d) {
    LayerPlan p;
    p.layer = layer;
    const std::string fused_gu = n_.prefix + ".experts.gate_up_proj";
    const std::string fused_dn = n_.prefix + ".experts.down_proj";
    const bool fused = st_.contains(fused_gu) || st_.contains(fused_dn);
    for (const char* mx : {"_blocks", "_scales"})
      FP8MOE_CHECK(!st_.contains(fused_gu + mx), "tensor ", fused_gu + mx,
                   ": MXFP4 experts are not supported; convert the checkpoint to FP8 or BF16");
    p.layout = n_.gpt_oss ? ExpertLayout::GptOss : fused ? ExpertLayout::Fused : ExpertLayout::PerExpert;
    if (n_.gpt_oss)
      FP8MOE_CHECK(fused, "layer ", layer, ": missing tensor ", fused_gu, " (GPT-OSS stores its experts fused)");

    if (!cfg_) infer_dims(p.layout, d);
    p.E = d.E;
    p.H = d.H;
    const std::string why = d.why;
    const int64_t two_i = checked::mul<int64_t>(2, d.I, "layer ", layer, ": the gate_up width 2I");

    if (p.layout == ExpertLayout::PerExpert) {
      std::vector<std::string> modules;
      for (int64_t e = 0; e < d.E; ++e) modules.push_back(n_.prefix + ".experts." + std::to_string(e) + ".");
      per_expert(modules, d.E, d.I, d.H, why, p.gate_up, p.down, "");
    } else {
      const bool gpt = p.layout == ExpertLayout::GptOss;
      // GPT-OSS stores x @ W: gate_up [E, H, 2I], down [E, I, H]. transformers: [E, 2I, H], [E, H, I].
      stacked(p.gate_up, fused_gu, n_.prefix + ".experts.gate_up_proj", d.E, two_i, d.H, gpt, !gpt, why);
      stacked(p.down, fused_dn, n_.prefix + ".experts.down_proj", d.E, d.H, d.I, gpt, false, why);
      p.gate_up_bias = optional_tensor(fused_gu + "_bias", Shape{d.E, two_i}, why);
      p.down_bias = optional_tensor(fused_dn + "_bias", Shape{d.E, d.H}, why);
    }
    router(p, d);
    shared(p, d);
    return p;
  }

 private:
  void use(const std::string& name) {
    if (!name.empty()) used_.insert(name);
  }

  // All experts of a projection share dtype and scheme (one stacked tensor holds them).
  static void same_as(const StoredMatrix& ref, const StoredMatrix& m, const std::string& what) {
    FP8MOE_CHECK(m.weight.dtype == ref.weight.dtype && m.spec.kind == ref.spec.kind &&
                     m.spec.block_n == ref.spec.block_n && m.spec.block_k == ref.spec.block_k,
                 "tensor ", m.name, ": expected ", dtype_name(ref.weight.dtype), ", ", ref.spec.str(), " like ", ref.name,
                 " (all experts of ", what, " must share dtype and scale scheme), found ", dtype_name(m.weight.dtype),
                 ", ", m.spec.str());
  }

  std::string optional_tensor(const std::string& name, const Shape& want, const std::string& why) {
    if (!st_.contains(name)) return {};
    expect_shape(st_, name, want, why);
    FP8MOE_CHECK(is_plain_float(st_.entry(name).dtype), "tensor ", name, ": expected dtype F32, BF16 or F16, found ",
                 dtype_name(st_.entry(name).dtype));
    FP8MOE_CHECK(find_scale(st_, name).empty(), "tensor ", name, " must not be quantized, found a scale ",
                 find_scale(st_, name));
    use(name);
    return name;
  }

  void stacked(ProjPlan& pp, const std::string& w, const std::string& module, int64_t E, int64_t N, int64_t K,
               bool transposed, bool halves, const std::string& why) {
    const Shape want = transposed ? Shape{E, K, N} : Shape{E, N, K};
    expect_shape(st_, w, want, why + (transposed ? ", stored transposed (x @ W)" : ""));
    StoredMatrix& m = pp.stacked;
    m.name = w;
    m.weight = st_.view(w);
    m.scale_name = find_scale(st_, w);
    m.spec = classify(st_, q_, module, w, m.scale_name, N, K,
                      {transposed ? Grid::StackedTransposed : Grid::Stacked, E, halves});
    if (!m.scale_name.empty()) m.scale = st_.view(m.scale_name);
    pp.transposed = transposed;
    use(w);
    use(m.scale_name);
    pp.report.name = module.substr(module.rfind('.') + 1) == "down_proj" ? "down" : "gate_up";
    pp.report.shape = Shape{E, N, K};
    pp.report.dtype = m.weight.dtype;
    pp.report.spec = m.spec;
    pp.report.bytes = checked::add(stored_bytes(st_, w), stored_bytes(st_, m.scale_name), "bytes of ", w, " and its scale");
  }

  void fill_report(ProjPlan& pp, const std::string& name, int64_t E, int64_t N, int64_t K, bool halves) {
    const StoredMatrix& m0 = pp.matrices[0][0];
    pp.report.name = name;
    pp.report.shape = Shape{E, N, K};
    pp.report.dtype = m0.weight.dtype;
    ScaleSpec s = m0.spec;
    s.rows = N;
    if (halves && (s.kind == ScaleKind::Tensor || s.kind == ScaleKind::Block)) s.segments = 2;
    if (s.kind == ScaleKind::Tensor) s.block_n = s.seg_rows();
    pp.report.spec = s;
    pp.report.bytes = 0;
    for (const auto& parts : pp.matrices)
      for (const StoredMatrix& m : parts)
        for (const std::string& t : {m.name, m.scale_name})
          pp.report.bytes = checked::add(pp.report.bytes, stored_bytes(st_, t), "bytes of ", name);
  }

  void router(LayerPlan& p, const Dims& d) {
    const std::string why = d.why;
    const std::string base = n_.prefix + (n_.gpt_oss ? ".router" : ".gate");
    p.router_weight = base + ".weight";
    expect_shape(st_, p.router_weight, Shape{d.E, d.H}, why);
    FP8MOE_CHECK(is_plain_float(st_.entry(p.router_weight).dtype) && find_scale(st_, p.router_weight).empty(),
                 "router ", p.router_weight, ": expected an unquantized BF16/F16/F32 weight, found ",
                 dtype_name(st_.entry(p.router_weight).dtype),
                 find_scale(st_, p.router_weight).empty() ? "" : " with a scale");
    use(p.router_weight);
    if (n_.gpt_oss) {
      p.router_bias = base + ".bias";
      expect_shape(st_, p.router_bias, Shape{d.E}, " (GPT-OSS routers carry a bias)");
      use(p.router_bias);
    }
    const std::string corr = base + ".e_score_correction_bias";
    if (cfg_ && cfg_->router == RouterKind::SigmoidBiasTopK)
      expect_shape(st_, corr, Shape{d.E}, " (the sigmoid router of " + cfg_->model_type + " selects with it)");
    p.correction_bias = optional_tensor(corr, Shape{d.E}, why);
  }

  void shared(LayerPlan& p, const Dims& d) {
    std::string base;
    for (const char* s : {".shared_experts.", ".shared_expert."})
      if (st_.contains(n_.prefix + s + n_.gate + ".weight")) base = n_.prefix + s;
    if (cfg_ && cfg_->n_shared_experts > 0)
      FP8MOE_CHECK(!base.empty(), "missing tensor ", n_.prefix, ".shared_experts.", n_.gate, ".weight: ", cfg_->source,
                   " declares ", cfg_->n_shared_experts, " shared expert(s)");
    if (base.empty() || (cfg_ && cfg_->n_shared_experts == 0)) return;  // unused tensors are reported
    int64_t Is = d.Is;
    if (Is == 0) {
      const Shape& s = st_.entry(base + n_.gate + ".weight").shape;
      Is = s.rank == 2 ? s[0] : 0;
      FP8MOE_CHECK(Is >= 1 && Is <= model::kMaxIntermediate, "tensor ", base, n_.gate, ".weight: expected [Is, H] with Is in [1, ",
                   model::kMaxIntermediate, "], found ", s.str());
    }
    const std::string why = cfg_ ? " (shared intermediate " + std::to_string(Is) + " from " + cfg_->source + ")" : "";
    p.shared_gate_up.emplace();
    p.shared_down.emplace();
    per_expert({base}, 1, Is, d.H, why, *p.shared_gate_up, *p.shared_down, "shared ");
    p.shared_gate = optional_tensor(n_.prefix + ".shared_expert_gate.weight", Shape{1, d.H}, why);
  }

  // Without config.json: E from the expert indices present, I and H from expert 0 / the stack,
  // each bounded as config.json's values are (model/limits.hpp) before a loop runs over it.
  void infer_dims(ExpertLayout layout, Dims& d) {
    d.why = " (inferred from the tensors; no config.json)";
    std::string from;  // the tensor the dimensions come from, for messages
    if (layout == ExpertLayout::PerExpert) {
      const std::string pre = n_.prefix + ".experts.";
      std::set<int64_t> present;
      for (const std::string& name : st_.names())
        if (starts_with(name, pre))
          if (auto e = index_at(name, pre.size())) present.insert(*e);
      FP8MOE_CHECK(!present.empty(), "no experts under ", pre);
      // Indices must be 0..E-1: the first one missing is reported as the missing expert, so the
      // planner never loops up to an index that only a stray tensor name claims.
      int64_t e = 0;
      for (int64_t i : present)
        if (i == e) ++e;
      if (e <= *present.rbegin())
        FP8MOE_FAIL("missing tensor ", n_.expert(e, n_.gate), ".weight: experts under ", pre, " go up to index ",
                    *present.rbegin(), ", but expert ", e, " is absent", d.why);
      d.E = e;
      from = n_.expert(0, n_.gate) + ".weight";
      FP8MOE_CHECK(st_.contains(from), "missing tensor ", from, " (expert 0)");
      const Shape& s = st_.entry(from).shape;
      FP8MOE_CHECK(s.rank == 2, "tensor ", from, ": expected [I, H], found ", s.str());
      d.I = s[0];
      d.H = s[1];
    } else {
      from = n_.prefix + ".experts.gate_up_proj";
      FP8MOE_CHECK(st_.contains(from), "missing tensor ", from);
      const Shape& s = st_.entry(from).shape;
      FP8MOE_CHECK(s.rank == 3, "tensor ", from, ": expected rank 3, found ", s.str());
      const bool gpt = layout == ExpertLayout::GptOss;
      d.E = s[0];
      d.H = gpt ? s[1] : s[2];
      const int64_t two_i = gpt ? s[2] : s[1];
      FP8MOE_CHECK(two_i % 2 == 0, "tensor ", from, ": expected an even gate_up width 2I, found ", s.str());
      d.I = two_i / 2;
    }
    for (const auto& [what, v, hi] : {std::tuple{"experts E", d.E, model::kMaxExperts},
                                      std::tuple{"intermediate size I", d.I, model::kMaxIntermediate},
                                      std::tuple{"hidden size H", d.H, model::kMaxHidden}})
      FP8MOE_CHECK(v >= 1 && v <= hi, "tensor ", from, ": inferred ", what, " = ", v, ", expected [1, ", hi,
                   "] (the limits config.json values are held to)");
  }

  const TensorStore& st_;
  const QuantConfig& q_;
  const ModelConfig* cfg_;
  const Naming& n_;
  std::set<std::string>& used_;
};

// Every tensor under the MoE prefixes of the layer must have been used by the plan.
void check_all_used(const TensorStore& st, const std::vector<std::string>& layer_names, const Naming& n,
                    const std::set<std::string>& used, int64_t E, const ModelConfig* cfg) {
  const std::vector<std::string> owned = n.owned();
  const std::string ex = n.prefix + ".experts.";
  for (const std::string& name : layer_names) {
    if (used.count(name)) continue;
    if (std::none_of(owned.begin(), owned.end(), [&](const std::string& p) { return starts_with(name, p); })) continue;
    if (starts_with(name, ex))
      if (auto e = index_at(name, ex.size()); e && *e >= E)
        FP8MOE_FAIL("tensor ", name, ": expert index ", *e, " is out of range: ",
                    cfg ? cfg->source : std::string("the checkpoint"), " says ", E, " experts");
    if (ends_with(name, "input_scale"))
      FP8MOE_FAIL("tensor ", name, ": static activation scales are not supported (fp8moe quantizes activations dynamically)");
    for (std::string_view suf : {std::string_view("_scale_inv"), std::string_view("_scale")}) {
      if (!ends_with(name, suf)) continue;
      const std::string w = name.substr(0, name.size() - suf.size());
      FP8MOE_FAIL("orphan scale ", name, ": ",
                  st.contains(w) ? "its weight " + w + " is not one the layout uses"
                                 : "its weight " + w + " does not exist",
                  "; a scale without its weight is an error");
    }
    FP8MOE_FAIL("tensor ", name, ": unexpected under the MoE block ", n.prefix,
                " (not a weight, scale, bias or router tensor of a supported layout)");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
namespace {

// Without config.json the naming is guessed from the tensors themselves.
std::string guess_model_type(const std::vector<std::string>& layer_names, int64_t layer) {
  const std::string base = std::string(kLayers) + std::to_string(layer);
  for (const std::string& n : layer_names) {
    if (starts_with(n, base + ".block_sparse_moe.")) return "mixtral";
    if (starts_with(n, base + ".mlp.router.")) return "gpt_oss";
  }
  return {};
}

Naming naming(const ModelConfig* cfg, const std::vector<std::string>& layer_names, int64_t layer) {
  return naming_for(cfg ? cfg->model_type : guess_model_type(layer_names, layer), layer);
}

LayerPlan plan_layer(const TensorStore& st, const QuantConfig& q, const ModelConfig* cfg,
                     const std::vector<std::string>& layer_names, int64_t layer) {
  const Naming n = naming(cfg, layer_names, layer);
  Dims d;
  if (cfg) {
    d.E = cfg->num_experts;
    d.I = cfg->moe_intermediate_size;
    d.H = cfg->hidden_size;
    d.Is = cfg->shared_intermediate_size;
    d.why = " (E " + std::to_string(d.E) + ", I " + std::to_string(d.I) + ", H " + std::to_string(d.H) + " from " +
            cfg->source + ")";
  }
  std::set<std::string> used;
  Planner planner(st, q, cfg, n, used);
  LayerPlan p = planner.plan(layer, d);
  check_all_used(st, layer_names, n, used, p.E, cfg);
  return p;
}

QuantWeights build(const ProjPlan& pp, const std::string& what) {
  if (!pp.matrices.empty()) return model::stack_experts(pp.matrices, what);
  const StoredMatrix& m = pp.stacked;
  return pp.transposed ? model::transpose_stacked(m.name, m.weight, m.scale_name, m.scale, m.spec)
                       : model::copy_stacked(m.name, m.weight, m.scale_name, m.scale, m.spec);
}

Tensor copy_as_stored(const TensorStore& st, const std::string& name) {
  const TensorView v = st.view(name);
  Tensor t(v.dtype, v.shape);
  std::memcpy(t.data(), v.data, static_cast<size_t>(v.nbytes()));
  return t;
}

std::string human_bytes(int64_t b) {
  std::ostringstream os;
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 4) v /= 1024.0, ++u;
  os << std::fixed << std::setprecision(u == 0 ? 0 : 1) << v << ' ' << units[u];
  return os.str();
}

// The model_type of a config.json that describes a dense model: a type that is no MoE family
// fp8moe reads and no routed-expert count. nullopt otherwise (parse_model_config then reads it,
// or says what is wrong with it).
std::optional<std::string> dense_model_type(const std::string& config_text) {
  const nlohmann::json j = nlohmann::json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return std::nullopt;
  const auto mt = j.find("model_type");
  if (mt == j.end() || !mt->is_string() || is_supported_moe_model_type(mt->get<std::string>())) return std::nullopt;
  for (const char* k : {"num_experts", "n_routed_experts", "num_local_experts"}) {
    const auto e = j.find(k);
    if (e != j.end() && !e->is_null() && !(e->is_number_integer() && e->get<int64_t>() == 0)) return std::nullopt;
  }
  return mt->get<std::string>();
}

// config.json against the tensors of a whole checkpoint (a directory), before any loop runs over
// its counts. The config may not claim more layers than the files hold, nor more routed experts
// than the first MoE layer holding experts has (fewer is reported by the layer planner, naming the
// stray expert tensor). A single .safetensors file is skipped: it may be one shard of many.
void check_config_against_tensors(const ModelConfig& cfg, const TensorStore& st,
                                  const std::map<int64_t, std::vector<std::string>>& layer_names) {
  const int64_t held = layer_names.empty() ? 0 : layer_names.rbegin()->first + 1;  // indices are >= 0
  FP8MOE_CHECK(cfg.num_hidden_layers <= held, cfg.source, ": field num_hidden_layers is ", cfg.num_hidden_layers,
               ", but the checkpoint's tensors ",
               held == 0 ? std::string("hold no model.layers.* tensors")
                         : "hold layers up to model.layers." + std::to_string(held - 1) + ".*",
               " (expected num_hidden_layers <= ", held, ")");
  for (int64_t l : cfg.moe_layers()) {
    const auto it = layer_names.find(l);
    if (it == layer_names.end()) continue;
    const Naming n = naming_for(cfg.model_type, l);
    const std::string ex = n.prefix + ".experts.", fused = ex + "gate_up_proj";
    int64_t experts = 0;
    std::string where;
    if (st.contains(fused)) {
      const Shape& s = st.entry(fused).shape;
      experts = s.rank >= 1 ? s[0] : 0;
      where = "tensor " + fused + " " + s.str();
    } else {
      std::set<int64_t> present;
      for (const std::string& name : it->second)
        if (starts_with(name, ex))
          if (auto e = index_at(name, ex.size())) present.insert(*e);
      if (present.empty()) continue;  // no expert tensors: the planner reports what is missing
      experts = static_cast<int64_t>(present.size());
      where = "tensors " + ex + "<e>.* (" + std::to_string(present.size()) + " distinct expert indices)";
    }
    FP8MOE_CHECK(cfg.num_experts <= experts, cfg.source, ": the routed expert count (num_experts | n_routed_experts | "
                 "num_local_experts) is ", cfg.num_experts, ", but the first MoE layer ", l, " holds ", experts,
                 " experts: ", where);
    return;
  }
}

// Scale tensors the per-tensor rule pairs with a weight: <w>.weight_scale(_inv), <x>_proj_scale(_inv).
std::optional<std::string> scale_base(const std::string& name) {
  for (std::string_view suf : {std::string_view("_scale_inv"), std::string_view("_scale")}) {
    if (!ends_with(name, suf)) continue;
    std::string base = name.substr(0, name.size() - suf.size());
    if (ends_with(base, ".weight") || ends_with(base, "_proj")) return base;
  }
  return std::nullopt;
}

}  // namespace

namespace model {

ScaleSpec fp8_weight_spec(const TensorStore& st, const QuantConfig& q, const std::string& weight,
                          const std::string& model_type) {
  const Shape& s = st.entry(weight).shape;
  FP8MOE_CHECK(s.rank == 2 || s.rank == 3, "tensor ", weight, " is ", dtype_name(st.entry(weight).dtype),
               ": expected an FP8 weight [out, in] or a stack [E, out, in], found shape ", s.str());
  const bool stack = s.rank == 3;
  const std::string module = !stack && ends_with(weight, ".weight") ? weight.substr(0, weight.size() - 7) : weight;
  ScaleLookup how;
  if (stack) how = {Grid::Stacked, s[0], ends_with(weight, ".experts.gate_up_proj") && model_type != "gpt_oss"};
  return classify(st, q, module, weight, find_scale(st, weight), s[s.rank - 2], s[s.rank - 1], how);
}

}  // namespace model

const char* expert_layout_name(ExpertLayout l) {
  switch (l) {
    case ExpertLayout::PerExpert: return "per-expert";
    case ExpertLayout::Fused: return "fused";
    case ExpertLayout::GptOss: return "gpt-oss";
  }
  FP8MOE_FAIL("unknown expert layout code ", static_cast<int>(l));
}

const char* layer_kind_name(LayerKind k) {
  switch (k) {
    case LayerKind::Dense: return "dense";
    case LayerKind::Moe: return "moe";
    case LayerKind::Skipped: return "skipped";
  }
  FP8MOE_FAIL("unknown layer kind code ", static_cast<int>(k));
}

ExpertWeights ExpertStack::view() const {
  ExpertWeights w;
  w.gate_up = gate_up.view();
  w.down = down.view();
  if (gate_up_bias.defined()) w.gate_up_bias = gate_up_bias.view();
  if (down_bias.defined()) w.down_bias = down_bias.view();
  w.act = act;
  return w;
}

ExpertStack ExpertStack::upload(Backend& backend) const {
  auto up = [&backend](const Tensor& t) { return t.defined() ? backend.upload(t.view()) : Tensor(); };
  ExpertStack d;
  d.gate_up = {up(gate_up.data), up(gate_up.scale), gate_up.spec};
  d.down = {up(down.data), up(down.scale), down.spec};
  d.gate_up_bias = up(gate_up_bias);
  d.down_bias = up(down_bias);
  d.act = act;
  return d;
}

RouterSpec RouterWeights::view() const {
  RouterSpec r = spec;
  if (correction_bias.defined()) r.correction_bias = correction_bias.view();
  return r;
}

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint c;
  c.path_ = path;
  std::error_code ec;
  const bool dir = fs::is_directory(path, ec);
  const fs::path cfg_path = (dir ? fs::path(path) : fs::absolute(path).parent_path()) / "config.json";
  FP8MOE_CHECK(!dir || fs::exists(cfg_path), cfg_path.string(), ": missing; a checkpoint directory needs its config.json");
  c.store_ = std::make_shared<TensorStore>(TensorStore::open(path));
  if (fs::exists(cfg_path)) {
    const std::string text = read_text(cfg_path.string());
    c.quant_ = parse_quant_config(text, cfg_path.string());
    if (auto dense = dense_model_type(text)) {
      c.model_type_ = *dense;
    } else {
      c.config_ = parse_model_config(text, cfg_path.string());
      c.model_type_ = c.config_->model_type;
    }
  }
  for (const std::string& name : c.store_->names())
    if (starts_with(name, kLayers))
      if (auto l = index_at(name, kLayers.size())) c.layer_names_[*l].push_back(name);
  if (dir && c.config_) check_config_against_tensors(*c.config_, *c.store_, c.layer_names_);
  return c;
}

std::vector<int64_t> Checkpoint::moe_layers() const {
  if (config_) return config_->moe_layers();
  std::vector<int64_t> out;
  for (const auto& [l, names] : layer_names_) {
    const std::string ex = naming(nullptr, names, l).prefix + ".experts.";
    if (std::any_of(names.begin(), names.end(), [&](const std::string& n) { return starts_with(n, ex); })) out.push_back(l);
  }
  return out;
}

const std::vector<std::string>& Checkpoint::moe_layer_names(int64_t layer) const {
  FP8MOE_CHECK(!dense(), "checkpoint '", path_, "': model_type ", model_type_,
               " is a dense model (its config.json declares no routed experts): there is no MoE layer ", layer,
               " to load");
  FP8MOE_CHECK(config_.has_value(), "checkpoint '", path_, "': loading layer ", layer,
               " needs config.json (the router and the activation come from it)");
  const ModelConfig& cfg = *config_;
  FP8MOE_CHECK(cfg.is_moe_layer(layer), "checkpoint '", path_, "': layer ", layer, " is not a MoE layer per ", cfg.source,
               layer >= cfg.num_hidden_layers ? " (beyond num_hidden_layers " + std::to_string(cfg.num_hidden_layers) + ")"
                                              : std::string(" (a dense layer)"));
  static const std::vector<std::string> kNone;
  const auto it = layer_names_.find(layer);
  return it == layer_names_.end() ? kNone : it->second;
}

ExpertLayout Checkpoint::expert_layout(int64_t layer) const {
  const std::vector<std::string>& names = moe_layer_names(layer);
  return plan_layer(*store_, quant_, &*config_, names, layer).layout;
}

MoeLayerWeights Checkpoint::load_moe_layer(int64_t layer, Parts parts) const {
  const std::vector<std::string>& names = moe_layer_names(layer);
  const ModelConfig& cfg = *config_;
  const LayerPlan p = plan_layer(*store_, quant_, &cfg, names, layer);

  const std::string L = "layer " + std::to_string(layer);
  MoeLayerWeights w;
  w.layer = layer;
  w.layout = p.layout;
  w.routed.gate_up = build(p.gate_up, L + " gate_up");
  w.routed.down = build(p.down, L + " down");
  if (!p.gate_up_bias.empty()) w.routed.gate_up_bias = model::to_f32(p.gate_up_bias, store_->view(p.gate_up_bias));
  if (!p.down_bias.empty()) w.routed.down_bias = model::to_f32(p.down_bias, store_->view(p.down_bias));
  w.routed.act = cfg.act;
  if (parts == Parts::RoutedExperts) return w;
  if (p.shared_gate_up) {
    ExpertStack s;
    s.gate_up = build(*p.shared_gate_up, L + " shared gate_up");
    s.down = build(*p.shared_down, L + " shared down");
    w.shared = std::move(s);
  }
  if (!p.shared_gate.empty()) w.shared_gate = copy_as_stored(*store_, p.shared_gate);
  w.router.weight = copy_as_stored(*store_, p.router_weight);
  if (!p.router_bias.empty()) w.router.bias = model::to_f32(p.router_bias, store_->view(p.router_bias));
  if (!p.correction_bias.empty())
    w.router.correction_bias = model::to_f32(p.correction_bias, store_->view(p.correction_bias));
  w.router.spec = cfg.router_spec();
  return w;
}

LinearStack Checkpoint::load_linear(const std::string& module) const {
  const std::string weight = module + ".weight", bias = module + ".bias";
  FP8MOE_CHECK(store_->contains(weight), "missing tensor ", weight, " (the weight of Linear module ", module,
               ") in checkpoint ", path_);
  const SafetensorsEntry& we = store_->entry(weight);
  FP8MOE_CHECK(we.shape.rank == 2, "tensor ", weight, ": expected a Linear weight [out, in], found ", we.shape.str());
  const int64_t N = we.shape[0], K = we.shape[1];
  const std::string scale = find_scale(*store_, weight);
  const ScaleSpec spec = classify(*store_, quant_, module, weight, scale, N, K, ScaleLookup{});
  const TensorView w = store_->view(weight).reshape({1, N, K});
  const TensorView sv = scale.empty() ? TensorView() : store_->view(scale).reshape({1, store_->view(scale).numel()});
  LinearStack out;
  out.weight = model::copy_stacked(weight, w, scale, sv, spec);
  if (store_->contains(bias)) {
    expect_shape(*store_, bias, {N}, " (the bias of Linear module " + module + ")");
    out.bias = model::to_f32(bias, store_->view(bias).reshape({1, N}));
  }
  return out;
}

Tensor Checkpoint::load_stored(const std::string& name) const {
  FP8MOE_CHECK(store_->contains(name), "missing tensor ", name, " in checkpoint ", path_);
  return copy_as_stored(*store_, name);
}

Tensor Checkpoint::load_tensor(const std::string& name) const {
  FP8MOE_CHECK(store_->contains(name), "missing tensor ", name, " in checkpoint ", path_);
  const DType dt = store_->entry(name).dtype;
  FP8MOE_CHECK(!is_fp8(dt), "tensor ", name, " is ", dtype_name(dt),
               ": FP8 codes are not values without their scale; load it as a Linear weight (load_linear)");
  return load_stored(name);
}

InspectionReport Checkpoint::inspect() const {
  InspectionReport r;
  r.path = path_;
  r.method = quant_.method;
  r.model_type = model_type_;
  if (dense())
    r.notes.push_back("model_type " + model_type_ +
                      " declares no routed experts: a dense model. convert converts it; it has no MoE layer to load");
  const std::vector<std::string> names = store_->names();
  r.tensors = static_cast<int64_t>(names.size());
  for (const std::string& n : names) r.bytes = checked::add(r.bytes, stored_bytes(*store_, n), "bytes of all tensors");

  std::set<int64_t> layers;
  for (const auto& [l, ns] : layer_names_) layers.insert(l);
  if (config_)
    for (int64_t l : config_->moe_layers()) layers.insert(l);
  const ModelConfig* cfg = config_ ? &*config_ : nullptr;
  static const std::vector<std::string> kNone;
  std::set<std::string> covered;  // names a layer plan has judged

  for (int64_t l : layers) {
    const auto it = layer_names_.find(l);
    const std::vector<std::string>& ln = it == layer_names_.end() ? kNone : it->second;
    LayerReport lr;
    lr.index = l;
    for (const std::string& n : ln) lr.bytes = checked::add(lr.bytes, stored_bytes(*store_, n), "bytes of layer ", l);
    const std::string L = "layer " + std::to_string(l);
    if (cfg && l >= cfg->num_hidden_layers) {
      lr.kind = LayerKind::Skipped;
      lr.note = "beyond num_hidden_layers " + std::to_string(cfg->num_hidden_layers) +
                " of config.json (e.g. an MTP layer): not part of the model, skipped";
      r.notes.push_back(L + ": " + lr.note);
      for (const std::string& n : ln) covered.insert(n);
      r.layers.push_back(std::move(lr));
      continue;
    }
    const Naming n = naming(cfg, ln, l);
    const std::vector<std::string> owned = n.owned();
    const std::string ex = n.prefix + ".experts.";
    const auto first_expert = std::find_if(ln.begin(), ln.end(), [&](const std::string& s) { return starts_with(s, ex); });
    const bool moe = cfg ? cfg->is_moe_layer(l) : first_expert != ln.end();
    if (!moe) {
      lr.kind = LayerKind::Dense;
      if (first_expert != ln.end())
        r.problems.push_back(L + ": " + cfg->source + " makes it a dense layer, but it holds expert tensors (" +
                             *first_expert + ")");
      r.layers.push_back(std::move(lr));
      continue;
    }
    lr.kind = LayerKind::Moe;
    for (const std::string& s : ln)
      if (std::any_of(owned.begin(), owned.end(), [&](const std::string& p) { return starts_with(s, p); })) covered.insert(s);
    try {
      const LayerPlan p = plan_layer(*store_, quant_, cfg, ln, l);
      lr.layout = p.layout;
      lr.experts = p.E;
      lr.shared_experts = p.shared_gate_up.has_value();
      lr.projections = {p.gate_up.report, p.down.report};
      if (p.shared_gate_up) {
        lr.projections.push_back(p.shared_gate_up->report);
        lr.projections.push_back(p.shared_down->report);
      }
      if (quant_.method != QuantMethod::None && !p.gate_up.report.fp8())
        r.notes.push_back(L + ": routed experts are " + std::string(dtype_name(p.gate_up.report.dtype)) +
                          " (left unquantized by the checkpoint); they load as plain weights");
    } catch (const Error& e) {
      r.problems.push_back(L + ": " + e.message());
    }
    r.layers.push_back(std::move(lr));
  }

  // The per-tensor FP8 rule for everything no layer plan judged (attention, dense MLPs, ...).
  for (const std::string& n : names) {
    if (covered.count(n)) continue;
    if (auto base = scale_base(n)) {
      if (!store_->contains(*base))
        r.problems.push_back("orphan scale " + n + ": its weight " + *base + " does not exist");
      else if (!is_fp8(store_->entry(*base).dtype))
        r.problems.push_back("tensor " + *base + " is " + std::string(dtype_name(store_->entry(*base).dtype)) +
                             " but has a scale " + n + ": only FP8 weights carry scales");
      continue;
    }
    if (!is_fp8(store_->entry(n).dtype)) continue;
    // What convert --to bf16 and the loader would refuse: no scale, an excluded module, a scale of
    // the wrong shape (the same rule decides for all three).
    try {
      model::fp8_weight_spec(*store_, quant_, n, model_type_);
    } catch (const Error& e) {
      r.problems.push_back(e.message());
    }
  }
  if (quant_.method == QuantMethod::None && !model_type_.empty()) {
    const auto fp8 = std::count_if(names.begin(), names.end(), [&](const std::string& n) { return is_fp8(store_->entry(n).dtype); });
    if (fp8 > 0)
      r.notes.push_back(std::to_string(fp8) + " FP8 tensor(s) but config.json has no quantization_config: each scale "
                        "scheme is read from its scale's shape (a loader that trusts the config would read the FP8 "
                        "codes as plain numbers); convert --to bf16 dequantizes them, --to fp8 refuses them");
  }
  return r;
}

std::string InspectionReport::str() const {
  std::ostringstream os;
  os << "checkpoint   " << path << '\n'
     << "model_type   " << (model_type.empty() ? "(no config.json)" : model_type) << '\n'
     << "quantization " << quant_method_name(method) << '\n'
     << "tensors      " << tensors << " (" << human_bytes(bytes) << ")\n";
  for (const LayerReport& l : layers) {
    os << "layer " << std::setw(3) << l.index << "  " << std::left << std::setw(8) << layer_kind_name(l.kind);
    if (l.kind == LayerKind::Moe)
      os << std::setw(11) << expert_layout_name(l.layout) << "experts " << std::setw(4) << l.experts
         << (l.shared_experts ? "+shared " : "        ");
    os << std::right << human_bytes(l.bytes) << '\n';
    for (const ProjectionReport& p : l.projections)
      os << "    " << std::left << std::setw(15) << p.name << std::setw(20) << p.shape.str() << std::setw(9)
         << dtype_name(p.dtype) << std::setw(6) << (p.fp8() ? "FP8" : "plain") << std::setw(26)
         << (p.fp8() ? p.spec.str() : std::string("-")) << std::right << human_bytes(p.bytes) << '\n';
    if (!l.note.empty() && l.kind != LayerKind::Skipped) os << "    note: " << l.note << '\n';
  }
  os << "problems     " << problems.size() << '\n';
  for (const std::string& p : problems) os << "  - " << p << '\n';
  for (const std::string& n : notes) os << "  note: " << n << '\n';
  return os.str();
}

}  // namespace fp8moe

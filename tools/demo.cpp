// fp8moe demo [--backend auto|cpu|cuda] [--steps N] [--seed S] [--workdir DIR]
//
// The whole path on small synthetic models, with checks that make it exit non-zero when
// something is wrong:
//  1. a GLM-4.7-Flash-shaped BF16 checkpoint -> compressed-tensors FP8 (per-channel scales), and a
//     Qwen3-MoE-shaped one -> fine-grained FP8 (128x128 blocks), both with `convert`;
//  2. each FP8 checkpoint inspected and one MoE layer loaded;
//  3. that layer's forward and backward (with LoRA) on the chosen backend, checked: the CPU
//     backend against independent fp64 loops over the dequantized weights, and any other backend
//     against the CPU backend;
//  4. LoRA (r = 8, Adam) trained on the FP8 GLM layer so that its output approaches the original
//     BF16 experts' output on random token batches routed by the layer's own router; the loss on
//     a held-out batch must go down.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/convert.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/synthetic.hpp"
#include "fp8moe/train.hpp"
#include "signals.hpp"

namespace fs = std::filesystem;

namespace fp8moe::cli {
namespace {

constexpr const char* kUsage =
    "usage: fp8moe demo [--backend auto|cpu|cuda] [--steps N] [--seed S] [--workdir DIR]\n"
    "\n"
    "Builds small GLM-4.7-Flash- and Qwen3-MoE-shaped checkpoints, converts them to the real FP8\n"
    "formats (compressed-tensors per-channel, 128x128 block), checks one MoE layer's forward and\n"
    "backward on the backend against a reference, then trains LoRA adapters (r = 8, Adam) so the\n"
    "FP8 layer's output approaches the BF16 original. Exits non-zero if any check fails.\n"
    "  --backend  auto (default: CUDA when a GPU is present), cpu, cuda\n"
    "  --steps    training steps (default 30)\n"
    "  --seed     seed of every random draw (default: fresh; printed so a run can be replayed)\n"
    "  --workdir  where the checkpoints go (default: a temporary directory, removed afterwards, also\n"
    "             when Ctrl-C or SIGTERM stops the demo)\n";

constexpr int64_t kTokens = 64;       // tokens per batch
constexpr int64_t kEvalTokens = 256;  // held-out batch for the initial / final loss
constexpr int64_t kRank = 8;

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

std::string mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return buf;
}

Tensor randn(std::mt19937_64& rng, Shape shape, double sd) {
  std::normal_distribution<double> n(0.0, sd);
  Tensor t(DType::F32, shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = static_cast<float>(n(rng));
  return t;
}

// Owns the workdir; removes a temporary one when the demo ends, and when a signal ends it.
class Workdir {
 public:
  explicit Workdir(const std::optional<std::string>& given) {
    if (given) {
      path_ = *given;
      FP8MOE_CHECK(!fs::exists(path_) || (fs::is_directory(path_) && fs::is_empty(path_)), "--workdir ", *given,
                   " must be absent or an empty directory");
      fs::create_directories(path_);
      return;
    }
    std::string tmpl = (fs::temp_directory_path() / "fp8moe-demo-XXXXXX").string();
    FP8MOE_CHECK(::mkdtemp(tmpl.data()) != nullptr, "cannot create a temporary directory from ", tmpl);
    path_ = tmpl;
    temporary_ = true;
    cleanup_.emplace(path_.string());
  }
  ~Workdir() {
    std::error_code ec;
    if (temporary_) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  bool temporary() const { return temporary_; }

 private:
  fs::path path_;
  bool temporary_ = false;
  std::optional<CleanupOnSignal> cleanup_;
};

// ---------------------------------------------------------------------------------------------
// Routing: the layer's own router on the host (logits in fp32 as the models compute them), then
// the engine's router on the CPU backend.
struct Routed {
  Tensor ids;      // [T, k] I32
  Tensor weights;  // [T, k] F32
};
Routed route(Backend& cpu, const RouterWeights& r, const Tensor& hidden) {
  const int64_t T = hidden.size(0), H = hidden.size(1), E = r.weight.size(0);
  Tensor logits(DType::F32, Shape{T, E});  // [T, E]
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double acc = r.bias.defined() ? r.bias.ptr<float>()[e] : 0.0;
      for (int64_t h = 0; h < H; ++h)
        acc += static_cast<double>(hidden.ptr<float>()[t * H + h]) * load_as_double(r.weight.data(), r.weight.dtype(), e * H + h);
      logits.ptr<float>()[t * E + e] = static_cast<float>(acc);
    }
  const RouterSpec spec = r.view();
  Routed out{Tensor(DType::I32, Shape{T, spec.top_k}), Tensor(DType::F32, Shape{T, spec.top_k})};
  cpu.route(spec, logits, out.ids, out.weights);
  return out;
}

// ---------------------------------------------------------------------------------------------
// One layer problem (host tensors) and the results of forward + backward (host, F32 / F64).
struct Problem {
  Tensor hidden;                  // [T, H] F32
  Routed routing;                 // [T, k]
  Tensor gu_A, gu_B, d_A, d_B;    // LoRA [E, r, H], [E, 2I, r], [E, r, I], [E, H, r] F32
  double scaling = 2.0;
  Tensor grad_out;                // [T, H] F32
};
struct Results {
  std::vector<double> out, g_hidden, g_weights, g_gu_A, g_gu_B, g_d_A, g_d_B;
};
std::vector<double> to_vec(const TensorView& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = load_as_double(t.data, t.dtype, i);
  return v;
}

Results run_engine(Backend& be, const ExpertStack& stack, const Problem& p) {
  const ExpertStack dx = stack.upload(be);
  const Tensor gu_A = be.upload(p.gu_A), gu_B = be.upload(p.gu_B), d_A = be.upload(p.d_A), d_B = be.upload(p.d_B);
  const LoraAdapters lora{gu_A.view(), gu_B.view(), d_A.view(), d_B.view(), p.scaling};
  const Tensor hidden = be.upload(p.hidden), ids = be.upload(p.routing.ids), weights = be.upload(p.routing.weights);
  const Tensor grad_out = be.upload(p.grad_out);
  const int64_t T = p.hidden.size(0), H = p.hidden.size(1), k = p.routing.ids.size(1);
  const MoeLayer layer(be, dx.view(), lora);
  const MoeInputs in{hidden.view(), ids.view(), weights.view()};
  // Outputs poisoned with NaN, so anything the engine fails to write shows up.
  auto poisoned = [&be](Shape s) {
    Tensor t = be.empty(DType::F32, s);
    be.fill(t, std::nan(""));
    return t;
  };
  Tensor out = poisoned({T, H}), g_hidden = poisoned({T, H}), g_weights = poisoned({T, k});
  Tensor g_gu_A = poisoned(p.gu_A.shape()), g_gu_B = poisoned(p.gu_B.shape());
  Tensor g_d_A = poisoned(p.d_A.shape()), g_d_B = poisoned(p.d_B.shape());
  MoeSaved saved;
  layer.forward(in, out, &saved);
  layer.backward(in, saved, grad_out,
                 MoeGrads{g_hidden.view(), g_weights.view(), {g_gu_A.view(), g_gu_B.view(), g_d_A.view(), g_d_B.view()}});
  auto host = [&be](const Tensor& t) {
    Tensor h(t.dtype(), t.shape());
    be.copy(h, t);
    return to_vec(h);
  };
  return {host(out), host(g_hidden), host(g_weights), host(g_gu_A), host(g_gu_B), host(g_d_A), host(g_d_B)};
}

// The same layer written out as plain fp64 loops over the dequantized weights (SiLU-GLU, gate
// rows [0, I), up rows [I, 2I)), forward and backward by hand: shares no code with the engine.
Results run_fp64_reference(const ExpertStack& stack, const Problem& p) {
  const ExpertWeights w = stack.view();
  FP8MOE_CHECK(w.act.kind == Activation::SiluGlu && w.act.layout == GateUpLayout::Halves && !w.gate_up_bias.defined(),
               "demo reference: expects SiLU-GLU experts with gate/up halves and no biases");
  const int64_t T = p.hidden.size(0), H = w.hidden(), I = w.intermediate(), E = w.experts();
  const int64_t k = p.routing.ids.size(1), r = p.gu_A.size(1);
  const double s = p.scaling;
  std::vector<double> Wgu(E * 2 * I * H), Wd(E * H * I);  // [E, 2I, H], [E, H, I] dequantized
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < 2 * I; ++n)
      for (int64_t c = 0; c < H; ++c) Wgu[(e * 2 * I + n) * H + c] = w.gate_up.at(e, n, c);
    for (int64_t n = 0; n < H; ++n)
      for (int64_t c = 0; c < I; ++c) Wd[(e * H + n) * I + c] = w.down.at(e, n, c);
  }
  const std::vector<double> X = to_vec(p.hidden), G = to_vec(p.grad_out), Ag = to_vec(p.gu_A), Bg = to_vec(p.gu_B),
                            Ad = to_vec(p.d_A), Bd = to_vec(p.d_B);
  Results res;
  res.out.assign(T * H, 0.0);
  res.g_hidden.assign(T * H, 0.0);
  res.g_weights.assign(T * k, 0.0);
  res.g_gu_A.assign(Ag.size(), 0.0);
  res.g_gu_B.assign(Bg.size(), 0.0);
  res.g_d_A.assign(Ad.size(), 0.0);
  res.g_d_B.assign(Bd.size(), 0.0);
  auto sigmoid = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  std::vector<double> u(r), h1(2 * I), a(I), v(r), y(H), dy(H), dv(r), da(I), dh1(2 * I), du(r);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = p.routing.ids.ptr<int32_t>()[t * k + j];
      const double rw = p.routing.weights.ptr<float>()[t * k + j];
      const double* x = &X[t * H];
      // forward: h1 = W x + s B (A x); a = silu(gate) * up; y = Wd a + s Bd (Ad a)
      for (int64_t q = 0; q < r; ++q) {
        u[q] = 0;
        for (int64_t c = 0; c < H; ++c) u[q] += Ag[(e * r + q) * H + c] * x[c];
      }
      for (int64_t n = 0; n < 2 * I; ++n) {
        double acc = 0;
        for (int64_t c = 0; c < H; ++c) acc += Wgu[(e * 2 * I + n) * H + c] * x[c];
        for (int64_t q = 0; q < r; ++q) acc += s * Bg[(e * 2 * I + n) * r + q] * u[q];
        h1[n] = acc;
      }
      for (int64_t i = 0; i < I; ++i) a[i] = h1[i] * sigmoid(h1[i]) * h1[I + i];
      for (int64_t q = 0; q < r; ++q) {
        v[q] = 0;
        for (int64_t i = 0; i < I; ++i) v[q] += Ad[(e * r + q) * I + i] * a[i];
      }
      for (int64_t n = 0; n < H; ++n) {
        double acc = 0;
        for (int64_t i = 0; i < I; ++i) acc += Wd[(e * H + n) * I + i] * a[i];
        for (int64_t q = 0; q < r; ++q) acc += s * Bd[(e * H + n) * r + q] * v[q];
        y[n] = acc;
        res.out[t * H + n] += rw * acc;
      }
      // backward
      double gw = 0;
      for (int64_t n = 0; n < H; ++n) {
        gw += G[t * H + n] * y[n];
        dy[n] = rw * G[t * H + n];
      }
      res.g_weights[t * k + j] = gw;
      for (int64_t q = 0; q < r; ++q) {
        dv[q] = 0;
        for (int64_t n = 0; n < H; ++n) {
          res.g_d_B[(e * H + n) * r + q] += s * dy[n] * v[q];
          dv[q] += s * dy[n] * Bd[(e * H + n) * r + q];
        }
        for (int64_t i = 0; i < I; ++i) res.g_d_A[(e * r + q) * I + i] += dv[q] * a[i];
      }
      for (int64_t i = 0; i < I; ++i) {
        double acc = 0;
        for (int64_t n = 0; n < H; ++n) acc += dy[n] * Wd[(e * H + n) * I + i];
        for (int64_t q = 0; q < r; ++q) acc += dv[q] * Ad[(e * r + q) * I + i];
        da[i] = acc;
        const double g = h1[i], up = h1[I + i], sg = sigmoid(g);
        dh1[i] = da[i] * up * sg * (1.0 + g * (1.0 - sg));  // d silu(g) / dg
        dh1[I + i] = da[i] * g * sg;
      }
      for (int64_t q = 0; q < r; ++q) {
        du[q] = 0;
        for (int64_t n = 0; n < 2 * I; ++n) {
          res.g_gu_B[(e * 2 * I + n) * r + q] += s * dh1[n] * u[q];
          du[q] += s * dh1[n] * Bg[(e * 2 * I + n) * r + q];
        }
        for (int64_t c = 0; c < H; ++c) res.g_gu_A[(e * r + q) * H + c] += du[q] * x[c];
      }
      for (int64_t c = 0; c < H; ++c) {
        double acc = 0;
        for (int64_t n = 0; n < 2 * I; ++n) acc += dh1[n] * Wgu[(e * 2 * I + n) * H + c];
        for (int64_t q = 0; q < r; ++q) acc += du[q] * Ag[(e * r + q) * H + c];
        res.g_hidden[t * H + c] += acc;
      }
    }
  return res;
}

// ||a - b|| / ||b||; NaN when a holds a NaN (never "passes").
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  FP8MOE_CHECK(a.size() == b.size(), "demo: comparing ", a.size(), " values with ", b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Prints one line per quantity; returns false if any error reaches `tol` (or is NaN).
bool compare(const char* what, const Results& got, const Results& ref, double tol) {
  const std::pair<const char*, std::pair<const std::vector<double>*, const std::vector<double>*>> items[] = {
      {"output", {&got.out, &ref.out}},
      {"grad_hidden", {&got.g_hidden, &ref.g_hidden}},
      {"grad_topk_weights", {&got.g_weights, &ref.g_weights}},
      {"grad gate_up lora_A", {&got.g_gu_A, &ref.g_gu_A}},
      {"grad gate_up lora_B", {&got.g_gu_B, &ref.g_gu_B}},
      {"grad down lora_A", {&got.g_d_A, &ref.g_d_A}},
      {"grad down lora_B", {&got.g_d_B, &ref.g_d_B}}};
  bool ok = true;
  std::printf("      %s (relative Frobenius error, limit %.0e):\n", what, tol);
  for (const auto& [name, pair] : items) {
    const double e = rel_err(*pair.first, *pair.second);
    const bool pass = e < tol;  // false for NaN
    ok &= pass;
    std::printf("        %-20s %.3e  %s\n", name, e, pass ? "ok" : "FAILED");
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
struct Model {
  const char* title;
  SyntheticSpec spec;
  ScaleKind scheme;
  fs::path bf16, fp8;
};

// Writes the BF16 checkpoint, converts it, inspects the result.
void build_model(Model& m, uint64_t seed, const fs::path& work, const char* dirname) {
  m.spec.seed = seed;
  m.bf16 = work / (std::string(dirname) + "-bf16");
  m.fp8 = work / (std::string(dirname) + "-fp8");
  const auto t0 = Clock::now();
  const SyntheticInfo info = write_synthetic_checkpoint(m.bf16.string(), m.spec);
  ConvertOptions opt;
  opt.to = ConvertTarget::FP8;
  opt.scheme = m.scheme;
  const ConvertReport rep = convert_checkpoint(m.bf16.string(), m.fp8.string(), opt);
  std::printf("      BF16 checkpoint %s (%lld tensors) -> FP8 %s (%lld weights quantized) in %.0f ms\n",
              mib(info.bytes).c_str(), static_cast<long long>(info.tensors), mib(rep.bytes_out).c_str(),
              static_cast<long long>(rep.converted), ms_since(t0));
  const InspectionReport ir = Checkpoint::open(m.fp8.string()).inspect();
  FP8MOE_CHECK(ir.ok(), "demo: the converted checkpoint ", m.fp8.string(), " has problems:\n", ir.str());
  int64_t moe = 0;
  std::string scheme;
  for (const LayerReport& l : ir.layers)
    if (l.kind == LayerKind::Moe) {
      ++moe;
      if (scheme.empty() && !l.projections.empty()) scheme = l.projections[0].spec.str();
    }
  std::printf("      inspect: %s, %s, %lld MoE layers, experts FP8 %s: ok\n", ir.model_type.c_str(),
              quant_method_name(ir.method), static_cast<long long>(moe), scheme.c_str());
}

bool check_layer(Backend& be, Backend& cpu, const Model& m, int64_t layer, std::mt19937_64& rng) {
  const Checkpoint ck = Checkpoint::open(m.fp8.string());
  const MoeLayerWeights lw = ck.load_moe_layer(layer);
  const ExpertWeights w = lw.routed.view();
  const int64_t E = w.experts(), H = w.hidden(), I = w.intermediate();
  Problem p;
  p.hidden = randn(rng, {kTokens, H}, 1.0);
  p.routing = route(cpu, lw.router, p.hidden);
  // Non-zero adapters on both projections, so every LoRA term of forward and backward counts.
  p.gu_A = randn(rng, {E, kRank, H}, 1.0 / std::sqrt(static_cast<double>(H)));
  p.gu_B = randn(rng, {E, 2 * I, kRank}, 0.05);
  p.d_A = randn(rng, {E, kRank, I}, 1.0 / std::sqrt(static_cast<double>(I)));
  p.d_B = randn(rng, {E, H, kRank}, 0.05);
  p.grad_out = randn(rng, {kTokens, H}, 1.0);
  std::printf("    %s layer %lld (%s experts %s, E %lld, H %lld, I %lld, top-%lld, %lld tokens, LoRA r %lld)\n", m.title,
              static_cast<long long>(layer), w.gate_up.quantized() ? "FP8" : "plain", w.gate_up.spec.str().c_str(),
              static_cast<long long>(E), static_cast<long long>(H), static_cast<long long>(I),
              static_cast<long long>(p.routing.ids.size(1)), static_cast<long long>(kTokens), static_cast<long long>(kRank));

  auto t0 = Clock::now();
  const Results on_cpu = run_engine(cpu, lw.routed, p);
  const double cpu_ms = ms_since(t0);
  const Results ref = run_fp64_reference(lw.routed, p);
  bool ok = compare(("cpu backend (" + std::to_string(static_cast<int>(cpu_ms)) + " ms) vs independent fp64 loops").c_str(),
                    on_cpu, ref, 1e-5);
  if (be.device() != Device::CPU) {
    t0 = Clock::now();
    const Results got = run_engine(be, lw.routed, p);
    // BF16 intermediates (and FP8 activations where the kernels use them) against the fp64 CPU
    // oracle: percent-level differences are expected, more is a bug.
    ok &= compare((std::string(be.name()) + " backend (" + std::to_string(static_cast<int>(ms_since(t0))) +
                   " ms) vs cpu backend").c_str(),
                  got, on_cpu, 5e-2);
  }
  return ok;
}

// Training tokens: random points of a fixed random kSubspace-dimensional subspace plus a little
// isotropic noise. Hidden states of real models are strongly anisotropic like this; it also gives
// the weight quantization error a low-rank footprint on the inputs, which a rank-8 adapter can
// learn to cancel (on isotropic noise tokens there is little for it to learn).
struct TokenSource {
  static constexpr int64_t kSubspace = 8;
  Tensor basis;  // [kSubspace, H], entries N(0, 1/kSubspace): token entries have variance ~1
  TokenSource(std::mt19937_64& rng, int64_t H) : basis(randn(rng, {kSubspace, H}, 1.0 / std::sqrt(double(kSubspace)))) {}
  Tensor sample(std::mt19937_64& rng, int64_t T) const {  // [T, H] F32
    const int64_t H = basis.size(1);
    Tensor h = randn(rng, {T, H}, 0.05);
    const Tensor z = randn(rng, {T, kSubspace}, 1.0);  // [T, kSubspace]
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < H; ++c) {
        double acc = 0;
        for (int64_t q = 0; q < kSubspace; ++q) acc += z.ptr<float>()[t * kSubspace + q] * basis.ptr<float>()[q * H + c];
        h.ptr<float>()[t * H + c] += static_cast<float>(acc);
      }
    return h;
  }
};

// Trains LoRA on the FP8 layer towards the BF16 layer; returns false unless the held-out loss drops.
bool train(Backend& be, Backend& cpu, const Model& m, int64_t layer, int64_t steps, std::mt19937_64& rng) {
  const MoeLayerWeights fp8 = Checkpoint::open(m.fp8.string()).load_moe_layer(layer);
  const MoeLayerWeights bf16 = Checkpoint::open(m.bf16.string()).load_moe_layer(layer);
  const ExpertStack d_fp8 = fp8.routed.upload(be), d_bf16 = bf16.routed.upload(be);
  const int64_t H = d_fp8.view().hidden();

  // A batch: random tokens, routed by the layer's router, and the BF16 experts' output as target.
  struct Batch {
    Tensor hidden, ids, weights, target;  // device [T, H], [T, k], [T, k], [T, H] F32
    MoeInputs in() const { return {hidden.view(), ids.view(), weights.view()}; }
  };
  const TokenSource tokens(rng, H);
  auto make_batch = [&](int64_t T) {
    const Tensor h = tokens.sample(rng, T);
    const Routed r = route(cpu, fp8.router, h);
    Batch b{be.upload(h), be.upload(r.ids), be.upload(r.weights), be.empty(DType::F32, Shape{T, H})};
    MoeLayer(be, d_bf16.view()).forward(b.in(), b.target);
    return b;
  };

  LoraTrainConfig cfg;
  cfg.rank = kRank;
  cfg.alpha = 16.0;
  cfg.adam.lr = 1e-3;
  cfg.seed = rng();
  LoraTrainer trainer(be, d_fp8.view(), cfg);
  const Batch eval = make_batch(kEvalTokens);
  const double initial = trainer.evaluate(eval.in(), eval.target);
  std::printf("    LoRA r %lld (alpha %.0f, Adam lr %.0e) on the experts of %s layer %lld (FP8), %lld tokens per step\n"
              "    (random, near a fixed %lld-dim subspace), target: the original BF16 experts' output;\n"
              "    held-out loss (%lld tokens) before training %.4e\n",
              static_cast<long long>(kRank), cfg.alpha, cfg.adam.lr, m.title, static_cast<long long>(layer),
              static_cast<long long>(kTokens), static_cast<long long>(TokenSource::kSubspace),
              static_cast<long long>(kEvalTokens), initial);
  double total_ms = 0;
  for (int64_t s = 1; s <= steps; ++s) {
    const Batch b = make_batch(kTokens);
    const auto t0 = Clock::now();
    const double loss = trainer.step(b.in(), b.target);
    const double ms = ms_since(t0);
    total_ms += ms;
    std::printf("      step %3lld/%lld  loss %.4e  %7.2f ms\n", static_cast<long long>(s), static_cast<long long>(steps), loss, ms);
  }
  const double final_loss = trainer.evaluate(eval.in(), eval.target);
  const bool ok = final_loss < initial;
  std::printf("    held-out loss: initial %.4e -> final %.4e (%+.1f%%), %.2f ms per step on %s: %s\n", initial, final_loss,
              100.0 * (final_loss - initial) / initial, steps ? total_ms / steps : 0.0, be.name(),
              ok ? "ok" : "FAILED (the loss did not decrease)");
  return ok;
}

int run_demo(const std::vector<std::string>& argv) {
  const Args args(argv, {"backend", "steps", "seed", "workdir"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(0, "none");
  const int64_t steps = args.get_int("steps", 30);
  FP8MOE_USAGE_CHECK(steps >= 1, "--steps must be at least 1, found ", steps);
  const std::string backend = args.get_or("backend", "auto");
  FP8MOE_USAGE_CHECK(backend == "auto" || backend == "cpu" || backend == "cuda", "--backend: expected auto, cpu or cuda, found '",
                     backend, "'");
  const uint64_t seed = args.get_u64("seed", (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}());
  const auto t_start = Clock::now();
  auto be = make_backend(backend);
  auto cpu = make_cpu_backend();
  const Workdir work(args.get("workdir"));
  std::mt19937_64 rng(seed);
  std::printf("fp8moe demo: seed %llu (replay with --seed %llu), backend %s, workdir %s%s\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed), be->name(),
              work.path().string().c_str(), work.temporary() ? " (temporary)" : "");
  std::fflush(stdout);  // the workdir line first, even when stdout is a file

  Model glm{"GLM-4.7-Flash-shaped", SyntheticSpec::glm4_moe_lite(), ScaleKind::Channel, {}, {}};
  Model qwen{"Qwen3-MoE-shaped", SyntheticSpec::qwen3_moe(), ScaleKind::Block, {}, {}};
  std::printf("[1/4] %s model (H %lld, I %lld, %lld experts top-%lld + shared, %lld layers + MTP) -> compressed-tensors FP8 per channel\n",
              glm.title, static_cast<long long>(glm.spec.hidden), static_cast<long long>(glm.spec.moe_intermediate),
              static_cast<long long>(glm.spec.experts), static_cast<long long>(glm.spec.top_k),
              static_cast<long long>(glm.spec.layers));
  build_model(glm, rng(), work.path(), "glm");
  std::printf("[2/4] %s model (H %lld, I %lld, %lld experts top-%lld, %lld layers) -> fp8 128x128 blocks\n", qwen.title,
              static_cast<long long>(qwen.spec.hidden), static_cast<long long>(qwen.spec.moe_intermediate),
              static_cast<long long>(qwen.spec.experts), static_cast<long long>(qwen.spec.top_k),
              static_cast<long long>(qwen.spec.layers));
  build_model(qwen, rng(), work.path(), "qwen");

  std::printf("[3/4] one MoE layer forward + backward on %s, checked\n", be->name());
  const int64_t glm_layer = glm.spec.first_dense;  // the first MoE layer
  bool ok = check_layer(*be, *cpu, glm, glm_layer, rng);
  ok &= check_layer(*be, *cpu, qwen, 0, rng);

  std::printf("[4/4] LoRA training on %s, %lld steps\n", be->name(), static_cast<long long>(steps));
  ok &= train(*be, *cpu, glm, glm_layer, steps, rng);

  std::printf("demo: %s in %.1f s (seed %llu)\n", ok ? "all checks passed" : "FAILED", ms_since(t_start) / 1000.0,
              static_cast<unsigned long long>(seed));
  return ok ? 0 : 1;
}

}  // namespace

FP8MOE_COMMAND(demo, "end-to-end demo: synthetic FP8 checkpoints, layer checks, LoRA training", run_demo);

}  // namespace fp8moe::cli

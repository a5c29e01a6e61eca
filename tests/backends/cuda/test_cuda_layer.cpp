// The whole MoE layer on the CUDA backend against the CPU backend (double precision oracle) on
// identical inputs: forward output and every gradient (hidden, routing weights, each LoRA A/B),
// relative Frobenius error < 1e-2, over activations, layouts, scale schemes, LoRA/bias on and
// off and the edge cases; a Qwen3-shaped problem checked on sampled tokens; bitwise run-to-run
// determinism; and a captured CUDA graph of forward + backward replayed with identical results.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/w8a8.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"

namespace fp8moe {
namespace {

using test::fresh_seed;
using test::poisoned;
using test::random_host;
using test::random_ids;
using test::rel_error;
using test::to_host;

constexpr double kTolerance = 1e-2;

struct LayerCase {
  std::string name;
  int64_t T, k, E, H, I;
  ScaleKind scale = ScaleKind::Block;  // None: BF16 weights
  Activation act = Activation::SiluGlu;
  GateUpLayout layout = GateUpLayout::Halves;
  int64_t rank = 0;  // 0: no LoRA
  bool bias = false;
  DType lora_dtype = DType::F32;
  int64_t hot = 0;  // routing skew: `hot` experts take `hot_share` of the first picks
  double hot_share = 0.0;
};

// ---- the problem on the host, then on each backend --------------------------------------------

struct HostProblem {
  LayerCase c;
  QuantWeights gate_up, down;                      // [E, 2I, H], [E, H, I]
  Tensor gate_up_bias, down_bias;                  // [E, 2I], [E, H] F32
  Tensor gu_a, gu_b, d_a, d_b;                     // LoRA [E, r, H], [E, 2I, r], [E, r, I], [E, H, r]
  Tensor hidden, ids, weights, grad_out;           // [T, H] BF16, [T, k] I32, [T, k] F32, [T, H] BF16
};

QuantWeights make_weights(const LayerCase& c, int64_t N, int64_t K, int64_t segments, std::mt19937_64& rng) {
  const Tensor w = random_host(DType::F32, {c.E, N, K}, rng, 1.0 / std::sqrt(static_cast<double>(K)));
  switch (c.scale) {
    case ScaleKind::None: {
      QuantWeights q;
      q.data = test::convert_host(w, DType::BF16);
      q.spec = ScaleSpec::none(N, K);
      return q;
    }
    case ScaleKind::Block: return quantize(w, ScaleSpec::block(N, K, 128, 128, segments));
    case ScaleKind::Channel: return quantize(w, ScaleSpec::channel(N, K));
    case ScaleKind::Tensor: return quantize(w, ScaleSpec::tensor(N, K, segments));
    case ScaleKind::Group: return quantize(w, ScaleSpec::group(N, K, 128));
  }
  return {};
}

HostProblem make_problem(const LayerCase& c, std::mt19937_64& rng) {
  HostProblem p;
  p.c = c;
  p.gate_up = make_weights(c, 2 * c.I, c.H, 2, rng);
  p.down = make_weights(c, c.H, c.I, 1, rng);
  if (c.bias) {
    p.gate_up_bias = random_host(DType::F32, {c.E, 2 * c.I}, rng, 0.2);
    p.down_bias = random_host(DType::F32, {c.E, c.H}, rng, 0.2);
  }
  if (c.rank > 0) {
    const double r = static_cast<double>(c.rank);
    p.gu_a = random_host(c.lora_dtype, {c.E, c.rank, c.H}, rng, 1.0 / std::sqrt(static_cast<double>(c.H)));
    p.gu_b = random_host(c.lora_dtype, {c.E, 2 * c.I, c.rank}, rng, 1.0 / std::sqrt(r));
    p.d_a = random_host(c.lora_dtype, {c.E, c.rank, c.I}, rng, 1.0 / std::sqrt(static_cast<double>(c.I)));
    p.d_b = random_host(c.lora_dtype, {c.E, c.H, c.rank}, rng, 1.0 / std::sqrt(r));
  }
  p.hidden = random_host(DType::BF16, {c.T, c.H}, rng);
  p.ids = random_ids(DType::I32, c.T, c.k, c.E, rng, c.hot, c.hot_share);
  p.weights = Tensor(DType::F32, {c.T, c.k});
  std::uniform_real_distribution<double> u(0.05, 1.0);
  for (int64_t i = 0; i < p.weights.numel(); ++i) p.weights.ptr<float>()[i] = static_cast<float>(u(rng));
  p.grad_out = random_host(DType::BF16, {c.T, c.H}, rng);
  return p;
}

// Rows `tokens` of a host [T, n] tensor.
Tensor take_rows(const Tensor& t, const std::vector<int64_t>& tokens) {
  const int64_t n = t.size(1), es = dtype_size(t.dtype());
  Tensor out(t.dtype(), {static_cast<int64_t>(tokens.size()), n});
  for (size_t i = 0; i < tokens.size(); ++i)
    std::memcpy(static_cast<char*>(out.data()) + i * n * es, static_cast<const char*>(t.data()) + tokens[i] * n * es,
                static_cast<size_t>(n * es));
  return out;
}

// The problem on one backend: weights, adapters and inputs on its device, and its layer.
struct Side {
  Backend* be;
  Tensor gu_data, gu_scale, d_data, d_scale, gu_bias, d_bias, gu_a, gu_b, d_a, d_b;
  Tensor hidden, ids, weights, grad_out;
  std::unique_ptr<MoeLayer> layer;

  Tensor up(const Tensor& host) { return host.defined() ? be->upload(host) : Tensor(); }

  // tokens: the subset of tokens this side runs (all when empty).
  Side(Backend& backend, const HostProblem& p, const std::vector<int64_t>& tokens = {}) : be(&backend) {
    gu_data = up(p.gate_up.data), gu_scale = up(p.gate_up.scale), d_data = up(p.down.data), d_scale = up(p.down.scale);
    gu_bias = up(p.gate_up_bias), d_bias = up(p.down_bias);
    gu_a = up(p.gu_a), gu_b = up(p.gu_b), d_a = up(p.d_a), d_b = up(p.d_b);
    const bool subset = !tokens.empty();
    hidden = up(subset ? take_rows(p.hidden, tokens) : p.hidden);
    ids = up(subset ? take_rows(p.ids, tokens) : p.ids);
    weights = up(subset ? take_rows(p.weights, tokens) : p.weights);
    grad_out = up(subset ? take_rows(p.grad_out, tokens) : p.grad_out);
    ExpertWeights w;
    w.gate_up = {gu_data, gu_scale.view(), p.gate_up.spec};
    w.down = {d_data, d_scale.view(), p.down.spec};
    w.gate_up_bias = gu_bias.view();
    w.down_bias = d_bias.view();
    w.act.kind = p.c.act;
    w.act.layout = p.c.layout;
    LoraAdapters l;
    if (p.c.rank > 0) {
      l.gate_up_A = gu_a, l.gate_up_B = gu_b, l.down_A = d_a, l.down_B = d_b;
      l.scaling = 0.75;
    }
    layer = std::make_unique<MoeLayer>(backend, w, l);
  }
  MoeInputs inputs() const { return {hidden, ids, weights}; }
};

// Every output of one forward + backward.
struct Results {
  Tensor out, d_hidden, d_weights, d_gu_a, d_gu_b, d_d_a, d_d_b;

  static Results alloc(Backend& be, const HostProblem& p, int64_t T, DType dt) {
    const LayerCase& c = p.c;
    Results r;
    r.out = poisoned(be, dt, {T, c.H});
    r.d_hidden = poisoned(be, dt, {T, c.H});
    r.d_weights = poisoned(be, dt, {T, c.k});
    if (c.rank > 0) {
      r.d_gu_a = poisoned(be, dt, p.gu_a.shape()), r.d_gu_b = poisoned(be, dt, p.gu_b.shape());
      r.d_d_a = poisoned(be, dt, p.d_a.shape()), r.d_d_b = poisoned(be, dt, p.d_b.shape());
    }
    return r;
  }
  MoeGrads grads() const { return {d_hidden, d_weights, {d_gu_a.view(), d_gu_b.view(), d_d_a.view(), d_d_b.view()}}; }
  std::vector<std::pair<const char*, const Tensor*>> named() const {
    return {{"out", &out},          {"d_hidden", &d_hidden}, {"d_weights", &d_weights}, {"d_gate_up_A", &d_gu_a},
            {"d_gate_up_B", &d_gu_b}, {"d_down_A", &d_d_a},    {"d_down_B", &d_d_b}};
  }
};

// forward then backward into r (MoeSaved lives and dies inside: its frees are stream-ordered).
void forward_backward(const Side& s, const Results& r) {
  MoeSaved saved;
  s.layer->forward(s.inputs(), r.out, &saved);
  s.layer->backward(s.inputs(), saved, s.grad_out, r.grads());
}

Results run_side(Side& s, const HostProblem& p, DType dt) {
  Results r = Results::alloc(*s.be, p, s.hidden.size(0), dt);
  forward_backward(s, r);
  s.be->synchronize();
  return r;
}

Tensor host_of(Backend& be, const Tensor& t) { return t.defined() ? to_host(be, t) : Tensor(); }

// Squared-error sums per output, accumulated over runs: the relative Frobenius error of an output
// is sqrt(sum |got - ref|^2 / sum |ref|^2) over every run added.
struct ErrorSums {
  std::vector<std::pair<std::string, std::array<double, 2>>> sums;  // name -> {num, den}

  // Adds CUDA results (tokens `rows` of the token-indexed outputs when given) against the CPU's.
  void add(Backend& gpu, const Results& got, const Results& ref, const std::vector<int64_t>& rows = {}) {
    const auto g = got.named();
    const auto r = ref.named();
    if (sums.empty())
      for (const auto& [name, t] : g) sums.push_back({name, {0.0, 0.0}});
    for (size_t i = 0; i < g.size(); ++i) {
      if (!r[i].second->defined()) continue;
      Tensor h = host_of(gpu, *g[i].second);
      const bool per_token = i < 3;  // out, d_hidden, d_weights
      if (per_token && !rows.empty()) h = take_rows(h, rows);
      const TensorView& ref_t = *r[i].second;
      ASSERT_EQ(h.shape(), ref_t.shape) << g[i].first;
      for (int64_t e = 0; e < ref_t.numel(); ++e) {
        const double x = load_as_double(h.data(), h.dtype(), e), y = load_as_double(ref_t.data, ref_t.dtype, e);
        sums[i].second[0] += std::isfinite(x) ? (x - y) * (x - y) : std::numeric_limits<double>::infinity();
        sums[i].second[1] += y * y;
      }
    }
  }
  double error(const std::array<double, 2>& nd) const {
    return nd[1] > 0 ? std::sqrt(nd[0] / nd[1]) : (nd[0] == 0 ? 0.0 : HUGE_VAL);
  }
  void print(const std::string& what) const {
    std::printf("%s:", what.c_str());
    for (const auto& [name, nd] : sums)
      if (nd[1] > 0) std::printf(" %s %.2e", name.c_str(), error(nd));
    std::printf("\n");
  }
  void expect_below(double tolerance) const {
    for (const auto& [name, nd] : sums) {
      const double err = nd[1] > 0 ? std::sqrt(nd[0] / nd[1]) : (nd[0] == 0 ? 0.0 : HUGE_VAL);
      EXPECT_LT(err, tolerance) << name << " relative error " << err;
    }
  }
};

void expect_close(Backend& gpu, const Results& got, const Results& ref, const std::vector<int64_t>& rows = {}) {
  ErrorSums e;
  e.add(gpu, got, ref, rows);
  e.expect_below(kTolerance);
}

std::string describe(const LayerCase& c) {
  return c.name + ": T " + std::to_string(c.T) + " k " + std::to_string(c.k) + " E " + std::to_string(c.E) + " H " +
         std::to_string(c.H) + " I " + std::to_string(c.I) + " scale " + scale_kind_name(c.scale) + " rank " +
         std::to_string(c.rank) + (c.bias ? " bias" : "");
}

// ---- CUDA vs CPU over the cases -----------------------------------------------------------------

class CudaLayer : public ::testing::TestWithParam<LayerCase> {};

// Problems with few (token, slot) pairs have outputs of a handful of values (T = 1, k = 1: one
// routing-weight gradient, a single dot product), whose relative error is a matter of luck, not of
// correctness. They run as 32 independent problems whose errors are pooled into one Frobenius
// norm. With 8, the pooled routing-weight error of tokens1_k1 passed 1e-2 in ~0.7% of draws (a
// numpy model of the BF16 roundings: median 0.33%, 99th percentile 0.93%; it failed once on an
// H100); with 32 the model's worst of 1250 draws is 0.82%.
// Forward + backward on the CUDA backend at `precision` against the CPU oracle, errors below `tol`.
void match_cpu(const LayerCase& c, GemmPrecision precision, double tol) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + describe(c) + " precision " + gemm_precision_name(precision));
  std::mt19937_64 rng(seed);
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  gpu->set_gemm_precision(precision);
  const int problems = c.T * c.k < 64 ? 32 : 1;
  ErrorSums f32, bf16;
  for (int i = 0; i < problems; ++i) {
    const HostProblem p = make_problem(c, rng);
    Side cs(*cpu, p), gs(*gpu, p);
    const Results ref = run_side(cs, p, DType::F64);
    f32.add(*gpu, run_side(gs, p, DType::F32), ref);
    bf16.add(*gpu, run_side(gs, p, DType::BF16), ref);
  }
  if (precision != GemmPrecision::W8A16) {  // the accuracy W8A8 costs, for the record
    f32.print(c.name + " " + gemm_precision_name(precision) + " F32 outputs");
    bf16.print(c.name + " " + gemm_precision_name(precision) + " BF16 outputs");
  }
  {
    SCOPED_TRACE("outputs F32");
    f32.expect_below(tol);
  }
  {
    SCOPED_TRACE("outputs BF16");
    bf16.expect_below(tol);
  }
}

TEST_P(CudaLayer, ForwardBackwardMatchCpu) {
  FP8MOE_REQUIRE_GPU();
  match_cpu(GetParam(), GemmPrecision::W8A16, kTolerance);
}

const LayerCase kCases[] = {
    {"silu_halves_block_lora", 64, 4, 8, 320, 192, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 8},
    {"silu_halves_channel", 50, 2, 6, 256, 160, ScaleKind::Channel},
    {"silu_halves_tensor_lora_bf16", 40, 3, 5, 192, 96, ScaleKind::Tensor, Activation::SiluGlu, GateUpLayout::Halves, 4,
     false, DType::BF16},
    {"silu_halves_bf16weights_lora_bias", 33, 2, 4, 160, 64, ScaleKind::None, Activation::SiluGlu,
     GateUpLayout::Halves, 8, true},
    {"gptoss_interleaved_block_lora_bias_H2880", 32, 2, 4, 2880, 1440, ScaleKind::Block, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 16, true},
    {"gptoss_interleaved_channel_bias", 48, 4, 8, 200, 100, ScaleKind::Channel, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 0, true},
    {"gptoss_interleaved_tensor_lora", 30, 2, 4, 256, 128, ScaleKind::Tensor, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 4},
    {"odd_dims_block_lora", 29, 3, 6, 330, 93, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 5},
    {"tokens0", 0, 2, 4, 128, 64, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4},
    {"tokens1_k1", 1, 1, 8, 256, 128, ScaleKind::Channel, Activation::SiluGlu, GateUpLayout::Halves, 4},
    {"empty_experts", 3, 2, 32, 192, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4, true},
    {"one_hot_expert", 100, 1, 8, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4, false,
     DType::F32, 1, 1.0},
    {"skewed_k8", 64, 8, 16, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 8, false,
     DType::F32, 2, 0.8},
    // Enough rows per expert (>= 128) that choose_tile_shape takes the wgmma kernel on Hopper:
    // fast path (dims multiples of 64) and general path (H 200, I 100), hot experts, LoRA, bias.
    {"wgmma_rows_block_lora", 600, 4, 8, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 8},
    {"wgmma_rows_gptoss_channel_bias", 400, 2, 4, 200, 100, ScaleKind::Channel, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 4, true},
    {"wgmma_rows_skewed_tensor_lora", 512, 8, 16, 384, 192, ScaleKind::Tensor, Activation::SiluGlu,
     GateUpLayout::Halves, 8, false, DType::F32, 2, 0.8},
};

INSTANTIATE_TEST_SUITE_P(Cases, CudaLayer, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<LayerCase>& i) { return i.param.name; });

// ---- the W8A8 forward path (FP8 activations on Hopper; the backward stays W8A16) ---------------

// W8A8's error is the E4M3 rounding of the activations (3 mantissa bits: RMS ~2.5e-2 per value),
// once before each GEMM: a float model of this layer on Gaussian inputs gives 2.6e-2 for one GEMM
// and 4.4e-2 for the layer output (GEMM2 sees GEMM1's error through the activation plus its own).
// The 3e-2 target holds per GEMM (test_w8a8.cpp), not for the layer; the bound here is
// about twice the model, and the measured errors are printed for the record.
constexpr double kW8a8Tolerance = 8e-2;

class CudaLayerW8a8 : public ::testing::TestWithParam<LayerCase> {};

TEST_P(CudaLayerW8a8, ForwardBackwardMatchCpu) {
  FP8MOE_REQUIRE_W8A8();
  match_cpu(GetParam(), GemmPrecision::W8A8, kW8a8Tolerance);
}

// Shapes the W8A8 path takes (K % 16, N % 8, 128x128 blocks in whole segments or channel scales),
// and two it takes only in part (gate_up of I = 1440 has 128-row blocks straddling its gate/up
// segments: W8A16 there, W8A8 for down).
const LayerCase kW8a8Cases[] = {
    {"block_lora", 256, 8, 16, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 8},
    {"channel", 200, 4, 8, 256, 192, ScaleKind::Channel},
    {"gptoss_interleaved_channel_bias", 48, 4, 8, 208, 112, ScaleKind::Channel, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 0, true},
    {"gptoss_interleaved_block_lora_bias_H2880", 32, 2, 4, 2880, 1440, ScaleKind::Block, Activation::GptOssGlu,
     GateUpLayout::Interleaved, 16, true},
    {"tokens0", 0, 2, 4, 128, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4},
    {"tokens1_k1", 1, 1, 8, 256, 128, ScaleKind::Channel, Activation::SiluGlu, GateUpLayout::Halves, 4},
    {"empty_experts", 3, 2, 32, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4, true},
    {"one_hot_expert", 100, 1, 8, 256, 128, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 4, false,
     DType::F32, 1, 1.0},
};

INSTANTIATE_TEST_SUITE_P(Cases, CudaLayerW8a8, ::testing::ValuesIn(kW8a8Cases),
                         [](const ::testing::TestParamInfo<LayerCase>& i) { return i.param.name; });

// W8A8 with either FP8 dgrad kernel (w8a8.cuh: Dgrad::Fp8, Fp8RegW): the input-gradient GEMMs also quantize their
// input, the output gradient and dL/dH1 (E4M3, ~2.5e-2 each), on top of the forward's roundings that
// the saved activations carry. The float model of the forward alone gives 4.4e-2; the bound is
// looser than W8A8's by the two extra roundings, and the errors are printed for the record.
constexpr double kW8a8Fp8DgradTolerance = 1.2e-1;

class CudaLayerW8a8Fp8Dgrad : public ::testing::TestWithParam<LayerCase> {};

TEST_P(CudaLayerW8a8Fp8Dgrad, ForwardBackwardMatchCpu) {
  FP8MOE_REQUIRE_W8A8();
  struct Restore {  // the process-wide setting, back to what it was whatever happens
    cuda::w8a8::Dgrad was = cuda::w8a8::dgrad_setting();
    ~Restore() { cuda::w8a8::set_dgrad_setting(was); }
  } restore;
  for (const cuda::w8a8::Dgrad kernel : {cuda::w8a8::Dgrad::Fp8, cuda::w8a8::Dgrad::Fp8RegW}) {
    SCOPED_TRACE(kernel == cuda::w8a8::Dgrad::Fp8 ? "FP8 dgrad on transposed tiles" : "FP8 dgrad with W from registers");
    cuda::w8a8::set_dgrad_setting(kernel);
    match_cpu(GetParam(), GemmPrecision::W8A8, kW8a8Fp8DgradTolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaLayerW8a8Fp8Dgrad, ::testing::ValuesIn(kW8a8Cases),
                         [](const ::testing::TestParamInfo<LayerCase>& i) { return i.param.name; });

// w8a8-down: one E4M3 rounding (GEMM2's input) instead of two. The float model gives 2.3e-2 at
// the output (bench/NOTES.md, eighth session); the input and LoRA gradients flow through W8A16
// GEMMs on the precise saved activations, but the routing-weight gradient reads GEMM2's output,
// and under W8A8 that gradient erred up to 7.9e-2 (GPT-OSS case, ninth session). The bound is
// about twice what is expected, as for W8A8; the errors are printed against issue 13's 3e-2.
constexpr double kW8a8DownTolerance = 5e-2;

class CudaLayerW8a8Down : public ::testing::TestWithParam<LayerCase> {};

TEST_P(CudaLayerW8a8Down, ForwardBackwardMatchCpu) {
  FP8MOE_REQUIRE_W8A8();
  match_cpu(GetParam(), GemmPrecision::W8A8Down, kW8a8DownTolerance);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaLayerW8a8Down, ::testing::ValuesIn(kW8a8Cases),
                         [](const ::testing::TestParamInfo<LayerCase>& i) { return i.param.name; });

// ---- a real model shape, checked on sampled tokens ------------------------------------------------

// Qwen3-30B-A3B experts (E 128, top-8, H 2048, I 768, 128x128 blocks) with LoRA r = 16 on 1024
// tokens. Every output of a token depends on that token alone, and every LoRA gradient is linear in
// dL/dout; so the CPU runs only the sampled tokens, and the CUDA run gets dL/dout zeroed outside
// them: its LoRA gradients then equal the CPU's on the subset.
TEST(CudaLayerLarge, Qwen3ShapeOnSampledTokens) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const LayerCase c{"qwen3", 1024, 8, 128, 2048, 768, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 16};
  HostProblem p = make_problem(c, rng);
  std::vector<int64_t> all(static_cast<size_t>(c.T));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<int64_t> sample(all.begin(), all.begin() + 4);
  std::sort(sample.begin(), sample.end());
  std::vector<char> keep(static_cast<size_t>(c.T), 0);
  for (int64_t t : sample) keep[t] = 1;
  const int64_t hs = dtype_size(DType::BF16) * c.H;
  for (int64_t t = 0; t < c.T; ++t)
    if (!keep[t]) std::memset(static_cast<char*>(p.grad_out.data()) + t * hs, 0, static_cast<size_t>(hs));

  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  Side cs(*cpu, p, sample), gs(*gpu, p);
  const Results ref = run_side(cs, p, DType::F64);
  const Results got = run_side(gs, p, DType::F32);
  expect_close(*gpu, got, ref, sample);
}

// ---- determinism and graph capture ----------------------------------------------------------------

LayerCase determinism_case() {
  return {"det", 512, 8, 32, 512, 256, ScaleKind::Block, Activation::SiluGlu, GateUpLayout::Halves, 8, false,
          DType::F32, 4, 0.5};
}

void expect_bitwise_equal(Backend& gpu, const Results& a, const Results& b, const char* what) {
  const auto x = a.named();
  const auto y = b.named();
  for (size_t i = 0; i < x.size(); ++i) {
    if (!x[i].second->defined()) continue;
    EXPECT_TRUE(test::bytes_equal(to_host(gpu, *x[i].second), to_host(gpu, *y[i].second)))
        << x[i].first << " differs bitwise between " << what;
  }
}

void run_to_run_bitwise(GemmPrecision precision) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " precision " + gemm_precision_name(precision));
  std::mt19937_64 rng(seed);
  const HostProblem p = make_problem(determinism_case(), rng);
  auto gpu = make_cuda_backend();
  gpu->set_gemm_precision(precision);
  Side gs(*gpu, p);
  const Results a = run_side(gs, p, DType::F32);
  const Results b = run_side(gs, p, DType::F32);
  expect_bitwise_equal(*gpu, a, b, "two runs");
}

TEST(CudaLayerDeterminism, RunToRunBitwise) {
  FP8MOE_REQUIRE_GPU();
  run_to_run_bitwise(GemmPrecision::W8A16);
}

TEST(CudaLayerDeterminism, RunToRunBitwiseW8a8) {
  FP8MOE_REQUIRE_W8A8();
  run_to_run_bitwise(GemmPrecision::W8A8);
}

// Forward + backward captured on the backend's stream (temporaries become graph allocations),
// replayed twice into poisoned outputs: each replay equals the eager run bit for bit.
void capture_and_replay(GemmPrecision precision) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " precision " + gemm_precision_name(precision));
  std::mt19937_64 rng(seed);
  const HostProblem p = make_problem(determinism_case(), rng);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  {
    auto gpu = make_cuda_backend(0, stream);
    gpu->set_gemm_precision(precision);
    Side gs(*gpu, p);
    const Results eager = run_side(gs, p, DType::F32);

    const Results replayed = Results::alloc(*gpu, p, p.c.T, DType::F32);
    gpu->synchronize();
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    try {
      forward_backward(gs, replayed);
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);
      throw;
    }
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (int replay = 0; replay < 2; ++replay) {
      for (const auto& [name, t] : replayed.named())
        if (t->defined()) gpu->fill(*t, std::numeric_limits<double>::quiet_NaN());
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      gpu->synchronize();
      expect_bitwise_equal(*gpu, replayed, eager, "eager run and graph replay");
    }
    EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
    EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
    gpu->synchronize();
  }
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(CudaLayerGraph, CaptureAndReplayForwardBackward) {
  FP8MOE_REQUIRE_GPU();
  capture_and_replay(GemmPrecision::W8A16);
}

// The W8A8 path under capture: the CUTLASS set-up is host-side, its argument fill and workspace
// are stream-ordered, its temporaries graph allocations.
TEST(CudaLayerGraph, CaptureAndReplayForwardBackwardW8a8) {
  FP8MOE_REQUIRE_W8A8();
  capture_and_replay(GemmPrecision::W8A8);
}

}  // namespace
}  // namespace fp8moe

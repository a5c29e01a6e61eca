// The MoE layer on the CPU backend against the independent per-token reference (forward) and
// against central finite differences in fp64 (every gradient), for every weight format,
// activation, LoRA placement and bias, plus the routing edge cases.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/moe_test_util.hpp"
#include "engine/naive_moe.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"

namespace fp8moe {
namespace {

using namespace moetest;

constexpr double kForwardTol = 1e-12;  // fp64 engine vs fp64 reference: only summation order differs
constexpr double kGradTol = 1e-6;      // analytic vs finite differences
// Step of the 4-point central difference. Its truncation error is O(h^4), its rounding error
// ~eps |L| / h: at h = 1e-6 with the 2-point formula the rounding alone (~1e-9 for |L| ~ 10)
// reached the check's absolute floor for small gradients, and ~4% of seeds failed OneToken.
constexpr double kFdStep = 1e-5;

// True when a GPT-OSS pre-activation sits within `margin` of a clamp, where a finite difference
// would straddle the kink. Such draws are redrawn (the clamp convention itself is tested at the
// op level, in tests/backends/cpu). Also checks that the clamps are active at all.
bool near_clamp(Backend& be, const Problem& p, double margin = 20 * kFdStep) {  // the stencil reaches 2h
  if (p.w.act.kind != Activation::GptOssGlu) return false;
  MoeLayer layer(be, p.w, p.lora);
  Tensor out(DType::F64, {p.d.T, p.d.H});
  MoeSaved saved;
  layer.forward(p.inputs(), out, &saved);
  int64_t beyond = 0;
  for (double v : to_vec(saved.h1)) {
    if (std::fabs(std::fabs(v) - p.w.act.limit) < margin) return true;
    beyond += std::fabs(v) > p.w.act.limit ? 1 : 0;
  }
  if (saved.h1.numel() >= 64) EXPECT_GT(beyond, 0) << "no pre-activation reaches the clamp: the test would not cover it";
  return false;
}

Problem draw_problem(Backend& be, const Config& c, const Dims& d, std::mt19937_64& gen, std::vector<int64_t> ids = {}) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    Problem p = make_problem(c, d, gen, ids);
    if (!near_clamp(be, p)) return p;
  }
  ADD_FAILURE() << "could not draw a problem away from the GPT-OSS clamps";
  return make_problem(c, d, gen, ids);
}

void expect_forward_matches_naive(Backend& be, const Problem& p) {
  MoeLayer layer(be, p.w, p.lora);
  Tensor out = nan_tensor(DType::F64, {p.d.T, p.d.H});  // [T, H]
  MoeSaved saved;
  layer.forward(p.inputs(), out, &saved);
  EXPECT_EQ(count_nan(out), 0);
  const std::vector<double> ref = naive::moe_forward(p.w, p.lora, p.inputs());
  EXPECT_LT(rel_err(to_vec(out), ref), kForwardTol);

  // Without `saved` the layer skips the aux store; the result must not change.
  Tensor out2 = nan_tensor(DType::F64, {p.d.T, p.d.H});
  layer.forward(p.inputs(), out2);
  EXPECT_EQ(to_vec(out2), to_vec(out));
}

struct Grads {
  Tensor hidden, weights, gate_up_A, gate_up_B, down_A, down_B;
  MoeGrads view() const {
    MoeGrads g;
    g.hidden = hidden;
    g.topk_weights = weights;
    if (gate_up_A.defined()) g.lora = {gate_up_A, gate_up_B, TensorView(), TensorView()};
    if (down_A.defined()) {
      g.lora.down_A = down_A;
      g.lora.down_B = down_B;
    }
    return g;
  }
};

// Every gradient, each buffer poisoned with NaN first.
Grads run_backward(const MoeLayer& layer, const Problem& p, const Tensor& grad_out) {
  const Dims& d = p.d;
  Grads g;
  g.hidden = nan_tensor(DType::F64, {d.T, d.H});
  g.weights = nan_tensor(DType::F64, {d.T, d.k});
  if (p.lora.has_gate_up()) {
    g.gate_up_A = nan_tensor(DType::F64, p.gate_up_A.shape());
    g.gate_up_B = nan_tensor(DType::F64, p.gate_up_B.shape());
  }
  if (p.lora.has_down()) {
    g.down_A = nan_tensor(DType::F64, p.down_A.shape());
    g.down_B = nan_tensor(DType::F64, p.down_B.shape());
  }
  Tensor out(DType::F64, {d.T, d.H});
  MoeSaved saved;
  layer.forward(p.inputs(), out, &saved);
  layer.backward(p.inputs(), saved, grad_out, g.view());
  for (const Tensor* t : {&g.hidden, &g.weights, &g.gate_up_A, &g.gate_up_B, &g.down_A, &g.down_B})
    if (t->defined()) EXPECT_EQ(count_nan(*t), 0) << "a gradient kept its NaN poison";
  return g;
}

// Checks `grad` (analytic dL/dparam) at `samples` random entries of `param` against 4-point central
// differences of L = <G, forward(...)>.
void expect_fd(const MoeLayer& layer, const Problem& p, const Tensor& G, Tensor& param, const Tensor& grad,
               const char* name, std::mt19937_64& gen, int samples = 6) {
  SCOPED_TRACE(name);
  ASSERT_EQ(param.dtype(), DType::F64);
  if (param.numel() == 0) return;
  const auto loss = [&] {
    Tensor out(DType::F64, {p.d.T, p.d.H});
    layer.forward(p.inputs(), out);
    double l = 0.0;
    for (int64_t i = 0; i < out.numel(); ++i) l += G.ptr<double>()[i] * out.ptr<double>()[i];
    return l;
  };
  std::uniform_int_distribution<int64_t> pick(0, param.numel() - 1);
  std::vector<double> fd, an;
  for (int s = 0; s < samples; ++s) {
    const int64_t i = pick(gen);
    double& x = param.ptr<double>()[i];
    const double x0 = x;
    auto at = [&](double step) {
      x = x0 + step;
      return loss();
    };
    const double d1 = at(kFdStep) - at(-kFdStep), d2 = at(2 * kFdStep) - at(-2 * kFdStep);
    x = x0;
    fd.push_back((8 * d1 - d2) / (12 * kFdStep));
    an.push_back(grad.ptr<double>()[i]);
  }
  double an_norm = 0.0, err = 0.0;
  for (size_t j = 0; j < fd.size(); ++j) {
    an_norm += an[j] * an[j];
    err += (fd[j] - an[j]) * (fd[j] - an[j]);
  }
  EXPECT_LE(std::sqrt(err), kGradTol * std::max(std::sqrt(an_norm), 1e-3))
      << "analytic " << ::testing::PrintToString(an) << "\nfinite differences " << ::testing::PrintToString(fd);
}

Grads expect_gradients_match_fd(Backend& be, Problem& p, std::mt19937_64& gen) {
  const MoeLayer layer(be, p.w, p.lora);
  const Tensor G = randn(DType::F64, {p.d.T, p.d.H}, gen);  // dL/dout
  Grads g = run_backward(layer, p, G);
  expect_fd(layer, p, G, p.hidden, g.hidden, "grad hidden", gen);
  expect_fd(layer, p, G, p.weights, g.weights, "grad topk_weights", gen);
  if (p.lora.has_gate_up()) {
    expect_fd(layer, p, G, p.gate_up_A, g.gate_up_A, "grad lora gate_up_A", gen);
    expect_fd(layer, p, G, p.gate_up_B, g.gate_up_B, "grad lora gate_up_B", gen);
  }
  if (p.lora.has_down()) {
    expect_fd(layer, p, G, p.down_A, g.down_A, "grad lora down_A", gen);
    expect_fd(layer, p, G, p.down_B, g.down_B, "grad lora down_B", gen);
  }
  return g;
}

// ---- every configuration ------------------------------------------------------------------------

std::vector<Config> configurations() {
  std::vector<Config> cs;
  for (Scheme s : all_schemes())
    for (Activation a : {Activation::SiluGlu, Activation::GptOssGlu}) cs.push_back({s, a, true, true, true});
  for (Activation a : {Activation::SiluGlu, Activation::GptOssGlu}) {
    cs.push_back({Scheme::Block, a, false, false, false});
    cs.push_back({Scheme::Block, a, true, false, false});
    cs.push_back({Scheme::Block, a, false, true, false});
    cs.push_back({Scheme::Channel, a, true, true, false});
    cs.push_back({Scheme::BF16, a, false, false, true});
  }
  return cs;
}

class EngineConfig : public ::testing::TestWithParam<Config> {
 protected:
  std::unique_ptr<Backend> be_ = make_cpu_backend();
  uint64_t seed_ = fresh_seed();
  std::mt19937_64 gen_{seed_};
};

TEST_P(EngineConfig, ForwardMatchesNaiveReference) {
  SCOPED_TRACE(seed_trace(seed_));
  const Problem p = make_problem(GetParam(), Dims{}, gen_);
  expect_forward_matches_naive(*be_, p);
}

TEST_P(EngineConfig, GradientsMatchFiniteDifferences) {
  SCOPED_TRACE(seed_trace(seed_));
  Problem p = draw_problem(*be_, GetParam(), Dims{}, gen_);
  expect_gradients_match_fd(*be_, p, gen_);
}

INSTANTIATE_TEST_SUITE_P(Engine, EngineConfig, ::testing::ValuesIn(configurations()),
                         [](const ::testing::TestParamInfo<Config>& info) {
                           std::string n = info.param.name();
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// ---- routing edge cases -----------------------------------------------------------------------

class EngineEdge : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = make_cpu_backend();
  uint64_t seed_ = fresh_seed();
  std::mt19937_64 gen_{seed_};
  Config full_{Scheme::Block, Activation::SiluGlu, true, true, true};

  // Forward against the reference and every gradient against finite differences.
  Grads check_all(const Config& c, const Dims& d, std::vector<int64_t> ids = {}) {
    Problem p = draw_problem(*be_, c, d, gen_, ids);
    expect_forward_matches_naive(*be_, p);
    return expect_gradients_match_fd(*be_, p, gen_);
  }
};

TEST_F(EngineEdge, ZeroTokens) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.T = 0;
  Problem p = make_problem(full_, d, gen_);
  const MoeLayer layer(*be_, p.w, p.lora);
  Tensor out(DType::F64, {0, d.H});
  layer.forward(p.inputs(), out);
  Grads g = run_backward(layer, p, Tensor(DType::F64, {0, d.H}));
  // No rows at all: every adapter gradient is an exact zero (the NaN poison is overwritten).
  for (const Tensor* t : {&g.gate_up_A, &g.gate_up_B, &g.down_A, &g.down_B})
    for (double v : to_vec(*t)) ASSERT_EQ(v, 0.0);
}

TEST_F(EngineEdge, OneToken) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.T = 1;
  d.k = 3;
  check_all(full_, d);
  check_all({Scheme::Group, Activation::GptOssGlu, true, true, true}, d);
}

TEST_F(EngineEdge, ExpertsWithoutTokensGetZeroGradients) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.E = 6;
  d.T = 5;
  // Only experts 1 and 4 receive tokens; 0 (first), 5 (last) and 2, 3 (middle) get none.
  std::vector<int64_t> ids;
  for (int64_t t = 0; t < d.T; ++t) {
    ids.push_back(t % 2 ? 1 : 4);
    ids.push_back(t % 2 ? 4 : 1);
  }
  Grads g = check_all(full_, d, ids);
  for (const Tensor* t : {&g.gate_up_A, &g.gate_up_B, &g.down_A, &g.down_B}) {
    const std::vector<double> v = to_vec(*t);
    const int64_t per_expert = t->numel() / d.E;
    for (int64_t e : {0, 2, 3, 5})
      for (int64_t i = 0; i < per_expert; ++i) ASSERT_EQ(v[e * per_expert + i], 0.0) << "expert " << e;
    double used = 0.0;
    for (int64_t i = 0; i < per_expert; ++i) used += std::fabs(v[1 * per_expert + i]);
    EXPECT_GT(used, 0.0) << "expert 1 received tokens, its gradient cannot vanish";
  }
}

TEST_F(EngineEdge, AllTokensToOneExpert) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.k = 1;
  check_all(full_, d, std::vector<int64_t>(static_cast<size_t>(d.T), 3));
}

TEST_F(EngineEdge, SingleExpertTopOne) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.E = 1;
  d.k = 1;
  check_all(full_, d);
  check_all({Scheme::Tensor, Activation::GptOssGlu, true, true, true}, d);
}

TEST_F(EngineEdge, TokenPicksTheSameExpertTwice) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  d.k = 3;
  std::vector<int64_t> ids = random_ids(d.T, d.k, d.E, gen_);
  for (int64_t t = 0; t < d.T; t += 2) ids[t * d.k + 2] = ids[t * d.k];  // every other token: slot 2 = slot 0
  check_all(full_, d, ids);
}

TEST_F(EngineEdge, IdsOutOfRangeAreRejected) {
  SCOPED_TRACE(seed_trace(seed_));
  const Dims d;
  for (int32_t bad : {static_cast<int32_t>(d.E), -1}) {
    Problem p = make_problem(full_, d, gen_);
    p.ids.ptr<int32_t>()[3] = bad;
    const MoeLayer layer(*be_, p.w, p.lora);
    Tensor out(DType::F64, {d.T, d.H});
    try {
      layer.forward(p.inputs(), out);
      FAIL() << "an expert id of " << bad << " was accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("topk_ids"), std::string::npos) << msg;
      EXPECT_NE(msg.find("= " + std::to_string(bad)), std::string::npos) << msg;
    }
  }
}

TEST_F(EngineEdge, InputsAreValidated) {
  SCOPED_TRACE(seed_trace(seed_));
  const Dims d;
  Problem p = make_problem(full_, d, gen_);
  const MoeLayer layer(*be_, p.w, p.lora);
  Tensor out(DType::F64, {d.T, d.H});
  const auto expect_error = [&](const MoeInputs& in, const TensorView& o, const std::string& needle) {
    try {
      layer.forward(in, o);
      ADD_FAILURE() << "accepted bad input, expected an error mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  MoeInputs in = p.inputs();
  Tensor wrong_h(DType::F64, {d.T, d.H + 1});
  in.hidden = wrong_h;
  expect_error(in, out, "hidden");
  in = p.inputs();
  Tensor ids_f(DType::F32, {d.T, d.k});
  in.topk_ids = ids_f;
  expect_error(in, out, "topk_ids");
  in = p.inputs();
  Tensor w_short(DType::F64, {d.T, d.k + 1});
  in.topk_weights = w_short;
  expect_error(in, out, "topk_weights");
  Tensor out_i(DType::I32, {d.T, d.H});
  expect_error(p.inputs(), out_i, "out");

  // A gradient for an adapter the layer does not have.
  Problem q = make_problem({Scheme::Block, Activation::SiluGlu, false, true, false}, d, gen_);
  const MoeLayer no_gu(*be_, q.w, q.lora);
  MoeSaved saved;
  no_gu.forward(q.inputs(), out, &saved);
  MoeGrads g;
  Tensor ga(DType::F64, {d.E, 2, d.H});
  g.lora.gate_up_A = ga;
  try {
    no_gu.backward(q.inputs(), saved, out, g);
    ADD_FAILURE() << "a gate_up_A gradient was accepted for a layer without gate_up LoRA";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gate_up_A"), std::string::npos) << e.what();
  }
}

// Requesting a subset of the gradients skips work but must not change any value.
TEST_F(EngineEdge, PartialGradientRequestsMatchFull) {
  SCOPED_TRACE(seed_trace(seed_));
  const Dims d;
  for (Activation a : {Activation::SiluGlu, Activation::GptOssGlu}) {
    Problem p = make_problem({Scheme::Channel, a, true, true, true}, d, gen_);
    const MoeLayer layer(*be_, p.w, p.lora);
    const Tensor G = randn(DType::F64, {d.T, d.H}, gen_);
    const Grads full = run_backward(layer, p, G);
    Tensor out(DType::F64, {d.T, d.H});
    MoeSaved saved;
    layer.forward(p.inputs(), out, &saved);
    const auto single = [&](auto set, const Tensor& expected) {
      Tensor t = nan_tensor(DType::F64, expected.shape());
      MoeGrads g;
      set(g, t);
      layer.backward(p.inputs(), saved, G, g);
      EXPECT_EQ(to_vec(t), to_vec(expected));
    };
    single([](MoeGrads& g, const Tensor& t) { g.hidden = t; }, full.hidden);
    single([](MoeGrads& g, const Tensor& t) { g.topk_weights = t; }, full.weights);
    single([](MoeGrads& g, const Tensor& t) { g.lora.gate_up_A = t; }, full.gate_up_A);
    single([](MoeGrads& g, const Tensor& t) { g.lora.gate_up_B = t; }, full.gate_up_B);
    single([](MoeGrads& g, const Tensor& t) { g.lora.down_A = t; }, full.down_A);
    single([](MoeGrads& g, const Tensor& t) { g.lora.down_B = t; }, full.down_B);
  }
}

// Narrow dtypes at the boundary: BF16 hidden, F32 weights, I64 ids, F32 output.
TEST_F(EngineEdge, MixedInputDtypes) {
  SCOPED_TRACE(seed_trace(seed_));
  const Dims d;
  Problem p = make_problem(full_, d, gen_);
  Tensor hidden_bf16(DType::BF16, {d.T, d.H}), weights_f32(DType::F32, {d.T, d.k}), ids_i64(DType::I64, {d.T, d.k});
  for (int64_t i = 0; i < d.T * d.H; ++i) store_from_double(hidden_bf16.data(), DType::BF16, i, p.hidden.ptr<double>()[i]);
  for (int64_t i = 0; i < d.T * d.k; ++i) {
    store_from_double(weights_f32.data(), DType::F32, i, p.weights.ptr<double>()[i]);
    ids_i64.ptr<int64_t>()[i] = p.ids.ptr<int32_t>()[i];
  }
  const MoeInputs in{hidden_bf16, ids_i64, weights_f32};
  const MoeLayer layer(*be_, p.w, p.lora);
  Tensor out = nan_tensor(DType::F32, {d.T, d.H});
  layer.forward(in, out);
  EXPECT_EQ(count_nan(out), 0);
  // The reference on the same (rounded) inputs; the only new error is the final fp32 store.
  EXPECT_LT(rel_err(to_vec(out), naive::moe_forward(p.w, p.lora, in)), 1e-7);
}

TEST_F(EngineEdge, BackwardRejectsSavedStateOfAnotherBatch) {
  SCOPED_TRACE(seed_trace(seed_));
  Dims d;
  Problem p = make_problem(full_, d, gen_);
  d.T = 3;
  Problem small = make_problem(full_, d, gen_);
  const MoeLayer layer(*be_, p.w, p.lora);
  Tensor out(DType::F64, {d.T, d.H});
  MoeSaved saved;
  layer.forward(small.inputs(), out, &saved);
  MoeGrads g;
  Tensor gh(DType::F64, {p.d.T, d.H});
  g.hidden = gh;
  EXPECT_THROW(layer.backward(p.inputs(), saved, gh, g), Error);
  EXPECT_THROW(layer.backward(p.inputs(), MoeSaved{}, gh, g), Error);
}

// ---- the FP8 handoff from GEMM1 to GEMM2 ---------------------------------------------------------

// A backend whose GEMM2 runs on FP8 activations (takes_fp8_rows for the experts' down projection,
// as the CUDA backend's under W8A8) and that checks, at GEMM2, what the engine handed it: GEMM1 was
// asked for out_fp8, GEMM2 gets those same buffers as a.fp8 for its A = GEMM1's out, and they hold
// A's E4M3 rows (quantize_activations of A as stored). No other GEMM sees Fp8Rows.
class Fp8HandoffBackend final : public CpuDelegate {
 public:
  explicit Fp8HandoffBackend(bool takes) : takes_(takes) {}
  bool takes_fp8_rows(const GroupedGemm& g) const override { return takes_ && g.role == GemmRole::ExpertDown; }

  int handoffs = 0, stray = 0;
  Fp8Rows up_fp8;
  void* up_out = nullptr;

  void grouped_gemm(const GroupedGemm& g) override {
    if (g.role == GemmRole::ExpertUp) {
      up_fp8 = g.out_fp8, up_out = g.out.data;
    } else if (g.role == GemmRole::ExpertDown && g.a.fp8.defined()) {
      ++handoffs;
      EXPECT_EQ(g.a.fp8.codes.data, up_fp8.codes.data) << "GEMM2's codes are not the ones GEMM1 wrote";
      EXPECT_EQ(g.a.fp8.scales.data, up_fp8.scales.data);
      EXPECT_EQ(g.a.src.data, up_out) << "GEMM2's A is not GEMM1's out";
      EXPECT_EQ(g.a.rows, RowSource::Rows);
      const int64_t M = g.a.src.size(0), I = g.a.src.size(1);
      Tensor codes(DType::F8_E4M3, {M, I}), scales(DType::F32, {M, (I + 127) / 128});
      quantize_activations(g.a.src, 128, codes, scales);
      EXPECT_EQ(to_vec(g.a.fp8.scales), to_vec(scales));
      int64_t differ = 0, nonzero = 0;
      for (int64_t i = 0; i < M * I; ++i) {
        differ += static_cast<const uint8_t*>(g.a.fp8.codes.data)[i] != codes.ptr<uint8_t>()[i];
        nonzero += codes.ptr<uint8_t>()[i] != 0;
      }
      EXPECT_EQ(differ, 0) << "codes differing from A's quantization";
      EXPECT_TRUE(M == 0 || nonzero > 0);
    } else if (g.a.fp8.defined() || g.out_fp8.defined()) {
      ++stray;
    }
    if (g.role == GemmRole::ExpertDown) EXPECT_EQ(g.a.fp8.defined(), takes_);
    CpuDelegate::grouped_gemm(g);
  }

 private:
  bool takes_;
};

TEST_F(EngineEdge, Fp8HandoffFromGemm1ToGemm2) {
  SCOPED_TRACE(seed_trace(seed_));
  for (const Config& c : {full_, Config{Scheme::Channel, Activation::GptOssGlu, false, false, false}}) {
    for (const int64_t T : {int64_t{0}, int64_t{1}, int64_t{7}}) {
      SCOPED_TRACE(c.name() + ", T " + std::to_string(T));
      Dims d;
      d.T = T;
      d.I = 136;  // two 128-wide groups, the second partial
      const Problem p = make_problem(c, d, gen_);
      Tensor plain = nan_tensor(DType::F64, {T, d.H});
      MoeLayer(*be_, p.w, p.lora).forward(p.inputs(), plain);
      for (const bool takes : {true, false}) {
        Fp8HandoffBackend be(takes);
        Tensor out = nan_tensor(DType::F64, {T, d.H});
        MoeSaved saved;
        MoeLayer(be, p.w, p.lora).forward(p.inputs(), out, &saved);
        EXPECT_EQ(be.handoffs, takes ? 1 : 0);
        EXPECT_EQ(be.up_fp8.defined(), takes);
        EXPECT_EQ(be.stray, 0);
        EXPECT_EQ(to_vec(out), to_vec(plain)) << "the handoff changed the layer's output";
      }
    }
  }
}

}  // namespace
}  // namespace fp8moe

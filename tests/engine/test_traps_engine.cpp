// The engine-side traps of the reference system (../shared/docs/reference-system.md, "What went
// wrong"), on the CPU backend: LoRA adapters silently not trained (8) or dropped on gate_up (9),
// the router's fp32 dtype leaking into the expert GEMMs (10), 3-D top-k inputs, experts without
// tokens and all-zero rows (11), 32-bit plan and gather indices (14), and run-to-run or
// batch-dependent results (15). The GPU halves of these traps are covered by
// tests/backends/cuda/*; docs/traps.md says which test covers what.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/moe_test_util.hpp"
#include "engine/naive_moe.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/train.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;

namespace fp8moe {
namespace {

using namespace moetest;

// Sum of |x| over expert e's slice of a per-expert tensor [E, ...].
double expert_abs_sum(const TensorView& t, int64_t e) {
  const int64_t per = t.numel() / t.size(0);
  double s = 0.0;
  for (int64_t i = 0; i < per; ++i) s += std::fabs(load_as_double(t.data, t.dtype, e * per + i));
  return s;
}

std::vector<int32_t> ids_of(const Tensor& ids) {
  return {ids.ptr<int32_t>(), ids.ptr<int32_t>() + ids.numel()};
}

// ---- a backend that computes on the CPU oracle, records the dtype of every intermediate the
// engine hands it, and reports a chosen activation dtype (BF16 makes it allocate like CUDA).
class RecordingBackend final : public CpuDelegate {
 public:
  explicit RecordingBackend(DType activation) : activation_(activation) {}

  std::vector<std::string> log;  // "<op> <operand> <dtype>" for every engine-allocated operand

  const char* name() const override { return "recording-cpu"; }
  DType activation_dtype() const override { return activation_; }
  void grouped_gemm(const GroupedGemm& g) override {
    if (g.a.rows == RowSource::Rows) note("gemm a", g.a.src);
    if (g.lora_a.defined() && g.lora_a.rows == RowSource::Rows) note("gemm lora_a", g.lora_a.src);
    if (g.aux.defined()) note("gemm aux", g.aux);
    note("gemm out", g.out);
    CpuDelegate::grouped_gemm(g);
  }
  void grouped_outer(const GroupedOuter& g) override {
    if (g.left.rows == RowSource::Rows) note("outer left", g.left.src);
    if (g.right.rows == RowSource::Rows) note("outer right", g.right.src);
    CpuDelegate::grouped_outer(g);
  }
  void combine(const Combine& c) override {
    note("combine rows", c.rows);
    CpuDelegate::combine(c);
  }
  void pair_dot(const PairDot& d) override {
    note("pair_dot rows", d.rows);
    CpuDelegate::pair_dot(d);
  }

 private:
  void note(const char* what, const TensorView& t) { log.push_back(std::string(what) + " " + std::string(dtype_name(t.dtype))); }
  DType activation_;
};

// =============================================================================================
// Traps 8 and 9: LoRA silently not trained (0 of 192 adapter tensors got gradients) and a backend
// dropping the gate_up LoRA.

// FP8 base, all four adapters: every expert that received tokens gets a non-zero, finite gradient
// in every adapter (including an expert with a single pair); every expert without tokens gets
// exact zeros. The gate_up LoRA changes the forward output, as the independent reference says.
TEST(Trap08LoraGradients, EveryRoutedExpertGetsAllFourGradients) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  auto be = make_cpu_backend();
  Dims d;
  d.E = 7, d.T = 6, d.k = 2, d.H = 40, d.I = 24;
  // Experts 0, 3 and 6 receive tokens (6 only one pair); 1, 2, 4 and 5 none.
  const std::vector<int64_t> ids = {0, 3, 3, 0, 0, 3, 3, 6, 0, 3, 3, 0};
  const std::vector<int64_t> used = {0, 3, 6}, unused = {1, 2, 4, 5};
  for (const Scheme scheme : {Scheme::Block, Scheme::Channel}) {
    for (const Activation act : {Activation::SiluGlu, Activation::GptOssGlu}) {
      const Config c{scheme, act, true, true, false};
      SCOPED_TRACE(c.name());
      const Problem p = make_problem(c, d, gen, ids);
      ASSERT_TRUE(p.w.gate_up.quantized());
      const MoeLayer layer(*be, p.w, p.lora);
      Tensor out(DType::F64, {d.T, d.H});
      MoeSaved saved;
      layer.forward(p.inputs(), out, &saved);
      Tensor gA = nan_tensor(DType::F64, p.gate_up_A.shape()), gB = nan_tensor(DType::F64, p.gate_up_B.shape());
      Tensor dA = nan_tensor(DType::F64, p.down_A.shape()), dB = nan_tensor(DType::F64, p.down_B.shape());
      MoeGrads g;
      g.lora = {gA, gB, dA, dB};
      const Tensor G = randn(DType::F64, {d.T, d.H}, gen);
      layer.backward(p.inputs(), saved, G, g);
      const std::pair<const char*, const Tensor*> grads[] = {
          {"gate_up_A", &gA}, {"gate_up_B", &gB}, {"down_A", &dA}, {"down_B", &dB}};
      for (const auto& [name, t] : grads) {
        EXPECT_EQ(count_nan(*t), 0) << name;
        for (int64_t e : used) EXPECT_GT(expert_abs_sum(*t, e), 0.0) << name << " of expert " << e << " (received tokens)";
        for (int64_t e : unused) EXPECT_EQ(expert_abs_sum(*t, e), 0.0) << name << " of expert " << e << " (no tokens)";
      }

      // Trap 9: the gate_up adapter is part of the forward, not dropped.
      LoraAdapters no_gu = p.lora;
      no_gu.gate_up_A = TensorView();
      no_gu.gate_up_B = TensorView();
      Tensor out_no_gu(DType::F64, {d.T, d.H});
      MoeLayer(*be, p.w, no_gu).forward(p.inputs(), out_no_gu);
      EXPECT_GT(rel_err(to_vec(out_no_gu), to_vec(out)), 1e-3) << "the gate_up LoRA did not change the output";
      EXPECT_LT(rel_err(to_vec(out), naive::moe_forward(p.w, p.lora, p.inputs())), 1e-12);
      EXPECT_LT(rel_err(to_vec(out_no_gu), naive::moe_forward(p.w, no_gu, p.inputs())), 1e-12);
    }
  }
}

// Two training steps on an FP8 base: every adapter slice of every expert that received tokens
// moves (B in step 1 from its zero start, A in step 2 once B is non-zero); the slices of experts
// without tokens stay bit for bit what they were.
TEST(Trap08LoraGradients, TrainingStepsMoveEveryRoutedAdapter) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  auto be = make_cpu_backend();
  const int64_t E = 5, T = 8, k = 2, H = 24, I = 12;
  const QuantWeights gu = quantize(randn(DType::F32, {E, 2 * I, H}, gen, 0.2), ScaleSpec::block(2 * I, H, 8, 8, 2));
  const QuantWeights dn = quantize(randn(DType::F32, {E, H, I}, gen, 0.3), ScaleSpec::channel(H, I));
  ExpertWeights w;
  w.gate_up = gu.view();
  w.down = dn.view();
  // Experts 1 and 4 receive tokens; 0, 2 and 3 none.
  Tensor ids(DType::I32, {T, k});
  for (int64_t t = 0; t < T; ++t) {
    ids.ptr<int32_t>()[t * k] = t % 2 ? 1 : 4;
    ids.ptr<int32_t>()[t * k + 1] = t % 2 ? 4 : 1;
  }
  const Tensor hidden = randn(DType::F32, {T, H}, gen), weights = uniform(DType::F32, {T, k}, gen, 0.2, 1.0);
  const Tensor target = randn(DType::F32, {T, H}, gen, 0.1);
  const MoeInputs in{hidden, ids, weights};
  LoraTrainConfig cfg;
  cfg.rank = 3;
  cfg.adam.lr = 1e-2;
  cfg.seed = gen();
  LoraTrainer trainer(*be, w, cfg);
  const LoraAdapters& a = trainer.adapters();
  const auto snapshot = [&] {
    return std::vector<std::vector<double>>{to_vec(a.gate_up_A), to_vec(a.gate_up_B), to_vec(a.down_A), to_vec(a.down_B)};
  };
  const char* names[] = {"gate_up_A", "gate_up_B", "down_A", "down_B"};
  const TensorView* views[] = {&a.gate_up_A, &a.gate_up_B, &a.down_A, &a.down_B};
  const auto before = snapshot();
  trainer.step(in, target);
  trainer.step(in, target);
  const auto after = snapshot();
  for (int i = 0; i < 4; ++i) {
    const int64_t per = views[i]->numel() / E;
    for (int64_t e = 0; e < E; ++e) {
      int64_t changed = 0;
      for (int64_t j = 0; j < per; ++j) changed += before[i][e * per + j] != after[i][e * per + j];
      if (e == 1 || e == 4)
        EXPECT_GT(changed, 0) << names[i] << " of expert " << e << " received tokens but did not move";
      else
        EXPECT_EQ(changed, 0) << names[i] << " of expert " << e << " received no tokens but moved";
    }
  }
}

// =============================================================================================
// Trap 10: the router's fp32 dtype leaked into the expert GEMMs.

// BF16 hidden with F32 routing weights on a backend whose activation dtype is BF16 (as CUDA's):
// every intermediate the engine allocates is BF16 whatever the weights' dtype, the output has the
// caller's dtype, and the result equals the all-BF16 run exactly when the weights hold the same
// values, and within the weights' BF16 rounding when they do not.
TEST(Trap10RouterDtype, F32RoutingWeightsDoNotChangeActivationDtypes) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  Dims d;
  d.T = 9, d.k = 2, d.E = 4, d.H = 40, d.I = 24;
  const Problem p = make_problem({Scheme::Block, Activation::SiluGlu, true, true, false}, d, gen);
  Tensor hidden(DType::BF16, {d.T, d.H});
  for (int64_t i = 0; i < hidden.numel(); ++i)
    store_from_double(hidden.data(), DType::BF16, i, p.hidden.ptr<double>()[i]);
  Tensor w_bf16(DType::BF16, {d.T, d.k}), w_f32_same(DType::F32, {d.T, d.k}), w_f32(DType::F32, {d.T, d.k});
  for (int64_t i = 0; i < d.T * d.k; ++i) {
    const double v = p.weights.ptr<double>()[i];
    store_from_double(w_bf16.data(), DType::BF16, i, v);
    w_f32_same.ptr<float>()[i] = static_cast<float>(load_as_double(w_bf16.data(), DType::BF16, i));
    w_f32.ptr<float>()[i] = static_cast<float>(v);
  }

  struct Run {
    Tensor out, grad_hidden;
    std::vector<std::string> log;
    DType h1, act, y;
  };
  const auto run = [&](const Tensor& weights) {
    RecordingBackend be(DType::BF16);
    const MoeLayer layer(be, p.w, p.lora);
    Run r;
    r.out = nan_tensor(DType::BF16, {d.T, d.H});
    r.grad_hidden = nan_tensor(DType::BF16, {d.T, d.H});
    const MoeInputs in{hidden, p.ids, weights};
    MoeSaved saved;
    layer.forward(in, r.out, &saved);
    r.h1 = saved.h1.dtype(), r.act = saved.act.dtype(), r.y = saved.y.dtype();
    Tensor G(DType::BF16, {d.T, d.H});
    for (int64_t i = 0; i < G.numel(); ++i) store_from_double(G.data(), DType::BF16, i, std::sin(0.37 * static_cast<double>(i)));
    Tensor gw = nan_tensor(weights.dtype(), {d.T, d.k});
    MoeGrads g;
    g.hidden = r.grad_hidden;
    g.topk_weights = gw;
    layer.backward(in, saved, G, g);
    EXPECT_EQ(count_nan(gw), 0);
    r.log = be.log;
    return r;
  };
  const Run bf = run(w_bf16), same = run(w_f32_same), f32 = run(w_f32);
  for (const Run* r : {&bf, &same, &f32}) {
    EXPECT_EQ(dtype_name(r->h1), "BF16");
    EXPECT_EQ(dtype_name(r->act), "BF16");
    EXPECT_EQ(dtype_name(r->y), "BF16");
    EXPECT_EQ(dtype_name(r->out.dtype()), "BF16");
    ASSERT_FALSE(r->log.empty());
    for (const std::string& entry : r->log) EXPECT_NE(entry.find(" BF16"), std::string::npos) << entry;
    EXPECT_EQ(count_nan(r->out), 0);
    EXPECT_EQ(count_nan(r->grad_hidden), 0);
  }
  EXPECT_EQ(same.log, bf.log);
  EXPECT_EQ(f32.log, bf.log);
  EXPECT_EQ(to_vec(same.out), to_vec(bf.out));
  EXPECT_EQ(to_vec(same.grad_hidden), to_vec(bf.grad_hidden));
  // Unrounded fp32 weights differ from their BF16 copies by at most 2^-9 relative; through BF16
  // intermediates the outputs then agree to BF16 precision.
  EXPECT_LT(rel_err(to_vec(f32.out), to_vec(bf.out)), 1e-2);
  EXPECT_LT(rel_err(to_vec(f32.grad_hidden), to_vec(bf.grad_hidden)), 1e-2);

  // The CPU oracle keeps its own activation dtype (F64) for every weights dtype.
  auto cpu = make_cpu_backend();
  for (const Tensor* weights : {&w_bf16, &w_f32}) {
    MoeSaved saved;
    Tensor out(DType::BF16, {d.T, d.H});
    MoeLayer(*cpu, p.w, p.lora).forward({hidden, p.ids, *weights}, out, &saved);
    EXPECT_EQ(dtype_name(saved.h1.dtype()), "F64");
    EXPECT_EQ(dtype_name(saved.y.dtype()), "F64");
  }
}

// =============================================================================================
// Trap 11: 3-D top-k tensors not flattened; experts with zero tokens; all-zero rows quantized to NaN.

// The layer takes [T, k] only. A [B, S, k] top-k (or [B, S, H] hidden) is refused with a message
// saying what was expected; the caller flattens to [B*S, k] (a free reshape), which gives exactly
// the per-sequence results.
TEST(Trap11TopkRank, ThreeDimensionalInputsAreRefusedAndFlatteningIsExact) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  auto be = make_cpu_backend();
  Dims d;
  d.T = 8, d.k = 2, d.E = 4, d.H = 40, d.I = 24;
  const int64_t B = 2, S = 4;
  const Problem p = make_problem({Scheme::Channel, Activation::SiluGlu, true, true, false}, d, gen);
  const MoeLayer layer(*be, p.w, p.lora);
  Tensor out(DType::F64, {d.T, d.H});

  const TensorView ids3 = p.ids.view().reshape({B, S, d.k});
  const TensorView hidden3 = p.hidden.view().reshape({B, S, d.H});
  const TensorView weights3 = p.weights.view().reshape({B, S, d.k});
  expect_error([&] { layer.forward({p.hidden, ids3, p.weights}, out); }, {"topk_ids", "expected [T, k]", "[2, 4, 2]"});
  expect_error([&] { layer.forward({hidden3, p.ids, p.weights}, out); }, {"hidden", "expected [T, H]", "[2, 4, 40]"});
  expect_error([&] { layer.forward({p.hidden, p.ids, weights3}, out); }, {"topk_weights", "expected shape [8, 2]"});
  RoutingPlan plan;
  expect_error([&] { be->build_plan(ids3, d.E, plan); }, {"build_plan", "topk_ids must be [T, k]"});

  // Flattened [B*S, k]: each sequence's rows equal running that sequence alone.
  layer.forward({hidden3.reshape({B * S, d.H}), ids3.reshape({B * S, d.k}), weights3.reshape({B * S, d.k})}, out);
  const std::vector<double> all = to_vec(out);
  for (int64_t b = 0; b < B; ++b) {
    const auto rows = [&](const Tensor& t, int64_t cols) {
      const int64_t es = dtype_size(t.dtype());
      return TensorView(static_cast<char*>(t.data()) + b * S * cols * es, t.dtype(), {S, cols});
    };
    Tensor part(DType::F64, {S, d.H});
    layer.forward({rows(p.hidden, d.H), rows(p.ids, d.k), rows(p.weights, d.k)}, part);
    const std::vector<double> v = to_vec(part);
    EXPECT_EQ(v, std::vector<double>(all.begin() + b * S * d.H, all.begin() + (b + 1) * S * d.H)) << "sequence " << b;
  }
}

// Dynamic activation quantization of all-zero rows and groups, signed zeros and values too small
// for any fp8 scale: scales stay finite and positive, codes decode to finite values, zeros stay
// exact zeros; e4m3 and e5m2, per row and per 128-group, BF16 and F32 inputs. Outputs are
// poisoned first.
TEST(Trap11ZeroRows, AllZeroRowsNeverQuantizeToNan) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  const int64_t M = 6, K = 300;
  for (const DType xt : {DType::BF16, DType::F32}) {
    Tensor x = randn(xt, {M, K}, gen);
    for (int64_t k = 0; k < K; ++k) store_from_double(x.data(), xt, 1 * K + k, 0.0);                 // all zero
    for (int64_t k = 0; k < K; ++k) store_from_double(x.data(), xt, 2 * K + k, -0.0);                // negative zeros
    for (int64_t k = 128; k < 256; ++k) store_from_double(x.data(), xt, 3 * K + k, 0.0);             // one zero group
    for (int64_t k = 0; k < K; ++k) store_from_double(x.data(), xt, 4 * K + k, (k % 2 ? 1 : -1) * 1e-38);  // tiny
    for (const int64_t group : {int64_t{0}, int64_t{128}}) {
      for (const DType ct : {DType::F8_E4M3, DType::F8_E5M2}) {
        SCOPED_TRACE(std::string(dtype_name(xt)) + " -> " + std::string(dtype_name(ct)) + " group " + std::to_string(group));
        const int64_t groups = group == 0 ? 1 : (K + group - 1) / group;
        Tensor codes(ct, {M, K}), scales = nan_tensor(DType::F32, {M, groups});
        std::memset(codes.data(), 0xFF, static_cast<size_t>(codes.nbytes()));  // NaN codes in both formats
        quantize_activations(x, group, codes, scales);
        const bool e5m2 = ct == DType::F8_E5M2;
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t j = 0; j < groups; ++j) {
            const float s = scales.ptr<float>()[m * groups + j];
            ASSERT_TRUE(std::isfinite(s) && s > 0.0f) << "row " << m << " group " << j << " scale " << s;
          }
          for (int64_t kk = 0; kk < K; ++kk) {
            const double c = decode_fp8(codes.ptr<uint8_t>()[m * K + kk], e5m2);
            ASSERT_TRUE(std::isfinite(c)) << "row " << m << " k " << kk;
            const double xv = load_as_double(x.data(), xt, m * K + kk);
            if (xv == 0.0) ASSERT_EQ(c, 0.0) << "row " << m << " k " << kk;
            const double back = c * scales.ptr<float>()[m * groups + (group == 0 ? 0 : kk / group)];
            ASSERT_TRUE(std::isfinite(back));
          }
        }
      }
    }
  }
}

// A token whose hidden row is all zeros, next to experts that receive no token at all: every
// output and gradient is finite and the unused experts' adapter gradients are exactly zero.
TEST(Trap11ZeroRows, ZeroTokenRowAndEmptyExpertsThroughTheLayer) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  auto be = make_cpu_backend();
  Dims d;
  d.T = 5, d.k = 2, d.E = 6, d.H = 40, d.I = 24;
  const std::vector<int64_t> ids = {2, 5, 5, 2, 2, 5, 5, 2, 2, 5};  // experts 0, 1, 3, 4 get nothing
  Problem p = make_problem({Scheme::Block, Activation::SiluGlu, true, true, true}, d, gen, ids);
  for (int64_t h = 0; h < d.H; ++h) p.hidden.ptr<double>()[2 * d.H + h] = 0.0;
  const MoeLayer layer(*be, p.w, p.lora);
  Tensor out = nan_tensor(DType::F64, {d.T, d.H});
  MoeSaved saved;
  layer.forward(p.inputs(), out, &saved);
  EXPECT_EQ(count_nan(out), 0);
  EXPECT_LT(rel_err(to_vec(out), naive::moe_forward(p.w, p.lora, p.inputs())), 1e-12);
  Tensor gh = nan_tensor(DType::F64, {d.T, d.H}), gw = nan_tensor(DType::F64, {d.T, d.k});
  Tensor gA = nan_tensor(DType::F64, p.gate_up_A.shape()), gB = nan_tensor(DType::F64, p.gate_up_B.shape());
  Tensor dA = nan_tensor(DType::F64, p.down_A.shape()), dB = nan_tensor(DType::F64, p.down_B.shape());
  MoeGrads g;
  g.hidden = gh;
  g.topk_weights = gw;
  g.lora = {gA, gB, dA, dB};
  layer.backward(p.inputs(), saved, randn(DType::F64, {d.T, d.H}, gen), g);
  for (const Tensor* t : {&gh, &gw, &gA, &gB, &dA, &dB}) EXPECT_EQ(count_nan(*t), 0);
  for (const Tensor* t : {&gA, &gB, &dA, &dB})
    for (int64_t e : {0, 1, 3, 4}) EXPECT_EQ(expert_abs_sum(*t, e), 0.0) << "expert " << e;
}

// =============================================================================================
// Trap 14: int32 indexing overflowed past 2^31 elements.

// Anonymous memory reserved but not committed: huge views cost nothing until touched. Null when
// the system refuses the reservation.
struct Reserved {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Reserved(size_t n) : bytes(n) {
    p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) p = nullptr;
  }
  ~Reserved() {
    if (p) ::munmap(p, bytes);
  }
  Reserved(const Reserved&) = delete;
  Reserved& operator=(const Reserved&) = delete;
};

// T * k = 2^31 (token, slot) pairs do not fit the I32 routing plan: build_plan and the layer refuse
// them with a message that says so, before reading a single id.
TEST(Trap14LargeIndices, PlanRefusesPairCountsPast2Pow31) {
  const int64_t T = int64_t{1} << 30, k = 2, E = 4, H = 8, I = 4;
  Reserved ids_mem(static_cast<size_t>(T * k * 4)), hidden_mem(static_cast<size_t>(T * H * 4));
  if (!ids_mem.p || !hidden_mem.p) GTEST_SKIP() << "cannot reserve 8 + 32 GiB of address space here";
  const TensorView ids(ids_mem.p, DType::I32, {T, k}), hidden(hidden_mem.p, DType::F32, {T, H});
  auto be = make_cpu_backend();
  RoutingPlan plan;
  expect_error([&] { be->build_plan(ids, E, plan); }, {"2147483648", "overflow the I32 plan"});

  Tensor gu(DType::BF16, {E, 2 * I, H}), dn(DType::BF16, {E, H, I});
  ExpertWeights w;
  w.gate_up = {gu.view(), TensorView(), ScaleSpec::none(2 * I, H)};
  w.down = {dn.view(), TensorView(), ScaleSpec::none(H, I)};
  const MoeLayer layer(*be, w);
  expect_error([&] { layer.forward({hidden, ids, TensorView(ids_mem.p, DType::F32, {T, k})}, hidden); },
               {"overflow the I32 plan"});
}

// The layer reads its input and writes its output through row strides whose element offsets pass
// 2^31 and 2^32 (rows 1 and 2): forward and backward equal the run on compact copies bit for bit.
TEST(Trap14LargeIndices, StridedRowsPast2Pow32Elements) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  Dims d;
  d.T = 3, d.k = 2, d.E = 3, d.H = 40, d.I = 24;
  const Problem p = make_problem({Scheme::Block, Activation::SiluGlu, true, true, true}, d, gen);
  const int64_t stride = (int64_t{1} << 31) + (int64_t{1} << 30) + 7;  // elements between rows
  const size_t span = static_cast<size_t>((d.T - 1) * stride + d.H) * sizeof(double);
  Reserved in_mem(span), out_mem(span), grad_mem(span);
  if (!in_mem.p || !out_mem.p || !grad_mem.p) GTEST_SKIP() << "cannot reserve 3 x 51 GiB of address space here";
  const auto strided = [&](void* base) {
    TensorView v(base, DType::F64, {d.T, d.H});
    v.strides[0] = stride;
    return v;
  };
  const TensorView hidden = strided(in_mem.p), out = strided(out_mem.p), grad_hidden = strided(grad_mem.p);
  ASSERT_GT((d.T - 1) * hidden.strides[0], int64_t{1} << 32);
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t h = 0; h < d.H; ++h) {
      static_cast<double*>(hidden.data)[t * stride + h] = p.hidden.ptr<double>()[t * d.H + h];
      static_cast<double*>(out.data)[t * stride + h] = std::nan("");
      static_cast<double*>(grad_hidden.data)[t * stride + h] = std::nan("");
    }

  auto be = make_cpu_backend();
  const MoeLayer layer(*be, p.w, p.lora);
  const Tensor G = randn(DType::F64, {d.T, d.H}, gen);
  const auto run = [&](const TensorView& x, const TensorView& o, const TensorView& gx) {
    const MoeInputs in{x, p.ids, p.weights};
    MoeSaved saved;
    layer.forward(in, o, &saved);
    Tensor gA(DType::F64, p.gate_up_A.shape());
    MoeGrads g;
    g.hidden = gx;
    g.lora.gate_up_A = gA;  // reads the input through the plan again
    layer.backward(in, saved, G, g);
    return to_vec(gA);
  };
  Tensor out_c(DType::F64, {d.T, d.H}), gx_c(DType::F64, {d.T, d.H});
  const std::vector<double> gA_c = run(p.hidden, out_c, gx_c);
  const std::vector<double> gA_s = run(hidden, out, grad_hidden);
  EXPECT_EQ(gA_s, gA_c);
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t h = 0; h < d.H; ++h) {
      ASSERT_EQ(static_cast<double*>(out.data)[t * stride + h], out_c.ptr<double>()[t * d.H + h]) << "out " << t << ", " << h;
      ASSERT_EQ(static_cast<double*>(grad_hidden.data)[t * stride + h], gx_c.ptr<double>()[t * d.H + h])
          << "grad hidden " << t << ", " << h;
    }
}

// =============================================================================================
// Trap 15: non-deterministic index_add_ in BF16 for the combine step.

// Forward and backward twice on a BF16-activation backend, BF16 outputs: bit for bit the same.
// And each token's output does not depend on the rest of the batch: the combine sums a token's k
// rows in slot order, so reordering and extending the batch leaves every token's row unchanged.
TEST(Trap15Determinism, RunToRunAndBatchIndependentCombine) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 gen(seed);
  Dims d;
  d.T = 12, d.k = 3, d.E = 5, d.H = 40, d.I = 24;
  const Problem p = make_problem({Scheme::Block, Activation::SiluGlu, true, true, false}, d, gen);
  Tensor hidden(DType::BF16, {d.T, d.H}), weights(DType::BF16, {d.T, d.k});
  for (int64_t i = 0; i < hidden.numel(); ++i) store_from_double(hidden.data(), DType::BF16, i, p.hidden.ptr<double>()[i]);
  for (int64_t i = 0; i < weights.numel(); ++i) store_from_double(weights.data(), DType::BF16, i, p.weights.ptr<double>()[i]);
  RecordingBackend be(DType::BF16);
  const MoeLayer layer(be, p.w, p.lora);
  const auto run = [&](const MoeInputs& in) {
    const int64_t T = in.hidden.size(0);
    Tensor out = nan_tensor(DType::BF16, {T, d.H}), gx = nan_tensor(DType::BF16, {T, d.H});
    MoeSaved saved;
    layer.forward(in, out, &saved);
    Tensor G(DType::BF16, {T, d.H});
    for (int64_t i = 0; i < G.numel(); ++i) store_from_double(G.data(), DType::BF16, i, std::cos(0.11 * static_cast<double>(i)));
    MoeGrads g;
    g.hidden = gx;
    layer.backward(in, saved, G, g);
    return std::pair{to_vec(out), to_vec(gx)};
  };
  const auto a = run({hidden, p.ids, weights}), b = run({hidden, p.ids, weights});
  EXPECT_EQ(a.first, b.first);
  EXPECT_EQ(a.second, b.second);

  // The batch reversed, with T extra tokens routed to the same experts in front.
  const int64_t T2 = 2 * d.T;
  Tensor h2(DType::BF16, {T2, d.H}), w2(DType::BF16, {T2, d.k}), i2(DType::I32, {T2, d.k});
  const std::vector<int32_t> ids = ids_of(p.ids);
  for (int64_t t = 0; t < T2; ++t) {
    const int64_t src = t < d.T ? (t * 5) % d.T : d.T - 1 - (t - d.T);  // extra tokens first, then reversed
    std::memcpy(static_cast<char*>(h2.data()) + t * d.H * 2, static_cast<char*>(hidden.data()) + src * d.H * 2,
                static_cast<size_t>(d.H * 2));
    std::memcpy(static_cast<char*>(w2.data()) + t * d.k * 2, static_cast<char*>(weights.data()) + src * d.k * 2,
                static_cast<size_t>(d.k * 2));
    for (int64_t j = 0; j < d.k; ++j) i2.ptr<int32_t>()[t * d.k + j] = ids[src * d.k + j];
  }
  const std::vector<double> out2 = run({h2, i2, w2}).first;
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t t2 = T2 - 1 - t;
    for (int64_t h = 0; h < d.H; ++h)
      ASSERT_EQ(out2[t2 * d.H + h], a.first[t * d.H + h]) << "token " << t << " changed with the batch around it";
  }
}

}  // namespace
}  // namespace fp8moe

// Test helpers for the MoE layer: fresh random problems in every weight format, NaN poisoning,
// and comparison metrics. Header-only; shared by tests/engine and tests/backends/cpu.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/backend.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "test_support.hpp"

namespace fp8moe::moetest {

// A seed drawn fresh each run; tests print it with SCOPED_TRACE so a failure can be replayed.
using ::fp8moe::test::fresh_seed;
inline std::string seed_trace(uint64_t seed) { return "seed " + std::to_string(seed); }

// Row-major host tensor of i.i.d. N(0, stddev^2) values.
inline Tensor randn(DType dtype, Shape shape, std::mt19937_64& gen, double stddev = 1.0) {
  Tensor t(dtype, shape);
  std::normal_distribution<double> nd(0.0, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, nd(gen));
  return t;
}
inline Tensor uniform(DType dtype, Shape shape, std::mt19937_64& gen, double lo, double hi) {
  Tensor t(dtype, shape);
  std::uniform_real_distribution<double> ud(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, ud(gen));
  return t;
}
inline Tensor nan_tensor(DType dtype, Shape shape) {
  Tensor t(dtype, shape);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, std::nan(""));
  return t;
}
inline std::vector<double> to_vec(const TensorView& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = load_as_double(t.data, t.dtype, i);
  return v;
}
inline int64_t count_nan(const TensorView& t) {
  int64_t n = 0;
  for (double v : to_vec(t)) n += std::isnan(v) ? 1 : 0;
  return n;
}
// ||a - b|| / ||b|| (Frobenius); 0 when both are empty or zero.
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (num == 0.0) return 0.0;
  return std::sqrt(num) / std::sqrt(den);
}

// ---- problem configurations -------------------------------------------------------------------

enum class Scheme { BF16, Tensor, Channel, Block, BlockSeg2, Group };
inline const char* scheme_name(Scheme s) {
  switch (s) {
    case Scheme::BF16: return "bf16";
    case Scheme::Tensor: return "fp8_tensor";
    case Scheme::Channel: return "fp8_channel";
    case Scheme::Block: return "fp8_block128";
    case Scheme::BlockSeg2: return "fp8_block128_seg2";
    case Scheme::Group: return "fp8_group32";
  }
  return "?";
}
inline std::vector<Scheme> all_schemes() {
  return {Scheme::BF16, Scheme::Tensor, Scheme::Channel, Scheme::Block, Scheme::BlockSeg2, Scheme::Group};
}

struct Config {
  Scheme scheme = Scheme::Block;
  Activation act = Activation::SiluGlu;  // SiluGlu uses Halves, GptOssGlu Interleaved (as the models)
  bool lora_gate_up = true;
  bool lora_down = true;
  bool bias = false;
  std::string name() const {
    return std::string(scheme_name(scheme)) + (act == Activation::SiluGlu ? " silu/halves" : " gptoss/interleaved") +
           (lora_gate_up ? " +lora_gu" : "") + (lora_down ? " +lora_down" : "") + (bias ? " +bias" : "");
  }
};

struct Dims {
  int64_t T = 7, k = 2, E = 5, H = 200, I = 72;  // H, I not multiples of the 128 block
  int64_t r_gu = 3, r_down = 2;                  // different ranks catch a mixed-up adapter
};

// Everything one layer call needs, owned, on the host. The layer's views point into it, so
// perturbing a tensor in place (finite differences) changes what the layer computes.
struct Problem {
  Dims d;
  QuantWeights gate_up, down;
  Tensor gate_up_bias, down_bias;                         // [E, 2I], [E, H]
  Tensor gate_up_A, gate_up_B, down_A, down_B;            // F64 adapters
  Tensor hidden, ids, weights;                            // [T, H] F64, [T, k] I32, [T, k] F64
  ExpertWeights w;
  LoraAdapters lora;
  MoeInputs inputs() const { return {hidden, ids, weights}; }
};

inline QuantWeights make_weight(Scheme s, int64_t E, int64_t N, int64_t K, bool stacked_gate_up,
                                std::mt19937_64& gen) {
  Tensor f = randn(DType::F32, {E, N, K}, gen, 1.0 / std::sqrt(static_cast<double>(K)));
  switch (s) {
    case Scheme::BF16: {
      QuantWeights q;
      q.data = Tensor(DType::BF16, {E, N, K});
      for (int64_t i = 0; i < f.numel(); ++i)
        store_from_double(q.data.data(), DType::BF16, i, load_as_double(f.data(), DType::F32, i));
      q.spec = ScaleSpec::none(N, K);
      return q;
    }
    case Scheme::Tensor: return quantize(f, ScaleSpec::tensor(N, K, stacked_gate_up ? 2 : 1));
    case Scheme::Channel: return quantize(f, ScaleSpec::channel(N, K));
    case Scheme::Block: return quantize(f, ScaleSpec::block(N, K, 128, 128));
    case Scheme::BlockSeg2: return quantize(f, ScaleSpec::block(N, K, 128, 128, stacked_gate_up ? 2 : 1));
    case Scheme::Group: return quantize(f, ScaleSpec::group(N, K, 32));
  }
  return {};
}

// Distinct experts per token, drawn at random.
inline std::vector<int64_t> random_ids(int64_t T, int64_t k, int64_t E, std::mt19937_64& gen) {
  std::vector<int64_t> ids;
  std::vector<int64_t> perm(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    ids.insert(ids.end(), perm.begin(), perm.begin() + k);
  }
  return ids;
}

// A random problem; `ids` (row-major [T, k]) defaults to distinct random experts per token.
inline Problem make_problem(const Config& c, const Dims& d, std::mt19937_64& gen, std::vector<int64_t> ids = {}) {
  Problem p;
  p.d = d;
  const int64_t E = d.E, H = d.H, I = d.I;
  p.gate_up = make_weight(c.scheme, E, 2 * I, H, true, gen);
  p.down = make_weight(c.scheme, E, H, I, false, gen);
  p.w.gate_up = p.gate_up.view();
  p.w.down = p.down.view();
  if (c.act == Activation::GptOssGlu) {
    // A low clamp so that a good share of gate/up values lands beyond it and the clamps matter.
    p.w.act = {Activation::GptOssGlu, GateUpLayout::Interleaved, 1.702f, 1.0f};
  } else {
    p.w.act = {Activation::SiluGlu, GateUpLayout::Halves};
  }
  if (c.bias) {
    p.gate_up_bias = randn(DType::F32, {E, 2 * I}, gen, 0.5);
    p.down_bias = randn(DType::F32, {E, H}, gen, 0.5);
    p.w.gate_up_bias = p.gate_up_bias;
    p.w.down_bias = p.down_bias;
  }
  p.lora.scaling = 2.0;
  if (c.lora_gate_up) {
    p.gate_up_A = randn(DType::F64, {E, d.r_gu, H}, gen, 1.0 / std::sqrt(static_cast<double>(H)));
    p.gate_up_B = randn(DType::F64, {E, 2 * I, d.r_gu}, gen, 0.3);
    p.lora.gate_up_A = p.gate_up_A;
    p.lora.gate_up_B = p.gate_up_B;
  }
  if (c.lora_down) {
    p.down_A = randn(DType::F64, {E, d.r_down, I}, gen, 1.0 / std::sqrt(static_cast<double>(I)));
    p.down_B = randn(DType::F64, {E, H, d.r_down}, gen, 0.3);
    p.lora.down_A = p.down_A;
    p.lora.down_B = p.down_B;
  }
  p.hidden = randn(DType::F64, {d.T, H}, gen);
  if (ids.empty()) ids = random_ids(d.T, d.k, E, gen);
  p.ids = Tensor(DType::I32, {d.T, d.k});
  for (int64_t i = 0; i < d.T * d.k; ++i) p.ids.ptr<int32_t>()[i] = static_cast<int32_t>(ids[i]);
  p.weights = uniform(DType::F64, {d.T, d.k}, gen, 0.1, 1.0);
  return p;
}

// A backend that computes on the CPU oracle; tests derive from it to watch or steer what the
// engine hands a backend (every operation is virtual: override the ones a test looks at).
class CpuDelegate : public Backend {
 public:
  CpuDelegate() : inner_(make_cpu_backend()) {}

  const char* name() const override { return "cpu-delegate"; }
  Device device() const override { return Device::CPU; }
  DType activation_dtype() const override { return inner_->activation_dtype(); }
  Allocator& own_allocator() override { return inner_->allocator(); }
  void copy(const TensorView& dst, const TensorView& src) override { inner_->copy(dst, src); }
  void fill(const TensorView& t, double value) override { inner_->fill(t, value); }
  void synchronize() override {}
  void build_plan(const TensorView& ids, int64_t experts, RoutingPlan& plan) override {
    inner_->build_plan(ids, experts, plan);
  }
  void identity_plan(int64_t rows, RoutingPlan& plan) override { inner_->identity_plan(rows, plan); }
  void grouped_gemm(const GroupedGemm& g) override { inner_->grouped_gemm(g); }
  void grouped_outer(const GroupedOuter& g) override { inner_->grouped_outer(g); }
  void combine(const Combine& c) override { inner_->combine(c); }
  void pair_dot(const PairDot& d) override { inner_->pair_dot(d); }
  void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& w) override {
    inner_->route(r, logits, ids, w);
  }
  void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& gw,
                      const TensorView& gl) override {
    inner_->route_backward(r, logits, ids, gw, gl);
  }

 private:
  std::unique_ptr<Backend> inner_;
};

}  // namespace fp8moe::moetest

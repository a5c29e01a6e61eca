// PEFT flattened expert LoRA <-> per-expert layout (src/model/lora.cpp).
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "fp8moe/lora.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;
using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

Tensor random(DType dt, Shape s, std::mt19937_64& g) {
  std::normal_distribution<double> d(0.0, 1.0);
  Tensor t(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, d(g));
  return t;
}

double get(const Tensor& t, int64_t i) { return load_as_double(t.data(), t.dtype(), i); }

// A base ExpertWeights with only shapes (the layout comes from it).
struct Base {
  Tensor gu, dn;
  ExpertWeights w;
  Base(int64_t E, int64_t H, int64_t I) : gu(DType::BF16, Shape{E, 2 * I, H}), dn(DType::BF16, Shape{E, H, I}) {
    w.gate_up = {gu.view(), {}, ScaleSpec::none(2 * I, H)};
    w.down = {dn.view(), {}, ScaleSpec::none(H, I)};
  }
};

// Import against the definition, then export back bit for bit; in > out (down: I 24 -> H 16).
TEST(LoraPeft, ImportMatchesTheDefinitionAndRoundTrips) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const int64_t E = 5, H = 16, I = 24, r = 3;
  const Base base(E, H, I);
  for (const LoraProjection proj : {LoraProjection::GateUp, LoraProjection::Down}) {
    SCOPED_TRACE(lora_projection_name(proj));
    const PeftExpertLoraLayout l = PeftExpertLoraLayout::of(base.w, proj, r, "model.layers.1.mlp.experts");
    const int64_t in = proj == LoraProjection::GateUp ? H : I, out = proj == LoraProjection::GateUp ? 2 * I : H;
    EXPECT_EQ(l.in_features, in);
    EXPECT_EQ(l.out_features, out);
    for (const DType dt : {DType::F32, DType::BF16}) {
      const Tensor la = random(dt, Shape{E * r, in}, g), lb = random(dt, Shape{out, E * r}, g);
      const ExpertLoraPair p = import_peft_expert_lora(l, la, lb);
      ASSERT_EQ(p.A.shape(), (Shape{E, r, in}));
      ASSERT_EQ(p.B.shape(), (Shape{E, out, r}));
      for (int64_t e = 0; e < E; ++e)
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t i = 0; i < in; ++i) ASSERT_EQ(get(p.A, (e * r + q) * in + i), get(la, (e * r + q) * in + i));
          for (int64_t o = 0; o < out; ++o) ASSERT_EQ(get(p.B, (e * out + o) * r + q), get(lb, o * E * r + q * E + e));
        }
      const PeftLoraPair back = export_peft_expert_lora(l, p.A, p.B);
      EXPECT_EQ(std::memcmp(back.lora_A.data(), la.data(), static_cast<size_t>(la.nbytes())), 0);
      EXPECT_EQ(std::memcmp(back.lora_B.data(), lb.data(), static_cast<size_t>(lb.nbytes())), 0);
    }
  }
}

// Hand-built: E = 2, r = 2, out = 2. lora_B columns are (q0 e0, q0 e1, q1 e0, q1 e1). Reading them
// expert-major would hand expert 0 the columns of (q0 e0, q0 e1): the wrong pairing.
TEST(LoraPeft, BIsExpertFastNotExpertMajor) {
  PeftExpertLoraLayout l;
  l.name = "x";
  l.projection = LoraProjection::Down;
  l.experts = 2, l.rank = 2, l.in_features = 3, l.out_features = 2;
  Tensor a(DType::F32, Shape{4, 3}), b(DType::F32, Shape{2, 4});
  for (int64_t i = 0; i < 12; ++i) a.ptr<float>()[i] = static_cast<float>(i);
  // lora_B[o][c] = 10 * o + c
  for (int64_t o = 0; o < 2; ++o)
    for (int64_t c = 0; c < 4; ++c) b.ptr<float>()[o * 4 + c] = static_cast<float>(10 * o + c);
  const ExpertLoraPair p = import_peft_expert_lora(l, a, b);
  // B_e[o][q] = lora_B[o][q * E + e]
  const float want_b[2][2][2] = {{{0, 2}, {10, 12}}, {{1, 3}, {11, 13}}};
  for (int e = 0; e < 2; ++e)
    for (int o = 0; o < 2; ++o)
      for (int q = 0; q < 2; ++q) EXPECT_EQ(p.B.ptr<float>()[(e * 2 + o) * 2 + q], want_b[e][o][q]) << e << o << q;
  // A_1 = rows 2..3
  EXPECT_EQ(p.A.ptr<float>()[1 * 6 + 0], 6.0f);
  EXPECT_EQ(p.A.ptr<float>()[1 * 6 + 5], 11.0f);
}

// Square experts (in == out): orientation comes from the declared layout only; a transposed
// operand of the right element count is still refused when its shape differs.
TEST(LoraPeft, SquareExpertsAndShapeErrors) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 g(seed);
  const int64_t E = 3, H = 8, I = 8, r = 2;
  const Base base(E, H, I);
  const PeftExpertLoraLayout l = PeftExpertLoraLayout::of(base.w, LoraProjection::Down, r, "m.down");
  const Tensor la = random(DType::F32, Shape{E * r, I}, g), lb = random(DType::F32, Shape{H, E * r}, g);
  const ExpertLoraPair p = import_peft_expert_lora(l, la, lb);
  const PeftLoraPair back = export_peft_expert_lora(l, p.A, p.B);
  EXPECT_EQ(std::memcmp(back.lora_B.data(), lb.data(), static_cast<size_t>(lb.nbytes())), 0);

  // lora_A given as [in, E*r] (the transpose: same numel)
  expect_error([&] { import_peft_expert_lora(l, lb, lb); }, {"tensor m.down.lora_A", "expected shape [6, 8]", "found [8, 6]"});
  expect_error([&] { import_peft_expert_lora(l, la, la); }, {"tensor m.down.lora_B", "expected shape [8, 6]"});
  const Tensor bf = random(DType::BF16, Shape{H, E * r}, g);
  expect_error([&] { import_peft_expert_lora(l, la, bf); }, {"m.down", "lora_A is F32 but lora_B is BF16"});
  expect_error([&] { export_peft_expert_lora(l, p.B, p.B); }, {"tensor m.down.A", "expected shape [3, 2, 8]"});
  PeftExpertLoraLayout bad = l;
  bad.rank = 0;
  expect_error([&] { import_peft_expert_lora(bad, la, lb); }, {"m.down", "positive sizes"});
}

}  // namespace
}  // namespace fp8moe

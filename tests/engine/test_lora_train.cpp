// LoRA trainer (src/engine/lora_train.cpp): on a tiny realizable problem - the target is the same
// frozen layer with hidden "true" adapters of lower rank - Adam must drive the loss far down, for
// a BF16 base and an FP8 base, and the loss it reports must be the plain mean squared error.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "fp8moe/backend.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/train.hpp"
#include "test_support.hpp"

using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

Tensor randn(DType dt, Shape s, std::mt19937_64& rng, double sd) {
  std::normal_distribution<double> n(0.0, sd);
  Tensor t(dt, s);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, n(rng));
  return t;
}

struct Problem {
  int64_t T = 48, k = 2, E = 3, H = 24, I = 10;
  Tensor gate_up, down;           // base [E, 2I, H], [E, H, I] BF16
  QuantWeights gu_q, d_q;         // the base, quantized (FP8 case)
  Tensor hidden, ids, weights;    // [T, H] F32, [T, k] I32, [T, k] F32
  Tensor tA, tB, dA, dB;          // hidden adapters: [E, 2, H], [E, 2I, 2], [E, 2, I], [E, H, 2]
  Tensor target;                  // [T, H] F32

  explicit Problem(std::mt19937_64& rng) {
    gate_up = randn(DType::BF16, {E, 2 * I, H}, rng, 1.0 / std::sqrt(H));
    down = randn(DType::BF16, {E, H, I}, rng, 1.0 / std::sqrt(I));
    hidden = randn(DType::F32, {T, H}, rng, 1.0);
    ids = Tensor(DType::I32, {T, k});
    weights = Tensor(DType::F32, {T, k});
    std::uniform_real_distribution<double> u(0.2, 1.0);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t first = static_cast<int32_t>(rng() % E);
      ids.ptr<int32_t>()[t * k] = first;
      ids.ptr<int32_t>()[t * k + 1] = static_cast<int32_t>((first + 1 + rng() % (E - 1)) % E);
      for (int64_t j = 0; j < k; ++j) weights.ptr<float>()[t * k + j] = static_cast<float>(u(rng));
    }
    tA = randn(DType::F32, {E, 2, H}, rng, 0.5 / std::sqrt(H));
    tB = randn(DType::F32, {E, 2 * I, 2}, rng, 0.5);
    dA = randn(DType::F32, {E, 2, I}, rng, 0.5 / std::sqrt(I));
    dB = randn(DType::F32, {E, H, 2}, rng, 0.5);
    gu_q = quantize(gate_up, ScaleSpec::channel(2 * I, H));
    d_q = quantize(down, ScaleSpec::channel(H, I));
  }
  ExpertWeights bf16() const {
    ExpertWeights w;
    w.gate_up = {gate_up.view(), {}, ScaleSpec::none(2 * I, H)};
    w.down = {down.view(), {}, ScaleSpec::none(H, I)};
    return w;
  }
  ExpertWeights fp8() const {
    ExpertWeights w;
    w.gate_up = gu_q.view();
    w.down = d_q.view();
    return w;
  }
  MoeInputs inputs() const { return {hidden.view(), ids.view(), weights.view()}; }
  // The target: the BF16 layer with the hidden rank-2 adapters.
  void make_target(Backend& be) {
    LoraAdapters truth{tA.view(), tB.view(), dA.view(), dB.view(), 1.0};
    target = Tensor(DType::F32, {T, H});
    MoeLayer(be, bf16(), truth).forward(inputs(), target);
  }
};

void train_and_expect_progress(bool fp8_base) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + (fp8_base ? " fp8 base" : " bf16 base"));
  std::mt19937_64 rng(seed);
  auto be = make_cpu_backend();
  Problem p(rng);
  p.make_target(*be);
  LoraTrainConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 4.0;
  cfg.adam.lr = 1e-2;
  cfg.seed = rng();
  LoraTrainer trainer(*be, fp8_base ? p.fp8() : p.bf16(), cfg);

  // The reported loss is the mean squared error of the base layer (B starts at zero).
  Tensor base_out(DType::F32, {p.T, p.H});
  MoeLayer(*be, fp8_base ? p.fp8() : p.bf16()).forward(p.inputs(), base_out);
  double mse = 0;
  for (int64_t i = 0; i < p.T * p.H; ++i) {
    const double d = static_cast<double>(base_out.ptr<float>()[i]) - p.target.ptr<float>()[i];
    mse += d * d / static_cast<double>(p.T * p.H);
  }
  const double initial = trainer.evaluate(p.inputs(), p.target);
  EXPECT_NEAR(initial, mse, 1e-6 * mse);
  ASSERT_GT(initial, 0.0);

  double loss = 0;
  for (int s = 0; s < 150; ++s) {
    const double before = trainer.evaluate(p.inputs(), p.target);
    loss = trainer.step(p.inputs(), p.target);
    ASSERT_DOUBLE_EQ(loss, before) << "step " << s << " must report the loss before its update";
    ASSERT_TRUE(std::isfinite(loss));
  }
  EXPECT_EQ(trainer.steps_taken(), 150);
  const double final_loss = trainer.evaluate(p.inputs(), p.target);
  std::printf("LoRA trainer (%s base): loss %.4g -> %.4g\n", fp8_base ? "fp8" : "bf16", initial, final_loss);
  // Rank 4 can express the rank-2 truth: most of the loss must go. (With an FP8 base the
  // quantization error of the base stays, so its floor is higher.)
  EXPECT_LT(final_loss, (fp8_base ? 0.3 : 0.1) * initial);
  // Every adapter moved away from its initialisation (B from zero in particular).
  for (const TensorView* v : {&trainer.adapters().gate_up_B, &trainer.adapters().down_B}) {
    double norm = 0;
    for (int64_t i = 0; i < v->numel(); ++i) norm += std::fabs(load_as_double(v->data, v->dtype, i));
    EXPECT_GT(norm, 0.0);
  }
}

TEST(LoraTrainTest, ReducesLossBf16Base) { train_and_expect_progress(false); }
TEST(LoraTrainTest, ReducesLossFp8Base) { train_and_expect_progress(true); }

TEST(LoraTrainTest, GateUpOnlyAndBadConfigs) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto be = make_cpu_backend();
  Problem p(rng);
  p.make_target(*be);
  LoraTrainConfig cfg;
  cfg.rank = 3;
  cfg.down = false;
  cfg.adam.lr = 1e-2;
  cfg.seed = rng();
  LoraTrainer trainer(*be, p.bf16(), cfg);
  EXPECT_TRUE(trainer.adapters().has_gate_up());
  EXPECT_FALSE(trainer.adapters().has_down());
  EXPECT_EQ(trainer.adapters().gate_up_A.shape, (Shape{p.E, 3, p.H}));
  const double initial = trainer.evaluate(p.inputs(), p.target);
  for (int s = 0; s < 40; ++s) trainer.step(p.inputs(), p.target);
  EXPECT_LT(trainer.evaluate(p.inputs(), p.target), initial);

  cfg.rank = 0;
  EXPECT_THROW(LoraTrainer(*be, p.bf16(), cfg), Error);
  cfg.rank = 2;
  cfg.gate_up = false;
  EXPECT_THROW(LoraTrainer(*be, p.bf16(), cfg), Error);
  cfg.gate_up = true;
  LoraTrainer t2(*be, p.bf16(), cfg);
  Tensor wrong(DType::F32, {p.T, p.H + 1});
  EXPECT_THROW(t2.step(p.inputs(), wrong), Error);
}

}  // namespace
}  // namespace fp8moe

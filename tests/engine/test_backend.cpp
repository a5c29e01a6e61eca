// Backend selection by name and the checks on expert weights and LoRA adapters.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <random>
#include <string>

#include "engine/moe_test_util.hpp"
#include "engine/naive_moe.hpp"
#include "fp8moe/backend.hpp"

namespace fp8moe {
namespace {

using namespace moetest;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(EngineBackend, MakeBackendByName) {
  EXPECT_STREQ(make_backend("cpu")->name(), "cpu");
  const std::unique_ptr<Backend> chosen = make_backend("auto");
  EXPECT_STREQ(chosen->name(), cuda_available() ? "cuda" : "cpu");
  if (!cuda_available()) EXPECT_THROW(make_backend("cuda"), Error);
  const std::string msg = error_of([] { make_backend("tpu"); });
  for (const char* valid : {"'tpu'", "cpu", "cuda", "auto"}) EXPECT_NE(msg.find(valid), std::string::npos) << msg;
}

TEST(EngineBackend, RouterKindNames) {
  EXPECT_STREQ(router_kind_name(RouterKind::SoftmaxTopK), "softmax_topk");
  EXPECT_STREQ(router_kind_name(RouterKind::SigmoidBiasTopK), "sigmoid_bias_topk");
  EXPECT_STREQ(router_kind_name(RouterKind::TopKSoftmax), "topk_softmax");
}

class EngineValidate : public ::testing::Test {
 protected:
  uint64_t seed_ = fresh_seed();
  std::mt19937_64 gen_{seed_};
  Dims d_{3, 2, 4, 40, 24, 3, 2};
  Problem p_ = make_problem({Scheme::Block, Activation::SiluGlu, true, true, true}, d_, gen_);
};

// A consistent layer passes validation AND is the layer it claims to be: the sizes validation
// derives from it are the ones it was built with, and the layer built on it computes what the
// naive reference computes (so "nothing threw" is not mistaken for "accepted the right thing").
TEST_F(EngineValidate, AcceptsAConsistentLayer) {
  SCOPED_TRACE(seed_trace(seed_));
  EXPECT_NO_THROW(p_.w.validate());
  EXPECT_NO_THROW(p_.lora.validate(p_.w));
  EXPECT_NO_THROW(LoraAdapters{}.validate(p_.w));
  EXPECT_EQ(p_.w.experts(), d_.E);
  EXPECT_EQ(p_.w.hidden(), d_.H);
  EXPECT_EQ(p_.w.intermediate(), d_.I);
  EXPECT_TRUE(p_.lora.has_gate_up() && p_.lora.has_down());
  EXPECT_EQ(p_.lora.gate_up_A.size(1), d_.r_gu);
  EXPECT_EQ(p_.lora.down_A.size(1), d_.r_down);

  auto be = make_cpu_backend();
  for (const LoraAdapters& lora : {p_.lora, LoraAdapters{}}) {
    const MoeLayer layer(*be, p_.w, lora);
    Tensor out = nan_tensor(DType::F64, {d_.T, d_.H});  // [T, H], poisoned
    layer.forward(p_.inputs(), out);
    EXPECT_EQ(count_nan(out), 0);
    EXPECT_LT(rel_err(to_vec(out), naive::moe_forward(p_.w, lora, p_.inputs())), 1e-9);
  }
}

TEST_F(EngineValidate, ExpertWeightsNameTheOffendingTensor) {
  ExpertWeights w = p_.w;
  Tensor down(DType::BF16, {d_.E, d_.H, d_.I + 1});
  w.down = {down, TensorView(), ScaleSpec::none(d_.H, d_.I + 1)};
  EXPECT_NE(error_of([&] { w.validate(); }).find("down"), std::string::npos);

  w = p_.w;
  Tensor bias(DType::F32, {d_.E, d_.H});  // should be [E, 2I]
  w.gate_up_bias = bias;
  EXPECT_NE(error_of([&] { w.validate(); }).find("gate_up_bias"), std::string::npos);

  w = p_.w;
  w.gate_up.scale = TensorView();  // FP8 codes without their scales must never pass
  EXPECT_NE(error_of([&] { w.validate(); }).find("gate_up"), std::string::npos);

  w = p_.w;
  w.act = {Activation::GptOssGlu, GateUpLayout::Interleaved, 1.702f, 0.0f};
  EXPECT_NE(error_of([&] { w.validate(); }).find("limit"), std::string::npos);
}

TEST_F(EngineValidate, LoraNamesTheOffendingTensor) {
  LoraAdapters l = p_.lora;
  l.down_B = TensorView();
  EXPECT_NE(error_of([&] { l.validate(p_.w); }).find("down"), std::string::npos);

  l = p_.lora;
  Tensor b(DType::F64, {d_.E, 2 * d_.I, d_.r_gu + 1});  // rank differs from A's
  l.gate_up_B = b;
  EXPECT_NE(error_of([&] { l.validate(p_.w); }).find("gate_up_B"), std::string::npos);

  l = p_.lora;
  Tensor a(DType::F64, {d_.E, d_.r_down, d_.H});  // down_A must be [E, r, I]
  l.down_A = a;
  EXPECT_NE(error_of([&] { l.validate(p_.w); }).find("down_A"), std::string::npos);

  l = p_.lora;
  Tensor a8(DType::F8_E4M3, {d_.E, d_.r_gu, d_.H});
  l.gate_up_A = a8;
  EXPECT_NE(error_of([&] { l.validate(p_.w); }).find("gate_up_A"), std::string::npos);
}

TEST_F(EngineValidate, LayerRejectsWeightsOnAnotherDevice) {
  const std::unique_ptr<Backend> be = make_cpu_backend();
  ExpertWeights w = p_.w;
  w.gate_up.data.device = Device::CUDA;
  w.gate_up.scale.device = Device::CUDA;
  w.down.data.device = Device::CUDA;
  w.down.scale.device = Device::CUDA;
  w.gate_up_bias.device = Device::CUDA;
  w.down_bias.device = Device::CUDA;
  EXPECT_THROW(MoeLayer layer(*be, w), Error);
}

}  // namespace
}  // namespace fp8moe

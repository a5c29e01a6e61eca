// LoRA trainer (include/fp8moe/train.hpp): MoeLayer forward/backward + Adam on the host.
#include "fp8moe/train.hpp"

#include <cmath>
#include <random>

#include "fp8moe/error.hpp"

namespace fp8moe {

LoraTrainer::Param LoraTrainer::make_param(Shape shape, double init_bound, uint64_t seed) {
  Param p;
  const int64_t n = shape.numel();
  p.value.assign(n, 0.0f);
  p.m.assign(n, 0.0f);
  p.v.assign(n, 0.0f);
  if (init_bound > 0) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(-init_bound, init_bound);
    for (float& x : p.value) x = static_cast<float>(u(rng));
  }
  p.device = backend_->empty(DType::F32, shape);
  p.grad = backend_->empty(DType::F32, shape);
  backend_->copy(p.device, TensorView(p.value.data(), DType::F32, shape));
  return p;
}

LoraTrainer::LoraTrainer(Backend& backend, const ExpertWeights& weights, const LoraTrainConfig& cfg)
    : backend_(&backend), weights_(weights), cfg_(cfg) {
  weights_.validate();
  FP8MOE_CHECK(cfg.rank > 0, "LoRA trainer: rank must be positive, found ", cfg.rank);
  FP8MOE_CHECK(cfg.gate_up || cfg.down, "LoRA trainer: no adapter to train (gate_up and down both off)");
  const int64_t E = weights.experts(), H = weights.hidden(), I = weights.intermediate(), r = cfg.rank;
  // PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0,
  // so training starts exactly at the base model.
  lora_.scaling = cfg.alpha / static_cast<double>(r);
  if (cfg.gate_up) {
    gu_a_ = make_param(Shape{E, r, H}, 1.0 / std::sqrt(static_cast<double>(H)), cfg.seed);
    gu_b_ = make_param(Shape{E, 2 * I, r}, 0.0, 0);
    lora_.gate_up_A = gu_a_.device.view();
    lora_.gate_up_B = gu_b_.device.view();
  }
  if (cfg.down) {
    d_a_ = make_param(Shape{E, r, I}, 1.0 / std::sqrt(static_cast<double>(I)), cfg.seed + 1);
    d_b_ = make_param(Shape{E, H, r}, 0.0, 0);
    lora_.down_A = d_a_.device.view();
    lora_.down_B = d_b_.device.view();
  }
  lora_.validate(weights_);
}

double LoraTrainer::loss_and_grad(const MoeInputs& in, const TensorView& target, MoeSaved* saved,
                                  Tensor* grad_out) const {
  const int64_t T = in.hidden.size(0), H = weights_.hidden();
  check_shape(target, "LoRA trainer target", Shape{T, H});
  check_dtype(target, "LoRA trainer target", {DType::F32});
  FP8MOE_CHECK(T > 0, "LoRA trainer: the batch has no tokens");
  MoeLayer layer(*backend_, weights_, lora_);
  Tensor out = backend_->empty(DType::F32, Shape{T, H});  // [T, H]
  layer.forward(in, out, saved);

  // The loss and its gradient on the host: [T, H] fp32 is small, and it keeps one plain loop.
  Tensor out_h(DType::F32, Shape{T, H}), tgt_h(DType::F32, Shape{T, H});
  backend_->copy(out_h, out);
  backend_->copy(tgt_h, target);
  const float* o = out_h.ptr<float>();
  const float* y = tgt_h.ptr<float>();
  const double inv_n = 1.0 / static_cast<double>(T * H);
  double loss = 0.0;
  for (int64_t i = 0; i < T * H; ++i) {
    const double d = static_cast<double>(o[i]) - y[i];
    loss += d * d;
  }
  loss *= inv_n;
  FP8MOE_CHECK(std::isfinite(loss), "LoRA trainer: the loss is ", loss, " (non-finite layer output)");
  if (grad_out) {
    Tensor g(DType::F32, Shape{T, H});  // dL/dout = 2 (out - target) / (T H)
    for (int64_t i = 0; i < T * H; ++i)
      g.ptr<float>()[i] = static_cast<float>(2.0 * inv_n * (static_cast<double>(o[i]) - y[i]));
    *grad_out = backend_->upload(g);
  }
  return loss;
}

double LoraTrainer::evaluate(const MoeInputs& in, const TensorView& target) const {
  return loss_and_grad(in, target, nullptr, nullptr);
}

double LoraTrainer::step(const MoeInputs& in, const TensorView& target) {
  MoeSaved saved;
  Tensor grad_out;
  const double loss = loss_and_grad(in, target, &saved, &grad_out);
  MoeGrads grads;
  if (cfg_.gate_up) {
    grads.lora.gate_up_A = gu_a_.grad.view();
    grads.lora.gate_up_B = gu_b_.grad.view();
  }
  if (cfg_.down) {
    grads.lora.down_A = d_a_.grad.view();
    grads.lora.down_B = d_b_.grad.view();
  }
  MoeLayer(*backend_, weights_, lora_).backward(in, saved, grad_out, grads);
  ++step_;
  if (cfg_.gate_up) {
    adam_update(gu_a_);
    adam_update(gu_b_);
  }
  if (cfg_.down) {
    adam_update(d_a_);
    adam_update(d_b_);
  }
  return loss;
}

void LoraTrainer::adam_update(Param& p) {
  const int64_t n = static_cast<int64_t>(p.value.size());
  Tensor g(DType::F32, p.grad.shape());
  backend_->copy(g, p.grad);
  const AdamConfig& a = cfg_.adam;
  const double c1 = 1.0 - std::pow(a.beta1, static_cast<double>(step_));
  const double c2 = 1.0 - std::pow(a.beta2, static_cast<double>(step_));
  const float* gp = g.ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const double gi = gp[i];
    FP8MOE_CHECK(std::isfinite(gi), "LoRA trainer: non-finite gradient ", gi, " at element ", i, " of ",
                 p.grad.view().str());
    p.m[i] = static_cast<float>(a.beta1 * p.m[i] + (1.0 - a.beta1) * gi);
    p.v[i] = static_cast<float>(a.beta2 * p.v[i] + (1.0 - a.beta2) * gi * gi);
    const double mhat = p.m[i] / c1, vhat = p.v[i] / c2;
    p.value[i] = static_cast<float>(p.value[i] - a.lr * mhat / (std::sqrt(vhat) + a.eps));
  }
  backend_->copy(p.device, TensorView(p.value.data(), DType::F32, p.device.shape()));
}

}  // namespace fp8moe

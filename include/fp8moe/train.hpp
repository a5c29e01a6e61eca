// A small LoRA trainer for one MoE expert layer: the frozen base experts (FP8 or BF16) plus
// per-expert adapters on gate_up and down, trained with Adam to bring the layer output towards a
// target (mean squared error). It is the training loop of `fp8moe demo` and a check that the
// engine's LoRA gradients actually train something.
//
// The adapters live on the backend's device (what MoeLayer reads); fp32 master copies and the
// Adam moments live on the host, because the adapters are tiny next to the layer's activations
// (E * r * (H + 2I + I + H) values) and one plain loop keeps the update obviously right.
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/backend.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

struct LoraTrainConfig {
  int64_t rank = 8;       // r
  double alpha = 16.0;    // scaling = alpha / r (PEFT's lora_alpha)
  bool gate_up = true;    // adapters on gate_up
  bool down = true;       // adapters on down
  AdamConfig adam;
  uint64_t seed = 0;      // initialisation of the A matrices (B starts at zero, as in PEFT)
};

class LoraTrainer {
 public:
  // `weights` must live on `backend`'s device and outlive the trainer.
  LoraTrainer(Backend& backend, const ExpertWeights& weights, const LoraTrainConfig& cfg);

  // One training step on a batch: forward, loss = mean((out - target)^2) over [T, H], backward,
  // one Adam update of every adapter. Returns the loss before the update.
  // in: hidden [T, H], topk_ids / topk_weights [T, k] on the device; target [T, H] F32 on the device.
  double step(const MoeInputs& in, const TensorView& target);
  // The same loss without touching the adapters.
  double evaluate(const MoeInputs& in, const TensorView& target) const;

  const LoraAdapters& adapters() const { return lora_; }  // device views, F32
  int64_t steps_taken() const { return step_; }

 private:
  // One trainable matrix: device tensor, host fp32 master copy and Adam moments, all [numel].
  struct Param {
    Tensor device;
    std::vector<float> value, m, v;
    Tensor grad;  // device, same shape
  };
  // Forward into out [T, H] F32 (device); returns the loss and fills grad_out (device) if given.
  double loss_and_grad(const MoeInputs& in, const TensorView& target, MoeSaved* saved, Tensor* grad_out) const;
  void adam_update(Param& p);
  Param make_param(Shape shape, double init_bound, uint64_t seed);

  Backend* backend_;
  ExpertWeights weights_;
  LoraTrainConfig cfg_;
  Param gu_a_, gu_b_, d_a_, d_b_;  // [E, r, H], [E, 2I, r], [E, r, I], [E, H, r]
  LoraAdapters lora_;
  int64_t step_ = 0;
};

}  // namespace fp8moe

// Moving loaded expert stacks onto a backend's device, shared by the `layer` and `demo` commands.
#pragma once

#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/moe.hpp"

namespace fp8moe::cli {

// Owning device copies of one ExpertStack and the ExpertWeights viewing them.
struct DeviceExperts {
  Tensor gate_up, gate_up_scale;  // [E, 2I, H], [E, rows, cols] F32 (undefined for plain weights)
  Tensor down, down_scale;        // [E, H, I],  [E, rows, cols] F32 (undefined for plain weights)
  Tensor gate_up_bias, down_bias; // [E, 2I], [E, H] or undefined
  ExpertWeights weights;          // views of the tensors above; valid while this object lives
};

inline DeviceExperts upload_experts(Backend& be, const ExpertStack& stack) {
  const ExpertWeights host = stack.view();
  auto up = [&be](const TensorView& v) { return v.defined() ? be.upload(v) : Tensor(); };
  DeviceExperts d;
  d.gate_up = up(host.gate_up.data);
  d.gate_up_scale = up(host.gate_up.scale);
  d.down = up(host.down.data);
  d.down_scale = up(host.down.scale);
  d.gate_up_bias = up(host.gate_up_bias);
  d.down_bias = up(host.down_bias);
  d.weights = host;
  d.weights.gate_up.data = d.gate_up.view();
  d.weights.gate_up.scale = d.gate_up_scale.view();
  d.weights.down.data = d.down.view();
  d.weights.down.scale = d.down_scale.view();
  d.weights.gate_up_bias = d.gate_up_bias.view();
  d.weights.down_bias = d.down_bias.view();
  return d;
}

}  // namespace fp8moe::cli

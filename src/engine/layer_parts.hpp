// Pieces the layers of the engine share (moe_layer.cpp, linear_layer.cpp): how a LoRA factor
// becomes a grouped-GEMM weight, how the LoRA delta folds into a GEMM, the per-expert outer
// product of the LoRA weight gradients, and the check of a float operand.
#pragma once

#include <string>

#include "fp8moe/backend.hpp"

namespace fp8moe::engine {

// A plain (unquantized) stack [E, N, K] as a grouped-GEMM weight: the LoRA factors.
inline QuantTensor plain(const TensorView& t) { return {t, TensorView(), ScaleSpec::none(t.size(1), t.size(2))}; }

// Folds the LoRA delta lora_scale * L LB^T into a grouped GEMM.
inline void set_lora(GroupedGemm& g, const TensorView& l, const TensorView& lb, double scale) {
  g.lora_a = {l};
  g.lora_b = lb;
  g.lora_scale = scale;
}

// out[e] = alpha * sum over expert e's rows of row_scale * left^T right.
inline GroupedOuter outer(const RoutingPlan* plan, GemmOperand left, GemmOperand right, const TensorView& row_scale,
                   double alpha, const TensorView& out) {
  GroupedOuter o;
  o.plan = plan;
  o.left = left;
  o.right = right;
  o.row_scale = row_scale;
  o.alpha = alpha;
  o.out = out;
  return o;
}

inline const char* device_name(Device d) { return d == Device::CUDA ? "cuda" : "cpu"; }

// A float tensor the layer reads or writes: shape, a non-FP8 float dtype, on the backend's device.
inline void check_float(const TensorView& t, const std::string& name, const Shape& shape, Device dev) {
  FP8MOE_CHECK(t.defined(), "tensor ", name, ": required, expected ", shape.str());
  check_shape(t, name.c_str(), shape);
  check_dtype(t, name.c_str(), {DType::F64, DType::F32, DType::BF16, DType::F16});
  FP8MOE_CHECK(t.device == dev, "tensor ", name, ": expected it on the backend's device (", device_name(dev),
               "), found ", t.str());
}

// A layer's weights must live where its backend computes.
inline void check_weights_on_backend(const TensorView& w, Backend& be, const char* layer) {
  FP8MOE_CHECK(w.device == be.device(), layer, ": the weights live on ", device_name(w.device), " but the backend '",
               be.name(), "' runs on ", device_name(be.device()));
}

}  // namespace fp8moe::engine

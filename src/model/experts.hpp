// Expert stacking: copies stored expert matrices (zero-copy views into the checkpoint) into the
// canonical owning stacks gate_up [E, 2I, H] / down [E, H, I] with F32 scales. Internal to model/:
// checkpoint.cpp resolves names and validates; these functions only move bytes, and re-check the
// invariants they rely on so that a caller cannot stack mismatched pieces.
#pragma once

#include <string>
#include <vector>

#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {
class TensorStore;
struct QuantConfig;
}  // namespace fp8moe

namespace fp8moe::model {

// One [N, K] matrix of one expert as stored, and its scale grid when it is FP8.
struct StoredMatrix {
  std::string name;        // weight tensor name, for messages
  TensorView weight;       // [N, K], any dtype the checkpoint stores (FP8 codes or plain floats)
  std::string scale_name;  // empty when plain
  TensorView scale;        // [spec.scale_rows(), spec.grid_k()] elements (any rank), F32/BF16/F16
  ScaleSpec spec;          // on [N, K], segments 1; kind None when plain
};

// Stacks experts[e][p] (E experts, each the row blocks p = 0.. of one matrix, e.g. {gate, up})
// into data [E, sum_p N_p, K] and scales [E, rows, cols] F32. Every expert and part must share
// dtype and scheme; tensor and block schemes keep one scale grid per part (ScaleSpec segments =
// number of parts, which then must all have the same N), channel and group grids concatenate.
// Throws naming the first mismatching tensor.
QuantWeights stack_experts(const std::vector<std::vector<StoredMatrix>>& experts, const std::string& what);

// A stack already in canonical [E, N, K] orientation with its scale [E, ...] whose per-expert
// elements are laid out as `spec` expects (any rank). Copies into owning memory, scales to F32.
QuantWeights copy_stacked(const std::string& name, const TensorView& data, const std::string& scale_name,
                          const TensorView& scale, const ScaleSpec& spec);

// A stack stored transposed, [E, K, N] applied as x @ W (GPT-OSS), with a scale grid laid on the
// stored orientation ([E, grid_k, scale_rows] elements). Returns the canonical [E, N, K] stack and
// [E, scale_rows, grid_k] scales; `spec` describes the canonical matrix (segments 1).
QuantWeights transpose_stacked(const std::string& name, const TensorView& data, const std::string& scale_name,
                               const TensorView& scale, const ScaleSpec& spec);

// The loader's per-tensor FP8 rule (checkpoint.cpp) for one stored FP8 weight, wherever it sits:
// `weight` [N, K] (module = the name without ".weight"), or a fused stack [E, N, K] (module = its
// name) whose scale carries a leading E (a transformers-fused "experts.gate_up_proj" keeps gate
// and up scale grids apart unless `model_type` is gpt_oss, whose stacks interleave them). Returns
// the per-matrix scale spec the quantization config declares for the module, or the one the
// scale's shape states when the config declares none; throws naming the tensor for what the
// loader refuses (no scale, an excluded module, a scale of the wrong shape or dtype). The
// converter and inspect() use it for every tensor no layer plan covers, so that convert, inspect
// and load judge every tensor alike.
ScaleSpec fp8_weight_spec(const TensorStore& st, const QuantConfig& q, const std::string& weight,
                          const std::string& model_type);

// Any float tensor (F32/BF16/F16) -> an owning F32 copy of the same shape (biases). Rejects
// non-finite values, naming the tensor and the element.
Tensor to_f32(const std::string& name, const TensorView& t);

}  // namespace fp8moe::model

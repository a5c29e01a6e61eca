// The MoE expert layer: problem description, weights, LoRA adapters, routers, and the layer
// (forward and backward) that every backend runs through the same orchestration (engine/).
//
// Math convention everywhere: D = A @ W^T with W stored [N, K] (PyTorch's F.linear).
// Shapes: T tokens, k experts per token, E experts, H hidden, I expert intermediate, r LoRA rank,
// M = T * k (token, slot) pairs; pair p = t * k + j.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

class Backend;

// ---------------------------------------------------------------------------------------------
// Activation of the gate_up projection.
enum class Activation : uint8_t {
  SiluGlu,    // out = silu(gate) * up                        (Qwen3, GLM, DeepSeek, Mixtral)
  GptOssGlu,  // g = min(gate, limit), u = clamp(up, -limit, limit), out = (u + 1) * g * sigmoid(alpha g)
};
// Where gate and up live among the 2I rows of gate_up.
enum class GateUpLayout : uint8_t {
  Halves,       // gate rows [0, I), up rows [I, 2I)  (transformers fused experts, vLLM w13)
  Interleaved,  // gate = even rows, up = odd rows     (GPT-OSS)
};

struct ActivationSpec {
  Activation kind = Activation::SiluGlu;
  GateUpLayout layout = GateUpLayout::Halves;
  float alpha = 1.702f;  // GPT-OSS sigmoid slope
  float limit = 7.0f;    // GPT-OSS clamp

  FP8MOE_HD int64_t gate_row(int64_t j, int64_t /*I*/) const { return layout == GateUpLayout::Halves ? j : 2 * j; }
  FP8MOE_HD int64_t up_row(int64_t j, int64_t I) const { return layout == GateUpLayout::Halves ? I + j : 2 * j + 1; }
};

// ---------------------------------------------------------------------------------------------
// Frozen base experts, on the backend's device. Built by model/ from any supported layout.
struct ExpertWeights {
  QuantTensor gate_up;      // [E, 2I, H] (rows arranged per act.layout)
  QuantTensor down;         // [E, H, I]
  TensorView gate_up_bias;  // [E, 2I] optional (GPT-OSS)
  TensorView down_bias;     // [E, H]  optional
  ActivationSpec act;

  int64_t experts() const { return gate_up.data.size(0); }
  int64_t hidden() const { return gate_up.data.size(2); }
  int64_t intermediate() const { return gate_up.data.size(1) / 2; }
  void validate() const;  // throws naming the offending tensor
};

// LoRA on the experts, kept apart from the frozen base: Y += scaling * (X A_e^T) B_e^T, added
// before bias and activation (gate_up) and before the routing weight (down).
// Per-expert layout here; PEFT's flattened layout is converted by model/lora.hpp.
struct LoraAdapters {
  TensorView gate_up_A;  // [E, r, H]   (undefined: no LoRA on gate_up)
  TensorView gate_up_B;  // [E, 2I, r]  rows in gate_up's row order
  TensorView down_A;     // [E, r, I]   (undefined: no LoRA on down)
  TensorView down_B;     // [E, H, r]
  double scaling = 1.0;  // lora_alpha / r

  bool has_gate_up() const { return gate_up_A.defined(); }
  bool has_down() const { return down_A.defined(); }
  void validate(const ExpertWeights& w) const;
};
// Gradients to the adapters: same shapes as LoraAdapters; undefined views are not computed.
struct LoraGrads {
  TensorView gate_up_A, gate_up_B, down_A, down_B;
};

// ---------------------------------------------------------------------------------------------
// Routers: logits [T, E] -> top-k ids [T, k] (I32) and weights [T, k].
enum class RouterKind : uint8_t {
  SoftmaxTopK,      // Qwen3 / Mixtral: p = softmax(logits); top-k of p; renormalise if `normalize`
  SigmoidBiasTopK,  // GLM-4.7-Flash / DeepSeek-V3: s = sigmoid(logits); select top-k of
                    // s + correction_bias; w = s_sel / (sum s_sel + 1e-20) if normalize; w *= scaling
  TopKSoftmax,      // GPT-OSS: top-k of logits; w = softmax over the k kept
};
const char* router_kind_name(RouterKind k);

struct RouterSpec {
  RouterKind kind = RouterKind::SoftmaxTopK;
  int64_t top_k = 1;
  bool normalize = true;        // norm_topk_prob
  double scaling = 1.0;         // routed_scaling_factor (SigmoidBiasTopK)
  TensorView correction_bias;   // [E] F32, SigmoidBiasTopK only (selection only, never weights)
};
// Ties in top-k go to the lower expert index, so routing is deterministic.

// ---------------------------------------------------------------------------------------------
struct MoeInputs {
  TensorView hidden;        // [T, H]  BF16/F32 (F64 on the CPU backend)
  TensorView topk_ids;      // [T, k]  I32 or I64, values in [0, E)
  TensorView topk_weights;  // [T, k]  F32/BF16/F64
};

struct MoeGrads {
  TensorView hidden;        // [T, H]  dL/dhidden (optional)
  TensorView topk_weights;  // [T, k]  dL/dweights (optional)
  LoraGrads lora;           // optional per adapter
};

// One buffer that forward keeps for backward, for callers that own all memory: `shape` with
// kPairs standing for M = T * k (the number of (token, slot) pairs of the batch).
constexpr int64_t kPairs = -1;
struct BufferSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// What forward keeps for backward, decided once (engine/moe_layer.cpp says why):
// pre-activation H1 and activation A of GEMM1, unweighted expert output Y of GEMM2, the LoRA
// low-rank intermediates U = Xp A_gu^T and V = A A_d^T, and the routing plan. The gathered input
// Xp is not kept: backward reads the layer input through the plan again.
// A caller that owns memory sets the plan (with its offsets / sorted_pairs / row_of_pair) and
// these tensors to borrowed buffers (Tensor::borrow) laid out as MoeLayer::saved_layout() says
// before forward; forward then writes into them instead of allocating.
struct RoutingPlan;
struct MoeSaved {
  std::shared_ptr<RoutingPlan> plan;
  Tensor h1;   // [M, 2I]
  Tensor act;  // [M, I]
  Tensor y;    // [M, H]
  Tensor u;    // [M, r] (LoRA on gate_up)
  Tensor v;    // [M, r] (LoRA on down)
};

// The expert layer. Holds views of weights/adapters living on the backend's device.
class MoeLayer {
 public:
  MoeLayer(Backend& backend, ExpertWeights weights, LoraAdapters lora = {});

  // out [T, H] (F32/BF16, F64 on CPU) = sum_j w[t, j] * expert_{ids[t, j]}(hidden[t]).
  // When `saved` is given, keeps what backward needs.
  void forward(const MoeInputs& in, const TensorView& out, MoeSaved* saved = nullptr) const;
  // Gradients for a frozen base: to the input, the routing weights and the LoRA adapters.
  void backward(const MoeInputs& in, const MoeSaved& saved, const TensorView& grad_out, const MoeGrads& grads) const;
  // The buffers of MoeSaved, in order: the plan's offsets, sorted_pairs and row_of_pair, then
  // h1, act, y, and u / v where the layer has that adapter. Depends on the layer, not the batch.
  std::vector<BufferSpec> saved_layout() const;
  // The same from the sizes alone (r = 0: no adapter), for callers that allocate before they hold
  // the tensors (a framework's shape inference).
  static std::vector<BufferSpec> saved_layout(DType activation, int64_t E, int64_t H, int64_t I, int64_t r_gate_up,
                                              int64_t r_down);

  const ExpertWeights& weights() const { return w_; }
  const LoraAdapters& lora() const { return lora_; }
  Backend& backend() const { return *backend_; }

 private:
  Backend* backend_;
  ExpertWeights w_;
  LoraAdapters lora_;
};

}  // namespace fp8moe

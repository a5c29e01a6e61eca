// A frozen dense projection (attention q/k/v/o, dense MLPs, shared experts) on FP8 or plain
// weights, with an optional LoRA delta: the grouped GEMM family with one group (G = 1), so FP8
// weights are dequantized inside the kernel exactly as the experts' are.
//
//   out = x W^T + s (x A^T) B^T + b        x [T, K], W [N, K], A [r, K], B [N, r], b [N]
//
// Weights are one-expert stacks (W [1, N, K] with its QuantTensor scales, A [1, r, K],
// B [1, N, r], b [1, N]) so that every scale scheme of quant.hpp applies unchanged.
#pragma once

#include <memory>
#include <vector>

#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

class Backend;
struct RoutingPlan;

struct LinearWeights {
  QuantTensor weight;  // [1, N, K], FP8 + scales or plain
  TensorView bias;     // [1, N] optional

  int64_t out_features() const { return weight.data.size(1); }
  int64_t in_features() const { return weight.data.size(2); }
  void validate() const;
};

struct LinearLora {
  TensorView A;          // [1, r, K]  (undefined: no LoRA)
  TensorView B;          // [1, N, r]
  double scaling = 1.0;  // lora_alpha / r

  bool defined() const { return A.defined(); }
  void validate(const LinearWeights& w) const;
};

// What forward keeps for backward: the one-expert plan (the GEMM family walks rows through it)
// and U = x A^T [T, r] with LoRA. A caller that owns memory sets them to borrowed buffers laid
// out as LinearLayer::saved_layout() says (kPairs stands for T).
struct LinearSaved {
  std::shared_ptr<RoutingPlan> plan;
  Tensor u;  // [T, r]
};

struct LinearGrads {
  TensorView input;  // [T, K] optional
  TensorView A;      // [1, r, K] optional
  TensorView B;      // [1, N, r] optional
};

class LinearLayer {
 public:
  LinearLayer(Backend& backend, LinearWeights weights, LinearLora lora = {});

  // x [T, K] -> out [T, N] (F32/BF16; F64 on the CPU backend). Keeps what backward needs when
  // `saved` is given.
  void forward(const TensorView& x, const TensorView& out, LinearSaved* saved = nullptr) const;
  // Frozen base: gradients to the input and to the LoRA factors.
  void backward(const TensorView& x, const LinearSaved& saved, const TensorView& grad_out,
                const LinearGrads& grads) const;
  // offsets, sorted_pairs, row_of_pair, then u with LoRA.
  std::vector<BufferSpec> saved_layout() const;
  static std::vector<BufferSpec> saved_layout(DType activation, int64_t r);  // r = 0: no LoRA

  const LinearWeights& weights() const { return w_; }

 private:
  Backend* backend_;
  LinearWeights w_;
  LinearLora lora_;
};

}  // namespace fp8moe

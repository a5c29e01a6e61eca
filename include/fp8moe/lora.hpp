// PEFT's flattened LoRA layout for fused experts <-> fp8moe's per-expert layout: ONE function pair.
//
// PEFT stores the adapter of a fused experts parameter (E experts, each W_e [out, in]) flattened:
//   lora_A [E*r, in]   expert-major: A_e = rows e*r .. e*r + r-1           (A[e][q][i] = lora_A[e*r + q][i])
//   lora_B [out, E*r]  expert is the FAST axis: column q*E + e is rank q of expert e
//                                                                           (B[e][o][q] = lora_B[o][q*E + e])
// Reading lora_B expert-major (column e*r + q) silently pairs every expert with the wrong rank
// columns (reference-system.md, "What it does" item 4). fp8moe keeps A [E, r, in] and B [E, out, r].
//
// Orientation (which dimension is in and which is out) comes from the declared layout - the
// projection and the base ExpertWeights - never from the tensors' shapes: square experts and
// in > out are otherwise ambiguous (trap 12). A shape that disagrees is an error naming the tensor.
#pragma once

#include <cstdint>
#include <string>

#include "fp8moe/moe.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

enum class LoraProjection : uint8_t {
  GateUp,  // in = H, out = 2I (rows in gate_up's row order: halves or interleaved)
  Down,    // in = I, out = H
};
const char* lora_projection_name(LoraProjection p);

// The declared layout of one expert LoRA pair.
struct PeftExpertLoraLayout {
  std::string name;  // module / tensor prefix, for messages
  LoraProjection projection = LoraProjection::GateUp;
  int64_t experts = 0;       // E
  int64_t rank = 0;          // r
  int64_t in_features = 0;   // K of the base [N, K] matrix
  int64_t out_features = 0;  // N

  // The layout for `projection` of the base experts `w` at rank `rank`.
  static PeftExpertLoraLayout of(const ExpertWeights& w, LoraProjection projection, int64_t rank, std::string name);
  void validate() const;  // positive sizes
};

// Per-expert adapters (owning, host), in the dtype they came in.
struct ExpertLoraPair {
  Tensor A;  // [E, r, in]
  Tensor B;  // [E, out, r]
};
// PEFT's flattened adapters (owning, host), in the dtype they came in.
struct PeftLoraPair {
  Tensor lora_A;  // [E*r, in]
  Tensor lora_B;  // [out, E*r]
};

// PEFT flattened -> per-expert. lora_A [E*r, in], lora_B [out, E*r], host, any float dtype
// (the same for both); values are copied bit for bit.
ExpertLoraPair import_peft_expert_lora(const PeftExpertLoraLayout& layout, const TensorView& lora_A,
                                       const TensorView& lora_B);
// Per-expert -> PEFT flattened. A [E, r, in], B [E, out, r]; the exact inverse of the import.
PeftLoraPair export_peft_expert_lora(const PeftExpertLoraLayout& layout, const TensorView& A, const TensorView& B);

}  // namespace fp8moe

// PEFT flattened expert LoRA <-> per-expert layout (include/fp8moe/lora.hpp).
#include "fp8moe/lora.hpp"

#include <cstring>

#include "fp8moe/error.hpp"

namespace fp8moe {

namespace {

// Host, contiguous, float, with exactly the declared shape; `role` names the tensor in messages.
void check_operand(const TensorView& t, const PeftExpertLoraLayout& l, const char* role, const Shape& want) {
  const std::string name = l.name + "." + role;
  FP8MOE_CHECK(t.defined(), "tensor ", name, ": expected ", want.str(), ", found no tensor");
  FP8MOE_CHECK(t.device == Device::CPU, "tensor ", name, ": expected host memory, found ", t.str());
  FP8MOE_CHECK(t.shape == want, "tensor ", name, ": expected shape ", want.str(), " for ", lora_projection_name(l.projection),
               " (E ", l.experts, ", r ", l.rank, ", in ", l.in_features, ", out ", l.out_features,
               "), found ", t.shape.str());
  check_dtype(t, name.c_str(), {DType::F32, DType::BF16, DType::F16, DType::F64});
  check_contiguous(t, name.c_str());
}

}  // namespace

const char* lora_projection_name(LoraProjection p) {
  switch (p) {
    case LoraProjection::GateUp: return "gate_up";
    case LoraProjection::Down: return "down";
  }
  FP8MOE_FAIL("unknown LoRA projection code ", static_cast<int>(p));
}

PeftExpertLoraLayout PeftExpertLoraLayout::of(const ExpertWeights& w, LoraProjection projection, int64_t rank,
                                              std::string name) {
  const QuantTensor& base = projection == LoraProjection::GateUp ? w.gate_up : w.down;
  FP8MOE_CHECK(base.data.rank() == 3, name, ": base ", lora_projection_name(projection), " must be [E, N, K], found ",
               base.data.str());
  PeftExpertLoraLayout l;
  l.name = std::move(name);
  l.projection = projection;
  l.experts = base.data.size(0);
  l.rank = rank;
  l.out_features = base.data.size(1);  // W_e is [out, in]: D = X @ W^T
  l.in_features = base.data.size(2);
  l.validate();
  return l;
}

void PeftExpertLoraLayout::validate() const {
  FP8MOE_CHECK(experts > 0 && rank > 0 && in_features > 0 && out_features > 0, name,
               ": LoRA layout needs positive sizes, found E ", experts, ", r ", rank, ", in ", in_features, ", out ",
               out_features);
}

ExpertLoraPair import_peft_expert_lora(const PeftExpertLoraLayout& l, const TensorView& lora_A,
                                       const TensorView& lora_B) {
  l.validate();
  const int64_t E = l.experts, r = l.rank, in = l.in_features, out = l.out_features;
  check_operand(lora_A, l, "lora_A", Shape{E * r, in});
  check_operand(lora_B, l, "lora_B", Shape{out, E * r});
  FP8MOE_CHECK(lora_A.dtype == lora_B.dtype, l.name, ": lora_A is ", dtype_name(lora_A.dtype), " but lora_B is ",
               dtype_name(lora_B.dtype), "; expected one dtype");
  const int64_t es = dtype_size(lora_A.dtype);

  ExpertLoraPair p;
  // A: expert-major rows, so [E*r, in] already is [E, r, in] in memory.
  p.A = Tensor(lora_A.dtype, Shape{E, r, in});  // [E, r, in]
  std::memcpy(p.A.data(), lora_A.data, static_cast<size_t>(lora_A.nbytes()));
  // B: B[e][o][q] = lora_B[o][q*E + e] (expert fast).
  p.B = Tensor(lora_B.dtype, Shape{E, out, r});  // [E, out, r]
  const auto* src = static_cast<const unsigned char*>(lora_B.data);
  auto* dst = static_cast<unsigned char*>(p.B.data());
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t q = 0; q < r; ++q)
        std::memcpy(dst + ((e * out + o) * r + q) * es, src + (o * E * r + q * E + e) * es, static_cast<size_t>(es));
  return p;
}

PeftLoraPair export_peft_expert_lora(const PeftExpertLoraLayout& l, const TensorView& A, const TensorView& B) {
  l.validate();
  const int64_t E = l.experts, r = l.rank, in = l.in_features, out = l.out_features;
  check_operand(A, l, "A", Shape{E, r, in});
  check_operand(B, l, "B", Shape{E, out, r});
  FP8MOE_CHECK(A.dtype == B.dtype, l.name, ": A is ", dtype_name(A.dtype), " but B is ", dtype_name(B.dtype),
               "; expected one dtype");
  const int64_t es = dtype_size(A.dtype);

  PeftLoraPair p;
  p.lora_A = Tensor(A.dtype, Shape{E * r, in});  // [E*r, in]
  std::memcpy(p.lora_A.data(), A.data, static_cast<size_t>(A.nbytes()));
  p.lora_B = Tensor(B.dtype, Shape{out, E * r});  // [out, E*r]
  const auto* src = static_cast<const unsigned char*>(B.data);
  auto* dst = static_cast<unsigned char*>(p.lora_B.data());
  for (int64_t o = 0; o < out; ++o)
    for (int64_t q = 0; q < r; ++q)
      for (int64_t e = 0; e < E; ++e)
        std::memcpy(dst + (o * E * r + q * E + e) * es, src + ((e * out + o) * r + q) * es, static_cast<size_t>(es));
  return p;
}

}  // namespace fp8moe

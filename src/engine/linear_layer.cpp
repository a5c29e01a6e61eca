// The dense projection, forward and backward, as one-group grouped GEMMs (linear.hpp).
//
// Forward (x [T, K]; s = LoRA scaling; the plan is the one-expert identity):
//   U   = x A^T                                  [T, r]   (LoRA)
//   out = x W^T + s U B^T + b                    [T, N]
// Backward (G = dL/dout [T, N], base frozen):
//   Q   = G B                                    [T, r]   (LoRA)
//   dx  = G W + s Q A                            [T, K]   (W read transposed, no copy)
//   dA  = s Q^T x,   dB = s G^T U                          (one-group outer products)
// Saved: the plan and U; x is the caller's input, passed again to backward.
#include "fp8moe/linear.hpp"

#include <string>
#include <utility>

#include "engine/layer_parts.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

using namespace engine;

void LinearWeights::validate() const {
  weight.validate("linear weight");
  FP8MOE_CHECK(weight.data.size(0) == 1, "linear weight ", weight.data.str(),
               ": expected a one-matrix stack [1, N, K]");
  if (bias.defined()) {
    check_shape(bias, "linear bias", {1, out_features()});
    FP8MOE_CHECK(is_float(bias.dtype) && !is_fp8(bias.dtype), "tensor linear bias: expected BF16/F16/F32/F64, found ",
                 bias.str());
    FP8MOE_CHECK(bias.device == weight.data.device, "tensor linear bias ", bias.str(),
                 " is not on the device of the weight ", weight.data.str());
  }
}

void LinearLora::validate(const LinearWeights& w) const {
  FP8MOE_CHECK(A.defined() == B.defined(), "linear lora: A and B must be given together (A ",
               A.defined() ? "given" : "missing", ", B ", B.defined() ? "given" : "missing", ")");
  if (!defined()) return;
  FP8MOE_CHECK(A.rank() == 3, "tensor linear lora A: expected [1, r, K], found ", A.str());
  const int64_t r = A.size(1);
  const Device dev = w.weight.data.device;
  check_float(A, "linear lora A", {1, r, w.in_features()}, dev);
  check_float(B, "linear lora B", {1, w.out_features(), r}, dev);
}

LinearLayer::LinearLayer(Backend& backend, LinearWeights weights, LinearLora lora)
    : backend_(&backend), w_(std::move(weights)), lora_(std::move(lora)) {
  w_.validate();
  lora_.validate(w_);
  check_weights_on_backend(w_.weight.data, backend, "LinearLayer");
}

std::vector<BufferSpec> LinearLayer::saved_layout(DType activation, int64_t r) {
  std::vector<BufferSpec> l = {
      {"offsets", DType::I32, {2}}, {"sorted_pairs", DType::I32, {kPairs}}, {"row_of_pair", DType::I32, {kPairs}}};
  if (r > 0) l.push_back({"u", activation, {kPairs, r}});
  return l;
}

std::vector<BufferSpec> LinearLayer::saved_layout() const {
  return saved_layout(backend_->activation_dtype(), lora_.defined() ? lora_.A.size(1) : 0);
}

void LinearLayer::forward(const TensorView& x, const TensorView& out, LinearSaved* saved) const {
  Backend& be = *backend_;
  FP8MOE_CHECK(x.defined() && x.rank() == 2, "LinearLayer::forward tensor x: expected [T, K], found ",
               x.defined() ? x.str() : std::string("no tensor"));
  const int64_t T = x.size(0), K = w_.in_features(), N = w_.out_features();
  check_float(x, "LinearLayer::forward x", {T, K}, be.device());
  check_float(out, "LinearLayer::forward out", {T, N}, be.device());

  auto plan = saved && saved->plan ? saved->plan : std::make_shared<RoutingPlan>();
  be.identity_plan(T, *plan);

  Tensor u;  // [T, r] U = x A^T
  if (lora_.defined()) {
    const Shape us{T, lora_.A.size(1)};
    u = saved ? provided_or_new(saved->u, "saved u", be.activation_dtype(), us, be.allocator())
              : be.empty(be.activation_dtype(), us);
    GroupedGemm g;
    g.plan = plan.get();
    g.a = {x};
    g.b = plain(lora_.A);
    g.out = u;
    be.grouped_gemm(g);
  }
  GroupedGemm g;
  g.plan = plan.get();
  g.a = {x};
  g.b = w_.weight;
  if (lora_.defined()) set_lora(g, u, lora_.B, lora_.scaling);
  g.bias = w_.bias;
  g.out = out;
  g.role = GemmRole::Dense;
  be.grouped_gemm(g);

  if (saved) *saved = LinearSaved{std::move(plan), std::move(u)};
}

void LinearLayer::backward(const TensorView& x, const LinearSaved& saved, const TensorView& grad_out,
                           const LinearGrads& grads) const {
  Backend& be = *backend_;
  const Device dev = be.device();
  FP8MOE_CHECK(x.defined() && x.rank() == 2, "LinearLayer::backward tensor x: expected [T, K], found ",
               x.defined() ? x.str() : std::string("no tensor"));
  const int64_t T = x.size(0), K = w_.in_features(), N = w_.out_features();
  check_float(x, "LinearLayer::backward x", {T, K}, dev);
  check_float(grad_out, "LinearLayer::backward grad_out", {T, N}, dev);
  FP8MOE_CHECK(saved.plan && saved.plan->tokens == T && saved.plan->experts == 1,
               "LinearLayer::backward: saved state is missing or from another batch (expected a plan of ", T,
               " rows); pass the LinearSaved filled by forward on the same input");
  if (grads.input.defined()) check_float(grads.input, "LinearLayer::backward grads.input", {T, K}, dev);
  FP8MOE_CHECK(lora_.defined() || (!grads.A.defined() && !grads.B.defined()),
               "LinearLayer::backward: LoRA gradients requested, but the layer has no LoRA adapter");
  if (grads.A.defined()) check_float(grads.A, "LinearLayer::backward grads.A", lora_.A.shape, dev);
  if (grads.B.defined()) {
    check_float(grads.B, "LinearLayer::backward grads.B", lora_.B.shape, dev);
    FP8MOE_CHECK(saved.u.defined() && saved.u.shape() == Shape({T, lora_.A.size(1)}),
                 "LinearLayer::backward: saved.u expected [", T, ", ", lora_.A.size(1), "], found ",
                 saved.u.defined() ? saved.u.view().str() : std::string("nothing"));
  }
  const RoutingPlan* plan = saved.plan.get();
  const double s = lora_.scaling;

  Tensor q;  // [T, r] Q = G B
  if (lora_.defined() && (grads.input.defined() || grads.A.defined())) {
    q = be.empty(be.activation_dtype(), {T, lora_.A.size(1)});
    GroupedGemm g;
    g.plan = plan;
    g.a = {grad_out};
    g.b = plain(lora_.B);  // [1, N, r] read as [K = N, N = r]
    g.transpose_b = true;
    g.out = q;
    be.grouped_gemm(g);
  }
  if (grads.B.defined()) be.grouped_outer(outer(plan, {grad_out}, {saved.u}, TensorView(), s, grads.B));
  if (grads.A.defined()) be.grouped_outer(outer(plan, {q}, {x}, TensorView(), s, grads.A));
  if (grads.input.defined()) {
    GroupedGemm g;  // dx = G W + s Q A
    g.plan = plan;
    g.a = {grad_out};
    g.b = w_.weight;  // [1, N, K] read as [K = N, N = K]
    g.transpose_b = true;
    if (lora_.defined()) set_lora(g, q, lora_.A, s);  // A [1, r, K]: the [E, r, N] form
    g.out = grads.input;
    be.grouped_gemm(g);
  }
}

}  // namespace fp8moe

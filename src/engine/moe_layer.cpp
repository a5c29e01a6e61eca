// The MoE expert layer, forward and backward, written once against the Backend interface.
//
// Forward (X [T, H], ids/w [T, k]; M = T*k rows in expert order, s = LoRA scaling):
//   plan  = build_plan(ids)
//   U     = Xp A_gu^T                                   [M, r]   (LoRA on gate_up)
//   H1    = Xp Wgu^T + s U B_gu^T + b_gu                [M, 2I]  (GEMM1, kept as aux)
//   Act   = act(H1)                                     [M, I]   (GEMM1's GLU epilogue; where
//                                                                 GEMM2 runs W8A8, also its FP8 codes)
//   V     = Act A_d^T                                   [M, r]   (LoRA on down)
//   Y     = Act Wd^T + s V B_d^T + b_d                  [M, H]   (GEMM2, unweighted)
//   out_t = sum_j w_tj Y_row(t,j)                       [T, H]   (combine)
// Xp (the input gathered into expert order) is never materialised: every consumer reads X "by
// token" through the plan.
//
// What forward saves for backward, and why (MoeSaved):
//   plan  - backward walks the same rows; rebuilding it would repeat the sort.
//   H1    - the activation's backward needs the pre-activation; saving it (M x 2I) avoids
//           recomputing GEMM1, the largest GEMM of the layer.
//   Act   - the down-LoRA gradient dA_d reduces Q^T Act; recomputing it would also need H1.
//   Y     - the unweighted expert output: dL/dw_tj = <G_t, Y_row(t,j)> is one dot per pair.
//   U, V  - the LoRA low-rank intermediates, M x r each (small); they give dB_gu and dB_d.
//   Xp is not saved: backward re-reads the layer input X through the plan (the caller passes the
//   same MoeInputs to backward), which costs nothing but a gather.
//
// Backward (base frozen; G = dL/dout [T, H]):
//   dw    = pair_dot(G, Y)                                       [T, k]
//   Q     = G_tok B_d                                            [M, r]
//   dH1   = act'(H1) * (w (G_tok Wd + s Q A_d))                  [M, 2I]  (dgrad2 + GLU backward)
//   dB_d  = s sum w G_tok^T V,   dA_d = s sum w Q^T Act          per expert
//   R     = dH1 B_gu                                             [M, r]
//   dB_gu = s sum dH1^T U,       dA_gu = s sum R^T Xp            per expert
//   dXp   = dH1 Wgu + s R A_gu                                   [M, H]   (dgrad1)
//   dX_t  = sum_j dXp_row(t,j)                                   [T, H]
// Each step runs only when a requested gradient needs it.
#include "fp8moe/moe.hpp"

#include <string>
#include <utility>

#include "fp8moe/backend.hpp"
#include "engine/layer_parts.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

using namespace engine;

namespace {

struct Dims {
  int64_t T, k, E, H, I;
  int64_t M() const { return T * k; }
};

Dims check_inputs(const MoeInputs& in, const ExpertWeights& w, Device dev, const char* op) {
  const std::string p = std::string(op) + " ";
  FP8MOE_CHECK(in.hidden.defined() && in.hidden.rank() == 2, p, "tensor hidden: expected [T, H], found ",
               in.hidden.defined() ? in.hidden.str() : std::string("no tensor"));
  FP8MOE_CHECK(in.topk_ids.defined() && in.topk_ids.rank() == 2, p, "tensor topk_ids: expected [T, k], found ",
               in.topk_ids.defined() ? in.topk_ids.str() : std::string("no tensor"));
  const Dims d{in.hidden.size(0), in.topk_ids.size(1), w.experts(), w.hidden(), w.intermediate()};
  check_float(in.hidden, p + "hidden", {d.T, d.H}, dev);
  check_shape(in.topk_ids, (p + "topk_ids").c_str(), {d.T, d.k});
  check_dtype(in.topk_ids, (p + "topk_ids").c_str(), {DType::I32, DType::I64});
  FP8MOE_CHECK(in.topk_ids.device == dev, p, "tensor topk_ids: expected it on the backend's device (",
               device_name(dev), "), found ", in.topk_ids.str());
  FP8MOE_CHECK(d.k >= 1, p, "tensor topk_ids ", in.topk_ids.str(), ": need at least one expert per token");
  check_float(in.topk_weights, p + "topk_weights", {d.T, d.k}, dev);
  // Flattened to [T*k] as the per-pair row scale of backward.
  check_contiguous(in.topk_weights, (p + "topk_weights").c_str());
  return d;
}

}  // namespace

MoeLayer::MoeLayer(Backend& backend, ExpertWeights weights, LoraAdapters lora)
    : backend_(&backend), w_(std::move(weights)), lora_(std::move(lora)) {
  w_.validate();
  lora_.validate(w_);
  check_weights_on_backend(w_.gate_up.data, backend, "MoeLayer");
}

void MoeLayer::forward(const MoeInputs& in, const TensorView& out, MoeSaved* saved) const {
  Backend& be = *backend_;
  const Dims d = check_inputs(in, w_, be.device(), "MoeLayer::forward");
  check_float(out, "MoeLayer::forward out", {d.T, d.H}, be.device());
  const DType adt = be.activation_dtype();
  const int64_t M = d.M();

  // Buffers the caller supplied in `saved` (MoeLayer::saved_layout) are written in place.
  auto plan = saved && saved->plan ? saved->plan : std::make_shared<RoutingPlan>();
  be.build_plan(in.topk_ids, d.E, *plan);
  Allocator& alloc = be.allocator();
  const auto keep = [&](Tensor MoeSaved::*field, const char* name, const Shape& shape) {
    return saved ? provided_or_new(saved->*field, name, adt, shape, alloc) : be.empty(adt, shape);
  };
  const GemmOperand x_tok{in.hidden, RowSource::Tokens};  // Xp, read by token

  Tensor u;  // [M, r] U = Xp A_gu^T
  if (lora_.has_gate_up()) {
    u = keep(&MoeSaved::u, "saved u", {M, lora_.gate_up_A.size(1)});
    GroupedGemm g;
    g.plan = plan.get();
    g.a = x_tok;
    g.b = plain(lora_.gate_up_A);
    g.out = u;
    be.grouped_gemm(g);
  }

  Tensor h1 = saved ? keep(&MoeSaved::h1, "saved h1", {M, 2 * d.I}) : Tensor();  // [M, 2I] pre-activation, for backward only
  Tensor act = keep(&MoeSaved::act, "saved act", {M, d.I});                       // [M, I]
  Tensor v = lora_.has_down() ? keep(&MoeSaved::v, "saved v", {M, lora_.down_A.size(1)}) : Tensor();  // [M, r] V = Act A_d^T
  Tensor y = keep(&MoeSaved::y, "saved y", {M, d.H});                             // [M, H] unweighted expert outputs

  GroupedGemm g2;  // GEMM2 + LoRA + bias, run after V
  g2.plan = plan.get();
  g2.a = {act};
  g2.b = w_.down;
  if (lora_.has_down()) set_lora(g2, v, lora_.down_B, lora_.scaling);
  g2.bias = w_.down_bias;
  g2.out = y;
  g2.role = GemmRole::ExpertDown;
  // Where GEMM2 runs on FP8 activations, GEMM1 writes them next to Act (its epilogue holds the
  // values), which saves GEMM2 a quantize pass over Act.
  Tensor act_codes, act_scales;
  if (be.takes_fp8_rows(g2)) {
    act_codes = be.empty(DType::F8_E4M3, {M, d.I});
    act_scales = be.empty(DType::F32, {M, (d.I + kFp8RowGroup - 1) / kFp8RowGroup});
    g2.a.fp8 = {act_codes, act_scales};
  }

  {
    GroupedGemm g;  // GEMM1 + LoRA + bias + activation
    g.plan = plan.get();
    g.a = x_tok;
    g.b = w_.gate_up;
    if (lora_.has_gate_up()) set_lora(g, u, lora_.gate_up_B, lora_.scaling);
    g.bias = w_.gate_up_bias;
    g.epilogue = Epilogue::GluForward;
    g.act = w_.act;
    g.aux = h1;
    g.out = act;
    g.out_fp8 = g2.a.fp8;
    g.role = GemmRole::ExpertUp;
    be.grouped_gemm(g);
  }

  if (lora_.has_down()) {
    GroupedGemm g;
    g.plan = plan.get();
    g.a = {act};
    g.b = plain(lora_.down_A);
    g.out = v;
    be.grouped_gemm(g);
  }
  be.grouped_gemm(g2);

  Combine c;
  c.plan = plan.get();
  c.rows = y;
  c.weights = in.topk_weights;
  c.out = out;
  be.combine(c);

  if (saved) *saved = MoeSaved{std::move(plan), std::move(h1), std::move(act), std::move(y), std::move(u), std::move(v)};
}

std::vector<BufferSpec> MoeLayer::saved_layout(DType activation, int64_t E, int64_t H, int64_t I, int64_t r_gate_up,
                                               int64_t r_down) {
  std::vector<BufferSpec> l = {
      {"offsets", DType::I32, {E + 1}},             {"sorted_pairs", DType::I32, {kPairs}},
      {"row_of_pair", DType::I32, {kPairs}},        {"h1", activation, {kPairs, 2 * I}},
      {"act", activation, {kPairs, I}},             {"y", activation, {kPairs, H}},
  };
  if (r_gate_up > 0) l.push_back({"u", activation, {kPairs, r_gate_up}});
  if (r_down > 0) l.push_back({"v", activation, {kPairs, r_down}});
  return l;
}

std::vector<BufferSpec> MoeLayer::saved_layout() const {
  return saved_layout(backend_->activation_dtype(), w_.experts(), w_.hidden(), w_.intermediate(),
                      lora_.has_gate_up() ? lora_.gate_up_A.size(1) : 0, lora_.has_down() ? lora_.down_A.size(1) : 0);
}

void MoeLayer::backward(const MoeInputs& in, const MoeSaved& saved, const TensorView& grad_out,
                        const MoeGrads& grads) const {
  Backend& be = *backend_;
  const Device dev = be.device();
  const Dims d = check_inputs(in, w_, dev, "MoeLayer::backward");
  const int64_t M = d.M();
  check_float(grad_out, "MoeLayer::backward grad_out", {d.T, d.H}, dev);
  if (grads.hidden.defined()) check_float(grads.hidden, "MoeLayer::backward grads.hidden", {d.T, d.H}, dev);
  if (grads.topk_weights.defined())
    check_float(grads.topk_weights, "MoeLayer::backward grads.topk_weights", {d.T, d.k}, dev);

  const LoraGrads& lg = grads.lora;
  const auto check_lora_grad = [&](const TensorView& g, const TensorView& param, const char* name) {
    if (!g.defined()) return;
    FP8MOE_CHECK(param.defined(), "MoeLayer::backward grads.lora.", name, " requested, but the layer has no LoRA ",
                 name, " adapter");
    check_float(g, std::string("MoeLayer::backward grads.lora.") + name, param.shape, dev);
  };
  check_lora_grad(lg.gate_up_A, lora_.gate_up_A, "gate_up_A");
  check_lora_grad(lg.gate_up_B, lora_.gate_up_B, "gate_up_B");
  check_lora_grad(lg.down_A, lora_.down_A, "down_A");
  check_lora_grad(lg.down_B, lora_.down_B, "down_B");

  // Which intermediates the requested gradients need.
  const bool need_dh1 = grads.hidden.defined() || lg.gate_up_A.defined() || lg.gate_up_B.defined();
  const bool need_q = lora_.has_down() && (need_dh1 || lg.down_A.defined());
  const bool need_r = lora_.has_gate_up() && (grads.hidden.defined() || lg.gate_up_A.defined());

  FP8MOE_CHECK(saved.plan && saved.plan->tokens == d.T && saved.plan->top_k == d.k && saved.plan->experts == d.E,
               "MoeLayer::backward: saved state is missing or from another batch (expected a plan for T = ", d.T,
               ", k = ", d.k, ", E = ", d.E, "); pass the MoeSaved filled by forward on the same inputs");
  const auto check_saved = [&](const Tensor& t, const char* name, const Shape& shape) {
    FP8MOE_CHECK(t.defined() && t.shape() == shape, "MoeLayer::backward: saved.", name, " expected ", shape.str(),
                 ", found ", t.defined() ? t.view().str() : std::string("nothing"));
  };
  if (grads.topk_weights.defined()) check_saved(saved.y, "y", {M, d.H});
  if (need_dh1) check_saved(saved.h1, "h1", {M, 2 * d.I});
  if (lg.down_A.defined()) check_saved(saved.act, "act", {M, d.I});
  if (lg.down_B.defined()) check_saved(saved.v, "v", {M, lora_.down_A.size(1)});
  if (lg.gate_up_B.defined()) check_saved(saved.u, "u", {M, lora_.gate_up_A.size(1)});

  const RoutingPlan* plan = saved.plan.get();
  const DType adt = be.activation_dtype();
  const double s = lora_.scaling;
  const TensorView w_flat = in.topk_weights.reshape({M});  // [T*k] routing weight of pair p
  const GemmOperand g_tok{grad_out, RowSource::Tokens};     // G, read by token
  const GemmOperand x_tok{in.hidden, RowSource::Tokens};    // Xp, read by token

  if (grads.topk_weights.defined()) {
    PairDot pd;  // dL/dw_tj = <G_t, Y_row(t,j)>
    pd.plan = plan;
    pd.tokens = grad_out;
    pd.rows = saved.y;
    pd.out = grads.topk_weights;
    be.pair_dot(pd);
  }

  Tensor q;  // [M, r] Q = G B_d
  if (need_q) {
    q = be.empty(adt, {M, lora_.down_B.size(2)});
    GroupedGemm g;
    g.plan = plan;
    g.a = g_tok;
    g.b = plain(lora_.down_B);  // [E, H, r] read as [K = H, N = r]
    g.transpose_b = true;
    g.out = q;
    be.grouped_gemm(g);
  }

  Tensor dh1;  // [M, 2I] dL/dH1
  if (need_dh1) {
    GroupedGemm g;  // dgrad2 + LoRA + routing weight + activation backward
    dh1 = be.empty(adt, {M, 2 * d.I});
    g.plan = plan;
    g.a = g_tok;
    g.b = w_.down;  // [E, H, I] read as [K = H, N = I]
    g.transpose_b = true;
    if (lora_.has_down()) set_lora(g, q, lora_.down_A, s);  // A_d [E, r, I]: the [E, r, N] form
    g.row_scale = w_flat;
    g.epilogue = Epilogue::GluBackward;
    g.act = w_.act;
    g.aux = saved.h1;
    g.out = dh1;
    be.grouped_gemm(g);
  }

  if (lg.down_B.defined()) be.grouped_outer(outer(plan, g_tok, {saved.v}, w_flat, s, lg.down_B));
  if (lg.down_A.defined()) be.grouped_outer(outer(plan, {q}, {saved.act}, w_flat, s, lg.down_A));

  Tensor r;  // [M, r] R = dH1 B_gu
  if (need_r) {
    r = be.empty(adt, {M, lora_.gate_up_B.size(2)});
    GroupedGemm g;
    g.plan = plan;
    g.a = {dh1};
    g.b = plain(lora_.gate_up_B);  // [E, 2I, r] read as [K = 2I, N = r]
    g.transpose_b = true;
    g.out = r;
    be.grouped_gemm(g);
  }
  if (lg.gate_up_B.defined()) be.grouped_outer(outer(plan, {dh1}, {saved.u}, TensorView(), s, lg.gate_up_B));
  if (lg.gate_up_A.defined()) be.grouped_outer(outer(plan, {r}, x_tok, TensorView(), s, lg.gate_up_A));

  if (grads.hidden.defined()) {
    Tensor dxp = be.empty(adt, {M, d.H});  // [M, H] dL/dXp
    GroupedGemm g;  // dgrad1 + LoRA
    g.plan = plan;
    g.a = {dh1};
    g.b = w_.gate_up;  // [E, 2I, H] read as [K = 2I, N = H]
    g.transpose_b = true;
    if (lora_.has_gate_up()) set_lora(g, r, lora_.gate_up_A, s);  // A_gu [E, r, H]: the [E, r, N] form
    g.out = dxp;
    be.grouped_gemm(g);

    Combine c;  // dX_t = sum_j dXp_row(t,j): the gather's adjoint, unweighted
    c.plan = plan;
    c.rows = dxp;
    c.out = grads.hidden;
    be.combine(c);
  }
}

}  // namespace fp8moe

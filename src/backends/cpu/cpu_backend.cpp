// The CPU backend: every operation of backend.hpp written literally from its definition, in
// double precision, one row at a time. It is the oracle the CUDA backend is checked against, so it
// favours being obviously correct over being fast: no blocking, no threads, no shortcuts.
//
// Inputs and outputs may be any float dtype (F64/F32/F16/BF16/FP8) and any strides; weights are
// read through QuantTensor::at (exact dequantization). Intermediates the engine allocates here are
// F64, so a whole forward/backward runs in double.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "fp8moe/backend.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

namespace {

// ---- element access honouring strides ----------------------------------------------------------

int64_t offset_of(const TensorView& v, int64_t linear) {  // row-major linear index -> element offset
  int64_t off = 0;
  for (int d = v.rank() - 1; d >= 0; --d) {
    const int64_t n = v.shape[d];
    off += (linear % n) * v.strides[d];
    linear /= n;
  }
  return off;
}
double ld(const TensorView& v, int64_t i) { return load_as_double(v.data, v.dtype, i * v.strides[0]); }
double ld(const TensorView& v, int64_t i, int64_t j) {
  return load_as_double(v.data, v.dtype, i * v.strides[0] + j * v.strides[1]);
}
void st(const TensorView& v, int64_t i, int64_t j, double x) {
  store_from_double(v.data, v.dtype, i * v.strides[0] + j * v.strides[1], x);
}
void st(const TensorView& v, int64_t i, int64_t j, int64_t l, double x) {
  store_from_double(v.data, v.dtype, i * v.strides[0] + j * v.strides[1] + l * v.strides[2], x);
}

// ---- argument checks (each names the operation and the operand) ---------------------------------

void expect_host(const TensorView& v, const std::string& name) {
  FP8MOE_CHECK(v.device == Device::CPU, name, ": the CPU backend needs host memory, found ", v.str());
}
void expect_float(const TensorView& v, const std::string& name, const Shape& shape) {
  FP8MOE_CHECK(v.defined(), name, ": required tensor is missing (expected ", shape.str(), ")");
  expect_host(v, name);
  check_shape(v, name.c_str(), shape);
  FP8MOE_CHECK(is_float(v.dtype), name, ": expected a float dtype, found ", v.str());
}
void expect_weight(const QuantTensor& q, const std::string& name, int64_t experts) {
  q.validate(name.c_str());
  expect_host(q.data, name);
  FP8MOE_CHECK(q.data.size(0) == experts, name, ": expected ", experts, " experts (the plan's), found ", q.data.str());
}

const RoutingPlan& checked_plan(const RoutingPlan* p, const char* op) {
  FP8MOE_CHECK(p != nullptr, op, ": no routing plan given");
  FP8MOE_CHECK(p->offsets.defined() && p->offsets.device() == Device::CPU && p->offsets.dtype() == DType::I32,
               op, ": the routing plan was not built by the CPU backend");
  return *p;
}

// Plan accessors: [offsets[e], offsets[e+1]) are expert e's rows; pair(r) is the pair of row r.
struct PlanView {
  const RoutingPlan& p;
  const int32_t* offsets;
  const int32_t* sorted_pairs;
  const int32_t* row_of_pair;
  explicit PlanView(const RoutingPlan& plan)
      : p(plan),
        offsets(plan.offsets.ptr<int32_t>()),
        sorted_pairs(plan.sorted_pairs.ptr<int32_t>()),
        row_of_pair(plan.row_of_pair.ptr<int32_t>()) {}
  int64_t pair(int64_t r) const { return sorted_pairs[r]; }
  int64_t token(int64_t r) const { return sorted_pairs[r] / p.top_k; }
};

// The operand's source row for row r (Rows: r itself; Tokens: the row's token).
int64_t src_row(const GemmOperand& o, const PlanView& pv, int64_t r) {
  return o.rows == RowSource::Rows ? r : pv.token(r);
}
void expect_operand(const GemmOperand& o, const std::string& name, const RoutingPlan& p, int64_t cols) {
  const int64_t rows = o.rows == RowSource::Rows ? p.rows() : p.tokens;
  expect_float(o.src, name + (o.rows == RowSource::Rows ? " (by rows)" : " (by tokens)"), {rows, cols});
}
std::vector<double> load_row(const TensorView& v, int64_t i) {
  std::vector<double> row(static_cast<size_t>(v.size(1)));
  for (int64_t j = 0; j < v.size(1); ++j) row[j] = ld(v, i, j);
  return row;
}
// Per-pair factor of row r (1 when absent).
double row_factor(const TensorView& row_scale, const PlanView& pv, int64_t r) {
  return row_scale.defined() ? ld(row_scale, pv.pair(r)) : 1.0;
}

// ---- activation ---------------------------------------------------------------------------------

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

double act_forward(const ActivationSpec& a, double gate, double up) {
  if (a.kind == Activation::SiluGlu) return gate * sigmoid(gate) * up;
  const double alpha = a.alpha, limit = a.limit;
  const double g = std::min(gate, limit), u = std::clamp(up, -limit, limit);
  return (u + 1.0) * g * sigmoid(alpha * g);
}

// d act / d gate and d act / d up. GPT-OSS clamps follow torch.clamp's gradient (the reference
// implementation clamps with it): the gradient passes where min <= x <= max, boundaries included,
// and is 0 strictly outside.
void act_backward(const ActivationSpec& a, double gate, double up, double& dgate, double& dup) {
  if (a.kind == Activation::SiluGlu) {
    const double s = sigmoid(gate);
    dgate = s * (1.0 + gate * (1.0 - s)) * up;
    dup = gate * s;
    return;
  }
  const double alpha = a.alpha, limit = a.limit;
  const double g = std::min(gate, limit), u = std::clamp(up, -limit, limit);
  const double s = sigmoid(alpha * g);
  dgate = gate <= limit ? (u + 1.0) * (s + alpha * g * s * (1.0 - s)) : 0.0;
  dup = (up >= -limit && up <= limit) ? g * s : 0.0;
}

// ---- routers ------------------------------------------------------------------------------------

// Indices of the k largest keys, ties to the lower index, in descending key order.
std::vector<int64_t> top_k(const std::vector<double>& key, int64_t k) {
  std::vector<int64_t> idx(key.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

void check_router(const RouterSpec& r, const TensorView& logits, const char* op) {
  FP8MOE_CHECK(logits.defined() && logits.rank() == 2, op, ": logits must be [T, E], found ",
               logits.defined() ? logits.str() : std::string("no tensor"));
  expect_float(logits, std::string(op) + " logits", logits.shape);
  const int64_t E = logits.size(1);
  FP8MOE_CHECK(r.top_k >= 1 && r.top_k <= E, op, ": top_k must be in [1, ", E, "] for ", E, " experts, found ",
               r.top_k);
  if (r.kind == RouterKind::SigmoidBiasTopK) {
    if (r.correction_bias.defined()) expect_float(r.correction_bias, std::string(op) + " correction_bias", {E});
  } else {
    FP8MOE_CHECK(!r.correction_bias.defined(), op, ": correction_bias is for SigmoidBiasTopK only, router is ",
                 router_kind_name(r.kind));
    FP8MOE_CHECK(r.scaling == 1.0, op, ": scaling (routed_scaling_factor) is for SigmoidBiasTopK only, router ",
                 router_kind_name(r.kind), " has ", r.scaling);
  }
}

// Softmax of x (max-subtracted).
std::vector<double> softmax(const std::vector<double>& x) {
  const double mx = *std::max_element(x.begin(), x.end());
  std::vector<double> p(x.size());
  double sum = 0.0;
  for (size_t i = 0; i < x.size(); ++i) sum += p[i] = std::exp(x[i] - mx);
  for (double& v : p) v /= sum;
  return p;
}

// ---- the backend --------------------------------------------------------------------------------

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  Device device() const override { return Device::CPU; }
  DType activation_dtype() const override { return DType::F64; }

  void copy(const TensorView& dst, const TensorView& src) override {
    expect_host(dst, "copy dst");
    expect_host(src, "copy src");
    FP8MOE_CHECK(dst.shape == src.shape && dst.dtype == src.dtype, "copy: dst ", dst.str(), " and src ", src.str(),
                 " must have the same shape and dtype");
    const int64_t es = dtype_size(src.dtype);
    for (int64_t i = 0; i < src.numel(); ++i)
      std::memcpy(static_cast<char*>(dst.data) + offset_of(dst, i) * es,
                  static_cast<const char*>(src.data) + offset_of(src, i) * es, static_cast<size_t>(es));
  }

  void fill(const TensorView& t, double value) override {
    expect_host(t, "fill");
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data, t.dtype, offset_of(t, i), value);
  }

  void synchronize() override {}

  void build_plan(const TensorView& topk_ids, int64_t experts, RoutingPlan& plan) override {
    FP8MOE_CHECK(topk_ids.defined() && topk_ids.rank() == 2, "build_plan: topk_ids must be [T, k], found ",
                 topk_ids.defined() ? topk_ids.str() : std::string("no tensor"));
    expect_host(topk_ids, "build_plan topk_ids");
    check_dtype(topk_ids, "topk_ids", {DType::I32, DType::I64});
    FP8MOE_CHECK(experts >= 1, "build_plan: need at least one expert, found ", experts);
    const int64_t T = topk_ids.size(0), k = topk_ids.size(1), M = T * k;
    FP8MOE_CHECK(M < (int64_t{1} << 31), "build_plan: ", M, " (token, slot) pairs overflow the I32 plan");

    std::vector<int64_t> expert_of(static_cast<size_t>(M));  // [M] expert of pair p
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const double id = ld(topk_ids, t, j);
        FP8MOE_CHECK(id >= 0 && id < static_cast<double>(experts), "tensor topk_ids ", topk_ids.str(), ": entry [", t,
                     ", ", j, "] = ", static_cast<int64_t>(id), " is outside the expert range [0, ", experts, ")");
        expert_of[t * k + j] = static_cast<int64_t>(id);
      }

    provide_plan_tensors(plan, T, k, experts, allocator());
    std::fill_n(plan.offsets.ptr<int32_t>(), experts + 1, 0);
    auto* off = plan.offsets.ptr<int32_t>();
    for (int64_t p = 0; p < M; ++p) ++off[expert_of[p] + 1];
    for (int64_t e = 0; e < experts; ++e) off[e + 1] += off[e];
    // Counting sort, pairs visited in increasing order: stable by pair index within an expert.
    std::vector<int64_t> next(off, off + experts);
    auto* sorted = plan.sorted_pairs.ptr<int32_t>();
    auto* row_of = plan.row_of_pair.ptr<int32_t>();
    for (int64_t p = 0; p < M; ++p) {
      const int64_t r = next[expert_of[p]]++;
      sorted[r] = static_cast<int32_t>(p);
      row_of[p] = static_cast<int32_t>(r);
    }
  }

  void identity_plan(int64_t rows, RoutingPlan& plan) override {
    FP8MOE_CHECK(rows >= 0 && rows < (int64_t{1} << 31), "identity_plan: ", rows, " rows overflow the I32 plan");
    provide_plan_tensors(plan, rows, 1, 1, allocator());
    plan.offsets.ptr<int32_t>()[0] = 0;
    plan.offsets.ptr<int32_t>()[1] = static_cast<int32_t>(rows);
    for (int64_t r = 0; r < rows; ++r) plan.sorted_pairs.ptr<int32_t>()[r] = plan.row_of_pair.ptr<int32_t>()[r] = static_cast<int32_t>(r);
  }

  void grouped_gemm(const GroupedGemm& g) override {
    const RoutingPlan& plan = checked_plan(g.plan, "grouped_gemm");
    const PlanView pv(plan);
    const int64_t E = plan.experts, M = plan.rows();
    expect_weight(g.b, "grouped_gemm b", E);
    const int64_t N = g.transpose_b ? g.b.data.size(2) : g.b.data.size(1);
    const int64_t K = g.transpose_b ? g.b.data.size(1) : g.b.data.size(2);
    expect_operand(g.a, "grouped_gemm a", plan, K);

    const bool lora = g.lora_a.defined();
    FP8MOE_CHECK(lora == g.lora_b.defined(), "grouped_gemm: lora_a and lora_b must be given together");
    int64_t R = 0;
    if (lora) {
      FP8MOE_CHECK(g.lora_a.src.rank() == 2, "grouped_gemm lora_a: expected [*, r], found ", g.lora_a.src.str());
      R = g.lora_a.src.size(1);
      expect_operand(g.lora_a, "grouped_gemm lora_a", plan, R);
      expect_float(g.lora_b, g.transpose_b ? "grouped_gemm lora_b [E, r, N]" : "grouped_gemm lora_b [E, N, r]",
                   g.transpose_b ? Shape{E, R, N} : Shape{E, N, R});
    }
    if (g.row_scale.defined()) expect_float(g.row_scale, "grouped_gemm row_scale", {M});
    if (g.bias.defined()) expect_float(g.bias, "grouped_gemm bias", {E, N});

    switch (g.epilogue) {
      case Epilogue::Store: expect_float(g.out, "grouped_gemm out (Store)", {M, N}); break;
      case Epilogue::GluForward:
        FP8MOE_CHECK(N % 2 == 0, "grouped_gemm GluForward: N = ", N, " must be even (gate and up rows)");
        expect_float(g.out, "grouped_gemm out (GluForward)", {M, N / 2});
        if (g.aux.defined()) expect_float(g.aux, "grouped_gemm aux (GluForward)", {M, N});
        break;
      case Epilogue::GluBackward:
        expect_float(g.out, "grouped_gemm out (GluBackward)", {M, 2 * N});
        expect_float(g.aux, "grouped_gemm aux (GluBackward)", {M, 2 * N});
        break;
    }

    // a.fp8 is for FP8 paths (this oracle reads A itself); out_fp8 is written from out at the end.
    if (g.a.fp8.defined()) {
      FP8MOE_CHECK(g.a.rows == RowSource::Rows, "grouped_gemm a.fp8: given for an operand read by token");
      check_fp8_rows(g.a.fp8, "grouped_gemm a.fp8", M, K, Device::CPU);
    }
    if (g.out_fp8.defined()) {
      check_fp8_rows(g.out_fp8, "grouped_gemm out_fp8", M, g.out.size(1), Device::CPU);
      check_contiguous(g.out, "grouped_gemm out (with out_fp8)");
    }

    std::vector<double> w(static_cast<size_t>(N * K));   // [N, K] W_e
    std::vector<double> lb(static_cast<size_t>(N * R));  // [N, r] LB_e
    std::vector<double> v(static_cast<size_t>(N));       // [N] pre-epilogue row
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = pv.offsets[e], r1 = pv.offsets[e + 1];
      if (r0 == r1) continue;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t kk = 0; kk < K; ++kk) w[n * K + kk] = g.transpose_b ? g.b.at(e, kk, n) : g.b.at(e, n, kk);
      const TensorView lbe = lora ? g.lora_b.select0(e) : TensorView();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t q = 0; q < R; ++q) lb[n * R + q] = g.transpose_b ? ld(lbe, q, n) : ld(lbe, n, q);

      for (int64_t r = r0; r < r1; ++r) {
        const std::vector<double> a = load_row(g.a.src, src_row(g.a, pv, r));
        const std::vector<double> l = lora ? load_row(g.lora_a.src, src_row(g.lora_a, pv, r)) : std::vector<double>();
        const double rs = row_factor(g.row_scale, pv, r);
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0.0;
          for (int64_t kk = 0; kk < K; ++kk) acc += a[kk] * w[n * K + kk];
          double delta = 0.0;
          for (int64_t q = 0; q < R; ++q) delta += l[q] * lb[n * R + q];
          v[n] = rs * (acc + g.lora_scale * delta) + (g.bias.defined() ? ld(g.bias, e, n) : 0.0);
        }
        epilogue(g, r, N, v);
      }
    }
    if (g.out_fp8.defined()) {  // the rows that hold a product (past offsets[E]: pairs of out-of-range ids)
      const int64_t rows = pv.offsets[E];
      const auto head = [rows](const TensorView& t) { return TensorView(t.data, t.dtype, {rows, t.size(1)}, t.device); };
      quantize_activations(head(g.out), kFp8RowGroup, head(g.out_fp8.codes), head(g.out_fp8.scales));
    }
  }

  void grouped_outer(const GroupedOuter& g) override {
    const RoutingPlan& plan = checked_plan(g.plan, "grouped_outer");
    const PlanView pv(plan);
    FP8MOE_CHECK(g.left.src.rank() == 2 && g.right.src.rank() == 2, "grouped_outer: left and right must be rank 2, found ",
                 g.left.src.str(), " and ", g.right.src.str());
    const int64_t E = plan.experts, N = g.left.src.size(1), Q = g.right.src.size(1);
    expect_operand(g.left, "grouped_outer left", plan, N);
    expect_operand(g.right, "grouped_outer right", plan, Q);
    if (g.row_scale.defined()) expect_float(g.row_scale, "grouped_outer row_scale", {plan.rows()});
    expect_float(g.out, "grouped_outer out", {E, N, Q});

    std::vector<double> acc(static_cast<size_t>(N * Q));  // [N, Q] one expert's sum
    for (int64_t e = 0; e < E; ++e) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = pv.offsets[e]; r < pv.offsets[e + 1]; ++r) {
        const std::vector<double> l = load_row(g.left.src, src_row(g.left, pv, r));
        const std::vector<double> rr = load_row(g.right.src, src_row(g.right, pv, r));
        const double s = row_factor(g.row_scale, pv, r);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t q = 0; q < Q; ++q) acc[n * Q + q] += s * l[n] * rr[q];
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t q = 0; q < Q; ++q) st(g.out, e, n, q, g.alpha * acc[n * Q + q]);
    }
  }

  void combine(const Combine& c) override {
    const RoutingPlan& plan = checked_plan(c.plan, "combine");
    const PlanView pv(plan);
    const int64_t T = plan.tokens, k = plan.top_k;
    FP8MOE_CHECK(c.rows.defined() && c.rows.rank() == 2, "combine rows: expected [M, H], found ", c.rows.str());
    const int64_t H = c.rows.size(1);
    expect_float(c.rows, "combine rows", {plan.rows(), H});
    if (c.weights.defined()) expect_float(c.weights, "combine weights", {T, k});
    expect_float(c.out, "combine out", {T, H});
    std::vector<double> acc(static_cast<size_t>(H));  // [H]
    for (int64_t t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < k; ++j) {
        const double wt = c.weights.defined() ? ld(c.weights, t, j) : 1.0;
        const int64_t r = pv.row_of_pair[t * k + j];
        for (int64_t h = 0; h < H; ++h) acc[h] += wt * ld(c.rows, r, h);
      }
      for (int64_t h = 0; h < H; ++h) st(c.out, t, h, acc[h]);
    }
  }

  void pair_dot(const PairDot& d) override {
    const RoutingPlan& plan = checked_plan(d.plan, "pair_dot");
    const PlanView pv(plan);
    const int64_t T = plan.tokens, k = plan.top_k;
    FP8MOE_CHECK(d.tokens.defined() && d.tokens.rank() == 2, "pair_dot tokens: expected [T, H], found ", d.tokens.str());
    const int64_t H = d.tokens.size(1);
    expect_float(d.tokens, "pair_dot tokens", {T, H});
    expect_float(d.rows, "pair_dot rows", {plan.rows(), H});
    expect_float(d.out, "pair_dot out", {T, k});
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = pv.row_of_pair[t * k + j];
        double acc = 0.0;
        for (int64_t h = 0; h < H; ++h) acc += ld(d.tokens, t, h) * ld(d.rows, r, h);
        st(d.out, t, j, acc);
      }
  }

  void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& weights) override {
    check_router(r, logits, "route");
    const int64_t T = logits.size(0), E = logits.size(1), k = r.top_k;
    expect_host(ids, "route ids");
    check_shape(ids, "route ids", {T, k});
    check_dtype(ids, "route ids", {DType::I32});
    expect_float(weights, "route weights", {T, k});
    for (int64_t t = 0; t < T; ++t) {
      const std::vector<double> x = load_row(logits, t);  // [E]
      std::vector<int64_t> sel;
      std::vector<double> w(static_cast<size_t>(k));
      switch (r.kind) {
        case RouterKind::SoftmaxTopK: {
          const std::vector<double> p = softmax(x);
          sel = top_k(p, k);
          double sum = 0.0;
          for (int64_t j = 0; j < k; ++j) sum += w[j] = p[sel[j]];
          if (r.normalize)
            for (double& v : w) v /= sum;
          break;
        }
        case RouterKind::SigmoidBiasTopK: {
          std::vector<double> s(static_cast<size_t>(E)), key(static_cast<size_t>(E));
          for (int64_t e = 0; e < E; ++e) {
            s[e] = sigmoid(x[e]);
            key[e] = s[e] + (r.correction_bias.defined() ? ld(r.correction_bias, e) : 0.0);
          }
          sel = top_k(key, k);
          double sum = 0.0;
          for (int64_t j = 0; j < k; ++j) sum += w[j] = s[sel[j]];
          for (double& v : w) v = (r.normalize ? v / (sum + 1e-20) : v) * r.scaling;
          break;
        }
        case RouterKind::TopKSoftmax: {
          sel = top_k(x, k);
          std::vector<double> kept(static_cast<size_t>(k));
          for (int64_t j = 0; j < k; ++j) kept[j] = x[sel[j]];
          w = softmax(kept);
          break;
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        st(ids, t, j, static_cast<double>(sel[j]));
        st(weights, t, j, w[j]);
      }
    }
  }

  // The exact Jacobian-vector product of the weights w.r.t. the logits, the selection held fixed.
  void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                      const TensorView& grad_weights, const TensorView& grad_logits) override {
    check_router(r, logits, "route_backward");
    const int64_t T = logits.size(0), E = logits.size(1), k = r.top_k;
    expect_host(ids, "route_backward ids");
    check_shape(ids, "route_backward ids", {T, k});
    check_dtype(ids, "route_backward ids", {DType::I32, DType::I64});
    expect_float(grad_weights, "route_backward grad_weights", {T, k});
    expect_float(grad_logits, "route_backward grad_logits", {T, E});
    for (int64_t t = 0; t < T; ++t) {
      const std::vector<double> x = load_row(logits, t);     // [E]
      const std::vector<double> gw = load_row(grad_weights, t);  // [k]
      std::vector<int64_t> sel(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) {
        const double id = ld(ids, t, j);
        FP8MOE_CHECK(id >= 0 && id < static_cast<double>(E), "route_backward: ids[", t, ", ", j, "] = ",
                     static_cast<int64_t>(id), " is outside [0, ", E, ")");
        sel[j] = static_cast<int64_t>(id);
      }
      std::vector<double> gx(static_cast<size_t>(E), 0.0);  // [E] dL/dlogits
      switch (r.kind) {
        case RouterKind::SoftmaxTopK: {
          // w_j = p_sel(j) [/ S]; dL/dp at the selected experts, then through the full softmax.
          const std::vector<double> p = softmax(x);
          double S = 0.0, gdotw = 0.0;
          for (int64_t j = 0; j < k; ++j) S += p[sel[j]];
          for (int64_t j = 0; j < k; ++j) gdotw += gw[j] * p[sel[j]] / S;
          std::vector<double> gp(static_cast<size_t>(E), 0.0);  // [E] dL/dp
          for (int64_t j = 0; j < k; ++j) gp[sel[j]] += r.normalize ? (gw[j] - gdotw) / S : gw[j];
          double gpdotp = 0.0;
          for (int64_t e = 0; e < E; ++e) gpdotp += gp[e] * p[e];
          for (int64_t e = 0; e < E; ++e) gx[e] = p[e] * (gp[e] - gpdotp);
          break;
        }
        case RouterKind::SigmoidBiasTopK: {
          // w_j = c s_sel(j) [/ (S + 1e-20)], s = sigmoid(x): the bias only selects.
          std::vector<double> s(static_cast<size_t>(E));
          for (int64_t e = 0; e < E; ++e) s[e] = sigmoid(x[e]);
          double S = 0.0, gdots = 0.0;
          for (int64_t j = 0; j < k; ++j) {
            S += s[sel[j]];
            gdots += gw[j] * s[sel[j]];
          }
          const double D = S + 1e-20;
          for (int64_t j = 0; j < k; ++j) {
            const double gs = r.scaling * (r.normalize ? gw[j] / D - gdots / (D * D) : gw[j]);  // dL/ds
            gx[sel[j]] += gs * s[sel[j]] * (1.0 - s[sel[j]]);
          }
          break;
        }
        case RouterKind::TopKSoftmax: {
          std::vector<double> kept(static_cast<size_t>(k));
          for (int64_t j = 0; j < k; ++j) kept[j] = x[sel[j]];
          const std::vector<double> w = softmax(kept);
          double gdotw = 0.0;
          for (int64_t j = 0; j < k; ++j) gdotw += gw[j] * w[j];
          for (int64_t j = 0; j < k; ++j) gx[sel[j]] += w[j] * (gw[j] - gdotw);
          break;
        }
      }
      for (int64_t e = 0; e < E; ++e) st(grad_logits, t, e, gx[e]);
    }
  }

 protected:
  Allocator& own_allocator() override { return host_allocator(); }

 private:
  // Applies g.epilogue to the pre-epilogue row v [N] of row r.
  static void epilogue(const GroupedGemm& g, int64_t r, int64_t N, const std::vector<double>& v) {
    switch (g.epilogue) {
      case Epilogue::Store:
        for (int64_t n = 0; n < N; ++n) st(g.out, r, n, v[n]);
        return;
      case Epilogue::GluForward: {
        const int64_t I = N / 2;
        if (g.aux.defined())
          for (int64_t n = 0; n < N; ++n) st(g.aux, r, n, v[n]);
        for (int64_t j = 0; j < I; ++j) st(g.out, r, j, act_forward(g.act, v[g.act.gate_row(j, I)], v[g.act.up_row(j, I)]));
        return;
      }
      case Epilogue::GluBackward: {
        const int64_t I = N;  // v is dL/dact [N]; aux and out are [2N]
        for (int64_t j = 0; j < I; ++j) {
          const int64_t gr = g.act.gate_row(j, I), ur = g.act.up_row(j, I);
          double dg, du;
          act_backward(g.act, ld(g.aux, r, gr), ld(g.aux, r, ur), dg, du);
          st(g.out, r, gr, v[j] * dg);
          st(g.out, r, ur, v[j] * du);
        }
        return;
      }
    }
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace fp8moe

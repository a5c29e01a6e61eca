// The routers (moe.hpp RouterKind; formats.md sections 3-5): logits [T, E] -> top-k ids and
// weights, and the backward with the selection held fixed. One warp per token, fp32 math; lane l
// holds experts l, l + 32, ... (up to kPerLane each, so E <= 512).
//
// Selection: k rounds of a warp argmax over the not yet chosen experts, ties to the lower index
// (the CPU backend's rule), so ids come out in descending key order. SoftmaxTopK and TopKSoftmax
// select on the logits themselves (softmax is monotone: the same choice without the rounding of
// exp); SigmoidBiasTopK selects on sigmoid(logit) + correction_bias.
#include <cfloat>

#include "backends/cuda/cuda_backend.cuh"

namespace fp8moe::cuda {

namespace {

constexpr int kPerLane = 16;
constexpr int kMaxExperts = 32 * kPerLane;
constexpr int kRouterWarps = 4;

struct RouterArgs {
  RouterKind kind;
  int tokens, experts, top_k;
  bool normalize;
  float scaling;
  const void* logits;  // [T, E]
  DType logits_dtype;
  const float* bias;  // [E] SigmoidBiasTopK correction (nullptr: none)
  int* ids;           // [T, k] forward output; backward input
  void* weights;      // [T, k] forward output (route)
  DType weights_dtype;
  const void* grad_weights;  // [T, k] (route_backward)
  DType grad_weights_dtype;
  void* grad_logits;  // [T, E] (route_backward)
  DType grad_logits_dtype;
};

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// The lane's logits; experts past E read as -inf and are never selected (`present` false).
__device__ __forceinline__ void load_logits(const RouterArgs& a, int64_t t, int lane, float (&x)[kPerLane]) {
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int e = c * 32 + lane;
    x[c] = e < a.experts ? load_float(a.logits, a.logits_dtype, t * a.experts + e) : -FLT_MAX;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void route_kernel(RouterArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + threadIdx.x / 32;
  if (t >= a.tokens) return;
  float x[kPerLane];
  load_logits(a, t, lane, x);

  // key: what selection ranks; val: what the weights are made of (up to the normaliser).
  float key[kPerLane], val[kPerLane];
  float denom_all = 1.0f;  // SoftmaxTopK without renormalisation: the full softmax sum
  if (a.kind == RouterKind::SigmoidBiasTopK) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int e = c * 32 + lane;
      val[c] = sigmoidf(x[c]);
      key[c] = val[c] + (a.bias && e < a.experts ? a.bias[e] : 0.0f);
    }
  } else {
    float m = -FLT_MAX;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) m = fmaxf(m, x[c]);
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const bool present = c * 32 + lane < a.experts;
      key[c] = x[c];
      val[c] = present ? expf(x[c] - m) : 0.0f;
      s += val[c];
    }
    if (a.kind == RouterKind::SoftmaxTopK && !a.normalize) denom_all = warp_sum(s);
  }

  // k rounds of argmax; rank[c] = the round that picked expert (c, lane), -1 if none.
  int rank[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) rank[c] = -1;
  for (int j = 0; j < a.top_k; ++j) {
    float best = 0.0f;
    int best_e = INT_MAX;  // INT_MAX: no candidate in this lane
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int e = c * 32 + lane;
      if (e < a.experts && rank[c] < 0 && (best_e == INT_MAX || key[c] > best)) {
        best = key[c];
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      const bool take = oe != INT_MAX && (best_e == INT_MAX || ov > best || (ov == best && oe < best_e));
      best = take ? ov : best;
      best_e = take ? oe : best_e;
    }
#pragma unroll
    for (int c = 0; c < kPerLane; ++c)
      if (c * 32 + lane == best_e) rank[c] = j;
    if (lane == 0) a.ids[t * a.top_k + j] = best_e;
  }

  float sel_sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) sel_sum += rank[c] >= 0 ? val[c] : 0.0f;
  sel_sum = warp_sum(sel_sum);
  float denom = 1.0f;
  switch (a.kind) {
    case RouterKind::SoftmaxTopK: denom = a.normalize ? sel_sum : denom_all; break;
    case RouterKind::SigmoidBiasTopK: denom = a.normalize ? sel_sum + 1e-20f : 1.0f; break;
    case RouterKind::TopKSoftmax: denom = sel_sum; break;
  }
  const float factor = a.kind == RouterKind::SigmoidBiasTopK ? a.scaling : 1.0f;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c)
    if (rank[c] >= 0) store_float(a.weights, a.weights_dtype, t * a.top_k + rank[c], val[c] / denom * factor);
}

// dL/dlogits for the fixed selection ids[t, :] (the CPU backend's route_backward, in fp32).
__global__ void route_backward_kernel(RouterArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + threadIdx.x / 32;
  if (t >= a.tokens) return;
  float x[kPerLane];
  load_logits(a, t, lane, x);

  // g[c]: dL/dw of expert (c, lane) when selected (summed if an id repeats), 0 otherwise.
  float g[kPerLane];
  bool sel[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) g[c] = 0.0f, sel[c] = false;
  for (int j = 0; j < a.top_k; ++j) {
    const int e = a.ids[t * a.top_k + j];
    const float gj = load_float(a.grad_weights, a.grad_weights_dtype, t * a.top_k + j);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c)
      if (c * 32 + lane == e) g[c] += gj, sel[c] = true;
  }

  float out[kPerLane];
  if (a.kind == RouterKind::SigmoidBiasTopK) {
    // w_j = c s_j [/ (S + 1e-20)], s = sigmoid(x).
    float s[kPerLane], S = 0.0f, gs_dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      s[c] = sigmoidf(x[c]);
      S += sel[c] ? s[c] : 0.0f;
      gs_dot += sel[c] ? g[c] * s[c] : 0.0f;
    }
    const float D = warp_sum(S) + 1e-20f;
    gs_dot = warp_sum(gs_dot);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      // dL/ds_i = c (g_i D - sum_j g_j s_j) / D^2 as one fused difference: exact zero for a
      // single pick (w = c whatever s), where g_i / D - dot / D^2 would leave rounding noise.
      const float ds = a.scaling * (a.normalize ? fmaf(g[c], D, -gs_dot) / D / D : g[c]);
      out[c] = sel[c] ? ds * s[c] * (1.0f - s[c]) : 0.0f;
    }
  } else {
    // Softmax over a set (all experts for SoftmaxTopK without renormalisation, else the chosen
    // ones): p = softmax(x over the set); dL/dx_i = p_i (g_i - sum_j g_j p_j), zero off the set.
    const bool over_all = a.kind == RouterKind::SoftmaxTopK && !a.normalize;
    float m = -FLT_MAX;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c)
      if (over_all || sel[c]) m = fmaxf(m, x[c]);
    m = warp_max(m);
    float p[kPerLane], S = 0.0f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const bool in_set = (over_all && c * 32 + lane < a.experts) || sel[c];
      p[c] = in_set ? expf(x[c] - m) : 0.0f;
      S += p[c];
    }
    S = warp_sum(S);
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      p[c] /= S;
      dot += g[c] * p[c];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) out[c] = p[c] * (g[c] - dot);
  }
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int e = c * 32 + lane;
    if (e < a.experts) store_float(a.grad_logits, a.grad_logits_dtype, t * a.experts + e, out[c]);
  }
}

RouterArgs router_args(const RouterSpec& r, const TensorView& logits, const char* op) {
  FP8MOE_CHECK(logits.defined() && logits.rank() == 2, op, ": tensor logits must be [T, E], found ",
               logits.defined() ? logits.str() : std::string("no tensor"));
  check_device_operand(logits, (std::string(op) + " logits").c_str(), {DType::F32, DType::BF16, DType::F64});
  const int64_t T = logits.size(0), E = logits.size(1);
  FP8MOE_CHECK(E >= 1 && E <= kMaxExperts, op, ": the CUDA router handles 1 to ", kMaxExperts,
               " experts, logits are ", logits.str());
  FP8MOE_CHECK(r.top_k >= 1 && r.top_k <= E, op, ": top_k must be in [1, ", E, "] for ", E, " experts, found ",
               r.top_k);
  FP8MOE_CHECK(T < (int64_t{1} << 31) / E, op, ": ", T, " tokens overflow the router's indexing");
  RouterArgs a{};
  a.kind = r.kind;
  a.tokens = static_cast<int>(T);
  a.experts = static_cast<int>(E);
  a.top_k = static_cast<int>(r.top_k);
  a.normalize = r.normalize;
  a.scaling = static_cast<float>(r.scaling);
  a.logits = logits.data;
  a.logits_dtype = logits.dtype;
  if (r.kind == RouterKind::SigmoidBiasTopK) {
    if (r.correction_bias.defined()) {
      check_device_operand(r.correction_bias, "router correction_bias", {DType::F32});
      check_shape(r.correction_bias, "router correction_bias", {E});
      a.bias = r.correction_bias.ptr<const float>();
    }
  } else {
    FP8MOE_CHECK(!r.correction_bias.defined(), op, ": correction_bias is for SigmoidBiasTopK only, router is ",
                 router_kind_name(r.kind));
    FP8MOE_CHECK(r.scaling == 1.0, op, ": scaling (routed_scaling_factor) is for SigmoidBiasTopK only, router ",
                 router_kind_name(r.kind), " has ", r.scaling);
  }
  return a;
}

}  // namespace

void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& weights,
           cudaStream_t stream) {
  RouterArgs a = router_args(r, logits, "route");
  check_device_operand(ids, "route ids", {DType::I32});
  check_shape(ids, "route ids", {a.tokens, a.top_k});
  check_device_operand(weights, "route weights", {DType::F32, DType::BF16, DType::F64});
  check_shape(weights, "route weights", {a.tokens, a.top_k});
  a.ids = ids.ptr<int>();
  a.weights = weights.data;
  a.weights_dtype = weights.dtype;
  if (a.tokens == 0) return;
  route_kernel<<<grid_blocks(a.tokens, kRouterWarps), 32 * kRouterWarps, 0, stream>>>(a);
  FP8MOE_CUDA_LAUNCH_CHECK("route_kernel");
}

void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                    const TensorView& grad_weights, const TensorView& grad_logits, cudaStream_t stream) {
  RouterArgs a = router_args(r, logits, "route_backward");
  check_device_operand(ids, "route_backward ids", {DType::I32});
  check_shape(ids, "route_backward ids", {a.tokens, a.top_k});
  check_device_operand(grad_weights, "route_backward grad_weights", {DType::F32, DType::BF16, DType::F64});
  check_shape(grad_weights, "route_backward grad_weights", {a.tokens, a.top_k});
  check_device_operand(grad_logits, "route_backward grad_logits", {DType::F32, DType::BF16, DType::F64});
  check_shape(grad_logits, "route_backward grad_logits", {a.tokens, a.experts});
  a.ids = ids.ptr<int>();
  a.grad_weights = grad_weights.data;
  a.grad_weights_dtype = grad_weights.dtype;
  a.grad_logits = grad_logits.data;
  a.grad_logits_dtype = grad_logits.dtype;
  if (a.tokens == 0) return;
  route_backward_kernel<<<grid_blocks(a.tokens, kRouterWarps), 32 * kRouterWarps, 0, stream>>>(a);
  FP8MOE_CUDA_LAUNCH_CHECK("route_backward_kernel");
}

}  // namespace fp8moe::cuda

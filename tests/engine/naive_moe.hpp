// An independent fp64 reference for the MoE layer and the routers, for tests only.
//
// Written per token and per slot, the way the math is stated: no routing plan, no grouped
// operations, nothing shared with the engine or the CPU backend except QuantTensor::at (exact
// dequantization, tested in formats/) and the dtype loads. Host tensors only, contiguous.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "fp8moe/moe.hpp"

namespace fp8moe::naive {

inline double get(const TensorView& t, int64_t i) {
  FP8MOE_CHECK(t.is_contiguous() && t.device == Device::CPU, "naive reference needs contiguous host tensors");
  return load_as_double(t.data, t.dtype, i);
}

inline double logistic(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The GLU activation, straight from its definition.
inline double glu(const ActivationSpec& a, double gate, double up) {
  if (a.kind == Activation::SiluGlu) return gate / (1.0 + std::exp(-gate)) * up;
  const double limit = a.limit;
  const double g = gate > limit ? limit : gate;
  const double u = up > limit ? limit : (up < -limit ? -limit : up);
  return (u + 1.0) * g * logistic(static_cast<double>(a.alpha) * g);
}

// y = W_e x + s * B_e (A_e x) + bias_e for one expert's projection; W [E, N, K], A [E, r, K], B [E, N, r].
inline std::vector<double> project(const QuantTensor& W, const TensorView& A, const TensorView& B, double s,
                                   const TensorView& bias, int64_t e, const std::vector<double>& x) {
  const int64_t N = W.data.size(1), K = W.data.size(2);
  std::vector<double> y(static_cast<size_t>(N), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) y[n] += W.at(e, n, k) * x[k];
  if (A.defined()) {
    const int64_t r = A.size(1);
    for (int64_t q = 0; q < r; ++q) {
      double ax = 0.0;
      for (int64_t k = 0; k < K; ++k) ax += get(A, (e * r + q) * K + k) * x[k];
      for (int64_t n = 0; n < N; ++n) y[n] += s * get(B, (e * N + n) * r + q) * ax;
    }
  }
  if (bias.defined())
    for (int64_t n = 0; n < N; ++n) y[n] += get(bias, e * N + n);
  return y;
}

// out [T, H] = sum_j w[t, j] * expert_{ids[t, j]}(hidden[t]), row-major.
inline std::vector<double> moe_forward(const ExpertWeights& w, const LoraAdapters& lora, const MoeInputs& in) {
  const int64_t T = in.hidden.size(0), H = in.hidden.size(1), k = in.topk_ids.size(1);
  const int64_t I = w.intermediate();
  std::vector<double> out(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> x(static_cast<size_t>(H));
    for (int64_t h = 0; h < H; ++h) x[h] = get(in.hidden, t * H + h);
    for (int64_t j = 0; j < k; ++j) {
      const auto e = static_cast<int64_t>(get(in.topk_ids, t * k + j));
      const double wt = get(in.topk_weights, t * k + j);
      const std::vector<double> h1 = project(w.gate_up, lora.gate_up_A, lora.gate_up_B, lora.scaling, w.gate_up_bias, e, x);
      std::vector<double> act(static_cast<size_t>(I));
      for (int64_t i = 0; i < I; ++i) {
        const bool halves = w.act.layout == GateUpLayout::Halves;
        act[i] = glu(w.act, h1[halves ? i : 2 * i], h1[halves ? I + i : 2 * i + 1]);
      }
      const std::vector<double> y = project(w.down, lora.down_A, lora.down_B, lora.scaling, w.down_bias, e, act);
      for (int64_t h = 0; h < H; ++h) out[t * H + h] += wt * y[h];
    }
  }
  return out;
}

// ---- routers: one token's logits [E] -> ids [k] and weights [k] ---------------------------------

// The k largest keys by repeated arg-max (first maximum wins, so ties go to the lower index).
inline std::vector<int64_t> select_top_k(const std::vector<double>& key, int64_t k) {
  std::vector<bool> taken(key.size(), false);
  std::vector<int64_t> ids;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < static_cast<int64_t>(key.size()); ++e)
      if (!taken[e] && (best < 0 || key[e] > key[best])) best = e;
    taken[best] = true;
    ids.push_back(best);
  }
  return ids;
}

inline void route(const RouterSpec& r, const std::vector<double>& logits, std::vector<int64_t>& ids,
                  std::vector<double>& weights) {
  const int64_t E = static_cast<int64_t>(logits.size()), k = r.top_k;
  weights.assign(static_cast<size_t>(k), 0.0);
  if (r.kind == RouterKind::SoftmaxTopK) {
    double z = 0.0;
    for (double x : logits) z += std::exp(x);
    std::vector<double> p;
    for (double x : logits) p.push_back(std::exp(x) / z);
    ids = select_top_k(p, k);
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += p[ids[j]];
    for (int64_t j = 0; j < k; ++j) weights[j] = r.normalize ? p[ids[j]] / sum : p[ids[j]];
  } else if (r.kind == RouterKind::SigmoidBiasTopK) {
    std::vector<double> s, key;
    for (int64_t e = 0; e < E; ++e) {
      s.push_back(logistic(logits[e]));
      key.push_back(s[e] + (r.correction_bias.defined() ? get(r.correction_bias, e) : 0.0));
    }
    ids = select_top_k(key, k);
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += s[ids[j]];
    for (int64_t j = 0; j < k; ++j) weights[j] = r.scaling * (r.normalize ? s[ids[j]] / (sum + 1e-20) : s[ids[j]]);
  } else {
    ids = select_top_k(logits, k);
    double z = 0.0;
    for (int64_t j = 0; j < k; ++j) z += std::exp(logits[ids[j]]);
    for (int64_t j = 0; j < k; ++j) weights[j] = std::exp(logits[ids[j]]) / z;
  }
}

}  // namespace fp8moe::naive

// The CPU routers against the independent ones of naive_moe.hpp, their tie rule, the bias that
// selects but never weighs, and route_backward against central finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/moe_test_util.hpp"
#include "engine/naive_moe.hpp"
#include "fp8moe/backend.hpp"

namespace fp8moe {
namespace {

using namespace moetest;

struct RouterCase {
  RouterKind kind;
  bool normalize;
  double scaling;
  bool bias;
};

std::vector<RouterCase> router_cases() {
  return {{RouterKind::SoftmaxTopK, true, 1.0, false},     {RouterKind::SoftmaxTopK, false, 1.0, false},
          {RouterKind::SigmoidBiasTopK, true, 1.8, true},  {RouterKind::SigmoidBiasTopK, false, 2.5, true},
          {RouterKind::SigmoidBiasTopK, true, 1.0, false}, {RouterKind::TopKSoftmax, true, 1.0, false}};
}
std::string case_name(const RouterCase& c) {
  return std::string(router_kind_name(c.kind)) + (c.normalize ? " normalized" : " raw") + " scaling " +
         std::to_string(c.scaling) + (c.bias ? " +bias" : "");
}

class RouterCpu : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = make_cpu_backend();
  uint64_t seed_ = fresh_seed();
  std::mt19937_64 gen_{seed_};
  Tensor bias_;

  RouterSpec spec(const RouterCase& c, int64_t k, int64_t E) {
    RouterSpec r;
    r.kind = c.kind;
    r.top_k = k;
    r.normalize = c.normalize;
    r.scaling = c.scaling;
    if (c.bias) {
      bias_ = randn(DType::F32, {E}, gen_, 0.3);
      r.correction_bias = bias_;
    }
    return r;
  }
  void route(const RouterSpec& r, const Tensor& logits, Tensor& ids, Tensor& w) {
    ids = Tensor(DType::I32, {logits.size(0), r.top_k});
    be_->fill(ids, -1);
    w = nan_tensor(DType::F64, {logits.size(0), r.top_k});
    be_->route(r, logits, ids, w);
  }
};

TEST_F(RouterCpu, MatchesIndependentRouters) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 16, E = 10, k = 3;
  for (const RouterCase& c : router_cases())
    for (DType dt : {DType::F32, DType::BF16, DType::F64}) {
      SCOPED_TRACE(case_name(c) + " logits " + std::string(dtype_name(dt)));
      const RouterSpec r = spec(c, k, E);
      const Tensor logits = randn(dt, {T, E}, gen_, 2.0);
      Tensor ids, w;
      route(r, logits, ids, w);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> x;
        for (int64_t e = 0; e < E; ++e) x.push_back(load_as_double(logits.data(), dt, t * E + e));
        std::vector<int64_t> ref_ids;
        std::vector<double> ref_w;
        naive::route(r, x, ref_ids, ref_w);
        for (int64_t j = 0; j < k; ++j) {
          EXPECT_EQ(ids.ptr<int32_t>()[t * k + j], ref_ids[j]) << "token " << t << " slot " << j;
          EXPECT_NEAR(w.ptr<double>()[t * k + j], ref_w[j], 1e-14 * std::max(1.0, std::fabs(ref_w[j])));
        }
      }
    }
}

TEST_F(RouterCpu, TiesGoToTheLowerIndex) {
  const int64_t E = 6, k = 3;
  Tensor logits(DType::F32, {2, E});
  const float rows[2][6] = {{0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f}, {0.1f, 0.9f, 0.3f, 0.9f, 0.3f, 0.0f}};
  for (int64_t i = 0; i < 2 * E; ++i) logits.ptr<float>()[i] = rows[i / E][i % E];
  const int32_t expect[2][3] = {{0, 1, 2}, {1, 3, 2}};
  for (RouterKind kind : {RouterKind::SoftmaxTopK, RouterKind::SigmoidBiasTopK, RouterKind::TopKSoftmax}) {
    SCOPED_TRACE(router_kind_name(kind));
    RouterSpec r;
    r.kind = kind;
    r.top_k = k;
    Tensor ids, w;
    route(r, logits, ids, w);
    for (int64_t i = 0; i < 2 * k; ++i) EXPECT_EQ(ids.ptr<int32_t>()[i], expect[i / k][i % k]) << "entry " << i;
  }
}

// GLM: the correction bias decides which experts, the unbiased sigmoid decides how much.
TEST_F(RouterCpu, SigmoidBiasSelectsButDoesNotWeigh) {
  const int64_t E = 4;
  Tensor logits(DType::F32, {1, E}), bias(DType::F32, {E});
  const float x[4] = {2.0f, 1.0f, 0.0f, -1.0f};
  const float b[4] = {0.0f, 0.0f, 0.0f, 2.0f};  // lifts the smallest expert to the top
  for (int64_t e = 0; e < E; ++e) {
    logits.ptr<float>()[e] = x[e];
    bias.ptr<float>()[e] = b[e];
  }
  RouterSpec r;
  r.kind = RouterKind::SigmoidBiasTopK;
  r.top_k = 2;
  r.scaling = 1.8;
  r.correction_bias = bias;
  Tensor ids, w;
  route(r, logits, ids, w);
  EXPECT_EQ(ids.ptr<int32_t>()[0], 3);
  EXPECT_EQ(ids.ptr<int32_t>()[1], 0);
  const double s3 = 1 / (1 + std::exp(1.0)), s0 = 1 / (1 + std::exp(-2.0));
  EXPECT_NEAR(w.ptr<double>()[0], 1.8 * s3 / (s3 + s0 + 1e-20), 1e-14);
  EXPECT_NEAR(w.ptr<double>()[1], 1.8 * s0 / (s3 + s0 + 1e-20), 1e-14);
}

TEST_F(RouterCpu, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 5, E = 8, k = 3;
  const double h = 1e-6;
  for (const RouterCase& c : router_cases()) {
    SCOPED_TRACE(case_name(c));
    const RouterSpec r = spec(c, k, E);
    Tensor logits = randn(DType::F64, {T, E}, gen_, 1.5);
    Tensor ids, w;
    route(r, logits, ids, w);
    const Tensor gw = randn(DType::F64, {T, k}, gen_);  // dL/dweights
    Tensor gx = nan_tensor(DType::F64, {T, E});
    be_->route_backward(r, logits, ids, gw, gx);
    EXPECT_EQ(count_nan(gx), 0);

    const auto loss = [&](bool& same_selection) {
      Tensor ids2, w2;
      route(r, logits, ids2, w2);
      same_selection = to_vec(ids2) == to_vec(ids);
      double l = 0.0;
      for (int64_t i = 0; i < T * k; ++i) l += gw.ptr<double>()[i] * w2.ptr<double>()[i];
      return l;
    };
    std::vector<double> fd, an;
    for (int64_t i = 0; i < T * E; ++i) {
      double& x = logits.ptr<double>()[i];
      const double x0 = x;
      bool same_p = false, same_m = false;
      x = x0 + h;
      const double lp = loss(same_p);
      x = x0 - h;
      const double lm = loss(same_m);
      x = x0;
      // A perturbation that flips the selection crosses a tie: the Jacobian is not defined there.
      if (!same_p || !same_m) continue;
      fd.push_back((lp - lm) / (2 * h));
      an.push_back(gx.ptr<double>()[i]);
    }
    ASSERT_GE(fd.size(), static_cast<size_t>(T * E - 2)) << "too many draws near a selection tie";
    EXPECT_LT(rel_err(an, fd), 1e-6);
    if (c.kind != RouterKind::SoftmaxTopK || c.normalize) {
      // Unselected experts influence nothing (exactly for these kinds, up to roundoff for the
      // normalised softmax, whose full-softmax denominator cancels).
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
          bool selected = false;
          for (int64_t j = 0; j < k; ++j) selected |= ids.ptr<int32_t>()[t * k + j] == e;
          if (!selected) EXPECT_NEAR(gx.ptr<double>()[t * E + e], 0.0, 1e-15);
        }
    }
  }
}

TEST_F(RouterCpu, RejectsInconsistentSpecs) {
  const int64_t T = 2, E = 4;
  const Tensor logits = randn(DType::F32, {T, E}, gen_);
  Tensor ids(DType::I32, {T, 5}), w(DType::F32, {T, 5});
  RouterSpec r;
  r.top_k = 5;  // more than E
  EXPECT_THROW(be_->route(r, logits, ids, w), Error);
  r.top_k = 2;
  Tensor ids2(DType::I32, {T, 2}), w2(DType::F32, {T, 2});
  r.scaling = 2.0;  // routed_scaling_factor belongs to the sigmoid router
  try {
    be_->route(r, logits, ids2, w2);
    FAIL() << "scaling accepted for a softmax router";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("scaling"), std::string::npos) << e.what();
  }
  r.scaling = 1.0;
  Tensor ids64(DType::I64, {T, 2});
  EXPECT_THROW(be_->route(r, logits, ids64, w2), Error);  // route writes I32 ids
}

}  // namespace
}  // namespace fp8moe

// Expert stacking primitives (src/model/experts.cpp), checked against element-by-element
// references computed here with their own index arithmetic.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "fp8moe/fp8.hpp"
#include "model/experts.hpp"
#include "test_support.hpp"

using fp8moe::test::expect_error;
using fp8moe::test::fresh_seed;

namespace fp8moe {
namespace {

using model::StoredMatrix;

struct Rng {
  explicit Rng(uint64_t seed) : g(seed) {}
  std::mt19937_64 g;
  Tensor codes(Shape s) {
    Tensor t(DType::F8_E4M3, s);
    std::uniform_int_distribution<int> d(0, 0x7E);
    std::bernoulli_distribution neg(0.5);
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<uint8_t>()[i] = static_cast<uint8_t>(d(g) | (neg(g) ? 0x80 : 0));
    return t;
  }
  Tensor floats(DType dt, Shape s, double lo, double hi) {
    Tensor t(dt, s);
    std::uniform_real_distribution<double> d(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dt, i, d(g));
    return t;
  }
};

// value of a per-expert source: code * scale[(n / bn) * gk + k / bk]
double ref(const StoredMatrix& m, int64_t bn, int64_t bk, int64_t n, int64_t k) {
  const int64_t K = m.spec.cols, gk = (K + bk - 1) / bk;
  const double c = decode_e4m3(m.weight.ptr<uint8_t>()[n * K + k]);
  return c * load_as_double(m.scale.data, m.scale.dtype, (n / bn) * gk + k / bk);
}

// E experts x {gate, up} [I, H] with 16x16 blocks (I = 24: a block row is partial) and F16 scales.
TEST(ExpertsStack, BlockHalvesKeepSeparateGrids) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  const int64_t E = 3, I = 24, H = 40, b = 16;
  std::vector<Tensor> keep;
  std::vector<std::vector<StoredMatrix>> ex(E);
  for (int64_t e = 0; e < E; ++e)
    for (const char* p : {"gate", "up"}) {
      keep.push_back(rng.codes(Shape{I, H}));
      keep.push_back(rng.floats(DType::F16, Shape{2, 3}, 1e-3, 1e-1));
      ex[e].push_back({std::string(p) + std::to_string(e), keep[keep.size() - 2].view(), "s",
                       keep.back().view(), ScaleSpec::block(I, H, b, b)});
    }
  const QuantWeights q = model::stack_experts(ex, "gate_up");
  EXPECT_EQ(q.spec.segments, 2);
  EXPECT_EQ(q.spec.rows, 2 * I);
  EXPECT_EQ(q.data.shape(), (Shape{E, 2 * I, H}));
  EXPECT_EQ(q.scale.shape(), (Shape{E, 4, 3}));  // two grids of ceil(24/16) = 2 rows
  const QuantTensor v = q.view();
  v.validate("stacked");
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < 2 * I; ++n)
      for (int64_t k = 0; k < H; ++k) ASSERT_EQ(v.at(e, n, k), ref(ex[e][n / I], b, b, n % I, k)) << e << " " << n << " " << k;
}

TEST(ExpertsStack, TensorScalesBecomeOnePerHalfAndChannelConcatenates) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  const int64_t E = 2, I = 5, H = 7;
  std::vector<Tensor> keep;
  std::vector<std::vector<StoredMatrix>> ten(E), chan(E);
  for (int64_t e = 0; e < E; ++e)
    for (int p = 0; p < 2; ++p) {
      keep.push_back(rng.codes(Shape{I, H}));
      const TensorView w = keep.back().view();
      keep.push_back(rng.floats(DType::BF16, Shape{}, 1e-3, 1.0));
      ten[e].push_back({"w", w, "s", keep.back().view(), ScaleSpec::tensor(I, H)});
      keep.push_back(rng.floats(DType::F32, Shape{I, 1}, 1e-3, 1.0));
      chan[e].push_back({"w", w, "s", keep.back().view(), ScaleSpec::channel(I, H)});
    }
  const QuantWeights tw = model::stack_experts(ten, "t");
  const QuantTensor t = tw.view();
  EXPECT_EQ(t.spec.str(), "tensor (2 segments)");
  EXPECT_EQ(t.scale.shape, (Shape{E, 2, 1}));
  const QuantWeights cw = model::stack_experts(chan, "c");
  const QuantTensor c = cw.view();
  EXPECT_EQ(c.spec.str(), "channel");
  EXPECT_EQ(c.scale.shape, (Shape{E, 2 * I, 1}));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < 2 * I; ++n)
      for (int64_t k = 0; k < H; ++k) {
        ASSERT_EQ(t.at(e, n, k), ref(ten[e][n / I], I, H, n % I, k));
        ASSERT_EQ(c.at(e, n, k), ref(chan[e][n / I], 1, H, n % I, k));
      }
}

TEST(ExpertsStack, MismatchesAreRefusedByName) {
  Rng rng(fresh_seed());
  Tensor a = rng.codes(Shape{4, 8}), sa = rng.floats(DType::F32, Shape{4, 1}, 0.1, 1);
  Tensor bf = rng.floats(DType::BF16, Shape{4, 8}, -1, 1);
  const StoredMatrix fp8{"e0.w", a.view(), "e0.s", sa.view(), ScaleSpec::channel(4, 8)};
  const StoredMatrix plain{"e1.w", bf.view(), "", {}, ScaleSpec::none(4, 8)};
  expect_error([&] { model::stack_experts({{fp8}, {plain}}, "down"); }, {"tensor e1.w", "expected dtype F8_E4M3", "found BF16"});
  StoredMatrix other = fp8;
  other.name = "e1.w";
  other.spec = ScaleSpec::tensor(4, 8);
  expect_error([&] { model::stack_experts({{fp8}, {other}}, "down"); }, {"tensor e1.w", "expected scale scheme channel"});
  StoredMatrix unscaled = fp8;
  unscaled.scale = {};
  unscaled.spec = ScaleSpec::none(4, 8);
  expect_error([&] { model::stack_experts({{unscaled}}, "down"); }, {"tensor e0.w", "FP8 codes without their scale"});
  StoredMatrix short_scale = fp8;
  short_scale.scale = sa.view().reshape(Shape{2, 2});
  short_scale.spec = ScaleSpec::block(4, 8, 1, 4);  // wants 4 x 2 = 8 scales
  expect_error([&] { model::stack_experts({{short_scale}}, "down"); }, {"scale e0.s", "expected 8 elements"});
}

TEST(ExpertsStack, NonFiniteScalesAreRefused) {
  Rng rng(fresh_seed());
  Tensor a = rng.codes(Shape{3, 4});
  Tensor s = rng.floats(DType::F32, Shape{3, 1}, 0.1, 1);
  s.ptr<float>()[1] = std::numeric_limits<float>::infinity();
  expect_error([&] { model::stack_experts({{{"w", a.view(), "w_scale", s.view(), ScaleSpec::channel(3, 4)}}}, "x"); },
               {"scale w_scale", "element 1", "must be finite"});
  expect_error([&] { model::to_f32("bias", s.view()); }, {"tensor bias", "element 1"});
}

// GPT-OSS: stored [E, K, N] with a [E, gK, gN] grid -> canonical [E, N, K] and [E, gN, gK].
TEST(ExpertsTranspose, CodesAndScaleGridFollowTheTranspose) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  const int64_t E = 2, K = 37, N = 70, bn = 32, bk = 16;  // stored [2, 37, 70]
  const int64_t gN = 3, gK = 3;
  Tensor w = rng.codes(Shape{E, K, N});
  Tensor s = rng.floats(DType::BF16, Shape{E, gK, gN}, 1e-3, 1.0);
  const QuantWeights q = model::transpose_stacked("gu", w.view(), "gu_scale", s.view(), ScaleSpec::block(N, K, bn, bk));
  EXPECT_EQ(q.data.shape(), (Shape{E, N, K}));
  EXPECT_EQ(q.scale.shape(), (Shape{E, gN, gK}));
  const QuantTensor v = q.view();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double code = decode_e4m3(w.ptr<uint8_t>()[(e * K + k) * N + n]);
        const double sc = load_as_double(s.data(), s.dtype(), (e * gK + k / bk) * gN + n / bn);
        ASSERT_EQ(v.at(e, n, k), code * sc) << e << " " << n << " " << k;
      }
  // Plain weights transpose too, bit for bit.
  Tensor p = rng.floats(DType::BF16, Shape{E, K, N}, -1, 1);
  const QuantWeights pq = model::transpose_stacked("p", p.view(), "", {}, ScaleSpec::none(N, K));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        ASSERT_EQ(pq.data.ptr<uint16_t>()[(e * N + n) * K + k], p.ptr<uint16_t>()[(e * K + k) * N + n]);
  expect_error([&] { model::transpose_stacked("gu", w.view(), "", {}, ScaleSpec::none(N, K)); },
               {"tensor gu", "unscaled weight must be BF16"});
  expect_error([&] { model::transpose_stacked("gu", w.view(), "s", s.view(), ScaleSpec::block(K, N, bn, bk)); },
               {"tensor gu", "expected the transposed layout [E, 70, 37]"});
}

TEST(ExpertsCopy, StackedScaleCountMustMatch) {
  Rng rng(fresh_seed());
  Tensor w = rng.codes(Shape{2, 8, 4});
  Tensor s = rng.floats(DType::F32, Shape{2, 8, 1}, 0.1, 1);
  const QuantWeights q = model::copy_stacked("gu", w.view(), "gu_s", s.view(), ScaleSpec::channel(8, 4));
  EXPECT_EQ(q.view().at(1, 5, 3),
            static_cast<double>(decode_e4m3(w.ptr<uint8_t>()[(8 + 5) * 4 + 3])) * s.ptr<float>()[8 + 5]);
  expect_error([&] { model::copy_stacked("gu", w.view(), "gu_s", s.view(), ScaleSpec::block(8, 4, 1, 1)); },
               {"scale gu_s of gu", "expected 2 x 32 elements"});
}

}  // namespace
}  // namespace fp8moe

// The CPU backend's operations, each against its definition in backend.hpp written out directly
// (per row, per pair), including the options the engine never combines (bias with row_scale,
// both transpose forms with each row source) and the activation conventions at the clamps.
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
#include "fp8moe/quant.hpp"

namespace fp8moe {
namespace {

using namespace moetest;

class CpuBackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be_ = make_cpu_backend();
  uint64_t seed_ = fresh_seed();
  std::mt19937_64 gen_{seed_};

  // ids [T, k] I32, each entry uniform in [0, E) (repeats within a token allowed).
  Tensor random_ids_any(int64_t T, int64_t k, int64_t E) {
    Tensor ids(DType::I32, {T, k});
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(E - 1));
    for (int64_t i = 0; i < T * k; ++i) ids.ptr<int32_t>()[i] = pick(gen_);
    return ids;
  }
};

// Expert of each row and the source row of a by-token operand, from the plan.
struct PlanRows {
  std::vector<int64_t> expert, pair;
  explicit PlanRows(const RoutingPlan& p) {
    const auto* off = p.offsets.ptr<int32_t>();
    for (int64_t e = 0; e < p.experts; ++e)
      for (int64_t r = off[e]; r < off[e + 1]; ++r) {
        expert.push_back(e);
        pair.push_back(p.sorted_pairs.ptr<int32_t>()[r]);
      }
  }
};

// ---- build_plan ---------------------------------------------------------------------------------

TEST_F(CpuBackendTest, PlanIsAStableSortByExpert) {
  SCOPED_TRACE(seed_trace(seed_));
  for (DType id_dtype : {DType::I32, DType::I64}) {
    const int64_t T = 11, k = 3, E = 6;
    const Tensor ids32 = random_ids_any(T, k, E);
    Tensor ids(id_dtype, {T, k});
    for (int64_t i = 0; i < T * k; ++i) store_from_double(ids.data(), id_dtype, i, ids32.ptr<int32_t>()[i]);
    RoutingPlan plan;
    be_->build_plan(ids, E, plan);
    ASSERT_EQ(plan.tokens, T);
    ASSERT_EQ(plan.top_k, k);
    ASSERT_EQ(plan.experts, E);
    const auto* off = plan.offsets.ptr<int32_t>();
    const auto* sorted = plan.sorted_pairs.ptr<int32_t>();
    const auto* row_of = plan.row_of_pair.ptr<int32_t>();
    EXPECT_EQ(off[0], 0);
    EXPECT_EQ(off[E], T * k);
    for (int64_t e = 0; e < E; ++e) {
      int64_t count = 0;
      for (int64_t p = 0; p < T * k; ++p) count += ids32.ptr<int32_t>()[p] == e;
      EXPECT_EQ(off[e + 1] - off[e], count) << "expert " << e;
      for (int64_t r = off[e]; r < off[e + 1]; ++r) {
        EXPECT_EQ(ids32.ptr<int32_t>()[sorted[r]], e);
        if (r > off[e]) EXPECT_LT(sorted[r - 1], sorted[r]) << "rows of an expert must be in pair order";
      }
    }
    for (int64_t p = 0; p < T * k; ++p) EXPECT_EQ(sorted[row_of[p]], p);
  }
}

TEST_F(CpuBackendTest, PlanRejectsIdsOutOfRange) {
  Tensor ids = Tensor::zeros(DType::I64, {2, 2});
  ids.ptr<int64_t>()[3] = 4;
  RoutingPlan plan;
  try {
    be_->build_plan(ids, 4, plan);
    FAIL() << "id 4 accepted for 4 experts";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("topk_ids"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[1, 1] = 4"), std::string::npos) << msg;
  }
  Tensor f(DType::F32, {2, 2});
  EXPECT_THROW(be_->build_plan(f, 4, plan), Error);
}

TEST_F(CpuBackendTest, EmptyBatchWorksEverywhere) {
  const int64_t E = 3, K = 5, N = 4, k = 2;
  RoutingPlan plan;
  be_->build_plan(Tensor(DType::I32, {0, k}), E, plan);
  for (int64_t e = 0; e <= E; ++e) EXPECT_EQ(plan.offsets.ptr<int32_t>()[e], 0);
  const QuantWeights w = quantize(randn(DType::F32, {E, N, K}, gen_), ScaleSpec::channel(N, K));
  GroupedGemm g;
  g.plan = &plan;
  g.a = {Tensor(DType::F64, {0, K}), RowSource::Tokens};
  g.b = w.view();
  g.out = Tensor(DType::F64, {0, N});
  be_->grouped_gemm(g);
  Tensor outer = nan_tensor(DType::F64, {E, K, N});
  GroupedOuter o;
  o.plan = &plan;
  o.left = {Tensor(DType::F64, {0, K})};
  o.right = {Tensor(DType::F64, {0, N})};
  o.out = outer;
  be_->grouped_outer(o);
  for (double v : to_vec(outer)) ASSERT_EQ(v, 0.0);
  Combine c;
  c.plan = &plan;
  c.rows = Tensor(DType::F64, {0, N});
  c.out = Tensor(DType::F64, {0, N});
  be_->combine(c);
}

// ---- grouped_gemm -------------------------------------------------------------------------------

TEST_F(CpuBackendTest, GroupedGemmMatchesDefinition) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 6, k = 2, E = 4, K = 9, N = 7, R = 3, M = T * k;
  const double s = 1.5;
  RoutingPlan plan;
  const Tensor ids = random_ids_any(T, k, E);
  be_->build_plan(ids, E, plan);
  const PlanRows rows(plan);

  for (bool transpose : {false, true})
    for (RowSource src : {RowSource::Tokens, RowSource::Rows})
      for (bool extras : {false, true}) {
        SCOPED_TRACE(std::string(transpose ? "transpose_b" : "plain b") + (src == RowSource::Tokens ? " tokens" : " rows") +
                     (extras ? " lora+row_scale+bias" : ""));
        // b stored [E, N, K] or [E, K, N]; partial 4x4 blocks on both axes.
        const int64_t sn = transpose ? K : N, sk = transpose ? N : K;
        const QuantWeights b = quantize(randn(DType::F32, {E, sn, sk}, gen_), ScaleSpec::block(sn, sk, 4, 4));
        const Tensor a = randn(DType::F32, {src == RowSource::Tokens ? T : M, K}, gen_);
        const Tensor l = randn(DType::BF16, {M, R}, gen_);
        const Tensor lb = randn(DType::F64, transpose ? Shape{E, R, N} : Shape{E, N, R}, gen_);
        const Tensor rs = uniform(DType::F32, {M}, gen_, 0.1, 1.0);
        const Tensor bias = randn(DType::F64, {E, N}, gen_);
        Tensor out = nan_tensor(DType::F64, {M, N});

        GroupedGemm g;
        g.plan = &plan;
        g.a = {a, src};
        g.b = b.view();
        g.transpose_b = transpose;
        if (extras) {
          g.lora_a = {l};
          g.lora_b = lb;
          g.lora_scale = s;
          g.row_scale = rs;
          g.bias = bias;
        }
        g.out = out;
        be_->grouped_gemm(g);

        const auto get = [](const Tensor& t, int64_t i) { return load_as_double(t.data(), t.dtype(), i); };
        std::vector<double> expect;
        for (int64_t r = 0; r < M; ++r) {
          const int64_t e = rows.expert[r], p = rows.pair[r];
          const int64_t ar = src == RowSource::Tokens ? p / k : r;
          for (int64_t n = 0; n < N; ++n) {
            double base = 0.0, delta = 0.0;
            for (int64_t kk = 0; kk < K; ++kk)
              base += get(a, ar * K + kk) * (transpose ? b.view().at(e, kk, n) : b.view().at(e, n, kk));
            for (int64_t q = 0; q < R; ++q)
              delta += get(l, r * R + q) * get(lb, transpose ? (e * R + q) * N + n : (e * N + n) * R + q);
            expect.push_back(extras ? get(rs, p) * (base + s * delta) + get(bias, e * N + n) : base);
          }
        }
        EXPECT_LT(rel_err(to_vec(out), expect), 1e-14);

        // A narrow output is the fp64 result rounded once.
        Tensor out_bf16 = nan_tensor(DType::BF16, {M, N});
        g.out = out_bf16;
        be_->grouped_gemm(g);
        Tensor rounded(DType::BF16, {M, N});
        for (int64_t i = 0; i < M * N; ++i) store_from_double(rounded.data(), DType::BF16, i, out.ptr<double>()[i]);
        EXPECT_EQ(to_vec(out_bf16), to_vec(rounded));
      }
}

TEST_F(CpuBackendTest, GroupedGemmRejectsMismatchedOperands) {
  const int64_t T = 3, k = 1, E = 2, K = 5, N = 4;
  RoutingPlan plan;
  be_->build_plan(Tensor::zeros(DType::I32, {T, k}), E, plan);
  const QuantWeights b = quantize(randn(DType::F32, {E, N, K}, gen_), ScaleSpec::channel(N, K));
  GroupedGemm g;
  g.plan = &plan;
  g.a = {Tensor(DType::F64, {T, K + 1}), RowSource::Tokens};
  g.b = b.view();
  g.out = Tensor(DType::F64, {T, N});
  try {
    be_->grouped_gemm(g);
    FAIL() << "a [T, K+1] operand was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("grouped_gemm a"), std::string::npos) << e.what();
  }
  g.a = {Tensor(DType::F64, {T, K}), RowSource::Tokens};
  g.epilogue = Epilogue::GluBackward;  // needs aux
  g.out = Tensor(DType::F64, {T, 2 * N});
  EXPECT_THROW(be_->grouped_gemm(g), Error);
  g.plan = nullptr;
  EXPECT_THROW(be_->grouped_gemm(g), Error);
}

// out_fp8: out's E4M3 rows as quantize_activations makes them (K = 200: a partial second group),
// for both forward epilogues; a.fp8 is read by FP8 paths only, so the oracle's result is the same
// with and without it, and both are checked for shape, dtype and row source, naming the tensor.
TEST_F(CpuBackendTest, GroupedGemmWritesAndChecksFp8Rows) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 9, k = 2, E = 3, K = 40, N = 400, M = T * k;
  RoutingPlan plan;
  be_->build_plan(random_ids_any(T, k, E), E, plan);
  const QuantWeights b = quantize(randn(DType::F32, {E, N, K}, gen_), ScaleSpec::block(N, K, 128, 128));
  const Tensor x = randn(DType::F64, {T, K}, gen_);
  for (const Epilogue epi : {Epilogue::Store, Epilogue::GluForward}) {
    const int64_t cols = epi == Epilogue::Store ? N : N / 2, groups = (cols + 127) / 128;
    SCOPED_TRACE(epi == Epilogue::Store ? "Store" : "GluForward");
    Tensor out = nan_tensor(DType::F64, {M, cols});
    Tensor codes(DType::F8_E4M3, {M, cols}), scales = nan_tensor(DType::F32, {M, groups});
    GroupedGemm g;
    g.plan = &plan;
    g.a = {x, RowSource::Tokens};
    g.b = b.view();
    g.epilogue = epi;
    g.out = out;
    g.out_fp8 = {codes, scales};
    be_->grouped_gemm(g);
    Tensor want_codes(DType::F8_E4M3, {M, cols}), want_scales(DType::F32, {M, groups});
    quantize_activations(out, 128, want_codes, want_scales);
    EXPECT_EQ(to_vec(scales), to_vec(want_scales));
    for (int64_t i = 0; i < M * cols; ++i)
      ASSERT_EQ(codes.ptr<uint8_t>()[i], want_codes.ptr<uint8_t>()[i]) << "code " << i;

    // The same problem read by rows, with those codes as a.fp8: the oracle reads A itself.
    if (epi == Epilogue::Store) continue;
    const QuantWeights b2 = quantize(randn(DType::F32, {E, 16, cols}, gen_), ScaleSpec::channel(16, cols));
    GroupedGemm g2;
    g2.plan = &plan;
    g2.a = {out};
    g2.b = b2.view();
    Tensor y1 = nan_tensor(DType::F64, {M, 16}), y2 = nan_tensor(DType::F64, {M, 16});
    g2.out = y1;
    be_->grouped_gemm(g2);
    g2.a.fp8 = {codes, scales};
    g2.out = y2;
    be_->grouped_gemm(g2);
    EXPECT_EQ(to_vec(y1), to_vec(y2));

    g2.a.rows = RowSource::Tokens;  // Fp8Rows are rows in expert order
    g2.a.src = Tensor(DType::F64, {T, cols});
    test::expect_error([&] { be_->grouped_gemm(g2); }, {"a.fp8", "by token"});
    g2.a = {out};
    g2.a.fp8 = {codes, Tensor(DType::F32, {M, groups + 1})};
    test::expect_error([&] { be_->grouped_gemm(g2); }, {"a.fp8 scales", std::to_string(groups + 1)});
    g.out_fp8 = {Tensor(DType::F32, {M, cols}), scales};
    test::expect_error([&] { be_->grouped_gemm(g); }, {"out_fp8 codes", "F32"});
  }
}

// GLU epilogues through an identity weight (v = a), so that out is the activation itself.
class CpuBackendGlu : public CpuBackendTest {
 protected:
  // Identity [1, n, n] as a plain F64 weight.
  static Tensor identity(int64_t n) {
    Tensor t = Tensor::zeros(DType::F64, {1, n, n});
    for (int64_t i = 0; i < n; ++i) t.ptr<double>()[i * n + i] = 1.0;
    return t;
  }
  // Runs `epilogue` on rows a [M, N] with aux; one expert, every row a token (k = 1).
  Tensor run(Epilogue ep, const ActivationSpec& act, const Tensor& a, const Tensor& aux, Shape out_shape) {
    const int64_t M = a.size(0), N = a.size(1);
    RoutingPlan plan;
    be_->build_plan(Tensor::zeros(DType::I32, {M, 1}), 1, plan);
    const Tensor id = identity(N);
    Tensor out = nan_tensor(DType::F64, out_shape);
    GroupedGemm g;
    g.plan = &plan;
    g.a = {a};
    g.b = {id, TensorView(), ScaleSpec::none(N, N)};
    g.epilogue = ep;
    g.act = act;
    g.aux = aux;
    g.out = out;
    be_->grouped_gemm(g);
    EXPECT_EQ(count_nan(out), 0);
    return out;
  }
  static std::vector<ActivationSpec> specs() {
    return {{Activation::SiluGlu, GateUpLayout::Halves},
            {Activation::SiluGlu, GateUpLayout::Interleaved},
            {Activation::GptOssGlu, GateUpLayout::Interleaved, 1.702f, 1.25f},
            {Activation::GptOssGlu, GateUpLayout::Halves, 0.9f, 0.75f}};
  }
};

TEST_F(CpuBackendGlu, ForwardStoresPreActivationAndActivation) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t M = 5, I = 6;
  for (const ActivationSpec& act : specs()) {
    const Tensor pre = randn(DType::F64, {M, 2 * I}, gen_, 1.5);
    Tensor aux = nan_tensor(DType::F64, {M, 2 * I});
    const Tensor out = run(Epilogue::GluForward, act, pre, aux, {M, I});
    EXPECT_EQ(to_vec(aux), to_vec(pre));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < I; ++j) {
        const double* row = pre.ptr<double>() + m * 2 * I;
        const double ref = naive::glu(act, row[act.gate_row(j, I)], row[act.up_row(j, I)]);
        EXPECT_NEAR(out.ptr<double>()[m * I + j], ref, 1e-14 * std::max(1.0, std::fabs(ref)));
      }
  }
}

TEST_F(CpuBackendGlu, BackwardMatchesFiniteDifferences) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t M = 5, I = 6;
  const double h = 1e-6;
  for (const ActivationSpec& act : specs()) {
    Tensor pre = randn(DType::F64, {M, 2 * I}, gen_, 1.5);
    for (int64_t i = 0; i < pre.numel(); ++i) {  // keep finite differences off the clamps
      double& v = pre.ptr<double>()[i];
      if (std::fabs(std::fabs(v) - act.limit) < 1e-3) v += 0.01;
    }
    const Tensor dact = randn(DType::F64, {M, I}, gen_);
    const Tensor dpre = run(Epilogue::GluBackward, act, dact, pre, {M, 2 * I});
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < I; ++j) {
        const double* row = pre.ptr<double>() + m * 2 * I;
        const double gate = row[act.gate_row(j, I)], up = row[act.up_row(j, I)], d = dact.ptr<double>()[m * I + j];
        const double fd_g = (naive::glu(act, gate + h, up) - naive::glu(act, gate - h, up)) / (2 * h);
        const double fd_u = (naive::glu(act, gate, up + h) - naive::glu(act, gate, up - h)) / (2 * h);
        EXPECT_NEAR(dpre.ptr<double>()[m * 2 * I + act.gate_row(j, I)], d * fd_g, 1e-8);
        EXPECT_NEAR(dpre.ptr<double>()[m * 2 * I + act.up_row(j, I)], d * fd_u, 1e-8);
      }
  }
}

// torch.clamp's convention: the gradient passes at the clamp value itself, and is 0 beyond it.
TEST_F(CpuBackendGlu, GptOssClampGradientConvention) {
  const ActivationSpec act{Activation::GptOssGlu, GateUpLayout::Halves, 1.702f, 2.0f};
  const double L = act.limit, a = act.alpha;
  const double gates[] = {L, L + 0.5, 0.3, 0.3, 0.3};
  const double ups[] = {0.4, 0.4, L, -L, -L - 1.0};
  const int64_t M = 5;
  Tensor pre(DType::F64, {M, 2});
  for (int64_t m = 0; m < M; ++m) {
    pre.ptr<double>()[2 * m] = gates[m];
    pre.ptr<double>()[2 * m + 1] = ups[m];
  }
  Tensor ones(DType::F64, {M, 1});  // dL/dact = 1: out is the derivative itself
  be_->fill(ones, 1.0);
  const Tensor d = run(Epilogue::GluBackward, act, ones, pre, {M, 2});
  const auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  const auto dgate = [&](double g, double u) { return (u + 1) * (sig(a * g) + a * g * sig(a * g) * (1 - sig(a * g))); };
  EXPECT_DOUBLE_EQ(d.ptr<double>()[0], dgate(L, 0.4));  // gate == limit: passes
  EXPECT_EQ(d.ptr<double>()[2], 0.0);                   // gate > limit: blocked
  EXPECT_DOUBLE_EQ(d.ptr<double>()[3], L * sig(a * L)); // up sees the clamped gate
  EXPECT_DOUBLE_EQ(d.ptr<double>()[5], 0.3 * sig(a * 0.3));  // up == limit: passes
  EXPECT_DOUBLE_EQ(d.ptr<double>()[7], 0.3 * sig(a * 0.3));  // up == -limit: passes
  EXPECT_EQ(d.ptr<double>()[9], 0.0);                        // up < -limit: blocked
  EXPECT_DOUBLE_EQ(d.ptr<double>()[8], dgate(0.3, -L));      // gate sees the clamped up
}

// ---- grouped_outer, combine, pair_dot -----------------------------------------------------------

TEST_F(CpuBackendTest, GroupedOuterMatchesDefinition) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 7, k = 2, E = 5, N = 4, Q = 3, M = T * k;
  Tensor ids = random_ids_any(T, k, E);
  for (int64_t i = 0; i < M; ++i)
    if (ids.ptr<int32_t>()[i] == 2) ids.ptr<int32_t>()[i] = 3;  // expert 2 gets no rows
  RoutingPlan plan;
  be_->build_plan(ids, E, plan);
  const PlanRows rows(plan);
  const Tensor left = randn(DType::F64, {T, N}, gen_);  // by token
  const Tensor right = randn(DType::F32, {M, Q}, gen_);  // by row
  const Tensor rs = uniform(DType::F64, {M}, gen_, 0.1, 1.0);
  for (bool scaled : {false, true}) {
    Tensor out = nan_tensor(DType::F64, {E, N, Q});
    GroupedOuter o;
    o.plan = &plan;
    o.left = {left, RowSource::Tokens};
    o.right = {right};
    if (scaled) o.row_scale = rs;
    o.alpha = 0.7;
    o.out = out;
    be_->grouped_outer(o);
    std::vector<double> expect(static_cast<size_t>(E * N * Q), 0.0);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t e = rows.expert[r], p = rows.pair[r], t = p / k;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t q = 0; q < Q; ++q)
          expect[(e * N + n) * Q + q] += 0.7 * (scaled ? rs.ptr<double>()[p] : 1.0) * left.ptr<double>()[t * N + n] *
                                         right.ptr<float>()[r * Q + q];
    }
    EXPECT_LT(rel_err(to_vec(out), expect), 1e-14);
    for (int64_t i = 0; i < N * Q; ++i) EXPECT_EQ(out.ptr<double>()[2 * N * Q + i], 0.0);
  }
}

TEST_F(CpuBackendTest, CombineAndPairDotMatchDefinition) {
  SCOPED_TRACE(seed_trace(seed_));
  const int64_t T = 6, k = 3, E = 4, H = 5, M = T * k;
  RoutingPlan plan;
  be_->build_plan(random_ids_any(T, k, E), E, plan);
  const auto* row_of = plan.row_of_pair.ptr<int32_t>();
  const Tensor rows = randn(DType::F64, {M, H}, gen_);
  const Tensor w = uniform(DType::BF16, {T, k}, gen_, 0.1, 1.0);
  const Tensor tokens = randn(DType::F64, {T, H}, gen_);
  for (bool weighted : {false, true}) {
    Tensor out = nan_tensor(DType::F64, {T, H});
    Combine c;
    c.plan = &plan;
    c.rows = rows;
    if (weighted) c.weights = w;
    c.out = out;
    be_->combine(c);
    std::vector<double> expect(static_cast<size_t>(T * H), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t h = 0; h < H; ++h)
          expect[t * H + h] += (weighted ? load_as_double(w.data(), DType::BF16, t * k + j) : 1.0) *
                               rows.ptr<double>()[row_of[t * k + j] * H + h];
    EXPECT_LT(rel_err(to_vec(out), expect), 1e-15);
  }
  Tensor dot = nan_tensor(DType::F64, {T, k});
  PairDot d;
  d.plan = &plan;
  d.tokens = tokens;
  d.rows = rows;
  d.out = dot;
  be_->pair_dot(d);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      double e = 0.0;
      for (int64_t h = 0; h < H; ++h) e += tokens.ptr<double>()[t * H + h] * rows.ptr<double>()[row_of[t * k + j] * H + h];
      EXPECT_NEAR(dot.ptr<double>()[t * k + j], e, 1e-13 * std::max(1.0, std::fabs(e)));
    }
}

// ---- memory -------------------------------------------------------------------------------------

TEST_F(CpuBackendTest, CopyFillAndUpload) {
  SCOPED_TRACE(seed_trace(seed_));
  const Tensor src = randn(DType::BF16, {3, 4}, gen_);
  const Tensor up = be_->upload(src);
  EXPECT_EQ(to_vec(up), to_vec(src));
  EXPECT_EQ(be_->device(), Device::CPU);

  // Into a transposed (strided) view of a [4, 3] buffer.
  Tensor buf = nan_tensor(DType::BF16, {4, 3});
  TensorView tv = buf.view();
  tv.shape = {3, 4};
  tv.strides[0] = 1;
  tv.strides[1] = 3;
  be_->copy(tv, src);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j)
      EXPECT_EQ(load_as_double(buf.data(), DType::BF16, j * 3 + i), load_as_double(src.data(), DType::BF16, i * 4 + j));

  be_->fill(tv, 0.25);
  for (double v : to_vec(buf)) EXPECT_EQ(v, 0.25);
  Tensor wrong(DType::F32, {3, 4});
  EXPECT_THROW(be_->copy(wrong, src), Error);
  TensorView on_gpu = wrong.view();
  on_gpu.device = Device::CUDA;
  EXPECT_THROW(be_->fill(on_gpu, 0.0), Error);
}

}  // namespace
}  // namespace fp8moe

// The CUDA backend's own operations (everything but the grouped GEMMs) against the CPU backend
// on identical random inputs: routing plan, combine, pair_dot, the three routers and their
// backward, fill and copy. Outputs are poisoned first; seeds are fresh and printed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_test_util.hpp"
#include "fp8moe/backend.hpp"

namespace fp8moe {
namespace {

using test::convert_host;
using test::fresh_seed;
using test::poisoned;
using test::random_host;
using test::random_ids;
using test::rel_error;
using test::to_host;

struct Backends {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend();
};

// Plans for the same ids on both backends.
struct Plans {
  RoutingPlan cpu, gpu;
};
Plans build_plans(Backends& b, const Tensor& ids_host, int64_t E) {
  Plans p;
  b.cpu->build_plan(ids_host, E, p.cpu);
  Tensor ids_dev = b.gpu->upload(ids_host);
  b.gpu->build_plan(ids_dev, E, p.gpu);
  return p;
}

void expect_same_i32(Backend& gpu, const Tensor& dev, const Tensor& host, const char* what) {
  const Tensor d = to_host(gpu, dev);
  ASSERT_EQ(d.numel(), host.numel()) << what;
  for (int64_t i = 0; i < host.numel(); ++i)
    ASSERT_EQ(d.ptr<int32_t>()[i], host.ptr<int32_t>()[i]) << what << " differs at " << i;
}

// ---- routing plan -------------------------------------------------------------------------------

struct PlanCase {
  int64_t T, k, E, hot;
  double hot_share;
  DType id_dtype;
};

TEST(CudaBackendPlan, MatchesCpuStableOrder) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  const std::vector<PlanCase> cases = {
      {1, 1, 1, 0, 0, DType::I32},          {1, 8, 128, 0, 0, DType::I64},
      {37, 3, 7, 0, 0, DType::I32},         {1000, 8, 128, 0, 0, DType::I32},
      {4096, 4, 64, 4, 0.5, DType::I64},    {300, 2, 512, 0, 0, DType::I32},     // most experts empty
      {5000, 1, 16, 1, 1.0, DType::I32},    // one expert takes everything
      {250000, 8, 512, 0, 0, DType::I32},   // 2M pairs: many tiles, E = 512
      {70000, 8, 128, 8, 0.7, DType::I64},  // skewed
  };
  for (const PlanCase& c : cases) {
    SCOPED_TRACE("T " + std::to_string(c.T) + " k " + std::to_string(c.k) + " E " + std::to_string(c.E));
    const Tensor ids = random_ids(c.id_dtype, c.T, c.k, c.E, rng, c.hot, c.hot_share);
    Plans p = build_plans(b, ids, c.E);
    b.gpu->synchronize();
    EXPECT_EQ(p.gpu.tokens, c.T);
    EXPECT_EQ(p.gpu.top_k, c.k);
    EXPECT_EQ(p.gpu.experts, c.E);
    expect_same_i32(*b.gpu, p.gpu.offsets, p.cpu.offsets, "offsets");
    expect_same_i32(*b.gpu, p.gpu.sorted_pairs, p.cpu.sorted_pairs, "sorted_pairs");
    expect_same_i32(*b.gpu, p.gpu.row_of_pair, p.cpu.row_of_pair, "row_of_pair");
  }
}

TEST(CudaBackendPlan, ZeroTokens) {
  FP8MOE_REQUIRE_GPU();
  Backends b;
  Tensor ids = b.gpu->empty(DType::I32, {0, 4});
  RoutingPlan plan;
  b.gpu->build_plan(ids, 16, plan);
  b.gpu->synchronize();
  ASSERT_EQ(plan.offsets.numel(), 17);
  const Tensor off = to_host(*b.gpu, plan.offsets);
  for (int64_t e = 0; e <= 16; ++e) EXPECT_EQ(off.ptr<int32_t>()[e], 0);
  EXPECT_EQ(plan.sorted_pairs.numel(), 0);
}

// Out-of-range ids: counted on the device, reported by synchronize() (naming topk_ids), and the
// pairs are left out of every expert: they sit after offsets[E] and add nothing to combine.
TEST(CudaBackendPlan, OutOfRangeIdsAreExcludedAndReported) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  const int64_t T = 900, k = 4, E = 32, H = 64;
  for (DType dt : {DType::I32, DType::I64}) {
    Tensor ids = random_ids(dt, T, k, E, rng);
    std::vector<int64_t> bad_pairs = {5, 6, 1234, 3599};
    const int64_t bad_values[] = {-1, E, 1000, -100000};
    for (size_t i = 0; i < bad_pairs.size(); ++i) {
      if (dt == DType::I32)
        ids.ptr<int32_t>()[bad_pairs[i]] = static_cast<int32_t>(bad_values[i]);
      else
        ids.ptr<int64_t>()[bad_pairs[i]] = bad_values[i];
    }
    Tensor ids_dev = b.gpu->upload(ids);
    RoutingPlan plan;
    b.gpu->build_plan(ids_dev, E, plan);
    try {
      b.gpu->synchronize();
      ADD_FAILURE() << "synchronize() did not report the out-of-range ids";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("topk_ids"), std::string::npos) << msg;
      EXPECT_NE(msg.find("4 expert id"), std::string::npos) << msg;
      EXPECT_NE(msg.find("pair 5 holds -1"), std::string::npos) << msg;
    }
    b.gpu->synchronize();  // the report was cleared

    const Tensor off = to_host(*b.gpu, plan.offsets), sorted = to_host(*b.gpu, plan.sorted_pairs);
    const Tensor row_of = to_host(*b.gpu, plan.row_of_pair);
    const int64_t M = T * k, valid = M - static_cast<int64_t>(bad_pairs.size());
    ASSERT_EQ(off.ptr<int32_t>()[E], valid);
    for (size_t i = 0; i < bad_pairs.size(); ++i) EXPECT_EQ(sorted.ptr<int32_t>()[valid + i], bad_pairs[i]);
    for (int64_t p = 0; p < M; ++p) ASSERT_EQ(sorted.ptr<int32_t>()[row_of.ptr<int32_t>()[p]], p);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off.ptr<int32_t>()[e]; r < off.ptr<int32_t>()[e + 1]; ++r) {
        const int64_t p = sorted.ptr<int32_t>()[r];
        const int64_t id = dt == DType::I32 ? ids.ptr<int32_t>()[p] : ids.ptr<int64_t>()[p];
        ASSERT_EQ(id, e) << "row " << r;
        if (r > off.ptr<int32_t>()[e]) ASSERT_LT(sorted.ptr<int32_t>()[r - 1], p) << "not stable at row " << r;
      }

    // combine skips the excluded pairs: compare with a host sum over the valid pairs only.
    const Tensor rows = random_host(DType::F32, {M, H}, rng);
    const Tensor w = random_host(DType::F32, {T, k}, rng);
    Tensor out = poisoned(*b.gpu, DType::F32, {T, H});
    Tensor rows_dev = b.gpu->upload(rows), w_dev = b.gpu->upload(w);
    b.gpu->combine({&plan, rows_dev, w_dev, out});
    const Tensor got = to_host(*b.gpu, out);
    Tensor ref(DType::F64, {T, H});
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        double acc = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = t * k + j, r = row_of.ptr<int32_t>()[p];
          if (r < valid) acc += w.ptr<float>()[p] * static_cast<double>(rows.ptr<float>()[r * H + h]);
        }
        ref.ptr<double>()[t * H + h] = acc;
      }
    EXPECT_LT(rel_error(got, ref), 1e-6);
  }
}

// ---- combine and pair_dot -----------------------------------------------------------------------

std::string dname(DType d) { return std::string(dtype_name(d)); }

TEST(CudaBackendCombine, MatchesCpu) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  struct Dims {
    int64_t T, k, E, H;
  };
  for (const Dims d : {Dims{300, 8, 32, 2048}, Dims{77, 4, 8, 320}, Dims{50, 3, 5, 37}, Dims{1, 1, 1, 8}}) {
    const Tensor ids = random_ids(DType::I32, d.T, d.k, d.E, rng);
    Plans p = build_plans(b, ids, d.E);
    const int64_t M = d.T * d.k;
    for (DType row_dt : {DType::BF16, DType::F32})
      for (DType w_dt : {DType::F32, DType::BF16, DType::U8 /* none */})
        for (DType out_dt : {DType::F32, DType::BF16}) {
          SCOPED_TRACE("H " + std::to_string(d.H) + " rows " + dname(row_dt) + " weights " +
                       (w_dt == DType::U8 ? "none" : dname(w_dt)) + " out " + dname(out_dt));
          const Tensor rows = random_host(row_dt, {M, d.H}, rng);
          const Tensor w = w_dt == DType::U8 ? Tensor() : random_host(w_dt, {d.T, d.k}, rng, 0.5, 0.3);
          Tensor ref(DType::F64, {d.T, d.H});
          b.cpu->combine({&p.cpu, rows, w.view(), ref});
          Tensor rows_dev = b.gpu->upload(rows);
          Tensor w_dev = w.defined() ? b.gpu->upload(w) : Tensor();
          Tensor out = poisoned(*b.gpu, out_dt, {d.T, d.H});
          b.gpu->combine({&p.gpu, rows_dev, w_dev.view(), out});
          const Tensor got = to_host(*b.gpu, out);
          EXPECT_LT(rel_error(got, ref), out_dt == DType::BF16 ? 5e-3 : 1e-6);

          Tensor again = poisoned(*b.gpu, out_dt, {d.T, d.H});
          b.gpu->combine({&p.gpu, rows_dev, w_dev.view(), again});
          EXPECT_TRUE(test::bytes_equal(to_host(*b.gpu, again), got)) << "combine is not bitwise reproducible";
        }
  }
  b.gpu->synchronize();
}

TEST(CudaBackendPairDot, MatchesCpu) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  struct Dims {
    int64_t T, k, E, H;
  };
  for (const Dims d : {Dims{200, 8, 32, 2048}, Dims{40, 4, 8, 2880}, Dims{33, 2, 3, 37}}) {
    const Tensor ids = random_ids(DType::I64, d.T, d.k, d.E, rng);
    Plans p = build_plans(b, ids, d.E);
    const int64_t M = d.T * d.k;
    for (DType tok_dt : {DType::BF16, DType::F32})
      for (DType row_dt : {DType::BF16, DType::F32})
        for (DType out_dt : {DType::F32, DType::BF16}) {
          SCOPED_TRACE("H " + std::to_string(d.H) + " tokens " + dname(tok_dt) + " rows " + dname(row_dt) + " out " +
                       dname(out_dt));
          const Tensor tokens = random_host(tok_dt, {d.T, d.H}, rng);
          const Tensor rows = random_host(row_dt, {M, d.H}, rng, 1.0, 0.5);
          Tensor ref(DType::F64, {d.T, d.k});
          b.cpu->pair_dot({&p.cpu, tokens, rows, ref});
          Tensor tok_dev = b.gpu->upload(tokens), rows_dev = b.gpu->upload(rows);
          Tensor out = poisoned(*b.gpu, out_dt, {d.T, d.k});
          b.gpu->pair_dot({&p.gpu, tok_dev, rows_dev, out});
          EXPECT_LT(rel_error(to_host(*b.gpu, out), ref), out_dt == DType::BF16 ? 5e-3 : 1e-5);
        }
  }
  b.gpu->synchronize();
}

// ---- routers --------------------------------------------------------------------------------------

struct RouterCase {
  RouterKind kind;
  bool normalize;
  double scaling;
};

double norm(const TensorView& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += std::pow(load_as_double(t.data, t.dtype, i), 2);
  return std::sqrt(s);
}
double diff_norm(const TensorView& a, const TensorView& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = load_as_double(a.data, a.dtype, i);
    if (!std::isfinite(x)) return HUGE_VAL;
    s += std::pow(x - load_as_double(b.data, b.dtype, i), 2);
  }
  return std::sqrt(s);
}

// SigmoidBiasTopK ranks sigmoid(x) + bias, which fp32 and double may order differently when two
// keys are within rounding of each other (softmax kinds rank the logits themselves: exact). Such
// near-ties are ill-posed for any fp32 router, so tokens with one near the top k are redrawn.
void separate_sigmoid_keys(const Tensor& logits, const Tensor& bias, int64_t k, std::mt19937_64& rng) {
  const int64_t T = logits.size(0), E = logits.size(1);
  std::normal_distribution<double> nd(0.0, 2.0);
  std::vector<double> key(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int attempt = 0;; ++attempt) {
      ASSERT_LT(attempt, 1000) << "could not draw well-separated router keys";
      for (int64_t e = 0; e < E; ++e) {
        const double x = load_as_double(logits.data(), logits.dtype(), t * E + e);
        key[e] = 1.0 / (1.0 + std::exp(-x)) + bias.ptr<float>()[e];
      }
      std::vector<double> sorted = key;
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      bool separated = true;
      for (int64_t j = 0; j < std::min(k, E - 1); ++j) separated &= sorted[j] - sorted[j + 1] > 1e-5;
      if (separated) break;
      for (int64_t e = 0; e < E; ++e) store_from_double(logits.data(), logits.dtype(), t * E + e, nd(rng));
    }
  }
}

TEST(CudaBackendRouter, ForwardAndBackwardMatchCpu) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  const std::vector<RouterCase> kinds = {{RouterKind::SoftmaxTopK, true, 1.0},
                                         {RouterKind::SoftmaxTopK, false, 1.0},
                                         {RouterKind::SigmoidBiasTopK, true, 1.8},
                                         {RouterKind::SigmoidBiasTopK, false, 2.5},
                                         {RouterKind::TopKSoftmax, true, 1.0}};
  struct Dims {
    int64_t T, E, k;
  };
  for (const Dims d : {Dims{257, 128, 8}, Dims{100, 64, 4}, Dims{64, 512, 8}, Dims{50, 37, 1}, Dims{20, 3, 3},
                       Dims{10, 32, 32}})
    for (const RouterCase& rc : kinds)
      for (DType logit_dt : {DType::F32, DType::BF16})
        for (DType w_dt : {DType::F32, DType::BF16}) {
          SCOPED_TRACE(std::string(router_kind_name(rc.kind)) + (rc.normalize ? " normalized" : " raw") + " E " +
                       std::to_string(d.E) + " k " + std::to_string(d.k) + " logits " + dname(logit_dt) +
                       " weights " + dname(w_dt));
          RouterSpec spec;
          spec.kind = rc.kind;
          spec.top_k = d.k;
          spec.normalize = rc.normalize;
          spec.scaling = rc.scaling;
          const Tensor logits = random_host(logit_dt, {d.T, d.E}, rng, 2.0);
          const Tensor bias = random_host(DType::F32, {d.E}, rng, 0.1);
          if (rc.kind == RouterKind::SigmoidBiasTopK) separate_sigmoid_keys(logits, bias, d.k, rng);
          Tensor bias_dev;
          RouterSpec spec_cpu = spec, spec_gpu = spec;
          if (rc.kind == RouterKind::SigmoidBiasTopK) {
            bias_dev = b.gpu->upload(bias);
            spec_cpu.correction_bias = bias;
            spec_gpu.correction_bias = bias_dev;
          }
          Tensor ids_ref(DType::I32, {d.T, d.k}), w_ref(DType::F64, {d.T, d.k});
          b.cpu->route(spec_cpu, logits, ids_ref, w_ref);
          Tensor logits_dev = b.gpu->upload(logits);
          Tensor ids = poisoned(*b.gpu, DType::I32, {d.T, d.k}), w = poisoned(*b.gpu, w_dt, {d.T, d.k});
          b.gpu->route(spec_gpu, logits_dev, ids, w);
          const Tensor ids_got = to_host(*b.gpu, ids);
          int64_t id_mismatch = 0;
          for (int64_t i = 0; i < d.T * d.k; ++i) id_mismatch += ids_got.ptr<int32_t>()[i] != ids_ref.ptr<int32_t>()[i];
          EXPECT_EQ(id_mismatch, 0);
          EXPECT_LT(rel_error(to_host(*b.gpu, w), w_ref), w_dt == DType::BF16 ? 5e-3 : 1e-5);

          // Backward on the CPU's selection (shared by both).
          const Tensor gw = random_host(w_dt, {d.T, d.k}, rng);
          Tensor gl_ref(DType::F64, {d.T, d.E});
          b.cpu->route_backward(spec_cpu, logits, ids_ref, gw, gl_ref);
          Tensor ids_dev = b.gpu->upload(ids_ref), gw_dev = b.gpu->upload(gw);
          for (DType gl_dt : {DType::F32, DType::BF16}) {
            Tensor gl = poisoned(*b.gpu, gl_dt, {d.T, d.E});
            b.gpu->route_backward(spec_gpu, logits_dev, ids_dev, gw_dev, gl);
            // Where the exact gradient vanishes (a renormalised top-1: w = 1 whatever the logits),
            // both sides hold rounding noise: measure against the scale of dL/dweights then.
            const double scale = std::max(norm(gl_ref), 1e-3 * norm(gw));
            EXPECT_LT(diff_norm(to_host(*b.gpu, gl), gl_ref) / scale, gl_dt == DType::BF16 ? 5e-3 : 1e-5)
                << "grad_logits " << dname(gl_dt);
          }
        }
  b.gpu->synchronize();
}

// Ties go to the lower expert index, as on the CPU: many equal logits.
TEST(CudaBackendRouter, TiesGoToLowerIndex) {
  FP8MOE_REQUIRE_GPU();
  Backends b;
  const int64_t T = 3, E = 100, k = 6;
  Tensor logits(DType::F32, {T, E});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) logits.ptr<float>()[t * E + e] = static_cast<float>((e * 7 + t) % 5);
  for (RouterKind kind : {RouterKind::SoftmaxTopK, RouterKind::TopKSoftmax, RouterKind::SigmoidBiasTopK}) {
    RouterSpec spec;
    spec.kind = kind;
    spec.top_k = k;
    Tensor ids_ref(DType::I32, {T, k}), w_ref(DType::F64, {T, k});
    b.cpu->route(spec, logits, ids_ref, w_ref);
    Tensor logits_dev = b.gpu->upload(logits);
    Tensor ids = poisoned(*b.gpu, DType::I32, {T, k}), w = poisoned(*b.gpu, DType::F32, {T, k});
    b.gpu->route(spec, logits_dev, ids, w);
    const Tensor got = to_host(*b.gpu, ids);
    for (int64_t i = 0; i < T * k; ++i) EXPECT_EQ(got.ptr<int32_t>()[i], ids_ref.ptr<int32_t>()[i]) << router_kind_name(kind);
  }
}

// ---- fill and copy ------------------------------------------------------------------------------

TEST(CudaBackendFill, EveryDtypeAndUnalignedViews) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> len(0, 200);
  Backends b;
  struct Case {
    DType dt;
    double value;
  };
  for (const Case c : {Case{DType::F32, -1.25}, Case{DType::BF16, 3.5}, Case{DType::F16, -0.75}, Case{DType::F64, 1e300},
                       Case{DType::F8_E4M3, 1000.0 /* saturates */}, Case{DType::F8_E5M2, -2.0},
                       Case{DType::I32, -123456}, Case{DType::I64, 9e15}, Case{DType::U8, 200},
                       Case{DType::BF16, std::numeric_limits<double>::quiet_NaN()}}) {
    SCOPED_TRACE(dname(c.dt));
    const int64_t es = dtype_size(c.dt);
    for (int rep = 0; rep < 6; ++rep) {
      const int64_t lead = len(rng) % 9, n = rep == 0 ? 0 : len(rng) + (rep == 5 ? 5000 : 0), trail = 3;
      const int64_t total = lead + n + trail;
      Tensor buf = b.gpu->empty(c.dt, {total});
      b.gpu->fill(buf, c.dt == DType::U8 ? 7 : 0);  // background
      TensorView view(static_cast<char*>(buf.data()) + lead * es, c.dt, {n}, Device::CUDA);
      b.gpu->fill(view, c.value);
      const Tensor got = to_host(*b.gpu, buf);
      uint64_t expect_bits = 0, zero_bits = 0;
      if (is_float(c.dt)) {
        store_from_double(&expect_bits, c.dt, 0, c.value);
      } else {
        const int64_t v = static_cast<int64_t>(c.value);
        std::memcpy(&expect_bits, &v, static_cast<size_t>(es));
        if (c.dt == DType::U8) zero_bits = 7;
      }
      for (int64_t i = 0; i < total; ++i) {
        uint64_t bits = 0;
        std::memcpy(&bits, static_cast<const char*>(got.data()) + i * es, static_cast<size_t>(es));
        const bool inside = i >= lead && i < lead + n;
        ASSERT_EQ(bits, inside ? expect_bits : zero_bits) << "element " << i << " (view [" << lead << ", " << lead + n
                                                          << "))";
      }
    }
  }
  b.gpu->synchronize();
}

TEST(CudaBackendCopy, RoundTripsEveryDirection) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Backends b;
  for (int64_t n : {1, 3, 1000, 123457}) {
    const Tensor src = random_host(DType::BF16, {n}, rng);
    Tensor d1 = b.gpu->upload(src);
    Tensor d2 = poisoned(*b.gpu, DType::BF16, {n});
    b.gpu->copy(d2, d1);                // device -> device
    const Tensor back = to_host(*b.gpu, d2);  // device -> host: valid on return
    EXPECT_TRUE(test::bytes_equal(back, src)) << "n " << n;
  }
  Tensor a = b.gpu->empty(DType::F32, {4});
  Tensor h(DType::F32, {5});
  EXPECT_THROW(b.gpu->copy(h, a), Error);
}

}  // namespace
}  // namespace fp8moe

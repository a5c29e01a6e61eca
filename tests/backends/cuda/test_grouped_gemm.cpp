// GPU tests of the grouped GEMM (src/backends/cuda/grouped_gemm.cu): fresh random inputs,
// outputs poisoned with NaN, a double-precision host reference written from backend.hpp's
// descriptor semantics, relative Frobenius error plus per-row checks (an unwritten row stays
// NaN), every tile shape and the default choice, bitwise determinism, and a timing of the Qwen3
// shapes. grouped_outer's tests are in test_grouped_outer.cpp.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/grouped_gemm.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe {
namespace {

using test::at;
using test::download;
using test::expect_rows_close;
using test::finish_plan;
using test::fresh_seed;
using test::HostPlan;
using test::make_plan;
using test::poisoned;
using test::random_host;
using test::Rng;
using test::Routing;
using test::upload;

// ---- one grouped GEMM case, its device run and its double-precision reference
enum class WKind { E4M3, E5M2, BF16, F32 };
struct Case {
  int64_t T = 64, k = 2, E = 4, N = 128, K = 128;
  Routing routing = Routing::Uniform;
  DType a_dtype = DType::BF16;
  RowSource a_rows = RowSource::Rows;
  WKind w = WKind::E4M3;
  ScaleSpec spec;  // of the stored matrix; kind None for plain weights
  bool transpose_b = false;
  int64_t lora_r = 0;
  DType lb_dtype = DType::F32;
  RowSource la_rows = RowSource::Rows;
  bool row_scale = false, bias = false;
  Epilogue epi = Epilogue::Store;
  ActivationSpec act;
  bool aux = false;
  DType out_dtype = DType::BF16, aux_dtype = DType::BF16;
  int64_t check_rows = -1;  // reference rows to check (-1: all)
  bool random_codes = false;  // FP8 codes and scales drawn directly (large stacks: no quantizer pass)
  bool want_rega = false;     // the case must be one the Sm90RegA engine takes
};

struct Problem {
  Case c;
  std::unique_ptr<HostPlan> hp;
  Tensor a, w, wscale, la, lb, rs, bias, aux;  // host
  Tensor d_a, d_w, d_wscale, d_la, d_lb, d_rs, d_bias, d_aux, d_out;
  GroupedGemm g;
  int64_t M = 0, out_cols = 0;
};

std::unique_ptr<Problem> build(const Case& c, Rng& rng) {
  auto P = std::make_unique<Problem>();
  P->c = c;
  P->hp = make_plan(c.T, c.k, c.E, c.routing, rng);
  const int64_t M = c.T * c.k, N = c.N, K = c.K;
  P->M = M;
  const int64_t SR = c.transpose_b ? K : N, SC = c.transpose_b ? N : K;  // stored matrix
  const double wstd = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(K, 1)));
  P->a = random_host(c.a_dtype, {c.a_rows == RowSource::Tokens ? c.T : M, K}, rng.g);
  if (c.w == WKind::BF16 || c.w == WKind::F32) {
    P->w = random_host(c.w == WKind::BF16 ? DType::BF16 : DType::F32, {c.E, SR, SC}, rng.g, wstd);
  } else if (c.random_codes) {
    const bool e5m2 = c.w == WKind::E5M2;
    P->w = Tensor(e5m2 ? DType::F8_E5M2 : DType::F8_E4M3, {c.E, SR, SC});
    uint8_t* codes = P->w.ptr<uint8_t>();
    uint64_t x = rng.g() | 1;
    for (int64_t i = 0; i < P->w.numel(); ++i) {  // xorshift: 400M codes in well under a second
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      const uint8_t code = static_cast<uint8_t>(x >> 40) & 0xBF;  // |code| < 0x40: no NaN/inf codes
      codes[i] = code;
    }
    P->wscale = Tensor(DType::F32, {c.E, c.spec.scale_rows(), c.spec.grid_k()});
    for (int64_t i = 0; i < P->wscale.numel(); ++i)
      P->wscale.ptr<float>()[i] = static_cast<float>(wstd * (0.5 + rng.below(1000) / 1000.0));
  } else {
    Tensor wf = random_host(DType::F32, {c.E, SR, SC}, rng.g, wstd);
    QuantWeights q = quantize(wf, c.spec, c.w == WKind::E4M3 ? DType::F8_E4M3 : DType::F8_E5M2);
    P->w = q.data;
    P->wscale = q.scale;
  }
  P->d_a = upload(P->a);
  P->d_w = upload(P->w);
  if (P->wscale.defined()) P->d_wscale = upload(P->wscale);
  GroupedGemm& g = P->g;
  g.plan = &P->hp->plan;
  g.a = {P->d_a, c.a_rows};
  g.b.data = P->d_w;
  if (P->wscale.defined()) g.b.scale = P->d_wscale;
  g.b.spec = P->wscale.defined() ? c.spec : ScaleSpec::none(SR, SC);
  g.transpose_b = c.transpose_b;
  if (c.lora_r > 0) {
    P->la = random_host(DType::BF16, {c.la_rows == RowSource::Tokens ? c.T : M, c.lora_r}, rng.g);
    P->lb = random_host(c.lb_dtype, c.transpose_b ? Shape{c.E, c.lora_r, N} : Shape{c.E, N, c.lora_r}, rng.g, 0.3);
    P->d_la = upload(P->la);
    P->d_lb = upload(P->lb);
    g.lora_a = {P->d_la, c.la_rows};
    g.lora_b = P->d_lb;
    g.lora_scale = 0.5 + rng.below(100) / 100.0;
  }
  if (c.row_scale) {
    P->rs = random_host(DType::F32, {M}, rng.g);
    P->d_rs = upload(P->rs);
    g.row_scale = P->d_rs;
  }
  if (c.bias) {
    P->bias = random_host(DType::BF16, {c.E, N}, rng.g, 0.5);
    P->d_bias = upload(P->bias);
    g.bias = P->d_bias;
  }
  g.epilogue = c.epi;
  g.act = c.act;
  P->out_cols = c.epi == Epilogue::GluForward ? N / 2 : c.epi == Epilogue::GluBackward ? 2 * N : N;
  if (c.epi == Epilogue::GluBackward) {
    // Saved pre-activation, with values beyond the GPT-OSS limit so the clamps matter.
    P->aux = random_host(c.aux_dtype, {M, 2 * N}, rng.g, 4.0);
    P->d_aux = upload(P->aux);
    g.aux = P->d_aux;
  } else if (c.aux) {
    P->d_aux = poisoned(c.aux_dtype, {M, N});
    g.aux = P->d_aux;
  }
  P->d_out = poisoned(c.out_dtype, {M, P->out_cols});
  g.out = P->d_out;
  return P;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double act_fwd(const ActivationSpec& a, double gate, double up) {
  if (a.kind == Activation::SiluGlu) return gate * sigmoid(gate) * up;
  const double g = std::min(gate, double{a.limit}), u = std::clamp(up, -double{a.limit}, double{a.limit});
  return (u + 1.0) * g * sigmoid(a.alpha * g);
}
void act_bwd(const ActivationSpec& a, double gate, double up, double& dg, double& du) {
  if (a.kind == Activation::SiluGlu) {
    const double s = sigmoid(gate);
    dg = s * (1.0 + gate * (1.0 - s)) * up;
    du = gate * s;
    return;
  }
  const double lim = a.limit, g = std::min(gate, lim), u = std::clamp(up, -lim, lim), s = sigmoid(a.alpha * g);
  dg = gate <= lim ? (u + 1.0) * (s + a.alpha * g * s * (1.0 - s)) : 0.0;
  du = (up >= -lim && up <= lim) ? g * s : 0.0;
}

struct Ref {
  std::vector<int64_t> rows;        // checked rows (expert order; all, or a sample with the first and last)
  std::vector<double> out, aux;     // [rows.size(), out_cols], [rows.size(), N]
};

Ref reference(const Problem& P, Rng& rng) {
  const Case& c = P.c;
  const HostPlan& hp = *P.hp;
  const int64_t N = c.N, K = c.K, R = c.lora_r;
  Ref ref;
  // Rows to check: all, or a sample that always includes each expert's first and last row.
  std::vector<char> pick(P.M, c.check_rows < 0);
  if (c.check_rows >= 0 && P.M > 0) {
    pick[0] = pick[P.M - 1] = 1;
    for (int64_t i = 0; i < c.check_rows; ++i) pick[rng.below(P.M)] = 1;
  }
  const QuantTensor wq{P.w, P.wscale.defined() ? P.wscale.view() : TensorView(),
                       P.wscale.defined() ? c.spec : ScaleSpec::none(P.w.size(1), P.w.size(2))};
  std::vector<double> W;  // [N, K] of the current expert
  for (int64_t e = 0; e < c.E; ++e) {
    bool any = false;
    for (int64_t r = hp.offsets[e]; r < hp.offsets[e + 1]; ++r) any |= pick[r] != 0;
    if (!any) continue;
    W.assign(N * K, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t kk = 0; kk < K; ++kk) W[n * K + kk] = c.transpose_b ? wq.at(e, kk, n) : wq.at(e, n, kk);
    for (int64_t r = hp.offsets[e]; r < hp.offsets[e + 1]; ++r) {
      if (!pick[r]) continue;
      const int64_t pair = hp.sorted[r], tok = pair / c.k;
      const int64_t arow = c.a_rows == RowSource::Tokens ? tok : r, lrow = c.la_rows == RowSource::Tokens ? tok : r;
      const double rs = c.row_scale ? at(P.rs, pair) : 1.0;
      std::vector<double> v(N);
      for (int64_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (int64_t kk = 0; kk < K; ++kk) s += at(P.a, arow * K + kk) * W[n * K + kk];
        double d = 0.0;
        for (int64_t q = 0; q < R; ++q)
          d += at(P.la, lrow * R + q) * at(P.lb, c.transpose_b ? (e * R + q) * N + n : (e * N + n) * R + q);
        v[n] = rs * (s + P.g.lora_scale * d) + (c.bias ? at(P.bias, e * N + n) : 0.0);
      }
      ref.rows.push_back(r);
      const int64_t oc = P.out_cols;
      std::vector<double> o(oc);
      switch (c.epi) {
        case Epilogue::Store: o = v; break;
        case Epilogue::GluForward:
          for (int64_t j = 0; j < N / 2; ++j) o[j] = act_fwd(c.act, v[c.act.gate_row(j, N / 2)], v[c.act.up_row(j, N / 2)]);
          if (c.aux) ref.aux.insert(ref.aux.end(), v.begin(), v.end());
          break;
        case Epilogue::GluBackward:
          for (int64_t j = 0; j < N; ++j) {
            const int64_t gr = c.act.gate_row(j, N), ur = c.act.up_row(j, N);
            double dg, du;
            act_bwd(c.act, at(P.aux, r * 2 * N + gr), at(P.aux, r * 2 * N + ur), dg, du);
            o[gr] = v[j] * dg;
            o[ur] = v[j] * du;
          }
          break;
      }
      ref.out.insert(ref.out.end(), o.begin(), o.end());
    }
  }
  return ref;
}

// Runs the case with every tile shape against one reference, then once through the default
// shape choice (bitwise equal to that shape's result).
void run_case(const Case& c, double tol = 1e-2) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  auto P = build(c, rng);
  const bool aux_out = c.aux && c.epi == Epilogue::GluForward;
  auto run = [&](const std::function<void()>& launch) {
    FP8MOE_CUDA_CHECK(cudaMemset(P->d_out.data(), 0xFF, P->d_out.nbytes()));
    if (aux_out) FP8MOE_CUDA_CHECK(cudaMemset(P->d_aux.data(), 0xFF, P->d_aux.nbytes()));
    launch();
    FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
    return download(P->d_out);
  };
  const Ref ref = P->M > 0 ? reference(*P, rng) : Ref{};
  const cuda::gemm::TileShape chosen = cuda::gemm::choose_tile_shape(cuda::gemm::describe(P->g));
  if (c.want_rega) EXPECT_TRUE(cuda::gemm::describe(P->g).rega_fits) << "the case misses the Sm90RegA engine";
  Tensor chosen_out;
  for (cuda::gemm::TileShape shape : cuda::gemm::kTileShapes) {
    if (!cuda::gemm::tile_shape_fits(shape, cuda::gemm::describe(P->g))) continue;
    SCOPED_TRACE(std::string("tile ") + cuda::gemm::tile_shape_name(shape));
    auto launch = [&] { cuda::grouped_gemm(P->g, nullptr, shape); };
    const Tensor out = run(launch);
    if (P->M == 0) continue;
    expect_rows_close(out, ref.rows, ref.out, P->out_cols, tol, "out");
    if (aux_out) expect_rows_close(download(P->d_aux), ref.rows, ref.aux, c.N, tol, "aux");
    // Determinism: a second run on re-poisoned outputs is bitwise identical.
    const Tensor out2 = run(launch);
    EXPECT_EQ(std::memcmp(out.data(), out2.data(), out.nbytes()), 0) << "two runs differ";
    if (shape == chosen) chosen_out = out;
  }
  // The default launch: the chosen shape's bits, or with split K (a different summation order)
  // the reference's values, bitwise the same on a second run.
  const int splits = cuda::gemm::gemm_k_splits(cuda::gemm::describe(P->g), chosen);
  const auto launch_default = [&] { cuda::grouped_gemm(P->g, test::dev_alloc(), nullptr); };
  const Tensor out = run(launch_default);
  if (P->M == 0) return;
  if (splits == 1) {
    EXPECT_EQ(std::memcmp(out.data(), chosen_out.data(), out.nbytes()), 0)
        << "default launch differs from its chosen shape " << cuda::gemm::tile_shape_name(chosen);
    return;
  }
  SCOPED_TRACE("K split " + std::to_string(splits) + " ways");
  expect_rows_close(out, ref.rows, ref.out, P->out_cols, tol, "out (split K)");
  const Tensor out2 = run(launch_default);
  EXPECT_EQ(std::memcmp(out.data(), out2.data(), out.nbytes()), 0) << "two split-K runs differ";
}

ScaleSpec block(int64_t rows, int64_t cols, int64_t bn, int64_t bk, int64_t seg = 1) {
  return ScaleSpec::block(rows, cols, bn, bk, seg);
}

// ---------------------------------------------------------------------------------------------
TEST(GroupedGemm, StoreFp8Block) {
  FP8MOE_REQUIRE_GPU();
  Case c;
  c.T = 96, c.k = 2, c.E = 4, c.N = 256, c.K = 256;
  c.spec = block(256, 256, 128, 128);
  run_case(c);
}

TEST(GroupedGemm, TokensF32InputChannelScalesRowScale) {
  FP8MOE_REQUIRE_GPU();
  Case c;
  c.T = 50, c.k = 4, c.E = 8, c.N = 192, c.K = 320;
  c.a_dtype = DType::F32, c.a_rows = RowSource::Tokens;
  c.spec = ScaleSpec::channel(192, 320);
  c.row_scale = true;
  c.out_dtype = DType::F32;
  run_case(c);
}

TEST(GroupedGemm, PartialBlocksTwoSegmentsE5M2) {
  FP8MOE_REQUIRE_GPU();
  Case c;
  c.T = 40, c.k = 2, c.E = 3, c.N = 200, c.K = 72;  // seg_rows 100 over 32-row blocks; K edge block 8
  c.w = WKind::E5M2;
  c.spec = block(200, 72, 32, 32, 2);
  run_case(c);
}

TEST(GroupedGemm, TensorAndGroupScales) {
  FP8MOE_REQUIRE_GPU();
  for (int which = 0; which < 3; ++which) {
    Case c;
    c.T = 33, c.k = 2, c.E = 5, c.N = 136, c.K = 200;
    c.spec = which == 0 ? ScaleSpec::tensor(136, 200, 2) : which == 1 ? ScaleSpec::group(136, 200, 64)
                                                                       : ScaleSpec::group(136, 200, 16);
    SCOPED_TRACE(c.spec.str());
    run_case(c);
  }
}

TEST(GroupedGemm, GroupScalesDividingTheKTile) {
  FP8MOE_REQUIRE_GPU();  // K % 64 == 0: the wgmma fast path steps the group index per K tile
  for (int64_t g : {16, 32, 128}) {
    Case c;
    c.T = 150, c.k = 2, c.E = 2, c.N = 136, c.K = 256;
    c.spec = ScaleSpec::group(136, 256, g);
    SCOPED_TRACE(c.spec.str());
    run_case(c);
  }
}

TEST(GroupedGemm, OddKPerElementPath) {
  FP8MOE_REQUIRE_GPU();
  Case c;  // K % 8 != 0: the per-element path; block_k 5 splits chunks too
  c.T = 21, c.k = 3, c.E = 4, c.N = 50, c.K = 37;
  c.spec = block(50, 37, 16, 5);
  run_case(c);
  Case p = c;
  p.w = WKind::BF16;
  p.a_dtype = DType::F32;
  run_case(p);
}

TEST(GroupedGemm, PlainWeightsBf16AndF32) {
  FP8MOE_REQUIRE_GPU();
  Case c;
  c.T = 70, c.k = 2, c.E = 4, c.N = 128, c.K = 96;
  c.w = WKind::BF16;
  run_case(c);
  c.w = WKind::F32;
  c.a_rows = RowSource::Tokens;
  run_case(c);
}

TEST(GroupedGemm, TransposedWeights) {
  FP8MOE_REQUIRE_GPU();
  {
    Case c;  // dgrad of a block-scaled weight: stored [K, N] = [192, 256]
    c.T = 80, c.k = 2, c.E = 4, c.N = 256, c.K = 192;
    c.transpose_b = true;
    c.spec = block(192, 256, 128, 128);
    run_case(c);
  }
  {
    Case c;  // per-channel (one scale per stored row = per k), token gather
    c.T = 64, c.k = 2, c.E = 4, c.N = 160, c.K = 136;
    c.transpose_b = true;
    c.a_rows = RowSource::Tokens;
    c.spec = ScaleSpec::channel(136, 160);
    run_case(c);
  }
  {
    Case c;  // per-channel read transposed with K % 64 == 0 (wgmma fast path: scale per k row)
    c.T = 160, c.k = 2, c.E = 2, c.N = 160, c.K = 192;
    c.transpose_b = true;
    c.spec = ScaleSpec::channel(192, 160);
    run_case(c);
  }
  {
    Case c;  // 32-row blocks over k in two segments of 64 (linear k-part, not tile-uniform)
    c.T = 150, c.k = 2, c.E = 2, c.N = 256, c.K = 128;
    c.transpose_b = true;
    c.spec = block(128, 256, 32, 64, 2);
    run_case(c);
  }
  {
    Case c;  // N % 8 != 0: per-element columns; two segments over k
    c.T = 30, c.k = 2, c.E = 3, c.N = 100, c.K = 96;
    c.transpose_b = true;
    c.spec = block(96, 100, 32, 32, 2);
    run_case(c);
  }
}

TEST(GroupedGemm, LoraDelta) {
  FP8MOE_REQUIRE_GPU();
  for (bool trans : {false, true})
    for (int64_t r : {8, 13}) {
      Case c;
      c.T = 48, c.k = 2, c.E = 4, c.N = 144, c.K = 128;
      c.transpose_b = trans;
      c.spec = trans ? block(128, 144, 64, 64) : block(144, 128, 64, 64);
      c.lora_r = r;
      c.lb_dtype = r == 8 ? DType::F32 : DType::BF16;
      c.la_rows = r == 8 ? RowSource::Rows : RowSource::Tokens;
      c.row_scale = r == 13;
      SCOPED_TRACE("r " + std::to_string(r) + (trans ? " transposed" : ""));
      run_case(c);
    }
}

// Ranks that are multiples of 8 with BF16 L take whole 16-byte LoRA chunks (Params::vec_lora),
// LB in BF16 or F32; N 100 read transposed is not a multiple of 8, so those tiles mix whole and
// per-element chunks. Tile shapes with 128 rows and both engines run (run_case).
TEST(GroupedGemm, LoraDeltaWholeChunks) {
  FP8MOE_REQUIRE_GPU();
  for (bool trans : {false, true})
    for (int64_t N : {144, 100})
      for (DType lb : {DType::BF16, DType::F32}) {
        Case c;
        c.T = 150, c.k = 2, c.E = 3, c.N = N, c.K = 192;
        c.transpose_b = trans;
        c.spec = trans ? block(192, N, 64, 32) : block(N, 192, 32, 64);
        c.lora_r = lb == DType::BF16 ? 16 : 72;  // 72: the LoRA K extent spans two 64-wide tiles
        c.lb_dtype = lb;
        c.la_rows = trans ? RowSource::Rows : RowSource::Tokens;
        c.row_scale = !trans;
        SCOPED_TRACE("N " + std::to_string(N) + " r " + std::to_string(c.lora_r) + (trans ? " transposed" : ""));
        run_case(c);
      }
}

// Plain F32 weights (LoRA A used as W: the U = X A^T GEMM) take whole 16-byte-pair loads
// (Params::wide_b) where K (N transposed) is a multiple of 8, the per-element path elsewhere.
TEST(GroupedGemm, PlainF32Weights) {
  FP8MOE_REQUIRE_GPU();
  for (bool trans : {false, true})
    for (int64_t K : {256, 100}) {
      Case c;
      c.T = 140, c.k = 2, c.E = 3, c.N = 24, c.K = K;
      c.w = WKind::F32;
      c.transpose_b = trans;
      SCOPED_TRACE("K " + std::to_string(K) + (trans ? " transposed" : ""));
      run_case(c);
    }
}

// Split K (gemm::gemm_k_splits): the plain rank-r projections of a dense layer's LoRA (one group,
// 700-2048 rows, a long K) on the narrow tile. K off the 32-wide step and off 8 (per-element A),
// W read transposed, F32 and BF16 out, two groups with one of them empty; rows outside the
// experts stay as the caller left them.
TEST(GroupedGemm, SplitKNarrowProjections) {
  FP8MOE_REQUIRE_GPU();
  struct Shape {
    int64_t T, E, N, K;
    bool trans;
    DType out;
    Routing routing;
  };
  const Shape shapes[] = {{1000, 1, 16, 2048, false, DType::BF16, Routing::Uniform},
                          {700, 1, 13, 1030, true, DType::F32, Routing::Uniform},
                          {900, 2, 16, 4096, false, DType::BF16, Routing::Hot},
                          {2048, 1, 32, 777, false, DType::F32, Routing::Uniform},
                          {1500, 1, 16, 200, true, DType::F32, Routing::Uniform}};  // 3 short ranges and a K tail
  for (const Shape& s : shapes) {
    Case c;
    c.T = s.T, c.k = 1, c.E = s.E, c.N = s.N, c.K = s.K;
    c.w = WKind::BF16;
    c.transpose_b = s.trans;
    c.out_dtype = s.out;
    c.routing = s.routing;
    SCOPED_TRACE("T " + std::to_string(s.T) + " N " + std::to_string(s.N) + " K " + std::to_string(s.K) +
                 (s.trans ? " transposed" : ""));
    {
      Rng rng(fresh_seed());
      auto P = build(c, rng);
      const auto gp = cuda::gemm::describe(P->g);
      ASSERT_GT(cuda::gemm::gemm_k_splits(gp, cuda::gemm::choose_tile_shape(gp)), 1) << "the case does not split K";
    }
    run_case(c);
  }
}

// The LoRA rank-r projections (U = Xp A^T, V = Act A_d^T, Q = G B_d, R = dH1 B_gu): plain BF16
// weights with N = r, which choose_tile_shape gives the narrow 128 x 32 tile. Odd ranks, K off
// the 32-wide K step, both orientations, token and row sources, empty and hot experts.
TEST(GroupedGemm, NarrowNProjections) {
  FP8MOE_REQUIRE_GPU();
  struct Shape {
    int64_t N, K;
    bool trans;
    RowSource rows;
    Routing routing;
  };
  const Shape shapes[] = {{16, 512, false, RowSource::Tokens, Routing::Uniform},
                          {16, 384, true, RowSource::Tokens, Routing::SomeEmpty},
                          {32, 200, false, RowSource::Rows, Routing::Hot},
                          {8, 264, true, RowSource::Rows, Routing::Uniform},
                          {5, 130, false, RowSource::Tokens, Routing::SomeEmpty},
                          {12, 96, true, RowSource::Rows, Routing::Hot}};
  for (const Shape& s : shapes) {
    Case c;
    c.T = 300, c.k = s.routing == Routing::Hot ? 1 : 2, c.E = 6, c.N = s.N, c.K = s.K;
    c.w = WKind::BF16;
    c.transpose_b = s.trans;
    c.a_rows = s.rows;
    c.routing = s.routing;
    SCOPED_TRACE("N " + std::to_string(s.N) + " K " + std::to_string(s.K) + (s.trans ? " transposed" : ""));
    run_case(c);
  }
  // The choice itself, on a projection-like descriptor (the cases above run every shape): a plain
  // sum takes the plain twin, a row scale the general narrow tile.
  Case c;
  c.T = 64, c.N = 16, c.K = 256, c.w = WKind::BF16;
  Rng rng(fresh_seed());
  auto P = build(c, rng);
  EXPECT_EQ(cuda::gemm::choose_tile_shape(cuda::gemm::describe(P->g)), cuda::gemm::TileShape::M128N32Plain);
  c.row_scale = true;
  auto Q = build(c, rng);
  EXPECT_EQ(cuda::gemm::choose_tile_shape(cuda::gemm::describe(Q->g)), cuda::gemm::TileShape::M128N32);
}

TEST(GroupedGemm, BiasWithoutRowScale) {
  FP8MOE_REQUIRE_GPU();
  Case c;
  c.T = 60, c.k = 2, c.E = 6, c.N = 130, c.K = 64;
  c.spec = ScaleSpec::channel(130, 64);
  c.bias = true;
  c.out_dtype = DType::F32;
  run_case(c);
}

TEST(GroupedGemm, GluForwardAllActivationsAndLayouts) {
  FP8MOE_REQUIRE_GPU();
  for (Activation kind : {Activation::SiluGlu, Activation::GptOssGlu})
    for (GateUpLayout layout : {GateUpLayout::Halves, GateUpLayout::Interleaved}) {
      Case c;
      c.T = 70, c.k = 2, c.E = 4, c.N = 200, c.K = 128;  // I = 100: a partial 64-column j tile
      c.epi = Epilogue::GluForward;
      c.act.kind = kind;
      c.act.layout = layout;
      c.act.limit = 1.5f;  // small so the clamps bite on unit-variance values
      c.spec = layout == GateUpLayout::Halves ? block(200, 128, 64, 64, 2) : ScaleSpec::channel(200, 128);
      c.aux = true;
      c.aux_dtype = kind == Activation::SiluGlu ? DType::BF16 : DType::F32;
      c.out_dtype = layout == GateUpLayout::Halves ? DType::BF16 : DType::F32;
      c.bias = kind == Activation::GptOssGlu;
      c.lora_r = layout == GateUpLayout::Interleaved ? 8 : 0;
      SCOPED_TRACE(std::string(kind == Activation::SiluGlu ? "silu" : "gptoss") +
                   (layout == GateUpLayout::Halves ? " halves" : " interleaved"));
      run_case(c);
    }
  Case c;  // without aux, row scale on
  c.T = 40, c.k = 2, c.E = 4, c.N = 256, c.K = 64;
  c.epi = Epilogue::GluForward;
  c.spec = block(256, 64, 128, 128, 2);
  c.row_scale = true;
  run_case(c);
}

TEST(GroupedGemm, GluBackwardAllActivationsAndLayouts) {
  FP8MOE_REQUIRE_GPU();
  for (Activation kind : {Activation::SiluGlu, Activation::GptOssGlu})
    for (GateUpLayout layout : {GateUpLayout::Halves, GateUpLayout::Interleaved})
      for (bool trans : {true, false}) {
        Case c;  // dL/dact = dY @ Wd (Wd stored [H, I] = [K, N]) -> dL/dgate, dL/dup [M, 2N]
        c.T = 50, c.k = 2, c.E = 4, c.N = 96, c.K = 160;
        c.epi = Epilogue::GluBackward;
        c.act.kind = kind;
        c.act.layout = layout;
        c.act.limit = 3.0f;
        c.transpose_b = trans;
        c.spec = trans ? block(160, 96, 128, 128) : block(96, 160, 128, 128);
        c.aux_dtype = trans ? DType::BF16 : DType::F32;
        c.out_dtype = trans ? DType::BF16 : DType::F32;
        SCOPED_TRACE(std::string(kind == Activation::SiluGlu ? "silu" : "gptoss") +
                     (layout == GateUpLayout::Halves ? " halves" : " interleaved") + (trans ? " transposed" : ""));
        run_case(c);
      }
}

// The register-A wgmma engine (Sm90RegA) on what stresses its pipeline: more K tiles than
// stages (the ring wraps twice: mbarrier phases), several row tiles per expert with a partial
// last one, N past the last full 128-row W tile, every scale scheme it takes, both FP8 kinds,
// gathered token rows, one hot expert with the others empty, and transposed W.
TEST(GroupedGemm, RegAPipelineWrapsAndEdges) {
  FP8MOE_REQUIRE_GPU();
  {
    Case c;
    c.T = 300, c.k = 2, c.E = 3, c.N = 200, c.K = 1280;  // 20 K tiles over 8 stages
    c.a_rows = RowSource::Tokens;
    c.spec = block(200, 1280, 128, 128);
    c.row_scale = true, c.bias = true;
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;
    c.T = 260, c.k = 1, c.E = 2, c.N = 320, c.K = 576;
    c.w = WKind::E5M2;
    c.spec = ScaleSpec::channel(320, 576);
    c.out_dtype = DType::F32;
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;  // GLU forward, scales per 64-wide K group, every row on one expert
    c.T = 400, c.k = 1, c.E = 8, c.N = 272, c.K = 640;
    c.routing = Routing::Hot;
    c.epi = Epilogue::GluForward;
    c.aux = true;
    c.spec = ScaleSpec::group(272, 640, 64);
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;  // one scale for the whole stack
    c.T = 129, c.k = 1, c.E = 1, c.N = 128, c.K = 64;
    c.spec = ScaleSpec::tensor(128, 64);
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;  // transposed (dgrad reading): stored [K, N], two segments of 128-row blocks
    c.T = 300, c.k = 2, c.E = 3, c.N = 208, c.K = 1280;
    c.transpose_b = true;
    c.spec = block(1280, 208, 128, 128, 2);
    c.row_scale = true;
    c.want_rega = true;
    run_case(c);
  }
  for (bool trans : {false, true}) {
    Case c;  // LoRA: r = 72 spans two 64-wide LoRA tiles; gathered L rows, F32 or BF16 LB
    c.T = 160, c.k = 2, c.E = 3, c.N = 176, c.K = 640;
    c.transpose_b = trans;
    c.spec = trans ? block(640, 176, 128, 128) : block(176, 640, 128, 128);
    c.lora_r = 72;
    c.la_rows = trans ? RowSource::Rows : RowSource::Tokens;
    c.lb_dtype = trans ? DType::BF16 : DType::F32;
    c.bias = true;
    c.want_rega = true;
    SCOPED_TRACE(trans ? "LoRA, transposed" : "LoRA");
    run_case(c);
  }
  {
    Case c;  // transposed, a scale per stored row (GLM's channel scales in the backward GEMMs)
    c.T = 200, c.k = 2, c.E = 3, c.N = 160, c.K = 640;
    c.transpose_b = true;
    c.spec = ScaleSpec::channel(640, 160);
    c.lora_r = 16;
    c.lb_dtype = DType::BF16;
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;  // transposed, 32-row scale blocks in two segments, one scale column; GLU backward
    c.T = 150, c.k = 2, c.E = 2, c.N = 96, c.K = 512;
    c.transpose_b = true;
    c.epi = Epilogue::GluBackward;
    c.spec = block(512, 96, 32, 96, 2);
    c.want_rega = true;
    run_case(c);
  }
  {
    Case c;  // transposed GLU backward, E5M2, one expert hot
    c.T = 200, c.k = 1, c.E = 4, c.N = 144, c.K = 256;
    c.transpose_b = true;
    c.routing = Routing::Hot;
    c.w = WKind::E5M2;
    c.epi = Epilogue::GluBackward;
    c.spec = ScaleSpec::tensor(256, 144);
    c.want_rega = true;
    run_case(c);
  }
}

TEST(GroupedGemm, RoutingEdgeCases) {
  FP8MOE_REQUIRE_GPU();
  {
    Case c;  // half the experts get no rows
    c.T = 80, c.k = 2, c.E = 16, c.N = 128, c.K = 128;
    c.routing = Routing::SomeEmpty;
    c.spec = block(128, 128, 128, 128);
    run_case(c);
  }
  {
    Case c;  // one expert takes every row (several row tiles, the others none)
    c.T = 300, c.k = 1, c.E = 8, c.N = 96, c.K = 64;
    c.routing = Routing::Hot;
    c.spec = ScaleSpec::channel(96, 64);
    run_case(c);
  }
  {
    Case c;  // a single row
    c.T = 1, c.k = 1, c.E = 4, c.N = 72, c.K = 48;
    c.spec = ScaleSpec::channel(72, 48);
    c.lora_r = 8;
    run_case(c);
  }
  {
    Case c;  // M = 0: nothing launched, nothing written, no error
    c.T = 0, c.k = 2, c.E = 4, c.N = 64, c.K = 64;
    c.spec = ScaleSpec::channel(64, 64);
    run_case(c);
  }
}

// Every FP8 code dequantizes exactly as fp8.hpp's decode: A is one-hot, so out[r, n] is
// W[n, r] * scale through the tensor cores (power-of-two scales keep it exact in BF16). Codes
// that decode to NaN/inf go in rows of their own: their column must be NaN (the dot product
// meets 0 * NaN or 0 * inf) except an inf at its own k, and they must not leak elsewhere.
TEST(GroupedGemm, EveryFp8CodeExact) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  for (const bool e5m2 : {false, true}) {
    SCOPED_TRACE(e5m2 ? "E5M2" : "E4M3");
    std::vector<uint8_t> special;  // codes whose value is not finite
    for (int code = 0; code < 256; ++code)
      if (!std::isfinite(decode_fp8(static_cast<uint8_t>(code), e5m2))) special.push_back(static_cast<uint8_t>(code));
    const int64_t K = 256, M = K, regular = 128, N = regular + static_cast<int64_t>(special.size());
    std::vector<int32_t> ids(M, 0);
    HostPlan hp;
    hp.T = M, hp.k = 1, hp.E = 1;
    finish_plan(hp, ids);
    // W [1, N, K]: regular rows hold every finite code (shuffled per row), special rows a
    // random finite row plus one special code.
    Tensor w(e5m2 ? DType::F8_E5M2 : DType::F8_E4M3, {1, N, K});
    uint8_t* codes = w.ptr<uint8_t>();
    for (int64_t n = 0; n < N; ++n) {
      std::vector<uint8_t> row(K);
      for (int64_t kk = 0; kk < K; ++kk) {
        uint8_t code = static_cast<uint8_t>((kk + n * 37) % 256);
        while (!std::isfinite(decode_fp8(code, e5m2))) code = static_cast<uint8_t>(rng.below(256));
        row[kk] = code;
      }
      std::shuffle(row.begin(), row.end(), rng.g);
      if (n >= regular) row[rng.below(K)] = special[n - regular];
      std::memcpy(codes + n * K, row.data(), K);
    }
    // Channel scales 2^j, j in [-8, 8]: exact products.
    Tensor ws(DType::F32, {1, N, 1});
    for (int64_t n = 0; n < N; ++n) ws.ptr<float>()[n] = std::ldexp(1.0f, static_cast<int>(rng.below(17)) - 8);
    Tensor a = Tensor::zeros(DType::BF16, {M, K});
    for (int64_t r = 0; r < M; ++r) store_from_double(a.data(), DType::BF16, r * K + r, 1.0);
    const Tensor d_w = upload(w), d_ws = upload(ws), d_a = upload(a);
    const Tensor d_out = poisoned(DType::F32, {M, N});
    GroupedGemm g;
    g.plan = &hp.plan;
    g.a = {d_a, RowSource::Rows};
    g.b = {d_w, d_ws, ScaleSpec::channel(N, K)};
    g.out = d_out;
    for (cuda::gemm::TileShape shape : cuda::gemm::kTileShapes) {
      if (!cuda::gemm::tile_shape_fits(shape, cuda::gemm::describe(g))) continue;
      SCOPED_TRACE(std::string("tile ") + cuda::gemm::tile_shape_name(shape));
      FP8MOE_CUDA_CHECK(cudaMemset(d_out.data(), 0xFF, d_out.nbytes()));
      cuda::grouped_gemm(g, nullptr, shape);
      FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor out = download(d_out);
      int64_t wrong = 0, not_nan = 0;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t n = 0; n < N; ++n) {
          const float got = out.ptr<float>()[r * N + n];
          const float want = decode_fp8(codes[n * K + r], e5m2) * ws.ptr<float>()[n];
          if (n >= regular && !std::isinf(want)) {  // 1 * inf alone stays inf; anything else is NaN
            not_nan += !std::isnan(got);
            continue;
          }
          if (got != want && wrong++ < 5)
            ADD_FAILURE() << "code 0x" << std::hex << int{codes[n * K + r]} << std::dec << " (row " << n
                          << ", k " << r << "): got " << got << ", want " << want;
        }
      EXPECT_EQ(wrong, 0);
      EXPECT_EQ(not_nan, 0) << "columns holding a NaN/inf code must be NaN";
    }
  }
}

TEST(GroupedGemm, RejectsUnsupportedOperands) {
  FP8MOE_REQUIRE_GPU();
  Rng rng(fresh_seed());
  Case c;
  c.spec = ScaleSpec::channel(c.N, c.K);
  auto P = build(c, rng);
  GroupedGemm g = P->g;
  TensorView bad = g.a.src;
  bad.dtype = DType::F16;
  g.a.src = bad;
  EXPECT_THROW(cuda::grouped_gemm(g, test::dev_alloc(), nullptr), Error);
  g = P->g;
  TensorView badw = g.b.data;
  badw.dtype = DType::I8;
  g.b.data = badw;
  EXPECT_THROW(cuda::grouped_gemm(g, test::dev_alloc(), nullptr), Error);
  g = P->g;
  g.out = TensorView(g.out.data, DType::BF16, {P->M, c.N + 1}, Device::CUDA);
  EXPECT_THROW(cuda::grouped_gemm(g, test::dev_alloc(), nullptr), Error);
}

// The target shapes: Qwen3-30B-A3B at 4096 tokens, sampled rows against the reference, then
// timed (CUDA events, median of 20).
double median_ms(const std::function<void()>& fn) {
  cudaEvent_t a, b;
  FP8MOE_CUDA_CHECK(cudaEventCreate(&a));
  FP8MOE_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    FP8MOE_CUDA_CHECK(cudaEventRecord(a));
    fn();
    FP8MOE_CUDA_CHECK(cudaEventRecord(b));
    FP8MOE_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    FP8MOE_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void large_case(const char* name, Case c) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(std::string(name) + " seed " + std::to_string(seed));
  Rng rng(seed);
  auto P = build(c, rng);
  cuda::grouped_gemm(P->g, test::dev_alloc(), nullptr);
  FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const Tensor out = download(P->d_out);
  const Ref ref = reference(*P, rng);
  expect_rows_close(out, ref.rows, ref.out, P->out_cols, 1e-2, name);
  const double ms = median_ms([&] { cuda::grouped_gemm(P->g, test::dev_alloc(), nullptr); });
  const double flop = 2.0 * P->M * c.N * c.K;
  cudaDeviceProp prop;
  FP8MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("PERF %-34s %s  M %lld N %lld K %lld: %.3f ms  %.1f TFLOP/s\n", name, prop.name,
              static_cast<long long>(P->M), static_cast<long long>(c.N), static_cast<long long>(c.K), ms,
              flop / ms / 1e9);
}

TEST(GroupedGemm, Qwen3ShapesT4096) {
  FP8MOE_REQUIRE_GPU();
  const int64_t T = 4096, k = 8, E = 128, H = 2048, I = 768;
  Case gu;  // gate_up forward: [M, H] x [2I, H]^T, 128x128 blocks in two segments, SiLU-GLU
  gu.T = T, gu.k = k, gu.E = E, gu.N = 2 * I, gu.K = H;
  gu.a_rows = RowSource::Tokens;
  gu.spec = block(2 * I, H, 128, 128, 2);
  gu.epi = Epilogue::GluForward;
  gu.aux = true;
  gu.check_rows = 16;
  gu.random_codes = true;
  large_case("qwen3 gate_up fwd (block, glu)", gu);
  Case dn;  // down forward: [M, I] x [H, I]^T with routing weights
  dn.T = T, dn.k = k, dn.E = E, dn.N = H, dn.K = I;
  dn.spec = block(H, I, 128, 128);
  dn.row_scale = true;
  dn.check_rows = 16;
  dn.random_codes = true;
  large_case("qwen3 down fwd (block)", dn);
  Case dg;  // gate_up dgrad: [M, 2I] x [2I, H] (weight read transposed)
  dg.T = T, dg.k = k, dg.E = E, dg.N = H, dg.K = 2 * I;
  dg.transpose_b = true;
  dg.spec = block(2 * I, H, 128, 128, 2);
  dg.check_rows = 16;
  dg.random_codes = true;
  large_case("qwen3 gate_up dgrad (block, trans)", dg);
  Case ch = gu;  // GLM-style per-channel scales on the same shape
  ch.spec = ScaleSpec::channel(2 * I, H);
  large_case("gate_up fwd (channel, glu)", ch);
}

}  // namespace
}  // namespace fp8moe

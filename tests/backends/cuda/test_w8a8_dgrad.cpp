// The W8A8 FP8 dgrad (src/backends/cuda/w8a8_dgrad.cu): the backward's input-gradient GEMMs on FP8
// tensor cores, W read transposed, against the CPU backend (fp64), fresh random inputs, outputs
// poisoned with NaN. Each case runs both kernels: Fp8 (transposed tiles) and Fp8RegW (W from
// registers).
//
// Two references, as test_w8a8.cpp's:
//   kernel    the CPU GEMM on the *same quantized gradient* (the host's quantize_activations of
//             the rows in expert order; with per-channel W scales, of the rows times their expert's
//             scales, against W's bare codes): is the kernel right? < 1e-2.
//   accuracy  the CPU GEMM on the gradient as given and the dequantized W: what an FP8 dgrad
//             costs, < 3e-2 (E4M3 rounds each gradient element to 3 mantissa bits).
// Cases: both epilogues of a dgrad (Store, GluBackward with either gate/up layout), block scales in
// one or two row segments, tensor scales, per-channel scales (folded into the gradient), LoRA
// (the addend GEMM), row scale, bias, F32 in and out, experts with no rows, one expert taking
// everything, T = 0 and 1, K = 272 and N = 208 (a partial K tile and a partial column tile).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/w8a8_test_util.hpp"
#include "backends/cuda/grouped_gemm.cuh"
#include "backends/cuda/w8a8.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"

namespace fp8moe {
namespace {

using test::fresh_seed;
using test::poisoned;
using test::random_host;
using test::random_ids;
using test::rel_error;
using test::to_host;

struct DgradCase {
  std::string name;
  int64_t T, k, E;
  int64_t K, N;  // W stored [E, K, N]: K the reduction (the forward's output), N the output
  ScaleKind scale = ScaleKind::Block;
  int64_t segments = 1;  // scale segments of the stored rows (the gate_up stack's two)
  Epilogue epi = Epilogue::Store;
  Activation act = Activation::SiluGlu;
  GateUpLayout layout = GateUpLayout::Halves;
  int64_t rank = 0;
  bool bias = false, row_scale = false;
  RowSource src = RowSource::Rows;
  DType a_dtype = DType::BF16, out_dtype = DType::BF16;
  int64_t hot = 0;
  double hot_share = 0.0;
};

struct HostDgrad {
  QuantWeights w;               // stored [E, K, N]
  Tensor x, ids, rs, bias, aux, la, lb;  // x [T or M, K]; aux [M, 2N]; la [*, r]; lb [E, r, N]
};

HostDgrad make_host(const DgradCase& c, std::mt19937_64& rng) {
  HostDgrad h;
  const Tensor w = random_host(DType::F32, {c.E, c.K, c.N}, rng, 1.0 / std::sqrt(static_cast<double>(c.K)));
  switch (c.scale) {
    case ScaleKind::Channel: h.w = quantize(w, ScaleSpec::channel(c.K, c.N)); break;
    case ScaleKind::Tensor: h.w = quantize(w, ScaleSpec::tensor(c.K, c.N, c.segments)); break;
    default: h.w = quantize(w, ScaleSpec::block(c.K, c.N, 128, 128, c.segments)); break;
  }
  const int64_t M = c.T * c.k, rows = c.src == RowSource::Tokens ? c.T : M;
  h.x = random_host(c.a_dtype, {rows, c.K}, rng);
  h.ids = random_ids(DType::I32, c.T, c.k, c.E, rng, c.hot, c.hot_share);
  if (c.row_scale) h.rs = random_host(DType::F32, {M}, rng, 0.3, 1.0);
  if (c.bias) h.bias = random_host(DType::F32, {c.E, c.N}, rng, 0.2);
  if (c.epi == Epilogue::GluBackward) h.aux = random_host(DType::BF16, {M, 2 * c.N}, rng, 1.5);
  if (c.rank > 0) {
    h.la = random_host(c.a_dtype, {rows, c.rank}, rng);
    h.lb = random_host(DType::F32, {c.E, c.rank, c.N}, rng, 1.0 / std::sqrt(static_cast<double>(c.rank)));
  }
  return h;
}

// The gradient as the device quantizes it: rows in expert order (gathered from their token), times
// their expert's per-channel W scales where W has them, quantized in 1 x 128 groups on the host and
// decoded to F64 [M, K] (read as Rows).
Tensor quantized_rows(const DgradCase& c, const HostDgrad& h, const RoutingPlan& plan) {
  const int64_t M = c.T * c.k, K = c.K;
  const int32_t* sorted = plan.sorted_pairs.ptr<int32_t>();
  const int32_t* offsets = plan.offsets.ptr<int32_t>();
  Tensor g(DType::F32, {M, K});
  int64_t e = 0;
  for (int64_t r = 0; r < M; ++r) {
    while (offsets[e + 1] <= r) ++e;  // rows ascend: the expert advances
    const int64_t src = c.src == RowSource::Tokens ? sorted[r] / c.k : r;
    for (int64_t k = 0; k < K; ++k) {
      double v = load_as_double(h.x.data(), h.x.dtype(), src * K + k);
      if (c.scale == ScaleKind::Channel) v *= h.w.scale.ptr<float>()[e * K + k];
      g.ptr<float>()[r * K + k] = static_cast<float>(v);
    }
  }
  return test::quantize_decode_rows(g);
}

// The CPU backend's dgrad (fp64) with `a` as A and `w` as W (stored [E, K, N], read transposed).
Tensor cpu_dgrad(Backend& cpu, const DgradCase& c, const HostDgrad& h, const RoutingPlan& plan, const GemmOperand& a,
                 const QuantTensor& w) {
  const int64_t M = c.T * c.k;
  Tensor out(DType::F64, {M, c.epi == Epilogue::GluBackward ? 2 * c.N : c.N});
  GroupedGemm g;
  g.plan = &plan;
  g.a = a;
  g.b = w;
  g.transpose_b = true;
  if (c.rank > 0) {
    g.lora_a = {h.la, c.src};
    g.lora_b = h.lb;
    g.lora_scale = 0.75;
  }
  g.row_scale = h.rs;
  g.bias = h.bias;
  g.epilogue = c.epi;
  g.act = {c.act, c.layout};
  g.aux = h.aux;
  g.out = out;
  cpu.grouped_gemm(g);
  return out;
}

class W8a8Dgrad : public ::testing::TestWithParam<DgradCase> {};

TEST_P(W8a8Dgrad, MatchesCpu) {
  FP8MOE_REQUIRE_GPU();
  if (!cuda::gemm::sm90_kernels_available()) GTEST_SKIP() << "the FP8 dgrad needs an sm_90 GPU and sm_90a code";
  const DgradCase& c = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " case " + c.name);
  std::mt19937_64 rng(seed);
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const HostDgrad h = make_host(c, rng);
  const int64_t M = c.T * c.k;
  const bool glu = c.epi == Epilogue::GluBackward;

  RoutingPlan cplan, gplan;
  cpu->build_plan(h.ids, c.E, cplan);
  gpu->build_plan(gpu->upload(h.ids), c.E, gplan);
  const Tensor wd = gpu->upload(h.w.data), ws = gpu->upload(h.w.scale), x = gpu->upload(h.x);
  const auto up = [&](const Tensor& t) { return t.defined() ? gpu->upload(t) : Tensor(); };
  const Tensor rs = up(h.rs), bias = up(h.bias), aux = up(h.aux), la = up(h.la), lb = up(h.lb);
  // The kernel's question: the same quantized gradient; per-channel scales are in it, so W's codes
  // enter bare (unit scales).
  Tensor kern, exact, ones;
  if (M > 0) {
    const Tensor aq = quantized_rows(c, h, cplan);
    QuantTensor w_kernel = h.w.view();
    if (c.scale == ScaleKind::Channel) {
      ones = Tensor(DType::F32, h.w.scale.shape());
      for (int64_t i = 0; i < ones.numel(); ++i) ones.ptr<float>()[i] = 1.0f;
      w_kernel.scale = ones;
    }
    kern = cpu_dgrad(*cpu, c, h, cplan, {aq, RowSource::Rows}, w_kernel);
    exact = cpu_dgrad(*cpu, c, h, cplan, {h.x, c.src}, h.w.view());
  }

  const int64_t cols = glu ? 2 * c.N : c.N;
  // Both FP8 dgrad kernels (transposed tiles; W from registers), each on freshly poisoned outputs.
  for (const cuda::w8a8::Dgrad kernel : {cuda::w8a8::Dgrad::Fp8, cuda::w8a8::Dgrad::Fp8RegW}) {
    SCOPED_TRACE(kernel == cuda::w8a8::Dgrad::Fp8 ? "kernel fp8 (transposed tiles)" : "kernel fp8-regw (W from registers)");
    const Tensor out = poisoned(*gpu, c.out_dtype, {M, cols});
    const Tensor out_codes = poisoned(*gpu, DType::F8_E4M3, {M, cols});
    const Tensor out_scales = poisoned(*gpu, DType::F32, {M, (cols + 127) / 128});
    GroupedGemm g;
    g.plan = &gplan;
    g.a = {x, c.src};
    g.b = {wd, ws, h.w.spec};
    g.transpose_b = true;
    if (c.rank > 0) {
      g.lora_a = {la, c.src};
      g.lora_b = lb;
      g.lora_scale = 0.75;
    }
    g.row_scale = rs;
    g.bias = bias;
    g.epilogue = c.epi;
    g.act = {c.act, c.layout};
    g.aux = aux;
    g.out = out;
    g.out_fp8 = {out_codes, out_scales};
    ASSERT_EQ(cuda::w8a8::dgrad_fits(g), "");
    EXPECT_TRUE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A8, kernel));
    EXPECT_FALSE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A8, cuda::w8a8::Dgrad::Bf16)) << "bf16: the W8A16 kernels";
    EXPECT_FALSE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A16, kernel)) << "only under W8A8";
    cuda::w8a8::dgrad(g, gpu->allocator(), static_cast<cudaStream_t>(gpu->stream()), kernel);
    gpu->synchronize();
    if (M == 0) continue;

    const Tensor got = to_host(*gpu, out);
    EXPECT_LT(rel_error(got, kern), 1e-2) << "out vs the quantized-gradient reference";
    EXPECT_LT(rel_error(got, exact), 3e-2) << "out vs the exact reference";
    test::expect_fp8_rows_of(got, *gpu, g.out_fp8, "out_fp8");
  }
}

const DgradCase kCases[] = {
    // The layer's dgrad of the down projection: the output gradient by token, routing weights, the
    // GLU backward (Qwen3-like, scaled down).
    {"down_glu_backward_tokens_rowscale", 200, 4, 8, 256, 384, ScaleKind::Block, 1, Epilogue::GluBackward,
     Activation::SiluGlu, GateUpLayout::Halves, 0, false, true, RowSource::Tokens},
    // The dgrad of the gate_up projection: dH1 in expert order, W's two scale segments.
    {"up_store_rows_two_segments", 150, 2, 6, 512, 256, ScaleKind::Block, 2, Epilogue::Store},
    {"odd_dims_block_store_f32_bias", 90, 2, 5, 272, 208, ScaleKind::Block, 1, Epilogue::Store, Activation::SiluGlu,
     GateUpLayout::Halves, 0, true, false, RowSource::Rows, DType::F32, DType::F32},
    {"channel_glu_backward_gptoss_interleaved_lora8", 100, 2, 4, 272, 208, ScaleKind::Channel, 1,
     Epilogue::GluBackward, Activation::GptOssGlu, GateUpLayout::Interleaved, 8, false, true, RowSource::Tokens},
    // LoRA with a BF16 Store: D is out itself, read as the addend and rewritten in place.
    {"channel_store_rows_lora16_in_place", 120, 2, 6, 384, 256, ScaleKind::Channel, 1, Epilogue::Store,
     Activation::SiluGlu, GateUpLayout::Halves, 16},
    {"block_glu_backward_lora16_f32_out", 160, 4, 8, 384, 256, ScaleKind::Block, 1, Epilogue::GluBackward,
     Activation::SiluGlu, GateUpLayout::Halves, 16, false, true, RowSource::Tokens, DType::BF16, DType::F32},
    {"empty_experts", 3, 2, 32, 256, 128, ScaleKind::Block, 1, Epilogue::GluBackward, Activation::SiluGlu,
     GateUpLayout::Halves, 4, false, true, RowSource::Tokens},
    {"one_hot_expert_many_tiles", 300, 1, 8, 512, 512, ScaleKind::Block, 1, Epilogue::Store, Activation::SiluGlu,
     GateUpLayout::Halves, 0, false, false, RowSource::Rows, DType::BF16, DType::BF16, 1, 1.0},
    {"tensor_scales_two_segments", 64, 2, 3, 512, 128, ScaleKind::Tensor, 2, Epilogue::Store},
    {"tokens1_k1", 1, 1, 4, 256, 256, ScaleKind::Channel, 1, Epilogue::Store, Activation::SiluGlu,
     GateUpLayout::Halves, 0, false, false, RowSource::Tokens},
    {"tokens0", 0, 2, 4, 256, 256, ScaleKind::Block, 1, Epilogue::GluBackward},
};

INSTANTIATE_TEST_SUITE_P(Cases, W8a8Dgrad, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<DgradCase>& i) { return i.param.name; });

// The register-W kernel's fragment algebra, on the host (CI runs GemmDispatch.*): W's tile laid out
// by w_unit, read by an emulated ldmatrix.x4.trans at the lanes' ldsm_row addresses and combined by
// emulated byte permutes, must give every warp's wgmma A fragment (rows g and g + 8 of the warp's 16,
// as output columns 2g and 2g + 1 of its 16-byte unit; k 4q .. 4q+3 and 16 + 4q ..), and each
// ldmatrix matrix's 8 rows must fall on distinct 16-byte bank groups.
TEST(GemmDispatch, W8a8DgradRegWFragments) {
  namespace L = cuda::w8a8::regw_layout;
  std::mt19937_64 rng(fresh_seed());
  uint8_t w[128][128];  // [K row][column] of a tile
  for (auto& row : w)
    for (auto& b : row) b = static_cast<uint8_t>(rng());
  std::vector<uint8_t> smem(128 * 128);
  for (int r = 0; r < 128; ++r)
    for (int u = 0; u < 8; ++u)
      for (int i = 0; i < 16; ++i) smem[L::w_unit(r, u) + i] = w[r][16 * u + i];
  auto byte_perm = [](uint32_t x, uint32_t y, uint32_t sel) {
    const uint64_t xy = uint64_t{y} << 32 | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= uint32_t((xy >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
  };
  int mismatches = 0, conflicts = 0;
  for (int unit = 0; unit < 8; ++unit)  // warp w of consumer warpgroup cw: unit 4 cw + w
    for (int kk = 0; kk < 4; ++kk) {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane) addr[lane] = L::w_unit(L::ldsm_row(lane), unit) + kk * 32 * 128;
      for (int m = 0; m < 4; ++m) {
        unsigned groups = 0;
        for (int j = 0; j < 8; ++j) {
          const unsigned bit = 1u << (addr[8 * m + j] % 128 / 16);
          conflicts += (groups & bit) != 0;
          groups |= bit;
        }
      }
      for (int t = 0; t < 32; ++t) {
        const int g = t / 4, q = t % 4;
        uint32_t v[4];  // ldmatrix.trans: thread t gets b16 column g of matrix rows 2q, 2q + 1
        for (int m = 0; m < 4; ++m) {
          auto elem = [&](int row) { return uint32_t{smem[addr[8 * m + row] + 2 * g]} | uint32_t{smem[addr[8 * m + row] + 2 * g + 1]} << 8; };
          v[m] = elem(2 * q) | elem(2 * q + 1) << 16;
        }
        const uint32_t a[4] = {byte_perm(v[0], v[1], L::kLow), byte_perm(v[0], v[1], L::kHigh),
                               byte_perm(v[2], v[3], L::kLow), byte_perm(v[2], v[3], L::kHigh)};
        for (int reg = 0; reg < 4; ++reg)
          for (int i = 0; i < 4; ++i) {  // reg: row g (even) or g + 8 (odd), k 4q + i (+ 16 for reg >= 2)
            const int col = 16 * unit + 2 * g + (reg & 1), k = 32 * kk + 16 * (reg / 2) + 4 * q + i;
            mismatches += static_cast<uint8_t>(a[reg] >> (8 * i)) != w[k][col];
          }
      }
    }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(conflicts, 0);
}

// The conditions and the setting, on the host (CI runs GemmDispatch.*). Views carry fake, 16-byte
// aligned device pointers; nothing is read through them.
TEST(GemmDispatch, W8a8DgradFitsAndSetting) {
  alignas(16) static unsigned char fake[64];
  auto view = [](DType t, Shape s, size_t offset = 0) { return TensorView(fake + offset, t, s, Device::CUDA); };
  const int64_t E = 4, K = 512, N = 256;  // stored [E, K, N]
  GroupedGemm g;
  g.a = {view(DType::BF16, {10, K})};
  g.b = {view(DType::F8_E4M3, {E, K, N}), view(DType::F32, {E, 4, 2}), ScaleSpec::block(K, N, 128, 128)};
  g.transpose_b = true;
  g.epilogue = Epilogue::GluBackward;
  EXPECT_EQ(cuda::w8a8::dgrad_fits(g), "");
  EXPECT_FALSE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A8, cuda::w8a8::Dgrad::Bf16));
  EXPECT_FALSE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A8Down, cuda::w8a8::Dgrad::Fp8));
  EXPECT_FALSE(cuda::w8a8::choose_dgrad(g, GemmPrecision::W8A16, cuda::w8a8::Dgrad::Fp8));

  GroupedGemm t = g;  // each failed condition, named
  t.transpose_b = false;
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("transposed"), std::string::npos);
  t = g;
  t.epilogue = Epilogue::GluForward;
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("GLU-forward"), std::string::npos);
  t = g;
  t.b.data = view(DType::F8_E5M2, {E, K, N});
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("F8_E4M3"), std::string::npos);
  t = g;
  t.b.spec = ScaleSpec::block(K, N, 64, 64);
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("scales"), std::string::npos) << "64x64 blocks split a tile";
  t.b.spec = ScaleSpec::channel(K, N);
  EXPECT_EQ(cuda::w8a8::dgrad_fits(t), "") << "per-channel scales (folded into the gradient)";
  t.b.spec = ScaleSpec::tensor(K, N, 2);
  EXPECT_EQ(cuda::w8a8::dgrad_fits(t), "") << "two tensor segments of 256 rows";
  t.b.spec = ScaleSpec::group(K, N, 128);
  EXPECT_NE(cuda::w8a8::dgrad_fits(t), "") << "group scales";
  // Segments that do not start on a 128-row tile (I = 1440) split a K tile's scale.
  t.b.data = view(DType::F8_E4M3, {E, 2880, N});
  t.b.spec = ScaleSpec::block(2880, N, 128, 128, 2);
  t.a = {view(DType::BF16, {10, 2880})};
  EXPECT_NE(cuda::w8a8::dgrad_fits(t), "") << "segments of 1440 rows";
  t.b.spec = ScaleSpec::block(2880, N, 128, 128, 1);
  EXPECT_EQ(cuda::w8a8::dgrad_fits(t), "") << "one segment: a partial last block is a partial last tile";
  t = g;
  t.b.data = view(DType::F8_E4M3, {E, 264, N});
  t.b.spec = ScaleSpec::block(264, N, 128, 128);
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("K = 264"), std::string::npos);
  t.b.data = view(DType::F8_E4M3, {E, K, 264});
  t.b.spec = ScaleSpec::block(K, 264, 128, 128);
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("N = 264"), std::string::npos) << "16-byte W chunks";
  t.b.data = view(DType::F8_E4M3, {E, 65536 + 128, N});
  t.b.spec = ScaleSpec::block(65536 + 128, N, 128, 128);
  t.a = {view(DType::BF16, {10, 65536 + 128})};
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("K = 65664"), std::string::npos) << "more K tiles than staged scales";
  t.b.data = view(DType::F8_E4M3, {E, 65536, N});
  t.b.spec = ScaleSpec::block(65536, N, 128, 128);
  t.a = {view(DType::BF16, {10, 65536})};
  EXPECT_EQ(cuda::w8a8::dgrad_fits(t), "");
  t = g;
  t.b.data = view(DType::F8_E4M3, {E, K, N}, 8);
  EXPECT_NE(cuda::w8a8::dgrad_fits(t).find("aligned"), std::string::npos);

  EXPECT_EQ(cuda::w8a8::parse_dgrad_env(nullptr), cuda::w8a8::Dgrad::Bf16);
  EXPECT_EQ(cuda::w8a8::parse_dgrad_env(""), cuda::w8a8::Dgrad::Bf16);
  EXPECT_EQ(cuda::w8a8::parse_dgrad_env("bf16"), cuda::w8a8::Dgrad::Bf16);
  EXPECT_EQ(cuda::w8a8::parse_dgrad_env("fp8"), cuda::w8a8::Dgrad::Fp8);
  EXPECT_EQ(cuda::w8a8::parse_dgrad_env("fp8-regw"), cuda::w8a8::Dgrad::Fp8RegW);
  try {
    cuda::w8a8::parse_dgrad_env("FP8 ");
    ADD_FAILURE() << "expected an error for a bad FP8MOE_W8A8_DGRAD";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FP8MOE_W8A8_DGRAD='FP8 '"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fp8moe

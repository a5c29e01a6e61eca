// The W8A8 epilogue passes' host side (src/backends/cuda/w8a8_epilogue.cu; CI runs GemmDispatch.*):
// the vector form's tile replayed through its layout functions, its conditions and choice, and the
// general form's rows per block. The passes themselves run on the GPU in test_w8a8.cpp's
// W8a8Gemm cases (both forms, both LoRA paths).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/w8a8.cuh"
#include "backends/cuda/w8a8_test_util.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/dtype.hpp"
#include "fp8moe/moe.hpp"

namespace fp8moe {
namespace {

using test::expect_env_refused;
using test::fresh_seed;

// The vector pass's tile replayed on the host (CI runs GemmDispatch.*), through w8a8.cuh's
// vector_tile functions as the kernel calls them: L and LB_e staged as BF16 pairs, the warps'
// mma.sync m16n8k16 fragments read at a_row/a_word and b_row/b_word and multiplied as the PTX ISA
// lays them out (written here from the ISA's element tables, not from those functions), the
// accumulators stored at c_row/c_col for the rows of each expert in turn; then every item's runs.
// Checked: each output's delta and v columns (gate_row / up_row for a GLU) against a direct sum,
// every v column of a row written by exactly one item, a half warp on one row's 128-wide group,
// and no shared-memory bank conflict in the fragment loads and stores.
TEST(GemmDispatch, W8a8VectorTileReplay) {
  namespace vt = cuda::w8a8::vector_tile;
  std::mt19937_64 rng(fresh_seed());
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const auto bf16 = [](float x) { return bf16_bits_to_float(float_to_bf16_bits(x)); };
  const auto pack = [](float lo, float hi) {
    return uint32_t{float_to_bf16_bits(lo)} | uint32_t{float_to_bf16_bits(hi)} << 16;
  };
  const auto half = [](uint32_t w, int i) { return bf16_bits_to_float(static_cast<uint16_t>(w >> (16 * i))); };
  int bad_delta = 0, bad_col = 0, bad_cover = 0, bad_group = 0, conflicts = 0, cases = 0;
  for (int kind = 0; kind < 3; ++kind) {  // Store, GLU halves, GLU interleaved
    const bool glu = kind > 0, inter = kind == 2;
    const ActivationSpec act{Activation::SiluGlu, inter ? GateUpLayout::Interleaved : GateUpLayout::Halves};
    for (int rank : {1, 4, 5, 8, 16, 17, 24, 32})
      for (int cols : {8, 120, 128, 136, 264, 1032})
        for (int rows : {32, 20}) {  // a whole row tile, and the last one of a batch
        ++cases;
        const int kR = rank <= 16 ? 16 : 32, kW = vt::words(kR), vc = vt::v_cols(glu), ld = vt::delta_ld(glu);
        const int N = glu ? 2 * cols : cols;
        // Rows of a tile from three experts (rows 0-10, 11-11, 12-31), the middle one a single row.
        const int bounds[4] = {0, 11, 12, rows};
        std::vector<float> L(rows * rank), LB(3 * N * rank);
        for (float& x : L) x = bf16(uni(rng));
        for (float& x : LB) x = bf16(uni(rng));
        const auto expert = [&](int lr) { return lr < bounds[1] ? 0 : lr < bounds[2] ? 1 : 2; };
        std::vector<int> cover(static_cast<size_t>(rows) * N, 0);
        for (int tile = 0; tile * vt::kCols < cols; ++tile) {
          std::vector<uint32_t> ls(vt::kRows * kW, 0), lbs(vc * kW, 0);
          std::vector<float> delta(vt::kRows * ld, NAN);
          for (int lr = 0; lr < rows; ++lr)
            for (int w = 0; w < kR / 2; ++w)
              ls[lr * kW + w] = pack(2 * w < rank ? L[lr * rank + 2 * w] : 0.0f, 2 * w + 1 < rank ? L[lr * rank + 2 * w + 1] : 0.0f);
          for (int e = 0; e < 3; ++e) {
            for (int j = 0; j < vc; ++j) {
              const int n = vt::v_col(j, tile, cols, glu, inter);
              for (int w = 0; w < kR / 2; ++w) {
                const auto lb = [&](int q) { return n >= 0 && q < rank ? LB[(e * N + n) * rank + q] : 0.0f; };
                lbs[j * kW + w] = pack(lb(2 * w), lb(2 * w + 1));
              }
            }
            for (int warp = 0; warp < vt::kThreads / 32; ++warp)
              for (int nt = 0; nt < vt::n_tiles(glu); ++nt) {
                const int n0 = (warp * vt::n_tiles(glu) + nt) * 8;
                for (int mh = 0; mh < 2; ++mh) {
                  double c[16][8] = {};
                  for (int kk = 0; kk < kR / 16; ++kk) {
                    float a[16][16], b[16][8];
                    for (int reg = 0; reg < 4; ++reg) {  // one warp-wide load per register
                      unsigned banks = 0;
                      for (int lane = 0; lane < 32; ++lane) {
                        const int addr = vt::a_row(16 * mh, reg, lane) * kW + vt::a_word(reg, lane, kk);
                        conflicts += (banks >> (addr % 32) & 1) != 0;
                        banks |= 1u << (addr % 32);
                        const int g = lane / 4, q = lane % 4;
                        for (int h = 0; h < 2; ++h) {  // the ISA: a_i at row g + 8 ((i / 2) % 2), column 2q + i % 2 + 8 (i / 4)
                          const int i = 2 * reg + h;
                          a[g + 8 * (i / 2 % 2)][2 * q + i % 2 + 8 * (i / 4)] = half(ls[addr], h);
                        }
                      }
                    }
                    for (int reg = 0; reg < 2; ++reg) {
                      unsigned banks = 0;
                      for (int lane = 0; lane < 32; ++lane) {
                        const int addr = vt::b_row(n0, lane) * kW + vt::b_word(reg, lane, kk);
                        conflicts += (banks >> (addr % 32) & 1) != 0;
                        banks |= 1u << (addr % 32);
                        const int g = lane / 4, q = lane % 4;
                        for (int h = 0; h < 2; ++h) {  // the ISA: b_i at row 2q + i % 2 + 8 (i / 2), column g
                          const int i = 2 * reg + h;
                          b[2 * q + i % 2 + 8 * (i / 2)][g] = half(lbs[addr], h);
                        }
                      }
                    }
                    for (int m = 0; m < 16; ++m)
                      for (int n = 0; n < 8; ++n)
                        for (int k = 0; k < 16; ++k) c[m][n] += static_cast<double>(a[m][k]) * b[k][n];
                  }
                  for (int h = 0; h < 2; ++h)
                    for (int hw = 0; hw < 2; ++hw) {  // float2 stores: a half warp per wavefront
                      unsigned banks = 0;
                      for (int lane = 16 * hw; lane < 16 * hw + 16; ++lane) {
                        const int g = lane / 4, q = lane % 4, lr = vt::c_row(16 * mh, h, lane);
                        const int addr = lr * ld + n0 + vt::c_col(lane);
                        for (int x = 0; x < 2; ++x) {
                          conflicts += (banks >> ((addr + x) % 32) & 1) != 0;
                          banks |= 1u << ((addr + x) % 32);
                        }
                        if (lr >= rows || expert(lr) != e) continue;
                        for (int x = 0; x < 2; ++x)  // the ISA: c_i at row g + 8 (i / 2), column 2q + i % 2
                          delta[addr + x] = static_cast<float>(c[g + 8 * h][2 * q + x]);
                      }
                    }
                }
              }
          }
          for (int t = 0; t < vt::kThreads; ++t)
            for (int s = 0; s < vt::kItemsPerThread; ++s) {
              const int i = t + s * vt::kThreads, lr = i / vt::kChunks, chunk = i % vt::kChunks;
              const int c0 = tile * vt::kCols + 8 * chunk;
              const int lane = t % 32;
              // A half warp: one row, the 16 chunks of its group in lane order.
              bad_group += (t - lane % 16 + s * vt::kThreads) % vt::kChunks != 0 || chunk != lane % 16;
              if (lr >= rows || c0 >= cols) continue;
              const int ja = vt::run_a(chunk, glu, inter), jb = glu ? vt::run_b(chunk, inter) : -1;
              for (int run : {ja, jb}) {
                if (run < 0) continue;
                for (int j = 0; j < 8; ++j) {
                  const int n = vt::v_col(run + j, tile, cols, glu, inter);
                  if (n < 0) {
                    ++bad_col;
                    continue;
                  }
                  ++cover[lr * N + n];
                  double want = 0;
                  for (int q = 0; q < rank; ++q) want += static_cast<double>(L[lr * rank + q]) * LB[(expert(lr) * N + n) * rank + q];
                  const float got = delta[lr * ld + run + j];
                  bad_delta += !(std::fabs(got - want) <= 1e-5 * (1 + std::fabs(want)));
                }
              }
              for (int o = 0; o < 8; ++o) {
                const int n = c0 + o;
                if (!glu) {
                  bad_col += vt::v_col(ja + o, tile, cols, false, false) != n;
                  continue;
                }
                for (bool up : {false, true}) {
                  const int run = vt::glu_in_b(o, up, inter) ? jb : ja;
                  const int got = vt::v_col(run + vt::glu_index(o, up, inter), tile, cols, true, inter);
                  bad_col += got != (up ? act.up_row(n, cols) : act.gate_row(n, cols));
                }
              }
            }
        }
        for (int x : cover) bad_cover += x != 1;
        EXPECT_LE(vt::smem_bytes(kR, glu), 227 * 1024);
      }
  }
  EXPECT_EQ(cases, 3 * 8 * 6 * 2);
  EXPECT_EQ(bad_delta, 0) << "delta values";
  EXPECT_EQ(bad_col, 0) << "v columns";
  EXPECT_EQ(bad_cover, 0) << "v columns not written exactly once";
  EXPECT_EQ(bad_group, 0) << "half warps off their row's group";
  EXPECT_EQ(conflicts, 0) << "bank conflicts";
}

// The vector form's conditions and FP8MOE_W8A8_EPILOGUE (host only): whole runs of 8 outputs and
// 16-byte aligned out, aux, bias and channel scales, each failure named; the choice General unless
// the variable asks for Vector (and then General where it does not fit); the parser's names.
TEST(GemmDispatch, W8a8EpilogueFormFitsAndChoice) {
  using cuda::w8a8::EpilogueForm;
  alignas(16) static unsigned char fake[64];
  auto view = [](DType t, Shape s, size_t offset = 0) { return TensorView(fake + offset, t, s, Device::CUDA); };
  const int64_t E = 4, N = 512, K = 256, M = 10;
  GroupedGemm g;
  g.a = {view(DType::BF16, {M, K})};
  g.b = {view(DType::F8_E4M3, {E, N, K}), view(DType::F32, {E, N, 1}), ScaleSpec::channel(N, K)};
  g.epilogue = Epilogue::GluForward;
  g.out = view(DType::BF16, {M, N / 2});
  g.aux = view(DType::BF16, {M, N});
  g.bias = view(DType::F32, {E, N});
  EXPECT_EQ(cuda::w8a8::epilogue_vector_fits(g), "");
  const struct {
    const char* what;
    std::function<void(GroupedGemm&)> change;
  } failures[] = {
      {"out", [&](GroupedGemm& t) { t.out = view(DType::BF16, {M, N / 2}, 8); }},
      {"aux", [&](GroupedGemm& t) { t.aux = view(DType::BF16, {M, N}, 4); }},
      {"bias", [&](GroupedGemm& t) { t.bias = view(DType::F32, {E, N}, 8); }},
      {"channel scales", [&](GroupedGemm& t) { t.b.scale = view(DType::F32, {E, N, 1}, 4); }},
      {"252 output columns", [&](GroupedGemm& t) {
         t.b = {view(DType::F8_E4M3, {E, 504, K}), view(DType::F32, {E, 504, 1}), ScaleSpec::channel(504, K)};
       }},
  };
  for (const auto& f : failures) {
    GroupedGemm t = g;
    f.change(t);
    EXPECT_NE(cuda::w8a8::epilogue_vector_fits(t).find(f.what), std::string::npos)
        << f.what << ": " << cuda::w8a8::epilogue_vector_fits(t);
  }
  GroupedGemm store = g;  // a Store of 500 columns: not runs of 8 either
  store.epilogue = Epilogue::Store;
  store.aux = {};
  store.b = {view(DType::F8_E4M3, {E, 500, K}), view(DType::F32, {E, 500, 1}), ScaleSpec::channel(500, K)};
  EXPECT_NE(cuda::w8a8::epilogue_vector_fits(store).find("500 output columns"), std::string::npos);

  const EpilogueForm forced = cuda::w8a8::parse_epilogue_form_env(std::getenv("FP8MOE_W8A8_EPILOGUE"));
  EXPECT_EQ(cuda::w8a8::choose_epilogue_form(g), forced == EpilogueForm::Vector ? EpilogueForm::Vector : EpilogueForm::General);
  EXPECT_EQ(cuda::w8a8::choose_epilogue_form(store), EpilogueForm::General) << "it does not fit";
  EXPECT_EQ(cuda::w8a8::parse_epilogue_form_env(nullptr), EpilogueForm::Auto);
  EXPECT_EQ(cuda::w8a8::parse_epilogue_form_env(""), EpilogueForm::Auto);
  EXPECT_EQ(cuda::w8a8::parse_epilogue_form_env("vector"), EpilogueForm::Vector);
  EXPECT_EQ(cuda::w8a8::parse_epilogue_form_env("general"), EpilogueForm::General);
  for (const char* bad : {"Vector", "vec", "auto", " general"})
    expect_env_refused(cuda::w8a8::parse_epilogue_form_env, bad, "vector, general");
}

// The epilogue pass's rows per block: ~8 items per thread at full-size batches, but a grid of at
// least ~512 blocks where the rows allow (at 256 Qwen3 tokens the old rule gave 98 blocks).
TEST(GemmDispatch, W8a8EpilogueRowsPerBlock) {
  const struct {
    int64_t rows, items;
    int want;
  } cases[] = {
      {131072, 96, 21},  // Qwen3 GLU at 16384 tokens: 8 items per thread (8 * 256 / 96)
      {2048, 96, 4},     // Qwen3 GLU at 256 tokens: 512 blocks of 4 rows
      {2048, 256, 4},    // a Store of 2048 columns
      {10752, 96, 21},   // where both rules meet
      {300, 96, 1},      {0, 96, 1},   {1, 1, 1},
      {1 << 20, 4096, 1},  // rows wider than a block's threads
      {1 << 20, 1, 2048},  // 8 items per thread of one-item rows
  };
  for (const auto& c : cases) {
    const int got = cuda::w8a8::epilogue_rows_per_block(c.rows, c.items, 256);
    EXPECT_EQ(got, c.want) << c.rows << " rows of " << c.items << " items";
    EXPECT_GE(got, 1);
    if (c.rows >= 512) EXPECT_GE((c.rows + got - 1) / got, 512) << "a grid below 512 blocks at " << c.rows << " rows";
  }
}

}  // namespace
}  // namespace fp8moe

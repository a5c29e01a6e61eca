// Trap 14 on the GPU: an FP8 expert stack past 2^31 elements. The reference system indexed the
// flattened stack with int32 and read the wrong expert once it passed 2^31; here the only expert
// that receives rows starts exactly at element 2^31, and the result is checked against a host
// reference on sampled outputs, in both the forward and the transposed (dgrad) reading, with
// every tile shape (engine) the card runs.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/grouped_gemm.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe::test {
namespace {

// Random e4m3 codes without NaN codes, fast enough for 2^28 bytes (xorshift, 8 codes per step).
void fill_codes(uint8_t* p, int64_t n, uint64_t seed) {
  uint64_t x = seed | 1;
  for (int64_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    uint64_t v = x;
    for (int64_t j = 0; j < 8 && i + j < n; ++j, v >>= 8) {
      const uint8_t c = static_cast<uint8_t>(v) & 0xF7;  // clears a mantissa bit: never 0x7F/0xFF
      p[i + j] = c;
    }
  }
}

TEST(CudaLargeIndex, ExpertStackPast2Pow31Elements) {
  FP8MOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);

  constexpr int64_t E = 9, N = 32768, K = 8192, T = 48;  // E*N*K = 2.4e9 > 2^31; expert 8 starts at 2^31
  constexpr int64_t kHot = E - 1;
  static_assert(kHot * N * K == (int64_t{1} << 31), "the hot expert must start at element 2^31");
  auto be = make_cuda_backend();

  // Only the hot expert's codes are written: no row reads the others.
  Tensor w = be->empty(DType::F8_E4M3, {E, N, K});
  Tensor hot_codes(DType::F8_E4M3, {1, N, K});
  fill_codes(hot_codes.ptr<uint8_t>(), N * K, seed);
  TensorView w_hot(static_cast<uint8_t*>(w.data()) + kHot * N * K, DType::F8_E4M3, {1, N, K}, Device::CUDA);
  be->copy(w_hot, hot_codes);
  Tensor scale_host(DType::F32, {E, N, 1});
  std::uniform_real_distribution<float> su(0.5f / 448, 2.0f / 448);
  for (int64_t i = 0; i < scale_host.numel(); ++i) scale_host.ptr<float>()[i] = su(rng);
  Tensor scale = be->upload(scale_host);
  const QuantTensor wq{w.view(), scale.view(), ScaleSpec::channel(N, K)};

  Tensor ids_host(DType::I32, {T, 1});
  for (int64_t t = 0; t < T; ++t) ids_host.ptr<int32_t>()[t] = static_cast<int32_t>(kHot);
  Tensor ids = be->upload(ids_host);
  RoutingPlan plan;
  be->build_plan(ids, E, plan);

  auto w_at = [&](int64_t n, int64_t k) {  // dequantized hot-expert weight, as the reference
    return static_cast<double>(decode_e4m3(hot_codes.ptr<uint8_t>()[n * K + k])) * scale_host.ptr<float>()[kHot * N + n];
  };
  std::uniform_int_distribution<int64_t> pick_t(0, T - 1);

  for (cuda::gemm::TileShape shape : cuda::gemm::kTileShapes) {
    if (!cuda::gemm::tile_shape_supported(shape)) continue;
    SCOPED_TRACE(std::string("tile ") + cuda::gemm::tile_shape_name(shape));
    for (const bool transpose : {false, true}) {
      SCOPED_TRACE(transpose ? "transpose_b (dgrad reading)" : "forward reading");
      const int64_t Kg = transpose ? N : K, Ng = transpose ? K : N;  // the GEMM's K and N
      Tensor x_host = random_host(DType::BF16, {T, Kg}, rng);
      Tensor x = be->upload(x_host);
      Tensor out = poisoned(*be, DType::F32, {T, Ng});
      GroupedGemm g;
      g.plan = &plan;
      g.a = {x.view(), RowSource::Tokens};
      g.b = wq;
      g.transpose_b = transpose;
      g.out = out.view();
      if (!cuda::gemm::tile_shape_fits(shape, cuda::gemm::describe(g))) continue;
      cuda::grouped_gemm(g, nullptr, shape);  // the backend runs on the legacy default stream too
      be->synchronize();
      Tensor got = to_host(*be, out);

      std::uniform_int_distribution<int64_t> pick_n(0, Ng - 1);
      double num = 0, den = 0;
      for (int s = 0; s < 512; ++s) {
        const int64_t t = pick_t(rng), n = pick_n(rng);
        double ref = 0;
        for (int64_t k = 0; k < Kg; ++k)
          ref += load_as_double(x_host.data(), DType::BF16, t * Kg + k) * (transpose ? w_at(k, n) : w_at(n, k));
        const double v = got.ptr<float>()[t * Ng + n];
        ASSERT_TRUE(std::isfinite(v)) << "output (" << t << ", " << n << ") not written or not finite";
        num += (v - ref) * (v - ref);
        den += ref * ref;
      }
      EXPECT_LT(std::sqrt(num / den), 1e-2);
    }
  }
}

}  // namespace
}  // namespace fp8moe::test

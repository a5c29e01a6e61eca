// Checks shared by the converter's library tests (test_convert.cpp) and the CLI tests
// (tests/tools/test_cli.cpp): an FP8 checkpoint written by the converter, and its BF16
// round trip, compared tensor by tensor with references computed here from the fp8 codec alone.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>

#include "fp8moe/convert.hpp"
#include "fp8moe/dtype.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/safetensors.hpp"
#include "test_support.hpp"

namespace fp8moe::testing {

using ::fp8moe::test::fresh_seed;

inline bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.dtype == b.dtype && a.shape == b.shape && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

inline double at(const TensorView& t, int64_t i) { return load_as_double(t.data, t.dtype, i); }

// `fp8` was written from `bf16` by convert --to fp8 with `scheme` (Channel or Block, edge `block`).
// Every Linear weight must be F8_E4M3 with the format's scale (amax / 448 per row or block, codes
// = saturating round-to-nearest-even of w / scale); every other tensor unchanged.
inline void expect_fp8_from_bf16(const TensorStore& bf16, const TensorStore& fp8, ScaleKind scheme, int64_t block) {
  const char* suffix = scheme == ScaleKind::Channel ? "_scale" : "_scale_inv";
  int64_t quantized = 0;
  for (const std::string& name : bf16.names()) {
    SCOPED_TRACE(name);
    const TensorView w = bf16.view(name);
    ASSERT_TRUE(fp8.contains(name));
    if (!fp8_convertible_weight(name, w.rank())) {
      EXPECT_TRUE(same_bytes(w, fp8.view(name)));
      EXPECT_FALSE(fp8.contains(name + "_scale") || fp8.contains(name + "_scale_inv"));
      continue;
    }
    ++quantized;
    const TensorView q = fp8.view(name), s = fp8.view(name + suffix);
    ASSERT_EQ(q.dtype, DType::F8_E4M3);
    ASSERT_EQ(q.shape, w.shape);
    ASSERT_EQ(s.dtype, DType::F32);
    const int64_t N = w.size(0), K = w.size(1);
    const int64_t bn = scheme == ScaleKind::Channel ? 1 : block, bk = scheme == ScaleKind::Channel ? K : block;
    ASSERT_EQ(s.shape, (Shape{(N + bn - 1) / bn, (K + bk - 1) / bk}));
    for (int64_t i = 0; i < s.size(0); ++i)
      for (int64_t j = 0; j < s.size(1); ++j) {
        float amax = 0;
        for (int64_t n = i * bn; n < std::min(N, (i + 1) * bn); ++n)
          for (int64_t k = j * bk; k < std::min(K, (j + 1) * bk); ++k)
            amax = std::max(amax, std::fabs(static_cast<float>(at(w, n * K + k))));
        const float scale = static_cast<float>(at(s, i * s.size(1) + j));
        ASSERT_EQ(scale, amax / 448.0f) << "scale [" << i << ", " << j << "]";
        for (int64_t n = i * bn; n < std::min(N, (i + 1) * bn); ++n)
          for (int64_t k = j * bk; k < std::min(K, (j + 1) * bk); ++k)
            ASSERT_EQ(q.ptr<uint8_t>()[n * K + k], encode_e4m3_sat(static_cast<float>(at(w, n * K + k)) / scale))
                << "code [" << n << ", " << k << "]";
      }
  }
  EXPECT_GT(quantized, 0);
}

// `back` was written from `fp8` by convert --to bf16: every FP8 weight is exactly
// bf16(code x scale) (the exact product rounded once), scales are gone, the rest is unchanged;
// and every weight is within FP8 quantization error of `orig` (the BF16 checkpoint `fp8` came from).
inline void expect_bf16_round_trip(const TensorStore& orig, const TensorStore& fp8, const TensorStore& back,
                                   ScaleKind scheme, int64_t block) {
  EXPECT_EQ(orig.names(), back.names());
  const char* suffix = scheme == ScaleKind::Channel ? "_scale" : "_scale_inv";
  for (const std::string& name : back.names()) {
    SCOPED_TRACE(name);
    const TensorView b = back.view(name), o = orig.view(name);
    ASSERT_EQ(b.shape, o.shape);
    if (!fp8.contains(name + suffix)) {
      EXPECT_TRUE(same_bytes(b, o));
      continue;
    }
    ASSERT_EQ(b.dtype, DType::BF16);
    const TensorView q = fp8.view(name), s = fp8.view(name + suffix);
    const int64_t N = q.size(0), K = q.size(1);
    const int64_t bn = scheme == ScaleKind::Channel ? 1 : block, bk = scheme == ScaleKind::Channel ? K : block;
    double err2 = 0, ref2 = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double scale = at(s, (n / bn) * s.size(1) + k / bk);
        const double exact = static_cast<double>(decode_e4m3(q.ptr<uint8_t>()[n * K + k])) * scale;  // exact in fp64
        uint16_t want;
        store_from_double(&want, DType::BF16, 0, exact);
        uint16_t got;
        std::memcpy(&got, static_cast<const char*>(b.data) + 2 * (n * K + k), 2);
        ASSERT_EQ(got, want) << "[" << n << ", " << k << "]: code x scale = " << exact;
        const double d = bf16_bits_to_float(got) - at(o, n * K + k);
        err2 += d * d;
        ref2 += at(o, n * K + k) * at(o, n * K + k);
      }
    // e4m3 keeps 3 mantissa bits: a relative rounding error below 2^-4 per element, about 2-3% rms.
    EXPECT_LT(std::sqrt(err2 / ref2), 0.04);
  }
}

}  // namespace fp8moe::testing

// Helpers of the W8A8 tests (test_w8a8.cpp, test_w8a8_dgrad.cpp, test_w8a8_epilogue.cpp): the host's
// side of the device's activation quantization, against which both the FP8 GEMMs' inputs and their
// out_fp8 are checked, and the environment parsers' refusal.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "backends/cuda/cuda_test_util.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/quant.hpp"

namespace fp8moe::test {

// Host rows [M, K] (any float dtype) as an FP8 GEMM reads them: quantized in 1 x 128 groups by the
// host's quantize_activations (which the device quantizer matches bit for bit), decoded to F64.
inline Tensor quantize_decode_rows(const Tensor& rows) {
  const int64_t M = rows.size(0), K = rows.size(1), groups = (K + 127) / 128;
  Tensor codes(DType::F8_E4M3, {M, K}), scales(DType::F32, {M, groups});
  quantize_activations(rows, 128, codes, scales);
  Tensor q(DType::F64, {M, K});
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k)
      q.ptr<double>()[r * K + k] =
          static_cast<double>(decode_e4m3(codes.ptr<uint8_t>()[r * K + k])) * scales.ptr<float>()[r * groups + k / 128];
  return q;
}

// Device Fp8Rows (codes, scales) against the host's quantize_activations of `out` (host, as
// stored): the same bits (GroupedGemm::out_fp8 promises the quantization of out as stored).
inline void expect_fp8_rows_of(const Tensor& out, Backend& gpu, const Fp8Rows& f, const char* what) {
  const int64_t M = out.size(0), cols = out.size(1), groups = (cols + 127) / 128;
  const Tensor codes = to_host(gpu, f.codes), scales = to_host(gpu, f.scales);
  Tensor want_codes(DType::F8_E4M3, {M, cols}), want_scales(DType::F32, {M, groups});
  quantize_activations(out, 128, want_codes, want_scales);
  int64_t code_diff = 0, scale_diff = 0;
  for (int64_t i = 0; i < M * cols; ++i) code_diff += codes.ptr<uint8_t>()[i] != want_codes.ptr<uint8_t>()[i];
  for (int64_t i = 0; i < M * groups; ++i) scale_diff += scales.ptr<float>()[i] != want_scales.ptr<float>()[i];
  EXPECT_EQ(code_diff, 0) << what << ": codes differing from the host's quantization of out";
  EXPECT_EQ(scale_diff, 0) << what << ": scales differing from the host's quantization of out";
}

// An environment parser refuses `bad` with an error naming it and the accepted values.
template <class Parse>
inline void expect_env_refused(Parse parse, const char* bad, const std::string& accepted) {
  try {
    parse(bad);
    ADD_FAILURE() << "'" << bad << "' was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(std::string("'") + bad + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find(accepted), std::string::npos) << msg;
  }
}

}  // namespace fp8moe::test

// Helpers shared by the CUDA backend's tests: fresh seeds, random host tensors, device round trips
// and the error metric. Every test compares the CUDA backend with the CPU backend (the oracle) on
// identical inputs.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "fp8moe/backend.hpp"
#include "fp8moe/dtype.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe::test {

inline uint64_t fresh_seed() { return (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}(); }

// Skips the test when no GPU is present (the binary is built wherever nvcc is).
#define FP8MOE_REQUIRE_GPU()                                          \
  do {                                                                \
    if (!::fp8moe::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Host tensor of `dtype` with N(mean, std) values, rounded once to dtype.
inline Tensor random_host(DType dtype, Shape shape, std::mt19937_64& rng, double std = 1.0, double mean = 0.0) {
  Tensor t(dtype, shape);
  std::normal_distribution<double> d(mean, std);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, d(rng));
  return t;
}

// Host copy of any tensor (device or host) through the backend; copy() to host synchronises.
inline Tensor to_host(Backend& be, const TensorView& v) {
  Tensor h(v.dtype, v.shape);
  be.copy(h, v);
  return h;
}

// Same values in another dtype (host), rounded once.
inline Tensor convert_host(const TensorView& v, DType dtype) {
  Tensor t(dtype, v.shape);
  for (int64_t i = 0; i < v.numel(); ++i) store_from_double(t.data(), dtype, i, load_as_double(v.data, v.dtype, i));
  return t;
}

// A device tensor poisoned with NaN (float) or a sentinel (integers): unwritten outputs show.
inline Tensor poisoned(Backend& be, DType dtype, Shape shape) {
  Tensor t = be.empty(dtype, shape);
  be.fill(t, is_float(dtype) ? std::numeric_limits<double>::quiet_NaN() : -7.0);
  return t;
}

// ||a - b||_F / ||b||_F over host tensors of any float dtype; +inf if a holds a NaN or inf.
inline double rel_error(const TensorView& a, const TensorView& ref) {
  EXPECT_EQ(a.shape, ref.shape);
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = load_as_double(a.data, a.dtype, i), y = load_as_double(ref.data, ref.dtype, i);
    if (!std::isfinite(x)) return std::numeric_limits<double>::infinity();
    num += (x - y) * (x - y);
    den += y * y;
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();  // an all-zero ref must match exactly
  return std::sqrt(num / den);
}

inline bool bytes_equal(const TensorView& a, const TensorView& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data, b.data, static_cast<size_t>(a.nbytes())) == 0;
}

// topk ids [T, k] I32/I64: distinct experts per token, uniform, or `hot` experts taking a share.
inline Tensor random_ids(DType dtype, int64_t T, int64_t k, int64_t E, std::mt19937_64& rng, int64_t hot = 0,
                         double hot_share = 0.0) {
  Tensor ids(dtype, {T, k});
  std::uniform_int_distribution<int64_t> any(0, E - 1), hot_pick(0, hot > 0 ? hot - 1 : 0);
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e;
      bool fresh;
      int tries = 0;
      do {  // distinct within a token (k <= E); a hot expert already taken falls back to uniform
        e = (hot > 0 && tries++ == 0 && u(rng) < hot_share) ? hot_pick(rng) : any(rng);
        fresh = true;
        for (int64_t i = 0; i < j; ++i) {
          const int64_t prev = dtype == DType::I32 ? ids.ptr<int32_t>()[t * k + i] : ids.ptr<int64_t>()[t * k + i];
          fresh &= prev != e;
        }
      } while (!fresh);
      if (dtype == DType::I32)
        ids.ptr<int32_t>()[t * k + j] = static_cast<int32_t>(e);
      else
        ids.ptr<int64_t>()[t * k + j] = e;
    }
  return ids;
}

}  // namespace fp8moe::test

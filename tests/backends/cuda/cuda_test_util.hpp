// Helpers shared by the CUDA backend's tests: fresh seeds, random host tensors, device round trips
// (through a Backend, or straight through the CUDA runtime for the kernel-level tests), host-built
// routing plans and the error metrics. Every test compares the CUDA code with a reference on
// identical inputs: the CPU backend (the oracle), or a double-precision loop of its own.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/w8a8.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/dtype.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe::test {

// FP8MOE_TEST_SEED replays a seed a failure printed.
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("FP8MOE_TEST_SEED"); s != nullptr && *s != '\0') return std::strtoull(s, nullptr, 10);
  return (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
}

// Skips the test when no GPU is present (the binary is built wherever nvcc is).
#define FP8MOE_REQUIRE_GPU()                                          \
  do {                                                                \
    if (!::fp8moe::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// A GPU and the W8A8 kernel (built by default where sm_90a is targeted and CUTLASS is found; an
// sm_90 card); skips with the reason.
#define FP8MOE_REQUIRE_W8A8()                                                                         \
  do {                                                                                                \
    FP8MOE_REQUIRE_GPU();                                                                             \
    if (!::fp8moe::cuda::w8a8::available()) GTEST_SKIP() << ::fp8moe::cuda::w8a8::unavailable_reason(); \
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

// Elements of `a` farther from `ref` than tol * (|ref| + RMS(ref)) (non-finite ones included):
// where a Frobenius error hides a few misplaced values, this counts them.
inline int64_t count_far(const TensorView& a, const TensorView& ref, double tol) {
  EXPECT_EQ(a.shape, ref.shape);
  double ss = 0.0;
  for (int64_t i = 0; i < ref.numel(); ++i) ss += std::pow(load_as_double(ref.data, ref.dtype, i), 2);
  const double rms = ref.numel() > 0 ? std::sqrt(ss / static_cast<double>(ref.numel())) : 0.0;
  int64_t far = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = load_as_double(a.data, a.dtype, i), y = load_as_double(ref.data, ref.dtype, i);
    far += !(std::fabs(x - y) <= tol * (std::fabs(y) + rms));
  }
  return far;
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

// ---- kernel-level tests (grouped GEMM, grouped outer): device memory without a Backend

class DeviceAllocator : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    FP8MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  void deallocate(void* p) override { cudaFree(p); }
  Device device() const override { return Device::CUDA; }
};
inline DeviceAllocator& dev_alloc() {
  static DeviceAllocator a;
  return a;
}

inline Tensor upload(const TensorView& h) {
  Tensor d(h.dtype, h.shape, dev_alloc());
  if (h.nbytes() > 0) FP8MOE_CUDA_CHECK(cudaMemcpy(d.data(), h.data, h.nbytes(), cudaMemcpyHostToDevice));
  return d;
}
inline Tensor download(const TensorView& d) {
  Tensor h(d.dtype, d.shape);
  if (d.nbytes() > 0) FP8MOE_CUDA_CHECK(cudaMemcpy(h.data(), d.data, d.nbytes(), cudaMemcpyDeviceToHost));
  return h;
}
// Device buffer filled with NaN (all bits set is a NaN in BF16 and F32).
inline Tensor poisoned(DType dt, Shape s) {
  Tensor d(dt, s, dev_alloc());
  if (d.nbytes() > 0) FP8MOE_CUDA_CHECK(cudaMemset(d.data(), 0xFF, d.nbytes()));
  return d;
}

struct Rng {
  explicit Rng(uint64_t seed) : g(seed) {}
  std::mt19937_64 g;
  int64_t below(int64_t n) { return static_cast<int64_t>(g() % static_cast<uint64_t>(n)); }
};
inline double at(const TensorView& t, int64_t i) { return load_as_double(t.data, t.dtype, i); }

// Routing plan built on the host from ids [T, k] (stable by pair within an expert), with its
// device copy in `plan`.
struct HostPlan {
  int64_t T = 0, k = 1, E = 1;
  std::vector<int32_t> offsets, sorted, row_of;  // [E + 1], [M], [M]
  Tensor d_offsets, d_sorted, d_row_of;
  RoutingPlan plan;
};
inline void finish_plan(HostPlan& hp, const std::vector<int32_t>& ids) {
  const int64_t M = hp.T * hp.k;
  hp.offsets.assign(hp.E + 1, 0);
  for (int32_t id : ids) ++hp.offsets[id + 1];
  for (int64_t e = 0; e < hp.E; ++e) hp.offsets[e + 1] += hp.offsets[e];
  std::vector<int32_t> next(hp.offsets.begin(), hp.offsets.end() - 1);
  hp.sorted.assign(M, 0);
  hp.row_of.assign(M, 0);
  for (int64_t p = 0; p < M; ++p) {
    const int32_t r = next[ids[p]]++;
    hp.sorted[r] = static_cast<int32_t>(p);
    hp.row_of[p] = r;
  }
  auto up = [](std::vector<int32_t>& v) {
    return upload(TensorView(v.data(), DType::I32, {static_cast<int64_t>(v.size())}));
  };
  hp.d_offsets = up(hp.offsets);
  hp.d_sorted = up(hp.sorted);
  hp.d_row_of = up(hp.row_of);
  hp.plan.tokens = hp.T;
  hp.plan.top_k = hp.k;
  hp.plan.experts = hp.E;
  hp.plan.offsets = hp.d_offsets;
  hp.plan.sorted_pairs = hp.d_sorted;
  hp.plan.row_of_pair = hp.d_row_of;
}
enum class Routing { Uniform, SomeEmpty, Hot };
// Distinct experts per token (as a router gives) unless Hot: then every pair goes to one expert.
inline std::unique_ptr<HostPlan> make_plan(int64_t T, int64_t k, int64_t E, Routing how, Rng& rng) {
  auto hp = std::make_unique<HostPlan>();
  hp->T = T;
  hp->k = k;
  hp->E = E;
  std::vector<int32_t> ids(T * k);
  const int64_t hot = rng.below(E);
  // SomeEmpty: only the experts in the first half of a shuffled list receive rows.
  std::vector<int32_t> pool(E);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng.g);
  const int64_t used = how == Routing::SomeEmpty ? std::max<int64_t>(k, E / 2) : E;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> cand(pool.begin(), pool.begin() + used);
    std::shuffle(cand.begin(), cand.end(), rng.g);
    for (int64_t j = 0; j < k; ++j) ids[t * k + j] = how == Routing::Hot ? static_cast<int32_t>(hot) : cand[j];
  }
  finish_plan(*hp, ids);
  return hp;
}

// Relative Frobenius error of `got` [*, cols] over the given rows against `want` [rows.size(),
// cols], plus every checked element finite and each row within a looser bound (catches a single
// wrong or unwritten row inside a big matrix).
inline void expect_rows_close(const Tensor& got, const std::vector<int64_t>& rows, const std::vector<double>& want,
                              int64_t cols, double tol, const char* what) {
  double num = 0.0, den = 0.0;
  int64_t bad_rows = 0, nonfinite = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    double rn = 0.0, rd = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double g = at(got, rows[i] * cols + c), w = want[i * cols + c];
      if (!std::isfinite(g)) ++nonfinite;
      rn += (g - w) * (g - w);
      rd += w * w;
    }
    num += rn;
    den += rd;
    if (std::sqrt(rn) > 4 * tol * std::sqrt(rd) + 1e-6 * std::sqrt(static_cast<double>(cols))) ++bad_rows;
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  EXPECT_EQ(nonfinite, 0) << what << ": non-finite (unwritten?) elements";
  EXPECT_EQ(bad_rows, 0) << what << ": rows off by more than " << 4 * tol;
  EXPECT_LT(err, tol) << what << ": relative Frobenius error";
  std::printf("  %s: rel err %.2e over %zu rows\n", what, err, rows.size());
}

}  // namespace fp8moe::test

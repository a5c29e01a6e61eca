// GPU tests of grouped_outer (src/backends/cuda/grouped_outer.cu), the per-expert reductions of
// the LoRA weight gradients: fresh random inputs, outputs poisoned with NaN, a double-precision
// host reference, empty experts exactly zero, bitwise determinism; both kernels
// (gemm::choose_outer_kernel) on their edges.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_test_util.hpp"
#include "backends/cuda/grouped_gemm.cuh"
#include "fp8moe/backend.hpp"

namespace fp8moe {
namespace {

using test::at;
using test::download;
using test::expect_rows_close;
using test::fresh_seed;
using test::make_plan;
using test::poisoned;
using test::random_host;
using test::Rng;
using test::Routing;
using test::upload;

struct OuterCase {
  int64_t T = 64, k = 2, E = 4, N = 96, Q = 16;
  Routing routing = Routing::Uniform;
  RowSource left_rows = RowSource::Rows, right_rows = RowSource::Rows;
  DType left_dtype = DType::BF16, right_dtype = DType::BF16, out_dtype = DType::F32;
  bool row_scale = false;
};

void run_outer(const OuterCase& c) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  auto hp = make_plan(c.T, c.k, c.E, c.routing, rng);
  const int64_t M = c.T * c.k;
  const Tensor L = random_host(c.left_dtype, {c.left_rows == RowSource::Tokens ? c.T : M, c.N}, rng.g);
  const Tensor R = random_host(c.right_dtype, {c.right_rows == RowSource::Tokens ? c.T : M, c.Q}, rng.g);
  const Tensor rs = random_host(DType::F32, {M}, rng.g);
  const Tensor dL = upload(L), dR = upload(R), drs = upload(rs);
  const Tensor dout = poisoned(c.out_dtype, {c.E, c.N, c.Q});
  GroupedOuter g;
  g.plan = &hp->plan;
  g.left = {dL, c.left_rows};
  g.right = {dR, c.right_rows};
  if (c.row_scale) g.row_scale = drs;
  g.alpha = 0.75;
  g.out = dout;
  cuda::grouped_outer(g, test::dev_alloc(), nullptr);
  FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const Tensor out = download(dout);

  std::vector<double> want(c.E * c.N * c.Q, 0.0);
  for (int64_t e = 0; e < c.E; ++e)
    for (int64_t r = hp->offsets[e]; r < hp->offsets[e + 1]; ++r) {
      const int64_t pair = hp->sorted[r], tok = pair / c.k;
      const int64_t lr = c.left_rows == RowSource::Tokens ? tok : r, rr = c.right_rows == RowSource::Tokens ? tok : r;
      const double f = g.alpha * (c.row_scale ? at(rs, pair) : 1.0);
      for (int64_t n = 0; n < c.N; ++n)
        for (int64_t q = 0; q < c.Q; ++q) want[(e * c.N + n) * c.Q + q] += f * at(L, lr * c.N + n) * at(R, rr * c.Q + q);
    }
  std::vector<int64_t> rows(c.E * c.N);
  std::iota(rows.begin(), rows.end(), 0);
  // Empty experts must be exactly zero (not NaN, not stale).
  for (int64_t e = 0; e < c.E; ++e) {
    if (hp->offsets[e + 1] != hp->offsets[e]) continue;
    for (int64_t i = 0; i < c.N * c.Q; ++i) ASSERT_EQ(at(out, e * c.N * c.Q + i), 0.0) << "expert " << e;
  }
  if (M > 0) expect_rows_close(out, rows, want, c.Q, c.out_dtype == DType::F32 ? 1e-5 : 1e-2, "outer");

  FP8MOE_CUDA_CHECK(cudaMemset(dout.data(), 0xFF, dout.nbytes()));
  cuda::grouped_outer(g, test::dev_alloc(), nullptr);
  FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
  const Tensor out2 = download(dout);
  EXPECT_EQ(std::memcmp(out.data(), out2.data(), out.nbytes()), 0) << "two runs differ";
}

TEST(GroupedOuter, LoraGradientShapes) {
  FP8MOE_REQUIRE_GPU();
  OuterCase b;  // dB = sum dH^T U: N = 2I, Q = r
  b.T = 90, b.k = 2, b.E = 6, b.N = 200, b.Q = 13;
  b.row_scale = true;
  run_outer(b);
  OuterCase a;  // dA = sum dU^T X: N = r, Q = H, X gathered by token
  a.T = 70, a.k = 4, a.E = 8, a.N = 8, a.Q = 136;
  a.right_rows = RowSource::Tokens;
  a.right_dtype = DType::F32;
  a.out_dtype = DType::BF16;
  run_outer(a);
  a.Q = 301;  // odd width: per-element wide-side loads, a partial column block
  run_outer(a);
  OuterCase f;  // a whole-rank F32 narrow side (staged by 16-byte loads), wide BF16 by token
  f.T = 150, f.k = 2, f.E = 4, f.N = 200, f.Q = 16;
  f.right_dtype = DType::F32;
  f.left_rows = RowSource::Tokens;
  f.row_scale = true;
  run_outer(f);
  f.Q = 32;
  run_outer(f);
}

// The small-side kernel (min(N, Q) <= 32): more than one column block of the wide side and a
// partial last one, both narrow widths it instantiates (16, 32), the narrow side on either
// operand, gathered rows on the wide side, one hot expert (its rows through many rounds of the
// shared-memory stages); 33 takes the general kernel.
TEST(GroupedOuter, NarrowSideKernel) {
  FP8MOE_REQUIRE_GPU();
  OuterCase b;  // dB-like: wide left (600), narrow right (24: the 32-wide instance)
  b.T = 300, b.k = 2, b.E = 5, b.N = 600, b.Q = 24;
  b.left_rows = RowSource::Tokens;
  b.left_dtype = DType::F32;
  b.row_scale = true;
  run_outer(b);
  b.routing = Routing::Hot;  // every row on one expert
  b.k = 1;
  run_outer(b);
  OuterCase a;  // dA-like: narrow left (16), wide right (520) gathered by token, BF16 out
  a.T = 200, a.k = 4, a.E = 7, a.N = 16, a.Q = 520;
  a.right_rows = RowSource::Tokens;
  a.routing = Routing::SomeEmpty;
  a.out_dtype = DType::BF16;
  run_outer(a);
  a.routing = Routing::Hot;  // one expert's 1000 rows: 16 chunks, many rounds of the stages
  a.T = 1000, a.k = 1;
  ASSERT_EQ(cuda::gemm::outer_row_splits(a.T, a.E, 5), 1);
  run_outer(a);
  for (int64_t narrow : {32, 33}) {  // the largest the kernel takes, and the first it does not
    OuterCase c;
    c.T = 120, c.k = 2, c.E = 3, c.N = 300, c.Q = narrow;
    c.row_scale = true;
    SCOPED_TRACE("narrow " + std::to_string(narrow));
    run_outer(c);
  }
}

// Few groups with many rows (a dense projection's LoRA gradients: E = 1): the narrow-side kernel
// splits each expert's rows (gemm::outer_row_splits) and sums the partials in a second pass. Split
// counts that leave the last ranges empty, the narrow side on either operand, both instances,
// row scales and BF16 output; one expert of two empty.
TEST(GroupedOuter, RowSplits) {
  FP8MOE_REQUIRE_GPU();
  OuterCase a;  // dA of a dense projection: narrow left (16), wide right (700), 1500 rows
  a.T = 1500, a.k = 1, a.E = 1, a.N = 16, a.Q = 700;
  ASSERT_GT(cuda::gemm::outer_row_splits(a.T, a.E, 6), 1);
  run_outer(a);
  OuterCase b;  // dB: wide left (520) in F32, narrow right (24), row scales, BF16 out
  b.T = 2100, b.k = 1, b.E = 1, b.N = 520, b.Q = 24;
  b.left_dtype = DType::F32;
  b.row_scale = true;
  b.out_dtype = DType::BF16;
  run_outer(b);
  b.E = 2, b.routing = Routing::Hot;  // one expert takes every row, the other none
  run_outer(b);
  OuterCase c;  // many splits on one column block, wide operand gathered by token
  c.T = 1024, c.k = 4, c.E = 1, c.N = 16, c.Q = 100;
  c.routing = Routing::Hot;  // one expert cannot take k distinct picks of a token
  c.right_rows = RowSource::Tokens;
  ASSERT_EQ(cuda::gemm::outer_row_splits(c.T * c.k, c.E, 1), 32);
  run_outer(c);
}

TEST(GroupedOuter, RoutingEdgeCases) {
  FP8MOE_REQUIRE_GPU();
  OuterCase c;
  c.T = 60, c.k = 2, c.E = 12, c.N = 64, c.Q = 64;
  c.routing = Routing::SomeEmpty;
  c.left_rows = RowSource::Tokens;
  run_outer(c);
  c.routing = Routing::Hot;  // one expert, many rows
  c.T = 500, c.k = 1;
  run_outer(c);
  c.T = 1;  // a single row
  run_outer(c);
  c.T = 0;  // M = 0: all zeros
  run_outer(c);
}

}  // namespace
}  // namespace fp8moe

// combine and pair_dot: the two per-token reductions over a token's k expert rows.
//
//   combine   out[t, :]  = sum_{j < k} w[t, j] * rows[row_of_pair(t*k + j), :]
//   pair_dot  out[t, j]  = < tokens[t, :], rows[row_of_pair(t*k + j), :] >
//
// Both accumulate in fp32 in a fixed order (j ascending; within a dot, each lane's strided
// columns in order, then a fixed butterfly), with no atomics: results are bitwise reproducible.
// Rows at or past offsets[E] belong to pairs with an out-of-range expert id (plan.cu): they
// contribute nothing (pair_dot writes 0 for them).
// Loads are 16 bytes wide when the row length and the base pointers allow it; otherwise the same
// arithmetic runs one element at a time.
#include <cstdint>

#include "backends/cuda/cuda_backend.cuh"

namespace fp8moe::cuda {

namespace {

// W consecutive elements as fp32: 16-byte loads when W * sizeof(T) is a multiple of 16, else
// scalar. The caller guarantees alignment for the vector case.
template <typename T, int W>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[W]) {
  if constexpr (W > 1 && (W * sizeof(T)) % 16 == 0) {
    constexpr int kW = Vec16<T>::kWidth;
#pragma unroll
    for (int c = 0; c < W / kW; ++c) {
      float part[kW];
      Vec16<T>::load(p + c * kW, part);
#pragma unroll
      for (int i = 0; i < kW; ++i) v[c * kW + i] = part[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = to_float(p[i]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[W]) {
  if constexpr (W > 1 && (W * sizeof(T)) % 16 == 0) {
    constexpr int kW = Vec16<T>::kWidth;
#pragma unroll
    for (int c = 0; c < W / kW; ++c) {
      float part[kW];
#pragma unroll
      for (int i = 0; i < kW; ++i) part[i] = v[c * kW + i];
      Vec16<T>::store(p + c * kW, part);
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) from_float(v[i], p[i]);
  }
}

// One thread per W-column chunk of one token: grid (T, chunk blocks).
template <typename Row, typename Out, int W>
__global__ void combine_kernel(const Row* __restrict__ rows, const void* __restrict__ weights, DType weight_dtype,
                               Out* __restrict__ out, const int* __restrict__ row_of_pair,
                               const int* __restrict__ offsets, int experts, int k, int64_t H) {
  const int64_t t = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (col >= H) return;
  const int valid_rows = offsets[experts];
  float acc[W];
#pragma unroll
  for (int i = 0; i < W; ++i) acc[i] = 0.0f;
  for (int j = 0; j < k; ++j) {
    const int64_t p = t * k + j;
    const int r = row_of_pair[p];
    if (r >= valid_rows) continue;
    const float w = weights ? load_float(weights, weight_dtype, p) : 1.0f;
    float v[W];
    load_vec<Row, W>(rows + static_cast<int64_t>(r) * H + col, v);
#pragma unroll
    for (int i = 0; i < W; ++i) acc[i] = fmaf(w, v[i], acc[i]);
  }
  store_vec<Out, W>(out + t * H + col, acc);
}

// One warp per pair; lanes stride over W-column chunks.
constexpr int kDotWarps = 8;
template <typename Tok, typename Row, int W>
__global__ void pair_dot_kernel(const Tok* __restrict__ tokens, const Row* __restrict__ rows, void* __restrict__ out,
                                DType out_dtype, const int* __restrict__ row_of_pair, const int* __restrict__ offsets,
                                int experts, int k, int64_t pairs, int64_t H) {
  const int lane = threadIdx.x % 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kDotWarps + threadIdx.x / 32;
  if (p >= pairs) return;
  const int r = row_of_pair[p];
  float acc = 0.0f;
  if (r < offsets[experts]) {
    const Tok* a = tokens + (p / k) * H;
    const Row* b = rows + static_cast<int64_t>(r) * H;
    for (int64_t col = static_cast<int64_t>(lane) * W; col < H; col += 32 * W) {
      float x[W], y[W];
      load_vec<Tok, W>(a + col, x);
      load_vec<Row, W>(b + col, y);
#pragma unroll
      for (int i = 0; i < W; ++i) acc = fmaf(x[i], y[i], acc);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) store_float(out, out_dtype, p, acc);
}

// Calls f(Row*) / f(Out*) with the pointer cast to its element type (BF16 or F32).
template <typename F>
void with_float_type(const TensorView& t, F&& f) {
  if (t.dtype == DType::BF16)
    f(static_cast<__nv_bfloat16*>(t.data));
  else
    f(static_cast<float*>(t.data));
}

const RoutingPlan& checked_plan(const RoutingPlan* p, const char* op) {
  FP8MOE_CHECK(p != nullptr, op, ": no routing plan given");
  FP8MOE_CHECK(p->offsets.defined() && p->offsets.device() == Device::CUDA && p->offsets.dtype() == DType::I32 &&
                   p->offsets.numel() == p->experts + 1,
               op, ": the routing plan was not built by the CUDA backend");
  return *p;
}

}  // namespace

void combine(const Combine& c, cudaStream_t stream) {
  const RoutingPlan& plan = checked_plan(c.plan, "combine");
  const int64_t T = plan.tokens, k = plan.top_k, M = plan.rows();
  FP8MOE_CHECK(c.rows.defined() && c.rows.rank() == 2, "combine: tensor rows must be [M, H], found ",
               c.rows.defined() ? c.rows.str() : std::string("no tensor"));
  const int64_t H = c.rows.size(1);
  check_device_operand(c.rows, "combine rows", {DType::BF16, DType::F32});
  check_shape(c.rows, "combine rows", {M, H});
  if (c.weights.defined()) {
    check_device_operand(c.weights, "combine weights", {DType::F32, DType::BF16, DType::F64});
    check_shape(c.weights, "combine weights", {T, k});
  }
  check_device_operand(c.out, "combine out", {DType::F32, DType::BF16});
  check_shape(c.out, "combine out", {T, H});
  if (T == 0 || H == 0) return;

  const bool bf16 = c.rows.dtype == DType::BF16 || c.out.dtype == DType::BF16;
  const int vec = bf16 ? 8 : 4;  // 16 bytes of the narrower operand
  const bool vectorised = H % vec == 0 && aligned16(c.rows.data) && aligned16(c.out.data);
  const int w = vectorised ? vec : 1;
  constexpr int kThreads = 128;
  const dim3 grid(static_cast<unsigned>(T), grid_blocks((H + w - 1) / w, kThreads));
  FP8MOE_CHECK(grid.y <= 65535, "combine: hidden size ", H, " is too large for the launch grid");

  with_float_type(c.rows, [&](auto* rows) {
    with_float_type(c.out, [&](auto* out) {
      using Row = std::remove_pointer_t<decltype(rows)>;
      using Out = std::remove_pointer_t<decltype(out)>;
      const auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(rows, c.weights.defined() ? c.weights.data : nullptr, c.weights.dtype,
                                              out, plan.row_of_pair.ptr<int>(), plan.offsets.ptr<int>(),
                                              static_cast<int>(plan.experts), static_cast<int>(k), H);
      };
      if (!vectorised)
        launch(combine_kernel<Row, Out, 1>);
      else if (vec == 8)
        launch(combine_kernel<Row, Out, 8>);
      else
        launch(combine_kernel<Row, Out, 4>);
    });
  });
  FP8MOE_CUDA_LAUNCH_CHECK("combine_kernel");
}

void pair_dot(const PairDot& d, cudaStream_t stream) {
  const RoutingPlan& plan = checked_plan(d.plan, "pair_dot");
  const int64_t T = plan.tokens, k = plan.top_k, M = plan.rows();
  FP8MOE_CHECK(d.tokens.defined() && d.tokens.rank() == 2, "pair_dot: tensor tokens must be [T, H], found ",
               d.tokens.defined() ? d.tokens.str() : std::string("no tensor"));
  const int64_t H = d.tokens.size(1);
  check_device_operand(d.tokens, "pair_dot tokens", {DType::BF16, DType::F32});
  check_shape(d.tokens, "pair_dot tokens", {T, H});
  check_device_operand(d.rows, "pair_dot rows", {DType::BF16, DType::F32});
  check_shape(d.rows, "pair_dot rows", {M, H});
  check_device_operand(d.out, "pair_dot out", {DType::F32, DType::BF16, DType::F64});
  check_shape(d.out, "pair_dot out", {T, k});
  if (M == 0) return;

  const bool bf16 = d.tokens.dtype == DType::BF16 || d.rows.dtype == DType::BF16;
  const int vec = bf16 ? 8 : 4;
  const bool vectorised = H % vec == 0 && aligned16(d.tokens.data) && aligned16(d.rows.data);
  const unsigned blocks = grid_blocks(M, kDotWarps);
  with_float_type(d.tokens, [&](auto* tokens) {
    with_float_type(d.rows, [&](auto* rows) {
      using Tok = std::remove_pointer_t<decltype(tokens)>;
      using Row = std::remove_pointer_t<decltype(rows)>;
      const auto launch = [&](auto kernel) {
        kernel<<<blocks, 32 * kDotWarps, 0, stream>>>(tokens, rows, d.out.data, d.out.dtype,
                                                       plan.row_of_pair.ptr<int>(), plan.offsets.ptr<int>(),
                                                       static_cast<int>(plan.experts), static_cast<int>(k), M, H);
      };
      if (!vectorised)
        launch(pair_dot_kernel<Tok, Row, 1>);
      else if (vec == 8)
        launch(pair_dot_kernel<Tok, Row, 8>);
      else
        launch(pair_dot_kernel<Tok, Row, 4>);
    });
  });
  FP8MOE_CUDA_LAUNCH_CHECK("pair_dot_kernel");
}

}  // namespace fp8moe::cuda

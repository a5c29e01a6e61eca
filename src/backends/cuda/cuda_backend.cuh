// The CUDA backend's internals: the operations other than the grouped GEMMs (routing plan,
// combine, pair_dot, routers, fill), their launchers, and the small device helpers they share.
// Each launcher takes views and the backend's stream, checks its arguments on the host, queues
// its kernels and never synchronises: everything here may be captured in a CUDA graph.
//
// Launchers accept contiguous device views only (every check names the tensor).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/cuda_check.cuh"
#include "fp8moe/backend.hpp"

namespace fp8moe::cuda {

// Faults the kernels cannot report without a host synchronisation. Lives in device memory for the
// backend's lifetime; CudaBackend::synchronize() reads it, resets it and throws.
struct DeviceErrors {
  unsigned long long bad_ids;    // number of topk_ids outside [0, E) seen by build_plan
  unsigned long long first_bad;  // min over bad pairs of (pair << 32 | uint32(clamped id)); ~0 when none
};

// ---- launchers (plan.cu, combine.cu, router.cu, cuda_backend.cu)

// Routing plan on the device (plan.cu). Allocates plan.offsets / sorted_pairs / row_of_pair from
// `alloc` (stream-ordered) unless the caller set them (provide_plan_tensors). A pair whose id is outside [0, E) is counted in `errors` and placed
// after every expert's rows: rows [offsets[E], M) hold such pairs in pair order, no expert
// processes them, and combine / pair_dot give them zero weight.
void build_plan(const TensorView& topk_ids, int64_t experts, RoutingPlan& plan, Allocator& alloc,
                DeviceErrors* errors, cudaStream_t stream);
// The one-expert identity plan of `rows` rows (plan.cu); plan tensors the caller set are reused.
void identity_plan(int64_t rows, RoutingPlan& plan, Allocator& alloc, cudaStream_t stream);

void combine(const Combine& c, cudaStream_t stream);   // combine.cu
void pair_dot(const PairDot& d, cudaStream_t stream);  // combine.cu

void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& weights,
           cudaStream_t stream);  // router.cu
void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                    const TensorView& grad_weights, const TensorView& grad_logits, cudaStream_t stream);

// Sets every element of a contiguous device view to `value` rounded once to its dtype (any
// byte-sized float dtype, integers). cuda_backend.cu.
void fill(const TensorView& t, double value, cudaStream_t stream);

// Checks shared by the launchers: a device view, contiguous, of one of `allowed` dtypes.
void check_device_operand(const TensorView& t, const char* name, std::initializer_list<DType> allowed);

// ---- device helpers

// Runtime-dtype scalar access for the float dtypes the activations use. The dtype is uniform
// across a launch, so the switch costs a predictable branch, not divergence.
__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// 16-byte vectors of activations: 8 BF16 or 4 F32 elements unpacked to fp32.
template <typename T>
struct Vec16;
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static void load(const __nv_bfloat16* p, float (&v)[kWidth]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, const float (&v)[kWidth]) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};
template <>
struct Vec16<float> {
  static constexpr int kWidth = 4;
  __device__ __forceinline__ static void load(const float* p, float (&v)[kWidth]) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  }
  __device__ __forceinline__ static void store(float* p, const float (&v)[kWidth]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ void from_float(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_float(float v, float& out) { out = v; }

// Sum over a warp with a fixed butterfly: every lane gets the same, run-to-run identical value.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Whether a pointer allows 16-byte vector accesses (the kernels' vector paths ask it of every operand).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned grid_blocks(int64_t work, int per_block) {
  return static_cast<unsigned>((work + per_block - 1) / per_block);
}

}  // namespace fp8moe::cuda

// The definition of launch_instance (declared in gemm_parts.cuh). Only the generated translation
// units include this file (CMakeLists.txt writes one per instance from gemm_instance.cu.in), so
// each kernel instantiation compiles on its own: the sm_90a ones take about a minute each, and in
// one file they made the whole build wait for a single nvcc (~250 s on the 16-core GPU machine).
#pragma once

#include "backends/cuda/gemm_kernel.cuh"
#include "backends/cuda/gemm_kernel_sm90.cuh"
#include "backends/cuda/gemm_kernel_sm90_rega.cuh"

namespace fp8moe::cuda::gemm {

// The Kernel* traits of shape S for A bytes AB, W bytes BB, W orientation TR: the last column of
// its row in tile_shapes.def.
template <TileShape S, int AB, int BB, bool TR>
struct ShapeKernel;
#define FP8MOE_TILE_SHAPE(shape, bm, bn, bk, engine, storage, name, ...) \
  template <int AB, int BB, bool TR>                                     \
  struct ShapeKernel<TileShape::shape, AB, BB, TR> {                     \
    using type = __VA_ARGS__;                                            \
  };
#include "backends/cuda/tile_shapes.def"
#undef FP8MOE_TILE_SHAPE

template <TileShape S, int AB, int BB, bool TR>
void launch_instance(const Params& p, dim3 grid, cudaStream_t stream) {
  using K = typename ShapeKernel<S, AB, BB, TR>::type;
  using Cfg = typename K::Cfg;
  static_assert(tile_takes_storage(S, AB, BB), "this shape is not built for this operand storage (tile_shapes.def)");
  static_assert(Cfg::BM == tile_bm(S) && Cfg::BN == tile_bn(S) && Cfg::kBK == tile_bk(S),
                "the kernel's tile config disagrees with the shape's BM, BN, BK in tile_shapes.def");
  auto launch = [&](auto kernel_traits) {
    using KT = decltype(kernel_traits);
    set_smem_limit(KT::kernel, KT::kSmemBytes);
    KT::kernel<<<grid, Cfg::kThreads, KT::kSmemBytes, stream>>>(p);
    FP8MOE_CUDA_LAUNCH_CHECK(tile_shape_name(S));
  };
  // Transposed Sm90RegA has a second variant for per-K-row scales (Params::k_row_scale).
  if constexpr (is_rega(S) && TR) {
    if (p.k_row_scale) return launch(typename K::WithKRowScale{});
  }
  launch(K{});
}

}  // namespace fp8moe::cuda::gemm

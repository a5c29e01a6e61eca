// The definition of launch_instance (declared in gemm_parts.cuh). Only the generated translation
// units include this file (CMakeLists.txt writes one per instance from gemm_instance.cu.in), so
// each kernel instantiation compiles on its own: the sm_90a ones take about a minute each, and in
// one file they made the whole build wait for a single nvcc (~250 s on the 16-core GPU machine).
#pragma once

#include "backends/cuda/gemm_kernel.cuh"
#include "backends/cuda/gemm_kernel_sm90.cuh"
#include "backends/cuda/gemm_kernel_sm90_rega.cuh"

namespace fp8moe::cuda::gemm {

template <TileShape S, int AB, int BB, bool TR>
void launch_instance(const Params& p, dim3 grid, cudaStream_t stream) {
  using MmaCfg = std::conditional_t<S == TileShape::M32N128, TileM32N128,
                                    std::conditional_t<S == TileShape::M128N32, TileM128N32, TileM64N128>>;
  constexpr int kNT = S == TileShape::Sm90RegAT256 ? 2 : 1;     // token blocks of a RegA tile
  constexpr int kTN = S == TileShape::Sm90RegAT64 ? 64 : 128;   // their width
  using Sm90Cfg = std::conditional_t<is_rega(S), TileSm90RegA<kNT, kTN>, TileSm90M128>;
  using Cfg = std::conditional_t<is_sm90(S), Sm90Cfg, MmaCfg>;
  using K = std::conditional_t<is_rega(S), KernelSm90RegA<kNT, kTN, TR>,
                               std::conditional_t<S == TileShape::Sm90M128N128, KernelSm90<TileSm90M128, AB, BB, TR>,
                                                  KernelMma<MmaCfg, AB, BB, TR>>>;
  static_assert(!is_rega(S) || (AB == 2 && BB == 1), "Sm90RegA: BF16 A, FP8 W");
  static_assert(Cfg::BM == tile_bm(S) && Cfg::kBK == tile_bk(S) && (is_sm90(S) || Cfg::BN == tile_bn(S)),
                "tile_bm/tile_bk/tile_bn disagree with the tile config");
  auto launch = [&](auto kernel_traits) {
    using KT = decltype(kernel_traits);
    set_smem_limit(KT::kernel, KT::kSmemBytes);
    KT::kernel<<<grid, Cfg::kThreads, KT::kSmemBytes, stream>>>(p);
    FP8MOE_CUDA_LAUNCH_CHECK(tile_shape_name(S));
  };
  // Transposed Sm90RegA has a second variant for per-K-row scales (Params::k_row_scale).
  if constexpr (is_rega(S) && TR) {
    if (p.k_row_scale) return launch(KernelSm90RegA<kNT, kTN, true, true>{});
  }
  launch(K{});
}

}  // namespace fp8moe::cuda::gemm

// Instantiations of the grouped GEMM kernel for the 64 x 128 tile shape.
#include "backends/cuda/gemm_kernel.cuh"

namespace fp8moe::cuda::gemm {

void launch_m64n128(const Params& p, int64_t n_tiles, bool trans, int a_bytes, int b_bytes, cudaStream_t stream) {
  launch_tile<TileM64N128>(p, n_tiles, trans, a_bytes, b_bytes, stream);
}

}  // namespace fp8moe::cuda::gemm

// Instantiations of the grouped GEMM kernel for the TileM128N128K64 shape (gemm_kernel.cuh).
#include "backends/cuda/gemm_kernel.cuh"

namespace fp8moe::cuda::gemm {

void launch_m128n128k64(const Params& p, int64_t n_tiles, bool trans, int a_bytes, int b_bytes, cudaStream_t stream) {
  launch_tile<TileM128N128K64>(p, n_tiles, trans, a_bytes, b_bytes, stream);
}

}  // namespace fp8moe::cuda::gemm

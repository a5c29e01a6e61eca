// Tile-shape choice for the grouped GEMM, apart from the kernels.
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::gemm {

const char* tile_shape_name(TileShape s) {
  switch (s) {
    case TileShape::M64N128: return "m64n128k32";
  }
  return "?";
}

TileShape choose_tile_shape(int64_t /*rows*/, int64_t /*experts*/, int64_t /*n*/, int64_t /*k*/) {
  // Measured, not guessed (bench/NOTES.md): 64-row tiles pad less per expert (rows/expert = T/16
  // for the target models) and fit two CTAs per SM; they won at every size we timed.
  return TileShape::M64N128;
}

}  // namespace fp8moe::cuda::gemm

// Tile-shape choice for the grouped GEMM, apart from the kernels.
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::gemm {

const char* tile_shape_name(TileShape s) {
  switch (s) {
    case TileShape::M32N128: return "m32n128k32";
    case TileShape::M64N128: return "m64n128k32";
    case TileShape::Sm90M128N128: return "wgmma_m128n128k64";
  }
  return "?";
}

bool tile_shape_supported(TileShape s) {
  return s == TileShape::Sm90M128N128 ? sm90_kernels_available() : true;
}

TileShape choose_tile_shape(int64_t rows, int64_t experts, int64_t /*n*/, int64_t /*k*/) {
  // wgmma on Hopper once experts average a full 128-row tile (from there it beats mma.sync on
  // every GEMM of both model shapes, bench/NOTES.md); below that the smaller mma.sync tiles pad
  // less: few rows per expert (decode, small batches) are bound by the padded tile's math.
  if (sm90_kernels_available() && rows >= 128 * experts) return TileShape::Sm90M128N128;
  if (rows <= 32 * experts) return TileShape::M32N128;
  return TileShape::M64N128;
}

}  // namespace fp8moe::cuda::gemm

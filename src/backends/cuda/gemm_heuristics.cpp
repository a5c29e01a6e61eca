// Tile-shape choice for the grouped GEMM, apart from the kernels.
#include "backends/cuda/grouped_gemm.cuh"

namespace fp8moe::cuda::gemm {

const char* tile_shape_name(TileShape s) {
  switch (s) {
    case TileShape::M128N128: return "m128n128k32";
    case TileShape::M64N128: return "m64n128k32";
    case TileShape::M128N128K64: return "m128n128k64";
    case TileShape::M64N128K64: return "m64n128k64";
  }
  return "?";
}

TileShape choose_tile_shape(int64_t rows, int64_t experts, int64_t /*n*/, int64_t /*k*/) {
  // Each expert pads its last row tile; with few rows per expert a 128-row tile is mostly
  // padding (rows/expert = T/16 for the target models: 256 tokens -> 16 rows).
  const int64_t rows_per_expert = experts > 0 ? rows / experts : rows;
  return rows_per_expert <= 96 ? TileShape::M64N128 : TileShape::M128N128;
}

}  // namespace fp8moe::cuda::gemm

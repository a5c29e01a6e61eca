// How a quantized weight's scales map onto it. One place knows the index arithmetic; every
// kernel and the CPU reference ask it.
//
// Convention (all formats, formats.md section 2): dequantized value = code * scale, where the
// scale tensor's entry for element (n, k) of an [N, K] matrix is
//     scale[seg(n)][ (n % seg_rows) / block_n ][ k / block_k ]
// Every scheme is a 2-D block grid with ceil-divided (partial) edge blocks:
//     tensor  -> block = (seg_rows, K)        grid [segments, 1]
//     channel -> block = (1, K)               grid [N, 1]
//     block   -> block = (bn, bk)             grid [segments * ceil(seg_rows/bn), ceil(K/bk)]
//     group   -> block = (1, g)               grid [N, ceil(K/g)]
// `segments` splits the rows into independent scale grids of seg_rows = N / segments rows each.
// It exists for the stacked gate_up matrix: gate rows [0, I) and up rows [I, 2I) keep separate
// grids (per-sub-projection scalars, and 128x128 blocks when I % 128 != 0, where one block would
// otherwise straddle gate and up rows). Stacked experts add a leading E to the scale tensor.
#pragma once

#include <cstdint>
#include <string>

#include "fp8moe/dtype.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

enum class ScaleKind : uint8_t { None, Tensor, Channel, Block, Group };
const char* scale_kind_name(ScaleKind k);

struct ScaleSpec {
  ScaleKind kind = ScaleKind::None;
  int64_t rows = 0;      // N of the [N, K] matrix (per expert)
  int64_t cols = 0;      // K
  int64_t segments = 1;  // independent row segments (1, or 2 for gate/up halves)
  int64_t block_n = 1;   // block extent along N (within a segment)
  int64_t block_k = 1;   // block extent along K

  FP8MOE_HD int64_t seg_rows() const { return rows / segments; }
  FP8MOE_HD int64_t grid_n() const { return (seg_rows() + block_n - 1) / block_n; }  // per segment
  FP8MOE_HD int64_t grid_k() const { return (cols + block_k - 1) / block_k; }
  FP8MOE_HD int64_t scale_rows() const { return segments * grid_n(); }
  FP8MOE_HD int64_t numel() const { return scale_rows() * grid_k(); }  // scales per matrix
  // Offset of the scale of element (n, k) inside one matrix's scale block.
  FP8MOE_HD int64_t index(int64_t n, int64_t k) const {
    const int64_t sr = seg_rows();
    const int64_t seg = n / sr;
    return (seg * grid_n() + (n - seg * sr) / block_n) * grid_k() + k / block_k;
  }
  // The two separable parts of index(n, k) == row_index(n) + col_index(k): kernels hoist the
  // part that stays fixed across their K loop.
  FP8MOE_HD int64_t row_index(int64_t n) const { return index(n, 0); }
  FP8MOE_HD int64_t col_index(int64_t k) const { return k / block_k; }

  static ScaleSpec none(int64_t rows, int64_t cols) { return {ScaleKind::None, rows, cols, 1, 1, 1}; }
  static ScaleSpec tensor(int64_t rows, int64_t cols, int64_t segments = 1) {
    return {ScaleKind::Tensor, rows, cols, segments, rows / segments, cols};
  }
  static ScaleSpec channel(int64_t rows, int64_t cols) { return {ScaleKind::Channel, rows, cols, 1, 1, cols}; }
  static ScaleSpec block(int64_t rows, int64_t cols, int64_t bn, int64_t bk, int64_t segments = 1) {
    return {ScaleKind::Block, rows, cols, segments, bn, bk};
  }
  static ScaleSpec group(int64_t rows, int64_t cols, int64_t g) { return {ScaleKind::Group, rows, cols, 1, 1, g}; }

  // Throws unless rows % segments == 0 and blocks are positive.
  void validate(const char* what) const;
  std::string str() const;  // "block 128x128 (2 segments)"
};

// A stack of E matrices [E, N, K]: FP8 codes with fp32 scales [E, scale_rows, grid_k], or plain
// (BF16/F16/F32) weights with spec.kind == None and no scale tensor.
struct QuantTensor {
  TensorView data;   // [E, N, K]
  TensorView scale;  // [E, spec.scale_rows(), spec.grid_k()] F32, or undefined when kind == None
  ScaleSpec spec;

  bool quantized() const { return spec.kind != ScaleKind::None; }
  int64_t experts() const { return data.size(0); }
  // Element (e, n, k) dequantized (host memory only). For checks and the CPU reference.
  double at(int64_t e, int64_t n, int64_t k) const;
  // Throws with `name` unless data/scale shapes and dtypes agree with spec.
  void validate(const char* name) const;
};

// Owning counterpart used by the loader and quantizers.
struct QuantWeights {
  Tensor data;
  Tensor scale;
  ScaleSpec spec;
  QuantTensor view() const { return {data.view(), scale.view(), spec}; }
};

// Quantize a stack of matrices [E, N, K] (any float dtype, host) with scale = amax/max_code per
// block (a zero block gets the smallest positive normal fp32 scale so nothing divides by zero);
// codes are saturating round-to-nearest-even. dtype: F8_E4M3 or F8_E5M2.
QuantWeights quantize(const TensorView& w, const ScaleSpec& spec, DType dtype = DType::F8_E4M3);
// Dequantize to `out_dtype` (host): value = code * scale, the exact product rounded once.
Tensor dequantize(const QuantTensor& q, DType out_dtype);

// Dynamic activation quantization (run time, never stored): per row (group = 0) or per 1 x group
// along K. x [M, K] float-like -> codes [M, K] F8_E4M3 and scales [M, ceil(K/group)] F32.
// An all-zero row/group gets a positive scale (never NaN).
void quantize_activations(const TensorView& x, int64_t group, const TensorView& codes, const TensorView& scales);

}  // namespace fp8moe

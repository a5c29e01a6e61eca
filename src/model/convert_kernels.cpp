// The converter's row kernels (model/convert_kernels.hpp). Source views may be unaligned
// (safetensors does not align tensors): every load is a memcpy, which compiles to a plain
// unaligned load.
#include "model/convert_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "fp8moe/dtype.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe::model {

void dequantize_rows(const DequantSource& d, int64_t r0, int64_t r1, uint16_t* out) {
  const bool e5m2 = d.codes.dtype == DType::F8_E5M2;
  double decoded[256];
  for (int c = 0; c < 256; ++c) decoded[c] = decode_fp8(static_cast<uint8_t>(c), e5m2);
  const ScaleSpec& s = d.spec;
  const int64_t N = s.rows, K = s.cols, gk = s.grid_k(), bk = s.block_k;
  const auto* codes = static_cast<const uint8_t*>(d.codes.data);
  const float* scales = d.scale.ptr<float>();
  // Where one scale covers many elements (a channel row, a 128 x 128 block, a whole tensor), a
  // table of its 256 products is cheaper than a product per element: built once per scale row
  // and reused while consecutive rows share it (the rows of one block).
  const int64_t rows_per_scale = s.kind == ScaleKind::Channel || s.kind == ScaleKind::Group ? 1 : s.block_n;
  const bool tables = std::min(bk, K) * rows_per_scale >= 512;  // 256 products to build, vs one per element
  std::vector<uint16_t> table(tables ? static_cast<size_t>(256 * gk) : 0);
  const float* built = nullptr;  // the scale row `table` holds
  for (int64_t r = r0; r < r1; ++r) {
    const float* srow = scales + (r / N) * s.numel() + s.row_index(r % N);
    const uint8_t* c = codes + r * K;
    uint16_t* o = out + (r - r0) * K;
    if (tables) {
      if (srow != built) {
        for (int64_t kb = 0; kb < gk; ++kb)
          for (int v = 0; v < 256; ++v) table[kb * 256 + v] = bf16_of_exact_product(decoded[v] * srow[kb]);
        built = srow;
      }
      for (int64_t kb = 0; kb < gk; ++kb) {
        const uint16_t* t = table.data() + kb * 256;
        const int64_t k1 = std::min(K, (kb + 1) * bk);
        for (int64_t k = kb * bk; k < k1; ++k) o[k] = t[c[k]];
      }
      continue;
    }
    for (int64_t kb = 0; kb < gk; ++kb) {
      const double scale = srow[kb];
      const int64_t k1 = std::min(K, (kb + 1) * bk);
      for (int64_t k = kb * bk; k < k1; ++k) o[k] = bf16_of_exact_product(decoded[c[k]] * scale);
    }
  }
}

namespace {

// Element i of a plain float source as the fp32 a producer computes with (`w.float()`).
template <DType T>
inline float load_f32(const unsigned char* p, int64_t i) {
  if constexpr (T == DType::BF16) {
    uint16_t b;
    std::memcpy(&b, p + 2 * i, 2);
    return bf16_bits_to_float(b);
  } else if constexpr (T == DType::F16) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    return f16_bits_to_float(h);
  } else if constexpr (T == DType::F32) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  } else {
    double v;
    std::memcpy(&v, p + 8 * i, 8);
    return static_cast<float>(v);
  }
}

template <DType T>
void quantize_rows_as(const QuantSource& q, int64_t r0, int64_t r1, std::vector<float>& band, uint8_t* codes,
                      float* scales) {
  const int64_t N = q.w.size(0), K = q.w.size(1), gk = (K + q.bk - 1) / q.bk;
  const auto* src = static_cast<const unsigned char*>(q.w.data);
  for (int64_t n0 = r0; n0 < r1; n0 += q.bn) {
    const int64_t n1 = std::min({n0 + q.bn, r1, N}), rows = n1 - n0;
    band.resize(static_cast<size_t>(rows * K));
    bool finite = true;
    for (int64_t i = 0; i < rows * K; ++i) {
      const float v = load_f32<T>(src, n0 * K + i);
      band[i] = v;
      finite &= std::isfinite(v);
    }
    if (!finite) {
      const auto bad = std::find_if(band.begin(), band.end(), [](float v) { return !std::isfinite(v); }) - band.begin();
      FP8MOE_FAIL("tensor ", q.name, " ", dtype_name(q.w.dtype), q.w.shape.str(), ": element [", n0 + bad / K, ", ",
                  bad % K, "] is ", band[bad], " (as fp32); only finite weights can be quantized");
    }
    for (int64_t kb = 0; kb < gk; ++kb) {
      const int64_t k0 = kb * q.bk, k1 = std::min(K, k0 + q.bk);
      float amax = 0.0f;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(band[r * K + k]));
      const float s = std::max(amax / kE4M3Max, std::numeric_limits<float>::min());
      scales[((n0 - r0) / q.bn) * gk + kb] = s;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = k0; k < k1; ++k) codes[(n0 - r0 + r) * K + k] = encode_e4m3_sat_finite(band[r * K + k] / s);
    }
  }
}

}  // namespace

void quantize_rows(const QuantSource& q, int64_t r0, int64_t r1, std::vector<float>& band, uint8_t* codes,
                   float* scales) {
  switch (q.w.dtype) {
    case DType::BF16: return quantize_rows_as<DType::BF16>(q, r0, r1, band, codes, scales);
    case DType::F16: return quantize_rows_as<DType::F16>(q, r0, r1, band, codes, scales);
    case DType::F32: return quantize_rows_as<DType::F32>(q, r0, r1, band, codes, scales);
    case DType::F64: return quantize_rows_as<DType::F64>(q, r0, r1, band, codes, scales);
    default: FP8MOE_FAIL("tensor ", q.name, ": cannot quantize dtype ", dtype_name(q.w.dtype));
  }
}

}  // namespace fp8moe::model

// Expert stacking (see experts.hpp). Every index and byte offset is int64: a flattened stack of
// 128 experts x 1536 x 2048 already passes 2^31 bytes (trap 14).
#include "model/experts.hpp"

#include <cmath>
#include <cstring>

#include "formats/checked.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe::model {

namespace {

bool same_scheme(const ScaleSpec& a, const ScaleSpec& b) {
  return a.kind == b.kind && a.block_n == b.block_n && a.block_k == b.block_k && a.cols == b.cols;
}

// Converts `count` scale elements of `src` starting at element `first` into dst (F32), refusing
// non-finite scales: a NaN scale would turn a whole block into NaN with no error.
void convert_scales(float* dst, const std::string& name, const TensorView& src, int64_t first, int64_t count) {
  check_dtype(src, name.c_str(), {DType::F32, DType::BF16, DType::F16});
  for (int64_t i = 0; i < count; ++i) {
    const double v = load_as_double(src.data, src.dtype, first + i);
    FP8MOE_CHECK(std::isfinite(v), "scale ", name, ": element ", first + i, " is ", v, "; scales must be finite");
    dst[i] = static_cast<float>(v);  // exact: F32/BF16/F16 values are all F32 values
  }
}

void check_plain_or_fp8(const TensorView& w, const std::string& name, bool quantized) {
  if (quantized)
    FP8MOE_CHECK(is_fp8(w.dtype), "tensor ", name, ": a scaled weight must be F8_E4M3 or F8_E5M2, found ",
                 dtype_name(w.dtype));
  else
    FP8MOE_CHECK(w.dtype == DType::BF16 || w.dtype == DType::F16 || w.dtype == DType::F32, "tensor ", name,
                 ": an unscaled weight must be BF16, F16 or F32, found ", dtype_name(w.dtype),
                 is_fp8(w.dtype) ? " (FP8 codes without their scale are not values)" : "");
}

}  // namespace

QuantWeights stack_experts(const std::vector<std::vector<StoredMatrix>>& experts, const std::string& what) {
  FP8MOE_CHECK(!experts.empty() && !experts[0].empty(), what, ": no expert matrices to stack");
  const int64_t E = static_cast<int64_t>(experts.size());
  const int64_t P = static_cast<int64_t>(experts[0].size());
  const StoredMatrix& ref = experts[0][0];
  const ScaleSpec& rs = ref.spec;
  const int64_t K = rs.cols;
  const bool quantized = rs.kind != ScaleKind::None;
  check_plain_or_fp8(ref.weight, ref.name, quantized);

  // Row count of each part, and the checks every expert/part must pass against the reference.
  std::vector<int64_t> part_rows(P);
  int64_t N = 0;
  for (int64_t p = 0; p < P; ++p) {
    part_rows[p] = experts[0][p].spec.rows;
    N = checked::add(N, part_rows[p], what, ": the stacked rows");
  }
  for (int64_t e = 0; e < E; ++e) {
    FP8MOE_CHECK(static_cast<int64_t>(experts[e].size()) == P, what, ": expert ", e, " has ", experts[e].size(),
                 " parts, expert 0 has ", P);
    for (int64_t p = 0; p < P; ++p) {
      const StoredMatrix& m = experts[e][p];
      FP8MOE_CHECK(m.weight.dtype == ref.weight.dtype, "tensor ", m.name, ": expected dtype ",
                   dtype_name(ref.weight.dtype), " like ", ref.name, " (all experts of ", what,
                   " must share dtype), found ", dtype_name(m.weight.dtype));
      FP8MOE_CHECK(same_scheme(m.spec, rs), "tensor ", m.name, ": expected scale scheme ", rs.str(), " like ", ref.name,
                   " (all experts of ", what, " must share it), found ", m.spec.str());
      FP8MOE_CHECK(m.spec.segments == 1, "tensor ", m.name, ": a stored matrix has one scale grid, found ",
                   m.spec.str());
      FP8MOE_CHECK(m.spec.rows == part_rows[p], "tensor ", m.name, ": expected ", part_rows[p], " rows like expert 0, found ",
                   m.spec.rows);
      const Shape expected{m.spec.rows, m.spec.cols};
      check_shape(m.weight, m.name.c_str(), expected);
      check_contiguous(m.weight, m.name.c_str());
      if (quantized) {
        FP8MOE_CHECK(m.scale.defined() && m.scale.numel() == m.spec.numel(), "scale ", m.scale_name, " of ", m.name,
                     ": expected ", m.spec.numel(), " elements for ", m.spec.str(), ", found ",
                     m.scale.defined() ? m.scale.str() : std::string("no scale"));
        check_contiguous(m.scale, m.scale_name.c_str());
      } else {
        FP8MOE_CHECK(!m.scale.defined(), "tensor ", m.name, " is ", dtype_name(m.weight.dtype), " but has a scale ",
                     m.scale_name);
      }
    }
  }

  // The stacked spec: per-part grids for tensor and block (segments), plain concatenation for the
  // row-wise schemes (channel, group), whose rows are independent anyway.
  ScaleSpec spec = rs;
  spec.rows = N;
  spec.segments = 1;
  if (P > 1 && (rs.kind == ScaleKind::Tensor || rs.kind == ScaleKind::Block)) {
    for (int64_t p = 1; p < P; ++p)
      FP8MOE_CHECK(part_rows[p] == part_rows[0], what, ": per-part scale grids need equal parts, found ",
                   part_rows[0], " and ", part_rows[p], " rows");
    spec.segments = P;
  }
  if (rs.kind == ScaleKind::Tensor) spec.block_n = spec.seg_rows();
  spec.validate(what.c_str());

  QuantWeights out;
  out.spec = spec;
  out.data = Tensor(ref.weight.dtype, Shape{E, N, K});  // [E, N, K]
  const int64_t esz = dtype_size(ref.weight.dtype);
  if (quantized) out.scale = Tensor(DType::F32, Shape{E, spec.scale_rows(), spec.grid_k()});  // [E, rows, cols]
  auto* dst = static_cast<unsigned char*>(out.data.data());
  float* sdst = quantized ? out.scale.ptr<float>() : nullptr;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t p = 0; p < P; ++p) {
      const StoredMatrix& m = experts[e][p];
      const int64_t bytes = m.spec.rows * K * esz;
      std::memcpy(dst, m.weight.data, static_cast<size_t>(bytes));
      dst += bytes;
      if (quantized) {
        convert_scales(sdst, m.scale_name, m.scale, 0, m.spec.numel());
        sdst += m.spec.numel();
      }
    }
  }
  return out;
}

QuantWeights copy_stacked(const std::string& name, const TensorView& data, const std::string& scale_name,
                          const TensorView& scale, const ScaleSpec& spec) {
  spec.validate(name.c_str());
  FP8MOE_CHECK(data.rank() == 3 && data.size(1) == spec.rows && data.size(2) == spec.cols, "tensor ", name,
               ": expected [E, ", spec.rows, ", ", spec.cols, "], found ", data.str());
  check_contiguous(data, name.c_str());
  const bool quantized = spec.kind != ScaleKind::None;
  check_plain_or_fp8(data, name, quantized);
  const int64_t E = data.size(0);
  QuantWeights out;
  out.spec = spec;
  out.data = Tensor(data.dtype, data.shape);  // [E, N, K]
  std::memcpy(out.data.data(), data.data, static_cast<size_t>(data.nbytes()));
  if (quantized) {
    const int64_t count = checked::mul(E, spec.numel(), "scale ", scale_name, " of ", name, ": E x scales per expert");
    FP8MOE_CHECK(scale.defined() && scale.numel() == count, "scale ", scale_name, " of ", name,
                 ": expected ", E, " x ", spec.numel(), " elements for ", spec.str(), ", found ",
                 scale.defined() ? scale.str() : std::string("no scale"));
    check_contiguous(scale, scale_name.c_str());
    out.scale = Tensor(DType::F32, Shape{E, spec.scale_rows(), spec.grid_k()});  // [E, rows, cols]
    convert_scales(out.scale.ptr<float>(), scale_name, scale, 0, count);
  } else {
    FP8MOE_CHECK(!scale.defined(), "tensor ", name, " is ", dtype_name(data.dtype), " but has a scale ", scale_name);
  }
  return out;
}

QuantWeights transpose_stacked(const std::string& name, const TensorView& data, const std::string& scale_name,
                               const TensorView& scale, const ScaleSpec& spec) {
  spec.validate(name.c_str());
  FP8MOE_CHECK(spec.segments == 1, name, ": a transposed stack has one scale grid per expert, found ", spec.str());
  const int64_t N = spec.rows, K = spec.cols;
  FP8MOE_CHECK(data.rank() == 3 && data.size(1) == K && data.size(2) == N, "tensor ", name,
               ": expected the transposed layout [E, ", K, ", ", N, "], found ", data.str());
  check_contiguous(data, name.c_str());
  const bool quantized = spec.kind != ScaleKind::None;
  check_plain_or_fp8(data, name, quantized);
  const int64_t E = data.size(0);
  const int64_t esz = dtype_size(data.dtype);

  QuantWeights out;
  out.spec = spec;
  out.data = Tensor(data.dtype, Shape{E, N, K});  // [E, N, K]
  const auto* src = static_cast<const unsigned char*>(data.data);
  auto* dst = static_cast<unsigned char*>(out.data.data());
  // 32 x 32 tiles keep both the reads and the writes cache-friendly.
  constexpr int64_t kTile = 32;
  for (int64_t e = 0; e < E; ++e) {
    const unsigned char* s = src + e * K * N * esz;  // [K, N]
    unsigned char* d = dst + e * N * K * esz;        // [N, K]
    for (int64_t k0 = 0; k0 < K; k0 += kTile)
      for (int64_t n0 = 0; n0 < N; n0 += kTile)
        for (int64_t k = k0; k < std::min(K, k0 + kTile); ++k)
          for (int64_t n = n0; n < std::min(N, n0 + kTile); ++n)
            std::memcpy(d + (n * K + k) * esz, s + (k * N + n) * esz, static_cast<size_t>(esz));
  }
  if (quantized) {
    const int64_t gr = spec.scale_rows(), gc = spec.grid_k();  // their product fits: spec.validate
    const int64_t count = checked::mul(E, gr * gc, "scale ", scale_name, " of ", name, ": E x scales per expert");
    FP8MOE_CHECK(scale.defined() && scale.numel() == count, "scale ", scale_name, " of ", name, ": expected ", E,
                 " x ", gc, " x ", gr, " elements (stored orientation) for ", spec.str(), ", found ",
                 scale.defined() ? scale.str() : std::string("no scale"));
    check_contiguous(scale, scale_name.c_str());
    // Stored grid [gc, gr] per expert -> canonical [gr, gc].
    std::vector<float> stored(static_cast<size_t>(gr * gc));
    out.scale = Tensor(DType::F32, Shape{E, gr, gc});  // [E, rows, cols]
    float* sd = out.scale.ptr<float>();
    for (int64_t e = 0; e < E; ++e) {
      convert_scales(stored.data(), scale_name, scale, e * gr * gc, gr * gc);
      for (int64_t i = 0; i < gr; ++i)
        for (int64_t j = 0; j < gc; ++j) sd[(e * gr + i) * gc + j] = stored[static_cast<size_t>(j * gr + i)];
    }
  } else {
    FP8MOE_CHECK(!scale.defined(), "tensor ", name, " is ", dtype_name(data.dtype), " but has a scale ", scale_name);
  }
  return out;
}

Tensor to_f32(const std::string& name, const TensorView& t) {
  check_dtype(t, name.c_str(), {DType::F32, DType::BF16, DType::F16});
  check_contiguous(t, name.c_str());
  Tensor out(DType::F32, t.shape);
  float* d = out.ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = load_as_double(t.data, t.dtype, i);
    FP8MOE_CHECK(std::isfinite(v), "tensor ", name, ": element ", i, " is ", v, "; expected finite values");
    d[i] = static_cast<float>(v);
  }
  return out;
}

}  // namespace fp8moe::model

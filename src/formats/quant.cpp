// Scale specs, quantized-tensor checks and the host quantizers / dequantizer.
//
// The quantizers reproduce what PyTorch producers write: per block, amax in fp32, scale =
// amax / max_code in fp32, codes = (w.float() / scale).clamp(-max, max).to(float8). They are the
// reference the GPU paths are checked against, so they favour clarity over speed.
#include "fp8moe/quant.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "formats/checked.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/fp8.hpp"

namespace fp8moe {

namespace {

// Smallest positive normal fp32. A block whose amax / max_code falls below it (an all-zero block
// above all) gets this scale: nothing divides by zero, zeros stay exact zeros (0 / s = 0), and the
// block's codes simply do not reach max_code.
constexpr float kMinScale = std::numeric_limits<float>::min();

float block_scale(float amax, float max_code) { return std::max(amax / max_code, kMinScale); }

// Element offset of (i, j, l) in a rank-3 view, honouring its strides.
int64_t offset3(const TensorView& t, int64_t i, int64_t j, int64_t l) {
  return i * t.strides[0] + j * t.strides[1] + l * t.strides[2];
}
int64_t offset2(const TensorView& t, int64_t i, int64_t j) { return i * t.strides[0] + j * t.strides[1]; }

// Reads element `off` as the fp32 value a producer computes with (`w.float()`), rejecting
// non-finite inputs: an inf or NaN would poison its whole block's scale silently.
float load_finite_float(const TensorView& t, int64_t off, const char* what) {
  const float v = static_cast<float>(load_as_double(t.data, t.dtype, off));
  FP8MOE_CHECK(std::isfinite(v), what, " ", t.str(), ": element at offset ", off, " is ", v,
               " as fp32; only finite values can be quantized");
  return v;
}

}  // namespace

const char* scale_kind_name(ScaleKind k) {
  switch (k) {
    case ScaleKind::None: return "none";
    case ScaleKind::Tensor: return "tensor";
    case ScaleKind::Channel: return "channel";
    case ScaleKind::Block: return "block";
    case ScaleKind::Group: return "group";
  }
  FP8MOE_FAIL("unknown scale kind code ", static_cast<int>(k));
}

void ScaleSpec::validate(const char* what) const {
  FP8MOE_CHECK(rows >= 0 && cols >= 0, what, ": scale spec ", str(), " has a negative matrix shape [", rows, ", ",
               cols, "]");
  FP8MOE_CHECK(segments >= 1, what, ": scale spec ", str(), " needs at least one row segment, found ", segments);
  FP8MOE_CHECK(rows % segments == 0, what, ": scale spec ", str(), ": ", rows, " rows do not split into ", segments,
               " equal segments");
  FP8MOE_CHECK(block_n >= 1 && block_k >= 1, what, ": scale spec ", str(), " needs positive block extents, found ",
               block_n, "x", block_k);
  // The grid arithmetic (ceil-divisions, the scale count) must stay inside int64.
  checked::add(seg_rows(), block_n - 1, what, ": scale spec ", str(), ": rows + block height");
  checked::add(cols, block_k - 1, what, ": scale spec ", str(), ": cols + block width");
  checked::mul(scale_rows(), grid_k(), what, ": scale spec ", str(), ": the scale count");
}

std::string ScaleSpec::str() const {
  std::ostringstream os;
  os << scale_kind_name(kind);
  if (kind == ScaleKind::Block) os << ' ' << block_n << 'x' << block_k;
  if (kind == ScaleKind::Group) os << ' ' << block_k;
  if (segments != 1) os << " (" << segments << " segments)";
  return os.str();
}

double QuantTensor::at(int64_t e, int64_t n, int64_t k) const {
  FP8MOE_CHECK(data.device == Device::CPU, "QuantTensor::at reads host memory, data is ", data.str());
  FP8MOE_CHECK(e >= 0 && e < data.size(0) && n >= 0 && n < data.size(1) && k >= 0 && k < data.size(2),
               "QuantTensor::at(", e, ", ", n, ", ", k, ") is outside ", data.str());
  const double v = load_as_double(data.data, data.dtype, offset3(data, e, n, k));
  if (!quantized()) return v;
  const int64_t idx = spec.index(n, k);  // into the [scale_rows, grid_k] grid of expert e
  const int64_t gk = spec.grid_k();
  const double s = load_as_double(scale.data, scale.dtype, offset3(scale, e, idx / gk, idx % gk));
  return v * s;  // exact: a 4-bit code times a 24-bit scale fits a double
}

void QuantTensor::validate(const char* name) const {
  spec.validate(name);
  FP8MOE_CHECK(data.defined() && data.rank() == 3, name, ": expected data [E, N, K], found ",
               data.defined() ? data.str() : std::string("no tensor"));
  FP8MOE_CHECK(data.size(1) == spec.rows && data.size(2) == spec.cols, name, ": data ", data.str(),
               " does not match the scale spec's matrix [", spec.rows, ", ", spec.cols, "]");
  if (!quantized()) {
    FP8MOE_CHECK(data.dtype == DType::BF16 || data.dtype == DType::F16 || data.dtype == DType::F32 ||
                     data.dtype == DType::F64,
                 name, ": unquantized data must be BF16/F16/F32/F64, found ", data.str(),
                 (is_fp8(data.dtype) ? " (an FP8 weight needs a scale)" : ""));
    FP8MOE_CHECK(!scale.defined(), name, ": unquantized data ", data.str(), " must not carry a scale, found ",
                 scale.str());
    return;
  }
  FP8MOE_CHECK(is_fp8(data.dtype), name, ": quantized (", spec.str(), ") data must be F8_E4M3 or F8_E5M2, found ",
               data.str());
  FP8MOE_CHECK(scale.defined(), name, ": quantized (", spec.str(), ") data ", data.str(), " has no scale tensor");
  FP8MOE_CHECK(scale.dtype == DType::F32, name, ": scale must be F32, found ", scale.str());
  const Shape expected{data.size(0), spec.scale_rows(), spec.grid_k()};
  FP8MOE_CHECK(scale.shape == expected, name, ": scale for ", spec.str(), " on data ", data.str(), " must be ",
               expected.str(), ", found ", scale.str());
  FP8MOE_CHECK(scale.device == data.device, name, ": scale ", scale.str(), " is not on the device of data ",
               data.str());
}

QuantWeights quantize(const TensorView& w, const ScaleSpec& spec, DType dtype) {
  spec.validate("quantize");
  FP8MOE_CHECK(spec.kind != ScaleKind::None, "quantize: the scale spec must name a scheme, found ", spec.str());
  FP8MOE_CHECK(is_fp8(dtype), "quantize: target dtype must be F8_E4M3 or F8_E5M2, found ", dtype_name(dtype));
  FP8MOE_CHECK(w.device == Device::CPU, "quantize runs on the host, input is ", w.str());
  FP8MOE_CHECK(w.rank() == 3 && w.size(1) == spec.rows && w.size(2) == spec.cols,
               "quantize: input must be [E, ", spec.rows, ", ", spec.cols, "] for ", spec.str(), ", found ", w.str());
  check_dtype(w, "quantize input", {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2});

  const bool e5m2 = dtype == DType::F8_E5M2;
  const float max_code = fp8_max(e5m2);
  const int64_t E = w.size(0);
  QuantWeights q;
  q.spec = spec;
  q.data = Tensor(dtype, {E, spec.rows, spec.cols});                 // [E, N, K] codes
  q.scale = Tensor(DType::F32, {E, spec.scale_rows(), spec.grid_k()});  // [E, scale_rows, grid_k]
  auto* codes = q.data.ptr<uint8_t>();
  auto* scales = q.scale.ptr<float>();

  const int64_t seg_rows = spec.seg_rows();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t seg = 0; seg < spec.segments; ++seg)
      for (int64_t bn = 0; bn < spec.grid_n(); ++bn)
        for (int64_t bk = 0; bk < spec.grid_k(); ++bk) {
          // Block rows [n0, n1) (never past its segment) and columns [k0, k1); edge blocks are partial.
          const int64_t n0 = seg * seg_rows + bn * spec.block_n;
          const int64_t n1 = std::min(n0 + spec.block_n, (seg + 1) * seg_rows);
          const int64_t k0 = bk * spec.block_k;
          const int64_t k1 = std::min(k0 + spec.block_k, spec.cols);
          float amax = 0.0f;
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = k0; k < k1; ++k)
              amax = std::max(amax, std::fabs(load_finite_float(w, offset3(w, e, n, k), "quantize input")));
          const float s = block_scale(amax, max_code);
          scales[(e * spec.scale_rows() + seg * spec.grid_n() + bn) * spec.grid_k() + bk] = s;
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = k0; k < k1; ++k) {
              const float v = static_cast<float>(load_as_double(w.data, w.dtype, offset3(w, e, n, k)));
              codes[(e * spec.rows + n) * spec.cols + k] = encode_fp8_sat(v / s, e5m2);  // fp32 divide, as torch
            }
        }
  return q;
}

Tensor dequantize(const QuantTensor& q, DType out_dtype) {
  q.validate("dequantize input");
  FP8MOE_CHECK(q.data.device == Device::CPU, "dequantize runs on the host, data is ", q.data.str());
  FP8MOE_CHECK(out_dtype == DType::BF16 || out_dtype == DType::F16 || out_dtype == DType::F32 ||
                   out_dtype == DType::F64,
               "dequantize: output dtype must be BF16/F16/F32/F64, found ", dtype_name(out_dtype));
  const int64_t E = q.data.size(0), N = q.spec.rows, K = q.spec.cols;
  Tensor out(out_dtype, {E, N, K});  // [E, N, K]
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) store_from_double(out.data(), out_dtype, (e * N + n) * K + k, q.at(e, n, k));
  return out;
}

void quantize_activations(const TensorView& x, int64_t group, const TensorView& codes, const TensorView& scales) {
  FP8MOE_CHECK(x.rank() == 2, "quantize_activations: x must be [M, K], found ", x.str());
  FP8MOE_CHECK(group >= 0, "quantize_activations: group must be 0 (per row) or positive, found ", group);
  check_dtype(x, "quantize_activations x", {DType::F64, DType::F32, DType::F16, DType::BF16});
  check_dtype(codes, "quantize_activations codes", {DType::F8_E4M3, DType::F8_E5M2});
  check_dtype(scales, "quantize_activations scales", {DType::F32});
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t g = group == 0 ? std::max<int64_t>(K, 1) : group;  // per row: one group spanning K
  const int64_t groups = group == 0 ? 1 : (K + g - 1) / g;
  check_shape(codes, "quantize_activations codes", {M, K});
  check_shape(scales, "quantize_activations scales", {M, groups});
  for (const TensorView* t : {&x, &codes, &scales})
    FP8MOE_CHECK(t->device == Device::CPU, "quantize_activations runs on the host, found ", t->str());

  const bool e5m2 = codes.dtype == DType::F8_E5M2;
  const float max_code = fp8_max(e5m2);
  auto* c = codes.ptr<uint8_t>();
  auto* s = scales.ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t k0 = j * g, k1 = std::min(k0 + g, K);  // last group may be partial
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k)
        amax = std::max(amax, std::fabs(load_finite_float(x, offset2(x, m, k), "quantize_activations x")));
      const float sc = block_scale(amax, max_code);
      s[offset2(scales, m, j)] = sc;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = static_cast<float>(load_as_double(x.data, x.dtype, offset2(x, m, k)));
        c[offset2(codes, m, k)] = encode_fp8_sat(v / sc, e5m2);
      }
    }
}

}  // namespace fp8moe

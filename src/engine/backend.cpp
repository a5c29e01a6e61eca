// Backend selection and the checks on the layer's weights and adapters, shared by every backend.
#include "fp8moe/backend.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <mutex>

#include "engine/layer_parts.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

Tensor Backend::upload(const TensorView& host) {
  FP8MOE_CHECK(host.device == Device::CPU, "upload: source must be host memory, found ", host.str());
  Tensor t = empty(host.dtype, host.shape);
  copy(t, host);
  return t;
}

const char* gemm_precision_name(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::W8A16: return "w8a16";
    case GemmPrecision::W8A8: return "w8a8";
    case GemmPrecision::W8A8Down: return "w8a8-down";
  }
  return "?";
}

GemmPrecision parse_gemm_precision(const std::string& s) {
  std::string l = s;
  for (char& c : l) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (l == "w8a16") return GemmPrecision::W8A16;
  if (l == "w8a8") return GemmPrecision::W8A8;
  if (l == "w8a8-down") return GemmPrecision::W8A8Down;
  FP8MOE_FAIL("GEMM precision '", s, "' is not one of: w8a16 (precise, the default), w8a8 (fast, Hopper), ",
              "w8a8-down (W8A8 on the experts' down projection only)");
}

void check_fp8_rows(const Fp8Rows& f, const std::string& what, int64_t rows, int64_t cols, Device dev) {
  const std::pair<const TensorView*, const char*> parts[] = {{&f.codes, " codes"}, {&f.scales, " scales"}};
  for (const auto& [t, part] : parts) {
    const std::string name = what + part;
    FP8MOE_CHECK(t->defined(), "tensor ", name, ": missing (codes and scales go together)");
    FP8MOE_CHECK(t->device == dev, "tensor ", name, ": expected it on the device ", engine::device_name(dev), ", found ", t->str());
    check_contiguous(*t, name.c_str());
  }
  check_dtype(f.codes, (what + " codes").c_str(), {DType::F8_E4M3});
  check_shape(f.codes, (what + " codes").c_str(), {rows, cols});
  check_dtype(f.scales, (what + " scales").c_str(), {DType::F32});
  check_shape(f.scales, (what + " scales").c_str(), {rows, (cols + kFp8RowGroup - 1) / kFp8RowGroup});
}

void Backend::set_gemm_precision(GemmPrecision p) {
  FP8MOE_CHECK(p == GemmPrecision::W8A16, "the ", name(), " backend has no W8A8 path (it runs the W8A16 GEMMs only; ",
               gemm_precision_name(p), " asked)");
}

void Backend::set_allocator(Allocator* a) {
  FP8MOE_CHECK(a == nullptr || a->device() == device(), "Backend::set_allocator: the allocator serves ",
               a && a->device() == Device::CUDA ? "the GPU" : "the host", " but the backend '", name(), "' runs on ",
               device() == Device::CUDA ? "the GPU" : "the host");
  installed_ = a;
}

ExecutionScope::ExecutionScope(Backend& be, void* stream, Allocator* alloc)
    : be_(be), prev_stream_(be.stream()), prev_alloc_(be.installed_allocator()) {
  be.set_allocator(alloc);
  be.set_stream(stream);
}

ExecutionScope::~ExecutionScope() {
  be_.set_stream(prev_stream_);
  be_.set_allocator(prev_alloc_);
}

void provide_plan_tensors(RoutingPlan& plan, int64_t tokens, int64_t top_k, int64_t experts, Allocator& alloc) {
  const int64_t M = tokens * top_k;
  plan.tokens = tokens;
  plan.top_k = top_k;
  plan.experts = experts;
  plan.offsets = provided_or_new(plan.offsets, "plan offsets", DType::I32, {experts + 1}, alloc);      // [E + 1]
  plan.sorted_pairs = provided_or_new(plan.sorted_pairs, "plan sorted_pairs", DType::I32, {M}, alloc);  // [M]
  plan.row_of_pair = provided_or_new(plan.row_of_pair, "plan row_of_pair", DType::I32, {M}, alloc);     // [M]
  plan.schedule = Tensor();
}

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") return make_cuda_backend();
  if (name == "auto") {
    const bool cuda = cuda_available();
    static std::once_flag said;
    std::call_once(said, [cuda] {
      std::fprintf(stderr, "fp8moe: backend auto -> %s\n", cuda ? "cuda (a GPU is present)" : "cpu (no usable GPU)");
    });
    return cuda ? make_cuda_backend() : make_cpu_backend();
  }
  FP8MOE_FAIL("unknown backend '", name, "': valid names are cpu, cuda, auto");
}

const char* router_kind_name(RouterKind k) {
  switch (k) {
    case RouterKind::SoftmaxTopK: return "softmax_topk";
    case RouterKind::SigmoidBiasTopK: return "sigmoid_bias_topk";
    case RouterKind::TopKSoftmax: return "topk_softmax";
  }
  FP8MOE_FAIL("unknown router kind code ", static_cast<int>(k));
}

namespace {
// An optional per-expert vector [E, n] (bias) or a LoRA factor: float, on the weights' device.
void check_param(const TensorView& t, const char* name, const Shape& shape, Device device) {
  check_shape(t, name, shape);
  FP8MOE_CHECK(is_float(t.dtype) && !is_fp8(t.dtype), "tensor ", name, ": expected BF16/F16/F32/F64, found ", t.str());
  FP8MOE_CHECK(t.device == device, "tensor ", name, ": expected it on the experts' device (",
               device == Device::CUDA ? "cuda" : "cpu", "), found ", t.str());
}
}  // namespace

void ExpertWeights::validate() const {
  gate_up.validate("experts gate_up");
  down.validate("experts down");
  const int64_t E = gate_up.data.size(0), two_i = gate_up.data.size(1), H = gate_up.data.size(2);
  FP8MOE_CHECK(E >= 1, "experts gate_up ", gate_up.data.str(), ": needs at least one expert");
  FP8MOE_CHECK(two_i % 2 == 0, "experts gate_up ", gate_up.data.str(), ": expected [E, 2I, H] with an even row count (gate and up), found ",
               two_i, " rows");
  const int64_t I = two_i / 2;
  FP8MOE_CHECK(down.data.shape == Shape({E, H, I}), "experts down: expected [E, H, I] = ", Shape({E, H, I}).str(),
               " to match gate_up ", gate_up.data.str(), ", found ", down.data.str());
  const Device dev = gate_up.data.device;
  FP8MOE_CHECK(down.data.device == dev, "experts down ", down.data.str(), " is not on the device of gate_up ",
               gate_up.data.str());
  if (gate_up_bias.defined()) check_param(gate_up_bias, "experts gate_up_bias", {E, two_i}, dev);
  if (down_bias.defined()) check_param(down_bias, "experts down_bias", {E, H}, dev);
  if (act.kind == Activation::GptOssGlu)
    FP8MOE_CHECK(act.limit > 0 && act.alpha > 0, "experts activation gpt_oss_glu: alpha and limit must be positive, found alpha ",
                 act.alpha, ", limit ", act.limit);
}

void LoraAdapters::validate(const ExpertWeights& w) const {
  const int64_t E = w.experts(), H = w.hidden(), I = w.intermediate();
  const Device dev = w.gate_up.data.device;
  FP8MOE_CHECK(gate_up_A.defined() == gate_up_B.defined(), "lora gate_up: A and B must be given together (A ",
               gate_up_A.defined() ? "given" : "missing", ", B ", gate_up_B.defined() ? "given" : "missing", ")");
  FP8MOE_CHECK(down_A.defined() == down_B.defined(), "lora down: A and B must be given together (A ",
               down_A.defined() ? "given" : "missing", ", B ", down_B.defined() ? "given" : "missing", ")");
  if (has_gate_up()) {
    FP8MOE_CHECK(gate_up_A.rank() == 3, "tensor lora gate_up_A: expected [E, r, H], found ", gate_up_A.str());
    const int64_t r = gate_up_A.size(1);
    check_param(gate_up_A, "lora gate_up_A", {E, r, H}, dev);
    check_param(gate_up_B, "lora gate_up_B", {E, 2 * I, r}, dev);
  }
  if (has_down()) {
    FP8MOE_CHECK(down_A.rank() == 3, "tensor lora down_A: expected [E, r, I], found ", down_A.str());
    const int64_t r = down_A.size(1);
    check_param(down_A, "lora down_A", {E, r, I}, dev);
    check_param(down_B, "lora down_B", {E, H, r}, dev);
  }
  FP8MOE_CHECK(std::isfinite(scaling), "lora scaling must be finite, found ", scaling);
}

}  // namespace fp8moe

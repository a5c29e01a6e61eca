// fp8moe._C: the Python binding. It registers functions only: tensors cross as DLPack (nanobind
// ndarrays), each call is turned into the engine's problem structs, and every error becomes a
// Python exception carrying the engine's message. No framework header appears here: the binding
// serves any torch version (and any other DLPack producer).
//
// Memory rule (docs/python.md): torch owns every buffer of the binding path. Buffers that outlive a
// call (what forward saves for backward) are allocated by the caller from the layout the
// *_saved_layout queries describe and passed in; temporaries inside a call come from `alloc`, a
// pair of Python callables over torch's caching allocator (PyAllocator below). Work is queued on
// the caller's stream; nothing synchronises with the host.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "fp8moe/backend.hpp"
#include "fp8moe/checkpoint.hpp"
#include "fp8moe/convert.hpp"
#include "fp8moe/error.hpp"
#include "fp8moe/linear.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"

namespace nb = nanobind;
using namespace fp8moe;

namespace {

// ---- DLPack <-> TensorView

constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3;

DType dtype_of(const nb::dlpack::dtype& d, const std::string& name) {
  using C = nb::dlpack::dtype_code;
  const auto code = static_cast<C>(d.code);
  FP8MOE_CHECK(d.lanes == 1, "tensor ", name, ": vector dtypes (lanes ", d.lanes, ") are not supported");
  switch (code) {
    case C::Float:
      if (d.bits == 16) return DType::F16;
      if (d.bits == 32) return DType::F32;
      if (d.bits == 64) return DType::F64;
      break;
    case C::Bfloat:
      if (d.bits == 16) return DType::BF16;
      break;
    case C::Int:
      if (d.bits == 8) return DType::I8;
      if (d.bits == 16) return DType::I16;
      if (d.bits == 32) return DType::I32;
      if (d.bits == 64) return DType::I64;
      break;
    case C::UInt:
      if (d.bits == 8) return DType::U8;
      break;
    case C::Bool: return DType::BOOL;
    case C::Float8_E4M3FN: return DType::F8_E4M3;
    case C::Float8_E5M2: return DType::F8_E5M2;
    default: break;
  }
  FP8MOE_FAIL("tensor ", name, ": unsupported dtype (DLPack code ", int(d.code), ", ", int(d.bits), " bits)");
}

nb::dlpack::dtype dl_dtype(DType t) {
  using C = nb::dlpack::dtype_code;
  const auto make = [](C c, int bits) { return nb::dlpack::dtype{static_cast<uint8_t>(c), static_cast<uint8_t>(bits), 1}; };
  switch (t) {
    case DType::F16: return make(C::Float, 16);
    case DType::F32: return make(C::Float, 32);
    case DType::F64: return make(C::Float, 64);
    case DType::BF16: return make(C::Bfloat, 16);
    case DType::I8: return make(C::Int, 8);
    case DType::I16: return make(C::Int, 16);
    case DType::I32: return make(C::Int, 32);
    case DType::I64: return make(C::Int, 64);
    case DType::U8: return make(C::UInt, 8);
    case DType::BOOL: return make(C::Bool, 8);
    // FP8 codes cross as bytes: the binding's Python side keeps them in uint8 tensors, which no
    // dtype cast (model.to(dtype), autocast) ever touches, and names the format beside them.
    case DType::F8_E4M3:
    case DType::F8_E5M2: return make(C::UInt, 8);
    default: FP8MOE_FAIL("dtype ", dtype_name(t), " cannot cross to Python");
  }
}

TensorView view_of(const nb::ndarray<>& a, const std::string& name) {
  TensorView v;
  v.data = static_cast<char*>(a.data_handle()) + a.byte_offset();
  v.dtype = dtype_of(a.dtype(), name);
  const int dev = a.device_type();
  FP8MOE_CHECK(dev == kDLCPU || dev == kDLCUDA || dev == kDLCUDAHost, "tensor ", name,
               ": expected host or CUDA memory, found DLPack device type ", dev);
  v.device = dev == kDLCUDA ? Device::CUDA : Device::CPU;
  FP8MOE_CHECK(a.ndim() <= static_cast<size_t>(kMaxRank), "tensor ", name, ": rank ", a.ndim(), " exceeds ", kMaxRank);
  v.shape.rank = static_cast<int>(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    v.shape.dims[i] = static_cast<int64_t>(a.shape(i));
    v.strides[i] = a.stride_ptr() ? a.stride(i) : 0;
  }
  if (!a.stride_ptr()) v = TensorView(v.data, v.dtype, v.shape, v.device);  // compact row-major
  return v;
}

// None -> an absent view; otherwise the array's view.
TensorView opt_view(nb::handle h, const std::string& name) {
  if (!h.is_valid() || h.is_none()) return TensorView();
  return view_of(nb::cast<nb::ndarray<>>(h), name);
}

// FP8 codes arrive as bytes; `code` says which format (0: the array is a plain weight).
TensorView codes_view(nb::handle h, int64_t code, const std::string& name) {
  TensorView v = opt_view(h, name);
  if (code == 0 || !v.defined()) return v;
  FP8MOE_CHECK(v.dtype == DType::U8, "tensor ", name, ": FP8 codes are expected as uint8 bytes, found ", v.str());
  FP8MOE_CHECK(code == 1 || code == 2, "tensor ", name, ": unknown FP8 format code ", code, " (1: E4M3, 2: E5M2)");
  v.dtype = code == 1 ? DType::F8_E4M3 : DType::F8_E5M2;
  return v;
}

int64_t code_of(DType t) { return t == DType::F8_E4M3 ? 1 : t == DType::F8_E5M2 ? 2 : 0; }

// An owning host tensor -> an ndarray that keeps it alive (torch.from_dlpack takes it as is).
nb::ndarray<> host_array(Tensor t) {
  auto* keep = new Tensor(std::move(t));
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  std::vector<size_t> shape(keep->shape().rank);
  for (int i = 0; i < keep->shape().rank; ++i) shape[i] = static_cast<size_t>(keep->shape()[i]);
  // A zero-size tensor has no storage; DLPack still wants a non-null pointer.
  static char empty_anchor[16];
  void* data = keep->data() ? keep->data() : empty_anchor;
  return nb::ndarray<>(data, shape.size(), shape.data(), owner, nullptr, dl_dtype(keep->dtype()), kDLCPU, 0);
}

// ---- scale specs as int lists: [kind, rows, cols, segments, block_n, block_k]

std::vector<int64_t> spec_list(const ScaleSpec& s) {
  return {static_cast<int64_t>(s.kind), s.rows, s.cols, s.segments, s.block_n, s.block_k};
}

ScaleSpec spec_from(const std::vector<int64_t>& v, size_t at, const std::string& name) {
  FP8MOE_CHECK(v.size() >= at + 6, "scale spec of ", name, ": expected 6 integers, found ", v.size() - at);
  FP8MOE_CHECK(v[at] >= 0 && v[at] <= static_cast<int64_t>(ScaleKind::Group), "scale spec of ", name,
               ": unknown scale kind ", v[at]);
  ScaleSpec s{static_cast<ScaleKind>(v[at]), v[at + 1], v[at + 2], v[at + 3], v[at + 4], v[at + 5]};
  s.validate(name.c_str());
  return s;
}

QuantTensor quant_of(nb::handle codes, nb::handle scale, const std::vector<int64_t>& spec, size_t at, int64_t code,
                     const std::string& name) {
  QuantTensor q;
  q.spec = spec_from(spec, at, name);
  q.data = codes_view(codes, q.spec.kind == ScaleKind::None ? 0 : code, name);
  q.scale = opt_view(scale, name + " scale");
  q.validate(name.c_str());
  return q;
}

// ---- memory: temporaries from torch's caching allocator

// `alloc` is a pair (allocate(nbytes, stream) -> address, free(address)): torch's raw caching
// allocator entry points where this torch has them (no tensor object per block), else a Python
// stand-in over torch.empty (_engine.py). Blocks belong to the call's stream, so a block freed
// mid-call is reused in stream order. Called with the GIL held (the engine runs inside the
// binding call); whatever the engine has not freed when the call ends (an error part way) is
// freed then.
class PyAllocator final : public Allocator {
 public:
  PyAllocator(const nb::tuple& fns, uintptr_t stream, Device device)
      : alloc_(nb::borrow<nb::callable>(fns[0])), free_(nb::borrow<nb::callable>(fns[1])), stream_(stream),
        device_(device) {}
  PyAllocator(const PyAllocator&) = delete;
  PyAllocator& operator=(const PyAllocator&) = delete;
  ~PyAllocator() override {
    for (void* p : live_) release(p);
  }
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;  // no block: the engine never dereferences an empty tensor
    void* p = reinterpret_cast<void*>(nb::cast<uintptr_t>(alloc_(bytes, stream_)));
    FP8MOE_CHECK(p != nullptr, "allocator returned a null block for ", bytes, " bytes");
    live_.insert(p);
    return p;
  }
  void deallocate(void* p) noexcept override {
    if (p != nullptr && live_.erase(p) != 0) release(p);
  }
  Device device() const override { return device_; }

 private:
  void release(void* p) noexcept {
    try {
      free_(reinterpret_cast<uintptr_t>(p));
    } catch (...) {  // cannot throw from a free: the block stays with torch's allocator
    }
  }
  nb::callable alloc_, free_;
  uintptr_t stream_;
  Device device_;
  std::unordered_set<void*> live_;
};

// One backend per device. The CUDA backend's stream and allocator are set per call.
class Engine {
 public:
  Engine(const std::string& device, int index) {
    if (device == "cpu") {
      be_ = make_cpu_backend();
    } else {
      FP8MOE_CHECK(device == "cuda", "Engine: device must be 'cpu' or 'cuda', found '", device, "'");
      be_ = make_cuda_backend(index, nullptr);
    }
  }
  Backend& backend() { return *be_; }
  std::string device() const { return be_->device() == Device::CUDA ? "cuda" : "cpu"; }
  // Raises the faults kernels could only count (expert ids outside [0, E)); synchronises.
  void check() { be_->synchronize(); }

 private:
  std::unique_ptr<Backend> be_;
};

// Stream and allocator of one call. On the CPU the backend's own host allocator serves.
class CallScope {
  static nb::tuple checked_pair(nb::handle alloc) {
    FP8MOE_CHECK(nb::isinstance<nb::tuple>(alloc) && nb::len(alloc) == 2 && PyCallable_Check(alloc[0].ptr()) &&
                     PyCallable_Check(alloc[1].ptr()),
                 "alloc: expected a pair (allocate(nbytes, stream) -> address, free(address)), found ",
                 nb::str(nb::type_name(alloc.type())).c_str());
    return nb::borrow<nb::tuple>(alloc);
  }

 public:
  CallScope(Engine& e, uintptr_t stream, nb::handle alloc)
      : alloc_(alloc.is_none() || e.backend().device() == Device::CPU
                   ? nullptr
                   : std::make_unique<PyAllocator>(checked_pair(alloc), stream, e.backend().device())),
        scope_(e.backend(), reinterpret_cast<void*>(stream), alloc_.get()) {}

 private:
  std::unique_ptr<PyAllocator> alloc_;
  ExecutionScope scope_;
};

std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>> layout_list(const std::vector<BufferSpec>& l) {
  std::vector<std::tuple<std::string, std::string, std::vector<int64_t>>> r;
  for (const BufferSpec& b : l) r.emplace_back(b.name, std::string(dtype_name(b.dtype)), b.shape);
  return r;
}

DType parse_activation(const std::string& name) {
  const auto t = parse_dtype(name);
  FP8MOE_CHECK(t && is_float(*t) && !is_fp8(*t), "activation dtype must be F64, F32, BF16 or F16, found '", name, "'");
  return *t;
}

// Caller buffers (in saved_layout order) -> borrowed tensors.
std::vector<Tensor> borrowed(const nb::list& saved, const std::vector<BufferSpec>& layout, const char* what) {
  FP8MOE_CHECK(nb::len(saved) == layout.size(), what, ": expected ", layout.size(), " saved buffers (",
               layout.size() > 0 ? layout.front().name : std::string(), "...), found ", nb::len(saved));
  std::vector<Tensor> r;
  for (size_t i = 0; i < layout.size(); ++i)
    r.push_back(Tensor::borrow(view_of(nb::cast<nb::ndarray<>>(saved[i]), std::string(what) + " saved " + layout[i].name)));
  return r;
}

// ---- the MoE expert layer

struct MoeCall {
  ExpertWeights w;
  LoraAdapters lora;
  MoeInputs in;
};

// experts: (gate_up codes, gate_up scale, down codes, down scale, gate_up bias, down bias)
// specs:   gate_up spec (6), down spec (6), FP8 format code
// act:     (kind, layout, alpha, limit); lora: (A_gu, B_gu, A_d, B_d), each may be None
MoeCall moe_call(const nb::tuple& inputs, const nb::tuple& experts, const std::vector<int64_t>& specs,
                 const std::vector<double>& act, const nb::tuple& lora, double scaling) {
  FP8MOE_CHECK(nb::len(inputs) == 3 && nb::len(experts) == 6 && specs.size() == 13 && act.size() == 4 && nb::len(lora) == 4,
               "moe call: expected 3 inputs, 6 expert tensors, 13 spec integers, 4 activation values and 4 LoRA "
               "slots; found ", nb::len(inputs), ", ", nb::len(experts), ", ", specs.size(), ", ", act.size(), ", ",
               nb::len(lora));
  MoeCall c;
  c.w.gate_up = quant_of(experts[0], experts[1], specs, 0, specs[12], "experts gate_up");
  c.w.down = quant_of(experts[2], experts[3], specs, 6, specs[12], "experts down");
  c.w.gate_up_bias = opt_view(experts[4], "experts gate_up_bias");
  c.w.down_bias = opt_view(experts[5], "experts down_bias");
  FP8MOE_CHECK(act[0] == 0 || act[0] == 1, "activation kind must be 0 (SiLU-GLU) or 1 (GPT-OSS), found ", act[0]);
  FP8MOE_CHECK(act[1] == 0 || act[1] == 1, "gate/up layout must be 0 (halves) or 1 (interleaved), found ", act[1]);
  c.w.act = {static_cast<Activation>(static_cast<int>(act[0])), static_cast<GateUpLayout>(static_cast<int>(act[1])),
             static_cast<float>(act[2]), static_cast<float>(act[3])};
  c.lora.gate_up_A = opt_view(lora[0], "lora gate_up_A");
  c.lora.gate_up_B = opt_view(lora[1], "lora gate_up_B");
  c.lora.down_A = opt_view(lora[2], "lora down_A");
  c.lora.down_B = opt_view(lora[3], "lora down_B");
  c.lora.scaling = scaling;
  c.in = {opt_view(inputs[0], "hidden_states"), opt_view(inputs[1], "topk_ids"), opt_view(inputs[2], "topk_weights")};
  return c;
}

// The plan's sizes are the batch's (forward fills the tensors; backward reads them back).
MoeSaved moe_saved(const MoeLayer& layer, const MoeInputs& in, const nb::list& saved, const char* what) {
  const std::vector<BufferSpec> layout = layer.saved_layout();
  std::vector<Tensor> t = borrowed(saved, layout, what);
  MoeSaved s;
  s.plan = std::make_shared<RoutingPlan>();
  s.plan->tokens = in.hidden.rank() == 2 ? in.hidden.size(0) : 0;
  s.plan->top_k = in.topk_ids.rank() == 2 ? in.topk_ids.size(1) : 0;
  s.plan->experts = layer.weights().experts();
  s.plan->offsets = t[0];
  s.plan->sorted_pairs = t[1];
  s.plan->row_of_pair = t[2];
  s.h1 = t[3];
  s.act = t[4];
  s.y = t[5];
  size_t i = 6;
  if (layer.lora().has_gate_up()) s.u = t[i++];
  if (layer.lora().has_down()) s.v = t[i++];
  return s;
}

void moe_forward(Engine& e, uintptr_t stream, nb::handle alloc, const nb::tuple& inputs, const nb::tuple& experts,
                 const std::vector<int64_t>& specs, const std::vector<double>& act, const nb::tuple& lora,
                 double scaling, nb::ndarray<> out, std::optional<nb::list> saved) {
  CallScope scope(e, stream, alloc);
  const MoeCall c = moe_call(inputs, experts, specs, act, lora, scaling);
  const MoeLayer layer(e.backend(), c.w, c.lora);
  if (!saved) {
    layer.forward(c.in, view_of(out, "out"));
    return;
  }
  MoeSaved s = moe_saved(layer, c.in, *saved, "moe_forward");
  layer.forward(c.in, view_of(out, "out"), &s);
}

// grads: (hidden, topk_weights, A_gu, B_gu, A_d, B_d), each may be None (not computed)
void moe_backward(Engine& e, uintptr_t stream, nb::handle alloc, const nb::tuple& inputs, const nb::tuple& experts,
                  const std::vector<int64_t>& specs, const std::vector<double>& act, const nb::tuple& lora,
                  double scaling, const nb::list& saved, nb::ndarray<> grad_out, const nb::tuple& grads) {
  CallScope scope(e, stream, alloc);
  const MoeCall c = moe_call(inputs, experts, specs, act, lora, scaling);
  const MoeLayer layer(e.backend(), c.w, c.lora);
  const MoeSaved s = moe_saved(layer, c.in, saved, "moe_backward");
  FP8MOE_CHECK(nb::len(grads) == 6, "moe_backward: expected 6 gradient slots, found ", nb::len(grads));
  MoeGrads g;
  g.hidden = opt_view(grads[0], "grad hidden_states");
  g.topk_weights = opt_view(grads[1], "grad topk_weights");
  g.lora = {opt_view(grads[2], "grad lora gate_up_A"), opt_view(grads[3], "grad lora gate_up_B"),
            opt_view(grads[4], "grad lora down_A"), opt_view(grads[5], "grad lora down_B")};
  layer.backward(c.in, s, view_of(grad_out, "grad_output"), g);
}

// ---- the dense linear

// weight: (codes, scale, bias); spec: 6 integers + FP8 format code; lora: (A, B)
LinearLayer linear_layer(Engine& e, const nb::tuple& weight, const std::vector<int64_t>& spec, const nb::tuple& lora,
                         double scaling) {
  FP8MOE_CHECK(nb::len(weight) == 3 && spec.size() == 7 && nb::len(lora) == 2,
               "linear call: expected 3 weight slots, 7 spec integers and 2 LoRA slots; found ", nb::len(weight), ", ",
               spec.size(), ", ", nb::len(lora));
  LinearWeights w{quant_of(weight[0], weight[1], spec, 0, spec[6], "linear weight"), opt_view(weight[2], "linear bias")};
  LinearLora l{opt_view(lora[0], "linear lora A"), opt_view(lora[1], "linear lora B"), scaling};
  return LinearLayer(e.backend(), w, l);
}

LinearSaved linear_saved(const LinearLayer& layer, const TensorView& x, const nb::list& saved, const char* what) {
  std::vector<Tensor> t = borrowed(saved, layer.saved_layout(), what);
  LinearSaved s;
  s.plan = std::make_shared<RoutingPlan>();
  s.plan->tokens = x.rank() == 2 ? x.size(0) : 0;
  s.plan->top_k = 1;
  s.plan->experts = 1;
  s.plan->offsets = t[0];
  s.plan->sorted_pairs = t[1];
  s.plan->row_of_pair = t[2];
  if (t.size() > 3) s.u = t[3];
  return s;
}

void linear_forward(Engine& e, uintptr_t stream, nb::handle alloc, nb::ndarray<> x, const nb::tuple& weight,
                    const std::vector<int64_t>& spec, const nb::tuple& lora, double scaling, nb::ndarray<> out,
                    std::optional<nb::list> saved) {
  CallScope scope(e, stream, alloc);
  const LinearLayer layer = linear_layer(e, weight, spec, lora, scaling);
  if (!saved) {
    layer.forward(view_of(x, "x"), view_of(out, "out"));
    return;
  }
  const TensorView xv = view_of(x, "x");
  LinearSaved s = linear_saved(layer, xv, *saved, "linear_forward");
  layer.forward(xv, view_of(out, "out"), &s);
}

// grads: (input, A, B), each may be None
void linear_backward(Engine& e, uintptr_t stream, nb::handle alloc, nb::ndarray<> x, const nb::tuple& weight,
                     const std::vector<int64_t>& spec, const nb::tuple& lora, double scaling, const nb::list& saved,
                     nb::ndarray<> grad_out, const nb::tuple& grads) {
  CallScope scope(e, stream, alloc);
  const LinearLayer layer = linear_layer(e, weight, spec, lora, scaling);
  const TensorView xv = view_of(x, "x");
  const LinearSaved s = linear_saved(layer, xv, saved, "linear_backward");
  FP8MOE_CHECK(nb::len(grads) == 3, "linear_backward: expected 3 gradient slots, found ", nb::len(grads));
  layer.backward(xv, s, view_of(grad_out, "grad_output"),
                 {opt_view(grads[0], "grad x"), opt_view(grads[1], "grad lora A"), opt_view(grads[2], "grad lora B")});
}

// ---- checkpoints

nb::object opt_array(Tensor t) { return t.defined() ? nb::object(nb::cast(host_array(std::move(t)))) : nb::none(); }

nb::dict quant_dict(QuantWeights q) {
  nb::dict d;
  d["code"] = code_of(q.data.dtype());
  d["spec"] = spec_list(q.spec);
  d["data"] = host_array(std::move(q.data));
  d["scale"] = opt_array(std::move(q.scale));
  return d;
}

nb::dict stack_dict(ExpertStack s) {
  nb::dict d;
  d["experts"] = s.experts();
  d["act"] = std::vector<double>{static_cast<double>(s.act.kind), static_cast<double>(s.act.layout), s.act.alpha,
                                 s.act.limit};
  d["gate_up"] = quant_dict(std::move(s.gate_up));
  d["down"] = quant_dict(std::move(s.down));
  d["gate_up_bias"] = opt_array(std::move(s.gate_up_bias));
  d["down_bias"] = opt_array(std::move(s.down_bias));
  return d;
}

// routed_only: the routed experts alone (the Python loader leaves router and shared experts to
// the model's own modules, which read them as Linear weights).
nb::dict load_moe_layer(const Checkpoint& ck, int64_t layer, bool routed_only) {
  MoeLayerWeights w = ck.load_moe_layer(layer, routed_only ? Checkpoint::Parts::RoutedExperts : Checkpoint::Parts::All);
  nb::dict d;
  d["layer"] = w.layer;
  d["layout"] = std::string(expert_layout_name(w.layout));
  d["routed"] = stack_dict(std::move(w.routed));
  d["shared"] = w.shared ? nb::object(stack_dict(std::move(*w.shared))) : nb::none();
  return d;
}

nb::dict load_linear(const Checkpoint& ck, const std::string& module) {
  LinearStack s = ck.load_linear(module);
  nb::dict d = quant_dict(std::move(s.weight));
  d["bias"] = opt_array(std::move(s.bias));
  return d;
}

nb::dict config_dict(const ModelConfig& c) {
  nb::dict d;
  d["model_type"] = c.model_type;
  d["hidden_size"] = c.hidden_size;
  d["moe_intermediate_size"] = c.moe_intermediate_size;
  d["num_experts"] = c.num_experts;
  d["top_k"] = c.top_k;
  d["num_hidden_layers"] = c.num_hidden_layers;
  d["moe_layers"] = c.moe_layers();
  return d;
}

// ---- quantization (BF16 checkpoints loaded with quantize="fp8", merged FP8 export)

std::pair<nb::ndarray<>, nb::ndarray<>> quantize_stack(nb::ndarray<> w, const std::vector<int64_t>& spec, int64_t code) {
  const TensorView v = view_of(w, "weight to quantize");
  FP8MOE_CHECK(v.device == Device::CPU && v.rank() == 3, "quantize: expected a host stack [E, N, K], found ", v.str());
  check_contiguous(v, "weight to quantize");
  FP8MOE_CHECK(code == 1 || code == 2, "quantize: FP8 format code must be 1 (E4M3) or 2 (E5M2), found ", code);
  QuantWeights q = quantize(v, spec_from(spec, 0, "quantize"), code == 1 ? DType::F8_E4M3 : DType::F8_E5M2);
  return {host_array(std::move(q.data)), host_array(std::move(q.scale))};
}

nb::ndarray<> dequantize_stack(nb::handle codes, nb::handle scale, const std::vector<int64_t>& spec, int64_t code,
                               const std::string& out_dtype) {
  const QuantTensor q = quant_of(codes, scale, spec, 0, code, "dequantize");
  FP8MOE_CHECK(q.data.device == Device::CPU, "dequantize: expected host memory, found ", q.data.str());
  const auto dt = parse_dtype(out_dtype);
  FP8MOE_CHECK(dt && is_float(*dt) && !is_fp8(*dt), "dequantize: out dtype must be F32, BF16, F16 or F64, found '",
               out_dtype, "'");
  return host_array(dequantize(q, *dt));
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "fp8moe engine binding (internal: use the fp8moe package)";
  // fp8moe.Fp8MoeError carries the engine's message alone; the check that failed and its file:line
  // are appended with FP8MOE_DEBUG=1, as the CLI does with --debug.
  nb::exception<fp8moe::Error> error(m, "Error", PyExc_RuntimeError);
  nb::register_exception_translator(
      [](const std::exception_ptr& p, void* type) {
        try {
          std::rethrow_exception(p);
        } catch (const fp8moe::Error& e) {
          const char* dbg = std::getenv("FP8MOE_DEBUG");
          const bool debug = dbg && *dbg && std::string(dbg) != "0";
          PyErr_SetString(static_cast<PyObject*>(type), debug ? e.what() : e.message().c_str());
        }
      },
      error.ptr());
  // The Python side keeps one engine per device for the life of the process, on purpose.
  nb::set_leak_warnings(false);

  nb::class_<Engine>(m, "Engine")
      .def(nb::init<const std::string&, int>(), nb::arg("device"), nb::arg("index") = 0)
      .def_prop_ro("device", &Engine::device)
      .def_prop_ro("activation_dtype",
                   [](Engine& e) { return std::string(dtype_name(e.backend().activation_dtype())); })
      .def("check", &Engine::check)
      // The forward FP8 GEMMs' precision, "w8a16", "w8a8" or "w8a8-down" (backend.hpp:
      // GemmPrecision). An unknown name, or W8A8 where it cannot run, raises naming why.
      .def_prop_rw(
          "gemm_precision", [](Engine& e) { return std::string(gemm_precision_name(e.backend().gemm_precision())); },
          [](Engine& e, const std::string& p) { e.backend().set_gemm_precision(parse_gemm_precision(p)); });

  // Layouts of the buffers forward keeps for backward (activation: the engine's activation dtype).
  m.def("moe_saved_layout", [](const std::string& activation, int64_t E, int64_t H, int64_t I, int64_t r_gu,
                               int64_t r_d) {
    return layout_list(MoeLayer::saved_layout(parse_activation(activation), E, H, I, r_gu, r_d));
  });
  m.def("linear_saved_layout", [](const std::string& activation, int64_t r) {
    return layout_list(LinearLayer::saved_layout(parse_activation(activation), r));
  });

  m.def("cuda_available", &cuda_available);
  m.def("moe_forward", &moe_forward, nb::arg("engine"), nb::arg("stream"), nb::arg("alloc").none(), nb::arg("inputs"),
        nb::arg("experts"), nb::arg("specs"), nb::arg("act"), nb::arg("lora"), nb::arg("scaling"), nb::arg("out"),
        nb::arg("saved").none());
  m.def("moe_backward", &moe_backward, nb::arg("engine"), nb::arg("stream"), nb::arg("alloc").none(),
        nb::arg("inputs"), nb::arg("experts"), nb::arg("specs"), nb::arg("act"), nb::arg("lora"), nb::arg("scaling"),
        nb::arg("saved"), nb::arg("grad_out"), nb::arg("grads"));
  m.def("linear_forward", &linear_forward, nb::arg("engine"), nb::arg("stream"), nb::arg("alloc").none(), nb::arg("x"),
        nb::arg("weight"), nb::arg("spec"), nb::arg("lora"), nb::arg("scaling"), nb::arg("out"),
        nb::arg("saved").none());
  m.def("linear_backward", &linear_backward, nb::arg("engine"), nb::arg("stream"), nb::arg("alloc").none(),
        nb::arg("x"), nb::arg("weight"), nb::arg("spec"), nb::arg("lora"), nb::arg("scaling"), nb::arg("saved"),
        nb::arg("grad_out"), nb::arg("grads"));
  m.def("quantize", &quantize_stack, nb::arg("weight"), nb::arg("spec"), nb::arg("code") = 1);
  m.def("dequantize", &dequantize_stack, nb::arg("codes"), nb::arg("scale").none(), nb::arg("spec"), nb::arg("code"),
        nb::arg("out_dtype") = "F32");

  // fp8moe convert, for Python callers (tests, quantize-then-save workflows).
  m.def(
      "convert_checkpoint",
      [](const std::string& src, const std::string& dst, const std::string& to, const std::string& scheme,
         int64_t block) {
        ConvertOptions o;
        FP8MOE_CHECK(to == "bf16" || to == "fp8", "convert: to must be 'bf16' or 'fp8', found '", to, "'");
        FP8MOE_CHECK(scheme == "channel" || scheme == "block", "convert: scheme must be 'channel' or 'block', found '",
                     scheme, "'");
        o.to = to == "bf16" ? ConvertTarget::BF16 : ConvertTarget::FP8;
        o.scheme = scheme == "block" ? ScaleKind::Block : ScaleKind::Channel;
        o.block = block;
        const ConvertReport r = convert_checkpoint(src, dst, o);
        return std::make_tuple(r.tensors_in, r.tensors_out, r.converted);
      },
      nb::arg("src"), nb::arg("dst"), nb::arg("to"), nb::arg("scheme") = "channel", nb::arg("block") = 128);

  nb::class_<Checkpoint>(m, "Checkpoint")
      .def_static("open", &Checkpoint::open, nb::arg("path"))
      .def_prop_ro("path", &Checkpoint::path)
      .def_prop_ro("root", [](const Checkpoint& c) { return c.store().root(); })
      .def_prop_ro("model_type", &Checkpoint::model_type)
      .def_prop_ro("quant_method", [](const Checkpoint& c) { return std::string(quant_method_name(c.quant().method)); })
      .def_prop_ro("config",
                   [](const Checkpoint& c) { return c.config() ? nb::object(config_dict(*c.config())) : nb::none(); })
      .def("moe_layers", &Checkpoint::moe_layers)
      .def("names", [](const Checkpoint& c) { return c.store().names(); })
      .def("contains", [](const Checkpoint& c, const std::string& n) { return c.store().contains(n); })
      .def("entry",
           [](const Checkpoint& c, const std::string& n) {
             const SafetensorsEntry& e = c.store().entry(n);
             return std::make_pair(std::string(dtype_name(e.dtype)), e.shape.vec());
           })
      .def("load_moe_layer", &load_moe_layer, nb::arg("layer"), nb::arg("routed_only") = false)
      .def("expert_layout",
           [](const Checkpoint& c, int64_t layer) { return std::string(expert_layout_name(c.expert_layout(layer))); })
      .def("load_linear", &load_linear)
      .def("load_tensor", [](const Checkpoint& c, const std::string& n) { return host_array(c.load_tensor(n)); })
      // FP8 codes come back as uint8 bytes; entry(name) names their format.
      .def("load_stored", [](const Checkpoint& c, const std::string& n) { return host_array(c.load_stored(n)); })
      .def("inspect", [](const Checkpoint& c) {
        const InspectionReport r = c.inspect();
        return std::make_tuple(r.ok(), r.problems, r.str());
      });
}

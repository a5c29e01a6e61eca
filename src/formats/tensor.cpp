#include "fp8moe/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <span>
#include <sstream>

#include "formats/checked.hpp"

namespace fp8moe {

Shape::Shape(std::initializer_list<int64_t> d) {
  FP8MOE_CHECK(d.size() <= kMaxRank, "rank ", d.size(), " exceeds the maximum of ", kMaxRank);
  rank = static_cast<int>(d.size());
  int i = 0;
  for (int64_t v : d) dims[i++] = v;
}

Shape::Shape(const std::vector<int64_t>& d) {
  FP8MOE_CHECK(d.size() <= kMaxRank, "rank ", d.size(), " exceeds the maximum of ", kMaxRank);
  rank = static_cast<int>(d.size());
  for (int i = 0; i < rank; ++i) dims[i] = d[i];
}

int64_t Shape::numel() const {
  return checked::product<int64_t>(std::span<const int64_t>(dims.data(), static_cast<size_t>(rank)),
                                   "the element count of shape ", [this] { return str(); });
}

bool Shape::operator==(const Shape& o) const {
  if (rank != o.rank) return false;
  for (int i = 0; i < rank; ++i)
    if (dims[i] != o.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < rank; ++i) os << (i ? ", " : "") << dims[i];
  os << ']';
  return os.str();
}

TensorView::TensorView(void* d, DType t, Shape s, Device dev) : data(d), dtype(t), device(dev), shape(s) {
  int64_t st = 1;
  for (int i = s.rank - 1; i >= 0; --i) {
    strides[i] = st;
    st *= s[i];
  }
}

bool TensorView::is_contiguous() const {
  int64_t st = 1;
  for (int i = shape.rank - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != st) return false;
    st *= shape[i];
  }
  return true;
}

TensorView TensorView::select0(int64_t i) const {
  FP8MOE_CHECK(shape.rank >= 1 && i >= 0 && i < shape[0], "select0(", i, ") on ", str());
  TensorView v;
  v.data = static_cast<char*>(data) + i * strides[0] * dtype_size(dtype);
  v.dtype = dtype;
  v.device = device;
  v.shape.rank = shape.rank - 1;
  for (int d = 1; d < shape.rank; ++d) {
    v.shape[d - 1] = shape[d];
    v.strides[d - 1] = strides[d];
  }
  return v;
}

TensorView TensorView::reshape(Shape s) const {
  FP8MOE_CHECK(is_contiguous(), "reshape of a non-contiguous view ", str());
  FP8MOE_CHECK(s.numel() == numel(), "reshape ", shape.str(), " -> ", s.str(), " changes the element count");
  return TensorView(data, dtype, s, device);
}

std::string TensorView::str() const {
  std::ostringstream os;
  os << dtype_name(dtype) << shape.str() << (device == Device::CUDA ? " cuda" : " cpu");
  return os.str();
}

namespace {
class HostAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    // 64-byte alignment: SIMD-friendly and enough for any dtype.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    FP8MOE_CHECK(p != nullptr, "host allocation of ", bytes, " bytes failed");
    return p;
  }
  void deallocate(void* p) override { std::free(p); }
  Device device() const override { return Device::CPU; }
};
}  // namespace

Allocator& host_allocator() {
  static HostAllocator a;
  return a;
}

Tensor::Tensor(DType dtype, Shape shape, Allocator& alloc) {
  for (int i = 0; i < shape.rank; ++i) FP8MOE_CHECK(shape[i] >= 0, "negative dimension in shape ", shape.str());
  const int64_t bytes = checked::mul(shape.numel(), dtype_size(dtype), "the byte size of a ", dtype_name(dtype),
                                     " tensor of shape ", [&shape] { return shape.str(); });
  void* p = bytes > 0 ? alloc.allocate(static_cast<size_t>(bytes)) : nullptr;
  Allocator* a = &alloc;
  if (p) storage_ = std::shared_ptr<void>(p, [a](void* q) { a->deallocate(q); });
  view_ = TensorView(p, dtype, shape, alloc.device());
}

Tensor Tensor::zeros(DType dtype, Shape shape, Allocator& alloc) {
  FP8MOE_CHECK(alloc.device() == Device::CPU, "Tensor::zeros is host-only; use Backend::fill on devices");
  Tensor t(dtype, shape, alloc);
  if (t.nbytes() > 0) std::memset(t.data(), 0, static_cast<size_t>(t.nbytes()));
  return t;
}

Tensor Tensor::borrow(const TensorView& view) {
  Tensor t;
  t.view_ = view;
  // A no-op deleter: the caller owns the memory. A null pointer (an empty tensor) stays null.
  if (view.data) t.storage_ = std::shared_ptr<void>(view.data, [](void*) {});
  return t;
}

Tensor provided_or_new(const Tensor& given, const char* name, DType dtype, const Shape& shape, Allocator& alloc) {
  if (!given.defined()) return Tensor(dtype, shape, alloc);
  check_shape(given, name, shape);
  check_dtype(given, name, {dtype});
  check_contiguous(given, name);
  FP8MOE_CHECK(given.device() == alloc.device(), "tensor ", name, ": expected it on ",
               alloc.device() == Device::CUDA ? "the GPU" : "the host", ", found ", given.view().str());
  return given;
}

void check_shape(const TensorView& t, const char* name, const Shape& expected) {
  FP8MOE_CHECK(t.shape == expected, "tensor ", name, ": expected shape ", expected.str(), ", found ", t.shape.str());
}

void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string list;
  for (DType d : allowed) list += (list.empty() ? "" : "|") + std::string(dtype_name(d));
  FP8MOE_FAIL("tensor ", name, ": expected dtype ", list, ", found ", dtype_name(t.dtype));
}

void check_contiguous(const TensorView& t, const char* name) {
  FP8MOE_CHECK(t.is_contiguous(), "tensor ", name, ": expected a contiguous layout, found strides that are not");
}

}  // namespace fp8moe

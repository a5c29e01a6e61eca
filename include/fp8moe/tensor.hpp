// TensorView: a non-owning view (pointer, dtype, shape, strides, device). Everything passes these.
// Tensor: an owning buffer with a view, allocated through an Allocator (host or device), so that a
// framework (PyTorch) can hand us its caching allocator and we never fight it for memory.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/dtype.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

enum class Device : uint8_t { CPU, CUDA };

constexpr int kMaxRank = 6;

struct Shape {
  int rank = 0;
  std::array<int64_t, kMaxRank> dims{};

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);
  explicit Shape(const std::vector<int64_t>& d);
  int64_t operator[](int i) const { return dims[i]; }
  int64_t& operator[](int i) { return dims[i]; }
  int64_t numel() const;  // 1 for rank 0
  std::vector<int64_t> vec() const { return {dims.begin(), dims.begin() + rank}; }
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[2, 3]"
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  Shape shape;
  std::array<int64_t, kMaxRank> strides{};  // in elements

  TensorView() = default;
  // Contiguous view.
  TensorView(void* data, DType dtype, Shape shape, Device device = Device::CPU);

  int rank() const { return shape.rank; }
  int64_t size(int i) const { return shape[i < 0 ? i + shape.rank : i]; }
  int64_t numel() const { return shape.numel(); }
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  // A default-constructed view is "absent" (optional operands); a [0, H] view is defined.
  bool defined() const { return shape.rank > 0 || data != nullptr; }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  // View of the slice [i] along dimension 0 (rank-1 result).
  TensorView select0(int64_t i) const;
  // Same data, new contiguous shape with the same numel (requires contiguous).
  TensorView reshape(Shape s) const;
  std::string str() const;  // "BF16[2, 3] cuda"
};

// Where owned memory comes from. The default allocators use malloc / cudaMalloc; the Python
// binding installs PyTorch's caching allocator.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p) = 0;
  virtual Device device() const = 0;
};
Allocator& host_allocator();

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape, Allocator& alloc = host_allocator());
  static Tensor zeros(DType dtype, Shape shape, Allocator& alloc = host_allocator());
  // A non-owning Tensor over memory the caller owns and keeps alive (a framework's buffer). The
  // engine writes such a tensor where it would otherwise allocate one (see `provided_or_new`).
  static Tensor borrow(const TensorView& view);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  void* data() const { return view_.data; }
  template <typename T>
  T* ptr() const { return view_.ptr<T>(); }
  DType dtype() const { return view_.dtype; }
  const Shape& shape() const { return view_.shape; }
  int64_t size(int i) const { return view_.size(i); }
  int64_t numel() const { return view_.numel(); }
  int64_t nbytes() const { return view_.nbytes(); }
  Device device() const { return view_.device; }
  bool defined() const { return static_cast<bool>(storage_) || (view_.shape.rank > 0 && numel() == 0); }

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

// `given` when the caller supplied it (its dtype and shape are checked against the expected ones,
// the message naming `name`), else a new tensor from `alloc`. This is how callers that own all
// memory (the Python binding: torch's caching allocator) hand the engine the buffers that outlive
// a call.
Tensor provided_or_new(const Tensor& given, const char* name, DType dtype, const Shape& shape, Allocator& alloc);

// Checks used at API boundaries; each names the tensor in its message.
void check_shape(const TensorView& t, const char* name, const Shape& expected);
void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
void check_contiguous(const TensorView& t, const char* name);

}  // namespace fp8moe

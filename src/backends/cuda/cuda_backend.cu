// The CUDA backend: the Backend interface on one device and one stream.
//
// Everything is queued on the backend's stream and nothing synchronises with the host except
// copy() into host memory and synchronize(), so a whole forward/backward can be captured in a
// CUDA graph (cudaStreamBeginCapture on that stream). The allocator is stream-ordered
// (cudaMallocAsync / cudaFreeAsync on the stream) for the same reason: the engine's temporaries
// become graph memory nodes when captured, and ordinary stream-ordered reuse otherwise.
//
// Faults a kernel cannot report without a host round trip (expert ids out of range in
// build_plan) are counted in a device word; synchronize() reads it and throws.
//
// Lifetime: tensors allocated through allocator() free themselves on the backend's stream, so
// they must not outlive the backend.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>

#include "backends/cuda/cuda_backend.cuh"
#include "backends/cuda/grouped_gemm.cuh"
#include "backends/cuda/w8a8.cuh"
#include "fp8moe/fp8.hpp"

namespace fp8moe {

namespace cuda {

void check_device_operand(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  FP8MOE_CHECK(t.defined(), "tensor ", name, ": required, found no tensor");
  FP8MOE_CHECK(t.device == Device::CUDA, "tensor ", name, ": expected device memory, found ", t.str());
  check_dtype(t, name, allowed);
  check_contiguous(t, name);
}

namespace {

// Writes a byte pattern with period `esize` (1, 2, 4 or 8 bytes: it divides 16) over [p, p + n):
// unaligned head and tail bytewise, the 16-byte-aligned body with vector stores. p is aligned to
// esize, so the body starts at a whole element and `pattern` needs no rotation.
__global__ void fill_kernel(unsigned char* p, int64_t head, int64_t vecs, int64_t tail, uint4 pattern, int esize) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned char* pat = reinterpret_cast<const unsigned char*>(&pattern);
  if (i < vecs) reinterpret_cast<uint4*>(p + head)[i] = pattern;
  if (i < head) p[i] = pat[i % esize];
  if (i < tail) {
    const int64_t o = head + vecs * 16 + i;
    p[o] = pat[o % esize];
  }
}

// The bit pattern of `value` in dtype t (floats rounded once, integers must be exact).
uint64_t element_bits(DType t, double value) {
  uint64_t bits = 0;
  if (is_float(t)) {
    store_from_double(&bits, t, 0, value);
    return bits;
  }
  const auto exact = [&](double lo, double hi) {
    FP8MOE_CHECK(value == static_cast<double>(static_cast<int64_t>(value)) && value >= lo && value <= hi, "fill: value ",
                 value, " is not representable in ", dtype_name(t));
  };
  switch (t) {
    case DType::BOOL:
    case DType::U8: exact(0, 255); break;
    case DType::I8: exact(-128, 127); break;
    case DType::I16: exact(-32768, 32767); break;
    case DType::U16: exact(0, 65535); break;
    case DType::I32: exact(-2147483648.0, 2147483647.0); break;
    case DType::U32: exact(0, 4294967295.0); break;
    case DType::I64: exact(-9.2233720368547758e18, 9.2233720368547748e18); break;
    default: FP8MOE_FAIL("fill: dtype ", dtype_name(t), " is not supported");
  }
  const int64_t v = static_cast<int64_t>(value);
  std::memcpy(&bits, &v, 8);  // little-endian: the low bytes are the narrower integer
  return bits;
}

}  // namespace

void fill(const TensorView& t, double value, cudaStream_t stream) {
  check_device_operand(t, "fill", {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2,
                                   DType::BOOL, DType::U8, DType::I8, DType::I16, DType::U16, DType::I32, DType::U32,
                                   DType::I64});
  const int64_t n = t.nbytes();
  if (n == 0) return;
  const int esize = static_cast<int>(dtype_size(t.dtype));
  const uint64_t bits = element_bits(t.dtype, value);
  uint4 pattern;
  unsigned char* pb = reinterpret_cast<unsigned char*>(&pattern);
  for (int i = 0; i < 16; ++i) pb[i] = static_cast<unsigned char>(bits >> (8 * (i % esize)));
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((16 - addr % 16) % 16));
  const int64_t vecs = (n - head) / 16, tail = n - head - vecs * 16;
  const int64_t threads = std::max<int64_t>(vecs, 16);
  constexpr int kThreads = 256;
  fill_kernel<<<grid_blocks(threads, kThreads), kThreads, 0, stream>>>(static_cast<unsigned char*>(t.data), head, vecs,
                                                                      tail, pattern, esize);
  FP8MOE_CUDA_LAUNCH_CHECK("fill_kernel");
}

}  // namespace cuda

namespace {

// Makes `device` current for the scope (the caller's thread may be on another device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FP8MOE_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) FP8MOE_CUDA_CHECK(cudaSetDevice(device));
    switched_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// Stream-ordered allocations from the device's default memory pool.
class CudaAllocator final : public Allocator {
 public:
  CudaAllocator(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  void* allocate(size_t bytes) override {
    DeviceGuard g(device_);
    void* p = nullptr;
    const cudaError_t err = cudaMallocAsync(&p, bytes, stream_);
    FP8MOE_CHECK(err == cudaSuccess, "CUDA allocation of ", bytes, " bytes (", bytes >> 20, " MiB) on device ", device_,
                 " failed: ", cudaGetErrorString(err));
    return p;
  }
  // Called from Tensor destructors, which must not throw: a failure is reported once on stderr
  // (it means the device is already in an error state that the next checked call will raise).
  void deallocate(void* p) noexcept override {
    int prev = 0;
    cudaGetDevice(&prev);
    if (prev != device_) cudaSetDevice(device_);
    const cudaError_t err = cudaFreeAsync(p, stream_);
    if (prev != device_) cudaSetDevice(prev);
    if (err != cudaSuccess) {
      static std::once_flag said;
      std::call_once(said, [err] {
        std::fprintf(stderr, "fp8moe: cudaFreeAsync failed (%s); device memory may leak\n", cudaGetErrorString(err));
      });
    }
  }
  Device device() const override { return Device::CUDA; }

 private:
  int device_;
  cudaStream_t stream_;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream) : device_(device), stream_(stream), alloc_(device, stream) {
    int count = 0;
    FP8MOE_CUDA_CHECK(cudaGetDeviceCount(&count));
    FP8MOE_CHECK(device >= 0 && device < count, "make_cuda_backend: device ", device, " does not exist (", count,
                 " CUDA device(s) present)");
    DeviceGuard g(device_);
    // Keep freed blocks in the pool across synchronisations (a caching allocator's behaviour):
    // without this the pool returns memory to the driver at every sync and re-maps it each step.
    cudaMemPool_t pool;
    FP8MOE_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_));
    uint64_t keep = std::numeric_limits<uint64_t>::max();
    FP8MOE_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    FP8MOE_CUDA_CHECK(cudaMalloc(&errors_, sizeof(cuda::DeviceErrors)));
    reset_errors();
    if (const char* env = std::getenv("FP8MOE_PRECISION"); env && *env) set_gemm_precision(parse_gemm_precision(env));
  }
  ~CudaBackend() override {  // no throwing here: a failure leaves at most a small leak
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaFree(errors_);
    cudaSetDevice(prev);
  }

  const char* name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }
  DType activation_dtype() const override { return DType::BF16; }
  // Tensors of the own allocator free themselves on the stream they were allocated on only while
  // the stream stays the same: callers that switch streams install their own allocator.
  void set_stream(void* stream) override {
    stream_ = static_cast<cudaStream_t>(stream);
    alloc_.set_stream(stream_);
  }
  void* stream() const override { return stream_; }

  // W8A8 only where the kernel exists and the card runs it: asking for it elsewhere is an error.
  void set_gemm_precision(GemmPrecision p) override {
    if (p != GemmPrecision::W8A16) {
      DeviceGuard g(device_);
      FP8MOE_CHECK(cuda::w8a8::available(), "GEMM precision ", gemm_precision_name(p),
                   " (FP8MOE_PRECISION or set_gemm_precision): ", cuda::w8a8::unavailable_reason(), "; use w8a16");
    }
    precision_ = p;
  }
  GemmPrecision gemm_precision() const override { return precision_; }

  // Any direction between host and this device. A copy into host memory synchronises the stream
  // before returning, so the caller can read the result at once. A copy from pageable host memory
  // returns once the source was staged: the caller may reuse the source right away.
  void copy(const TensorView& dst, const TensorView& src) override {
    FP8MOE_CHECK(dst.shape == src.shape && dst.dtype == src.dtype, "copy: dst ", dst.str(), " and src ", src.str(),
                 " must have the same shape and dtype");
    check_contiguous(dst, "copy dst");
    check_contiguous(src, "copy src");
    if (src.nbytes() == 0) return;
    DeviceGuard g(device_);
    FP8MOE_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(src.nbytes()), cudaMemcpyDefault, stream_));
    if (dst.device == Device::CPU) FP8MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void fill(const TensorView& t, double value) override {
    DeviceGuard g(device_);
    cuda::fill(t, value, stream_);
  }

  // Waits for the stream, then raises any fault the kernels recorded (and clears it).
  void synchronize() override {
    DeviceGuard g(device_);
    FP8MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cuda::DeviceErrors e;
    FP8MOE_CUDA_CHECK(cudaMemcpyAsync(&e, errors_, sizeof(e), cudaMemcpyDeviceToHost, stream_));
    FP8MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (e.bad_ids == 0) return;
    reset_errors();
    const int64_t pair = static_cast<int64_t>(e.first_bad >> 32);
    const int32_t id = static_cast<int32_t>(static_cast<uint32_t>(e.first_bad & 0xffffffffu));
    FP8MOE_FAIL("tensor topk_ids: ", e.bad_ids, " expert id(s) outside [0, E) reached build_plan (E = ", last_experts_,
                "); the first at pair ", pair, " holds ", id,
                ". Those pairs were left out of every expert (their rows sit after offsets[E]) and added nothing "
                "to the outputs");
  }

  void build_plan(const TensorView& topk_ids, int64_t experts, RoutingPlan& plan) override {
    DeviceGuard g(device_);
    last_experts_ = experts;
    cuda::build_plan(topk_ids, experts, plan, allocator(), errors_, stream_);
  }
  void identity_plan(int64_t rows, RoutingPlan& plan) override {
    DeviceGuard g(device_);
    cuda::identity_plan(rows, plan, allocator(), stream_);
  }
  bool takes_fp8_rows(const GroupedGemm& gg) const override { return cuda::w8a8::choose(gg, precision_); }
  void grouped_gemm(const GroupedGemm& gg) override {
    DeviceGuard g(device_);
    // FP8MOE_W8A8_DGRAD=fp8 or fp8-regw under W8A8: the setting read once, so that the choice and
    // the kernel that runs agree even if another thread changes it meanwhile.
    if (const cuda::w8a8::Dgrad dgrad = cuda::w8a8::dgrad_setting(); cuda::w8a8::choose_dgrad(gg, precision_, dgrad)) {
      cuda::w8a8::dgrad(gg, allocator(), stream_, dgrad);
      return;
    }
    if (cuda::w8a8::choose(gg, precision_)) {
      cuda::w8a8::grouped_gemm(gg, allocator(), stream_);  // a.fp8 and out_fp8 included
      return;
    }
    // The W8A16 kernels read A itself (a.fp8 is for FP8 paths); out's codes take a pass of their own.
    if (gg.out_fp8.defined()) {
      FP8MOE_CHECK(gg.plan && gg.out.rank() == 2, "grouped_gemm out_fp8: needs a plan and out [M, N], found ",
                   gg.out.str());
      check_fp8_rows(gg.out_fp8, "grouped_gemm out_fp8", gg.plan->rows(), gg.out.size(1), Device::CUDA);
    }
    cuda::grouped_gemm(gg, allocator(), stream_);
    cuda::w8a8::quantize_out(gg, stream_);
  }
  void grouped_outer(const GroupedOuter& go) override {
    DeviceGuard g(device_);
    cuda::grouped_outer(go, allocator(), stream_);
  }
  void combine(const Combine& c) override {
    DeviceGuard g(device_);
    cuda::combine(c, stream_);
  }
  void pair_dot(const PairDot& d) override {
    DeviceGuard g(device_);
    cuda::pair_dot(d, stream_);
  }
  void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids, const TensorView& weights) override {
    DeviceGuard g(device_);
    cuda::route(r, logits, ids, weights, stream_);
  }
  void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                      const TensorView& grad_weights, const TensorView& grad_logits) override {
    DeviceGuard g(device_);
    cuda::route_backward(r, logits, ids, grad_weights, grad_logits, stream_);
  }

 private:
  void reset_errors() {
    // On the backend's stream, then waited for: a plain cudaMemcpy from pageable memory may still
    // be in flight when a kernel on a non-blocking stream starts.
    const cuda::DeviceErrors clear{0, ~0ull};
    FP8MOE_CUDA_CHECK(cudaMemcpyAsync(errors_, &clear, sizeof(clear), cudaMemcpyHostToDevice, stream_));
    FP8MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  Allocator& own_allocator() override { return alloc_; }

  int device_;
  cudaStream_t stream_;
  CudaAllocator alloc_;
  cuda::DeviceErrors* errors_ = nullptr;  // [1] device memory, see synchronize()
  int64_t last_experts_ = 0;              // E of the latest plan, for the error message
  GemmPrecision precision_ = GemmPrecision::W8A16;
};

}  // namespace

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device, void* stream) {
  FP8MOE_CHECK(cuda_available(), "CUDA backend requested, but no CUDA device is usable (cudaGetDeviceCount found none "
                                 "or failed); use --backend cpu");
  return std::make_unique<CudaBackend>(device, static_cast<cudaStream_t>(stream));
}

}  // namespace fp8moe

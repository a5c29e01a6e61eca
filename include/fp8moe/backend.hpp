// The handful of operations the engine calls. The CPU backend implements them plainly (the
// oracle); the CUDA backend implements them fast. The engine (engine/moe_layer.cpp) is written
// once against this interface, so a backend bug shows up as a difference from the CPU result.
//
// Rows: every grouped operation works on M = T*k rows in *expert order*: rows of expert e are
// [offsets[e], offsets[e+1]), and within an expert they are sorted by pair index p = t*k + j
// (stable, hence deterministic). An operand can be read "by token": row r is then row
// sorted_pairs[r] / k of a [T, K] source, so gathers fuse into the consumer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"
#include "fp8moe/tensor.hpp"

namespace fp8moe {

// Built on the device by Backend::build_plan; never read by the host on the CUDA path.
struct RoutingPlan {
  int64_t tokens = 0, top_k = 0, experts = 0;
  Tensor offsets;       // [E + 1] I32: row range of each expert (offsets[E] = M)
  Tensor sorted_pairs;  // [M] I32: pair index of row r
  Tensor row_of_pair;   // [M] I32: row of pair p (inverse permutation)
  Tensor schedule;      // backend-private (CUDA: row-tile -> expert map); may be undefined
  int64_t rows() const { return tokens * top_k; }
};

enum class RowSource : uint8_t {
  Rows,    // row r of the operand is src[r]            (src [M, K], expert order)
  Tokens,  // row r of the operand is src[pair(r) / k]  (src [T, K], token order)
};

// Rows quantized to FP8 E4M3 as an FP8 GEMM reads its activations: codes [M, K] F8_E4M3 and one
// F32 scale per row and 128-wide K group, scales [M, ceil(K/128)], scale = max(amax / 448,
// FLT_MIN) (quantize_activations with group 128: an all-zero group gives zero codes).
struct Fp8Rows {
  TensorView codes, scales;
  bool defined() const { return codes.defined(); }
};
inline constexpr int64_t kFp8RowGroup = 128;
// Throws unless `f` holds [rows, cols] contiguous codes and [rows, ceil(cols / 128)] contiguous
// scales on `dev`, naming `what` and the tensor.
void check_fp8_rows(const Fp8Rows& f, const std::string& what, int64_t rows, int64_t cols, Device dev);

struct GemmOperand {
  TensorView src;
  RowSource rows = RowSource::Rows;
  // Optional, Rows only: src's Fp8Rows, already made (by the GEMM that wrote src, GroupedGemm::
  // out_fp8). A path on FP8 activations reads these instead of quantizing src; the others read src.
  Fp8Rows fp8 = {};
  bool defined() const { return src.defined(); }
};

// What the grouped GEMM does with its fp32 accumulator before the store.
enum class Epilogue : uint8_t {
  Store,        // out[r, n] = v                                            out [M, N]
  GluForward,   // aux[r, n] = v (pre-activation, if aux defined);
                // out[r, j] = act(v[gate_row(j)], v[up_row(j)])            out [M, N/2]
  GluBackward,  // v is dL/dact [M, N]; aux holds the saved pre-activation [M, 2N];
                // out[r, gate_row(j)], out[r, up_row(j)] = dL/dgate, dL/dup  out [M, 2N]
};

// Which GEMM of the model a grouped GEMM is, for precision policies (GemmPrecision); the math does
// not depend on it.
enum class GemmRole : uint8_t {
  Other,       // backward GEMMs, LoRA projections, anything not below
  ExpertUp,    // the experts' gate_up projection (GEMM1), forward
  ExpertDown,  // the experts' down projection (GEMM2), forward
  Dense,       // a dense FP8 linear (attention and shared projections), forward
};

// Grouped GEMM, one group per expert:
//   v[r, n] = row_scale(r) * ( sum_k A[r, k] W_e[n, k]  +  lora_scale * sum_q L[r, q] LB_e[n, q] )
//             + bias_e[n]
// with W_e = b[e] read as [N, K] (transpose_b = false) or as the transpose of a stored [K, N]
// matrix (transpose_b = true: dgrad reads the forward weight the other way round, no copy).
// The optional L / LB pair is the LoRA delta folded into the same K loop; LB is [E, N, r] or,
// with transpose_b, [E, r, N]. Rows of experts with no rows produce nothing; M = 0 is fine.
struct GroupedGemm {
  const RoutingPlan* plan = nullptr;
  GemmOperand a;             // [*, K]
  QuantTensor b;             // [E, N, K] or [E, K, N]; FP8 + scales or plain
  bool transpose_b = false;
  GemmOperand lora_a;        // L [*, r] (optional)
  TensorView lora_b;         // [E, N, r] or [E, r, N]
  double lora_scale = 0.0;
  TensorView row_scale;      // [T * k] per-pair factor (routing weights), optional
  TensorView bias;           // [E, N] optional (added after row_scale; used only with row_scale absent)
  Epilogue epilogue = Epilogue::Store;
  ActivationSpec act;
  TensorView aux;
  TensorView out;
  // Optional: also write out's Fp8Rows (as stored: the BF16 values on CUDA), for a next GEMM on
  // FP8 activations that reads out (the layer's GEMM2 reads GEMM1's activation). A kernel whose
  // epilogue holds the values writes them there; otherwise a quantize pass follows.
  Fp8Rows out_fp8 = {};
  GemmRole role = GemmRole::Other;
};

// Per-expert reduction over the expert's rows (the LoRA weight gradients):
//   out[e, n, q] = alpha * sum_{r of e} row_scale(r) * L[r, n] * R[r, q]        out [E, N, Q]
// Experts with no rows get zeros.
struct GroupedOuter {
  const RoutingPlan* plan = nullptr;
  GemmOperand left;      // [*, N]
  GemmOperand right;     // [*, Q]
  TensorView row_scale;  // [T * k] optional
  double alpha = 1.0;
  TensorView out;
};

// out[t, :] = sum_{j < k} weight(t, j) * rows[row_of_pair(t*k + j), :], j in fixed order,
// accumulated in fp32 or wider: deterministic, no atomics.
struct Combine {
  const RoutingPlan* plan = nullptr;
  TensorView rows;     // [M, H]
  TensorView weights;  // [T, k] optional (1 when absent)
  TensorView out;      // [T, H]
};

// out[t, j] = < tokens[t, :], rows[row_of_pair(t*k + j), :] >      (routing-weight gradient)
struct PairDot {
  const RoutingPlan* plan = nullptr;
  TensorView tokens;  // [T, H]
  TensorView rows;    // [M, H]
  TensorView out;     // [T, k]
};

// Precision of the forward FP8 grouped GEMMs (GEMM1 and GEMM2 of the layer, the dense FP8 linear):
//   W8A16     FP8 weights dequantized to BF16 inside the kernel, BF16 activations: the precise
//             path, on every GPU from sm_80 and on the CPU. The default.
//   W8A8      activations quantized to FP8 E4M3 per row and 128-wide K group, FP8 x FP8 tensor
//             cores with the weights' block (or channel) scales: the fast path, CUDA backend on
//             Hopper only. Problems it cannot take (other scale schemes, odd shapes) run W8A16, and
//             the CUDA backend says so once per distinct problem on stderr. The backward GEMMs run
//             W8A16 too, unless the CUDA backend's FP8 dgrad is asked for (FP8MOE_W8A8_DGRAD=fp8).
//   W8A8Down  W8A8 for the experts' down projection only (GemmRole::ExpertDown), W8A16 for the
//             rest: E4M3 rounds the activations to 3 mantissa bits (~2.6e-2 per GEMM), and two
//             such GEMMs in a row compound to ~4e-2 at the layer output; one gives ~2.3e-2
//             (bench/NOTES.md). The down projection is also where W8A8 gains most.
// The CUDA backend starts from the environment variable FP8MOE_PRECISION (w8a16 | w8a8 |
// w8a8-down; unset: w8a16). Asking for W8A8 where it cannot run is an error, never a silent W8A16.
enum class GemmPrecision : uint8_t { W8A16, W8A8, W8A8Down };
const char* gemm_precision_name(GemmPrecision p);  // "w8a16", "w8a8", "w8a8-down"
// "w8a16" / "w8a8" / "w8a8-down" (case-insensitive); throws naming the accepted values otherwise.
GemmPrecision parse_gemm_precision(const std::string& s);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual Device device() const = 0;
  // Dtype of the intermediates the engine allocates (F64 on the CPU oracle, BF16 on CUDA).
  virtual DType activation_dtype() const = 0;

  // Where the following operations allocate: the backend's own allocator, or one the caller
  // installed with set_allocator (the Python binding installs torch's caching allocator for the
  // length of one call, so that no second memory pool competes with torch's).
  Allocator& allocator() { return installed_ ? *installed_ : own_allocator(); }
  // nullptr restores the backend's own. The allocator must serve this backend's device.
  void set_allocator(Allocator* a);
  Allocator* installed_allocator() const { return installed_; }
  // The stream the following operations queue on (a cudaStream_t; nullptr: the legacy default
  // stream). The CPU backend has none and ignores it.
  virtual void set_stream(void* stream) { (void)stream; }
  virtual void* stream() const { return nullptr; }
  // The forward FP8 GEMMs' precision (GemmPrecision above). Backends without a W8A8 path (the
  // CPU oracle) accept W8A16 only and throw for W8A8.
  virtual void set_gemm_precision(GemmPrecision p);
  virtual GemmPrecision gemm_precision() const { return GemmPrecision::W8A16; }

  // Copies between host and this backend's device (either direction; same shape and dtype).
  virtual void copy(const TensorView& dst, const TensorView& src) = 0;
  // Sets every element to `value` (poisoning in tests, zeroing).
  virtual void fill(const TensorView& t, double value) = 0;
  // Waits for all queued work (tests, timing); never called by the engine.
  virtual void synchronize() = 0;

  // Plan tensors the caller already set (offsets [E + 1], sorted_pairs [M], row_of_pair [M], all
  // I32) are written in place; absent ones are allocated.
  virtual void build_plan(const TensorView& topk_ids, int64_t experts, RoutingPlan& plan) = 0;
  // The plan of a dense layer: one expert, k = 1, row r is token r (offsets {0, rows}, both
  // permutations the identity). Same in-place rule as build_plan.
  virtual void identity_plan(int64_t rows, RoutingPlan& plan) = 0;
  virtual void grouped_gemm(const GroupedGemm& g) = 0;
  // Whether grouped_gemm(g) would run on FP8 activations (the W8A8 path): the engine then has the
  // GEMM that writes g's input hand it over quantized (GroupedGemm::out_fp8, GemmOperand::fp8).
  virtual bool takes_fp8_rows(const GroupedGemm& g) const { (void)g; return false; }
  virtual void grouped_outer(const GroupedOuter& g) = 0;
  virtual void combine(const Combine& c) = 0;
  virtual void pair_dot(const PairDot& d) = 0;
  // logits [T, E] F32/BF16/F64 -> ids [T, k] I32, weights [T, k]
  virtual void route(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                     const TensorView& weights) = 0;
  // dL/dlogits [T, E] from dL/dweights [T, k] (selection is piecewise constant: no gradient).
  virtual void route_backward(const RouterSpec& r, const TensorView& logits, const TensorView& ids,
                              const TensorView& grad_weights, const TensorView& grad_logits) = 0;

  // Convenience: a new tensor on this backend's device.
  Tensor empty(DType dtype, Shape shape) { return Tensor(dtype, shape, allocator()); }
  // Convenience: upload a host tensor to this backend's device (a no-op copy on CPU).
  Tensor upload(const TensorView& host);

 protected:
  virtual Allocator& own_allocator() = 0;

 private:
  Allocator* installed_ = nullptr;
};

// Points a backend at a stream and an allocator for one scope and restores the previous ones.
class ExecutionScope {
 public:
  ExecutionScope(Backend& be, void* stream, Allocator* alloc);
  ~ExecutionScope();
  ExecutionScope(const ExecutionScope&) = delete;
  ExecutionScope& operator=(const ExecutionScope&) = delete;

 private:
  Backend& be_;
  void* prev_stream_;
  Allocator* prev_alloc_;
};

// The I32 plan tensors, each the caller's when set (shape checked), else new from `alloc`.
void provide_plan_tensors(RoutingPlan& plan, int64_t tokens, int64_t top_k, int64_t experts, Allocator& alloc);

std::unique_ptr<Backend> make_cpu_backend();
// Throws a clear error when fp8moe was built without CUDA or no GPU is present.
// `stream` is a cudaStream_t (nullptr: the legacy default stream).
std::unique_ptr<Backend> make_cuda_backend(int device = 0, void* stream = nullptr);
bool cuda_available();
// "cpu", "cuda", or "auto" (CUDA when a GPU is present, else CPU; says which once on stderr).
std::unique_ptr<Backend> make_backend(const std::string& name);

}  // namespace fp8moe

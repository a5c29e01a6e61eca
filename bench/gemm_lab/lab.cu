// Grouped GEMM lab: times every tile shape of fp8moe::cuda::grouped_gemm and the heuristic's
// choice on the target MoE shapes in one process on one card, and checks each against a double-precision host reference on
// sampled rows. Built and run by run.sh; prints one line per (problem, variant).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/grouped_gemm.cuh"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"

using namespace fp8moe;

namespace {

// Freed blocks are kept by size and handed out again, as torch's caching allocator does for the
// engine in the Python path: a variant that allocates temporaries (the split-K partials) is then
// timed without a cudaMalloc and a synchronising cudaFree per call.
class DeviceAllocator : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    auto& free = free_[bytes];
    if (!free.empty()) {
      void* p = free.back();
      free.pop_back();
      sizes_[p] = bytes;
      return p;
    }
    void* p = nullptr;
    FP8MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
    sizes_[p] = bytes;
    return p;
  }
  void deallocate(void* p) override {
    auto it = sizes_.find(p);
    if (it == sizes_.end()) return;
    free_[it->second].push_back(p);
    sizes_.erase(it);
  }
  Device device() const override { return Device::CUDA; }

 private:
  std::map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> sizes_;
};
DeviceAllocator dev;

Tensor upload(const Tensor& h) {
  Tensor d(h.dtype(), h.shape(), dev);
  FP8MOE_CUDA_CHECK(cudaMemcpy(d.data(), h.data(), h.view().nbytes(), cudaMemcpyHostToDevice));
  return d;
}
Tensor download(const Tensor& d) {
  Tensor h(d.dtype(), d.shape());
  FP8MOE_CUDA_CHECK(cudaMemcpy(h.data(), d.data(), d.view().nbytes(), cudaMemcpyDeviceToHost));
  return h;
}

struct Problem {
  std::string name;
  int64_t T, k, E, N, K;  // N, K of v = A W^T
  bool tokens, trans, channel, glu, row_scale;
  int segments;        // W's stacked halves (gate and up: 2)
  bool plain = false;  // W in plain BF16, no scales (the LoRA factors used as W)
  // The W8A8 path's LoRA GEMM: W plain F32 (PEFT's LB, [E, N, r]), and a BF16 [M, N] addend (the
  // FP8 product) folded into the epilogue: v = rs * (2 * A W^T + D).
  bool addend = false;
  bool w_f32 = false;  // plain W in F32 (PEFT's LoRA factors are F32 parameters)
};

struct Built {
  Problem pb;
  std::vector<int32_t> offsets, sorted;
  Tensor a, w, ws, rs;                              // host
  Tensor d_off, d_sorted, d_a, d_w, d_ws, d_rs, d_aux, d_out;
  Tensor add, d_add;                                // the addend D [M, N] (Problem::addend)
  cuda::GemmAddend addend;
  RoutingPlan plan;
  GroupedGemm g;
  ScaleSpec spec;
};

Built build(const Problem& pb, std::mt19937_64& rng) {
  Built b;
  b.pb = pb;
  const int64_t M = pb.T * pb.k, SR = pb.trans ? pb.K : pb.N, SC = pb.trans ? pb.N : pb.K;
  // Uniform routing: k distinct experts per token, rows stable by pair inside an expert.
  std::vector<int32_t> ids(M), pool(pb.E);
  std::iota(pool.begin(), pool.end(), 0);
  for (int64_t t = 0; t < pb.T; ++t) {
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < pb.k; ++j) ids[t * pb.k + j] = pool[j];
  }
  b.offsets.assign(pb.E + 1, 0);
  for (int32_t id : ids) ++b.offsets[id + 1];
  for (int64_t e = 0; e < pb.E; ++e) b.offsets[e + 1] += b.offsets[e];
  std::vector<int32_t> next(b.offsets.begin(), b.offsets.end() - 1);
  b.sorted.assign(M, 0);
  for (int64_t p = 0; p < M; ++p) b.sorted[next[ids[p]]++] = static_cast<int32_t>(p);
  auto up32 = [](std::vector<int32_t>& v) {
    Tensor h(DType::I32, {static_cast<int64_t>(v.size())});
    std::copy(v.begin(), v.end(), h.ptr<int32_t>());
    return upload(h);
  };
  b.d_off = up32(b.offsets);
  b.d_sorted = up32(b.sorted);
  b.plan.tokens = pb.T, b.plan.top_k = pb.k, b.plan.experts = pb.E;
  b.plan.offsets = b.d_off, b.plan.sorted_pairs = b.d_sorted;

  std::normal_distribution<double> nd;
  b.a = Tensor(DType::BF16, {pb.tokens ? pb.T : M, pb.K});
  for (int64_t i = 0; i < b.a.numel(); ++i) store_from_double(b.a.data(), DType::BF16, i, nd(rng));
  if (pb.plain) {  // BF16 (F32 for an addend or w_f32 problem) values around 1/sqrt(K)
    const DType wt = pb.addend || pb.w_f32 ? DType::F32 : DType::BF16;
    b.w = Tensor(wt, {pb.E, SR, SC});
    for (int64_t i = 0; i < b.w.numel(); ++i) store_from_double(b.w.data(), wt, i, nd(rng) / std::sqrt(double(pb.K)));
    b.spec = ScaleSpec::none(SR, SC);
  } else {  // random E4M3 codes (no NaN), scales around 1/sqrt(K)
    b.w = Tensor(DType::F8_E4M3, {pb.E, SR, SC});
    uint64_t x = rng() | 1;
    for (int64_t i = 0; i < b.w.numel(); ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      b.w.ptr<uint8_t>()[i] = static_cast<uint8_t>(x >> 40) & 0xBF;
    }
    b.spec = pb.channel ? ScaleSpec::channel(SR, SC) : ScaleSpec::block(SR, SC, 128, 128, pb.segments);
    b.ws = Tensor(DType::F32, {pb.E, b.spec.scale_rows(), b.spec.grid_k()});
    for (int64_t i = 0; i < b.ws.numel(); ++i)
      b.ws.ptr<float>()[i] = static_cast<float>((0.5 + (rng() % 1000) / 1000.0) / std::sqrt(double(pb.K)));
    b.d_ws = upload(b.ws);
  }
  b.d_a = upload(b.a);
  b.d_w = upload(b.w);
  GroupedGemm& g = b.g;
  g.plan = &b.plan;
  g.a = {b.d_a, pb.tokens ? RowSource::Tokens : RowSource::Rows};
  g.b = {b.d_w, b.d_ws.defined() ? b.d_ws.view() : TensorView(), b.spec};
  g.transpose_b = pb.trans;
  if (pb.row_scale) {
    b.rs = Tensor(DType::F32, {M});
    for (int64_t i = 0; i < M; ++i) b.rs.ptr<float>()[i] = static_cast<float>(nd(rng));
    b.d_rs = upload(b.rs);
    g.row_scale = b.d_rs;
  }
  if (pb.glu) {
    g.epilogue = Epilogue::GluForward;
    b.d_aux = Tensor(DType::BF16, {M, pb.N}, dev);
    g.aux = b.d_aux;
  }
  b.d_out = Tensor(DType::BF16, {M, pb.glu ? pb.N / 2 : pb.N}, dev);
  g.out = b.d_out;
  if (pb.addend) {
    b.add = Tensor(DType::BF16, {M, pb.N});
    for (int64_t i = 0; i < b.add.numel(); ++i) store_from_double(b.add.data(), DType::BF16, i, nd(rng));
    b.d_add = upload(b.add);
    b.addend.d = b.d_add;
    b.addend.acc_scale = 2.0;
  }
  return b;
}

// The double-precision reference of v (pre-activation for GLU) on 8 sampled rows (the first,
// the last, random others), computed once per problem.
struct Reference {
  std::vector<int64_t> rows;
  std::vector<double> v;  // [rows, N]
};
Reference reference(const Built& b, std::mt19937_64& rng) {
  const Problem& pb = b.pb;
  const int64_t M = pb.T * pb.k;
  const QuantTensor q{b.w.view(), b.ws.view(), b.spec};
  Reference ref;
  for (int s = 0; s < 8; ++s) {
    const int64_t r = s == 0 ? 0 : s == 1 ? M - 1 : static_cast<int64_t>(rng() % M);
    const int64_t e = std::upper_bound(b.offsets.begin(), b.offsets.end(), r) - b.offsets.begin() - 1;
    const int64_t pair = b.sorted[r], src = pb.tokens ? pair / pb.k : r;
    const double rs = pb.row_scale ? b.rs.ptr<float>()[pair] : 1.0;
    ref.rows.push_back(r);
    for (int64_t n = 0; n < pb.N; ++n) {
      double acc = 0;
      for (int64_t kk = 0; kk < pb.K; ++kk)
        acc += load_as_double(b.a.data(), DType::BF16, src * pb.K + kk) * (pb.trans ? q.at(e, kk, n) : q.at(e, n, kk));
      if (pb.addend) acc = b.addend.acc_scale * acc + load_as_double(b.add.data(), DType::BF16, r * pb.N + n);
      ref.v.push_back(rs * acc);
    }
  }
  return ref;
}
// Relative Frobenius error of v (aux for GLU, out otherwise) over the reference rows.
double check(const Built& b, const Reference& ref) {
  const Tensor v = download(b.pb.glu ? b.d_aux : b.d_out);
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.rows.size(); ++i)
    for (int64_t n = 0; n < b.pb.N; ++n) {
      const double got = load_as_double(v.data(), DType::BF16, ref.rows[i] * b.pb.N + n), want = ref.v[i * b.pb.N + n];
      num += (got - want) * (got - want);
      den += want * want;
    }
  return std::sqrt(num / den);  // NaN (unwritten rows) fails the check below too
}

double median_ms(const std::function<void()>& fn) {
  cudaEvent_t a, b;
  FP8MOE_CUDA_CHECK(cudaEventCreate(&a));
  FP8MOE_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < 15; ++i) {
    FP8MOE_CUDA_CHECK(cudaEventRecord(a));
    fn();
    FP8MOE_CUDA_CHECK(cudaEventRecord(b));
    FP8MOE_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    FP8MOE_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  FP8MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const uint64_t seed = std::random_device{}();
  std::printf("gemm_lab on %s, seed %llu\n", prop.name, static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  // The four GEMMs of a layer's forward and backward, per model and size (backward as the
  // engine runs it: dgrad2 = dY . W_down read transposed, dgrad1 = dV . W_gate_up transposed).
  struct Model {
    const char* name;
    int64_t E, k, H, I;
    bool channel;
  };
  std::vector<Problem> problems;
  for (int64_t T : {int64_t{256}, int64_t{1024}, int64_t{2048}, int64_t{4096}, int64_t{16384}})
    for (const Model& m : {Model{"qwen3", 128, 8, 2048, 768, false}, Model{"glm", 64, 4, 2048, 1536, true}}) {
      const std::string t = " T" + std::to_string(T);
      const int64_t H = m.H, I = m.I;
      //                                            T  k    E    N      K      tokens trans  chan       glu    rs     segs
      problems.push_back({std::string(m.name) + " gemm1" + t, T, m.k, m.E, 2 * I, H, true, false, m.channel, true, false, 2});
      problems.push_back({std::string(m.name) + " gemm2" + t, T, m.k, m.E, H, I, false, false, m.channel, false, true, 1});
      problems.push_back({std::string(m.name) + " dgrad2" + t, T, m.k, m.E, I, H, false, true, m.channel, false, false, 1});
      problems.push_back({std::string(m.name) + " dgrad1" + t, T, m.k, m.E, H, 2 * I, false, true, m.channel, false, false, 2});
    }
  // The rank-r LoRA projections, plain BF16 W with N = r = 16: a dense projection's at 2048 tokens
  // (one group: U = X A^T with K 2048 and 4096, the backward's Q = G B reading B transposed), and
  // the experts' U at 256 tokens. "chosen" may split K (gemm_k_splits); the m128n32k32 line is the
  // same kernel unsplit, so the two give the split's gain on the card.
  for (int64_t K : {int64_t{2048}, int64_t{4096}})
    problems.push_back({"dense lora_u K" + std::to_string(K), 2048, 1, 1, 16, K, false, false, false, false, false, 1, true});
  for (int64_t K : {int64_t{512}, int64_t{2048}, int64_t{4096}})  // k/v_proj's, o_proj's and q_proj's G
    problems.push_back({"dense lora_q K" + std::to_string(K), 2048, 1, 1, 16, K, false, true, false, false, false, 1, true});
  // The same with the factors in F32, as PEFT holds them (the narrow GEMMs of a training step).
  problems.push_back({"dense lora_u K2048 f32w", 2048, 1, 1, 16, 2048, false, false, false, false, false, 1, true, false, true});
  problems.push_back({"dense lora_q K4096 f32w", 2048, 1, 1, 16, 4096, false, true, false, false, false, 1, true, false, true});
  problems.push_back({"qwen3 lora_u T256", 256, 8, 128, 16, 2048, true, false, false, false, false, 1, true});
  // The experts' four at T 2048 (the full-size step: ~128 rows per expert): U = Xp A^T (X by
  // token), V = Act A_d^T, and the backward's Q = G B_d (G by token) and R = dH1 B_gu (B read
  // transposed).
  problems.push_back({"qwen3 lora_u T2048", 2048, 8, 128, 16, 2048, true, false, false, false, false, 1, true});
  problems.push_back({"qwen3 lora_v T2048", 2048, 8, 128, 16, 768, false, false, false, false, false, 1, true});
  problems.push_back({"qwen3 lora_q T2048", 2048, 8, 128, 16, 2048, true, true, false, false, false, 1, true});
  problems.push_back({"qwen3 lora_r T2048", 2048, 8, 128, 16, 1536, false, true, false, false, false, 1, true});
  // The W8A8 path's LoRA GEMMs (K = r = 16, CUTLASS's product as the addend): its GEMM1 (GLU, aux
  // kept) and GEMM2, where the addend GEMM took 3.6 ms at 16384 Qwen3 tokens (bench/NOTES.md,
  // thirteenth session). LAB_ONLY=addend.
  for (int64_t T : {int64_t{2048}, int64_t{16384}}) {
    const std::string t = " T" + std::to_string(T);
    problems.push_back({"qwen3 addend gemm1" + t, T, 8, 128, 1536, 16, false, false, false, true, false, 1, true, true});
    problems.push_back({"qwen3 addend gemm2" + t, T, 8, 128, 2048, 16, false, false, false, false, false, 1, true, true});
  }
  // LAB_ONLY: comma-separated substrings of the problem names to run (ncu runs, quick checks).
  std::vector<std::string> only;
  if (const char* env = std::getenv("LAB_ONLY")) {
    std::string list = env;
    for (size_t pos = 0; pos <= list.size();) {
      const size_t end = std::min(list.find(',', pos), list.size());
      if (end > pos) only.push_back(list.substr(pos, end - pos));
      pos = end + 1;
    }
  }
  for (const Problem& pb : problems) {
    if (!only.empty() && std::none_of(only.begin(), only.end(), [&](const std::string& o) { return pb.name.find(o) != std::string::npos; }))
      continue;
    Built b = build(pb, rng);
    const Reference ref = reference(b, rng);
    const double flop = 2.0 * pb.T * pb.k * pb.N * pb.K;
    auto report = [&](const char* variant, const std::function<void()>& fn) {
      FP8MOE_CUDA_CHECK(cudaMemset(b.d_out.data(), 0xFF, b.d_out.view().nbytes()));
      if (b.d_aux.defined()) FP8MOE_CUDA_CHECK(cudaMemset(b.d_aux.data(), 0xFF, b.d_aux.view().nbytes()));
      fn();
      FP8MOE_CUDA_CHECK(cudaDeviceSynchronize());
      const double err = check(b, ref);
      const double ms = median_ms(fn);
      std::printf("LAB %-26s %-20s %8.3f ms %7.1f TFLOP/s  rel err %.2e%s\n", pb.name.c_str(), variant, ms,
                  flop / ms / 1e9, err, err < 1e-2 ? "" : "  WRONG");
    };
    cuda::gemm::GemmProblem gp = cuda::gemm::describe(b.g);
    if (pb.addend) gp.plain_sum = false;  // as the addend call describes it: not the whole result
    for (cuda::gemm::TileShape s : cuda::gemm::kTileShapes)
      if (cuda::gemm::tile_shape_fits(s, gp))
        report(cuda::gemm::tile_shape_name(s), [&] {
          if (pb.addend)
            cuda::grouped_gemm(b.g, b.addend, nullptr, s);
          else
            cuda::grouped_gemm(b.g, nullptr, s);
        });
    if (gp.plain_sum)  // the narrow tiles with K split by hand: where gemm_k_splits' rule stands
      for (cuda::gemm::TileShape s : {cuda::gemm::TileShape::M128N32, cuda::gemm::TileShape::M128N32Plain})
        for (int splits : {2, 4, 8})
          report((std::string(cuda::gemm::tile_shape_name(s)) + " /" + std::to_string(splits)).c_str(), [&] {
            cuda::grouped_gemm(b.g, dev, nullptr, s, splits);
          });
    report("chosen", [&] {
      if (pb.addend)
        cuda::grouped_gemm(b.g, b.addend, nullptr);
      else
        cuda::grouped_gemm(b.g, dev, nullptr);
    });
  }
  return 0;
}

// fp8moe bench: times the MoE expert layer and its kernels on the CUDA backend.
//
// Synthetic FP8 experts of real model shapes (random codes, never zeros; Qwen3 with 128x128 block
// scales, GLM with per-channel scales), synthetic routing (uniform, or skewed: Zipf-like expert
// popularity), BF16 activations. For each shape, token count and routing it times
//   layer: forward, forward + backward (dL/dhidden, dL/dweights), each with and without LoRA r=16
//          on both projections (then all four LoRA gradients too)
//   kernels alone: plan, GEMM1 (gate_up + GLU), GEMM2 (down), dgrad2 (down^T + routing weight +
//          GLU backward), dgrad1 (gate_up^T), combine
// with CUDA events around each call (the stream synchronised between calls, as the torch peer
// script does), warm-up first, the median of --reps runs. Inputs are rotated among copies whose
// total exceeds twice the L2 cache where the call's own bytes would fit in it (plan, combine); the
// GEMMs read their weights (>= 100 MB) from memory every call anyway.
// Reported: microseconds, TFLOP/s (6*T*k*H*I forward, 12*T*k*H*I forward + backward: the two
// dgrads repeat the forward FLOPs; LoRA FLOPs are not counted), GB/s (FP8 weight bytes + scales +
// activations read and written once), and the peak device memory a call adds (memory-pool high
// watermark minus what was in use before it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "args.hpp"
#include "command.hpp"
#include "fp8moe/backend.hpp"
#include "fp8moe/fp8.hpp"
#include "fp8moe/moe.hpp"
#include "fp8moe/quant.hpp"

#if defined(FP8MOE_HAS_CUDA)
#include <cuda_runtime.h>
#endif

namespace fp8moe::cli {

// `fp8moe bench --convert` (bench_convert.cpp).
int run_convert_bench(const Args& args);

namespace {

constexpr const char* kUsage =
    "usage: fp8moe bench [--shape qwen3|glm|all] [--tokens 256,4096,16384] [--routing uniform|skewed|both]\n"
    "                    [--json FILE] [--backend cuda] [--reps N] [--warmup N] [--seed S]\n"
    "                    [--precision w8a16|w8a8|w8a8-down]\n"
    "\n"
    "  Times the FP8 MoE expert layer (forward, forward+backward, with and without LoRA r=16) and\n"
    "  each of its kernels on synthetic FP8 experts of real model shapes:\n"
    "    qwen3  E 128, top-8, H 2048, I 768, 128x128 block scales (Qwen3-30B-A3B)\n"
    "    glm    E 64, top-4, H 2048, I 1536, per-channel scales   (GLM-4.7-Flash)\n"
    "  Routing: uniform, or skewed (Zipf-like popularity over a random expert order, s = 1.2).\n"
    "  Prints a table (median of --reps, default 20, after --warmup, default 3); --json writes\n"
    "  every number with the device and the exact command. --precision: the forward FP8 GEMMs'\n"
    "  path (default: FP8MOE_PRECISION, else w8a16; the W8A8 ones need a Hopper card and a W8A8 build).\n"
    "\n"
    "usage: fp8moe bench --convert [--mib N] [--threads N] [--workdir DIR]\n"
    "\n"
    "  Times `convert` on the CPU (no GPU needed): writes a synthetic Qwen3-MoE-shaped BF16 checkpoint\n"
    "  of about --mib MiB (default 2048) in two shards, reads it once so that it is page-cached, then\n"
    "  converts it BF16 -> FP8 (channel, then 128x128 blocks) and each result back to BF16, printing\n"
    "  MB/s of input for each, with the machine (cores, CPU model). --threads: worker threads\n"
    "  (default one per core); --workdir: where the checkpoints go (default: a temporary folder,\n"
    "  removed afterwards).\n";

const std::set<std::string> kOptions = {"shape", "tokens", "routing", "json", "backend", "reps",
                                        "warmup", "seed", "mib", "threads", "workdir", "precision"};

#if defined(FP8MOE_HAS_CUDA)

struct ModelShape {
  std::string name;
  int64_t E, k, H, I;
  ScaleKind scale;
};
const ModelShape kQwen3{"qwen3", 128, 8, 2048, 768, ScaleKind::Block};
const ModelShape kGlm{"glm", 64, 4, 2048, 1536, ScaleKind::Channel};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

#define BENCH_CUDA(call)                                                                         \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    FP8MOE_CHECK(e_ == cudaSuccess, "bench: ", #call, " failed: ", cudaGetErrorString(e_));      \
  } while (0)

// ---- synthetic data (host, then uploaded) --------------------------------------------------------

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Fills n elements of `elem_bytes` each from a 65536-entry table indexed by random 16-bit draws,
// split over threads: the table holds samples of the wanted distribution, so drawing a few
// hundred million values costs a lookup each.
void fill_from_table(void* dst, int64_t n, int elem_bytes, const std::vector<uint16_t>& table, uint64_t seed) {
  const int threads = static_cast<int>(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 16));
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([=, &table] {
      uint64_t s = seed * 1000003ull + static_cast<uint64_t>(t);
      const int64_t b = t * chunk, e = std::min(n, b + chunk);
      for (int64_t i = b; i < e; i += 4) {
        const uint64_t r = splitmix(s);
        for (int64_t j = 0; j < 4 && i + j < e; ++j) {
          const uint16_t v = table[(r >> (16 * j)) & 0xffff];
          if (elem_bytes == 1)
            static_cast<uint8_t*>(dst)[i + j] = static_cast<uint8_t>(v);
          else
            static_cast<uint16_t*>(dst)[i + j] = v;
        }
      }
    });
  for (auto& th : pool) th.join();
}

// Table of e4m3 codes of N(0, 112): about a quarter of the code range in standard deviations,
// clipped by saturation at 448, like a real amax-scaled block. Never all zeros.
std::vector<uint16_t> fp8_table(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 112.0f);
  std::vector<uint16_t> t(65536);
  for (auto& v : t) v = encode_e4m3_sat(nd(rng));
  return t;
}
std::vector<uint16_t> bf16_table(std::mt19937_64& rng, float std) {
  std::normal_distribution<float> nd(0.0f, std);
  std::vector<uint16_t> t(65536);
  for (auto& v : t) v = float_to_bf16_bits(nd(rng));
  return t;
}

// FP8 experts [E, N, K] with random scales around 1 / (112 sqrt(K)): dequantized rows ~ N(0, 1/K).
QuantWeights synthetic_fp8(const ModelShape& m, int64_t N, int64_t K, int64_t segments, std::mt19937_64& rng) {
  QuantWeights q;
  q.spec = m.scale == ScaleKind::Block ? ScaleSpec::block(N, K, 128, 128, segments) : ScaleSpec::channel(N, K);
  q.data = Tensor(DType::F8_E4M3, {m.E, N, K});
  fill_from_table(q.data.data(), q.data.numel(), 1, fp8_table(rng), rng());
  q.scale = Tensor(DType::F32, {m.E, q.spec.scale_rows(), q.spec.grid_k()});
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  const float base = 1.0f / (112.0f * std::sqrt(static_cast<float>(K)));
  for (int64_t i = 0; i < q.scale.numel(); ++i) q.scale.ptr<float>()[i] = base * u(rng);
  return q;
}

Tensor synthetic_bf16(Shape shape, std::mt19937_64& rng, float std = 1.0f) {
  Tensor t(DType::BF16, shape);
  fill_from_table(t.data(), t.numel(), 2, bf16_table(rng, std), rng());
  return t;
}

Tensor synthetic_f32(Shape shape, std::mt19937_64& rng, float std) {
  Tensor t(DType::F32, shape);
  std::normal_distribution<float> nd(0.0f, std);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = nd(rng);
  return t;
}

// ids [T, k] I32 (distinct per token) and weights [T, k] F32 (positive, summing to 1).
// skewed: expert popularity ~ 1 / (rank + 1)^1.2 over a random order of the experts.
void synthetic_routing(int64_t T, int64_t k, int64_t E, bool skewed, std::mt19937_64& rng, Tensor& ids, Tensor& w) {
  ids = Tensor(DType::I32, {T, k});
  w = Tensor(DType::F32, {T, k});
  std::vector<double> pop(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) pop[e] = skewed ? 1.0 / std::pow(static_cast<double>(e + 1), 1.2) : 1.0;
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
  std::shuffle(order.begin(), order.end(), rng);
  std::discrete_distribution<int64_t> pick(pop.begin(), pop.end());
  std::uniform_real_distribution<float> u(0.1f, 1.0f);
  for (int64_t t = 0; t < T; ++t) {
    int32_t* row = ids.ptr<int32_t>() + t * k;
    float sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      int32_t e;
      do e = order[pick(rng)];
      while (std::find(row, row + j, e) != row + j);
      row[j] = e;
      sum += w.ptr<float>()[t * k + j] = u(rng);
    }
    for (int64_t j = 0; j < k; ++j) w.ptr<float>()[t * k + j] /= sum;
  }
}

// ---- timing -----------------------------------------------------------------------------------

struct Stats {
  double median_us = 0, min_us = 0, max_us = 0;
  int reps = 0;
};

Stats time_calls(Backend& be, cudaStream_t stream, int warmup, int reps, const std::function<void(int)>& call) {
  for (int i = 0; i < warmup; ++i) call(i);
  be.synchronize();
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    BENCH_CUDA(cudaEventRecord(a, stream));
    call(warmup + i);
    BENCH_CUDA(cudaEventRecord(b, stream));
    BENCH_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    us.push_back(ms * 1e3);
  }
  be.synchronize();  // raises any fault a kernel recorded
  BENCH_CUDA(cudaEventDestroy(a));
  BENCH_CUDA(cudaEventDestroy(b));
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us.front(), us.back(), reps};
}

// Device memory a call adds at its peak: the pool's high watermark over what was in use before.
double peak_extra_mib(Backend& be, const std::function<void()>& call) {
  be.synchronize();
  cudaMemPool_t pool;
  int dev = 0;
  BENCH_CUDA(cudaGetDevice(&dev));
  BENCH_CUDA(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t zero = 0, before = 0, high = 0;
  BENCH_CUDA(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &before));
  BENCH_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
  call();
  be.synchronize();
  BENCH_CUDA(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
  return static_cast<double>(high > before ? high - before : 0) / 1048576.0;
}

// Copies needed so that `bytes_per_set` rotated sets exceed twice the L2 cache (1 when one set does).
int rotation(int64_t bytes_per_set, int64_t l2_bytes) {
  if (bytes_per_set <= 0) return 1;
  return static_cast<int>(std::clamp<int64_t>((2 * l2_bytes + bytes_per_set - 1) / bytes_per_set, 1, 64));
}

struct Row {
  std::string shape, routing, what;
  int64_t T;
  bool lora;
  Stats t;
  double flops, bytes, peak_mib;  // peak_mib < 0: not measured
};

void print_row(const Row& r) {
  const double s = r.t.median_us * 1e-6;
  std::printf("%-6s %6lld %-8s %-14s %-4s %10.1f %9.1f %9.1f %9s\n", r.shape.c_str(), static_cast<long long>(r.T),
              r.routing.c_str(), r.what.c_str(), r.lora ? "r16" : "-", r.t.median_us,
              r.flops > 0 ? r.flops / s / 1e12 : 0.0, r.bytes / s / 1e9,
              r.peak_mib >= 0 ? (std::to_string(static_cast<int64_t>(std::lround(r.peak_mib)))).c_str() : "");
  std::fflush(stdout);
}

nlohmann::json to_json(const Row& r) {
  const double s = r.t.median_us * 1e-6;
  nlohmann::json j = {{"shape", r.shape},
                      {"T", r.T},
                      {"routing", r.routing},
                      {"what", r.what},
                      {"lora", r.lora},
                      {"median_us", r.t.median_us},
                      {"min_us", r.t.min_us},
                      {"max_us", r.t.max_us},
                      {"reps", r.t.reps},
                      {"tflops", r.flops > 0 ? r.flops / s / 1e12 : 0.0},
                      {"gbps", r.bytes / s / 1e9}};
  if (r.peak_mib >= 0) j["peak_extra_mib"] = r.peak_mib;
  return j;
}

// Device copy bandwidth (bytes read + written per second), the memory-bound yardstick.
double copy_tbps(Backend& be, cudaStream_t stream, int reps) {
  const int64_t n = int64_t{1} << 30;
  Tensor a = be.empty(DType::U8, {n}), b = be.empty(DType::U8, {n});
  be.fill(a, 1);
  const Stats s = time_calls(be, stream, 2, reps, [&](int) {
    BENCH_CUDA(cudaMemcpyAsync(b.data(), a.data(), static_cast<size_t>(n), cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * static_cast<double>(n) / (s.median_us * 1e-6) / 1e12;
}

struct Options {
  std::vector<ModelShape> shapes;
  std::vector<int64_t> tokens;
  std::vector<bool> skewed;
  int reps = 20, warmup = 3;
  uint64_t seed = 0;
};

void bench_shape(const ModelShape& m, const Options& opt, Backend& be, cudaStream_t stream, int64_t l2,
                 std::vector<Row>& rows) {
  std::mt19937_64 rng(opt.seed ^ std::hash<std::string>{}(m.name));
  const int64_t E = m.E, k = m.k, H = m.H, I = m.I;
  std::fprintf(stderr, "bench %s: generating FP8 experts (E %lld, H %lld, I %lld)...\n", m.name.c_str(),
               static_cast<long long>(E), static_cast<long long>(H), static_cast<long long>(I));
  const QuantWeights gu_h = synthetic_fp8(m, 2 * I, H, I % 128 == 0 ? 1 : 2, rng);
  const QuantWeights dn_h = synthetic_fp8(m, H, I, 1, rng);
  const Tensor gu_data = be.upload(gu_h.data), gu_scale = be.upload(gu_h.scale);
  const Tensor dn_data = be.upload(dn_h.data), dn_scale = be.upload(dn_h.scale);
  ExpertWeights w;
  w.gate_up = {gu_data, gu_scale, gu_h.spec};
  w.down = {dn_data, dn_scale, dn_h.spec};
  const double weight_bytes = static_cast<double>(gu_h.data.nbytes() + gu_h.scale.nbytes() + dn_h.data.nbytes() +
                                                  dn_h.scale.nbytes());

  const int64_t r = 16;
  const Tensor la_gu = be.upload(synthetic_f32({E, r, H}, rng, 1.0f / std::sqrt(static_cast<float>(H))));
  const Tensor lb_gu = be.upload(synthetic_f32({E, 2 * I, r}, rng, 0.01f));
  const Tensor la_d = be.upload(synthetic_f32({E, r, I}, rng, 1.0f / std::sqrt(static_cast<float>(I))));
  const Tensor lb_d = be.upload(synthetic_f32({E, H, r}, rng, 0.01f));
  LoraAdapters lora;
  lora.gate_up_A = la_gu, lora.gate_up_B = lb_gu, lora.down_A = la_d, lora.down_B = lb_d;
  lora.scaling = 2.0;
  const MoeLayer plain(be, w), with_lora(be, w, lora);
  Tensor g_la_gu = be.empty(DType::F32, la_gu.shape()), g_lb_gu = be.empty(DType::F32, lb_gu.shape());
  Tensor g_la_d = be.empty(DType::F32, la_d.shape()), g_lb_d = be.empty(DType::F32, lb_d.shape());

  for (int64_t T : opt.tokens)
    for (bool skewed : opt.skewed) {
      const std::string routing = skewed ? "skewed" : "uniform";
      const int64_t M = T * k;
      const Tensor hidden = be.upload(synthetic_bf16({T, H}, rng));
      const Tensor grad_out = be.upload(synthetic_bf16({T, H}, rng, 1e-2f));
      Tensor ids_h, w_h;
      synthetic_routing(T, k, E, skewed, rng, ids_h, w_h);
      const Tensor ids = be.upload(ids_h), weights = be.upload(w_h);
      const MoeInputs in{hidden, ids, weights};
      Tensor out = be.empty(DType::BF16, {T, H}), d_hidden = be.empty(DType::BF16, {T, H});
      Tensor d_weights = be.empty(DType::F32, {T, k});

      const double f_fwd = 6.0 * T * k * H * I;
      const double act_bytes = 2.0 * T * H * 2;  // hidden in, out
      const auto add = [&](const std::string& what, bool with, const Stats& t, double flops, double bytes,
                           double peak) {
        rows.push_back({m.name, routing, what, T, with, t, flops, bytes, peak});
        print_row(rows.back());
      };

      // -- whole layer
      for (const bool use_lora : {false, true}) {
        const MoeLayer& layer = use_lora ? with_lora : plain;
        const MoeGrads grads{d_hidden, d_weights,
                             use_lora ? LoraGrads{g_la_gu, g_lb_gu, g_la_d, g_lb_d} : LoraGrads{}};
        const auto fwd = [&] { layer.forward(in, out); };
        const auto fwd_bwd = [&] {
          MoeSaved saved;
          layer.forward(in, out, &saved);
          layer.backward(in, saved, grad_out, grads);
        };
        const double peak_f = peak_extra_mib(be, fwd);
        add("layer_fwd", use_lora, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { fwd(); }), f_fwd,
            weight_bytes + act_bytes, peak_f);
        const double peak_fb = peak_extra_mib(be, fwd_bwd);
        add("layer_fwd_bwd", use_lora, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { fwd_bwd(); }),
            2 * f_fwd, 2 * weight_bytes + 2 * act_bytes + 2.0 * T * H * 2, peak_fb);
      }

      // -- kernels alone, on the intermediates of one forward
      MoeSaved saved;
      plain.forward(in, out, &saved);
      const RoutingPlan* plan = saved.plan.get();
      const TensorView w_flat = weights.view().reshape({M});
      Tensor dh1 = be.empty(DType::BF16, {M, 2 * I}), dxp = be.empty(DType::BF16, {M, H});

      const int plan_sets = rotation(ids.nbytes() + 3 * M * 4, l2);
      std::vector<Tensor> ids_rot(static_cast<size_t>(plan_sets));
      for (auto& t : ids_rot) t = be.upload(ids_h);
      add("plan", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int i) {
            RoutingPlan p;
            be.build_plan(ids_rot[static_cast<size_t>(i % plan_sets)], E, p);
          }), 0, static_cast<double>(ids.nbytes() + 3 * M * 4 + (E + 1) * 4), -1);

      GroupedGemm g1;
      g1.plan = plan;
      g1.a = {hidden, RowSource::Tokens};
      g1.b = w.gate_up;
      g1.epilogue = Epilogue::GluForward;
      g1.aux = saved.h1;
      g1.out = saved.act;
      add("gemm1", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { be.grouped_gemm(g1); }),
          4.0 * M * H * I, gu_h.data.nbytes() + gu_h.scale.nbytes() + 2.0 * T * H + 2.0 * M * 3 * I, -1);

      GroupedGemm g2;
      g2.plan = plan;
      g2.a = {saved.act};
      g2.b = w.down;
      g2.out = saved.y;
      add("gemm2", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { be.grouped_gemm(g2); }),
          2.0 * M * H * I, dn_h.data.nbytes() + dn_h.scale.nbytes() + 2.0 * M * (I + H), -1);

      GroupedGemm d2;
      d2.plan = plan;
      d2.a = {grad_out, RowSource::Tokens};
      d2.b = w.down;
      d2.transpose_b = true;
      d2.row_scale = w_flat;
      d2.epilogue = Epilogue::GluBackward;
      d2.aux = saved.h1;
      d2.out = dh1;
      add("dgrad2", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { be.grouped_gemm(d2); }),
          2.0 * M * H * I, dn_h.data.nbytes() + dn_h.scale.nbytes() + 2.0 * T * H + 2.0 * M * 4 * I, -1);

      GroupedGemm d1;
      d1.plan = plan;
      d1.a = {dh1};
      d1.b = w.gate_up;
      d1.transpose_b = true;
      d1.out = dxp;
      add("dgrad1", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int) { be.grouped_gemm(d1); }),
          4.0 * M * H * I, gu_h.data.nbytes() + gu_h.scale.nbytes() + 2.0 * M * (2 * I + H), -1);

      const int comb_sets = rotation(saved.y.nbytes(), l2);
      std::vector<Tensor> y_rot;
      y_rot.push_back(saved.y);
      for (int i = 1; i < comb_sets; ++i) {
        y_rot.push_back(be.empty(DType::BF16, {M, H}));
        be.copy(y_rot.back(), saved.y);
      }
      add("combine", false, time_calls(be, stream, opt.warmup, opt.reps, [&](int i) {
            Combine c;
            c.plan = plan;
            c.rows = y_rot[static_cast<size_t>(i % comb_sets)];
            c.weights = weights;
            c.out = out;
            be.combine(c);
          }), 0, 2.0 * M * H + 2.0 * T * H + 4.0 * M, -1);
    }
}

int run_kernel_bench(const Args& args, const std::vector<std::string>& argv) {
  for (const char* o : {"mib", "threads", "workdir"})
    FP8MOE_USAGE_CHECK(!args.has(o), "--", o, " applies to bench --convert only");
  std::optional<GemmPrecision> precision;
  if (auto p = args.get("precision")) {
    try {
      precision = parse_gemm_precision(*p);
    } catch (const Error& e) {
      FP8MOE_USAGE_CHECK(false, "--precision: ", e.message());
    }
  }
  FP8MOE_USAGE_CHECK(args.get_or("backend", "cuda") == "cuda",
                     "--backend: the benchmark times CUDA kernels with CUDA events; only 'cuda' is supported, found '",
                     args.get_or("backend", "cuda"), "'");
  Options opt;
  const std::string shape = args.get_or("shape", "all");
  if (shape == "qwen3" || shape == "all") opt.shapes.push_back(kQwen3);
  if (shape == "glm" || shape == "all") opt.shapes.push_back(kGlm);
  FP8MOE_USAGE_CHECK(!opt.shapes.empty(), "--shape: expected qwen3, glm or all, found '", shape, "'");
  for (const std::string& t : split(args.get_or("tokens", "256,4096,16384"), ',')) {
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(t, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    FP8MOE_USAGE_CHECK(used == t.size() && v >= 1, "--tokens: expected positive integers separated by commas, found '",
                       t, "'");
    opt.tokens.push_back(v);
  }
  const std::string routing = args.get_or("routing", "both");
  if (routing == "uniform" || routing == "both") opt.skewed.push_back(false);
  if (routing == "skewed" || routing == "both") opt.skewed.push_back(true);
  FP8MOE_USAGE_CHECK(!opt.skewed.empty(), "--routing: expected uniform, skewed or both, found '", routing, "'");
  opt.reps = static_cast<int>(args.get_int("reps", 20));
  opt.warmup = static_cast<int>(args.get_int("warmup", 3));
  FP8MOE_USAGE_CHECK(opt.reps >= 1 && opt.warmup >= 0, "--reps must be >= 1 and --warmup >= 0");
  opt.seed = args.get_u64("seed", std::random_device{}());
  // Without this check the first CUDA call fails on a machine without a GPU with "CUDA driver
  // version is insufficient for CUDA runtime version", which names the wrong problem.
  FP8MOE_CHECK(cuda_available(), "no usable CUDA GPU (cudaGetDeviceCount found none: no GPU, or no NVIDIA "
                                 "driver); fp8moe bench times the CUDA kernels on a GPU (bench --convert needs none)");

  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::vector<Row> rows;
  double copy_bw = 0;
  std::string precision_name;
  {
    auto be = make_cuda_backend(0, stream);
    if (precision) be->set_gemm_precision(*precision);
    precision_name = gemm_precision_name(be->gemm_precision());
    copy_bw = copy_tbps(*be, stream, opt.reps);
    std::printf("device: %s, %d SMs, L2 %d MiB; copy bandwidth %.2f TB/s (read + write); seed %llu; GEMM precision %s\n",
                prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw,
                static_cast<unsigned long long>(opt.seed), precision_name.c_str());
    std::printf("%-6s %6s %-8s %-14s %-4s %10s %9s %9s %9s\n", "shape", "T", "routing", "what", "lora", "us",
                "TFLOP/s", "GB/s", "peak MiB");
    for (const ModelShape& m : opt.shapes) bench_shape(m, opt, *be, stream, prop.l2CacheSize, rows);
    be->synchronize();
  }
  BENCH_CUDA(cudaStreamDestroy(stream));

  if (auto path = args.get("json")) {
    std::string cmd = "fp8moe bench";
    for (const auto& a : argv) cmd += " " + a;
    const std::time_t now = std::time(nullptr);
    char date[32];
    std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
    nlohmann::json j = {{"device",
                         {{"name", prop.name},
                          {"sm", std::to_string(prop.major) + "." + std::to_string(prop.minor)},
                          {"sms", prop.multiProcessorCount},
                          {"l2_mib", prop.l2CacheSize >> 20},
                          {"mem_gib", static_cast<double>(prop.totalGlobalMem) / (1ull << 30)}}},
                        {"command", cmd},
                        {"fp8moe_version", version()},
                        {"date", date},
                        {"seed", opt.seed},
                        {"precision", precision_name},
                        {"copy_tbps", copy_bw},
                        {"shapes", nlohmann::json::array()},
                        {"results", nlohmann::json::array()}};
    for (const ModelShape& m : opt.shapes) {
      const double fp8_bytes = static_cast<double>(m.E) * 3 * m.H * m.I;
      j["shapes"].push_back({{"name", m.name},
                             {"E", m.E},
                             {"k", m.k},
                             {"H", m.H},
                             {"I", m.I},
                             {"scale", scale_kind_name(m.scale)},
                             {"fp8_weight_bytes", fp8_bytes}});
    }
    for (const Row& r : rows) j["results"].push_back(to_json(r));
    std::ofstream f(*path);
    FP8MOE_CHECK(f.good(), "--json: cannot write ", *path);
    f << j.dump(1) << "\n";
    std::printf("wrote %s\n", path->c_str());
  }
  return 0;
}

#endif

int run_bench(const std::vector<std::string>& argv) {
  const Args args(argv, kOptions, {"convert"});
  if (args.help()) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  args.expect_positional(0, "none");
  if (args.has("convert")) return run_convert_bench(args);
#if defined(FP8MOE_HAS_CUDA)
  return run_kernel_bench(args, argv);
#else
  FP8MOE_FAIL("fp8moe bench times CUDA kernels, but fp8moe was built without CUDA (no nvcc at configure time); "
              "bench --convert times the converter and needs no GPU");
#endif
}

}  // namespace

FP8MOE_COMMAND(bench, "time the FP8 MoE layer and its kernels (CUDA), or convert (--convert, CPU)", run_bench);

}  // namespace fp8moe::cli

// Which engine runs a grouped GEMM under the CUDA backend's precision policy (backend.hpp:
// GemmPrecision): the W8A8 path (w8a8.cuh), its FP8 dgrad (w8a8_dgrad.cu) or the W8A16 family
// (grouped_gemm.cuh, whose tile shape gemm_heuristics.cpp picks). Kept apart from the kernels.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backends/cuda/grouped_gemm.cuh"
#include "backends/cuda/w8a8.cuh"

namespace fp8moe::cuda::w8a8 {

namespace {
const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::Store: return "store";
    case Epilogue::GluForward: return "glu-forward";
    case Epilogue::GluBackward: return "glu-backward";
  }
  return "?";
}
const char* role_name(GemmRole r) {
  switch (r) {
    case GemmRole::Other: return "";
    case GemmRole::ExpertUp: return ", experts' gate_up";
    case GemmRole::ExpertDown: return ", experts' down";
    case GemmRole::Dense: return ", dense";
  }
  return "";
}
// The problem as a path decision sees it: W's shape, dtype, scales and orientation, A's dtype, the
// epilogue and LoRA (the rows change every step and do not enter the decision).
std::string problem_key(const GroupedGemm& g) {
  const TensorView& b = g.b.data;
  return "E " + std::to_string(b.rank() == 3 ? b.size(0) : 0) + ", W " + b.shape.str() + " " +
         std::string(dtype_name(b.dtype)) + (g.transpose_b ? " transposed" : "") + ", scales " + g.b.spec.str() +
         ", A " + (g.a.defined() ? std::string(dtype_name(g.a.src.dtype)) : "-") + ", " + epilogue_name(g.epilogue) +
         (g.lora_a.defined() ? ", LoRA" : "") + role_name(g.role);
}
}  // namespace

bool choose(const GroupedGemm& g, GemmPrecision precision) {
  if (precision == GemmPrecision::W8A16) return false;
  // w8a8-down takes the experts' down projection only: the others' W8A16 is the policy's choice,
  // not a W8A8 limit, so it goes to the dispatch log only.
  const bool by_policy = precision == GemmPrecision::W8A8Down && g.role != GemmRole::ExpertDown;
  const std::string why = by_policy ? "w8a8-down takes the experts' down projection only" : fits(g);
  // A forward FP8 GEMM that W8A8 declines (a shape or scale scheme it cannot take) is said once
  // per distinct problem, always: the caller asked for W8A8 and this GEMM does not get it. The
  // expected W8A16 GEMMs (backward, plain LoRA weights) and the W8A8 ones go through the dispatch
  // log (FP8MOE_LOG_DISPATCH), as the tile-shape choice does.
  const TensorView& b = g.b.data;
  const bool expected = by_policy || g.transpose_b || g.epilogue == Epilogue::GluBackward || !is_fp8(b.dtype);
  gemm::log_choice_once(
      [&] {
        return "grouped_gemm (" + problem_key(g) + ") -> " +
               (why.empty() ? std::string("W8A8 (CUTLASS sm90 FP8 x FP8, 1x128 activation scales)")
                            : "W8A16 (W8A8 declined: " + why + ")");
      },
      /*always=*/!why.empty() && !expected);
  return why.empty();
}

LoraPath parse_lora_path_env(const char* v) {
  if (v == nullptr || *v == '\0') return LoraPath::Auto;
  if (std::strcmp(v, "pass") == 0) return LoraPath::Pass;
  if (std::strcmp(v, "addend-gemm") == 0) return LoraPath::AddendGemm;
  FP8MOE_FAIL("FP8MOE_W8A8_LORA='", v, "' is not one of: pass, addend-gemm (unset: the library's choice, choose_lora_path)");
}

LoraPath choose_lora_path(const GroupedGemm& g) {
  // FP8MOE_W8A8_LORA overrides the choice, for measuring one path against the other in a whole
  // layer (bench/layer_profile.py). Read once per process.
  static const LoraPath forced = parse_lora_path_env(std::getenv("FP8MOE_W8A8_LORA"));
  const int64_t R = g.lora_a.defined() && g.lora_a.src.rank() == 2 ? g.lora_a.src.size(1) : 0;
  const std::string why = forced == LoraPath::Pass ? lora_pass_fits(g) : "";
  const LoraPath path = forced == LoraPath::Pass && why.empty() ? LoraPath::Pass : LoraPath::AddendGemm;
  gemm::log_choice_once([&] {
    return "W8A8 LoRA delta (r " + std::to_string(R) + ", N " + std::to_string(g.b.data.rank() == 3 ? g.b.data.size(1) : 0) +
           ") -> " + lora_path_name(path) + (forced != LoraPath::Auto ? " (FP8MOE_W8A8_LORA)" : "") +
           (why.empty() ? "" : " (the pass declined: " + why + ")");
  });
  return path;
}

EpilogueForm parse_epilogue_form_env(const char* v) {
  if (v == nullptr || *v == '\0') return EpilogueForm::Auto;
  if (std::strcmp(v, "vector") == 0) return EpilogueForm::Vector;
  if (std::strcmp(v, "general") == 0) return EpilogueForm::General;
  FP8MOE_FAIL("FP8MOE_W8A8_EPILOGUE='", v, "' is not one of: vector, general (unset: the library's choice, choose_epilogue_form)");
}

EpilogueForm choose_epilogue_form(const GroupedGemm& g) {
  // FP8MOE_W8A8_EPILOGUE overrides the choice, for measuring one form against the other in a whole
  // layer. Read once per process.
  static const EpilogueForm forced = parse_epilogue_form_env(std::getenv("FP8MOE_W8A8_EPILOGUE"));
  const std::string why = forced == EpilogueForm::Vector ? epilogue_vector_fits(g) : "";
  const EpilogueForm form = forced == EpilogueForm::Vector && why.empty() ? EpilogueForm::Vector : EpilogueForm::General;
  gemm::log_choice_once([&] {
    return "W8A8 epilogue pass (" + problem_key(g) + ") -> " + epilogue_form_name(form) +
           (forced != EpilogueForm::Auto ? " (FP8MOE_W8A8_EPILOGUE)" : "") + (why.empty() ? "" : " (vector declined: " + why + ")");
  });
  return form;
}

Sm90Tile parse_tile_env(const char* v) {
  if (v == nullptr || *v == '\0') return Sm90Tile::Auto;
  if (std::strcmp(v, "m64") == 0) return Sm90Tile::M64;
  if (std::strcmp(v, "m128") == 0) return Sm90Tile::M128;
  FP8MOE_FAIL("FP8MOE_W8A8_TILE='", v, "' is not one of: m64, m128 (unset: the library's choice, choose_sm90_tile)");
}

Sm90Tile choose_sm90_tile(int64_t rows, int64_t experts, int64_t n, int64_t k) {
  // FP8MOE_W8A8_TILE overrides the choice, for measuring one tile against the other in a whole
  // layer (bench/layer_profile.py). Read once per process.
  static const Sm90Tile forced = parse_tile_env(std::getenv("FP8MOE_W8A8_TILE"));
  // The 64-row tile where a 128-row one would be at least 3/4 padding on average. Measured at 16
  // rows per expert (Qwen3, 256 tokens, H100): both CUTLASS GEMMs 236 us against 245 us with the
  // 128-row tile (bench/NOTES.md, eighteenth session); at 32 the same padding argument, not timed.
  constexpr int64_t kM64MaxRowsPerExpert = 32;
  const bool few_rows = rows <= kM64MaxRowsPerExpert * std::max<int64_t>(experts, 1);
  const Sm90Tile tile = forced != Sm90Tile::Auto ? forced : few_rows ? Sm90Tile::M64 : Sm90Tile::M128;
  // Logged by the average rows per expert (what a rule can use without reading the offsets back).
  gemm::log_choice_once([&] {
    return "W8A8 CUTLASS tile (N " + std::to_string(n) + ", K " + std::to_string(k) + ", ~" +
           std::to_string(gemm::rows_bucket(rows, experts)) + " rows per expert) -> " + sm90_tile_name(tile) +
           (forced != Sm90Tile::Auto ? " (FP8MOE_W8A8_TILE)" : "");
  });
  return tile;
}

int epilogue_rows_per_block(int64_t rows, int64_t items_per_row, int threads) {
  // ~8 items per thread amortise a block's expert search at large M. At small M that alone gave
  // fewer blocks than SMs, each thread walking 8 items one after another: at 256 Qwen3 tokens
  // (2048 rows) 98 blocks took 23 us for 9 MB (bench/NOTES.md, eighteenth session). So the grid
  // keeps at least kTargetBlocks (~4 per SM of an H100/H200) where the rows allow.
  constexpr int64_t kItemsPerThread = 8, kTargetBlocks = 512;
  const int64_t amortised = std::max<int64_t>(1, kItemsPerThread * threads / std::max<int64_t>(items_per_row, 1));
  const int64_t filling = std::max<int64_t>(1, rows / kTargetBlocks);
  return static_cast<int>(std::min(amortised, filling));
}

Dgrad parse_dgrad_env(const char* v) {
  if (v == nullptr || *v == '\0' || std::strcmp(v, "bf16") == 0) return Dgrad::Bf16;
  if (std::strcmp(v, "fp8") == 0) return Dgrad::Fp8;
  if (std::strcmp(v, "fp8-regw") == 0) return Dgrad::Fp8RegW;
  FP8MOE_FAIL("FP8MOE_W8A8_DGRAD='", v, "' is not one of: fp8, fp8-regw, bf16 (unset: bf16, the precise one)");
}

namespace {
std::atomic<Dgrad>& dgrad_state() {
  static std::atomic<Dgrad> setting{parse_dgrad_env(std::getenv("FP8MOE_W8A8_DGRAD"))};
  return setting;
}
}  // namespace

Dgrad dgrad_setting() { return dgrad_state().load(std::memory_order_relaxed); }
void set_dgrad_setting(Dgrad d) { dgrad_state().store(d, std::memory_order_relaxed); }

bool choose_dgrad(const GroupedGemm& g, GemmPrecision precision, Dgrad setting) {
  // Only a transposed FP8 GEMM under W8A8 with the FP8 dgrad asked for; the others are no question.
  if (precision != GemmPrecision::W8A8 || setting == Dgrad::Bf16 || !g.transpose_b || !is_fp8(g.b.data.dtype)) return false;
  const std::string why = gemm::sm90_kernels_available() ? dgrad_fits(g) : "the FP8 dgrad needs an sm_90 GPU and sm_90a code";
  // Asked for and declined: said once per distinct problem, as choose() does for the forward.
  gemm::log_choice_once(
      [&] {
        return "grouped_gemm (" + problem_key(g) + ") -> " +
               (why.empty() ? std::string(setting == Dgrad::Fp8RegW
                                              ? "W8A8 FP8 dgrad (W from registers, 1x128 gradient scales)"
                                              : "W8A8 FP8 dgrad (wgmma on transposed tiles, 1x128 gradient scales)")
                            : "W8A16 (FP8 dgrad declined: " + why + ")");
      },
      /*always=*/!why.empty());
  return why.empty();
}

}  // namespace fp8moe::cuda::w8a8

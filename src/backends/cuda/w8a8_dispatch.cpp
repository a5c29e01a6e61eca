// Which engine runs a grouped GEMM under the CUDA backend's precision policy (backend.hpp:
// GemmPrecision): the W8A8 path (w8a8.cuh) or the W8A16 family (grouped_gemm.cuh, whose tile
// shape gemm_heuristics.cpp picks). Kept apart from the kernels; the decision is logged once per
// distinct problem, so that a run shows which of its GEMMs took the fast path and why the others
// did not.
#include <cstdio>
#include <mutex>
#include <set>
#include <string>

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
}  // namespace

bool choose(const GroupedGemm& g, GemmPrecision precision) {
  if (precision != GemmPrecision::W8A8) return false;
  const std::string why = fits(g);
  // The problem as the decision sees it: W's shape, dtype, scales and orientation, A's dtype, the
  // epilogue and LoRA (the rows change every step and do not enter the decision).
  const TensorView& b = g.b.data;
  std::string key = "E " + std::to_string(b.rank() == 3 ? b.size(0) : 0) + " W " + b.shape.str() + " " +
                    std::string(dtype_name(b.dtype)) + (g.transpose_b ? " transposed" : "") + ", scales " + g.b.spec.str() +
                    ", A " + (g.a.defined() ? std::string(dtype_name(g.a.src.dtype)) : std::string("-")) + ", " + epilogue_name(g.epilogue) +
                    (g.lora_a.defined() ? ", LoRA" : "");
  static std::mutex mu;
  static std::set<std::string> said;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (said.insert(key).second)
      std::fprintf(stderr, "fp8moe: grouped GEMM (%s): %s\n", key.c_str(),
                   why.empty() ? "W8A8 (CUTLASS sm90 FP8 x FP8, 1x128 activation scales)"
                               : ("W8A16 (W8A8 declined: " + why + ")").c_str());
  }
  return why.empty();
}

}  // namespace fp8moe::cuda::w8a8

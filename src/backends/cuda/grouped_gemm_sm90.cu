// Whether the wgmma kernels can run here (the kernels themselves are generated instances:
// gemm_instance.cu.in).
#include "backends/cuda/grouped_gemm.cuh"

#include "backends/cuda/cuda_check.cuh"

namespace fp8moe::cuda::gemm {
namespace {
// Empty: its cubin's version tells which of the library's targets the driver loaded for this card.
__global__ void arch_probe_kernel() {}
}  // namespace

bool sm90_kernels_available() {
#if FP8MOE_BUILT_SM90A
  int device = 0;
  FP8MOE_CUDA_CHECK(cudaGetDevice(&device));
  static int cached[64];  // per device: 0 unknown, 1 yes, 2 no (host-side, set once)
  const int slot = device < 64 ? device : 63;
  if (cached[slot] == 0) {
    int major = 0, minor = 0;
    FP8MOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    FP8MOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    bool ok = major == 9 && minor == 0;
    if (ok) {
      // The sm_90a cubin runs, not code JIT-compiled from an older PTX target (ptxVersion 80),
      // whose wgmma kernels are traps.
      cudaFuncAttributes attr{};
      ok = cudaFuncGetAttributes(&attr, arch_probe_kernel) == cudaSuccess && attr.binaryVersion == 90 &&
           attr.ptxVersion == 90;
      (void)cudaGetLastError();
    }
    cached[slot] = ok ? 1 : 2;
  }
  return cached[slot] == 1;
#else
  return false;  // the library holds no sm_90a code (FP8MOE_CUDA_ARCHS)
#endif
}

}  // namespace fp8moe::cuda::gemm

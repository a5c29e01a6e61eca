// Instantiations of the wgmma grouped GEMM kernel (sm_90a), and the check that they can run.
#include "backends/cuda/gemm_kernel_sm90.cuh"

namespace fp8moe::cuda::gemm {

void launch_sm90_m128n128(const Params& p, int64_t n_tiles, bool trans, int a_bytes, int b_bytes, cudaStream_t stream) {
  launch_sm90<TileSm90M128>(p, n_tiles, trans, a_bytes, b_bytes, stream);
}

bool sm90_kernels_available() {
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
      // binaryVersion 90 means the sm_90a cubin is what runs (an sm_80 cubin would report 80).
      cudaFuncAttributes attr{};
      ok = cudaFuncGetAttributes(&attr, grouped_gemm_sm90_kernel<TileSm90M128, 2, 1, false>) == cudaSuccess &&
           attr.binaryVersion == 90;
      (void)cudaGetLastError();
    }
    cached[slot] = ok ? 1 : 2;
  }
  return cached[slot] == 1;
}

}  // namespace fp8moe::cuda::gemm

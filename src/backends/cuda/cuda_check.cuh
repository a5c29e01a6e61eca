// Error checking for CUDA calls and launches: every failure becomes an fp8moe::Error naming the
// call, the CUDA error string and the place.
#pragma once

#include <cuda_runtime.h>

#include "fp8moe/error.hpp"

#define FP8MOE_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    cudaError_t fp8moe_err_ = (call);                                                    \
    if (fp8moe_err_ != cudaSuccess)                                                      \
      FP8MOE_FAIL("CUDA call ", #call, " failed: ", cudaGetErrorString(fp8moe_err_));    \
  } while (0)

// After every kernel launch: catches bad launch configurations at once (asynchronous faults
// surface at the next synchronising call).
#define FP8MOE_CUDA_LAUNCH_CHECK(kernel_name)                                            \
  do {                                                                                   \
    cudaError_t fp8moe_err_ = cudaGetLastError();                                        \
    if (fp8moe_err_ != cudaSuccess)                                                      \
      FP8MOE_FAIL("CUDA launch of ", kernel_name, " failed: ", cudaGetErrorString(fp8moe_err_)); \
  } while (0)

// Built instead of src/backends/cuda/ when no CUDA compiler was found at configure time.
#include "fp8moe/backend.hpp"
#include "fp8moe/error.hpp"

namespace fp8moe {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(int, void*) {
  FP8MOE_FAIL("CUDA backend requested, but fp8moe was built without CUDA (no nvcc at configure time); "
              "rebuild with nvcc on PATH or use --backend cpu");
}

}  // namespace fp8moe

# Sourced by setup.sh / test.sh / demo.sh: the Python side of fp8moe.
#   fp8moe_python_deps      installs torch, transformers, PEFT and the build/test tools from PyPI
#                           (the versions this tree is tested with) where they are missing
#   fp8moe_cutlass_deps     where nvcc is: the CUTLASS headers (pip package nvidia-cutlass) that the
#                           W8A8 kernel of the CUDA backend is built from (CMakeLists.txt finds them)
#   fp8moe_python_install   pip install . (the extension with CUDA where a GPU is usable, else CPU-only)

# Tested versions; pip keeps a newer installed torch (>= 2.10) as it is.
FP8MOE_PY_REQS=("torch>=2.10" "transformers==5.17.0" "peft==0.21.2" "accelerate>=1.0" "safetensors" "tqdm" "compressed-tensors"
                "numpy" "nanobind>=2.4" "scikit-build-core>=0.10" "pytest" "trl==1.16.0" "datasets")

fp8moe_gpu_usable() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

fp8moe_python_deps() {
  if python3 -c "import torch, transformers, peft, accelerate, nanobind, scikit_build_core, pytest, tqdm, compressed_tensors, trl, datasets" 2>/dev/null; then
    return 0
  fi
  echo "setup: installing the Python dependencies (torch, transformers, peft, ...) from PyPI" >&2
  if ! python3 -c "import torch" 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "torch==2.11.0"
  fi
  python3 -m pip install -q --disable-pip-version-check "${FP8MOE_PY_REQS[@]}"
}

fp8moe_cutlass_deps() {
  command -v nvcc >/dev/null || return 0
  python3 -c "import cutlass_library" 2>/dev/null && return 0
  echo "setup: installing the CUTLASS headers (nvidia-cutlass) for the W8A8 kernel" >&2
  python3 -m pip install -q --disable-pip-version-check "nvidia-cutlass==4.2.0.0" ||
    echo "setup: nvidia-cutlass did not install; the CUDA backend builds without its W8A8 path" >&2
}

fp8moe_python_install() {
  local cuda=OFF
  fp8moe_gpu_usable && cuda=AUTO
  # No build isolation: the build tools come from fp8moe_python_deps, and the build folder
  # (build/python-*) is reused, so a second install only rebuilds what changed.
  python3 -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    -C cmake.define.FP8MOE_CUDA=$cuda . >&2
}

#!/usr/bin/env bash
# Installs dependencies, builds, and runs the test suite: the C++ tests (GPU tests too where a GPU
# is), then the Python package (pip install .) and its pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
labels=(-L cpu)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && [ -x build/fp8moe_gpu_tests ]; then
  labels=()
fi
ctest --test-dir build --output-on-failure -j"$(nproc)" "${labels[@]}"

# The Python package: installed from this tree, then its tests (CUDA ones where a GPU is usable).
# shellcheck source=scripts/python_env.sh
source scripts/python_env.sh
fp8moe_python_install
python3 -m pytest -q -p no:cacheprovider tests/python tests/bench

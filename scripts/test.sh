#!/usr/bin/env bash
# Installs dependencies, builds, and runs the test suite (CPU tests; GPU tests too where a GPU is).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
labels=(-L cpu)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && [ -x build/fp8moe_gpu_tests ]; then
  labels=()
fi
ctest --test-dir build --output-on-failure -j"$(nproc)" "${labels[@]}"

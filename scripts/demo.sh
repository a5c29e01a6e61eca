#!/usr/bin/env bash
# Installs dependencies, builds, and runs the main job on its embedded default: the C++ demo
# (fp8moe demo: synthetic checkpoints, conversion, checked layer forward/backward, LoRA training),
# then, where torch is installed, the Python path (python -m fp8moe.demo: from_pretrained, PEFT
# LoRA, training with a falling loss, the adapter reloaded by PEFT on the BF16 model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/fp8moe demo "$@"
if python3 -c "import torch" 2>/dev/null; then
  # shellcheck source=scripts/python_env.sh
  source scripts/python_env.sh
  fp8moe_python_install
  (cd /tmp && python3 -m fp8moe.demo)
fi

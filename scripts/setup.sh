#!/usr/bin/env bash
# Installs what fp8moe needs to build and test, from Debian packages and PyPI only.
# Idempotent; skips what is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
need=()
[ -f /usr/include/nlohmann/json.hpp ] || need+=(nlohmann-json3-dev)
[ -d /usr/src/googletest ] || [ -f /usr/include/gtest/gtest.h ] || need+=(libgtest-dev)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v ninja >/dev/null || need+=(ninja-build)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Python package and its tests: torch, transformers, PEFT, nanobind, scikit-build-core, pytest
# (also what the safetensors cross-check tests read with).
# shellcheck source=scripts/python_env.sh
source "$(dirname "$0")/python_env.sh"
fp8moe_python_deps
fp8moe_cutlass_deps

#!/usr/bin/env bash
# Installs dependencies, builds, and runs the main job on its embedded default (fp8moe demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/fp8moe demo "$@"

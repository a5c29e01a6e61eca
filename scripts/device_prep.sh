#!/usr/bin/env bash
# device_prep.sh - run on a developer machine (with a network) before a call to a lent GPU machine
# (without one): fills the two ignored folders that scripts/gpu_check.sh reads there.
#   .deps/  googletest's sources and nlohmann/json.hpp (the device image has neither; CMakeLists.txt
#           falls back to them), the nvidia-cutlass wheel (the W8A8 kernel's headers;
#           cmake/w8a8_cutlass.cmake unpacks it) and the peer script torch_baselines.py
#   .whl/   Python packages the device image lacks, for its Python 3.12 on x86-64: compressed-tensors
#           (the llmcompressor checkpoint tests) and TRL with datasets (tests/python/test_trl.py),
#           with what they need beyond the image. gpu_check.sh installs them into /tmp first.
# Versions are pinned to what the image's own packages accept (datasets 4.x for its pyarrow and
# huggingface_hub, pydantic 2.11 for its typing_extensions). Idempotent; prints the sizes: a call
# carries the working tree and these folders, 64 MiB in all.
#
# Usage: scripts/device_prep.sh [path of torch_baselines.py, default ../shared/bench/torch_baselines.py]
set -euo pipefail
cd "$(dirname "$0")/.."
baselines=${1:-../shared/bench/torch_baselines.py}

mkdir -p .deps/include/nlohmann .whl
if [ ! -f .deps/googletest/CMakeLists.txt ]; then
  src=/usr/src/googletest
  [ -f "$src/CMakeLists.txt" ] || { echo "device_prep: $src not found (apt-get install libgtest-dev)" >&2; exit 1; }
  cp -r "$src" .deps/googletest
fi
if [ ! -f .deps/include/nlohmann/json.hpp ]; then
  hdr=/usr/include/nlohmann/json.hpp
  [ -f "$hdr" ] || { echo "device_prep: $hdr not found (apt-get install nlohmann-json3-dev)" >&2; exit 1; }
  cp "$hdr" .deps/include/nlohmann/json.hpp
fi
if [ -f "$baselines" ]; then
  cp "$baselines" .deps/torch_baselines.py
else
  echo "device_prep: $baselines not found; the bench step will have no peer script" >&2
fi

download() {  # folder, requirements...: binary wheels for the device's interpreter
  local dir=$1; shift
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .deps "nvidia-cutlass==4.2.0.0"
download .whl "compressed-tensors==0.20.1" "pydantic==2.11.7" "pydantic-core==2.33.2" "annotated-types==0.7.0" \
  "typing-inspection==0.4.1" "loguru==0.8.0" "trl==1.16.0" "datasets==4.7.0" "dill==0.4.0" "multiprocess==0.70.18"

# One version of each package: two would stop the device's install.
dups=$(ls .whl/*.whl | xargs -n1 basename | sed 's/-[0-9].*//' | sort | uniq -d)
[ -z "$dups" ] || { echo "device_prep: more than one wheel of: $dups (remove the old ones from .whl/)" >&2; exit 1; }
du -sh .deps .whl

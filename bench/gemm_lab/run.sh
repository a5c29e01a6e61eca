#!/usr/bin/env bash
# Builds the grouped GEMM lab against the project library and runs it (one line per problem and
# variant: time, TFLOP/s, relative error). Usage, from the repository root:
#   bench/gemm_lab/run.sh [build-dir]      (default: build; configures it for sm_90a if needed)
# FP8MOE_LAB_ARCH (default 90a) picks the architecture of the lab objects.
set -euo pipefail
B=${1:-build}
ARCH=${FP8MOE_LAB_ARCH:-90a}
[ -f "$B/build.ninja" ] || cmake -S . -B "$B" -G Ninja -DFP8MOE_CUDA_ARCHS="$ARCH-real" >/dev/null
mkdir -p "$B/gemm_lab"
NVCC=(nvcc -std=c++17 "-gencode=arch=compute_$ARCH,code=sm_$ARCH" -O3 --expt-relaxed-constexpr
      -Iinclude -Isrc -Ibench -DFP8MOE_HAS_CUDA=1)
# The lab's own objects compile while ninja builds the library (and LAB_EXTRA_TARGETS, e.g.
# fp8moe_gpu_tests, so one device call builds everything in parallel).
pids=()
for f in lab.cu; do
  o="$B/gemm_lab/$(echo "$f" | tr / _).o"
  "${NVCC[@]}" -x cu -c "bench/gemm_lab/$f" -o "$o" & pids+=($!)
done
# shellcheck disable=SC2086
ninja -C "$B" -j"$(nproc)" fp8moe ${LAB_EXTRA_TARGETS:-} | tail -5
for p in "${pids[@]}"; do wait "$p"; done
"${NVCC[@]}" "$B"/gemm_lab/*.o -L"$B" -lfp8moe -o "$B/gemm_lab/lab"
"$B/gemm_lab/lab"

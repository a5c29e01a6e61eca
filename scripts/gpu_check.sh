#!/usr/bin/env bash
# gpu_check.sh - the one script to run on a GPU machine (H100/H200, sm_90a): build for the card,
# run the CPU tests and the GPU tests, compute-sanitizer (memcheck + racecheck) on a representative
# subset with small shapes, then the benchmark against the torch peer script. Every log goes under
# $OUT; a short summary table is printed last.
#
# Usage (from anywhere; it works in the repository root):
#   scripts/gpu_check.sh
# Environment:
#   OUT              where logs and results go (default ./out). At most 8 files are written, so
#                    that all of them come back from the lent device machine:
#                      build.log tests.log sanitizer.log bench.log bench.json torch_baselines.json
#                      BENCHMARKS.md model_bench.json (the summary table is printed last)
#   STEPS            the steps to run, in order (default "build sass cpu gpu python sanitize pysanitize bench model";
#                    add "sm80" to also run the GPU tests on the sm_80 code path, JIT from PTX, ~3 min).
#                    python: the pytest suite (tests/python) on CUDA and CPU, torch.compile and CUDA
#                    graphs included, against the extension of this build; sass: the library's
#                    disassembly (FP8 wgmma in the W8A8 kernel, no miscompile-prone VIMNMX.RELU); model: the full-size
#                    fine-tuning benchmark (bench/model_bench.py) beside transformers + PEFT BF16.
#   PYTHON_TESTS     what the python step passes to pytest (default tests/python; e.g.
#                    "tests/python/test_graphs.py" for one file)
#   WHEELS           a folder of Python wheels to install first (default .whl: what the device image
#                    lacks travels this way to a machine without a network; scripts/device_prep.sh
#                    fills it, and .deps/, on a machine with one)
#   BUILD_DIR        build folder (default build-gpu)
#   W8A8             ON (default) or OFF: build the W8A8 (CUTLASS) kernel; OFF builds in about half
#                    the time for runs that need no W8A8 path (its tests then skip)
#   JOBS             parallel build jobs (default 16)
#   GPU_FILTER       gtest filter for the GPU tests (default: all)
#   SANITIZE_FILTER  gtest filter for compute-sanitizer (default: below, small shapes)
#   BENCH_ARGS       arguments for `fp8moe bench` (default: --shape all --tokens 256,4096,16384 --routing both)
#   LAYERPROF_ARGS   arguments of bench/layer_profile.py for the layerprof step (per-kernel GPU time of
#                    one MoE layer, forward and backward; default: Qwen3 and GLM at 16384 tokens, every
#                    precision, without LoRA and with rank 16 on both expert projections; ~40 s;
#                    "--dgrad bf16,fp8 ..." sets W8A8's two input-gradient options side by side,
#                    "--w8a8-env 'lora=addend-gemm;lora=pass,epilogue=vector' ..." any of its settings)
#   MODEL_BENCH_MODELS, MODEL_BENCH_ARGS  the model step's models (default qwen3,glm) and extra arguments
#                    of bench/model_bench.py (e.g. "--compile --configs b"); argument sets separated by
#                    ';' run one after the other on the same machine (e.g. ";--cuda-graph" for an eager
#                    and a graphed run)
#   STEP_TIMEOUT     seconds after which a step is killed and marked FAIL (default 900)
#   CALL_BUDGET      seconds this whole run may take (default: no limit). Set it below the device
#                    call's limit (e.g. 570 of 600): a step is then cut short at the budget and the
#                    later ones are marked "cut", so that the summary and the logs still come back
#                    instead of the call being killed with nothing printed.
#   TORCH_BASELINES  the shared peer script torch_baselines.py. It lives at ../shared/bench/ on
#                    developer machines but does not travel to the device machine: copy it into
#                    .deps/ before a run (cp ../shared/bench/torch_baselines.py .deps/). Default:
#                    .deps/torch_baselines.py if present, else ../shared/bench/torch_baselines.py.
# GoogleTest and nlohmann-json come from .deps/ where the machine lacks them (CMakeLists.txt).
# The exit status is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./out}
STEPS=${STEPS:-"build sass cpu gpu python sanitize pysanitize bench model"}
BUILD_DIR=${BUILD_DIR:-build-gpu}
W8A8=${W8A8:-ON}
JOBS=${JOBS:-16}
GPU_FILTER=${GPU_FILTER:-*}
SANITIZE_FILTER=${SANITIZE_FILTER:-"GroupedGemm.TransposedWeights:GroupedGemm.NarrowNProjections:GroupedGemm.SplitKNarrowProjections:GroupedGemm.LoraDelta:GroupedOuter.*:GroupedGemm.RegAPipelineWrapsAndEdges:Cases/CudaLayer.ForwardBackwardMatchCpu/wgmma_rows_gptoss_channel_bias:CudaBackendPlan.*:CudaBackendCombine.*:CudaBackendPairDot.*:CudaBackendRouter.TiesGoToLowerIndex:CudaBackendFill.*:Cases/CudaLayer.ForwardBackwardMatchCpu/silu_halves_block_lora:Cases/CudaLayer.ForwardBackwardMatchCpu/gptoss_interleaved_channel_bias:Cases/CudaLayer.ForwardBackwardMatchCpu/odd_dims_block_lora:Cases/CudaLayer.ForwardBackwardMatchCpu/tokens0:Cases/CudaLayer.ForwardBackwardMatchCpu/empty_experts:W8a8Quantize.*:Cases/W8a8Gemm.MatchesCpu/channel_gptoss_interleaved_bias_lora_f32:Cases/W8a8Gemm.MatchesCpu/empty_experts:Cases/W8a8Gemm.MatchesCpu/block_store_bf16_lora16_in_place:Cases/W8a8Gemm.MatchesCpu/channel_glu_halves_in_place:Cases/W8a8Gemm.MatchesCpu/channel_store_rows:Cases/W8a8Gemm.MatchesCpu/channel_gptoss_interleaved_runs_lora8_f32:Cases/W8a8Gemm.MatchesCpu/block_store_lora16_wide_f32_out_hot:Cases/CudaLayerW8a8.ForwardBackwardMatchCpu/block_lora:Cases/CudaLayerW8a8.ForwardBackwardMatchCpu/tokens0:Cases/CudaLayerW8a8Down.ForwardBackwardMatchCpu/channel:Cases/W8a8Dgrad.MatchesCpu/odd_dims_block_store_f32_bias:Cases/W8a8Dgrad.MatchesCpu/channel_glu_backward_gptoss_interleaved_lora8:Cases/W8a8Dgrad.MatchesCpu/empty_experts:Cases/W8a8Dgrad.MatchesCpu/tokens0"}
RACECHECK_FILTER=${RACECHECK_FILTER:-"GroupedGemm.LoraDelta:GroupedGemm.NarrowNProjections:GroupedOuter.*:GroupedGemm.RegAPipelineWrapsAndEdges:CudaBackendPlan.ZeroTokens:CudaBackendPlan.OutOfRangeIdsAreExcludedAndReported:CudaBackendCombine.*:Cases/CudaLayer.ForwardBackwardMatchCpu/silu_halves_block_lora:Cases/CudaLayer.ForwardBackwardMatchCpu/empty_experts:W8a8Quantize.*:Cases/W8a8Gemm.MatchesCpu/block_glu_halves_lora:Cases/W8a8Gemm.MatchesCpu/channel_glu_halves_lora24_in_place:Cases/W8a8Dgrad.MatchesCpu/odd_dims_block_store_f32_bias"}
BENCH_ARGS=${BENCH_ARGS:-"--shape all --tokens 256,4096,16384 --routing both"}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
if [ -z "${TORCH_BASELINES:-}" ]; then
  if [ -f .deps/torch_baselines.py ]; then TORCH_BASELINES=.deps/torch_baselines.py; else TORCH_BASELINES=../shared/bench/torch_baselines.py; fi
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=()
FAILED=0
record() {  # step status seconds note
  SUMMARY+=("$(printf '%-10s %-6s %6ss  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = ok ] || [ "$2" = skip ] || FAILED=1
}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
run_timed() {  # name logfile command...: appends to the log, sets STATUS and SECS
  local name=$1 log=$2; shift 2
  local t0=$SECONDS limit=$STEP_TIMEOUT
  if [ -n "${CALL_BUDGET:-}" ]; then  # what is left of the run's budget, if less
    local left=$((CALL_BUDGET - SECONDS))
    if [ "$left" -lt 5 ]; then
      echo "==== $name: cut, the call budget ($CALL_BUDGET s) is spent" >>"$log"
      STATUS=cut SECS=0
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "==== $name: $*" >>"$log"
  # A hung kernel must not eat the whole device call: each step is killed after STEP_TIMEOUT s.
  if timeout --signal=KILL "$limit" "$@" >>"$log" 2>&1; then STATUS=ok; else STATUS=FAIL; fi
  SECS=$((SECONDS - t0))
}
gtest_counts() {  # summarises a gtest log: "N passed, M failed, S skipped"
  local log=$1 p f s
  p=$(grep -c '^\[       OK \]' "$log" || true)
  f=$(grep -c '^\[  FAILED  \] .*(' "$log" || true)
  s=$(grep -c '^\[  SKIPPED \]' "$log" || true)
  echo "$p passed, $f failed, $s skipped"
}
: >"$OUT/build.log"; : >"$OUT/tests.log"; : >"$OUT/sanitizer.log"; : >"$OUT/bench.log"

{
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  nvcc --version | tail -1; cmake --version | head -1
} | tee -a "$OUT/build.log"

WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fp8moe-site \
    "$WHEELS"/*.whl >>"$OUT/build.log" 2>&1 && export PYTHONPATH="/tmp/fp8moe-site${PYTHONPATH:+:$PYTHONPATH}"
fi

BUILT=1
if has_step build; then
  TARGETS=""  # only what the steps run: the Python steps alone need no test programs
  if has_step cpu; then TARGETS="fp8moe_tests"; fi
  if has_step gpu || has_step sanitize || has_step sm80; then TARGETS="$TARGETS fp8moe_gpu_tests"; fi
  if has_step bench; then TARGETS="$TARGETS fp8moe_cli"; fi
  if has_step python || has_step model || has_step pysanitize || has_step layerprof; then TARGETS="$TARGETS fp8moe_python"; fi
  run_timed build "$OUT/build.log" bash -c "cmake -S . -B '$BUILD_DIR' -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DFP8MOE_CUDA=ON -DFP8MOE_CUDA_ARCHS=90a-real -DFP8MOE_W8A8=$W8A8 -DFP8MOE_PYTHON=ON -DPython_EXECUTABLE=$(command -v python3) \
      && ninja -C '$BUILD_DIR' -j$JOBS $TARGETS"
  record build "$STATUS" "$SECS" "$BUILD_DIR (sm_90a), log build.log"
  [ "$STATUS" = ok ] || BUILT=0
  # The W8A8 tests skip where the kernel is absent: a run that did not build it must not pass.
  if [ "$W8A8" = OFF ]; then
    record w8a8 skip 0 "W8A8=OFF: the W8A8 kernel not built, its tests skip"
  elif grep -q "fp8moe: W8A8 kernel ON" "$OUT/build.log"; then
    record w8a8 ok 0 "W8A8 kernel built (CUTLASS)"
  else
    record w8a8 FAIL 0 "W8A8 kernel not built: CUTLASS headers missing (carry .deps with the nvidia_cutlass wheel)"
  fi
fi
if [ "$BUILT" = 0 ]; then
  echo "build failed: skipping the other steps" | tee -a "$OUT/build.log"
  tail -30 "$OUT/build.log"
  STEPS=""
fi

if has_step sass && ! command -v cuobjdump >/dev/null; then
  record sass FAIL 0 "cuobjdump not found"
elif has_step sass && [ -f "$BUILD_DIR/libfp8moe.a" ]; then
  # What the source cannot show. ptxas before CUDA 13.4 can get the predicate of a VIMNMX.RELU
  # wrong on sm_90 (NVIDIA/cccl#11306; it broke the W8A8 quantizer's partial groups), so none may
  # carry a predicate output; and the W8A8 kernel's main loop must be FP8 wgmma (QGMMA).
  sass=$(mktemp)
  cuobjdump -sass "$BUILD_DIR/libfp8moe.a" >"$sass" 2>>"$OUT/build.log"
  relu=$(grep -cE 'VIMNMX[.A-Z0-9]*\.RELU R[0-9]+, P[0-6]' "$sass" || true)
  qgmma=$(grep -c 'QGMMA' "$sass" || true)
  grep -E 'VIMNMX[.A-Z0-9]*\.RELU R[0-9]+, P[0-6]' "$sass" | head -5 >>"$OUT/build.log"
  note="VIMNMX.RELU with a predicate: $relu; QGMMA: $qgmma"
  if [ "$relu" = 0 ] && { [ "$qgmma" -gt 0 ] || ! grep -q "fp8moe: W8A8 kernel ON" "$OUT/build.log"; }; then
    record sass ok 0 "$note"
  else
    record sass FAIL 0 "$note"
  fi
  rm -f "$sass"
fi

if has_step cpu; then
  run_timed cpu "$OUT/tests.log" "$BUILD_DIR/fp8moe_tests"
  record cpu-tests "$STATUS" "$SECS" "$(gtest_counts "$OUT/tests.log")"
fi

if has_step gpu; then
  part=$(mktemp)  # counted apart from the CPU tests, then appended to tests.log
  run_timed gpu "$part" "$BUILD_DIR/fp8moe_gpu_tests" "--gtest_filter=$GPU_FILTER"
  record gpu-tests "$STATUS" "$SECS" "$(gtest_counts "$part")"
  cat "$part" >>"$OUT/tests.log"
  rm -f "$part"
fi

# The Python package runs from the source tree with the extension of this build (a pip install
# would compile every kernel a second time).
if has_step python || has_step model || has_step pysanitize || has_step layerprof; then
  ln -sf "$(pwd)/$BUILD_DIR/python/fp8moe/"_C*.so python/fp8moe/
  export PYTHONPATH="$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if has_step python; then
  part=$(mktemp)
  # shellcheck disable=SC2086
  run_timed python "$part" python3 -m pytest -q -p no:cacheprovider -rs ${PYTHON_TESTS:-tests/python}
  record python "$STATUS" "$SECS" "$(grep -E '(passed|failed)' "$part" | tail -1)"
  cat "$part" >>"$OUT/tests.log"
  rm -f "$part"
fi

if has_step layerprof; then  # every kernel of one layer's forward and backward, per precision (bench.log)
  # shellcheck disable=SC2086
  run_timed layerprof "$OUT/bench.log" python3 bench/layer_profile.py --md "$OUT/BENCHMARKS.md" \
    ${LAYERPROF_ARGS:---precisions w8a16,w8a8,w8a8-down --lora 0,16}
  record layerprof "$STATUS" "$SECS" "its section of BENCHMARKS.md; every kernel in bench.log"
fi

if has_step sm80; then
  # The sm_80 code path on this card: the library built as compute_80 PTX only, JIT-compiled by
  # the driver (mma.sync, cp.async, FP8 decoded by bit moves; the wgmma kernels are absent, so
  # every case runs on mma.sync). Appended to tests.log.
  part=$(mktemp)
  run_timed sm80 "$part" bash -c "cmake -S . -B '$BUILD_DIR-sm80' -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DFP8MOE_CUDA=ON -DFP8MOE_CUDA_ARCHS=80-virtual && ninja -C '$BUILD_DIR-sm80' -j$JOBS fp8moe_gpu_tests \
      && CUDA_CACHE_MAXSIZE=4294967296 '$BUILD_DIR-sm80/fp8moe_gpu_tests' '--gtest_filter=$GPU_FILTER'"
  record sm80-tests "$STATUS" "$SECS" "compute_80 PTX, JIT: $(gtest_counts "$part")"
  cat "$part" >>"$OUT/tests.log"
  rm -f "$part"
fi

if has_step sanitize; then
  run_timed memcheck "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$BUILD_DIR/fp8moe_gpu_tests" "--gtest_filter=$SANITIZE_FILTER"
  record memcheck "$STATUS" "$SECS" "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  run_timed racecheck "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 3 \
    "$BUILD_DIR/fp8moe_gpu_tests" "--gtest_filter=$RACECHECK_FILTER"
  record racecheck "$STATUS" "$SECS" "$(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
fi

if has_step pysanitize; then
  # The Python binding's CUDA paths (MoE and dense ops, forward and backward) under memcheck.
  run_timed pymemcheck "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 -m pytest -q -p no:cacheprovider tests/python/test_ops.py -k "${PYSANITIZE_FILTER:-cuda}"
  record pymemcheck "$STATUS" "$SECS" "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
fi

if has_step bench && [ ! -x "$BUILD_DIR/fp8moe" ]; then
  # The build step builds only what its own call's steps run: a later call with bench alone
  # finds no CLI.
  record bench FAIL 0 "$BUILD_DIR/fp8moe missing: run the bench step with the build step"
elif has_step bench; then
  peer_note="peer $TORCH_BASELINES"
  [ -f "$TORCH_BASELINES" ] || peer_note="peer script missing ($TORCH_BASELINES): ours only"
  # shellcheck disable=SC2086
  # With the W8A8 kernel built, the bench runs again with --precision w8a8 (its table in BENCHMARKS.md).
  w8a8_flag=""
  grep -q "FP8MOE_W8A8:BOOL=ON" "$BUILD_DIR/CMakeCache.txt" 2>/dev/null && w8a8_flag="--w8a8"
  run_timed bench "$OUT/bench.log" python3 bench/run_bench.py --fp8moe "$BUILD_DIR/fp8moe" $w8a8_flag \
    --torch-baselines "$TORCH_BASELINES" --out "$OUT" --md "$OUT/BENCHMARKS.md" -- $BENCH_ARGS
  record bench "$STATUS" "$SECS" "$peer_note; BENCHMARKS.md, bench.json${w8a8_flag:+ (W8A8 too)}"
fi

if has_step model; then  # one run per ';'-separated argument set, in one process each
  IFS=';' read -ra model_runs <<<"${MODEL_BENCH_ARGS:-}"
  [ "${#model_runs[@]}" -gt 0 ] || model_runs=("")
  for model_args in "${model_runs[@]}"; do
    # shellcheck disable=SC2086
    run_timed model "$OUT/bench.log" python3 bench/model_bench.py --models "${MODEL_BENCH_MODELS:-qwen3,glm}" \
      --out "$OUT" --md "$OUT/BENCHMARKS.md" $model_args
    record model "$STATUS" "$SECS" "full-size fine-tuning vs transformers + PEFT BF16 (${model_args:-defaults}): model_bench*.json, bench.log"
  done
fi

{
  echo
  echo "==== summary ($(date -u '+%H:%M UTC'))"
  printf '%-10s %-6s %7s  %s\n' step status time note
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ -f "$OUT/BENCHMARKS.md" ]; then
    echo
    sed -n '/^## Targets/,/^## /p' "$OUT/BENCHMARKS.md" | sed '$d'
  fi
}
exit $FAILED

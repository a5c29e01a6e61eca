#!/usr/bin/env bash
# The sanitizer build and the time-boxed fuzzing (docs/fuzzing.md):
#  1. builds fp8moe with clang, AddressSanitizer + UndefinedBehaviorSanitizer (every report
#     fatal), CUDA off, and the libFuzzer targets of fuzz/;
#  2. runs the CPU tests (ctest -L cpu) on that build;
#  3. runs each fuzz target for FUZZ_SECONDS from the committed seed corpus, with inputs slower
#     than 1 s counted as failures.
# Exit status non-zero on any test failure, sanitizer report, crash, leak, out-of-memory or slow
# input; a failing fuzz input is kept under $OUT with the command that replays it.
# Idempotent: installs what is missing (Debian packages, PyPI) and reuses its build folder.
#
# Environment: BUILD (default build-sanitize), OUT (default $BUILD/fuzz-out), FUZZ_SECONDS
# (per target, default 60), JOBS (build and test parallelism, default nproc), FUZZ_PARALLEL
# (targets fuzzed at once, default nproc, at most 4).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUILD=${BUILD:-build-sanitize}
OUT=${OUT:-$BUILD/fuzz-out}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
JOBS=${JOBS:-$(nproc)}
FUZZ_PARALLEL=${FUZZ_PARALLEL:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
TARGETS=(safetensors config checkpoint layer_inputs)
stamp() { echo "== sanitize_fuzz $(( $(date +%s) - start ))s: $*"; }

# ---- dependencies: the project's, then clang with its runtimes (libFuzzer, ASan, UBSan)
scripts/setup.sh
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' >"$probe/p.cpp"
links() { command -v clang++ >/dev/null && clang++ -fsanitize=fuzzer,address,undefined "$probe/p.cpp" -o "$probe/p" 2>/dev/null; }
if ! links; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null
  # The sanitizer and libFuzzer runtimes ship apart from clang on Debian 12 (libclang-rt-NN-dev).
  major=$(clang++ -dumpversion | cut -d. -f1)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "libclang-rt-$major-dev" >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-rt-dev >/dev/null
  links || { echo "sanitize_fuzz: clang++ cannot link -fsanitize=fuzzer,address,undefined" >&2; exit 1; }
fi

# ---- 1. build
stamp "building $BUILD (clang, ASan + UBSan, fuzz targets)"
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
# Release: -O2 keeps the tests fast; FP8MOE_SANITIZE adds line tables for the reports' stacks.
CC=clang CXX=clang++ cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DFP8MOE_CUDA=OFF \
  -DFP8MOE_SANITIZE=ON -DFP8MOE_FUZZ=ON >/dev/null
if ! cmake --build "$BUILD" -j"$JOBS" >"$BUILD/build.log" 2>&1; then
  grep -E -A12 'FAILED|error:' "$BUILD/build.log" | head -n 80 >&2 || tail -n 80 "$BUILD/build.log" >&2
  echo "sanitize_fuzz: the sanitizer build failed (log: $BUILD/build.log)" >&2
  exit 1
fi

# ---- 2. the CPU tests under the sanitizers
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
rm -rf "$OUT"
mkdir -p "$OUT"
stamp "CPU tests under ASan + UBSan"
if ! ctest --test-dir "$BUILD" -L cpu --output-on-failure -j"$JOBS" >"$OUT/tests.log" 2>&1; then
  grep -E -B2 -A40 'Failure|ERROR: |runtime error|SUMMARY: ' "$OUT/tests.log" | head -n 150 >&2 || true
  sed -n '/The following tests FAILED/,$p' "$OUT/tests.log" >&2
  echo "sanitize_fuzz: CPU tests failed under the sanitizers (log: $OUT/tests.log)" >&2
  exit 1
fi
grep -E 'tests passed' "$OUT/tests.log"

# ---- 3. fuzzing, time-boxed, FUZZ_PARALLEL targets at a time
stamp "fuzzing ${TARGETS[*]}: ${FUZZ_SECONDS}s each, $FUZZ_PARALLEL at a time"
fuzz() {  # target -> $OUT/<target>.log and .rc (libFuzzer's exit status)
  local t=$1 rc=0
  mkdir -p "$OUT/$t.corpus"  # new inputs go here; the committed corpus is only read
  "$BUILD/fuzz_$t" -max_total_time="$FUZZ_SECONDS" -timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -dict="fuzz/$t.dict" -artifact_prefix="$OUT/$t-" -print_final_stats=1 \
    "$OUT/$t.corpus" "fuzz/corpus/$t" >"$OUT/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$OUT/$t.rc"
}
for t in "${TARGETS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$FUZZ_PARALLEL" ]; do sleep 1; done
  fuzz "$t" &
done
wait
failed=()
for t in "${TARGETS[@]}"; do
  if [ "$(cat "$OUT/$t.rc")" = 0 ]; then
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$OUT/$t.log" | awk '{print $2}' || true)
    cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$OUT/$t.log" | grep -oE 'cov: [0-9]+ ft: [0-9]+' | tail -n 1 || true)
    echo "fuzz_$t: ok, ${runs:-?} executions, ${cov:-?}"
  else
    failed+=("$t")
    echo "fuzz_$t: FAILED with status $(cat "$OUT/$t.rc") (log: $OUT/$t.log)"
    grep -E 'ERROR:|SUMMARY:|runtime error|Test unit written|property broken' "$OUT/$t.log" | head -n 8 | sed 's/^/    /' || true
    for a in "$OUT/$t-"*; do
      if [ -f "$a" ]; then echo "    replay: $BUILD/fuzz_$t -timeout=1 $a"; fi
    done
  fi
done
stamp "done"
if [ ${#failed[@]} -gt 0 ]; then
  echo "sanitize_fuzz: fuzzing failed for: ${failed[*]}" >&2
  exit 1
fi

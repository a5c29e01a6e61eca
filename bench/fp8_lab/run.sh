#!/usr/bin/env bash
# Builds the FP8 grouped GEMM lab (CUTLASS headers unpacked from .deps/nvidia_cutlass-*.whl),
# runs the correctness cases, then the benchmark with the torch._scaled_mm peer in the same
# process. Usage, from anywhere:
#   bench/fp8_lab/run.sh [OUTDIR]          (default: $OUT, else bench/fp8_lab/out)
# FP8LAB_CFGS (default "0 1 2 3 4 5 6 7 8 9") picks the configurations to build (configs.cu);
# FP8LAB_BUILD_ONLY=1 stops after the build, FP8LAB_SKIP_BENCH=1 after the correctness cases;
# FP8LAB_REPS (default 20).
# Objects are rebuilt only when configs.cu / grouped_fp8.cuh / lab.cu or the flags change
# (content stamps), so a build folder made on another x86-64 machine with the same nvcc is reused.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
L=bench/fp8_lab
B=$L/build
OUTDIR=${1:-${OUT:-$L/out}}
mkdir -p "$B" "$OUTDIR"
CFGS=${FP8LAB_CFGS:-"0 1 2 3 4 5 6 7 8 9"}
REPS=${FP8LAB_REPS:-20}
JOBS=$(nproc)

CUT=$L/cutlass_headers   # unpacked from the wheel; gitignored, never committed
if [ ! -f "$CUT/cutlass_library/source/include/cutlass/cutlass.h" ]; then
  WHL=$(ls .deps/nvidia_cutlass-*.whl | head -1)
  python3 - "$WHL" "$CUT" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if n.startswith(("cutlass_library/source/include/", "cutlass_library/source/tools/util/include/")):
        z.extract(n, sys.argv[2])
EOF
fi
I=$CUT/cutlass_library/source
FLAGS=(-std=c++17 "-gencode=arch=compute_90a,code=sm_90a" -O3 --expt-relaxed-constexpr -DNDEBUG
       -I"$I/include" -I"$I/tools/util/include" -Xcompiler -fPIC)
stamp() { (cat "$@"; echo "${FLAGS[*]}"; nvcc --version | tail -1) | sha1sum | cut -c1-16; }

{
  echo "# build $(date -u +%FT%TZ) on $(hostname), $(nproc) cores, $(nvcc --version | tail -1)"
  t0=$(date +%s)
  pids=()
  for c in $CFGS; do
    s=$(stamp $L/configs.cu $L/grouped_fp8.cuh)-$c
    if [ "$(cat "$B/cfg$c.stamp" 2>/dev/null)" != "$s" ] || [ ! -f "$B/cfg$c.o" ]; then
      ( t=$(date +%s)
        if nvcc "${FLAGS[@]}" -DFP8LAB_CFG=$c -c $L/configs.cu -o "$B/cfg$c.o" 2>"$B/cfg$c.err"; then
          echo "$s" >"$B/cfg$c.stamp"; echo "cfg$c compiled in $(( $(date +%s) - t )) s"
        else echo "cfg$c FAILED to compile:"; grep -v Warning "$B/cfg$c.err" | head -20; rm -f "$B/cfg$c.o"; fi ) &
      pids+=($!)
    else
      echo "cfg$c up to date"
    fi
  done
  s=$(stamp $L/lab.cu $L/grouped_fp8.cuh)
  if [ "$(cat "$B/lab.stamp" 2>/dev/null)" != "$s" ] || [ ! -f "$B/lab.o" ]; then
    ( t=$(date +%s); nvcc "${FLAGS[@]}" -c $L/lab.cu -o "$B/lab.o" && echo "$s" >"$B/lab.stamp" &&
      echo "lab.o compiled in $(( $(date +%s) - t )) s" ) & pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p"; done
  objs=("$B/lab.o")
  for c in $CFGS; do [ -f "$B/cfg$c.o" ] && objs+=("$B/cfg$c.o"); done
  nvcc -gencode=arch=compute_90a,code=sm_90a "${objs[@]}" -o "$B/lab" &&
  nvcc -gencode=arch=compute_90a,code=sm_90a -shared "${objs[@]}" -o "$B/libfp8lab.so" &&
  echo "linked ${#objs[@]} objects; build took $(( $(date +%s) - t0 )) s"
  ls -la "$B/lab" "$B/libfp8lab.so"
  if command -v cuobjdump >/dev/null; then  # registers / spills of each GEMM kernel
    for c in $CFGS; do [ -f "$B/cfg$c.o" ] && echo "cfg$c: $(cuobjdump --dump-resource-usage "$B/cfg$c.o" 2>/dev/null |
      grep -o 'REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*' | sort | uniq -c | tr '\n' ';')"; done
  fi
} 2>&1 | tee "$OUTDIR/build.log"
[ -x "$B/lab" ] || { echo "no lab binary"; exit 1; }
[ "${FP8LAB_BUILD_ONLY:-0}" = 1 ] && exit 0

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null; } >"$OUTDIR/env.txt" 2>&1

# Correctness: skewed routing (one hot expert, empty experts), random counts with odd shapes
# (N, K not multiples of 128, rows not multiples of 64), per-channel weight scales.
{
  for a in "--shape qwen3_gate_up --rows 128 --dist skew" \
           "--shape qwen3_down --rows 128 --dist skew" \
           "--shape glm_down --rows 128 --dist skew" \
           "--shape glm_gate_up --rows 128 --dist skew --scales channel" \
           "--shape custom --E 8 --N 1000 --K 1040 --rows 200 --dist random" \
           "--shape custom --E 8 --N 1000 --K 1040 --rows 200 --dist random --scales channel" \
           "--shape custom --E 5 --N 264 --K 272 --rows 3 --dist random"; do
    echo "### lab $a"
    # shellcheck disable=SC2086
    timeout 40 "$B/lab" $a --reps 5 --warmup 1 --check 2048 --json "$OUTDIR/lab.jsonl.correct"
    rc=$?; echo "rc=$rc"
    [ $rc = 124 ] && { echo "timed out: stopping"; exit 1; }
  done
} 2>&1 | tee "$OUTDIR/correctness.log"

[ "${FP8LAB_SKIP_BENCH:-0}" = 1 ] && exit 0
PYTHONUNBUFFERED=1 timeout 200 python3 $L/peer_scaled_mm.py --lib "$B/libfp8lab.so" \
  --out "$OUTDIR" --reps "$REPS" 2>&1 | tee "$OUTDIR/bench.log"
cat "$OUTDIR/lab.jsonl.correct" >>"$OUTDIR/lab.jsonl" 2>/dev/null; rm -f "$OUTDIR/lab.jsonl.correct"

# Rows-per-expert sweep (lab only, uniform routing) for the engine's tile heuristic; FP8LAB_SWEEP=0
# skips it. (The first device run also swept raster order / swizzle at 128 rows: README.md.)
[ "${FP8LAB_SWEEP:-1}" = 1 ] && {
  for sh in qwen3_gate_up qwen3_down glm_gate_up glm_down; do
    for rows in 32 64 256 1024; do
      timeout 30 "$B/lab" --shape $sh --rows $rows --cfg coop128_c1x2_sfaK,coop128_c1x1_sfaMN,ping64_c1x1_sfaK \
        --check 256 --reps "$REPS" | grep RESULT
    done
  done
} 2>&1 | tee "$OUTDIR/sweep.log"

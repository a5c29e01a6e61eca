#!/usr/bin/env bash
# GPU time of every launch of one kernel in a gemm_lab problem, from Nsight Compute (the lab's own
# times include the host's call, which dominates for short kernels). Prints the median GPU time
# per variant in the lab's order (every fitting tile shape, the forced splits, "chosen"); each
# variant launches its kernel 19 times (a check, 3 warm-ups, 15 timed).
# Usage, from the repository root, after bench/gemm_lab/run.sh has built the lab in BUILD:
#   bench/gemm_lab/durations.sh BUILD PROBLEM KERNEL_REGEX OUTDIR
#   e.g. bench/gemm_lab/durations.sh build-gpu "dense lora_u K2048 f32w" "Tile<.int.128, .int.32" "$OUT"
# ncu matches the demangled name as it prints it with --kernel-name-base demangled, template values
# cast: "Tile<(int)128, (int)32, ..., (bool)1>" (hence the dots for the parentheses).
# Writes OUTDIR/durations.csv (ncu's raw rows). ncu flushes the caches before each launch (its
# default cache control), so these are cold-cache times.
set -euo pipefail
B=$1 PROBLEM=$2 KERNEL=$3 OUTDIR=$4
LAB_ONLY="$PROBLEM" ncu --kernel-name-base demangled --kernel-name "regex:$KERNEL" --metrics gpu__time_duration.sum \
  --csv "$B/gemm_lab/lab" >"$OUTDIR/durations.csv"
python3 - "$OUTDIR/durations.csv" "$PROBLEM" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
h, body = rows[0], rows[1:]
name, value = h.index("Kernel Name"), h.index("Metric Value")
ns = [float(r[value].replace(",", "")) for r in body]
print(f"{sys.argv[2]}: {len(ns)} launches matched")
for i in range(0, len(ns), 19):
    group = ns[i:i + 19]
    print(f"  launches {i:3d}-{i + len(group) - 1:3d}: median {statistics.median(group) / 1e3:7.1f} us  {body[i][name][:90]}")
PY

#!/usr/bin/env bash
# Profiles one grouped GEMM kernel of the lab with Nsight Compute: the section summary and the
# SASS lines where warps stall most (sampled), so a run answers "what is this kernel waiting on".
# Usage, from the repository root, after bench/gemm_lab/run.sh has built the lab in BUILD:
#   bench/gemm_lab/profile.sh BUILD PROBLEM KERNEL_REGEX OUTDIR
#   e.g. bench/gemm_lab/profile.sh build-gpu "qwen3 gemm1 T4096" "RegA<.int.2" "$OUT"
# KERNEL_REGEX matches the demangled name, template arguments included, as ncu prints them cast
# ("TileSm90RegA<(int)2, ...>"; a dot stands for each parenthesis).
# Writes OUTDIR/ncu_details.txt and OUTDIR/ncu_stalls.txt.
set -euo pipefail
B=$1 PROBLEM=$2 KERNEL=$3 OUTDIR=$4
rep=$(mktemp -d)/prof
LAB_ONLY="$PROBLEM" ncu --kernel-name-base demangled --kernel-name "regex:$KERNEL" --launch-count 1 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
  --section SourceCounters --import-source no -o "$rep" "$B/gemm_lab/lab" >/dev/null
ncu -i "$rep.ncu-rep" --page details >"$OUTDIR/ncu_details.txt"
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv"
python3 - "$rep.csv" >"$OUTDIR/ncu_stalls.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next(i for i, r in enumerate(rows) if "Source" in r)
h, body = rows[hdr], rows[hdr + 1:]
col = lambda name: next(i for i, c in enumerate(h) if c.startswith(name))
src, samp = col("Source"), col("Warp Stall Sampling (All")
addr = col("Address") if any(c.startswith("Address") for c in h) else None
total = sum(float(r[samp] or 0) for r in body if len(r) > samp)
print(f"{len(body)} SASS lines, {total:.0f} stall samples; columns: {h}")
# The 60 hottest lines, each with its 3 predecessors' text for context.
idx = sorted(range(len(body)), key=lambda i: -float(body[i][samp] or 0))[:60]
for i in sorted(idx):
    r = body[i]
    print(f"{float(r[samp] or 0) / total * 100:5.1f}%  {r[addr] if addr is not None else i}  {r[src]}")
PY

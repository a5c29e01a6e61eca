#!/usr/bin/env python3
"""torch._scaled_mm peer for the FP8 grouped GEMM lab, timed in the same process as the lab.

For every case (shape x rows per expert) it times torch's dense FP8 GEMM of the same total size
(M_total x N x K, one weight) with row-wise scales and, where this torch/cuBLAS accepts them, with
1x128 / 128x128 block scales; then it calls the lab's fp8lab_main() from libfp8lab.so (ctypes) on
the same case, in this process, and prints the ratios.

    python3 bench/fp8_lab/peer_scaled_mm.py --lib build/libfp8lab.so --out DIR [--reps 20]

Method, as in the lab: CUDA events around each call, the stream synchronised between calls,
--warmup calls first, the median of --reps. Writes DIR/peer.jsonl (torch), DIR/lab.jsonl (lab)
and DIR/summary.md.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys

import torch

SHAPES = {  # name: (E, N, K)
    "qwen3_gate_up": (128, 1536, 2048),
    "qwen3_down": (128, 2048, 768),
    "glm_gate_up": (64, 3072, 2048),
    "glm_down": (64, 2048, 1536),
}


def time_call(fn, warmup, reps):
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for i in range(warmup + reps):
        s0.record()
        fn()
        s1.record()
        s1.synchronize()
        if i >= warmup:
            ts.append(s0.elapsed_time(s1))
    return statistics.median(ts), min(ts), max(ts)


def time_b2b(fn, reps):
    """reps calls between two events, no sync in between: the host's launch overhead hides
    behind the previous call (added after the two recorded device runs)."""
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    s0.record()
    for _ in range(reps):
        fn()
    s1.record()
    s1.synchronize()
    return s0.elapsed_time(s1) / reps


def rel_frob(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def torch_peer(M, N, K, warmup, reps, log):
    """Dense M x N x K FP8 GEMM through torch._scaled_mm; returns {variant: result dict}."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = ((torch.rand(M, K, device="cuda", generator=g) * 2 - 1) * 448).to(torch.float8_e4m3fn)
    w = ((torch.rand(N, K, device="cuda", generator=g) * 2 - 1) * 448).to(torch.float8_e4m3fn)
    Kb, Nb = (K + 127) // 128, (N + 127) // 128
    flop = 2.0 * M * N * K
    res = {}
    # a small slice checked against an fp64 reference on the same dequantized operands
    rows = torch.arange(0, M, max(1, M // 256), device="cuda")

    def record(name, fn, ref_fn):
        try:
            out = fn()
            torch.cuda.synchronize()
            err = rel_frob(out[rows].float(), ref_fn())
            ms, lo, hi = time_call(fn, warmup, reps)
            ms_b = time_b2b(fn, reps)
            res[name] = dict(ms=ms, ms_min=lo, ms_max=hi, tflops=flop / (ms * 1e-3) / 1e12,
                             relF=err, ms_b2b=ms_b, tflops_b2b=flop / (ms_b * 1e-3) / 1e12)
            log(f"  torch {name:10s} M={M} N={N} K={K}: {ms:.4f} ms  "
                f"{res[name]['tflops']:.1f} TFLOP/s  relF={err:.2e}")
        except Exception as e:  # noqa: BLE001 - report and go on
            res[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"  torch {name:10s} not available: {res[name]['error']}")

    # row-wise: one scale per row of A and per output channel
    sa_r = (torch.rand(M, 1, device="cuda", generator=g) + 0.5) / 448
    sb_r = (torch.rand(1, N, device="cuda", generator=g) + 0.5) / 448
    record("rowwise",
           lambda: torch._scaled_mm(a, w.t(), scale_a=sa_r, scale_b=sb_r, out_dtype=torch.bfloat16),
           lambda: (a[rows].double() * sa_r[rows].double()) @ (w.double() * sb_r.t().double()).t())

    # block-wise: A 1x128 groups, W 128x128 blocks (DeepSeek-style). cuBLAS wants the scales
    # "outer-dim major"; try the layouts torch documents, keep the first that runs.
    sa_b = (torch.rand(M, Kb, device="cuda", generator=g) + 0.5) / 448
    sb_b = (torch.rand(Nb, Kb, device="cuda", generator=g) + 0.5) / 448

    def deq_ref():
        ad = a[rows].double().view(len(rows), Kb, 128) * sa_b[rows].double().unsqueeze(-1)
        wd = w.double().view(Nb, 128, Kb, 128) * sb_b.double()[:, None, :, None]
        return ad.reshape(len(rows), K) @ wd.reshape(N, K).t()

    variants = [
        ("A col-major [M,Kb], B [Nb,Kb] row-major", lambda: sa_b.t().contiguous().t(), lambda: sb_b),
        ("A col-major [M,Kb], B [Kb,Nb] col-major", lambda: sa_b.t().contiguous().t(),
         lambda: sb_b.t()),
        ("A [M,Kb] row-major, B [Nb,Kb]", lambda: sa_b, lambda: sb_b),
    ]
    if K % 128 == 0 and N % 128 == 0:
        for desc, fa, fb in variants:
            sa_, sb_ = fa(), fb()
            record("blockwise",
                   lambda: torch._scaled_mm(a, w.t(), scale_a=sa_, scale_b=sb_,
                                            out_dtype=torch.bfloat16),
                   deq_ref)
            res["blockwise"]["layout"] = desc
            if "error" not in res["blockwise"]:
                break
    del a, w
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="")
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", default="512,128")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--cfg", default="all")
    ap.add_argument("--no-channel", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    peer_path = os.path.join(args.out, "peer.jsonl")
    lab_path = os.path.join(args.out, "lab.jsonl")
    for p in (peer_path, lab_path):
        if os.path.exists(p):
            os.remove(p)

    def log(s):
        print(s, flush=True)

    lib = None
    if args.lib:
        try:
            lib = ctypes.CDLL(os.path.abspath(args.lib))
            lib.fp8lab_main.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            lib.fp8lab_main.restype = ctypes.c_int
        except OSError as e:
            log(f"could not load {args.lib}: {e}; torch numbers only")
            lib = None

    def run_lab(argv):
        argv = ["lab"] + argv + ["--json", lab_path, "--reps", str(args.reps),
                                 "--warmup", str(args.warmup)]
        arr = (ctypes.c_char_p * len(argv))(*[s.encode() for s in argv])
        sys.stdout.flush()
        return lib.fp8lab_main(len(argv), arr)

    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"cuda {torch.version.cuda}")
    # memory ceiling: a 1 GiB device-to-device copy, bytes read + written
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms, _, _ = time_call(lambda: y.copy_(x), args.warmup, args.reps)
    log(f"device-to-device copy: {2 * x.numel() / (ms * 1e-3) / 1e9:.0f} GB/s (read + write)")
    del x, y
    torch.cuda.empty_cache()
    peers = []
    for shape in args.shapes.split(","):
        E, N, K = SHAPES[shape]
        for rows in [int(r) for r in args.rows.split(",")]:
            M = E * rows
            log(f"== {shape} rows/expert={rows}: dense peer M={M} N={N} K={K}")
            res = torch_peer(M, N, K, args.warmup, args.reps, log)
            rec = dict(shape=shape, rows=rows, M=M, N=N, K=K, **{f"torch_{k}": v for k, v in res.items()})
            peers.append(rec)
            with open(peer_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if lib is not None:
                rc = run_lab(["--shape", shape, "--rows", str(rows), "--cfg", args.cfg])
                if rc:
                    log(f"  lab returned {rc}")
                if shape.startswith("glm") and not args.no_channel:
                    rc = run_lab(["--shape", shape, "--rows", str(rows), "--scales", "channel",
                                  "--cfg", args.cfg])
                    if rc:
                        log(f"  lab (channel scales) returned {rc}")

    labs = []
    if os.path.exists(lab_path):
        labs = [json.loads(l) for l in open(lab_path) if l.strip()]
    print(write_summary(peers, labs, args.out, torch.cuda.get_device_name()))


def write_summary(peers, labs, out, device):
    """Markdown table of every uniform-routing lab result next to the torch peer of its case."""
    nan = float("nan")
    lines = [f"device: {device}, torch {torch.__version__}", "",
             "| shape | rows/expert | scales | lab config | lab ms | lab TFLOP/s | relF | "
             "torch rowwise TFLOP/s | ratio | torch blockwise TFLOP/s | ratio | "
             "back-to-back: lab TFLOP/s | torch rowwise | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in peers:
        tr = p.get("torch_rowwise", {}).get("tflops")
        tb = p.get("torch_blockwise", {}).get("tflops")
        trb = p.get("torch_rowwise", {}).get("tflops_b2b")
        for l in labs:
            if l["shape"] != p["shape"] or l["rows"] != p["rows"] or l["dist"] != "uniform":
                continue
            t, tl = l["tflops"], l.get("tflops_b2b", nan)
            lines.append(
                f"| {p['shape']} | {p['rows']} | {l['scales']} | {l['cfg']} | {l['ms']:.4f} | "
                f"{t:.0f} | {l['relF']:.1e} | {tr or nan:.0f} | {(t / tr) if tr else nan:.2f} | "
                f"{tb or nan:.0f} | {(t / tb) if tb else nan:.2f} | {tl:.0f} | {trb or nan:.0f} | "
                f"{(tl / trb) if trb else nan:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()

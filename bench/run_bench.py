#!/usr/bin/env python3
"""Runs `fp8moe bench --json` and the torch peer script (torch_baselines.py) in the same GPU run,
then writes BENCHMARKS.md: the card, the date, the exact commands, our numbers, the peer numbers,
the ratios, and the project's targets marked met / missed.

usage: bench/run_bench.py [--fp8moe build/fp8moe] [--torch-baselines PATH] [--out DIR]
                          [--md BENCHMARKS.md] [-- fp8moe bench arguments...]

The peer script is run as a subprocess with OUT set (it writes OUT/torch_baselines.json). If it is
missing, BENCHMARKS.md says so and carries our numbers alone. Ratios are peer time / our time
(> 1: we are faster), on uniform routing (what the peer script measures) with the same T.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

import md_sections  # bench/, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Our shape name -> the peer script's case name.
PEER_CASE = {"qwen3": "qwen3-30b-a3b", "glm": "glm-4.7-flash"}


def run(cmd, env=None):
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def load(path):
    with open(path) as f:
        return json.load(f)


def index_ours(bench):
    """(shape, T, routing, what, lora) -> result row."""
    return {(r["shape"], r["T"], r["routing"], r["what"], r["lora"]): r for r in bench["results"]}


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def ratio(peer_ms, ours_us):
    if peer_ms is None or ours_us is None or ours_us <= 0:
        return None
    return peer_ms * 1e3 / ours_us


def write_markdown(path, bench, peer, peer_note, commands):
    ours = index_ours(bench)
    dev = bench["device"]
    lines = []
    add = lines.append
    add("# Benchmarks")
    add("")
    add(f"Card: **{dev['name']}** (sm {dev['sm']}, {dev['sms']} SMs, L2 {dev['l2_mib']} MiB, "
        f"{dev['mem_gib']:.0f} GiB). Date: {bench['date']}. Written by `bench/run_bench.py`.")
    add("")
    add("Regenerate on a GPU machine with `scripts/gpu_check.sh` (its bench step runs the commands below")
    add("and writes this file under $OUT); the peer script is ../shared/bench/torch_baselines.py.")
    add("")
    add("Commands (same GPU run):")
    add("")
    for c in commands:
        add(f"    {c}")
    add("")
    ceil = (peer or {}).get("ceilings", {})
    add(f"Device copy bandwidth (read + write): ours {bench['copy_tbps']:.2f} TB/s"
        + (f", torch {ceil['copy_tbps']:.2f} TB/s" if "copy_tbps" in ceil else "")
        + (f"; torch bf16 GEMM {ceil['bf16_gemm_tflops']:.0f} TFLOP/s" if "bf16_gemm_tflops" in ceil else "")
        + (f", FP8 rowwise GEMM {ceil['fp8_gemm_rowwise_tflops']:.0f} TFLOP/s" if "fp8_gemm_rowwise_tflops" in ceil else "")
        + ".")
    add("")
    add("Synthetic FP8 experts: " + "; ".join(
        f"{s['name']} E {s['E']}, top-{s['k']}, H {s['H']}, I {s['I']}, {s['scale']} scales, "
        f"{s['fp8_weight_bytes'] / 1e6:.0f} MB of FP8 weights" for s in bench["shapes"]) + ".")
    add("Times are medians (µs) of CUDA-event timings; TFLOP/s count 6·T·k·H·I forward and twice that")
    add("forward + backward (LoRA FLOPs not counted). Peak = device memory the call adds at its peak.")
    add("")

    # ---- our layer numbers
    add("## fp8moe: whole layer")
    add("")
    add("| shape | T | routing | fwd µs | fwd TFLOP/s | fwd+bwd µs | fwd+bwd TFLOP/s | fwd LoRA µs | fwd+bwd LoRA µs | peak fwd MiB | peak fwd+bwd MiB |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(k[0], k[1], k[2]) for k in ours}, key=lambda x: (x[0], x[1], x[2]))
    for shape, T, routing in keys:
        g = lambda what, lora: ours.get((shape, T, routing, what, lora))
        f, fb, fl, fbl = g("layer_fwd", False), g("layer_fwd_bwd", False), g("layer_fwd", True), g("layer_fwd_bwd", True)
        if not f:
            continue
        add(f"| {shape} | {T} | {routing} | {fmt(f['median_us'])} | {fmt(f['tflops'])} | "
            f"{fmt(fb and fb['median_us'])} | {fmt(fb and fb['tflops'])} | {fmt(fl and fl['median_us'])} | "
            f"{fmt(fbl and fbl['median_us'])} | {fmt(f.get('peak_extra_mib'), 0)} | "
            f"{fmt(fb and fb.get('peak_extra_mib'), 0)} |")
    add("")
    add("## fp8moe: kernels alone (µs, TFLOP/s or GB/s)")
    add("")
    kernels = ["plan", "gemm1", "gemm2", "dgrad2", "dgrad1", "combine"]
    add("| shape | T | routing | " + " | ".join(kernels) + " |")
    add("|---|---|---|" + "---|" * len(kernels))
    for shape, T, routing in keys:
        cells = []
        for kname in kernels:
            r = ours.get((shape, T, routing, kname, False))
            if not r:
                cells.append("-")
            elif r["tflops"] > 0:
                cells.append(f"{r['median_us']:.1f} ({r['tflops']:.0f} TF/s)")
            else:
                cells.append(f"{r['median_us']:.1f} ({r['gbps']:.0f} GB/s)")
        add(f"| {shape} | {T} | {routing} | " + " | ".join(cells) + " |")
    add("")

    # ---- peers
    add("## Peers (torch_baselines.py, same run)")
    add("")
    if not peer:
        add(f"Not measured: {peer_note}.")
        add("")
    else:
        env = peer.get("env", {})
        add(f"torch {env.get('torch')}, CUDA {env.get('cuda')}, on {env.get('gpu')}. Ratios: peer time / ours "
            "(> 1 means fp8moe is faster), uniform routing, our layer without LoRA.")
        add("")
        add("| case | T | ours fwd µs | bf16 µs | ratio | dequant µs | ratio | scaled µs | ratio | ours fwd+bwd µs | bf16 fwd+bwd µs | ratio | dequant fwd+bwd µs | ratio | ours peak MiB | bf16 peak MiB |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in peer.get("moe", []):
            shape = next((s for s, c in PEER_CASE.items() if c == row["case"]), None)
            f = ours.get((shape, row["T"], "uniform", "layer_fwd", False))
            fb = ours.get((shape, row["T"], "uniform", "layer_fwd_bwd", False))
            if not f:
                continue
            us = lambda key: row.get(key + "_ms") and row[key + "_ms"] * 1e3
            add(f"| {row['case']} | {row['T']} | {fmt(f['median_us'])} | {fmt(us('bf16'))} | "
                f"{fmt(ratio(row.get('bf16_ms'), f['median_us']), 2)} | {fmt(us('dequant'))} | "
                f"{fmt(ratio(row.get('dequant_ms'), f['median_us']), 2)} | {fmt(us('scaled'))} | "
                f"{fmt(ratio(row.get('scaled_ms'), f['median_us']), 2)} | {fmt(fb and fb['median_us'])} | "
                f"{fmt(us('bf16_fwdbwd'))} | {fmt(ratio(row.get('bf16_fwdbwd_ms'), fb and fb['median_us']), 2)} | "
                f"{fmt(us('dequant_fwdbwd'))} | {fmt(ratio(row.get('dequant_fwdbwd_ms'), fb and fb['median_us']), 2)} | "
                f"{fmt(f.get('peak_extra_mib'), 0)} | {fmt(row.get('bf16_peak_extra_mib'), 0)} |")
        add("")

    # ---- targets
    add("## Targets")
    add("")
    add("| target | case | measured | status |")
    add("|---|---|---|---|")
    peer_rows = {(r["case"], r["T"]): r for r in (peer or {}).get("moe", [])}
    copy_tbps = ceil.get("copy_tbps", bench["copy_tbps"])
    for s in bench["shapes"]:
        shape, case = s["name"], PEER_CASE.get(s["name"])
        big = ours.get((shape, 16384, "uniform", "layer_fwd", False))
        bigfb = ours.get((shape, 16384, "uniform", "layer_fwd_bwd", False))
        pr = peer_rows.get((case, 16384))

        def target(name, value, goal, text):
            if value is None:
                add(f"| {name} | {shape} | not measured | - |")
            else:
                add(f"| {name} | {shape} | {text} | {'met' if value >= goal else 'missed'} |")

        r1 = ratio(pr and pr.get("bf16_ms"), big and big["median_us"])
        target("fwd 16384 >= 2x torch bf16", r1, 2.0, f"{fmt(r1, 2)}x")
        r2 = ratio(pr and pr.get("dequant_ms"), big and big["median_us"])
        target("fwd 16384 >= 3x reference dequant", r2, 3.0, f"{fmt(r2, 2)}x")
        r3 = ratio(pr and pr.get("bf16_fwdbwd_ms"), bigfb and bigfb["median_us"])
        target("fwd+bwd 16384 >= 1.5x torch bf16", r3, 1.5, f"{fmt(r3, 2)}x")
        small = ours.get((shape, 256, "uniform", "layer_fwd", False))
        floor_us = s["fp8_weight_bytes"] / (copy_tbps * 1e12) * 1e6
        r4 = small and (2 * floor_us) / small["median_us"]
        target("256 tokens within 2x of one FP8 weight read", r4, 1.0,
               f"{fmt(small and small['median_us'])} µs vs 2 x {floor_us:.0f} µs")
        for T in (4096, 16384):
            prow = peer_rows.get((case, T))
            f = ours.get((shape, T, "uniform", "layer_fwd", False))
            ours_mib = f and f.get("peak_extra_mib")
            peer_mib = prow and prow.get("bf16_peak_extra_mib")
            ok = None if ours_mib is None or peer_mib is None else (1.0 if ours_mib <= peer_mib else 0.0)
            target(f"peak memory <= torch bf16 (fwd, T {T})", ok, 1.0,
                   f"{fmt(ours_mib, 0)} MiB vs {fmt(peer_mib, 0)} MiB")
    add("")
    # Sections other commands wrote (convert throughput, full-size fine-tuning) stay as they are.
    kept = md_sections.foreign_sections(path, ["fp8moe: whole layer", "fp8moe: kernels alone", "Peers", "Targets"])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print(f"wrote {path}")


W8A8_SECTION = "W8A8 (FP8 tensor cores) against W8A16, same card"


def w8a8_markdown(w16, w8, peer, commands):
    """Issue 13's tables: the layer and its forward GEMMs under both precisions, the torch peers of
    the same run beside them, and the issue's targets marked met / missed."""
    a, b = index_ours(w16), index_ours(w8)
    dev = w8["device"]
    ceil = (peer or {}).get("ceilings", {})
    peer_rows = {(r["case"], r["T"]): r for r in (peer or {}).get("moe", [])}
    lines = [f"## {W8A8_SECTION}", "",
             f"Card: **{dev['name']}** ({dev['sms']} SMs). Dates: W8A16 {w16['date']}, W8A8 {w8['date']}. "
             "Written by `bench/run_bench.py` (`--w8a8`, or `--render-w8a8` from the saved JSON files).", "",
             "Commands (same machine):", ""] + [f"    {c}" for c in commands] + [
             "", "W8A8: activations quantized to E4M3 in 1x128 groups, CUTLASS's grouped FP8 GEMM, the epilogue "
             "in its own pass; the backward GEMMs stay W8A16. µs are medians of CUDA-event timings; speedup = W8A16 "
             "time / W8A8 time; \"x bf16\" = torch's BF16 path (torch_baselines.py) / ours. Uniform routing.", "",
             "| shape | T | what | W8A16 µs | W8A8 µs | speedup | W8A8 TFLOP/s | W8A16 x bf16 | W8A8 x bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    peer_key = {("layer_fwd", False): "bf16_ms", ("layer_fwd_bwd", False): "bf16_fwdbwd_ms",
                ("layer_fwd_bwd", True): "bf16_lora_fwdbwd_ms"}
    whats = [("layer_fwd", False, "layer fwd"), ("layer_fwd_bwd", False, "layer fwd+bwd"),
             ("layer_fwd", True, "layer fwd, LoRA r16"), ("layer_fwd_bwd", True, "layer fwd+bwd, LoRA r16"),
             ("gemm1", False, "gemm1 (gate_up)"), ("gemm2", False, "gemm2 (down)")]
    keys = sorted({(k[0], k[1]) for k in b if k[2] == "uniform"})
    for shape, T in keys:
        prow = peer_rows.get((PEER_CASE.get(shape), T), {})
        for what, lora, label in whats:
            x, y = a.get((shape, T, "uniform", what, lora)), b.get((shape, T, "uniform", what, lora))
            if not x or not y:
                continue
            pk = peer_key.get((what, lora))
            pms = prow.get(pk) if pk else None
            lines.append(f"| {shape} | {T} | {label} | {fmt(x['median_us'])} | {fmt(y['median_us'])} | "
                         f"{fmt(x['median_us'] / y['median_us'], 2)}x | {fmt(y['tflops'], 0)} | "
                         f"{fmt(ratio(pms, x['median_us']), 2)} | {fmt(ratio(pms, y['median_us']), 2)} |")
    lines += ["", "Targets (issue 13), W8A8:", "", "| target | case | measured | status |", "|---|---|---|---|"]
    dense = ceil.get("fp8_gemm_rowwise_tflops")
    for shape, T in keys:
        if T != 16384:
            continue
        prow = peer_rows.get((PEER_CASE.get(shape), T), {})
        for what, lora, goal, name in (("layer_fwd", False, 4.0, "fwd >= 4x torch bf16"),
                                       ("layer_fwd_bwd", False, 2.5, "fwd+bwd >= 2.5x torch bf16"),
                                       ("layer_fwd_bwd", True, 2.5, "fwd+bwd LoRA >= 2.5x torch bf16 LoRA")):
            y = b.get((shape, T, "uniform", what, lora))
            r = ratio(prow.get(peer_key[(what, lora)]), y and y["median_us"])
            lines.append(f"| {name} | {shape} T {T} | {fmt(r, 2)}x | "
                         f"{'not measured' if r is None else ('met' if r >= goal else 'missed')} |")
        sh = next((s for s in w8["shapes"] if s["name"] == shape), None)
        rows = f" ({T * sh['k'] // sh['E']} rows/expert)" if sh else ""
        for g in ("gemm1", "gemm2"):
            y = b.get((shape, T, "uniform", g, False))
            if y and dense:
                share = y["tflops"] / dense
                lines.append(f"| {g} >= 0.75x torch._scaled_mm dense ({dense:.0f} TFLOP/s) | {shape} T {T}{rows} | "
                             f"{share:.2f}x | {'met' if share >= 0.75 else 'missed'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp8moe", default=os.path.join(ROOT, "build", "fp8moe"), help="the fp8moe CLI")
    ap.add_argument("--torch-baselines", default=None,
                    help="torch_baselines.py (default: .deps/torch_baselines.py, else ../shared/bench/)")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "out")), help="results folder")
    ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"), help="the Markdown report to write")
    ap.add_argument("--w8a8", action="store_true",
                    help="also run the bench with --precision w8a8 and write the W8A8 section")
    ap.add_argument("--render-w8a8", nargs="+", metavar="JSON", default=None,
                    help="run nothing: W8A16.json W8A8.json [torch_baselines.json] (or a --w8a8 run's bench.json "
                         "[torch_baselines.json]) -> the W8A8 section of --md")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then arguments for fp8moe bench")
    a = ap.parse_args()
    if a.render_w8a8:
        files = [load(f) for f in a.render_w8a8]
        if files and "w8a8" in files[0]:  # a bench.json of --w8a8, holding both runs
            files.insert(1, files[0]["w8a8"])
        if len(files) not in (2, 3):
            ap.error("--render-w8a8 takes W8A16.json W8A8.json [torch_baselines.json], or bench.json of a --w8a8 "
                     "run [torch_baselines.json]")
        w16, w8 = files[0], files[1]
        peer = files[2] if len(files) == 3 else None
        if w16["device"]["name"] != w8["device"]["name"]:
            ap.error(f"--render-w8a8: the runs are on different cards ({w16['device']['name']}, {w8['device']['name']})")
        cmds = [w16["command"], w8["command"]] + (["OUT=... python3 torch_baselines.py"] if peer else [])
        md_sections.replace_section(a.md, W8A8_SECTION, w8a8_markdown(w16, w8, peer, cmds))
        print(f"wrote the W8A8 section of {a.md}")
        return 0
    bench_args = [x for x in a.bench_args if x != "--"] if a.bench_args else []
    peer_script = a.torch_baselines
    if peer_script is None:
        cand = os.path.join(ROOT, ".deps", "torch_baselines.py")
        peer_script = cand if os.path.exists(cand) else os.path.join(ROOT, "..", "shared", "bench", "torch_baselines.py")
    os.makedirs(a.out, exist_ok=True)

    bench_json = os.path.join(a.out, "bench.json")
    ours_cmd = [a.fp8moe, "bench", "--json", bench_json] + bench_args
    run(ours_cmd)
    commands = [" ".join(shlex.quote(c) for c in ours_cmd)]

    peer, peer_note = None, ""
    if os.path.exists(peer_script):
        env = dict(os.environ, OUT=a.out, PYTHONUNBUFFERED="1")
        peer_cmd = [sys.executable, peer_script]
        try:
            run(peer_cmd, env=env)
            peer = load(os.path.join(a.out, "torch_baselines.json"))
            commands.append(f"OUT={shlex.quote(a.out)} " + " ".join(shlex.quote(c) for c in peer_cmd))
        except (subprocess.CalledProcessError, OSError, ValueError) as ex:
            peer_note = f"the peer script failed ({ex})"
            print("run_bench: " + peer_note, file=sys.stderr)
    else:
        peer_note = f"peer script not found at {peer_script} (copy shared/bench/torch_baselines.py into .deps/)"
        print("run_bench: " + peer_note, file=sys.stderr)

    write_markdown(a.md, load(bench_json), peer, peer_note, commands)
    if a.w8a8:
        # The W8A8 run's JSON goes into bench.json (key "w8a8"): the device machine returns few files.
        w8_json = os.path.join(a.out, "bench_w8a8.json")
        w8_cmd = [a.fp8moe, "bench", "--precision", "w8a8", "--json", w8_json] + bench_args
        run(w8_cmd)
        ours, w8 = load(bench_json), load(w8_json)
        ours["w8a8"] = w8
        with open(bench_json, "w") as f:
            json.dump(ours, f, indent=1)
        os.remove(w8_json)
        md_sections.replace_section(a.md, W8A8_SECTION, w8a8_markdown(
            ours, w8, peer, commands + [" ".join(shlex.quote(c) for c in w8_cmd)]))
    return 0 if peer is not None else 1


if __name__ == "__main__":
    sys.exit(main())

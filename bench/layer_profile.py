"""Where one MoE expert layer's GPU time goes: every kernel of a forward and a backward, by name, for
each GEMM precision, from torch.profiler (CUDA activity only, so no replay and no counters).

The layer is fp8moe's experts module at a model's real dimensions with random FP8 weights made on
the GPU (bench/model_bench.py's builder), uniform top-k routing, BF16 activations:
  qwen3  E 128, top-8, H 2048, I 768, 128x128 block scales
  glm    E 64, top-4, H 2048, I 1536, per-channel scales
or, for `--models qwen3-attn`, each of Qwen3-30B-A3B's attention projections alone as an FP8 dense
linear (q_proj 2048 -> 4096, k_proj and v_proj 2048 -> 512, o_proj 4096 -> 2048; 128x128 blocks),
x and its LoRA factors (F32, as PEFT holds them) taking gradients.

    python3 bench/layer_profile.py --models qwen3,glm --tokens 16384 --precisions w8a16,w8a8 [--lora 16]
        [--dgrad bf16,fp8 | --w8a8-env "epilogue=general;epilogue=vector,lora=pass"]
        [--json out/layer_profile.json] [--md BENCHMARKS.md]

Prints, per (model, tokens, precision, LoRA rank), the total kernel time of a forward and of a
backward, then each kernel's share (median over --reps profiled iterations); --md writes a table
of them, each phase split by kernel family, into BENCHMARKS.md. --dgrad profiles W8A8 once per
setting of its input-gradient GEMMs (FP8MOE_W8A8_DGRAD, read once per process: one child process
each), labelled "w8a8 (dgrad fp8)" and so on. --w8a8-env does the same for any of W8A8's settings
(FP8MOE_W8A8_DGRAD, _EPILOGUE, _LORA, _TILE: `dgrad`, `epilogue`, `lora`, `tile`), one child per
`;`-separated group of `knob=value` pairs, every --precisions in each, labelled
"w8a8 (epilogue vector, lora pass)" and so on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import md_sections  # noqa: E402  (bench/, beside this script)
from model_bench import _fp8_codes, _scales, build_experts, gpu_work  # noqa: E402

SECTION = "One MoE layer, kernel by kernel (layer_profile.py)"
# The narrow mma.sync tiles (N <= 32: the rank-r LoRA projections U = X A^T and Q = G B) under a
# short name of their own: the same kernel template as the other mma.sync tiles, so their own family.
NARROW = "grouped_gemm_kernel_narrow"
# The kernel families a layer's time is reported in (BENCHMARKS.md), by the kernel's short name.
CATEGORIES = (("LoRA projection GEMM", (NARROW, "split_k_sum")), ("W8A16 GEMM", ("grouped_gemm",)),
              ("CUTLASS FP8 GEMM", ("cutlass", "_ZN7cutlass")),
              ("W8A8 quantize", ("quantize_rows",)), ("W8A8 epilogue", ("epilogue_kernel",)),
              ("W8A8 FP8 dgrad", ("dgrad_kernel", "dgrad_regw_kernel")),
              ("LoRA outer", ("grouped_outer", "outer_split")), ("combine", ("combine",)), ("plan", ("plan_",)))

SHAPES = {"qwen3": dict(E=128, k=8, H=2048, I=768, scheme="block"),
          "glm": dict(E=64, k=4, H=2048, I=1536, scheme="channel")}
# FP8 dense projections (fp8moe's Fp8Linear, G = 1), by model: (name, out N, in K), the scales'
# scheme. qwen3-attn: Qwen3-30B-A3B's attention (32 query and 4 key/value heads of 128, H 2048).
LINEARS = {"qwen3-attn": dict(scheme="block", projections=(("q_proj", 4096, 2048), ("k_proj", 512, 2048),
                                                           ("v_proj", 512, 2048), ("o_proj", 2048, 4096)))}


def short(name: str) -> str:
    """A kernel's name without return type, namespaces, template arguments and parameters (the
    CUTLASS kernel's run to pages); mangled names are cut to 60 characters. The narrow GEMM tiles
    (Tile<128, 32, ...>) are NARROW."""
    if "grouped_gemm_kernel<" in name and "Tile<128, 32," in name:
        return NARROW
    base = name.replace("(anonymous namespace)::", "")
    base = base.split("<", 1)[0].split("(", 1)[0].strip()
    base = base.rsplit(" ", 1)[-1]  # "void f" -> "f"
    return base.rsplit("::", 1)[-1][:60] or name[:60]


def category(short_name: str) -> str:
    """The kernel family of a kernel's short name (CATEGORIES), "other" for the rest."""
    for cat, keys in CATEGORIES:
        if any(k in short_name for k in keys):
            return cat
    return "other"


def section_title(options: str | None, ranks: list[int]) -> str:
    """The run's BENCHMARKS.md section: the plain one, or a variant of its own for W8A8's options
    (`options`: "dgrad" for --dgrad, "settings" for --w8a8-env) and for runs with LoRA on every
    layer, so that each kind of run keeps its table."""
    label = {"dgrad": "W8A8 dgrad options", "settings": "W8A8 settings"}.get(options or "")
    variant = ([label] if label else []) + (["LoRA r " + ",".join(map(str, ranks))] if ranks and all(ranks) else [])
    return SECTION + (" - " + ", ".join(variant) if variant else "")


def markdown(results: list[dict], device: str, command: str, date: str, title: str = SECTION) -> str:
    """BENCHMARKS.md's section: per (model, tokens, precision, LoRA rank), a row per phase (forward,
    backward) with its kernel time and its split by kernel family."""
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = [f"## {title}", "",
             f"Card: **{device}**; {date}. Written by `bench/layer_profile.py` (`{command}`; "
             "`STEPS=layerprof scripts/gpu_check.sh` runs it). The experts module with random FP8 weights at the "
             "model's dimensions (qwen3: E 128, top-8, H 2048, I 768, 128x128 blocks; glm: E 64, top-4, H 2048, "
             "I 1536, per channel), uniform routing, BF16 activations, LoRA on both expert projections where the rank "
             "is not 0. Kernel time from torch.profiler's CUDA activity (medians over the profiled iterations), not "
             "wall time: launch gaps are not counted.", "",
             "| model | T | precision | LoRA r | phase | ms | " + " | ".join(f"{c} µs" for c in cats) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cats)]
    for r in results:
        for phase in ("forward", "backward"):
            split = {c: 0.0 for c in cats}
            for name, ms in r[phase]["kernels"]:
                split[category(name)] += ms
            lines.append(f"| {r['model']} | {r['tokens']} | {r['precision']} | {r['lora_rank']} | {phase} | "
                         f"{r[phase]['total_ms']:.3f} | "
                         + " | ".join(f"{split[c] * 1e3:.0f}" if split[c] else "-" for c in cats) + " |")
    return "\n".join(lines) + "\n"


# W8A8's settings that --w8a8-env sets, each read once per process by the library.
W8A8_KNOBS = ("dgrad", "epilogue", "lora", "tile")


def precision_label(precision: str) -> str:
    """The precision as reported: the W8A8 settings the environment sets beside it (the dgrad one for
    w8a8 only: w8a8-down's backward is W8A16's)."""
    if precision not in ("w8a8", "w8a8-down"):
        return precision
    knobs = [k for k in W8A8_KNOBS if k != "dgrad" or precision == "w8a8"]
    set_ = [f"{k} {os.environ[f'FP8MOE_W8A8_{k.upper()}']}" for k in knobs if os.environ.get(f"FP8MOE_W8A8_{k.upper()}")]
    return f"{precision} ({', '.join(set_)})" if set_ else precision


def parse_w8a8_env(spec: str) -> list[dict[str, str]]:
    """--w8a8-env's groups: "epilogue=general;epilogue=vector,lora=pass" -> one environment update
    per group. An unknown knob or a pair without "=" is an error naming it."""
    groups = []
    for group in spec.split(";"):
        env = {}
        for pair in filter(None, (p.strip() for p in group.split(","))):
            knob, eq, value = pair.partition("=")
            if not eq or knob not in W8A8_KNOBS or not value:
                raise ValueError(f"--w8a8-env: '{pair}' is not knob=value with a knob of {', '.join(W8A8_KNOBS)}")
            env[f"FP8MOE_W8A8_{knob.upper()}"] = value
        groups.append(env)
    return groups


def run_children(a: argparse.Namespace) -> list[dict]:
    """--dgrad or --w8a8-env: this script once per setting, each in its own process (the library reads
    them once per process), and their results in order. --dgrad runs W8A8 only."""
    results: list[dict] = []
    if a.dgrad:
        groups, precisions = [{"FP8MOE_W8A8_DGRAD": s} for s in a.dgrad.split(",")], "w8a8"
    else:
        groups, precisions = parse_w8a8_env(a.w8a8_env), a.precisions
    base = [sys.executable, os.path.abspath(__file__), "--models", a.models, "--tokens", a.tokens,
            "--precisions", precisions, "--lora", a.lora, "--reps", str(a.reps)]
    for group in groups:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            subprocess.run(base + ["--json", out], env=dict(os.environ, **group), check=True)
            with open(out, encoding="utf-8") as f:
                results += json.load(f)["results"]
    return results


def profile_phases(fwd, grad: torch.Tensor, leaves: list, reps: int, device: torch.device) -> dict:
    """Each kernel's GPU time in a forward (`fwd()`) and a backward (from `grad`), medians over
    `reps` profiled iterations after two warm-ups. The leaves' gradients are dropped before every
    backward, so that no accumulation kernel of a repeated backward is counted."""
    def drop_grads():
        for t in leaves:
            t.grad = None

    for _ in range(2):  # warm-up: tile choices, caching allocator
        drop_grads()
        fwd().backward(grad)
    torch.cuda.synchronize(device)
    from torch.profiler import ProfilerActivity, profile

    phases: dict[str, list[dict]] = {"forward": [], "backward": []}
    for _ in range(reps):
        drop_grads()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as pf:
            out = fwd()
            torch.cuda.synchronize(device)
        phases["forward"].append(gpu_work(pf))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as pb:
            out.backward(grad)
            torch.cuda.synchronize(device)
        phases["backward"].append(gpu_work(pb))
    res: dict = {}
    for phase, runs in phases.items():
        names = sorted({n for r in runs for n in r})
        per = {short(n): 0.0 for n in names}
        for n in names:  # kernels that share a short name (template instances) add up
            per[short(n)] += statistics.median(r.get(n, 0.0) for r in runs)
        res[phase] = {"total_ms": sum(per.values()),
                      "kernels": sorted(([k, v] for k, v in per.items()), key=lambda kv: -kv[1])}
    return res


def lora_factor(*shape, device, gen) -> torch.Tensor:
    """A LoRA factor as PEFT holds one: F32, trainable, small random values."""
    return (torch.randn(*shape, device=device, generator=gen) * 0.02).requires_grad_()


def profile_layer(model: str, tokens: int, precision: str, rank: int, reps: int, device: torch.device) -> dict:
    import fp8moe

    s = SHAPES[model]
    gen = torch.Generator(device=device).manual_seed(0)
    experts = build_experts(s["E"], s["H"], s["I"], s["scheme"], device, gen)
    fp8moe.set_gemm_precision(precision, device)
    x = torch.randn(tokens, s["H"], device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    ids = torch.rand(tokens, s["E"], device=device, generator=gen).topk(s["k"], dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(tokens, s["k"], device=device, generator=gen), dim=1).requires_grad_()
    lora, leaves = None, [x, w]
    if rank:
        E, H, I = s["E"], s["H"], s["I"]
        f = [lora_factor(*shape, device=device, gen=gen) for shape in ((E, rank, H), (E, 2 * I, rank), (E, rank, I), (E, H, rank))]
        lora = {"gate_up_proj": (f[0], f[1], 2.0), "down_proj": (f[2], f[3], 2.0)}
        leaves += f
    grad = torch.randn(tokens, s["H"], device=device, dtype=torch.bfloat16, generator=gen)
    res: dict = {"model": model, "tokens": tokens, "precision": precision_label(precision), "lora_rank": rank}
    res.update(profile_phases(lambda: experts(x, ids, w, lora), grad, leaves, reps, device))
    fp8moe.set_gemm_precision("w8a16", device)
    return res


def profile_linear(model: str, proj: tuple, tokens: int, precision: str, rank: int, reps: int,
                   device: torch.device) -> dict:
    """One FP8 dense projection (LINEARS) with LoRA r on it, as the attention of a training step
    runs it: x and the factors take gradients."""
    import fp8moe
    from fp8moe.modeling import Fp8Linear, QuantStack

    name, N, K = proj
    gen = torch.Generator(device=device).manual_seed(0)
    sc, spec = _scales(N, K, 1, LINEARS[model]["scheme"], device, K ** -0.5)
    lin = Fp8Linear(QuantStack(_fp8_codes((1, N, K), device, gen), sc, spec, 1))
    fp8moe.set_gemm_precision(precision, device)
    x = torch.randn(tokens, K, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    lora, leaves = None, [x]
    if rank:
        A, B = lora_factor(rank, K, device=device, gen=gen), lora_factor(N, rank, device=device, gen=gen)
        lora, leaves = (A, B, 2.0), [x, A, B]
    grad = torch.randn(tokens, N, device=device, dtype=torch.bfloat16, generator=gen)
    res: dict = {"model": f"{model} {name}", "tokens": tokens, "precision": precision_label(precision),
                 "lora_rank": rank}
    res.update(profile_phases(lambda: lin(x, lora), grad, leaves, reps, device))
    fp8moe.set_gemm_precision("w8a16", device)
    return res


def profile_all(a: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every (model, tokens, LoRA rank, precision) asked for, each printed kernel by kernel."""
    results = []
    for model in a.models.split(","):
        for tokens in (int(t) for t in a.tokens.split(",")):
            for rank in (int(r) for r in a.lora.split(",")):
                for precision in a.precisions.split(","):
                    runs = [profile_layer(model, tokens, precision, rank, a.reps, device)] if model in SHAPES else \
                        [profile_linear(model, proj, tokens, precision, rank, a.reps, device)
                         for proj in LINEARS[model]["projections"]]
                    for r in runs:
                        results.append(r)
                        print(f"\n{r['model']} T {tokens} {r['precision']} LoRA r {rank}: forward "
                              f"{r['forward']['total_ms']:.3f} ms, backward {r['backward']['total_ms']:.3f} ms of kernels")
                        for phase in ("forward", "backward"):
                            for name, ms in r[phase]["kernels"]:
                                print(f"  {phase[:3]}  {ms * 1e3:9.1f} us  {ms / r[phase]['total_ms'] * 100:5.1f}%  {name}")
                    torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3,glm", help=f"of {', '.join([*SHAPES, *LINEARS])}, comma-separated")
    ap.add_argument("--tokens", default="16384")
    ap.add_argument("--precisions", default="w8a16,w8a8")
    ap.add_argument("--lora", default="0", help="LoRA ranks on both expert projections, or on the dense projection "
                    "(qwen3-attn); 0: none; comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dgrad", default=None,
                    help="W8A8 only, once per setting of FP8MOE_W8A8_DGRAD (bf16, fp8), comma-separated")
    ap.add_argument("--w8a8-env", default=None,
                    help="W8A8 settings side by side: ';'-separated groups of knob=value (knobs: "
                    + ", ".join(W8A8_KNOBS) + "), one child process per group")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="also write the section into this BENCHMARKS.md (its other sections stay)")
    a = ap.parse_args()
    if a.dgrad and a.w8a8_env:
        ap.error("--dgrad and --w8a8-env: one or the other (--dgrad X is --w8a8-env dgrad=X)")
    if a.w8a8_env:
        try:
            parse_w8a8_env(a.w8a8_env)
        except ValueError as e:
            ap.error(str(e))
    unknown = [m for m in a.models.split(",") if m not in SHAPES and m not in LINEARS]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join([*SHAPES, *LINEARS])})")
    if not torch.cuda.is_available():
        print("layer_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"layer_profile on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results = run_children(a) if a.dgrad or a.w8a8_env else profile_all(a, device)
    name = torch.cuda.get_device_name(device)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "results": results}, f, indent=1)
    if a.md:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "bench/layer_profile.py " + " ".join(sys.argv[1:])
        title = section_title("dgrad" if a.dgrad else "settings" if a.w8a8_env else None, [int(r) for r in a.lora.split(",")])
        md_sections.replace_section(a.md, title, markdown(results, name, command, date, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())

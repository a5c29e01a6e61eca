"""Full-size fine-tuning benchmark: fp8moe vs transformers + PEFT in BF16, same card, same process.

Two models at their real dimensions with random weights made on the GPU (no download):
  qwen3  Qwen3-30B-A3B: 48 layers, 128 experts, top-8, H 2048, I 768, FP8 with 128x128 block scales
  glm    GLM-4.7-Flash: transformers' Glm4MoeLiteConfig defaults, FP8 with per-channel scales
Setup (issue 11): sequence 2048, batch 1, gradient checkpointing, AdamW on the LoRA parameters, r 16,
LoRA on (a) the attention projections, (b) attention + experts (PEFT target_parameters).
Peer: the same transformers model in BF16 (grouped_mm experts) + PEFT with the same LoRA.

Reports the median step time and the peak GPU memory of each, and for fp8moe (b) the share of one
step's GPU time spent in fp8moe's MoE ops (torch.profiler). Writes a JSON and a Markdown table.

    python3 bench/model_bench.py --models qwen3,glm --out out/   [--tiny: a small CPU/GPU smoke run]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import md_sections  # noqa: E402  (bench/, beside this script)

SECTION = "Full-size fine-tuning: fp8moe vs transformers + PEFT (BF16)"
ATTN = {"qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "glm": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def config(name: str, tiny: bool):
    import transformers as tf

    if name == "qwen3":
        kw = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)
        if tiny:
            kw.update(vocab_size=1024, num_hidden_layers=2, num_experts=16)
        return tf.Qwen3MoeConfig(**kw)
    kw = {}
    if tiny:
        kw = dict(vocab_size=1024, num_hidden_layers=3, n_routed_experts=16,
                  mlp_layer_types=["dense", "sparse", "sparse"])
    return tf.Glm4MoeLiteConfig(**kw)


def _fp8_codes(shape, device, gen) -> torch.Tensor:
    """Random finite E4M3 codes (normal values), as uint8 bytes."""
    return (torch.randn(shape, device=device, generator=gen) * 2.0).to(torch.float8_e4m3fn).view(torch.uint8)


def _scales(rows: int, cols: int, E: int, scheme: str, device, std: float) -> tuple[torch.Tensor, list]:
    if scheme == "block":
        spec = [3, rows, cols, 1, 128, 128]
        shape = (E, -(-rows // 128), -(-cols // 128))
    else:
        spec = [2, rows, cols, 1, 1, cols]
        shape = (E, rows, 1)
    # codes have std ~2: scale so that weights have std ~`std`
    return torch.full(shape, std / 2.0, device=device, dtype=torch.float32), spec


def build_experts(E: int, H: int, I: int, scheme: str, device: torch.device, gen) -> nn.Module:
    """An fp8moe experts module with random FP8 weights [E, 2I, H] / [E, H, I], SiLU-GLU (gate and up
    halves), made on `device`: 128x128 block scales ("block", gate and up on separate grids as the
    loader stacks them) or per-channel scales ("channel")."""
    from fp8moe.modeling import Fp8Experts, QuantStack

    gsc, gspec = _scales(2 * I, H, E, scheme, device, H ** -0.5)
    dsc, dspec = _scales(H, I, E, scheme, device, I ** -0.5)
    if scheme == "block":
        gspec[3] = 2
        gsc = gsc.new_full((E, 2 * -(-I // 128), -(-H // 128)), float(gsc.flatten()[0]))
    return Fp8Experts(QuantStack(_fp8_codes((E, 2 * I, H), device, gen), gsc, gspec, 1),
                      QuantStack(_fp8_codes((E, H, I), device, gen), dsc, dspec, 1), [0.0, 0.0, 1.702, 7.0])


def build_fp8moe(cfg, scheme: str, device: torch.device, seed: int) -> nn.Module:
    """The transformers model with fp8moe modules holding random FP8 weights, made on the GPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from fp8moe.modeling import Fp8Linear, QuantStack

    gen = torch.Generator(device=device).manual_seed(seed)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    for name, mod in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(mod, "gate_up_proj") and attr == "experts":
            E, two_i, H = mod.gate_up_proj.shape
            setattr(parent, attr, build_experts(E, H, two_i // 2, scheme, device, gen))
        elif isinstance(mod, nn.Linear) and attr != "lm_head" and not attr.startswith("gate"):
            N, K = mod.weight.shape
            sc, spec = _scales(N, K, 1, scheme, device, K ** -0.5)
            bias = None if mod.bias is None else torch.zeros(1, N, device=device)
            setattr(parent, attr, Fp8Linear(QuantStack(_fp8_codes((1, N, K), device, gen), sc, spec, 1), bias))
    _materialize(model, device, gen)
    from fp8moe.loss import use_chunked_loss

    use_chunked_loss(model)  # as fp8moe.from_pretrained does
    return model


def _materialize(model: nn.Module, device, gen) -> None:
    """Every parameter / buffer still on the meta device: random (norms: ones) on `device`."""
    for mod_name, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for pname, t in list(store.items()):
                if t is None:
                    continue
                if t.is_meta:
                    v = torch.ones(t.shape, device=device, dtype=t.dtype) if "norm" in mod_name or "norm" in pname \
                        else (torch.randn(t.shape, device=device, generator=gen) * 0.02).to(t.dtype)
                else:
                    v = t.to(device)
                store[pname] = nn.Parameter(v, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else v


def build_peer(cfg, device: torch.device, seed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, experts_implementation="grouped_mm")
    return model


def gpu_work(p) -> dict[str, float]:
    """A profile's GPU activity (kernels, copies, memsets) in ms by name. The GPU-side spans of
    record_function labels (fp8moe's calls, Optimizer.step, ...) are not work: they are dropped by
    their flag, and by name where a label's CPU event names them."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = list(p.events())
    labels = {e.name for e in events if e.device_type == cpu and e.is_user_annotation}
    work: dict[str, float] = {}
    for e in events:
        if e.device_type == cuda and not e.is_user_annotation and e.name not in labels:
            work[e.name] = work.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    return work


def host_profile(p) -> dict:
    """The host side of a profiled step: the time inside fp8moe's calls (the ranges ops.py labels
    fp8moe.*, Python glue included) and what they launch and allocate, beside the whole step's
    kernel launches and its largest CPU operators by self time."""
    launches = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")

    def in_ours(e) -> bool:
        while e is not None:
            if e.name.startswith("fp8moe."):
                return True
            e = e.cpu_parent
        return False

    calls: dict[str, list] = {}
    launch_all = launch_ours = empty_ours = 0
    for e in p.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if e.name.startswith("fp8moe."):
            c = calls.setdefault(e.name, [0, 0.0])
            c[0] += 1
            c[1] += e.cpu_time_total / 1e3
        elif e.name in launches:
            launch_all += 1
            launch_ours += in_ours(e)
        elif e.name == "aten::empty" and in_ours(e):
            empty_ours += 1
    avg = sorted(p.key_averages(), key=lambda a: -a.self_cpu_time_total)[:12]
    return {"calls": {k: {"count": n, "cpu_ms": ms} for k, (n, ms) in sorted(calls.items())},
            "launches": launch_all, "launches_in_fp8moe": launch_ours, "empty_in_fp8moe": empty_ours,
            "top_self_cpu": [(a.key[:60], a.count, a.self_cpu_time_total / 1e3) for a in avg]}


def live_at_peak(trace: list, top: int = 12) -> tuple[int, list]:
    """Replays an allocator trace (torch.cuda.memory._snapshot()'s device_traces entry) to its
    highest point: the bytes then live, and those blocks grouped by the innermost frame in fp8moe,
    transformers, PEFT or this script (else the innermost frame), largest first, as
    (where, bytes, blocks)."""
    def replay(stop: int) -> tuple[dict, int, int]:  # live blocks after event `stop`, and the peak's event
        live: dict[int, tuple[int, list]] = {}
        cur = peak = 0
        at = -1
        for i, ev in enumerate(trace[:stop + 1]):
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames") or [])
                cur += ev["size"]
                if cur > peak:
                    peak, at = cur, i
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                cur -= live.pop(ev["addr"])[0]
        return live, peak, at

    # Two passes: the peak's event first, then the blocks live there (copying the live set at
    # every new high would be quadratic in a step's ~10^4-10^5 allocations).
    _, peak, at = replay(len(trace) - 1)
    peak_live = replay(at)[0] if at >= 0 else {}

    def where(frames: list) -> str:
        for f in frames:
            name = f.get("filename", "")
            if any(k in name for k in ("fp8moe", "transformers", "peft", "model_bench")):
                return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
        return f"{os.path.basename(frames[0].get('filename', '?'))}:{frames[0].get('line')}" if frames else "?"

    groups: dict[str, list] = {}
    for size, frames in peak_live.values():
        g = groups.setdefault(where(frames), [0, 0])
        g[0] += size
        g[1] += 1
    return peak, [(k, v[0], v[1]) for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]]


def memory_at_peak(step, device) -> dict:
    """What is live at the peak of one step (live_at_peak over torch's allocator history of the
    step). Blocks allocated before the step (weights, adapters, optimizer state) are the baseline."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    try:
        step()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, top = live_at_peak(snap["device_traces"][device.index or 0])
    return {"baseline_gib": base / 2**30, "step_peak_gib": peak / 2**30,
            "top": [(k, b / 2**30, n) for k, b, n in top]}


def routing_stats(model: nn.Module, seq: int, device) -> dict:
    """Rows per expert in each MoE layer for one forward of `seq` random tokens (the timed steps'
    kind of input): the tile dispatch sees only the average, so the spread is what a tile shape's
    measured gain on uniform routing (gemm_lab) may not carry over to. Per layer: the largest
    expert's rows over the average, and the share of rows in experts above 1.5x the average."""
    from fp8moe.modeling import Fp8Experts

    layers: list[dict] = []

    def hook(mod, args):
        idx = args[1].reshape(-1)
        counts = torch.bincount(idx, minlength=mod.num_experts).float()
        mean = counts.sum() / counts.numel()
        layers.append({"mean": float(mean), "max": float(counts.max()),
                       "share_over_1_5x": float(counts[counts > 1.5 * mean].sum() / counts.sum())})

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Fp8Experts)]
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            model(input_ids=torch.randint(0, model.config.vocab_size, (1, seq), device=device, generator=gen))
    finally:
        for h in handles:
            h.remove()
    if not layers:
        return {}
    ratios = sorted(l["max"] / max(l["mean"], 1e-9) for l in layers)
    return {"layers": len(layers), "rows_per_expert_mean": layers[0]["mean"],
            "max_over_mean_median": ratios[len(ratios) // 2], "max_over_mean_max": ratios[-1],
            "share_over_1_5x_median": sorted(l["share_over_1_5x"] for l in layers)[len(layers) // 2],
            "per_layer_max": [l["max"] for l in layers]}


def measure(model: nn.Module, targets: dict, seq: int, steps: int, warmup: int, device, profile: bool,
            compile_layers: bool = False, compile_mode: Optional[str] = None, step_in_backward: bool = False,
            cuda_graph: bool = False, memory: bool = False) -> dict:
    import peft
    from fp8moe.graphs import CudaGraphStep
    from fp8moe.optim import StepAfterBackward, StepInBackward

    model.config.use_cache = False
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, **targets))
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    if compile_layers:  # each decoder layer through torch.compile (one graph serves every layer of a kind)
        from fp8moe import compile_decoder_layers

        compile_decoder_layers(pm, compile_mode)
    params = [p for p in pm.parameters() if p.requires_grad]
    # Fused on the GPU, as transformers' Trainer defaults to (adamw_torch_fused) and fp8moe.finetune
    # uses; the foreach path holds temporaries as large as the adapters at the step.
    def adamw(ps):
        return torch.optim.AdamW(ps, lr=1e-5, fused=device.type == "cuda", capturable=cuda_graph)

    # --step-in-backward: each decoder layer's adapters step as soon as backward has their gradients
    # (fp8moe.optim), so the step's peak does not hold every adapter gradient.
    stepper = (StepInBackward if step_in_backward else StepAfterBackward)(pm, adamw)
    # --cuda-graph: the whole step (forward, loss, backward, AdamW) captured once after `warmup`
    # eager steps and replayed (fp8moe.graphs.CudaGraphStep).
    graphed = CudaGraphStep(pm, stepper, warmup_steps=max(1, warmup)) if cuda_graph else None
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        ids = torch.randint(0, vocab, (1, seq), device=device, generator=gen)
        if graphed is not None:
            return graphed(input_ids=ids, labels=ids)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        stepper.finish()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem = None
    if graphed is not None:  # the capture: the graph's memory is what it allocates here, so the peak counts it
        if memory and device.type == "cuda":  # what is live at the capture's peak: the replays' memory
            mem = memory_at_peak(step, device)
        else:
            step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss = step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"step_ms": statistics.median(times), "step_ms_all": times, "loss": float(loss.detach()),
           "lora_tensors": len(params), "lora_with_grad": None}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    if memory and device.type == "cuda":
        out["memory"] = mem if graphed is not None else memory_at_peak(step, device)
        print(json.dumps(out["memory"], indent=1), flush=True)
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            step()
            torch.cuda.synchronize()
        kernels = gpu_work(p)
        total = sum(kernels.values())
        ours = sum(v for k, v in kernels.items() if "fp8moe::cuda" in k)
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
        out["profile"] = {"gpu_ms": total, "fp8moe_kernels_ms": ours, "fp8moe_share": ours / max(total, 1e-9),
                          "top": [(k[:90], v) for k, v in top], "host": host_profile(p)}
    if graphed is not None:
        graphed.close()  # its memory pool, before the eager check below
    stepper.remove()  # the check below keeps its gradients
    with torch.no_grad():
        pm.zero_grad(set_to_none=True)
    # every LoRA tensor gets a gradient (checked once, on the last step's graph)
    ids = torch.randint(0, vocab, (1, min(seq, 256)), device=device, generator=gen)
    pm(input_ids=ids, labels=ids).loss.backward()
    out["lora_with_grad"] = sum(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    pm.zero_grad(set_to_none=True)
    del stepper
    pm.unload()
    return out


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen3,glm")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="small layer counts and vocabularies: a smoke run")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every decoder layer, for fp8moe and the peer alike (results go to "
                        "model_bench_compiled*.json and a section of their own)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile's mode with --compile (e.g. reduce-overhead: CUDA graphs per layer)")
    p.add_argument("--precision", choices=("w8a16", "w8a8", "w8a8-down"), default="w8a16",
                   help="fp8moe's forward FP8 GEMMs (fp8moe.set_gemm_precision); w8a8 needs Hopper")
    p.add_argument("--step-in-backward", action="store_true",
                   help="fp8moe steps AdamW per decoder layer during backward (fp8moe.optim.StepInBackward, "
                        "`fp8moe finetune --step-in-backward`); the peer steps after backward as usual")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each side's whole training step in one CUDA graph after the warm-up steps and "
                        "replay it (fp8moe.graphs.CudaGraphStep; the peer too, a failure to capture is reported)")
    p.add_argument("--profile", action="store_true",
                   help="profile one step of every fp8moe configuration run (default: (b) in eager runs only)")
    p.add_argument("--memory", action="store_true",
                   help="what is live at one step's peak (torch's allocator history), grouped by where it was "
                        "allocated; printed and in the JSON. Eager: one step after the timed ones; with "
                        "--cuda-graph: the capture (the baseline then holds the warm-up's gradients, which "
                        "the capture frees before it allocates its own)")
    p.add_argument("--configs", default="a,b", help="the LoRA configurations to run: a (attention), b (+ experts)")
    p.add_argument("--out", default="out", help="folder for model_bench*.json and model_bench*.md (suffix: the variant)")
    p.add_argument("--md", default=None, help="also write the section into this BENCHMARKS.md (its other sections stay)")
    p.add_argument("--render", nargs="+", metavar="JSON", default=None,
                   help="measure nothing: merge these model_bench*.json files (same card and variant, e.g. one "
                        "run per model) into one table, printed and, with --md, written into BENCHMARKS.md")
    a = p.parse_args()
    if a.render:
        results = merge_results(a.render)
        md = markdown(results)
        print(md)
        if a.md:
            md_sections.replace_section(a.md, section_title(results), md)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import fp8moe  # ops and the PEFT hookup

    fp8moe.set_gemm_precision(a.precision, device)
    # Each variant (precision, compiled layers) has its own JSON and BENCHMARKS.md section.
    variant = ([f"compiled layers ({a.compile_mode or 'default'} mode)"] if a.compile else []) + \
        ({"w8a8": ["W8A8 forward GEMMs"], "w8a8-down": ["W8A8 down projection"]}.get(a.precision, [])) + \
        (["fp8moe steps in backward"] if a.step_in_backward else []) + \
        (["whole step in a CUDA graph"] if a.cuda_graph else [])
    suffix = ("_compiled" if a.compile else "") + ("" if a.precision == "w8a16" else "_" + a.precision.replace("-", "_")) + \
        ("_step_in_backward" if a.step_in_backward else "") + ("_cuda_graph" if a.cuda_graph else "")

    os.makedirs(a.out, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"card": card, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seq": a.seq,
               "compiled_layers": a.compile, "compile_mode": a.compile_mode, "precision": a.precision,
               "cuda_graph": a.cuda_graph,
               "optimizer": "fused AdamW" if device.type == "cuda" else "AdamW",
               "variant": ", ".join(variant),
               "torch": torch.__version__, "command": " ".join(sys.argv), "models": {}}
    for name in a.models.split(","):
        cfg = config(name, a.tiny)
        targets = {"a": dict(target_modules=ATTN[name]), "b": dict(target_modules=ATTN[name],
                                                                     target_parameters=EXPERTS)}
        r = results["models"].setdefault(name, {})
        scheme = "block" if name == "qwen3" else "channel"
        for impl in ("fp8moe", "peer"):  # the peer is the same in every variant
            if impl == "peer" and a.skip_peer:
                continue
            t0 = time.time()
            model = build_fp8moe(cfg, scheme, device, 0) if impl == "fp8moe" else build_peer(cfg, device, 0)
            built = time.time() - t0
            if impl == "fp8moe":
                r["routing"] = routing_stats(model, a.seq, device)
                print(f"{name} routing: {json.dumps({k: v for k, v in r['routing'].items() if k != 'per_layer_max'})}",
                      flush=True)
            failed = None
            for k in a.configs.split(","):
                if failed:  # the model may still hold the failed configuration's adapters
                    r[f"{impl}_{k}"] = {"error": f"not run: configuration {failed} failed before it"}
                    continue
                try:
                    res = measure(model, targets[k], a.seq, a.steps, a.warmup, device,
                                  profile=impl == "fp8moe" and (a.profile or (k == "b" and not a.compile)),
                                  compile_layers=a.compile, compile_mode=a.compile_mode,
                                  step_in_backward=a.step_in_backward and impl == "fp8moe",
                                  cuda_graph=a.cuda_graph, memory=a.memory and impl == "fp8moe")
                except Exception as e:  # a side that fails is a result too (say, the peer under torch.compile)
                    failed = k
                    res = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
                    print(f"{name} {impl} ({k}): FAILED {res['error']}", flush=True)
                    traceback.print_exc()  # the whole chain (a capture's first failing op is in its cause)
                else:
                    print(f"{name} {impl} ({k}): {res['step_ms']:.0f} ms/step, peak "
                          f"{res.get('peak_gib', float('nan')):.1f} GiB, LoRA tensors with grad "
                          f"{res['lora_with_grad']}/{res['lora_tensors']}", flush=True)
                if a.compile:
                    torch._dynamo.reset()  # the next configuration's modules are new
                res["build_s"] = built
                r[f"{impl}_{k}"] = res
            del model
            free(device)
    with open(os.path.join(a.out, f"model_bench{suffix}.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    print(md)
    if not a.tiny:  # the section BENCHMARKS.md takes as it is (into --md, else a file of its own)
        if a.md:
            md_sections.replace_section(a.md, section_title(results), md)
        else:
            with open(os.path.join(a.out, f"model_bench{suffix}.md"), "w") as f:
                f.write(md + "\n")
    return 0


def merge_results(paths: list[str]) -> dict:
    """One results dict from several runs of this script on the same card and variant: their models
    side by side (a later file's entry wins), every command and date kept."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    first = runs[0]
    for path, r in zip(paths, runs):
        for key in ("card", "seq", "torch", "variant", "optimizer"):
            if r.get(key) != first.get(key):
                raise SystemExit(f"--render: {path} has {key} {r.get(key)!r}, {paths[0]} has {first.get(key)!r}; "
                                 "only runs of the same card, sequence, torch, variant and optimizer share a table")
    merged = dict(first, models={})
    for r in runs:
        for name, entries in r["models"].items():
            merged["models"].setdefault(name, {}).update(entries)
    merged["command"] = "; ".join(dict.fromkeys(r["command"] for r in runs))
    merged["date"] = ", ".join(dict.fromkeys(r["date"] for r in runs))
    return merged


def _ok(x: Optional[dict]) -> bool:
    return bool(x) and "step_ms" in x


def section_title(res: dict) -> str:
    return SECTION + (f" - {res['variant']}" if res.get("variant") else "")


def markdown(res: dict) -> str:
    lines = [f"## {section_title(res)}", "",
             f"Card: **{res['card']}**; {res['date']}; torch {res['torch']}. Written by `bench/model_bench.py` "
             f"(`{res['command']}`; `STEPS=model scripts/gpu_check.sh` runs it). Random weights at the real "
             f"dimensions (Qwen3-30B-A3B: FP8 128x128 blocks; GLM-4.7-Flash: FP8 per channel); sequence "
             f"{res['seq']}, batch 1, gradient checkpointing, {res.get('optimizer', 'AdamW (foreach)')} on LoRA r 16. "
             "Step: median of CUDA-event "
             "timings after warm-up; peak: torch.cuda.max_memory_allocated. The peer is the same transformers "
             "model in BF16 (`grouped_mm` experts) with PEFT and the same LoRA, in the same process. fp8moe's side computes "
             "the loss as `fp8moe.from_pretrained` sets it up (`fp8moe.loss`: made from the hidden states a chunk of rows at a time, no logits held whole); the "
             "peer's is transformers' own." + (
                 " Both sides' whole step (forward, loss, backward, AdamW) is captured in one CUDA graph after the "
                 "warm-up and replayed (`fp8moe.graphs.CudaGraphStep`); the peak counts the capture's allocations, "
                 "which the replays reuse." if res.get("cuda_graph") else ""), "",
             "| model | LoRA on | fp8moe step | peer step | speedup | fp8moe peak | peer peak | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    failures = []
    for name, r in res["models"].items():
        for k, what in (("a", "attention"), ("b", "attention + experts")):
            o, q = r.get(f"fp8moe_{k}"), r.get(f"peer_{k}")
            if not o and not q:
                continue
            for side, x in (("fp8moe", o), ("peer", q)):
                if x and "error" in x:
                    failures.append(f"- {name} {side} ({k}): {x['error']}")
            step = lambda x: f"{x['step_ms']:.0f} ms" if _ok(x) else ("failed" if x else "-")  # noqa: E731
            peak = lambda x: f"{x['peak_gib']:.1f} GiB" if _ok(x) and "peak_gib" in x else "-"  # noqa: E731
            both = _ok(o) and _ok(q)
            sp = f"{q['step_ms'] / o['step_ms']:.2f}x" if both else "-"
            mem = f"{o['peak_gib'] / q['peak_gib']:.2f}" if both and "peak_gib" in o and "peak_gib" in q else "-"
            lines.append(f"| {name} | {what} | {step(o)} | {step(q)} | {sp} | {peak(o)} | {peak(q)} | {mem} |")
    if failures:
        lines += ["", "Failed (measured nothing):", ""] + failures
    for name, r in res["models"].items():
        rt = r.get("routing")
        if rt:  # what the tile dispatch, which sees the average only, meets in this model
            lines.append(f"\n{name} routing (one forward of the step's kind of random tokens): "
                         f"{rt['rows_per_expert_mean']:.0f} rows per expert on average; the largest expert holds "
                         f"{rt['max_over_mean_median']:.1f}x that in the median layer and {rt['max_over_mean_max']:.1f}x "
                         f"at most; experts above 1.5x the average hold {rt['share_over_1_5x_median']:.0%} of the "
                         "rows (median layer).")
    q = res["models"].get("qwen3", {})
    if all(_ok(q.get(x)) for x in ("fp8moe_a", "fp8moe_b", "peer_a", "peer_b")):
        a, b, pa, pb = q["fp8moe_a"], q["fp8moe_b"], q["peer_a"], q["peer_b"]
        rows = [("(b) >= 2.5x faster than the peer", f"{pb['step_ms'] / b['step_ms']:.2f}x",
                 pb["step_ms"] / b["step_ms"] >= 2.5),
                ("(b) peak <= 0.55x the peer's", f"{b['peak_gib'] / pb['peak_gib']:.2f}x",
                 b["peak_gib"] / pb["peak_gib"] <= 0.55),
                ("(a) >= 2x faster than the peer", f"{pa['step_ms'] / a['step_ms']:.2f}x",
                 pa["step_ms"] / a["step_ms"] >= 2.0),
                ("(a) peak <= 34 GB", f"{a['peak_gib'] * 2**30 / 1e9:.1f} GB", a["peak_gib"] * 2**30 / 1e9 <= 34.0),
                ("every LoRA tensor gets a gradient", f"{b['lora_with_grad']}/{b['lora_tensors']}",
                 b["lora_with_grad"] == b["lora_tensors"])]
        lines += ["", "Targets (issue 11, Qwen3-30B-A3B):", "", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in rows]
    for (name, r), cfg in ((m, c) for m in res["models"].items() for c in ("a", "b")):
        pr = (r.get(f"fp8moe_{cfg}") or {}).get("profile")
        if pr:
            # GPU activity well below the step time: the GPU waited for the host (launch-bound).
            lines.append(f"\n{name} ({cfg}), one profiled step (torch.profiler): {pr['gpu_ms']:.0f} ms of GPU activity "
                         f"in a {r[f'fp8moe_{cfg}']['step_ms']:.0f} ms step, "
                         f"{pr['fp8moe_kernels_ms']:.0f} ms ({pr['fp8moe_share']:.0%}) in fp8moe's kernels (MoE layers and "
                         "FP8 projections)" + (f" [{pr['corrected']}]" if pr.get("corrected") else "") + ". Largest:\n")
            lines += [f"- {ms:.1f} ms `{k}`" for k, ms in pr["top"][:8]]
            h = pr.get("host")
            if h:
                ours = sum(c["cpu_ms"] for c in h["calls"].values())
                per = ", ".join(f"{k[7:]} {c['count']}x {c['cpu_ms']:.0f} ms" for k, c in h["calls"].items())
                lines.append(f"\nHost side of that step (under the profiler, which slows it): {ours:.0f} ms in fp8moe's "
                             f"calls ({per}); "
                             f"{h['launches']} kernel launches, {h['launches_in_fp8moe']} of them fp8moe's; "
                             f"{h['empty_in_fp8moe']} torch allocations inside fp8moe's calls. Largest CPU self times:\n")
                lines += [f"- {ms:.1f} ms `{k}` ({n}x)" for k, n, ms in h["top_self_cpu"][:8]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

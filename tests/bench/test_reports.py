"""The benchmark report writers (bench/md_sections.py, bench/model_bench.py's tables): each command
rewrites only its own BENCHMARKS.md sections, a side that failed is reported as failed (never as a
number), and runs on different cards never share a table."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import md_sections  # noqa: E402
import model_bench  # noqa: E402


def _run(card="NVIDIA H200", variant="", **models):
    return {"card": card, "date": "2026-12-06 02:17 UTC", "seq": 2048, "torch": "2.11", "variant": variant,
            "command": "bench/model_bench.py --models " + ",".join(models), "models": models}


def _side(step, peak, grads=(576, 576)):
    return {"step_ms": step, "peak_gib": peak, "lora_with_grad": grads[0], "lora_tensors": grads[1]}


def test_replace_section_keeps_variants_and_foreign_sections(tmp_path):
    md = str(tmp_path / "B.md")
    with open(md, "w") as f:
        f.write("# B\n\n## Convert throughput\n\nkeep me\n\n## Full-size fine-tuning - W8A8\n\nvariant\n")
    md_sections.replace_section(md, "Full-size fine-tuning", "## Full-size fine-tuning\n\nnew\n")
    md_sections.replace_section(md, "Full-size fine-tuning", "## Full-size fine-tuning\n\nnewer\n")
    text = open(md).read()
    assert "keep me" in text and "variant" in text and "newer" in text and "\nnew\n" not in text
    assert text.count("## Full-size fine-tuning\n") == 1
    md_sections.replace_section(md, "Appended", "## Appended\n\nlast\n")
    assert "newer\n\n## Appended\n" in open(md).read() or "variant\n\n## Appended\n" in open(md).read()


def test_failed_side_is_reported_not_measured():
    res = _run(qwen3={"fp8moe_b": _side(470.0, 41.1), "peer_b": {"error": "CheckpointError: recomputed values"}})
    md = model_bench.markdown(res)
    row = next(line for line in md.splitlines() if line.startswith("| qwen3 | attention + experts"))
    assert "470 ms" in row and "failed" in row and "x |" not in row
    assert "peer (b): CheckpointError" in md
    assert "Targets" not in md  # no target is judged without both sides of both configurations


def test_targets_judged_from_both_sides():
    res = _run(qwen3={"fp8moe_a": _side(300.0, 31.0, (384, 384)), "peer_a": _side(900.0, 61.0, (384, 384)),
                      "fp8moe_b": _side(400.0, 37.0), "peer_b": _side(1300.0, 69.0)})
    md = model_bench.markdown(res)
    assert "| (b) >= 2.5x faster than the peer | 3.25x | met |" in md
    assert "| (b) peak <= 0.55x the peer's | 0.54x | met |" in md
    assert "| (a) peak <= 34 GB | 33.3 GB | met |" in md


def test_merge_joins_models_and_refuses_other_cards(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.json", "b.json", "c.json"))
    json.dump(_run(qwen3={"fp8moe_a": _side(578.0, 31.2)}), open(a, "w"))
    json.dump(_run(glm={"fp8moe_a": _side(704.0, 31.0)}), open(b, "w"))
    json.dump(_run(card="NVIDIA H100 80GB HBM3", glm={"fp8moe_a": _side(700.0, 31.0)}), open(c, "w"))
    merged = model_bench.merge_results([a, b])
    assert set(merged["models"]) == {"qwen3", "glm"}
    assert "--models qwen3" in merged["command"] and "--models glm" in merged["command"]
    with pytest.raises(SystemExit, match="card"):
        model_bench.merge_results([a, c])


def test_host_profile_counts_fp8moe_calls():
    """model_bench's host breakdown reads the ranges ops.py labels under the profiler (CPU backend)."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    from fp8moe import ops

    import reference as ref  # tests/python, on the test command's path

    gen = torch.Generator().manual_seed(1)
    codes, scale, spec, code = ref.random_stack(1, 24, 40, "channel", gen)
    codes, scale, spec = codes[0], scale[0], [*spec, code]
    x = torch.randn(5, 40, generator=gen, requires_grad=True)
    A = torch.randn(4, 40, generator=gen, requires_grad=True)
    B = torch.randn(24, 4, generator=gen, requires_grad=True)
    ops.fp8_linear(x, codes, scale, spec, None, A, B, 0.5).sum().backward()  # outside the profiler: no label
    with profile(activities=[ProfilerActivity.CPU]) as p:
        ops.fp8_linear(x, codes, scale, spec, None, A, B, 0.5).sum().backward()
    h = model_bench.host_profile(p)
    assert {k: c["count"] for k, c in h["calls"].items()} == {"fp8moe.linear_backward": 1, "fp8moe.linear_forward": 1}
    assert all(c["cpu_ms"] > 0 for c in h["calls"].values())
    assert h["launches"] == 0 and h["top_self_cpu"]


def test_gpu_work_drops_label_spans():
    """Label spans on the GPU side (flagged, or named like a CPU label) are not counted as work."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace as NS

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, dev, label, us):
        return NS(name=name, device_type=dev, is_user_annotation=label, time_range=NS(elapsed_us=lambda: us))

    events = [ev("fp8moe.moe_forward", cpu, True, 900), ev("fp8moe.moe_forward", cuda, False, 800),
              ev("Optimizer.step#AdamW.step", cuda, True, 500), ev("gemm_kernel", cuda, False, 300),
              ev("gemm_kernel", cuda, False, 200), ev("aten::mm", cpu, False, 50)]
    assert model_bench.gpu_work(NS(events=lambda: events)) == {"gemm_kernel": 0.5}


def test_live_at_peak_replays_a_trace_to_its_highest_point():
    """The memory breakdown counts the blocks live at the trace's peak, not at its end, and groups
    them by the innermost frame of the project's code."""
    fp8 = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
           {"filename": "/src/python/fp8moe/ops.py", "line": 42, "name": "moe_forward"}]
    hf = [{"filename": "/y/transformers/models/qwen3_moe/modeling.py", "line": 7, "name": "forward"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": fp8},
        {"action": "alloc", "addr": 2, "size": 50, "frames": hf},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet free: the stream may use it
        {"action": "alloc", "addr": 3, "size": 30, "frames": fp8},  # the peak: 180
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 3, "size": 30},
        {"action": "alloc", "addr": 4, "size": 120, "frames": []},  # 170: below the peak
    ]
    peak, top = model_bench.live_at_peak(trace)
    assert peak == 180
    assert top == [("ops.py:42 moe_forward", 130, 2), ("modeling.py:7 forward", 50, 1)]


def test_routing_stats_count_rows_per_expert():
    """model_bench's routing summary (what the tile dispatch meets beyond the average): one forward
    of a tiny fp8moe model on the CPU, the counts against the router's own top-k."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = model_bench.config("qwen3", tiny=True)
    model = model_bench.build_fp8moe(cfg, "block", torch.device("cpu"), 0)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out[-1] if isinstance(out, tuple) else out))
             for n, m in model.named_modules() if n.endswith("mlp.gate")]
    try:
        st = model_bench.routing_stats(model, 8, torch.device("cpu"))
    finally:
        for h in hooks:
            h.remove()
    assert st["layers"] == cfg.num_hidden_layers and len(st["per_layer_max"]) == st["layers"]
    assert st["rows_per_expert_mean"] == pytest.approx(8 * cfg.num_experts_per_tok / cfg.num_experts)
    # the largest expert's rows, from the router's own top-k indices of the same forward
    want = [float(torch.bincount(i.reshape(-1), minlength=cfg.num_experts).max()) for i in seen]
    assert st["per_layer_max"] == want
    assert 1.0 <= st["max_over_mean_median"] <= st["max_over_mean_max"] and 0.0 <= st["share_over_1_5x_median"] <= 1.0
    md = model_bench.markdown(_run(qwen3={"fp8moe_b": _side(400.0, 37.0), "routing": st}))
    assert "qwen3 routing (one forward" in md and "rows per expert on average" in md

"""bench/layer_profile.py's report: kernel names shortened and sorted into families, and its
BENCHMARKS.md section."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import layer_profile as lp  # noqa: E402

# Names as torch.profiler reported them on the H100 (thirteenth session), parameters cut short.
NAMES = {
    "void fp8moe::cuda::(anonymous namespace)::combine_kernel<__nv_bfloat16>(fp8moe::cuda::Params)": "combine_kernel",
    "void fp8moe::cuda::gemm::grouped_gemm_sm90_rega_kernel<fp8moe::cuda::gemm::TileSm90RegA<2, 128>, false, false>"
    "(fp8moe::cuda::gemm::Params)": "grouped_gemm_sm90_rega_kernel",
    "fp8moe::cuda::w8a8::(anonymous namespace)::quantize_rows_kernel(fp8moe::cuda::w8a8::QuantizeParams)":
        "quantize_rows_kernel",
    "fp8moe::cuda::(anonymous namespace)::plan_scan_columns(int*, int)": "plan_scan_columns",
    "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS_4gemm18GroupProblemShapeE":
        "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS",
}


def test_short_names_and_families():
    for name, want in NAMES.items():
        assert lp.short(name) == want, name
    fam = {lp.short(n): lp.category(lp.short(n)) for n in NAMES}
    assert fam["combine_kernel"] == "combine"
    assert fam["grouped_gemm_sm90_rega_kernel"] == "W8A16 GEMM"
    assert fam["quantize_rows_kernel"] == "W8A8 quantize"
    assert fam["plan_scan_columns"] == "plan"
    assert fam["_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS"] == "CUTLASS FP8 GEMM"
    assert lp.category("grouped_outer_small_kernel") == "LoRA outer"
    # The narrow tiles (the rank-r projections) and their split-K sums are a family of their own;
    # the other mma.sync tiles stay W8A16 GEMMs.
    narrow = ("void fp8moe::cuda::gemm::grouped_gemm_kernel<fp8moe::cuda::gemm::Tile<128, 32, 32, 4, 1, 5, 3, true>, "
              "2, 2, true>(fp8moe::cuda::gemm::Params)")
    wide = "void fp8moe::cuda::gemm::grouped_gemm_kernel<fp8moe::cuda::gemm::Tile<64, 128, 32, 2, 4, 4, 2>, 2, 1, false>(x)"
    assert lp.short(narrow) == lp.NARROW and lp.category(lp.short(narrow)) == "LoRA projection GEMM"
    assert lp.category(lp.short(wide)) == "W8A16 GEMM"
    assert lp.category("split_k_sum_kernel") == "LoRA projection GEMM"


def test_markdown_section_splits_each_phase_by_family(tmp_path):
    r = {"model": "qwen3", "tokens": 16384, "precision": "w8a8 (dgrad fp8)", "lora_rank": 0,
         "forward": {"total_ms": 2.5, "kernels": [["_ZN7cutlass13device_kernelINS", 1.4], ["quantize_rows_kernel", 0.5],
                                                  ["epilogue_kernel", 0.4], ["combine_kernel", 0.2]]},
         "backward": {"total_ms": 4.6, "kernels": [["dgrad_kernel", 4.2], ["quantize_rows_kernel", 0.4]]}}
    md = lp.markdown([r], "NVIDIA H100 80GB HBM3", "bench/layer_profile.py --models qwen3", "2026-12-06 09:30 UTC")
    assert md.startswith(f"## {lp.SECTION}\n")
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in md.splitlines():
        if line.startswith("| qwen3"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == len(cols)
            got = dict(zip(cols, cells))
            rows[got["phase"]] = got
    assert set(rows) == {"forward", "backward"}
    fwd, bwd = rows["forward"], rows["backward"]
    assert fwd["precision"] == "w8a8 (dgrad fp8)"
    assert fwd["ms"] == "2.500" and bwd["ms"] == "4.600"
    assert fwd["CUTLASS FP8 GEMM µs"] == "1400" and fwd["W8A8 quantize µs"] == "500"
    assert fwd["W8A16 GEMM µs"] == "-" and fwd["W8A8 FP8 dgrad µs"] == "-"  # the forward ran neither
    assert bwd["W8A8 FP8 dgrad µs"] == "4200" and bwd["W8A8 quantize µs"] == "400"
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n## Other\n\nkeep\n")
    lp.md_sections.replace_section(str(path), lp.SECTION, md)
    text = path.read_text()
    assert "keep" in text and text.count(f"## {lp.SECTION}") == 1


def test_precision_label_names_the_dgrad_setting(monkeypatch):
    monkeypatch.delenv("FP8MOE_W8A8_DGRAD", raising=False)
    assert lp.precision_label("w8a8") == "w8a8"
    monkeypatch.setenv("FP8MOE_W8A8_DGRAD", "fp8")
    assert lp.precision_label("w8a8") == "w8a8 (dgrad fp8)"
    assert lp.precision_label("w8a16") == "w8a16"  # the setting applies to W8A8 only
    assert lp.precision_label("w8a8-down") == "w8a8-down"


def test_precision_label_names_every_w8a8_setting(monkeypatch):
    for k in lp.W8A8_KNOBS:
        monkeypatch.delenv(f"FP8MOE_W8A8_{k.upper()}", raising=False)
    monkeypatch.setenv("FP8MOE_W8A8_EPILOGUE", "vector")
    monkeypatch.setenv("FP8MOE_W8A8_LORA", "pass")
    monkeypatch.setenv("FP8MOE_W8A8_DGRAD", "fp8")
    assert lp.precision_label("w8a8") == "w8a8 (dgrad fp8, epilogue vector, lora pass)"
    assert lp.precision_label("w8a8-down") == "w8a8-down (epilogue vector, lora pass)"  # its backward is W8A16's
    assert lp.precision_label("w8a16") == "w8a16"


def test_w8a8_env_groups_and_errors():
    assert lp.parse_w8a8_env("epilogue=general;epilogue=vector, lora=pass") == [
        {"FP8MOE_W8A8_EPILOGUE": "general"}, {"FP8MOE_W8A8_EPILOGUE": "vector", "FP8MOE_W8A8_LORA": "pass"}]
    for bad in ("epilog=vector", "epilogue", "lora=", "epilogue=vector;tiles=m64"):
        with pytest.raises(ValueError, match="knob=value"):
            lp.parse_w8a8_env(bad)


def test_w8a8_env_runs_one_child_per_group_with_every_precision(monkeypatch):
    calls = []

    def fake_run(cmd, env, check):
        calls.append(({k: v for k, v in env.items() if k.startswith("FP8MOE_W8A8_")}, cmd))
        with open(cmd[cmd.index("--json") + 1], "w", encoding="utf-8") as f:
            lp.json.dump({"device": "x", "results": [{"precision": "p"}]}, f)

    monkeypatch.delenv("FP8MOE_W8A8_LORA", raising=False)
    monkeypatch.delenv("FP8MOE_W8A8_EPILOGUE", raising=False)
    monkeypatch.setattr(lp.subprocess, "run", fake_run)
    a = lp.argparse.Namespace(models="qwen3", tokens="2048", lora="16", reps=1, dgrad=None,
                              precisions="w8a8,w8a8-down", w8a8_env="lora=addend-gemm;lora=pass,epilogue=vector")
    assert len(lp.run_children(a)) == 2
    assert [c[0].get("FP8MOE_W8A8_LORA") for c in calls] == ["addend-gemm", "pass"]
    assert calls[1][0]["FP8MOE_W8A8_EPILOGUE"] == "vector" and "FP8MOE_W8A8_EPILOGUE" not in calls[0][0]
    assert all(c[1][c[1].index("--precisions") + 1] == "w8a8,w8a8-down" for c in calls)


def test_dgrad_runs_one_child_per_setting_in_order(monkeypatch):
    calls = []

    def fake_run(cmd, env, check):
        assert check
        calls.append((env["FP8MOE_W8A8_DGRAD"], cmd))
        out = cmd[cmd.index("--json") + 1]
        with open(out, "w", encoding="utf-8") as f:
            lp.json.dump({"device": "x", "results": [{"precision": f"w8a8 (dgrad {env['FP8MOE_W8A8_DGRAD']})"}]}, f)

    monkeypatch.setattr(lp.subprocess, "run", fake_run)
    a = lp.argparse.Namespace(models="qwen3,glm", tokens="16384", lora="0,16", reps=2, dgrad="bf16,fp8", w8a8_env=None,
                              precisions="w8a16")
    got = lp.run_children(a)
    assert [r["precision"] for r in got] == ["w8a8 (dgrad bf16)", "w8a8 (dgrad fp8)"]
    assert [c[0] for c in calls] == ["bf16", "fp8"]
    cmd = calls[0][1]
    assert cmd[cmd.index("--precisions") + 1] == "w8a8" and cmd[cmd.index("--lora") + 1] == "0,16"
    assert "--dgrad" not in cmd and "--md" not in cmd


def test_each_kind_of_run_has_its_own_section():
    assert lp.section_title(None, [0]) == lp.SECTION
    assert lp.section_title(None, [0, 16]) == lp.SECTION  # the plain table, with and without LoRA
    assert lp.section_title(None, [16]) == lp.SECTION + " - LoRA r 16"
    assert lp.section_title("dgrad", [0]) == lp.SECTION + " - W8A8 dgrad options"
    assert lp.section_title("dgrad", [8, 16]) == lp.SECTION + " - W8A8 dgrad options, LoRA r 8,16"
    assert lp.section_title("settings", [0, 16]) == lp.SECTION + " - W8A8 settings"

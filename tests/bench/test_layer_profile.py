"""bench/layer_profile.py's report: kernel names shortened and sorted into families, and its
BENCHMARKS.md section."""

from __future__ import annotations

import os
import sys

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
    assert lp.category("split_k_sum_kernel") == "other"


def test_markdown_section_splits_the_forward_by_family(tmp_path):
    r = {"model": "qwen3", "tokens": 16384, "precision": "w8a8", "lora_rank": 0,
         "forward": {"total_ms": 2.5, "kernels": [["_ZN7cutlass13device_kernelINS", 1.4], ["quantize_rows_kernel", 0.5],
                                                  ["epilogue_kernel", 0.4], ["combine_kernel", 0.2]]},
         "backward": {"total_ms": 4.4, "kernels": [["grouped_gemm_sm90_rega_kernel", 4.4]]}}
    md = lp.markdown([r], "NVIDIA H100 80GB HBM3", "bench/layer_profile.py --models qwen3", "2026-12-06 09:30 UTC")
    assert md.startswith(f"## {lp.SECTION}\n")
    row = next(line for line in md.splitlines() if line.startswith("| qwen3"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == len(cols)
    got = dict(zip(cols, cells))
    assert got["forward ms"] == "2.500" and got["backward ms"] == "4.400"
    assert got["fwd: CUTLASS FP8 GEMM µs"] == "1400" and got["fwd: W8A8 quantize µs"] == "500"
    assert got["fwd: W8A16 GEMM µs"] == "-"  # the forward ran none
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n## Other\n\nkeep\n")
    lp.md_sections.replace_section(str(path), lp.SECTION, md)
    text = path.read_text()
    assert "keep" in text and text.count(f"## {lp.SECTION}") == 1

"""fp8moe's engine settings (fp8moe._engine): the forward GEMMs' precision, chosen per device from
Python. W8A16 is the default everywhere; W8A8 runs only where the CUDA backend has the FP8
tensor-core kernel (an sm_90 card, a build with it), and asking for it elsewhere is an error that
says why, never a silent W8A16."""

from __future__ import annotations

import pytest
import torch

import fp8moe
from fp8moe import ops

import reference as ref
from test_ops import make_case


def test_precision_defaults_to_w8a16_and_names_are_checked():
    assert fp8moe.gemm_precision("cpu") == "w8a16"
    fp8moe.set_gemm_precision("W8A16", "cpu")  # case-insensitive
    assert fp8moe.gemm_precision("cpu") == "w8a16"
    for bad in ("fp4", "", 8, "w8a8_down"):
        with pytest.raises(fp8moe.Fp8MoeError, match="not one of: w8a16 .*w8a8 .*w8a8-down"):
            fp8moe.set_gemm_precision(bad, "cpu")


@pytest.mark.parametrize("precision", ["w8a8", "W8A8-down"])
def test_w8a8_on_the_cpu_is_refused_naming_why(precision):
    with pytest.raises(fp8moe.Fp8MoeError, match=f"cpu backend has no W8A8 path .*{precision.lower()} asked"):
        fp8moe.set_gemm_precision(precision, "cpu")
    assert fp8moe.gemm_precision("cpu") == "w8a16"


def test_loaders_and_finetune_take_the_precision(tmp_path):
    import models
    from fp8moe import finetune

    d = models.fp8_checkpoint(str(tmp_path), "qwen3_moe")
    with pytest.raises(fp8moe.Fp8MoeError, match="no W8A8 path"):
        fp8moe.from_pretrained(d, device="cpu", precision="w8a8")
    model = fp8moe.from_pretrained(d, device="cpu", precision="w8a16")
    assert fp8moe.gemm_precision("cpu") == "w8a16" and model is not None
    assert finetune.parse_args([d, "x.jsonl", "--out", "o", "--precision", "w8a8"]).precision == "w8a8"
    with pytest.raises(SystemExit):
        finetune.parse_args([d, "x.jsonl", "--out", "o", "--precision", "fp4"])


# E4M3 activations (3 mantissa bits): ~4e-2 at the output with both GEMMs on W8A8, ~2.3e-2 with the
# down projection alone (bench/NOTES.md); the bounds are about twice that.
@pytest.mark.parametrize("precision,bound", [("w8a8", 8e-2), ("w8a8-down", 5e-2)])
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8moe._C.cuda_available()), reason="needs the CUDA backend")
def test_w8a8_switches_the_path_and_stays_within_fp8_activation_error(precision, bound, gen, use_precision):
    device = torch.device("cuda", torch.cuda.current_device())
    # H and I multiples of 128 (Qwen3-like block scales), LoRA on both projections.
    case = ("w8a8_block_lora", 48, 4, 8, 256, 128, "block", 0, 0, False, 4, 1, "uniform")
    c = make_case(case, device, gen, torch.bfloat16)
    a = c["args"]

    def run():
        hidden = a["hidden"].clone().requires_grad_(True)
        out = ops.moe_experts(hidden, a["topk_ids"], a["topk_weights"], a["gate_up"], a["gate_up_scale"], a["down"],
                              a["down_scale"], a["specs"], a["act"], None, None, c["lora_dev"], 0.5)
        out.backward(torch.ones_like(out))
        return out.detach().clone(), hidden.grad

    assert fp8moe.gemm_precision(device) == "w8a16"
    base, base_grad = run()
    use_precision(precision, device)
    assert fp8moe.gemm_precision(device) == precision
    fast, fast_grad = run()
    assert not torch.equal(fast, base), f"{precision} gave W8A16's bits: the precision did not reach the GEMMs"
    xr = a["hidden"].double().cpu()
    want = ref.moe(xr, c["ids"], a["topk_weights"].double().cpu(), ref.dequantize(*c["gu"]), ref.dequantize(*c["dn"]),
                   c["act"], None, None, tuple(t.double().cpu() for t in c["lora_dev"]), 0.5)
    assert ref.rel_err(base, want) < 2.5e-2
    assert ref.rel_err(fast, want) < bound
    assert torch.isfinite(fast_grad.float()).all() and ref.rel_err(fast_grad, base_grad) < bound


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8moe._C.cuda_available()), reason="needs the CUDA backend")
def test_both_allocators_give_the_same_bits_and_free_every_block(gen, monkeypatch):
    """The engine's temporaries: torch's raw caching-allocator entry points, and the torch.empty
    stand-in used where a torch lacks them, give bitwise the same results and hand every block back
    (no growth of torch's allocated bytes beyond the outputs)."""
    from fp8moe import _engine

    device = torch.device("cuda", torch.cuda.current_device())
    case = ("alloc_block_lora", 37, 4, 8, 256, 128, "block", 0, 0, False, 4, 1, "uniform")
    c = make_case(case, device, gen, torch.bfloat16)
    a = c["args"]
    lora = tuple(t.requires_grad_(True) for t in c["lora_dev"])

    def run():
        hidden = a["hidden"].clone().requires_grad_(True)
        out = ops.moe_experts(hidden, a["topk_ids"], a["topk_weights"], a["gate_up"], a["gate_up_scale"], a["down"],
                              a["down_scale"], a["specs"], a["act"], None, None, lora, 0.5)
        grads = torch.autograd.grad(out, (hidden, *lora), torch.ones_like(out))
        return [out.detach(), *grads]

    raw = _engine._torch_allocator()
    assert raw[0] is torch._C._cuda_cudaCachingAllocator_raw_alloc  # this torch has the raw entry points
    results = {}
    for name, alloc in (("raw", raw), ("tensor", _engine._tensor_allocator())):
        monkeypatch.setattr(_engine, "_ALLOCATOR", alloc)
        run()  # warm torch's cache
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        results[name] = run()
        torch.cuda.synchronize()
        kept = sum((t.numel() * t.element_size() + 511) // 512 * 512 for t in results[name])  # torch's rounding
        assert torch.cuda.memory_allocated(device) - before <= kept, f"{name}: temporaries were not freed"
    for got, want in zip(results["tensor"], results["raw"]):
        assert torch.equal(got, want)
    with pytest.raises(fp8moe.Fp8MoeError, match="alloc: expected a pair"):
        monkeypatch.setattr(_engine, "_ALLOCATOR", lambda n: None)
        run()

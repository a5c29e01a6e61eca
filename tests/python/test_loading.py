"""fp8moe.from_pretrained / patch on tiny checkpoints of transformers' own classes: every model
family loads, its experts and FP8 projections become fp8moe modules holding the stored codes, and
its logits match transformers on the dequantized weights. Broken checkpoints fail loudly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import fp8moe
from fp8moe import Fp8Experts, Fp8Linear

import models
import reference as ref


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


@pytest.mark.parametrize("family", models.FAMILIES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_from_pretrained_matches_transformers_on_dequantized_weights(root, family, scheme, device, gen):
    from transformers import AutoModelForCausalLM

    fp8 = models.fp8_checkpoint(root, family, scheme)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = fp8moe.from_pretrained(fp8, device=device, dtype=dtype)
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert experts and all(e.fp8 and e.gate_up_proj.dtype == torch.uint8 for e in experts)
    assert linears and all(l.weight.dtype == torch.uint8 for l in linears)
    assert not any(p.is_meta for p in model.parameters())

    ids = torch.randint(0, 256, (2, 12), generator=gen)
    if device.type == "cpu":
        # Same values; fp32 vs fp64 arithmetic is the only difference.
        got, want = _logits(model, ids), _logits(models.exact_peer(fp8), ids)
        assert torch.isfinite(got).all() and ref.rel_err(got, want) < 1e-4
        return
    # On the GPU both run in BF16, so a near-tie in a router can pick other experts downstream and
    # whole-model logits are no measure. Each decoder layer gets the peer's own input instead:
    # both routers then choose alike and the layers must agree to BF16 accuracy.
    peer = models.exact_peer(fp8, dtype=torch.bfloat16).to(device)
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, kw, out: captured.append((a, kw, out)), with_kwargs=True)
             for layer in peer.model.layers]
    _logits(peer, ids)
    for h in hooks:
        h.remove()
    assert len(captured) == len(model.model.layers)
    with torch.no_grad():
        for layer, (args, kwargs, want) in zip(model.model.layers, captured):
            got = layer(*args, **kwargs)
            got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
            assert torch.isfinite(got).all() and ref.rel_err(got, want) < 2e-2


def test_model_to_dtype_never_casts_fp8_tensors(root):
    model = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu")
    e = next(m for m in model.modules() if isinstance(m, Fp8Experts))
    before = e.gate_up_proj_scale.clone()
    model.to(torch.float16)
    assert e.gate_up_proj.dtype == torch.uint8 and e.gate_up_proj_scale.dtype == torch.float32
    assert torch.equal(e.gate_up_proj_scale, before)


def test_quantize_on_load_equals_converting_first(root, gen):
    """quantize="fp8" on a BF16 checkpoint gives the codes and scales `fp8moe convert --to fp8
    --scheme block` writes (same quantizer, gate and up on separate grids)."""
    model = fp8moe.from_pretrained(models.bf16_checkpoint(root, "qwen3_moe"), device="cpu", dtype=torch.float32,
                                   quantize="fp8")
    assert all(e.fp8 for e in model.modules() if isinstance(e, Fp8Experts))
    conv = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe", "block"), device="cpu", dtype=torch.float32)
    for (na, a), (nb, b) in zip(model.named_modules(), conv.named_modules()):
        assert na == nb and type(a) is type(b)
        if isinstance(a, (Fp8Experts, Fp8Linear)):
            for (pa, ta), (pb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
                assert pa == pb and torch.equal(ta, tb), f"{na}.{pa}"
    ids = torch.randint(0, 256, (1, 10), generator=gen)
    assert torch.equal(_logits(model, ids), _logits(conv, ids))


def test_plain_bf16_checkpoint_loads_unquantized(root):
    model = fp8moe.from_pretrained(models.bf16_checkpoint(root, "qwen3_moe"), device="cpu")
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert experts and not any(e.fp8 for e in experts)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def test_patch_replaces_experts_of_a_user_built_model(root, gen):
    from transformers import AutoModelForCausalLM

    fp8 = models.fp8_checkpoint(root, "qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(models.dequantized_checkpoint(root, fp8), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 9), generator=gen)
    want = _logits(models.exact_peer(fp8), ids)
    fp8moe.patch(model, fp8)
    assert any(isinstance(m, Fp8Experts) for m in model.modules())
    assert ref.rel_err(_logits(model, ids), want) < 1e-4


def _corrupt_copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_fp8_weight_without_scale_is_refused_naming_it(root, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _corrupt_copy(models.fp8_checkpoint(root, "qwen3_moe"), str(tmp_path / "noscale"))
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    victim = next(k for k in t if k.endswith("q_proj.weight_scale_inv"))
    del t[victim]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(fp8moe.Fp8MoeError, match=victim.replace("_scale_inv", "").replace(".", r"\.")):
        fp8moe.from_pretrained(d, device="cpu")


def test_missing_checkpoint_and_bad_quantize_option(root, tmp_path):
    with pytest.raises(fp8moe.Fp8MoeError, match="no such file"):
        fp8moe.from_pretrained(str(tmp_path / "absent"), device="cpu")
    with pytest.raises(fp8moe.Fp8MoeError, match="quantize="):
        fp8moe.from_pretrained(models.bf16_checkpoint(root, "qwen3_moe"), device="cpu", quantize="int4")


def test_unsupported_model_type_is_refused(root, tmp_path):
    d = _corrupt_copy(models.bf16_checkpoint(root, "qwen3_moe"), str(tmp_path / "llama"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(fp8moe.Fp8MoeError, match="model_type .llama. is not supported"):
        fp8moe.from_pretrained(d, device="cpu")


def test_compressed_tensors_fp8_dynamic_checkpoint_loads_and_matches(root, gen):
    pytest.importorskip("compressed_tensors")
    path = models.compressed_tensors_checkpoint(root)
    model = fp8moe.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8
    ids = torch.randint(0, 256, (2, 12), generator=gen)
    assert ref.rel_err(_logits(model, ids), _logits(models.exact_peer(path), ids)) < 1e-4


def test_transformers_fine_grained_fp8_checkpoint_loads_and_matches(root, gen):
    """transformers writes experts one by one, and the scale of a matrix within one 128x128 block
    rank-0 ([]); both load, and the logits match the same codes x scales decoded by torch."""
    from safetensors import safe_open

    path = models.transformers_fp8_checkpoint(root)
    # The file itself is sane (codes x scale within FP8 rounding of the BF16 source), so that the
    # comparison below compares real values, not two readings of the same garbage.
    source = safe_open(os.path.join(models.bf16_checkpoint(root, "qwen3_moe", name="bf16-128",
                                                           **models.TRANSFORMERS_FP8_DIMS), "model.safetensors"), "pt")
    stored = safe_open(os.path.join(path, "model.safetensors"), "pt")
    scaled = [k for k in stored.keys() if k.endswith(".weight_scale_inv")]
    assert len(scaled) >= 2 * (4 + 3 * 8)  # every projection and expert matrix of both layers
    for k in scaled:
        w = k[: -len("_scale_inv")]
        value = stored.get_tensor(w).float() * stored.get_tensor(k).float()  # one block each
        assert ref.rel_err(value, source.get_tensor(w).float()) < 0.05, w
    model = fp8moe.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 8
    ids = torch.randint(0, 256, (2, 12), generator=gen)
    assert ref.rel_err(_logits(model, ids), _logits(models.exact_peer(path), ids)) < 1e-4

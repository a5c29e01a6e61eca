"""fp8moe.export_merged: the merged checkpoint keeps the source's layout and names, loads in
transformers (BF16) and in fp8moe (FP8), computes what the adapted model computes, and its report
says how much of each delta survived the rounding (a delta below the FP8 step is reported lost)."""

from __future__ import annotations

import json
import shutil
import os

import pytest
import torch

import fp8moe

import models
import reference as ref

peft = pytest.importorskip("peft")

TARGETS = dict(target_modules=["q_proj", "o_proj"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("export"))


def _adapted(fp8, scale=1.0):
    torch.manual_seed(4)
    model = peft.get_peft_model(fp8moe.from_pretrained(fp8, device="cpu", dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    return model


def _expected_merged(model, fp8: str, family: str) -> dict:
    """{source tensor name: W + D} for every adapted tensor: W decoded by torch from the source
    checkpoint (models.exact_tensors), D from PEFT's own get_delta_weight, mapped onto the
    source's layout (per-expert gate/up/down, or GPT-OSS's transposed fused stacks)."""
    exact = models.exact_tensors(fp8)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (peft.tuners.lora.ParamWrapper, peft.tuners.lora.Linear)):
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        pname = getattr(mod, "parameter_name", "weight")
        d = mod.get_delta_weight("default").detach().float()
        if pname == "weight":
            pairs = [(f"{key}.weight", d)]
        elif family == "gpt_oss":
            pairs = [(f"{key}.{pname}", d.transpose(-1, -2))]
        elif pname == "gate_up_proj":
            I = d.shape[1] // 2
            pairs = [(f"{key}.{e}.{w}_proj.weight", d[e, sl]) for e in range(d.shape[0])
                     for w, sl in (("gate", slice(0, I)), ("up", slice(I, None)))]
        else:
            pairs = [(f"{key}.{e}.down_proj.weight", d[e]) for e in range(d.shape[0])]
        out.update({n: exact[n] + dd for n, dd in pairs})
    return out


def _names(path):
    from safetensors import safe_open

    out = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                out |= set(h.keys())
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bf16_export_loads_in_transformers_and_matches(root, tmp_path, family, gen):
    from transformers import AutoModelForCausalLM

    fp8 = models.fp8_checkpoint(root, family, "block")
    model = _adapted(fp8)
    report = fp8moe.export_merged(model, str(tmp_path / "merged"), dtype="bf16")
    names = _names(tmp_path / "merged")
    assert not any(n.endswith("_scale") or n.endswith("_scale_inv") for n in names)
    assert names == {n for n in _names(fp8) if not (n.endswith("_scale") or n.endswith("_scale_inv"))}
    assert report["tensors"] and all(r["kept"] > 0.9 for r in report["tensors"].values())
    assert json.load(open(tmp_path / "merged" / "merge_report.json"))["dtype"] == "bf16"
    # Every written weight is bf16(W + D): W decoded by torch from the source, D from PEFT's own
    # get_delta_weight (the convention of PEFT's merge), mapped onto the source's tensors.
    written = models.exact_tensors(str(tmp_path / "merged"))
    expected = _expected_merged(model, fp8, family)
    assert len(expected) >= 8
    for n, want in expected.items():
        assert ref.rel_err(written[n], want.to(torch.bfloat16)) < 1e-6, n
    # transformers loads and runs it. (Whole-model logits are no measure here: on a tiny random
    # model a near-tie in a router flips with the weights' rounding; the tensors are checked above.)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 10), generator=gen)
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()


def test_fp8_export_reloads_in_fp8moe(root, tmp_path, gen):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    model = _adapted(fp8)
    report = fp8moe.export_merged(model, str(tmp_path / "merged8"), dtype="fp8")
    assert _names(tmp_path / "merged8") == _names(fp8)
    again = fp8moe.from_pretrained(str(tmp_path / "merged8"), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 10), generator=gen)
    with torch.no_grad():
        assert torch.isfinite(again(ids).logits).all()
    assert report["tensors"] and all(0.0 <= r["rel_error"] < 0.1 and r["kept"] > 0.5 for r in report["tensors"].values())
    # Every adapted weight as written, decoded by torch alone, is W + D up to one FP8 rounding
    # (E4M3: at most 1/16 of each value; a few percent in norm).
    written = models.exact_tensors(str(tmp_path / "merged8"))
    expected = _expected_merged(model, fp8, "qwen3_moe")
    assert len(expected) >= 8
    for n, want in expected.items():
        assert ref.rel_err(written[n], want) < 0.05, n


def test_tiny_delta_is_reported_lost_in_fp8(root, tmp_path):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    model = _adapted(fp8, scale=1e-6)
    with pytest.warns(UserWarning, match="less than half"):
        report = fp8moe.export_merged(model, str(tmp_path / "lost"), dtype="fp8")
    assert min(r["kept"] for r in report["tensors"].values()) < 0.5


def test_export_refuses_existing_output_and_leaves_nothing_on_failure(root, tmp_path):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    model = _adapted(fp8)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(fp8moe.Fp8MoeError, match="refusing to overwrite"):
        fp8moe.export_merged(model, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    bf16 = fp8moe.from_pretrained(models.bf16_checkpoint(root, "qwen3_moe"), device="cpu")
    with pytest.raises(fp8moe.Fp8MoeError, match="not FP8"):
        fp8moe.export_merged(bf16, str(tmp_path / "x"), dtype="fp8")
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_fp8_tensors_no_module_holds_pass_through(root, tmp_path):
    """An FP8 projection stored beyond num_hidden_layers (GLM's MTP layer is one) is not part of the
    model: FP8 export copies it bit for bit with its scale, BF16 export writes code x scale."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "with-mtp"
    shutil.copytree(models.fp8_checkpoint(root, "qwen3_moe", "block"), src)
    t = load_file(src / "model.safetensors")
    extra = "model.layers.2.mlp.shared_expert.down_proj.weight"  # layer 2 of a 2-layer model
    t[extra] = t["model.layers.0.self_attn.o_proj.weight"].clone()
    t[extra + "_scale_inv"] = t["model.layers.0.self_attn.o_proj.weight_scale_inv"].clone() * 2
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    model = _adapted(str(src))
    fp8moe.export_merged(model, str(tmp_path / "f8"), dtype="fp8")
    out = load_file(tmp_path / "f8" / "model.safetensors")
    assert torch.equal(out[extra].view(torch.uint8), t[extra].view(torch.uint8))
    assert torch.equal(out[extra + "_scale_inv"], t[extra + "_scale_inv"])
    fp8moe.export_merged(model, str(tmp_path / "b16"), dtype="bf16")
    want = models.exact_tensors(str(src))[extra].to(torch.bfloat16)
    assert torch.equal(load_file(tmp_path / "b16" / "model.safetensors")[extra], want)

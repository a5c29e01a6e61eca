"""Merged export: a trained LoRA folded into the base weights, written as a checkpoint in the
source's own layout and names. `dtype="bf16"` writes BF16 weights (value = dequantized base +
delta, rounded once); `dtype="fp8"` re-quantizes every adapted weight with its source scheme.

Small deltas can vanish in a rounding: a LoRA delta far below the quantization step of its base
weight is lost. The report therefore says, for every adapted tensor, how much of the delta survived:

    kept      = <R(W + D) - W, D> / |D|^2   the part of the intended change D that the written
                                            weight R(W + D) carries (1: all of it, 0: none)
    rel_error = |R(W + D) - (W + D)| / |W + D|

and `export_merged` warns, naming the tensors, where less than half of a delta survived.
Dequantization and quantization are the engine's (the same code as `fp8moe convert`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn

from . import _C
from ._engine import Fp8MoeError
from .modeling import Fp8Experts, Fp8Linear, dequantized_weight

_SHARD_BYTES = 4 << 30


def _strip(name: str) -> str:
    """A module name without PEFT's wrappers: base_model.model.X.base_layer -> X."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return ".".join(p for p in name.split(".") if p != "base_layer")


def _collect(model: nn.Module):
    """{module name: (fp8moe module, {param: delta-factors})}: every fp8moe module and the active
    LoRA factors (A, B, scaling) applied to it."""
    from . import peft_integration as pi

    found: dict[str, tuple[nn.Module, dict]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (Fp8Experts, Fp8Linear)):
            found.setdefault(_strip(name), (mod, {}))
    if not pi._HAVE_PEFT:
        return found
    for name, mod in model.named_modules():
        if isinstance(mod, (pi.Fp8ExpertsLora, pi.Fp8LinearLora)):
            f = mod._factors()
            if f is not None:
                found[_strip(name)][1][getattr(mod, "parameter_name", "weight")] = f
    return found


def _delta(f) -> torch.Tensor:
    A, B, s = f
    with torch.no_grad():
        return (s * (B.detach().float() @ A.detach().float())).cpu()  # [.., out, in]


def _stats(base: torch.Tensor, delta: torch.Tensor, written: torch.Tensor) -> dict:
    target = base + delta
    dd = float((delta * delta).sum())
    return {"delta_rel_norm": float(delta.norm() / base.norm().clamp(min=1e-30)),
            "kept": float(((written - base) * delta).sum() / dd) if dd > 0 else 1.0,
            "rel_error": float((written - target).norm() / target.norm().clamp(min=1e-30))}


class _Writer:
    """Tensors into safetensors shards of ~4 GiB and an index, in a staging folder."""

    def __init__(self, folder: str):
        self.folder, self.pending, self.size, self.files, self.index = folder, {}, 0, [], {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, os.path.join(self.folder, fname), metadata={"format": "pt"})
        self.files.append(fname)
        self.index.update({n: fname for n in self.pending})
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.rename(os.path.join(self.folder, self.files[0]), os.path.join(self.folder, "model.safetensors"))
            return
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": self.index}, f, indent=1)


def _matrix_spec(kind: int, N: int, K: int, like: list) -> list:
    """The per-matrix spec of a source tensor [N, K] of scheme `kind` (block edges from `like`)."""
    if kind == 1:
        return [1, N, K, 1, N, K]
    if kind == 2:
        return [2, N, K, 1, 1, K]
    if kind == 3:
        return [3, N, K, 1, like[4], like[5]]
    raise Fp8MoeError(f"export: re-quantizing scale scheme {kind} is not supported (tensor, channel, block are)")


class _Export:
    def __init__(self, ck, writer: _Writer, fp8: bool, report: dict):
        self.ck, self.w, self.fp8, self.report = ck, writer, fp8, report

    def scale_name(self, weight: str) -> Optional[str]:
        for suffix in ("_scale_inv", "_scale"):
            if self.ck.contains(weight + suffix):
                return weight + suffix
        return None

    def emit(self, name: str, base: torch.Tensor, delta: Optional[torch.Tensor], kind: int, like: list,
             transposed: bool = False) -> None:
        """Writes matrix (or stack) `name` = base + delta, [.., N, K] canonical (transposed: stored
        [.., K, N]), FP8 re-quantized with `kind` or BF16."""
        merged = base if delta is None else base + delta
        if self.fp8 and kind != 0:
            lead, (N, K) = merged.shape[:-2], merged.shape[-2:]
            spec = _matrix_spec(kind, int(N), int(K), like)
            stack = merged.reshape(-1, N, K).contiguous()
            codes, scale = (torch.from_dlpack(x) for x in _C.quantize(stack, spec, 1))
            written = torch.from_dlpack(_C.dequantize(codes, scale, spec, 1, "F32")).reshape(merged.shape)
            codes = codes.view(torch.float8_e4m3fn).reshape(merged.shape)
            sname = self.scale_name(name) or name + "_scale_inv"
            src_shape = self.ck.entry(sname)[1] if self.ck.contains(sname) else None
            scale = scale.reshape(*lead, *scale.shape[-2:])
            if transposed:
                codes, scale = codes.transpose(-1, -2), scale.transpose(-1, -2)
            self.w.add(name, codes)
            self.w.add(sname, scale.reshape(src_shape) if src_shape is not None else scale)
        else:
            written = merged.to(torch.bfloat16).float()
            self.w.add(name, (written.transpose(-1, -2) if transposed else written).to(torch.bfloat16))
        if delta is not None:
            self.report["tensors"][name] = _stats(base, delta, written)


def _expert_names(layout: str, layer: int, E: int):
    p = f"model.layers.{layer}.mlp.experts"
    if layout == "per-expert":
        return [(f"{p}.{e}.gate_proj.weight", f"{p}.{e}.up_proj.weight", f"{p}.{e}.down_proj.weight") for e in range(E)]
    return (f"{p}.gate_up_proj", f"{p}.down_proj")


def export_merged(model: nn.Module, out_dir: str, dtype: str = "bf16") -> dict:
    """Writes `model`'s base weights with its active LoRA adapters merged into `out_dir` (which must
    not exist) in the source checkpoint's layout: dtype "bf16" (quantization_config dropped) or
    "fp8" (re-quantized with each weight's source scheme; the source must be FP8). Returns the
    report, also written to out_dir/merge_report.json."""
    if dtype not in ("bf16", "fp8"):
        raise Fp8MoeError(f"export_merged: dtype must be 'bf16' or 'fp8', found {dtype!r}")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    src = getattr(inner, "fp8moe_checkpoint", None)
    if src is None:
        raise Fp8MoeError("export_merged: the model was not loaded by fp8moe.from_pretrained / patch (no source "
                          "checkpoint to take the layout and the other tensors from)")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise Fp8MoeError(f"export_merged: {out_dir} exists and is not an empty folder; refusing to overwrite it")
    if os.path.realpath(out_dir).startswith(os.path.realpath(src) + os.sep):
        raise Fp8MoeError(f"export_merged: {out_dir} is inside the source checkpoint {src}")
    ck = _C.Checkpoint.open(src)
    fp8 = dtype == "fp8"
    if fp8 and ck.quant_method == "none":
        raise Fp8MoeError("export_merged(dtype='fp8'): the source checkpoint is not FP8, so there is no scheme to "
                          "re-quantize to; export bf16, or convert with `fp8moe convert --to fp8` afterwards")
    modules = _collect(model)
    report: dict = {"source": src, "dtype": dtype, "tensors": {}}
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    stage = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
    try:
        writer = _Writer(stage)
        ex = _Export(ck, writer, fp8, report)
        done: set[str] = set()
        for layer in ck.moe_layers():
            name = f"model.layers.{layer}.mlp.experts"
            if name not in modules:
                raise Fp8MoeError(f"export_merged: the model has no fp8moe experts at {name}")
            mod, factors = modules[name]
            _export_experts(ex, mod, factors, ck.expert_layout(layer), layer, done)
        for name, (mod, factors) in modules.items():
            if isinstance(mod, Fp8Linear):
                W = dequantized_weight(mod.weight.unsqueeze(0), None if mod.weight_scale is None else
                                       mod.weight_scale.unsqueeze(0), mod.spec[:6], mod.spec[6])[0]
                delta = _delta(factors["weight"]) if "weight" in factors else None
                ex.emit(name + ".weight", W, delta, mod.spec[0], mod.spec)
                done.add(name + ".weight")
                if mod.bias is not None:
                    writer.add(name + ".bias", mod.bias.detach().cpu())
                    done.add(name + ".bias")
                for s in ("_scale_inv", "_scale"):
                    done.add(name + ".weight" + s)
        for name in ck.names():
            if name in done:
                continue
            entry_dtype, _shape = ck.entry(name)
            if entry_dtype.startswith("F8_") or (name.endswith("_scale") or name.endswith("_scale_inv")):
                base = name.rsplit("_scale", 1)[0] if "_scale" in name else name
                if base in done:
                    continue
                # An FP8 tensor no fp8moe module holds (GLM's MTP layer): as stored, or dequantized.
                if fp8:
                    writer.add(name, _stored(ck, name))
                elif not name.endswith("_scale") and not name.endswith("_scale_inv"):
                    d = ck.load_linear(name[: -len(".weight")])
                    w = dequantized_weight(torch.from_dlpack(d["data"]), None if d["scale"] is None else
                                           torch.from_dlpack(d["scale"]), d["spec"], d["code"], torch.bfloat16)
                    writer.add(name, w[0])
                continue
            writer.add(name, torch.from_dlpack(ck.load_tensor(name)))
        writer.close()
        _copy_side_files(src, stage, fp8)
        with open(os.path.join(stage, "merge_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    lost = [n for n, r in report["tensors"].items() if r["kept"] < 0.5]
    if lost:
        warnings.warn(f"export_merged: less than half of the LoRA delta survived the {dtype} rounding in "
                      f"{len(lost)} tensor(s), e.g. {', '.join(lost[:4])}; see {out_dir}/merge_report.json")
    return report


def _stored(ck, name: str) -> torch.Tensor:
    """Tensor `name` as the checkpoint stores it (FP8 codes in their float8 dtype)."""
    t = torch.from_dlpack(ck.load_stored(name))
    fp8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}.get(ck.entry(name)[0])
    return t.view(fp8) if fp8 is not None else t


def _export_experts(ex: _Export, mod: Fp8Experts, factors: dict, layout: str, layer: int, done: set) -> None:
    specs, code = mod.specs, mod.specs[12]
    gu = dequantized_weight(mod.gate_up_proj, mod.gate_up_proj_scale, specs[:6], code)  # [E, 2I, H]
    dn = dequantized_weight(mod.down_proj, mod.down_proj_scale, specs[6:12], code)      # [E, H, I]
    d_gu = _delta(factors["gate_up_proj"]) if "gate_up_proj" in factors else None
    d_dn = _delta(factors["down_proj"]) if "down_proj" in factors else None
    kind_gu, kind_dn = specs[0], specs[6]
    E, I = gu.shape[0], gu.shape[1] // 2
    if layout == "per-expert":
        for e, (g, u, d) in enumerate(_expert_names(layout, layer, E)):
            ex.emit(g, gu[e, :I], None if d_gu is None else d_gu[e, :I], kind_gu, specs[:6])
            ex.emit(u, gu[e, I:], None if d_gu is None else d_gu[e, I:], kind_gu, specs[:6])
            ex.emit(d, dn[e], None if d_dn is None else d_dn[e], kind_dn, specs[6:12])
            done.update({g, u, d})
    else:
        g, d = _expert_names(layout, layer, E)
        tr = layout == "gpt-oss"
        ex.emit(g, gu, d_gu, kind_gu, specs[:6], transposed=tr)
        ex.emit(d, dn, d_dn, kind_dn, specs[6:12], transposed=tr)
        done.update({g, d})
        for bias, t in ((g + "_bias", mod.gate_up_proj_bias), (d + "_bias", mod.down_proj_bias)):
            if t is not None:
                ex.w.add(bias, t.detach().cpu().to(torch.bfloat16))
                done.add(bias)
    for n in list(done):
        done.update({n + "_scale", n + "_scale_inv"})


def _copy_side_files(src: str, dst: str, fp8: bool) -> None:
    for fname in os.listdir(src):
        path = os.path.join(src, fname)
        if fname.endswith(".safetensors") or fname == "model.safetensors.index.json" or not os.path.isfile(path):
            continue
        shutil.copy2(path, os.path.join(dst, fname))
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if not fp8:
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "bfloat16"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)

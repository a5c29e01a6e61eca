"""Loading FP8 MoE checkpoints into transformers models.

transformers builds the module tree (on the meta device: no memory) and runs everything that is
not an FP8 projection exactly as it ships: embeddings, attention, norms, routers. fp8moe's own
validating C++ loader reads the checkpoint: the experts of every MoE layer become `Fp8Experts`,
every FP8 Linear an `Fp8Linear`, both holding the stored codes and scales on the GPU (never a BF16
copy), and every other tensor loads as stored. One layer's tensors are in host memory at a time.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch
from torch import nn

from . import _C
from ._engine import Fp8MoeError, engine_for, resolve_device, set_gemm_precision
from .modeling import FP8_CODES, Fp8Experts, Fp8Linear, QuantStack
from .loss import use_chunked_loss

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "glm4_moe_lite", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen2_moe", "mixtral")

# Linear modules that quantize="fp8" leaves in BF16 (as `fp8moe convert --to fp8` does).
_KEEP_PLAIN = re.compile(r"(^|\.)(lm_head|embed_tokens|gate|router|shared_expert_gate)$")


def _progress(iterable, desc: str, total: Optional[int] = None, unit: str = "layer"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still loads, silently
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=os.environ.get("FP8MOE_QUIET") == "1")


def _open(path: str) -> "_C.Checkpoint":
    if not os.path.exists(path):
        raise Fp8MoeError(f"checkpoint {path}: no such file or directory (fp8moe loads local checkpoints only; "
                          "download one first, e.g. with `huggingface-cli download`)")
    ck = _C.Checkpoint.open(str(path))
    ok, problems, _report = ck.inspect()
    if not ok:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise Fp8MoeError(f"checkpoint {path} does not load ({len(problems)} problem(s); `fp8moe inspect` shows "
                          f"them all):\n  {shown}{more}")
    return ck


def _experts_module(model: nn.Module, layer: int) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of the routed experts of decoder layer `layer`."""
    name = f"model.layers.{layer}.mlp.experts"
    try:
        parent = model.get_submodule(f"model.layers.{layer}.mlp")
        mod = getattr(parent, "experts")
    except AttributeError as e:
        raise Fp8MoeError(f"the checkpoint has routed experts in layer {layer}, but the model has no module {name} "
                          f"({type(model).__name__}); is config.json's model_type right?") from e
    if not hasattr(mod, "gate_up_proj") and not isinstance(mod, Fp8Experts):
        raise Fp8MoeError(f"module {name} ({type(mod).__name__}) is not a fused experts module with gate_up_proj / "
                          "down_proj; fp8moe replaces transformers' fused experts modules only")
    return parent, "experts", mod


def _quantize_stack(q: QuantStack, scheme: str, segments: int = 1) -> QuantStack:
    """BF16/F16/F32 stack -> FP8 E4M3 codes + F32 scales (the C++ quantizer, on the host). A stacked
    gate_up passes segments=2: gate and up rows keep separate block grids, as `fp8moe convert`
    gives them (one block never straddles both when I % 128 != 0)."""
    E, N, K = q.data.shape
    spec = [3, int(N), int(K), segments, 128, 128] if scheme == "block" else [2, int(N), int(K), 1, 1, int(K)]
    codes, scale = _C.quantize(q.data.detach().cpu().contiguous(), spec, 1)
    return QuantStack(torch.from_dlpack(codes), torch.from_dlpack(scale), spec, 1)


def _scheme(quantize: Optional[str]) -> Optional[str]:
    if quantize is None:
        return None
    schemes = {"fp8": "block", "fp8-block": "block", "fp8-channel": "channel"}
    if quantize not in schemes:
        raise Fp8MoeError(f"quantize={quantize!r}: expected None, 'fp8' (128x128 blocks), 'fp8-block' or "
                          "'fp8-channel'")
    return schemes[quantize]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding `name`, the last name part)."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _replace_experts(model: nn.Module, ck, device: torch.device, scheme: Optional[str]) -> set[str]:
    """Every MoE layer's experts -> Fp8Experts. Returns the module names replaced."""
    done = set()
    layers = ck.moe_layers()
    for layer in _progress(layers, "fp8moe: experts", total=len(layers)):
        parent, attr, _old = _experts_module(model, layer)
        # The router and the shared experts stay the model's own modules (loaded as Linear weights).
        w = ck.load_moe_layer(layer, routed_only=True)["routed"]
        gu, dn = QuantStack.from_engine(w["gate_up"]), QuantStack.from_engine(w["down"])
        if scheme is not None and gu.code == 0:
            gu, dn = _quantize_stack(gu, scheme, segments=2), _quantize_stack(dn, scheme)
        bias = [None if w[k] is None else torch.from_dlpack(w[k]).to(device) for k in ("gate_up_bias", "down_bias")]
        setattr(parent, attr, Fp8Experts(gu.to(device), dn.to(device), w["act"], *bias))
        done.add(f"model.layers.{layer}.mlp.experts")
    return done


def _replace_linears(model: nn.Module, ck, device: torch.device, scheme: Optional[str], skip: set[str]) -> set[str]:
    """Every nn.Linear whose checkpoint weight is FP8 (or, with quantize, every projection but
    lm_head / routers) -> Fp8Linear. Returns the module names replaced."""
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, Fp8Linear) or any(name.startswith(s + ".") for s in skip):
            continue
        wname = name + ".weight"
        if not ck.contains(wname):
            continue  # e.g. a tied lm_head; the generic loader reports what is missing
        dtype, _shape = ck.entry(wname)
        if dtype in FP8_CODES or (scheme is not None and not _KEEP_PLAIN.search(name)):
            targets.append(name)
    done = set()
    for name in _progress(targets, "fp8moe: FP8 projections", total=len(targets), unit="module"):
        d = ck.load_linear(name)
        q = QuantStack.from_engine(d)
        if q.code == 0:
            q = _quantize_stack(q, scheme)
        bias = None if d["bias"] is None else torch.from_dlpack(d["bias"]).to(device)
        parent, attr = _parent(model, name)
        setattr(parent, attr, Fp8Linear(q.to(device), bias))
        done.add(name)
    return done


def _load_rest(model: nn.Module, ck, device: torch.device) -> None:
    """Every parameter and buffer still on the meta device loads from the tensor of the same name,
    cast to the dtype transformers chose for it (model dtype, or F32 where the model keeps F32)."""
    missing = []
    for mod_name, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for pname, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                if not ck.contains(full):
                    missing.append(full)
                    continue
                value = torch.from_dlpack(ck.load_tensor(full))
                if tuple(value.shape) != tuple(t.shape):
                    raise Fp8MoeError(f"tensor {full}: expected shape {list(t.shape)} (from config.json), found "
                                      f"{list(value.shape)} in the checkpoint")
                value = value.to(device=device, dtype=t.dtype)
                store[pname] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                    else value
    if missing:
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
            missing = [m for m in missing if _still_meta(model, m)]
        if missing:
            raise Fp8MoeError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, buf in model.named_buffers():
        if buf is not None and buf.device != device and not buf.is_meta:
            parent, attr = _parent(model, name)
            parent._buffers[attr] = buf.to(device)


def _still_meta(model: nn.Module, name: str) -> bool:
    t = getattr(*_parent(model, name))
    return t is None or t.is_meta


def _check_loss(chunked_loss: Union[bool, str]) -> None:
    if not any(chunked_loss is v for v in (True, False)) and chunked_loss != "logits":
        raise Fp8MoeError(f"chunked_loss: expected True, False or \"logits\", found {chunked_loss!r}")


def _set_loss(model: nn.Module, chunked_loss: Union[bool, str]) -> None:
    if chunked_loss:
        use_chunked_loss(model, keep_logits=chunked_loss == "logits")


def from_pretrained(path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None,
                    dtype: torch.dtype = torch.bfloat16, quantize: Optional[str] = None,
                    attn_implementation: Optional[str] = None, chunked_loss: Union[bool, str] = True,
                    precision: Optional[str] = None) -> nn.Module:
    """A transformers causal LM from a local checkpoint directory, its experts and FP8 projections
    on fp8moe's kernels, its weights on `device` (default: the GPU when there is one).

    quantize: None (load as stored), "fp8" / "fp8-block" (128x128 block scales) or "fp8-channel":
    quantize a BF16 checkpoint's experts and projections while loading. chunked_loss: compute the
    training loss (`labels=`) a chunk of rows at a time (`fp8moe.loss.use_chunked_loss`: same
    result as transformers' loss). True: a forward with labels and gradients makes its loss from
    the hidden states and returns no logits; "logits": such a forward keeps its logits (0.6 GB
    more for Qwen3 at 2048 tokens, twice that at the loss's backward); False: transformers' own
    loss. precision: None (leave the device's setting), "w8a16", "w8a8" or "w8a8-down": the
    forward FP8 GEMMs' precision on `device`
    (fp8moe.set_gemm_precision). Raises Fp8MoeError naming the tensor for anything the checkpoint
    gets wrong.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    device = resolve_device(device)
    scheme = _scheme(quantize)
    _check_loss(chunked_loss)
    ck = _open(path)
    if not ck.model_type:
        raise Fp8MoeError(f"checkpoint {path}: config.json is missing; fp8moe.from_pretrained needs a model directory")
    if ck.model_type not in SUPPORTED_MODEL_TYPES or ck.config is None:
        raise Fp8MoeError(f"checkpoint {path}: model_type '{ck.model_type}' is not supported (supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}); fp8moe loads MoE models")
    engine_for(device)  # made now, outside any CUDA-graph capture
    if precision is not None:  # checked before the long load: W8A8 may not run here
        set_gemm_precision(precision, device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # transformers must not apply its own FP8 handling to the skeleton: fp8moe places every FP8 tensor.
    if hasattr(config, "quantization_config"):
        config.fp8moe_quantization_config = config.quantization_config
        del config.quantization_config
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    experts = _replace_experts(model, ck, device, scheme)
    _replace_linears(model, ck, device, scheme, experts)
    _load_rest(model, ck, device)
    _set_loss(model, chunked_loss)
    model.fp8moe_checkpoint = path
    model.eval()
    return model


def patch(model: nn.Module, path: Union[str, os.PathLike], *, quantize: Optional[str] = None,
          chunked_loss: Union[bool, str] = True, precision: Optional[str] = None) -> nn.Module:
    """Puts fp8moe's experts and FP8 projections, read from the checkpoint at `path`, into a model
    the user already built (e.g. with transformers' own from_pretrained). The other weights are
    left as they are; the replaced modules' old weights are released. chunked_loss, precision: as
    in from_pretrained. Returns the model."""
    path = os.fspath(path)
    scheme = _scheme(quantize)
    _check_loss(chunked_loss)
    ck = _open(path)
    params = [p for p in model.parameters() if not p.is_meta]
    device = resolve_device(params[0].device if params else None)
    engine_for(device)
    if precision is not None:
        set_gemm_precision(precision, device)
    experts = _replace_experts(model, ck, device, scheme)
    _replace_linears(model, ck, device, scheme, experts)
    _set_loss(model, chunked_loss)
    model.fp8moe_checkpoint = path
    return model

"""The modules fp8moe puts into a transformers model: the experts of a MoE layer and the FP8 dense
projections. Both hold the FP8 codes exactly as the checkpoint stores them (as uint8 bytes, with
the format named beside them) and their F32 scales; their forward is one fp8moe op.

Parameters keep transformers' names and orientation, so PEFT's `target_parameters` /
`target_modules` address them as they address the BF16 modules, and adapters move freely between an
fp8moe model and the same model in BF16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._engine import Fp8MoeError

# FP8 formats as the engine names them (0: the weight is plain BF16/F16/F32).
FP8_CODES = {"F8_E4M3": 1, "F8_E5M2": 2}


@dataclass
class QuantStack:
    """A stack [E, N, K] as the engine takes it: FP8 codes (uint8 bytes) + F32 scales, or plain."""

    data: Tensor                  # [E, N, K] uint8 (FP8 codes) or BF16/F16/F32
    scale: Optional[Tensor]       # [E, scale_rows, grid_k] F32, None when plain
    spec: Sequence[int]           # [kind, rows, cols, segments, block_n, block_k] (quant.hpp ScaleSpec)
    code: int                     # 1 E4M3, 2 E5M2, 0 plain

    @classmethod
    def from_engine(cls, d: dict) -> "QuantStack":
        """A stack the C++ loader returned (host memory)."""
        scale = None if d["scale"] is None else torch.from_dlpack(d["scale"])
        return cls(torch.from_dlpack(d["data"]), scale, list(d["spec"]), int(d["code"]))

    def to(self, device: torch.device) -> "QuantStack":
        return QuantStack(self.data.to(device), None if self.scale is None else self.scale.to(device), self.spec,
                          self.code)


class _MoveNeverCast(nn.Module):
    """Moves the named FP8 tensors with the module but never casts them: `model.to(torch.bfloat16)`,
    `.half()` or `.float()` would otherwise turn F32 scales into BF16 and lose precision silently
    (the codes, being uint8, are never cast by torch)."""

    _never_cast: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        held = {}
        for name in self._never_cast:
            for store in (self._parameters, self._buffers):
                if store.get(name) is not None:
                    held[name] = (store, store.pop(name))
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (store, t) in held.items():
                target = fn(t.detach()[:0] if t.dim() else t.detach().reshape(1)[:0]).device
                moved = t.data.to(target)
                store[name] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
        return self


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Fp8Experts(_MoveNeverCast):
    """Drop-in for transformers' fused experts modules (Qwen3MoeExperts, Glm4MoeLiteExperts,
    DeepseekV3Experts, GptOssExperts): forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], computed by fp8moe's MoE kernels on the stored FP8 weights.

    gate_up_proj [E, 2I, H] and down_proj [E, H, I] hold the codes (uint8) in the canonical
    D = X W^T orientation; GPT-OSS weights (stored [E, H, 2I], gate/up interleaved) are transposed
    once at load, and their gate/up rows stay interleaved (`act` says so)."""

    _never_cast = ("gate_up_proj", "down_proj", "gate_up_proj_scale", "down_proj_scale")

    def __init__(self, gate_up: QuantStack, down: QuantStack, act: Sequence[float],
                 gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None):
        super().__init__()
        E, two_i, H = gate_up.data.shape
        if tuple(down.data.shape) != (E, H, two_i // 2):
            raise Fp8MoeError(f"experts down_proj: expected [E, H, I] = [{E}, {H}, {two_i // 2}] to match gate_up_proj "
                              f"{list(gate_up.data.shape)}, found {list(down.data.shape)}")
        if gate_up.code != down.code:
            raise Fp8MoeError(f"experts: gate_up_proj and down_proj use different FP8 formats ({gate_up.code} vs "
                              f"{down.code})")
        self.num_experts, self.hidden_dim, self.intermediate_dim = int(E), int(H), int(two_i) // 2
        # Registration order matters: PEFT nests one wrapper per targeted parameter in this order,
        # which fixes its adapter key names; it is transformers' order.
        self.gate_up_proj = _frozen(gate_up.data)
        self.down_proj = _frozen(down.data)
        self.register_buffer("gate_up_proj_scale", gate_up.scale)
        self.register_buffer("down_proj_scale", down.scale)
        self.gate_up_proj_bias = None if gate_up_bias is None else _frozen(gate_up_bias)
        self.down_proj_bias = None if down_bias is None else _frozen(down_bias)
        self.specs = [*gate_up.spec, *down.spec, gate_up.code]
        self.act = [float(a) for a in act]
        self.is_transposed = False  # PEFT: gate_up_proj is [E, out, in]
        self.has_bias = gate_up_bias is not None

    @property
    def fp8(self) -> bool:
        return self.specs[12] != 0

    def extra_repr(self) -> str:
        fmt = {0: "plain", 1: "fp8 e4m3", 2: "fp8 e5m2"}[self.specs[12]]
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {fmt}"

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                lora: Optional[dict[str, tuple[Tensor, Tensor, float]]] = None) -> Tensor:
        """`lora` (set by fp8moe's PEFT layers): {"gate_up_proj" | "down_proj": (A [E, r, in],
        B [E, out, r], scaling)}; both projections must share one scaling, as a PEFT config does."""
        gu = dn = (None, None, None)
        if lora:
            gu = lora.get("gate_up_proj", gu)
            dn = lora.get("down_proj", dn)
        scales = {s for s in (gu[2], dn[2]) if s is not None}
        if len(scales) > 1:  # fold the scaling into B so that one factor serves both
            gu = (gu[0], None if gu[1] is None else gu[1] * gu[2], 1.0)
            dn = (dn[0], None if dn[1] is None else dn[1] * dn[2], 1.0)
            scales = {1.0}
        scaling = scales.pop() if scales else 1.0
        return ops.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale,
                               self.down_proj, self.down_proj_scale, self.specs, self.act, self.gate_up_proj_bias,
                               self.down_proj_bias, (gu[0], gu[1], dn[0], dn[1]), scaling)


class Fp8Linear(nn.Linear, _MoveNeverCast):
    """A frozen FP8 (or plain) projection on fp8moe's W8A16 dense GEMM. A subclass of nn.Linear so
    that PEFT's `target_modules` (and "all-linear") find it; `weight` holds the FP8 codes (uint8)
    [out, in], `weight_scale` the F32 scales."""

    _never_cast = ("weight", "weight_scale")

    def __init__(self, weight: QuantStack, bias: Optional[Tensor] = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a float weight
        if weight.data.dim() != 3 or weight.data.shape[0] != 1:
            raise Fp8MoeError(f"Fp8Linear: expected a one-matrix stack [1, out, in], found {list(weight.data.shape)}")
        self.out_features, self.in_features = int(weight.data.shape[1]), int(weight.data.shape[2])
        self.weight = _frozen(weight.data[0])
        self.register_buffer("weight_scale", None if weight.scale is None else weight.scale[0])
        self.bias = None if bias is None else _frozen(bias.reshape(-1))
        self.spec = [*weight.spec, weight.code]

    def extra_repr(self) -> str:
        fmt = {0: "plain", 1: "fp8 e4m3", 2: "fp8 e5m2"}[self.spec[6]]
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {fmt}"

    def forward(self, x: Tensor, lora: Optional[tuple[Tensor, Tensor, float]] = None) -> Tensor:
        A, B, s = lora if lora is not None else (None, None, 1.0)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.spec, self.bias, A, B, s)


def dequantized_weight(stack_data: Tensor, scale: Optional[Tensor], spec: Sequence[int], code: int,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """value = code x scale of a stack [E, N, K] (host copy, for export and comparisons), computed
    by the engine; plain weights come back converted."""
    from . import _C

    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}[dtype]
    data = stack_data.detach().cpu().contiguous()
    sc = None if scale is None else scale.detach().cpu().contiguous()
    return torch.from_dlpack(_C.dequantize(data, sc, list(spec), int(code), name))


def compile_decoder_layers(model: nn.Module, mode: Optional[str] = None) -> int:
    """Runs every decoder layer of a transformers model (PEFT-wrapped or not) through
    torch.compile, in place, and returns how many were compiled.

    Each layer compiles to one graph holding fp8moe's custom ops; layers of the same kind share it.
    This removes most of the per-layer Python of transformers and PEFT, which bounds a step at short
    sequences: the full-size Qwen3-30B-A3B step (sequence 2048, LoRA on attention and experts) went
    from 632 to 470 ms on an H200 (BENCHMARKS.md). Works with gradient checkpointing. `mode` is
    torch.compile's; "reduce-overhead" (CUDA graphs) does not combine with gradient checkpointing.
    """
    layers = [m for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers" and len(m) > 0]
    if not layers:
        raise Fp8MoeError(f"compile_decoder_layers: {type(model).__name__} has no `layers` list of decoder layers")
    count = 0
    for stack in layers:
        for layer in stack:
            layer.compile(mode=mode)
            count += 1
    return count

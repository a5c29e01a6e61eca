"""PEFT on fp8moe models, with the user's PEFT code unchanged.

`get_peft_model(model, LoraConfig(target_modules=[...], target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]))` creates PEFT's own LoRA layers; for fp8moe's modules they are these
subclasses, which keep PEFT's parameters, names and save format exactly and change only how the
adapter is applied:

- `Fp8ExpertsLora` (a `lora.ParamWrapper`): the experts' adapters run inside fp8moe's MoE kernels
  (split LoRA: Y += s (X A_e^T) B_e^T in the GEMM's K loop). PEFT would add the full delta weight of
  every expert to the base parameter on each forward; here no delta weight is ever formed, so none
  is rounded to FP8.
- `Fp8LinearLora` (a `lora.Linear`): an FP8 projection's adapter folds into fp8moe's dense GEMM.

PEFT picks these through `LoraModel._create_new_module`, which `install()` extends once (fp8moe
imports it when PEFT is installed). Merging an adapter into FP8 weights is refused with a pointer
to `fp8moe.export_merged`, which reports how much of each delta survives re-quantization.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._engine import Fp8MoeError
from .modeling import Fp8Experts, Fp8Linear

_MERGE_REFUSED = ("merging a LoRA adapter into fp8moe's FP8 weights would round the delta into FP8 in place; use "
                  "fp8moe.export_merged(model, dir, dtype='bf16' or 'fp8'), which writes a merged checkpoint and "
                  "reports how much of each delta survives")


def _active(layer, adapters) -> list[str]:
    return [a for a in adapters if a in layer.lora_A]


def _dropout_free(layer, names) -> bool:
    """No active dropout on the adapter input (which a fused GEMM cannot apply)."""
    for a in names:
        drop = layer.lora_dropout[a]
        if not isinstance(drop, nn.Identity) and layer.training and getattr(drop, "p", 0.0) > 0.0:
            return False
    return True


def _expert_factors(layer, adapter: str) -> tuple[Tensor, Tensor, float]:
    """PEFT's flattened expert adapter -> per-expert A [E, r, in], B [E, out, r].

    lora_A [E*r, in] is expert-major; lora_B [out, E*r] has the expert as the FAST axis (column
    q*E + e is rank q of expert e). Orientation comes from the module (in = H for gate_up_proj),
    never from shapes."""
    E = layer.num_experts
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    A = a.reshape(E, -1, a.shape[-1])             # [E, r, in]
    B = b.reshape(b.shape[0], -1, E).permute(2, 0, 1)  # [E, out, r]
    return A, B, float(layer.scaling[adapter])


def _combine(factors: list[tuple[Tensor, Tensor, float]]) -> Optional[tuple[Tensor, Tensor, float]]:
    """Several active adapters on one weight: sum_i s_i B_i A_i == [s_1 B_1 | s_2 B_2] [A_1; A_2],
    an exact single LoRA of the summed rank (concatenated along r)."""
    if not factors:
        return None
    if len(factors) == 1:
        return factors[0]
    A = torch.cat([f[0] for f in factors], dim=-2)
    B = torch.cat([f[1] * f[2] for f in factors], dim=-1)
    return A, B, 1.0


try:
    from peft.tuners.lora import layer as _lora_layer
    from peft.tuners.lora import model as _lora_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    _HAVE_PEFT = True
except ImportError:  # PEFT is optional: fp8moe runs without it, and install() says so when called
    _HAVE_PEFT = False


if _HAVE_PEFT:

    class _NoMergeIntoFp8:
        """PEFT's merge adds the delta into the base weight in place; for FP8 codes that would round
        it into FP8 (or fail on the bytes). export_merged is the way to a merged checkpoint."""

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            raise Fp8MoeError(_MERGE_REFUSED)

        def unmerge(self) -> None:
            raise Fp8MoeError(_MERGE_REFUSED)

    class ParamWrapper(_NoMergeIntoFp8, _lora_layer.ParamWrapper):
        """PEFT's ParamWrapper on an `Fp8Experts` parameter, applied inside fp8moe's kernels. PEFT
        nests one wrapper per targeted parameter; the outermost one gathers the adapters of all of
        them and runs the experts once. (The class keeps PEFT's name: PEFT recognises its
        parameter wrappers by class name when it nests or extends them.)"""

        def __init__(self, base_layer, adapter_name: str, parameter_name: str, config, **kwargs) -> None:
            if parameter_name not in ("gate_up_proj", "down_proj"):
                raise Fp8MoeError(f"LoRA on Fp8Experts.{parameter_name}: only gate_up_proj and down_proj take "
                                  "adapters (the FP8 codes' scales and the biases are frozen)")
            super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)

        def _factors(self) -> Optional[tuple[Tensor, Tensor, float]]:
            if self.disable_adapters:
                return None
            return _combine([_expert_factors(self, a) for a in _active(self, self.active_adapters)])

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            self._check_forward_args(x, *args, **kwargs)
            kwargs.pop("adapter_names", None)
            lora: dict[str, tuple[Tensor, Tensor, float]] = {}
            layer: nn.Module = self
            while isinstance(layer, _lora_layer.ParamWrapper):
                if not isinstance(layer, ParamWrapper):
                    raise Fp8MoeError(f"an fp8moe experts module is wrapped by {type(layer).__name__}, not by "
                                      "fp8moe's LoRA layer; create the PEFT model after `import fp8moe`")
                f = layer._factors()
                if f is not None:
                    lora[layer.parameter_name] = f
                layer = layer.base_layer
            if not isinstance(layer, Fp8Experts):
                raise Fp8MoeError(f"Fp8ExpertsLora wraps {type(layer).__name__}, expected Fp8Experts")
            return layer(x, *args, lora=lora, **kwargs)

    Fp8ExpertsLora = ParamWrapper

    class Fp8LinearLora(_NoMergeIntoFp8, _lora_layer.Linear):
        """PEFT's LoRA Linear on an `Fp8Linear`: the adapter folds into fp8moe's dense GEMM. With
        dropout on the adapter input (which cannot be folded) or a LoRA bias, PEFT's own path adds
        the adapter to the fp8moe base output instead."""

        def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
            if getattr(config, "use_dora", False):
                raise Fp8MoeError("DoRA on an FP8 projection needs the dequantized weight's norms; fp8moe supports "
                                  "plain LoRA on FP8 projections")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _factors(self) -> Optional[tuple[Tensor, Tensor, float]]:
            """The active adapters as one LoRA (A [r, in], B [out, r], scaling), or None."""
            if self.disable_adapters:
                return None
            names = _active(self, self.active_adapters)
            return _combine([(self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a])) for a in names])

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            self._check_forward_args(x, *args, **kwargs)
            names = _active(self, self.active_adapters)
            if (self.disable_adapters or not names or kwargs.get("adapter_names") is not None
                    or any(self.lora_bias.get(a, False) for a in names) or not _dropout_free(self, names)):
                return super().forward(x, *args, **kwargs)
            return self.get_base_layer()(x, lora=self._factors())

    _original_create_new_module = _lora_model.LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if kwargs.get("parameter_name") is not None and isinstance(base, Fp8Experts):
            return Fp8ExpertsLora(target, adapter_name, config=lora_config, **kwargs)
        if kwargs.get("parameter_name") is None and isinstance(base, Fp8Linear):
            return Fp8LinearLora(target, adapter_name, config=lora_config, **kwargs)
        return _original_create_new_module(lora_config, adapter_name, target, **kwargs)


def install() -> None:
    """Makes PEFT create fp8moe's LoRA layers for fp8moe's modules (idempotent)."""
    if not _HAVE_PEFT:
        raise Fp8MoeError("PEFT is not installed: pip install peft (fp8moe supports peft >= 0.21)")
    current = _lora_model.LoraModel.__dict__["_create_new_module"]
    func = current.__func__ if isinstance(current, staticmethod) else current
    if func is not _create_new_module:
        _lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)

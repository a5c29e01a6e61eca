"""The optimizer step taken while backward runs, so that a step never holds every adapter gradient.

With gradient checkpointing, the largest thing a LoRA step on an FP8 MoE model keeps besides the
weights is the adapters' own state: F32 parameters, gradients and two AdamW moments (~2.4 GiB each
for Qwen3-30B-A3B with r = 16 on the experts). The gradients exist only to be read by the step, so
`StepInBackward` steps each decoder layer's parameters as soon as backward has produced all of
their gradients and frees them: the step's peak holds one layer's gradients instead of all of them.

The update is the optimizer's own, on the same gradients: the same result as `loss.backward();
opt.step(); opt.zero_grad()`, one optimizer per group. It cannot serve gradient accumulation (a
gradient is used as soon as it is complete) nor clipping by the global norm (no step sees all
gradients); the fine-tuning command refuses it with `--grad-accum` above 1 (it has no clipping).

    stepper = StepInBackward(model, lambda params: torch.optim.AdamW(params, lr=2e-4, fused=True))
    for batch in data:
        model(**batch).loss.backward()
        stepper.finish()          # steps any group backward left incomplete
    stepper.remove()              # detaches the hooks (e.g. before an evaluation backward)

`StepAfterBackward` has the same face for the plain step (one optimizer, stepped by `finish()`), so
a training loop takes either without a branch of its own.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ._engine import Fp8MoeError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[list[nn.Parameter]]:
    """The trainable parameters grouped by decoder layer (`...layers.<i>....` in the name), in
    layer order; parameters outside every layer form one last group."""
    by_layer: dict[int, list[nn.Parameter]] = {}
    rest: list[nn.Parameter] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        m = _LAYER.search(name)
        (by_layer.setdefault(int(m.group(1)), []) if m else rest).append(p)
    groups = [by_layer[i] for i in sorted(by_layer)]
    return groups + ([rest] if rest else [])


class StepInBackward:
    """One optimizer per parameter group (default: per decoder layer of `model`), stepped from
    backward when the group's last gradient has been accumulated; the group's gradients are then
    freed. `optimizers` lists them in group order (an LR scheduler goes on each)."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 groups: Optional[list[list[nn.Parameter]]] = None):
        self.groups = groups if groups is not None else layer_groups(model.named_parameters())
        if not self.groups or not any(self.groups):
            raise Fp8MoeError("StepInBackward: the model has no trainable parameters")
        seen: set[int] = set()
        for g in self.groups:
            for p in g:
                if id(p) in seen:
                    raise Fp8MoeError("StepInBackward: a parameter is in two groups")
                seen.add(id(p))
        self.optimizers = [make_optimizer(g) for g in self.groups]
        self._group_of = {id(p): i for i, g in enumerate(self.groups) for p in g}
        self._ready = [0] * len(self.groups)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for g in self.groups for p in g]

    def _accumulated(self, p: nn.Parameter) -> None:
        i = self._group_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.groups[i]):
            self._step(i)

    def _step(self, i: int) -> None:
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)
        self._ready[i] = 0

    def finish(self) -> None:
        """After backward: steps every group that got some but not all of its gradients (some of
        its parameters took no part in this backward). Parameters without a gradient are left
        alone, as a plain step leaves them; a group that got none is not stepped."""
        for i, n in enumerate(self._ready):
            if n:
                self._step(i)

    def remove(self) -> None:
        """Detaches the hooks: later backward passes leave the gradients in place."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


class StepAfterBackward:
    """The plain step behind StepInBackward's face: one optimizer over every trainable parameter,
    stepped (and its gradients freed) by `finish()` after backward."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise Fp8MoeError("StepAfterBackward: the model has no trainable parameters")
        self.optimizers = [make_optimizer(params)]

    def finish(self) -> None:
        self.optimizers[0].step()
        self.optimizers[0].zero_grad(set_to_none=True)

    def remove(self) -> None:
        """Nothing to detach (the same face as StepInBackward.remove)."""

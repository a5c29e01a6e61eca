"""The whole training step as one CUDA graph: forward, loss, backward and optimizer step replayed
with no Python in between.

At fine-tuning sizes (2048 tokens, batch 1) a step of an FP8 MoE model is host-bound: every
decoder layer runs its Python twice under gradient checkpointing, and transformers, PEFT and the
engine's op calls launch thousands of short kernels, so the GPU waits for the host for a large
part of the step. fp8moe's ops never synchronise with the host (the routing plan is built on the
device), so the step can be captured once and replayed: the step then costs its GPU time.

    opt = lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(2e-4, device="cuda"), fused=True, capturable=True)
    step = CudaGraphStep(model, StepAfterBackward(model, opt))    # or StepInBackward
    for batch in data:                                            # same shapes every step
        loss = step(input_ids=batch["input_ids"], labels=batch["labels"])

This is torch's whole-network capture, packaged for a transformers/PEFT model:
- the first `warmup_steps` calls are ordinary eager steps (on a side stream, as torch asks), which
  also create the optimizer state; the next call captures the step and replays it; later calls copy
  the batch into the captured inputs and replay;
- every call must pass tensors of the first call's names, shapes and dtypes;
- optimizers must be `capturable`; a hyperparameter that is a Python number is part of the graph,
  so it may not change after capture (a clear error says so): give the learning rate as a tensor
  on the device, and LR schedulers update it in place;
- under gradient checkpointing the recomputation may not restore RNG state (it cannot be read
  during capture), so checkpointing is switched to `preserve_rng_state=False`, and a model with
  active dropout is refused (its recomputation would draw other masks);
- under gradient checkpointing, the capture passes each layer the attention mask of the eager
  steps where the batch has no attention mask or position ids (transformers would otherwise build
  an explicit causal mask while capturing, which slows SDPA and recompiles compiled layers).
"""

from __future__ import annotations

import functools
import gc
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._engine import Fp8MoeError


def _active_dropout(model: nn.Module) -> Optional[str]:
    """The first module that would draw random numbers in training, as 'name: what'."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or type(m).__name__}: {type(m).__name__}(p={m.p})"
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:  # transformers' attention modules apply it in training
            return f"{name}: attention_dropout={p}"
    return None


def _checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and getattr(m, "_gradient_checkpointing_func", None)]


def _refuse_dropout_under_checkpointing(model: nn.Module) -> None:
    dropout = _active_dropout(model) if _checkpointing_modules(model) else None
    if dropout is not None:
        raise Fp8MoeError(
            f"CudaGraphStep: gradient checkpointing recomputes the forward, and with dropout ({dropout}) the "
            "recomputation must replay the same masks, which needs the CUDA RNG state saved; that state cannot "
            "be read while a graph is captured. Set the dropout to 0 or turn off gradient checkpointing")


# The batch arguments that never feed transformers' mask creation: with no others, every layer's
# attention mask is a function of the shapes alone.
_SHAPE_ONLY_MASK_ARGS = frozenset({"input_ids", "inputs_embeds", "labels", "num_items_in_batch"})


class _CheckpointCall:
    """A transformers layer's checkpoint function under CudaGraphStep.

    - It saves no RNG state: torch cannot read a CUDA generator's state during capture, and without
      dropout there is nothing to restore.
    - In "reuse" mode it passes the layer the attention mask that the last eager step passed
      ("record" mode). While a stream captures, transformers builds an explicit causal mask (it
      cannot read a padding mask or position ids then) where eager steps pass none and SDPA applies
      causality itself. The explicit mask takes SDPA off its fast path (Qwen3-30B-A3B's attention
      ran ~2.5x slower in the graph, bench/NOTES.md), and a compiled layer recompiles for it inside
      the capture, which fails. CudaGraphStep reuses the eager mask only where the batch makes it
      exact (_SHAPE_ONLY_MASK_ARGS).
    """

    _UNSET = object()

    def __init__(self, checkpoint, keywords: dict[str, Any]):
        self.checkpoint = checkpoint
        self.keywords = keywords  # torch.utils.checkpoint's options, preserve_rng_state=False among them
        self.mode: Optional[str] = None
        self.mask: Any = self._UNSET

    def __call__(self, layer_call, *args):
        if isinstance(layer_call, functools.partial) and "attention_mask" in layer_call.keywords:
            if self.mode == "record":
                self.mask = layer_call.keywords["attention_mask"]
            elif self.mode == "reuse" and self.mask is not self._UNSET:
                layer_call = functools.partial(layer_call.func, *layer_call.args,
                                               **{**layer_call.keywords, "attention_mask": self.mask})
        return self.checkpoint(layer_call, *args, **self.keywords)


def _graph_safe_checkpointing(model: nn.Module) -> list[_CheckpointCall]:
    """Puts a _CheckpointCall in each of transformers' gradient-checkpointing layers (their options
    kept, RNG-state preservation off) and returns them."""
    calls = []
    for m in _checkpointing_modules(model):
        f = m._gradient_checkpointing_func
        if isinstance(f, _CheckpointCall):
            call = f
        elif isinstance(f, functools.partial):
            run = functools.partial(f.func, *f.args) if f.args else f.func
            call = _CheckpointCall(run, {**f.keywords, "preserve_rng_state": False})
        elif f is torch.utils.checkpoint.checkpoint:
            call = _CheckpointCall(f, {"preserve_rng_state": False})
        else:
            raise Fp8MoeError(f"CudaGraphStep: {type(m).__name__} checkpoints through {f!r}, which this step cannot "
                              "make capture-safe; use transformers' gradient_checkpointing_enable")
        m._gradient_checkpointing_func = call
        calls.append(call)
    return calls


def _recover_from_failed_capture(stream: torch.cuda.Stream) -> None:
    """Undoes what torch.cuda.graph leaves behind when its capture fails at the end: its exit stops
    before making `stream` current again, and the CUDA generators registered for the capture still
    count as capturing, so the process' next random draw outside a graph fails ("Offset increment
    outside graph capture"). A capture that ends cleanly closes the generators' capture."""
    torch.cuda.set_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.zeros(1, device=stream.device).add_(1)
        del graph
    except Exception:  # the caller reports the capture's own error
        pass


def _fixed_hyperparameters(optimizers: list[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Each group's hyperparameters that a captured step bakes in (the Python numbers)."""
    return [[{k: v for k, v in g.items() if k not in ("params", "initial_lr") and not torch.is_tensor(v)}
             for g in opt.param_groups] for opt in optimizers]


class CudaGraphStep:
    """Calls `model(**batch).loss.backward()` and `stepper.finish()` (a StepAfterBackward or
    StepInBackward from fp8moe.optim) as one CUDA graph after `warmup_steps` eager steps. Each call
    is one training step and returns its loss (a detached 0-dim tensor on the device)."""

    def __init__(self, model: nn.Module, stepper, warmup_steps: int = 3):
        if warmup_steps < 1:
            raise Fp8MoeError(f"CudaGraphStep: warmup_steps must be at least 1 (the eager steps create the optimizer "
                              f"state that the graph updates), found {warmup_steps}")
        for i, opt in enumerate(stepper.optimizers):
            for j, g in enumerate(opt.param_groups):
                if not g.get("capturable", False):
                    raise Fp8MoeError(f"CudaGraphStep: optimizer {i} ({type(opt).__name__}) group {j} is not "
                                      "capturable; construct it with capturable=True (fused AdamW and Adam support it)")
        _refuse_dropout_under_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise Fp8MoeError("CudaGraphStep: the model has no trainable parameters")
        if any(p.device.type != "cuda" for p in params):
            found = sorted({str(p.device) for p in params})
            raise Fp8MoeError("CudaGraphStep: CUDA graphs need the trainable parameters on a CUDA device, "
                              f"found {found}")
        self._checkpoints = _graph_safe_checkpointing(model)
        self.model, self.stepper, self.warmup_steps = model, stepper, warmup_steps
        self.device = params[0].device
        self.steps = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._inputs: dict[str, Tensor] = {}
        self._loss: Optional[Tensor] = None
        self._hyper: list[list[dict[str, Any]]] = []
        self._side = torch.cuda.Stream(self.device)

    def _step(self, batch: dict[str, Tensor], masks: Optional[str]) -> Tensor:
        """One step; masks: the checkpointed layers' attention-mask mode (_CheckpointCall)."""
        if masks is not None and not set(batch) <= _SHAPE_ONLY_MASK_ARGS:
            masks = None  # a padding mask or position ids: the mask may depend on the data
        for call in self._checkpoints:
            call.mode = masks
        try:
            loss = self.model(**batch).loss
            loss.backward()
            self.stepper.finish()
        finally:
            for call in self._checkpoints:
                call.mode = None
        return loss.detach()

    def _check_batch(self, batch: dict[str, Any]) -> None:
        for k, v in batch.items():
            if not torch.is_tensor(v):
                raise Fp8MoeError(f"CudaGraphStep: argument {k!r} must be a tensor (a captured step replays fixed "
                                  f"inputs), found {type(v).__name__}")
        if not self._inputs:
            return
        if set(batch) != set(self._inputs):
            raise Fp8MoeError(f"CudaGraphStep: the step was captured with arguments {sorted(self._inputs)}, "
                              f"found {sorted(batch)}")
        for k, v in batch.items():
            s = self._inputs[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise Fp8MoeError(f"CudaGraphStep: {k!r} was captured as {s.dtype} {tuple(s.shape)}, found {v.dtype} "
                                  f"{tuple(v.shape)}; pad batches to one shape (a new shape needs a new CudaGraphStep)")

    def _check_hyperparameters(self) -> None:
        now = _fixed_hyperparameters(self.stepper.optimizers)
        for i, (was_groups, now_groups) in enumerate(zip(self._hyper, now)):
            for j, (was, cur) in enumerate(zip(was_groups, now_groups)):
                for k in was:
                    if cur.get(k) != was[k]:
                        raise Fp8MoeError(
                            f"CudaGraphStep: optimizer {i} group {j}: {k!r} changed from {was[k]!r} to {cur.get(k)!r} "
                            "after the step was captured, and the graph replays the captured value; give it as a "
                            "tensor on the device (e.g. lr=torch.tensor(2e-4, device='cuda')), which a scheduler "
                            "updates in place")

    def __call__(self, **batch: Tensor) -> Tensor:
        self._check_batch(batch)
        if self.graph is None and self.steps < self.warmup_steps:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                loss = self._step({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, "record")
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            if not self._inputs:  # fixes the names, shapes and dtypes every later call must match
                self._inputs = {k: torch.empty_like(v, device=self.device) for k, v in batch.items()}
            self.steps += 1
            return loss
        for k, v in batch.items():
            self._inputs[k].copy_(v, non_blocking=True)
        if self.graph is None:
            self._capture()
        else:
            self._check_hyperparameters()
        self.graph.replay()
        self.steps += 1
        return self._loss.clone()

    def _capture(self) -> None:
        for opt in self.stepper.optimizers:  # the graph allocates the gradients it writes
            opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph's pool is separate
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                self._loss = self._step(self._inputs, "reuse")
        except Fp8MoeError:
            _recover_from_failed_capture(stream)
            raise
        except Exception as e:
            _recover_from_failed_capture(stream)
            raise Fp8MoeError(f"CudaGraphStep: the training step could not be captured as a CUDA graph: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        self._hyper = _fixed_hyperparameters(self.stepper.optimizers)
        self.graph = graph

    def close(self) -> None:
        """Releases the graph and its memory pool (the model and optimizers stay as trained). A
        later call starts over: warm-up steps, then a new capture (of any shape)."""
        self.graph, self._loss, self._inputs, self.steps = None, None, {}, 0
        for call in self._checkpoints:  # the next warm-up records them again, for its shapes
            call.mask = _CheckpointCall._UNSET
        gc.collect()
        torch.cuda.empty_cache()

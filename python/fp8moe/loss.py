"""The causal-LM loss in row chunks, so that training never holds the logits whole.

transformers' `ForCausalLMLoss` upcasts the whole [tokens, vocab] logits to F32 and keeps
log-softmax's F32 output for backward; with Qwen3's 151,936-word vocabulary at 2048 tokens that
is 1.2 GB each, and backward adds two more of the same size. Here the F32 work is done on a few
hundred rows at a time. In a training forward through a plain frozen output head, even the BF16
logits (0.6 GB, and as much again for their gradient) are made a chunk at a time, from the hidden
states, inside the loss (`linear_causal_lm_loss`). Same math, same reduction, same `ignore_index`
and `num_items_in_batch` handling as transformers; only the summation order differs.

This is orchestration of torch's own ops, like gradient checkpointing, not an engine kernel.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
from torch import Tensor, nn

# F32 elements per chunk (128 MiB): a few hundred rows of a 150k vocabulary.
_CHUNK_ELEMENTS = 1 << 25


def _targets(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(valid rows, targets with ignored rows pointed at column 0) for gather and scatter."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def _chunk_nll(x: Tensor, safe: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk of F32 logits: (log-sum-exp per row, sum over valid rows of lse - logit[target])."""
    lse = torch.logsumexp(x, dim=-1)
    return lse, torch.where(valid, lse - x.gather(1, safe[:, None]).squeeze(1), 0.0).sum()


def _nll_grad_(x: Tensor, lse: Tensor, safe: Tensor, scale: Tensor) -> Tensor:
    """The chunk's gradient of lse - logit[target], times `scale` per row, in place of `x`:
    softmax minus the target's one-hot."""
    p = x.sub_(lse[:, None]).exp_()
    p.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    return p.mul_(scale[:, None])


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """sum over valid rows of (logsumexp(logits[i]) - logits[i, target[i]]), in F32."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int, chunk: int) -> Tensor:
        valid, safe = _targets(target, ignore_index)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            e = s + chunk
            lse[s:e], part = _chunk_nll(logits[s:e].float(), safe[s:e], valid[s:e])
            # Out of place: torch.compile (2.11) loses the gradient of an output summed in place.
            total = total + part
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            scale = torch.where(valid[s:e], grad_total, 0.0)
            x = logits[s:e].to(torch.float32, copy=True)  # a copy even of F32 logits: the gradient is made in place
            grad[s:e] = _nll_grad_(x, lse[s:e], safe[s:e], scale).to(grad.dtype)
        return grad, None, None, None


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over valid rows of the cross entropy of (hidden[i] @ weight^T) against target[i], the
    logits made a chunk of rows at a time. The loss is the graph's last node, so its gradient to
    `hidden` is linear in the incoming scalar: it is computed here, with the chunk's logits at
    hand, and backward only scales it. Backward then holds [rows, hidden] instead of the logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int, chunk: int) -> Tensor:
        valid, safe = _targets(target, ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], chunk):
            e = s + chunk
            x = nn.functional.linear(hidden[s:e], weight).float()  # the head's logits, rounded as it rounds them
            lse, part = _chunk_nll(x, safe[s:e], valid[s:e])
            total = total + part  # out of place, as in _ChunkedCrossEntropySum
            if grad is not None:
                grad[s:e] = _nll_grad_(x, lse, safe[s:e], valid[s:e].float()).to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad, = ctx.saved_tensors
        return (grad.float() * grad_total).to(grad.dtype), None, None, None, None


def _shifted_targets(labels: Optional[Tensor], shift_labels: Optional[Tensor], ignore_index: int, rows: int,
                     device: torch.device) -> Tensor:
    if shift_labels is None:  # tokens < n predict n
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(device)
    if target.shape[0] != rows:
        raise ValueError(f"causal LM loss: {rows} logit rows but {target.shape[0]} labels")
    return target


def _reduce(total: Tensor, target: Tensor, ignore_index: int, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:  # "mean" over the labelled rows, as cross_entropy's (0/0 = nan too)
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                           num_items_in_batch: Optional[Tensor] = None, ignore_index: int = -100,
                           shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """A drop-in for transformers' `ForCausalLMLoss` (same signature and result)."""
    flat = logits.reshape(-1, vocab_size)
    target = _shifted_targets(labels, shift_labels, ignore_index, flat.shape[0], flat.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    total = _ChunkedCrossEntropySum.apply(flat, target, ignore_index, chunk)
    return _reduce(total, target, ignore_index, num_items_in_batch)


def linear_causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, *, weight: Tensor,
                          num_items_in_batch: Optional[Tensor] = None, ignore_index: int = -100,
                          shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """`ForCausalLMLoss` of the logits `hidden @ weight^T` (an output head without bias), without
    ever holding them whole: the same result as the head followed by `chunked_causal_lm_loss`.
    `logits` takes the hidden states [..., hidden]: the models pass the head's output by that name."""
    hidden = logits
    if weight.shape[0] != vocab_size or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"causal LM loss: output head weight {tuple(weight.shape)} does not map hidden size "
                         f"{hidden.shape[-1]} to vocabulary {vocab_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    target = _shifted_targets(labels, shift_labels, ignore_index, flat.shape[0], flat.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    total = _LinearCrossEntropySum.apply(flat, weight, target, ignore_index, chunk)
    return _reduce(total, target, ignore_index, num_items_in_batch)


class _PassThrough(nn.Module):
    """Stands in for the output head during a training forward: the hidden states go on to the
    loss, which makes the logits chunk by chunk."""

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden


def _head_name(model: nn.Module) -> Optional[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_children() if head is not None and m is head), None)


def _fusable(model: nn.Module, head: nn.Module, kwargs: dict) -> bool:
    """A training forward with labels through a plain frozen head: softcapped or scaled logits, a
    trained or adapted head (PEFT wraps it), a head that accelerate's hooks move (offloading),
    tuple outputs (their logits slot would hold the hidden states) and forwards without a gradient
    keep the logits."""
    config = getattr(model, "config", None)
    return (torch.is_grad_enabled() and (kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None)
            and kwargs.get("return_dict", getattr(config, "return_dict", True)) is not False
            and type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and not hasattr(head, "_hf_hook")
            and head.out_features == getattr(config, "vocab_size", None)
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None)


def use_chunked_loss(model: nn.Module, keep_logits: bool = False) -> bool:
    """Makes a transformers causal LM compute its training loss in row chunks, never holding its
    logits whole. Unless `keep_logits`, a forward with labels and gradients on, through a plain
    frozen output head, passes the hidden states to `linear_causal_lm_loss` and returns no logits
    (`logits` is None, as with TRL's fused head or Liger's). Other forwards compute the logits as
    usual and their loss with `chunked_causal_lm_loss`. Returns whether it did: only a model on
    transformers' default causal-LM loss is changed."""
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM") or not hasattr(model, "loss_function"):
        return False
    model.loss_function = chunked_causal_lm_loss
    name = _head_name(model)
    if keep_logits or name is None or getattr(model.forward, "_fp8moe_head_in_loss", False):
        return True
    inner = model.__dict__.get("forward")  # an instance's own forward (hooks) goes on being called

    @functools.wraps(type(model).forward)  # its signature, which Trainer and generate() read
    def head_in_loss(self, *args, **kwargs):
        def forward(*a, **k):  # (a plain call: torch.compile traces no function.__get__)
            return inner(*a, **k) if inner is not None else type(self).forward(self, *a, **k)

        head = getattr(self, name)
        if not _fusable(self, head, kwargs):
            return forward(*args, **kwargs)
        setattr(self, name, _PassThrough())
        self.loss_function = functools.partial(linear_causal_lm_loss, weight=head.weight)
        try:
            out = forward(*args, **kwargs)
        finally:
            setattr(self, name, head)
            self.loss_function = chunked_causal_lm_loss
        if isinstance(out, dict) and "logits" in out:  # they are the hidden states here: not the logits
            return type(out)(**{k: v for k, v in out.items() if k != "logits"})
        return out

    head_in_loss._fp8moe_head_in_loss = True
    model.forward = types.MethodType(head_in_loss, model)  # bound: a deep copy calls its own forward
    return True

"""The causal-LM loss in row chunks, so that training never holds an F32 copy of the logits.

transformers' `ForCausalLMLoss` upcasts the whole [tokens, vocab] logits to F32 and keeps
log-softmax's F32 output for backward; with Qwen3's 151,936-word vocabulary at 2048 tokens that
is 1.2 GB each, and backward adds two more of the same size. Here the F32 work is done on a few
hundred rows at a time: forward keeps the logits as they came (BF16) and one log-sum-exp per row,
backward recomputes each chunk's softmax. Same math, same reduction, same `ignore_index` and
`num_items_in_batch` handling as transformers; only the summation order differs.

This is orchestration of torch's own ops, like gradient checkpointing, not an engine kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

# F32 elements per chunk (128 MiB): a few hundred rows of a 150k vocabulary.
_CHUNK_ELEMENTS = 1 << 25


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """sum over valid rows of (logsumexp(logits[i]) - logits[i, target[i]]), in F32."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int, chunk: int) -> Tensor:
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe[s:s + chunk, None]).squeeze(1)
            total += torch.where(valid[s:s + chunk], lse[s:s + chunk] - picked, 0.0).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            p = torch.exp(logits[s:e].float() - lse[s:e, None])  # softmax of the chunk
            p.scatter_add_(1, safe[s:e, None], torch.full_like(lse[s:e, None], -1.0))
            p *= torch.where(valid[s:e], grad_total, 0.0)[:, None]
            grad[s:e] = p.to(grad.dtype)
        return grad, None, None, None


def chunked_causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int,
                           num_items_in_batch: Optional[Tensor] = None, ignore_index: int = -100,
                           shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """A drop-in for transformers' `ForCausalLMLoss` (same signature and result)."""
    if shift_labels is None:  # tokens < n predict n
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(flat.device)
    if target.shape[0] != flat.shape[0]:
        raise ValueError(f"causal LM loss: {flat.shape[0]} logit rows but {target.shape[0]} labels")
    chunk = max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    total = _ChunkedCrossEntropySum.apply(flat, target, ignore_index, chunk)
    if num_items_in_batch is None:  # "mean" over the labelled rows, as cross_entropy's (0/0 = nan too)
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_loss(model: nn.Module) -> bool:
    """Makes a transformers causal LM compute its training loss with `chunked_causal_lm_loss`.
    Returns whether it did: only a model on transformers' default causal-LM loss is changed."""
    if getattr(model, "loss_type", None) not in (None, "ForCausalLM") or not hasattr(model, "loss_function"):
        return False
    model.loss_function = chunked_causal_lm_loss
    return True

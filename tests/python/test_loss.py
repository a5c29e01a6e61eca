"""fp8moe.loss: the chunked causal-LM loss against transformers' own ForCausalLMLoss."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

import fp8moe
from fp8moe import loss as L


def _case(gen, dtype, B=3, S=11, V=97):
    logits = (torch.randn(B, S, V, generator=gen) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :4] = -100          # a prompt that is not trained on
    labels[2, -1] = -100
    return logits, labels, V


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 17])
def test_matches_transformers(dtype, num_items, gen, monkeypatch):
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 97 * 4)  # 4 rows a chunk: 33 rows give a partial last chunk
    logits, labels, V = _case(gen, dtype)
    n = None if num_items is None else torch.tensor(num_items)
    ours = L.chunked_causal_lm_loss(logits, labels, V, num_items_in_batch=n)
    g_ours, = torch.autograd.grad(ours * 1.7, logits)
    want = ForCausalLMLoss(logits, labels, V, num_items_in_batch=n)
    g_want, = torch.autograd.grad(want * 1.7, logits)
    assert ours.dtype == want.dtype == torch.float32
    assert torch.allclose(ours, want, rtol=1e-6, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # BF16: the same F32 gradient, rounded once
    assert (g_ours.float() - g_want.float()).abs().max() <= tol * g_want.float().abs().max()
    assert torch.count_nonzero(g_ours[0, :3]) == 0  # rows predicting ignored labels get no gradient


def test_shift_labels_and_all_ignored(gen):
    logits, labels, V = _case(gen, torch.float32)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    a = L.chunked_causal_lm_loss(logits, None, V, shift_labels=shifted)
    b = ForCausalLMLoss(logits, None, V, shift_labels=shifted)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
    none = torch.full_like(labels, -100)
    assert torch.isnan(L.chunked_causal_lm_loss(logits, none, V)) and torch.isnan(ForCausalLMLoss(logits, none, V))


def test_keeps_no_f32_copy_of_the_logits(gen, monkeypatch):
    """The point of it: backward keeps the logits as they came (BF16) and a vector per row."""
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 97 * 8)
    logits, labels, V = _case(gen, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        L.chunked_causal_lm_loss(logits, labels, V)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)
    assert sum(t.numel() * t.element_size() for t in saved) < logits.numel() * 2 + 64 * logits.shape[0] * 3

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ForCausalLMLoss(logits, labels, V)
    assert any(t.dtype == torch.float32 and t.numel() >= logits[0].numel() * 3 for t in saved)  # what it avoids


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("loss"))


def test_from_pretrained_uses_it(root):
    import models

    model = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu")
    assert model.loss_function is L.chunked_causal_lm_loss
    off = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu", chunked_loss=False)
    assert off.loss_function is not L.chunked_causal_lm_loss

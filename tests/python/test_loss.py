"""fp8moe.loss: the chunked causal-LM loss, and the one that makes the logits from the hidden
states, against transformers' own ForCausalLMLoss."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 17])
def test_linear_matches_head_then_transformers(dtype, num_items, gen, monkeypatch):
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 97 * 4)  # 4 rows a chunk: 33 rows give a partial last chunk
    _, labels, V = _case(gen, dtype)
    H = 24
    hidden = torch.randn(3, 11, H, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    n = None if num_items is None else torch.tensor(num_items)
    ours = L.linear_causal_lm_loss(hidden, labels, V, weight=weight, num_items_in_batch=n)
    g_ours, = torch.autograd.grad(ours * 1.7, hidden)
    want = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, V, num_items_in_batch=n)
    g_want, = torch.autograd.grad(want * 1.7, hidden)
    assert ours.dtype == want.dtype == torch.float32
    assert torch.allclose(ours, want, rtol=1e-6, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # BF16: the logits' gradient rounded before the product, as the head's
    assert (g_ours.float() - g_want.float()).abs().max() <= tol * g_want.float().abs().max()
    assert torch.count_nonzero(g_ours[0, :3]) == 0  # rows predicting ignored labels get no gradient
    assert torch.count_nonzero(g_ours[1]) > 0

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    a = L.linear_causal_lm_loss(hidden, None, V, weight=weight, shift_labels=shifted)
    assert torch.allclose(a, ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), None, V, shift_labels=shifted),
                          rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="does not map hidden size"):
        L.linear_causal_lm_loss(hidden, labels, V + 1, weight=weight)


@pytest.mark.parametrize("which", ["chunked", "linear"])
def test_compiled_loss_has_the_eager_gradient(which, gen, monkeypatch):
    """torch.compile traces both autograd functions; an output summed in place lost its gradient
    there (all zeros) in torch 2.11."""
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 97 * 4)
    logits, labels, V = _case(gen, torch.float32)
    weight = torch.randn(V, 16, generator=gen) / 4
    x = torch.randn(3, 11, 16, generator=gen, requires_grad=True) if which == "linear" else logits

    def f(t):
        if which == "linear":
            return L.linear_causal_lm_loss(t, labels, V, weight=weight)
        return L.chunked_causal_lm_loss(t, labels, V)

    want, = torch.autograd.grad(f(x), x)
    torch._dynamo.reset()
    got, = torch.autograd.grad(torch.compile(f, backend="aot_eager")(x), x)
    assert torch.count_nonzero(want) > 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_linear_keeps_no_logits(gen, monkeypatch):
    """Backward holds the gradient to the hidden states only: nothing of [rows, vocab]."""
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 97 * 8)
    _, labels, V = _case(gen, torch.bfloat16)
    hidden = torch.randn(3, 11, 16, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, 16, generator=gen, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        L.linear_causal_lm_loss(hidden, labels, V, weight=weight)
    assert saved and max(t.numel() for t in saved) <= hidden.numel()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("loss"))


def test_from_pretrained_uses_it(root):
    import models

    model = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu")
    assert model.loss_function is L.chunked_causal_lm_loss
    assert getattr(model.forward, "_fp8moe_head_in_loss", False)
    off = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu", chunked_loss=False)
    assert off.loss_function is not L.chunked_causal_lm_loss
    assert not getattr(off.forward, "_fp8moe_head_in_loss", False)
    kept = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu", chunked_loss="logits")
    assert kept.loss_function is L.chunked_causal_lm_loss and not getattr(kept.forward, "_fp8moe_head_in_loss", False)
    ids = torch.randint(0, kept.config.vocab_size, (1, 5))
    assert kept(input_ids=ids, labels=ids).logits is not None
    with pytest.raises(fp8moe.Fp8MoeError, match="chunked_loss: expected True, False or \"logits\", found 'hidden'"):
        fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu", chunked_loss="hidden")


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite"])  # the loss called positionally, and by keyword
def test_model_training_forward_makes_no_logits(root, gen, family):
    """With labels and gradients, the model's loss comes from the hidden states (no logits returned):
    the same loss and LoRA gradients as transformers' head and loss; other forwards are unchanged."""
    import copy

    import models
    import peft

    path = models.fp8_checkpoint(root, family)
    ours = fp8moe.from_pretrained(path, device="cpu")
    theirs = fp8moe.from_pretrained(path, device="cpu", chunked_loss=False)
    cfg = dict(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    pa = peft.get_peft_model(ours, peft.LoraConfig(**cfg))
    torch.manual_seed(3)
    pb = peft.get_peft_model(theirs, peft.LoraConfig(**cfg))
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    out_a, out_b = pa(input_ids=ids, labels=labels), pb(input_ids=ids, labels=labels)
    assert out_a.logits is None and out_b.logits is not None
    assert torch.allclose(out_a.loss, out_b.loss, rtol=1e-5, atol=0)
    out_a.loss.backward()
    out_b.loss.backward()
    grads = [(n, p.grad) for n, p in pa.named_parameters() if p.requires_grad]
    want = dict((n, p.grad) for n, p in pb.named_parameters() if p.requires_grad)
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for _, g in grads)
    for n, g in grads:
        assert (g - want[n]).abs().max() <= 2e-2 * want[n].abs().max(), n
    assert isinstance(ours.lm_head, torch.nn.Linear)  # the head is back after the forward
    with torch.no_grad():  # evaluation keeps the logits, and the same loss
        ev = pa(input_ids=ids, labels=labels)
    assert ev.logits is not None and torch.allclose(ev.loss, out_b.loss, rtol=1e-5, atol=0)
    assert pa(input_ids=ids).logits.shape == (2, 9, ours.config.vocab_size)
    import inspect

    assert list(inspect.signature(ours.forward).parameters)[:2] == ["input_ids", "attention_mask"]  # Trainer reads it
    assert ours.generate(ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 11)  # generate() validates by it
    as_tuple = pa(input_ids=ids, labels=labels, return_dict=False)  # a tuple keeps real logits in its slot
    assert torch.allclose(as_tuple[0], out_b.loss, rtol=1e-5, atol=0) and as_tuple[1].shape[-1] == ours.config.vocab_size
    twin = copy.deepcopy(ours)  # a copy's forward runs the copy
    assert twin.forward.__self__ is twin


def test_compiled_model_takes_the_same_path(root, gen):
    """torch.compile of the whole PEFT model traces the bound forward (the head swap included)
    without a warning and gives the eager loss and gradients."""
    import warnings

    import models
    import peft

    model = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe"), device="cpu", dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    eager = pm(input_ids=ids, labels=ids)
    want = torch.autograd.grad(eager.loss, [p for p in pm.parameters() if p.requires_grad])
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Dynamo does not know how to trace ..."
        out = torch.compile(pm, backend="aot_eager")(input_ids=ids, labels=ids)
    got = torch.autograd.grad(out.loss, [p for p in pm.parameters() if p.requires_grad])
    assert out.logits is None and torch.allclose(out.loss, eager.loss, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)

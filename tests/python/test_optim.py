"""StepInBackward: the optimizer stepped per decoder layer from backward gives the same parameters
as the plain loop (loss.backward(); opt.step(); opt.zero_grad()), bit for bit, on an fp8moe model
with PEFT LoRA on attention and experts and gradient checkpointing; no gradient outlives its
layer's step. StepAfterBackward, the plain step behind the same face, is that loop."""

from __future__ import annotations

import pytest
import torch

import fp8moe
from fp8moe import finetune
from fp8moe.optim import StepInBackward, layer_groups

import models

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return models.fp8_checkpoint(str(tmp_path_factory.mktemp("optim")), "qwen3_moe", "block")


def _model(ckpt: str, seed: int):
    torch.manual_seed(seed)  # the same LoRA initialisation for both copies
    model = peft.get_peft_model(fp8moe.from_pretrained(ckpt, device="cpu"),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "o_proj"], target_parameters=finetune.EXPERTS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _adamw(params):
    return torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)


def test_layer_groups_follow_the_decoder_layers(ckpt):
    model = _model(ckpt, 0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = layer_groups(model.named_parameters())
    n_layers = len(model.base_model.model.model.layers)
    assert len(groups) == n_layers and sum(len(g) for g in groups) == len(named)
    for i, g in enumerate(groups):
        names = {n for n, p in named if any(p is q for q in g)}
        assert names and all(f"layers.{i}." in n for n in names)


def test_matches_the_plain_step_bit_for_bit_and_frees_every_gradient(ckpt, gen):
    plain, staged = _model(ckpt, 7), _model(ckpt, 7)
    vocab = plain.config.vocab_size
    trained = [p for p in plain.parameters() if p.requires_grad]
    opt = _adamw(trained)
    stepper = StepInBackward(staged, _adamw)
    inside = [p for p in staged.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in inside]
    for _ in range(3):
        ids = torch.randint(0, vocab, (2, 24), generator=gen)
        plain(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        staged(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in inside)  # each layer's step freed its gradients
        stepper.finish()
    for a, b, b0 in zip(trained, inside, before):
        assert torch.equal(a.detach(), b.detach())
        assert not torch.equal(b.detach(), b0)  # every adapter tensor moved
    # Detached, a backward leaves its gradients in place and steps nothing.
    stepper.remove()
    snapshot = [p.detach().clone() for p in inside]
    ids = torch.randint(0, vocab, (1, 16), generator=gen)
    staged(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in inside)
    assert all(torch.equal(p.detach(), s) for p, s in zip(inside, snapshot))


def test_finish_steps_a_partial_group_and_skips_an_untouched_one():
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    stepper = StepInBackward(torch.nn.Module(), lambda ps: torch.optim.SGD(ps, lr=1.0), groups=[[a, b], [c]])
    (a * 2.0).sum().backward()  # b and c take no part
    assert a.grad is not None and torch.equal(a.detach(), torch.ones(3))  # its group is not complete yet
    stepper.finish()
    assert a.grad is None and torch.equal(a.detach(), -torch.ones(3))
    assert torch.equal(b.detach(), torch.ones(3)) and torch.equal(c.detach(), torch.ones(3))
    (a.sum() + b.sum()).backward()  # the count starts again after a step
    assert a.grad is None and b.grad is None and torch.equal(b.detach(), torch.zeros(3))


def test_refuses_nothing_to_train_and_shared_parameters():
    with pytest.raises(fp8moe.Fp8MoeError, match="no trainable parameters"):
        StepInBackward(torch.nn.Linear(2, 2).requires_grad_(False), _adamw)
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(fp8moe.Fp8MoeError, match="two groups"):
        StepInBackward(torch.nn.Module(), _adamw, groups=[[p], [p]])


def test_step_after_backward_is_the_plain_step():
    from fp8moe.optim import StepAfterBackward

    model = torch.nn.Linear(3, 2)
    stepper = StepAfterBackward(model, lambda ps: torch.optim.SGD(ps, lr=0.5))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stepper.finish()
    for p, b, g in zip(model.parameters(), before, grads):
        assert p.grad is None and torch.equal(p.detach(), b - 0.5 * g)
    with pytest.raises(fp8moe.Fp8MoeError, match="no trainable parameters"):
        StepAfterBackward(torch.nn.Linear(2, 2).requires_grad_(False), _adamw)

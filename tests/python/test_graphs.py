"""CudaGraphStep: the training step captured as one CUDA graph trains as the eager loop does (same
losses and updates from the same start and data, with either stepper, with compiled layers too,
and with the eager steps' attention masks in the capture), takes a fresh batch at every replay,
follows a tensor learning rate changed in place, and refuses what a replay would get wrong (a new
shape, a Python-number hyperparameter changed after capture, dropout under gradient checkpointing,
a non-capturable optimizer, a CPU model) with a clear error."""

from __future__ import annotations

import functools

import pytest
import torch

import fp8moe
from fp8moe import finetune
from fp8moe.graphs import CudaGraphStep, _graph_safe_checkpointing
from fp8moe.optim import StepAfterBackward, StepInBackward

import models
import reference as ref

peft = pytest.importorskip("peft")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return models.fp8_checkpoint(str(tmp_path_factory.mktemp("graphs")), "qwen3_moe", "block")


def _model(ckpt: str, seed: int, device: str, lora_dropout: float = 0.0):
    torch.manual_seed(seed)  # the same LoRA initialisation for every copy
    experts = None if lora_dropout else finetune.EXPERTS  # PEFT has no dropout on parameter targets
    model = peft.get_peft_model(fp8moe.from_pretrained(ckpt, device=device),
                                peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=lora_dropout,
                                                target_modules=["q_proj", "o_proj"], target_parameters=experts))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def _adamw(params, capturable=True):
    lr = torch.tensor(5e-3, device=params[0].device) if capturable else 5e-3
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=params[0].is_cuda, capturable=capturable)


@cuda
@pytest.mark.parametrize("stepper", [StepAfterBackward, StepInBackward])
def test_graphed_steps_train_as_the_eager_loop(ckpt, gen, stepper):
    eager, graphed = _model(ckpt, 3, "cuda"), _model(ckpt, 3, "cuda")
    vocab = eager.config.vocab_size
    eager_params = [p for p in eager.parameters() if p.requires_grad]
    graph_params = [p for p in graphed.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in graph_params]
    eager_step, step = stepper(eager, _adamw), CudaGraphStep(graphed, stepper(graphed, _adamw), warmup_steps=2)
    batches = [torch.randint(0, vocab, (2, 40), generator=gen).cuda() for _ in range(6)]
    layers = graphed.base_model.model.model.layers
    captured_masks = []  # what each layer gets while the step is captured: the eager steps' (none)
    for layer in layers:
        layer.register_forward_pre_hook(
            lambda m, a, kw: captured_masks.append(kw.get("attention_mask", "absent"))
            if torch.cuda.is_current_stream_capturing() else None, with_kwargs=True)
    eager_losses, graph_losses = [], []
    for i, ids in enumerate(batches):
        loss = eager(input_ids=ids, labels=ids).loss
        loss.backward()
        eager_step.finish()
        eager_losses.append(float(loss))
        graph_losses.append(float(step(input_ids=ids, labels=ids)))
        assert (step.graph is not None) == (i >= 2)
    torch.cuda.synchronize()
    assert len(captured_masks) == 2 * len(layers) and all(m is None for m in captured_masks)  # forward, recompute
    # Replays read each new batch: their losses differ from one another and follow the eager ones.
    assert len(set(graph_losses[2:])) == 4
    for a, b in zip(eager_losses, graph_losses):
        assert abs(a - b) <= 2e-3 * abs(a)
    for p, q, s in zip(eager_params, graph_params, start):
        assert not torch.equal(q.detach(), s)  # the captured step updates every adapter tensor
        assert ref.rel_err(q.detach() - s, p.detach() - s) < 5e-2


@cuda
def test_compiled_layers_capture_and_train_as_the_eager_loop(ckpt, gen):
    # The capture must not recompile a layer (a compile inside a capture fails): the layers get the
    # eager steps' attention mask, the guard they were compiled under.
    eager, graphed = _model(ckpt, 10, "cuda"), _model(ckpt, 10, "cuda")
    assert fp8moe.compile_decoder_layers(graphed) == len(graphed.base_model.model.model.layers)
    eager_step = StepAfterBackward(eager, _adamw)
    step = CudaGraphStep(graphed, StepAfterBackward(graphed, _adamw), warmup_steps=2)
    for i in range(5):
        ids = torch.randint(0, eager.config.vocab_size, (2, 40), generator=gen).cuda()
        loss = eager(input_ids=ids, labels=ids).loss
        loss.backward()
        eager_step.finish()
        got = float(step(input_ids=ids, labels=ids))
        assert (step.graph is not None) == (i >= 2)
        assert abs(got - float(loss)) <= 1e-2 * abs(float(loss))


@cuda
def test_a_tensor_learning_rate_set_in_place_reaches_the_replay(ckpt, gen):
    model = _model(ckpt, 4, "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = StepAfterBackward(model, lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(5e-3, device="cuda"),
                                                                    fused=True, capturable=True))
    step = CudaGraphStep(model, stepper, warmup_steps=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen).cuda()
    for _ in range(3):
        step(input_ids=ids, labels=ids)
    stepper.optimizers[0].param_groups[0]["lr"].fill_(0.0)  # what an LR scheduler does to a tensor lr
    before = [p.detach().clone() for p in params]
    step(input_ids=ids, labels=ids)
    torch.cuda.synchronize()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@cuda
def test_refuses_what_a_replay_would_get_wrong(ckpt, gen):
    model = _model(ckpt, 5, "cuda")
    stepper = StepAfterBackward(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True, capturable=True))
    step = CudaGraphStep(model, stepper, warmup_steps=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen).cuda()
    step(input_ids=ids, labels=ids)
    step(input_ids=ids, labels=ids)  # captured
    with pytest.raises(fp8moe.Fp8MoeError, match=r"'input_ids' was captured as torch.int64 \(1, 32\), found "
                                                  r"torch.int64 \(1, 33\)"):
        longer = torch.randint(0, model.config.vocab_size, (1, 33), generator=gen).cuda()
        step(input_ids=longer, labels=longer)
    with pytest.raises(fp8moe.Fp8MoeError, match=r"captured with arguments \['input_ids', 'labels'\]"):
        step(input_ids=ids)
    with pytest.raises(fp8moe.Fp8MoeError, match="'num_items_in_batch' must be a tensor"):
        step(input_ids=ids, labels=ids, num_items_in_batch=31)
    stepper.optimizers[0].param_groups[0]["lr"] = 5e-4  # a float lr is baked into the graph
    with pytest.raises(fp8moe.Fp8MoeError, match="'lr' changed from 0.001 to 0.0005 after the step was captured"):
        step(input_ids=ids, labels=ids)
    step.close()  # released: the next call starts over, with any shape
    step(input_ids=longer, labels=longer)
    assert step.graph is None and step.steps == 1


@cuda
def test_a_failed_capture_leaves_the_process_usable(ckpt, gen):
    # A step that syncs with the host cannot be captured: the error says so, and afterwards the
    # stream, the CUDA generator and a new capture work (torch leaves the first two behind).
    model = _model(ckpt, 12, "cuda")
    stepper = StepAfterBackward(model, _adamw)
    finish = stepper.finish
    stepper.finish = lambda: (finish(), float(stepper.optimizers[0].param_groups[0]["lr"]))  # .item(): a sync
    before = torch.cuda.current_stream()
    step = CudaGraphStep(model, stepper, warmup_steps=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen).cuda()
    step(input_ids=ids, labels=ids)
    with pytest.raises(fp8moe.Fp8MoeError, match="could not be captured as a CUDA graph"):
        step(input_ids=ids, labels=ids)
    assert torch.cuda.current_stream() == before
    assert torch.isfinite(torch.rand(8, device="cuda")).all()
    stepper.finish = finish
    again = CudaGraphStep(model, stepper, warmup_steps=1)
    losses = [float(again(input_ids=ids, labels=ids)) for _ in range(3)]
    assert again.graph is not None and all(torch.isfinite(torch.tensor(losses)))


def test_refuses_a_cpu_model_a_non_capturable_optimizer_and_dropout_under_checkpointing(ckpt):
    model = _model(ckpt, 6, "cpu")
    with pytest.raises(fp8moe.Fp8MoeError, match=r"optimizer 0 \(AdamW\) group 0 is not capturable"):
        CudaGraphStep(model, StepAfterBackward(model, functools.partial(_adamw, capturable=False)))
    with pytest.raises(fp8moe.Fp8MoeError, match=r"on a CUDA device, found \['cpu'\]"):
        CudaGraphStep(model, StepAfterBackward(model, _adamw))
    with pytest.raises(fp8moe.Fp8MoeError, match="warmup_steps must be at least 1"):
        CudaGraphStep(model, StepAfterBackward(model, _adamw), warmup_steps=0)
    dropped = _model(ckpt, 6, "cpu", lora_dropout=0.1)
    with pytest.raises(fp8moe.Fp8MoeError, match=r"with dropout \(.*lora_dropout.*Dropout\(p=0.1\)\)"):
        CudaGraphStep(dropped, StepAfterBackward(dropped, _adamw))
    dropped.gradient_checkpointing_disable()  # without recomputation, dropout is fine (checked later: the device)
    with pytest.raises(fp8moe.Fp8MoeError, match="on a CUDA device"):
        CudaGraphStep(dropped, StepAfterBackward(dropped, _adamw))


def test_checkpointing_keeps_its_options_and_stops_saving_rng_state(ckpt, gen):
    model = _model(ckpt, 8, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    before = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    calls = _graph_safe_checkpointing(model)
    layers = model.base_model.model.model.layers
    assert len(calls) >= len(layers)
    for layer in layers:
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False, "preserve_rng_state": False}
    model(input_ids=ids, labels=ids).loss.backward()  # without dropout, the same gradients
    after = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_capture_reuses_the_eager_steps_attention_masks(ckpt, gen, monkeypatch):
    """While a stream captures, transformers builds an explicit causal mask; the checkpointed layers
    then get the eager steps' mask instead (none: SDPA's own causality), with the same loss. Run on
    the CPU by making transformers believe a stream captures."""
    from transformers.utils import import_utils

    model = _model(ckpt, 9, "cpu")
    calls = _graph_safe_checkpointing(model)
    layers = model.base_model.model.model.layers
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=gen)

    def loss(mode):
        seen.clear()
        for c in calls:
            c.mode = mode
        try:
            with torch.no_grad():
                return float(model(input_ids=ids, labels=ids).loss)
        finally:
            for c in calls:
                c.mode = None

    eager = loss("record")
    assert len(seen) == len(layers) and all(m is None for m in seen)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    masked = loss(None)  # what a capture would run: every layer gets a materialized mask
    assert len(seen) == len(layers) and all(torch.is_tensor(m) for m in seen)
    reused = loss("reuse")
    assert len(seen) == len(layers) and all(m is None for m in seen)
    assert reused == eager and abs(masked - eager) <= 1e-4 * abs(eager)


def test_checkpoint_functions_given_as_partials_with_arguments_are_wrapped(ckpt, gen):
    model = _model(ckpt, 11, "cpu")
    layers = model.base_model.model.model.layers
    seen = []

    def tagged(tag, fn, *args, **kwargs):  # a user's checkpoint function with a leading argument
        seen.append((tag, kwargs.get("preserve_rng_state")))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(tagged, "mine", use_reentrant=False)
    calls = _graph_safe_checkpointing(model)
    assert len(calls) >= len(layers) and all(c.keywords == {"use_reentrant": False, "preserve_rng_state": False}
                                             for c in calls)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [("mine", False)] * len(layers)

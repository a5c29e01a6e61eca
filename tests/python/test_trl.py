"""TRL's SFTTrainer fine-tunes an fp8moe model end to end, on the CPU, offline: a tiny FP8 checkpoint
loaded by `fp8moe.from_pretrained`, LoRA on attention and on the experts from a plain `peft_config`,
a conversational `datasets.Dataset`. The loss falls, the expert adapters are fp8moe's own layers and
every adapter tensor trains; TRL's fused LM head (which runs the backbone and the head weight itself,
around fp8moe's forward) gives the loss, gradients, token accuracy and entropy of fp8moe's own
forward; the saved adapter is PEFT's format and reproduces the trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fp8moe
from fp8moe import finetune
from fp8moe.peft_integration import Fp8ExpertsLora, Fp8LinearLora

import models

peft = pytest.importorskip("peft")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _chats(n, offset=0):
    # Varied lengths, so that batches are padded and the labels of the padding are ignored.
    return [{"messages": [{"role": "user", "content": f"count {i + offset}"},
                          {"role": "assistant", "content": "abc" * (2 + (i + offset) % 5)}]} for i in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One SFTTrainer run: (trainer, checkpoint, adapter tensors before training, work dir)."""
    from trl import SFTConfig, SFTTrainer

    root = tmp_path_factory.mktemp("trl")
    ckpt = models.add_tokenizer(models.fp8_checkpoint(str(root), "qwen3_moe", "block"))
    model = fp8moe.from_pretrained(ckpt, device="cpu")
    args = SFTConfig(output_dir=str(root / "out"), max_steps=25, per_device_train_batch_size=2,
                     per_device_eval_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                     report_to="none", bf16=False, use_cpu=True, dataloader_num_workers=0, max_length=64,
                     seed=1, data_seed=1)  # SFTConfig's default gradient checkpointing stays on
    torch.manual_seed(0)  # the LoRA A init happens in SFTTrainer, before Trainer seeds
    # No processing_class: TRL loads the tokenizer from model.config._name_or_path, the checkpoint.
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(_chats(16)),
                         eval_dataset=datasets.Dataset.from_list(_chats(4, offset=100)),
                         peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     target_parameters=finetune.EXPERTS))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return trainer, ckpt, before, root


def _eval_batch(trainer):
    batch = next(iter(trainer.get_eval_dataloader()))
    assert len(trainer.get_eval_dataloader()) == 1  # eval_loss is then this batch's loss
    assert (batch["labels"] == -100).any()  # padded: the ignored labels are exercised
    return batch


def test_sft_trainer_trains_the_fp8moe_experts(run):
    trainer, _, before, _ = run
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    experts = [m for m in model.modules() if isinstance(m, Fp8ExpertsLora)]
    assert len(experts) == 4  # gate_up_proj and down_proj (nested wrappers) of both layers
    assert any(isinstance(m, Fp8LinearLora) for m in model.modules())

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 25 and all(math.isfinite(h["loss"]) for h in logs)
    first = sum(h["loss"] for h in logs[:3]) / 3
    last = sum(h["loss"] for h in logs[-3:]) / 3
    assert last < 0.8 * first, [round(h["loss"], 3) for h in logs]
    for key in ("mean_token_accuracy", "entropy"):
        assert all(key in h and math.isfinite(h[key]) for h in logs), key
    assert logs[-1]["mean_token_accuracy"] > logs[0]["mean_token_accuracy"]

    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == before.keys() and all("lora_A" in n or "lora_B" in n for n in trained)
    assert any(".experts." in n for n in trained)
    unchanged = [n for n, p in trained.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged  # every adapter tensor, the experts' included, got a gradient
    assert all(not torch.any(before[n]) and torch.any(p.detach()) for n, p in trained.items() if "lora_B" in n)


def test_evaluate_matches_fp8moe_forward(run):
    """TRL evaluates with its fused head (backbone + head weight); the same batch through the
    model's own forward (fp8moe's loss: logits without gradient, the head inside the loss with
    it) gives the same loss, token accuracy and entropy."""
    trainer, _, _, _ = run
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    model = trainer.model
    model.eval()
    batch = _eval_batch(trainer)
    with torch.no_grad():
        out = model(**batch)
    with torch.enable_grad():
        fused = model(**batch)
    assert fused.logits is None  # fp8moe made this loss from the hidden states
    # The model's loss adds the router's load-balancing term as TRL's does (SFTTrainer turns it on).
    assert model.config.output_router_logits
    assert out.loss.item() == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert fused.loss.item() == pytest.approx(metrics["eval_loss"], rel=1e-4)

    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    hits = ((logits.argmax(-1) == labels) & valid).sum().item()
    n = valid.sum().item()
    assert abs(metrics["eval_mean_token_accuracy"] - hits / n) <= 1.5 / n  # a bf16 near-tie may flip one token
    p = logits.log_softmax(-1)
    entropy = (-(p.exp() * p).sum(-1))[valid].mean().item()
    assert metrics["eval_entropy"] == pytest.approx(entropy, rel=1e-4)


def test_fused_head_gradients_match_fp8moe_loss(run):
    """The training step's gradients: TRL's fused head against fp8moe's head-in-loss forward."""
    trainer, _, _, _ = run
    model = trainer.model
    model.train()
    batch = _eval_batch(trainer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, **kw).loss
        loss.backward()
        out = {n: p.grad.detach().clone() for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        return loss.item(), out

    loss_trl, g_trl = grads(fused_lm_head=True)
    loss_ours, g_ours = grads()
    assert loss_trl == pytest.approx(loss_ours, rel=1e-4)
    for n in params:
        assert torch.any(g_trl[n]), n
        err = (g_trl[n] - g_ours[n]).norm() / g_ours[n].norm()
        assert err < 2e-2, (n, err.item())  # both round the head's gradient to BF16: 0.1-0.7% seen


def test_saved_adapter_is_peft_format_and_reloads(run):
    from safetensors.torch import load_file

    trainer, ckpt, before, root = run
    trainer.save_model(str(root / "trainer"))
    trainer.model.save_pretrained(str(root / "peft"))
    batch = _eval_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for d in ("trainer", "peft"):
        out = root / d
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        cfg = json.load(open(out / "adapter_config.json"))
        assert set(cfg["target_parameters"]) == set(finetune.EXPERTS)
        assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
        saved = load_file(str(out / "adapter_model.safetensors"))
        assert set(saved) == {n.replace(".default", "") for n in before}
        # PEFT's own loader onto a fresh fp8moe model reproduces the trained model.
        model = peft.PeftModel.from_pretrained(fp8moe.from_pretrained(ckpt, device="cpu"), str(out))
        assert sum(isinstance(m, Fp8ExpertsLora) for m in model.modules()) == 4
        with torch.no_grad():
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_packed_padding_free_training(run):
    """TRL's packing (BFD, padding-free): rows of several examples, told apart by position_ids
    alone, with no attention mask, through fp8moe's model."""
    from trl import SFTConfig, SFTTrainer

    _, ckpt, _, root = run
    args = SFTConfig(output_dir=str(root / "packed"), max_steps=12, per_device_train_batch_size=2,
                     learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                     use_cpu=True, dataloader_num_workers=0, max_length=64, packing=True, seed=1, data_seed=1)
    torch.manual_seed(0)
    trainer = SFTTrainer(model=fp8moe.from_pretrained(ckpt, device="cpu"), args=args,
                         train_dataset=datasets.Dataset.from_list(_chats(16)),
                         peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     target_parameters=finetune.EXPERTS))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["position_ids"].eq(0).sum() > batch["input_ids"].shape[0]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), [round(x, 3) for x in losses]

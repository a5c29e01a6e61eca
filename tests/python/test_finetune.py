"""The fine-tuning command and transformers' Trainer on an fp8moe model: a few steps on a tiny
checkpoint with its own tokenizer and chat template, offline; the loss falls and the adapter is
PEFT's format; bad data names the line."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

import fp8moe
from fp8moe import finetune

import models

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ft"))
    path = models.fp8_checkpoint(root, "qwen3_moe", "block")
    return models.add_tokenizer(path)


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count {i}"},
                                             {"role": "assistant", "content": "abcabcabc" * 2}]}) + "\n")
            f.write(json.dumps({"text": "the quick brown fox " * 3}) + "\n")
    return str(path)


def test_finetune_command_trains_and_writes_a_peft_adapter(ckpt, data, tmp_path):
    out = tmp_path / "adapter"
    rc = finetune.main([ckpt, data, "--out", str(out), "--rank", "4", "--steps", "25", "--lr", "3e-3",
                        "--seq-len", "64", "--batch-size", "2", "--packing", "--gradient-checkpointing",
                        "--device", "cpu", "--seed", "1"])
    assert rc == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert len(rows) == 25
    first = sum(float(r["loss"]) for r in rows[:3]) / 3
    last = sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < 0.8 * first
    cfg = json.load(open(out / "adapter_config.json"))
    assert set(cfg["target_parameters"]) == set(finetune.EXPERTS)
    # The adapter loads back onto the fp8moe model with PEFT's own loader.
    model = peft.PeftModel.from_pretrained(fp8moe.from_pretrained(ckpt, device="cpu"), str(out))
    assert any(isinstance(m, fp8moe.peft_integration.Fp8ExpertsLora) for m in model.modules())


def test_finetune_refuses_bad_data_and_existing_output(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3}\n')
    assert finetune.main([ckpt, str(bad), "--out", str(tmp_path / "a"), "--steps", "1", "--device", "cpu"]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert finetune.main([ckpt, str(bad), "--out", str(tmp_path / "taken"), "--steps", "1", "--device", "cpu"]) == 1
    assert "exists" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_trainer_trains_an_fp8moe_peft_model(ckpt, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peft.get_peft_model(fp8moe.from_pretrained(ckpt, device="cpu"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                target_parameters=finetune.EXPERTS))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(4, 100, (8, 32))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)  # every LoRA tensor trained, the expert adapters included


def test_finetune_with_compiled_layers(ckpt, data, tmp_path):
    out = tmp_path / "compiled"
    torch._dynamo.reset()
    rc = finetune.main([ckpt, data, "--out", str(out), "--rank", "4", "--steps", "6", "--lr", "3e-3",
                        "--seq-len", "32", "--packing", "--gradient-checkpointing", "--compile",
                        "--device", "cpu", "--seed", "2"])
    torch._dynamo.reset()
    assert rc == 0 and (out / "adapter_model.safetensors").exists()
    losses = [float(r["loss"]) for r in csv.DictReader(open(out / "loss_log.csv"))]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_step_in_backward_writes_the_same_adapter(ckpt, data, tmp_path, capsys):
    from safetensors.torch import load_file

    common = [ckpt, data, "--rank", "4", "--steps", "4", "--lr", "3e-3", "--seq-len", "48", "--packing",
              "--gradient-checkpointing", "--warmup-steps", "2", "--device", "cpu", "--seed", "3"]
    assert finetune.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert finetune.main([*common, "--out", str(tmp_path / "staged"), "--step-in-backward"]) == 0
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    staged = load_file(str(tmp_path / "staged" / "adapter_model.safetensors"))
    assert plain.keys() == staged.keys() and plain
    assert all(torch.equal(plain[k], staged[k]) for k in plain)
    rows = [list(csv.DictReader(open(tmp_path / d / "loss_log.csv"))) for d in ("plain", "staged")]
    assert [(r["loss"], r["lr"]) for r in rows[0]] == [(r["loss"], r["lr"]) for r in rows[1]]
    with pytest.raises(SystemExit):
        finetune.parse_args([*common, "--out", str(tmp_path / "x"), "--step-in-backward", "--grad-accum", "2"])
    assert "--grad-accum" in capsys.readouterr().err


def test_cuda_graph_is_refused_where_it_cannot_replay(ckpt, data, tmp_path, capsys):
    common = [ckpt, data, "--rank", "4", "--steps", "2", "--seq-len", "32", "--seed", "4"]
    with pytest.raises(SystemExit):
        finetune.parse_args([*common, "--out", str(tmp_path / "x"), "--cuda-graph", "--grad-accum", "2"])
    assert "--grad-accum" in capsys.readouterr().err
    out = tmp_path / "cpu"
    assert finetune.main([*common, "--out", str(out), "--cuda-graph", "--device", "cpu"]) == 1
    assert "CUDA graphs need the trainable parameters on a CUDA device, found ['cpu']" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("cpu.partial-*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_trains_as_the_eager_command(ckpt, data, tmp_path):
    from safetensors.torch import load_file

    import reference as ref

    common = [ckpt, data, "--rank", "4", "--steps", "7", "--lr", "3e-3", "--seq-len", "48", "--packing",
              "--gradient-checkpointing", "--warmup-steps", "3", "--device", "cuda", "--seed", "5"]
    assert finetune.main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert finetune.main([*common, "--out", str(tmp_path / "graphed"), "--cuda-graph"]) == 0
    rows = [list(csv.DictReader(open(tmp_path / d / "loss_log.csv"))) for d in ("eager", "graphed")]
    assert [r["lr"] for r in rows[0]] == [r["lr"] for r in rows[1]]  # the scheduler reaches the graph
    for a, b in zip(rows[0], rows[1]):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 5e-3 * abs(float(a["loss"]))
    eager = load_file(str(tmp_path / "eager" / "adapter_model.safetensors"))
    graphed = load_file(str(tmp_path / "graphed" / "adapter_model.safetensors"))
    assert eager.keys() == graphed.keys() and eager
    for k in eager:
        assert ref.rel_err(graphed[k].float(), eager[k].float()) < 5e-2, k

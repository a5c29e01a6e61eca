"""The Python half of the embedded default (scripts/demo.sh runs it where torch is installed):

1. makes a tiny Qwen3-MoE checkpoint with transformers' own class and converts it to FP8
   (128x128 block scales) with fp8moe's converter;
2. loads it with fp8moe.from_pretrained and puts PEFT LoRA on the attention projections and the
   experts, exactly as a user's code does;
3. trains a few steps on a fixed synthetic corpus and checks that the loss falls;
4. saves the adapter with PEFT, reloads it with PEFT onto the same model in BF16 (the FP8 weights
   dequantized), and checks that both give the same outputs.

Exits non-zero when a check fails. No download; about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

TARGETS = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def _tiny_checkpoint(workdir: str, seed: int) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from . import _C

    bf16 = os.path.join(workdir, "tiny-qwen3-moe-bf16")
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(bf16)
    fp8 = os.path.join(workdir, "tiny-qwen3-moe-fp8")
    _C.convert_checkpoint(bf16, fp8, "fp8", "block", 128)
    return bf16, fp8


def run(workdir: str, steps: int, seed: int, device: str) -> bool:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    from transformers import AutoModelForCausalLM

    import fp8moe

    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        print(f"  [{'ok' if cond else 'FAIL'}] {what}", flush=True)
        ok = ok and cond

    print(f"fp8moe Python demo (torch {torch.__version__}, device {device}, workdir {workdir})")
    _bf16, fp8 = _tiny_checkpoint(workdir, seed)
    model = fp8moe.from_pretrained(fp8, device=device)
    n_experts = sum(isinstance(m, fp8moe.Fp8Experts) for m in model.modules())
    n_linear = sum(isinstance(m, fp8moe.Fp8Linear) for m in model.modules())
    check(n_experts == 2 and n_linear == 8, f"loaded: {n_experts} FP8 expert stacks, {n_linear} FP8 projections")
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, **TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"  LoRA: {sum(p.numel() for p in trainable)} trainable parameters in {len(trainable)} tensors")

    g = torch.Generator().manual_seed(seed)
    corpus = torch.randint(0, 512, (4, 8), generator=g).repeat(1, 6).to(device)  # short periodic sequences
    opt = torch.optim.AdamW(trainable, lr=5e-3)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=corpus, labels=corpus).loss
        loss.backward()
        no_grad = [p for p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
        if step == 0:
            check(not no_grad, f"every LoRA tensor got a finite gradient ({len(trainable) - len(no_grad)}/"
                               f"{len(trainable)})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    check(losses[-1] < 0.7 * losses[0], f"loss fell: {losses[0]:.4f} -> {losses[-1]:.4f}")

    adapter = os.path.join(workdir, "adapter")
    model.save_pretrained(adapter)
    check(os.path.exists(os.path.join(adapter, "adapter_model.safetensors")), f"adapter saved to {adapter}")

    from . import _C

    dequant = os.path.join(workdir, "tiny-qwen3-moe-dequantized-bf16")
    _C.convert_checkpoint(fp8, dequant, "bf16")
    model.eval()
    peer = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dequant, dtype=torch.bfloat16),
                                          adapter).to(device).eval()
    with torch.no_grad():
        ours = model(input_ids=corpus).logits.float()
        theirs = peer(input_ids=corpus).logits.float()
    rel = float((ours - theirs).norm() / theirs.norm())
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    check(rel < 0.05 and agree > 0.95, f"PEFT on the BF16 model gives the same outputs (relative difference "
                                       f"{rel:.4f}, next-token agreement {agree:.1%})")
    print("demo: all checks passed" if ok else "demo: a check FAILED")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8moe.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the GPU when fp8moe can use one)")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder, removed)")
    a = p.parse_args(argv)
    from ._engine import resolve_device

    device = str(resolve_device(a.device))
    workdir = a.workdir or tempfile.mkdtemp(prefix="fp8moe-pydemo-")
    os.makedirs(workdir, exist_ok=True)
    try:
        return 0 if run(workdir, a.steps, a.seed, device) else 1
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

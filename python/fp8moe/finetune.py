"""fp8moe finetune: LoRA fine-tuning of an FP8 MoE checkpoint on a JSONL file, fully offline.

    python -m fp8moe.finetune MODEL_DIR data.jsonl --out adapter/ [--rank 16] [--steps 200]

Each JSONL line is {"messages": [{"role": ..., "content": ...}, ...]} (rendered with the
checkpoint's own chat template) or {"text": "..."}. The result is a PEFT adapter (adapter_config.json
+ adapter_model.safetensors) that PEFT loads onto the FP8 model or onto the same model in BF16;
`loss_log.csv` beside it records every step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, Optional, Sequence

import torch

from ._engine import GEMM_PRECISIONS, Fp8MoeError
from .optim import StepAfterBackward, StepInBackward

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def read_examples(path: str, tokenizer, seq_len: int) -> list[list[int]]:
    """Token ids of every JSONL record; errors name the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise Fp8MoeError(f"{path}:{no}: not valid JSON ({e.msg})") from e
            if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                if not getattr(tokenizer, "chat_template", None):
                    raise Fp8MoeError(f"{path}:{no}: a 'messages' record, but the checkpoint's tokenizer has no chat "
                                      "template; use {\"text\": ...} records")
                ids = tokenizer.apply_chat_template(rec["messages"], tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                ids = tokenizer(rec["text"])["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids = ids + [tokenizer.eos_token_id]
            else:
                raise Fp8MoeError(f"{path}:{no}: expected {{\"messages\": [...]}} or {{\"text\": \"...\"}}, found "
                                  f"{type(rec).__name__} with keys {sorted(rec) if isinstance(rec, dict) else '-'}")
            if len(ids) >= 2:
                out.append(list(ids)[:seq_len] if seq_len else list(ids))
    if not out:
        raise Fp8MoeError(f"{path}: no usable records (each needs at least two tokens)")
    return out


def batches(examples: list[list[int]], seq_len: int, batch_size: int, packing: bool, pad_id: int,
            gen: torch.Generator, pad_to_seq_len: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (input_ids, labels) batches; labels of padding are -100. Rows are padded
    to the batch's longest, or with `pad_to_seq_len` to seq_len (one shape for every batch)."""
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        if packing:
            stream = [t for i in order for t in examples[i]]
            rows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)] or [stream]
        else:
            rows = [examples[i] for i in order]
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            chunk = rows[i:i + batch_size]
            width = seq_len if pad_to_seq_len else max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r)
                labels[j, :len(r)] = torch.tensor(r)
            yield ids, labels


def _targets(spec: str, model) -> tuple[list[str], list[str]]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    modules, params = [], []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "attention":
            modules += [a for a in ATTENTION if a in names]
        elif part == "experts":
            params += EXPERTS
        elif "." in part and part.endswith(("gate_up_proj", "down_proj")) and "experts" in part:
            params.append(part)
        else:
            modules.append(part)
    if not modules and not params:
        raise Fp8MoeError(f"--targets {spec!r} selects nothing (use attention, experts, or module names)")
    return modules, params


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fp8moe.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint directory (FP8 or BF16, with config.json and tokenizer)")
    p.add_argument("data", help="JSONL file: {\"messages\": [...]} or {\"text\": ...} per line")
    p.add_argument("--out", required=True, help="adapter output directory (must not exist)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--targets", default="attention,experts",
                   help="comma list: attention, experts, or module / parameter names (default: attention,experts)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--packing", action="store_true", help="concatenate examples into full seq-len rows")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--step-in-backward", action="store_true",
                   help="step the optimizer per decoder layer while backward runs and free each layer's "
                        "gradients at once (fp8moe.optim.StepInBackward): the same update, without holding every "
                        "adapter gradient at the step's peak; not with --grad-accum above 1")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every decoder layer (fp8moe.compile_decoder_layers): faster steps after a "
                        "one-time compile")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step (forward, backward, optimizer) in one CUDA graph after 3 eager steps "
                        "and replay it (fp8moe.graphs.CudaGraphStep): no host overhead per step; batches are padded "
                        "to --seq-len; needs a GPU, no dropout with --gradient-checkpointing, --grad-accum 1")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: the GPU when there is one)")
    p.add_argument("--quantize", default=None, help="quantize a BF16 checkpoint while loading: fp8, fp8-channel")
    p.add_argument("--precision", choices=GEMM_PRECISIONS, default=None,
                   help="forward FP8 GEMMs: w8a16 (precise, the default), w8a8 (FP8 tensor cores, Hopper) or "
                        "w8a8-down (W8A8 on the experts' down projection only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print a loss line every N steps when not on a terminal")
    a = p.parse_args(argv)
    if a.rank < 1 or a.lr <= 0 or a.seq_len < 2 or a.batch_size < 1 or a.grad_accum < 1:
        p.error("--rank, --lr, --batch-size and --grad-accum must be positive and --seq-len at least 2")
    if (a.steps is not None and a.steps < 1) or (a.epochs is not None and a.epochs <= 0):
        p.error("--steps / --epochs must be positive")
    if a.cuda_graph and a.grad_accum > 1:
        p.error("--cuda-graph replays one whole step (forward, backward and the optimizer step), so it cannot "
                "accumulate gradients over micro-batches: drop it or use --grad-accum 1")
    if a.step_in_backward and a.grad_accum > 1:
        p.error("--step-in-backward uses each gradient as soon as backward completes it, so it cannot accumulate "
                "gradients over micro-batches: drop it or use --grad-accum 1")
    return a


def run(a: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import peft
    from transformers import AutoTokenizer

    from .graphs import CudaGraphStep
    from .loading import from_pretrained
    from .modeling import compile_decoder_layers

    if os.path.exists(a.out):
        raise Fp8MoeError(f"--out {a.out} exists; choose a new directory (nothing was overwritten)")
    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    examples = read_examples(a.data, tokenizer, 0 if a.packing else a.seq_len)
    model = from_pretrained(a.model, device=a.device, quantize=a.quantize, precision=a.precision)
    device = next(model.parameters()).device
    modules, params = _targets(a.targets, model)
    config = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha if a.alpha is not None else 2 * a.rank,
                             target_modules=modules or None, target_parameters=params or None)
    model = peft.get_peft_model(model, config)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if a.compile:
        compile_decoder_layers(model)
    # fused on the GPU: one kernel for the whole update, without the foreach path's temporaries as
    # large as the adapters (2.3 GiB of F32 expert LoRA at Qwen3-30B-A3B's size, r 16). A graphed
    # step replays the optimizer too: capturable, with the learning rate a tensor that the
    # scheduler sets in place.
    def adamw(params):
        lr = torch.tensor(a.lr, device=device) if a.cuda_graph else a.lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=a.weight_decay, fused=device.type == "cuda",
                                 capturable=a.cuda_graph)

    stepper = (StepInBackward if a.step_in_backward else StepAfterBackward)(model, adamw)
    graphed = CudaGraphStep(model, stepper) if a.cuda_graph else None
    tokens_per_epoch = sum(len(e) for e in examples)
    per_step = a.batch_size * a.grad_accum * (a.seq_len if a.packing else
                                               max(1, tokens_per_epoch // len(examples)))
    steps = a.steps or max(1, math.ceil((a.epochs or 1.0) * tokens_per_epoch / per_step))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / max(1, a.warmup_steps)))
              for o in stepper.optimizers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    data = batches(examples, a.seq_len, a.batch_size, a.packing, pad, torch.Generator().manual_seed(a.seed),
                   pad_to_seq_len=a.cuda_graph)

    stage = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(a.out)) + ".partial-",
                             dir=os.path.dirname(os.path.abspath(a.out)) or ".")
    log_path = os.path.join(stage, "loss_log.csv")
    losses: list[float] = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fp8moe finetune", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        t0, seen = time.time(), 0
        with open(log_path, "w", newline="") as logf:
            log = csv.writer(logf)
            log.writerow(["step", "loss", "lr", "tokens", "seconds"])
            for step in range(1, steps + 1):
                total = 0.0
                for _ in range(a.grad_accum):
                    ids, labels = next(data)
                    ids, labels = ids.to(device), labels.to(device)
                    if graphed is not None:  # forward, backward and the optimizer step
                        loss = graphed(input_ids=ids, labels=labels)
                    else:
                        loss = model(input_ids=ids, labels=labels).loss / a.grad_accum
                        loss.backward()  # StepInBackward steps the optimizers in here
                    total += float(loss.detach())
                    seen += int((labels != -100).sum())
                if graphed is None:
                    stepper.finish()
                for sched in scheds:
                    sched.step()
                losses.append(total)
                elapsed = time.time() - t0
                log.writerow([step, f"{total:.6f}", f"{scheds[0].get_last_lr()[0]:.3e}", seen, f"{elapsed:.2f}"])
                logf.flush()
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{seen / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if not bar.disable:
                    continue
                if step == 1 or step % a.log_every == 0 or step == steps:
                    eta = elapsed / step * (steps - step)
                    print(f"step {step}/{steps}  loss {total:.4f}  {seen / max(elapsed, 1e-9):.0f} tok/s  "
                          f"eta {eta:.0f}s", flush=True)
        bar.close()
        model.save_pretrained(stage)
        os.rename(stage, a.out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "out": a.out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        r = run(a)
    except Fp8MoeError as e:
        print(f"fp8moe finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fp8moe finetune: interrupted; no adapter was written", file=sys.stderr)
        return 130
    print(f"adapter written to {r['out']} ({r['steps']} steps, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

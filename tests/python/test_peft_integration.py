"""PEFT on fp8moe models with the user's PEFT code unchanged: fp8moe's LoRA layers are created,
every adapter tensor gets a gradient that matches transformers + PEFT on the same (dequantized)
weights, the saved adapter is PEFT's own format and loads back onto the BF16 model and onto an
fp8moe model with the same outputs, and merging into FP8 weights is refused."""

from __future__ import annotations

import pytest
import torch

import fp8moe
from fp8moe.peft_integration import Fp8ExpertsLora, Fp8LinearLora

import models
import reference as ref

peft = pytest.importorskip("peft")

TARGETS = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("peft"))


def _config(**kw):
    # init_lora_weights=False: B is random too, so that every factor has a non-zero gradient.
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **TARGETS, **kw)


def _loss(model, ids):
    """The training loss, and the logits of the same input (a training forward with labels returns
    none from fp8moe's model: its loss is made from the hidden states)."""
    with torch.no_grad():
        logits = model(ids).logits
    return model(ids, labels=ids).loss, logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_lora_gradients_match_peft_on_dequantized_weights(root, family, gen):
    """Whole-model gradients, fp32 against fp32 on the CPU. On the GPU both models run in BF16 and
    a near-tie in a tiny random model's router picks other experts downstream (seen on the H100:
    logits 0.22 apart for GPT-OSS), so there the gradients are checked per op against the fp64
    reference (test_ops) and end to end by the loss parity below."""
    device = torch.device("cpu")
    fp8 = models.fp8_checkpoint(root, family, "block")
    dtype = torch.float32
    tol_out, tol_grad = 1e-4, 1e-3
    torch.manual_seed(1)
    ours = peft.get_peft_model(fp8moe.from_pretrained(fp8, device=device, dtype=dtype), _config())
    kinds = {type(m) for m in ours.modules()}
    assert Fp8ExpertsLora in kinds and Fp8LinearLora in kinds
    peer = peft.get_peft_model(models.exact_peer(fp8, dtype=dtype).to(device), _config())
    peft.set_peft_model_state_dict(peer, peft.get_peft_model_state_dict(ours))

    ids = torch.randint(0, 256, (2, 10), generator=gen).to(device)
    loss_a, logits_a = _loss(ours, ids)
    loss_b, logits_b = _loss(peer, ids)
    assert ref.rel_err(logits_a, logits_b) < tol_out
    loss_a.backward()
    loss_b.backward()
    grads_a = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in peer.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert any("experts" in n for n in grads_a)
    for n, g in grads_a.items():
        assert g is not None, f"{n} got no gradient"
        assert torch.isfinite(g).all() and torch.count_nonzero(g) > 0, n
        assert ref.rel_err(g, grads_b[n]) < tol_grad, n


def test_saved_adapter_is_peft_format_and_loads_both_ways(root, tmp_path, gen):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    torch.manual_seed(2)
    ours = peft.get_peft_model(fp8moe.from_pretrained(fp8, device="cpu", dtype=torch.float32), _config())
    ours.save_pretrained(tmp_path / "adapter")
    peer_ref = peft.get_peft_model(models.exact_peer(fp8), _config())
    assert set(peft.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(peer_ref))

    ids = torch.randint(0, 256, (1, 12), generator=gen)
    with torch.no_grad():
        want = ours(ids).logits
        on_bf16 = peft.PeftModel.from_pretrained(models.exact_peer(fp8), tmp_path / "adapter")
        got_peer = on_bf16(ids).logits
        on_fp8 = peft.PeftModel.from_pretrained(fp8moe.from_pretrained(fp8, device="cpu", dtype=torch.float32),
                                                tmp_path / "adapter")
        assert any(isinstance(m, Fp8ExpertsLora) for m in on_fp8.modules())
        got_fp8 = on_fp8(ids).logits
    assert ref.rel_err(got_peer, want) < 1e-4
    assert ref.rel_err(got_fp8, want) < 1e-6


def test_disabled_and_multiple_adapters(root, gen):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    base = fp8moe.from_pretrained(fp8, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 8), generator=gen)
    with torch.no_grad():
        plain = base(ids).logits
    torch.manual_seed(3)
    model = peft.get_peft_model(base, _config())
    model.add_adapter("second", _config())
    peer = peft.get_peft_model(models.exact_peer(fp8), _config())
    peer.add_adapter("second", _config())
    for name in ("default", "second"):
        peft.set_peft_model_state_dict(peer, peft.get_peft_model_state_dict(model, adapter_name=name),
                                       adapter_name=name)
    with torch.no_grad():
        with model.disable_adapter():
            assert ref.rel_err(model(ids).logits, plain) < 1e-7
        model.base_model.set_adapter(["default", "second"])
        peer.base_model.set_adapter(["default", "second"])
        assert ref.rel_err(model(ids).logits, peer(ids).logits) < 1e-4


def test_merging_into_fp8_weights_is_refused(root):
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block")
    model = peft.get_peft_model(fp8moe.from_pretrained(fp8, device="cpu"), _config())
    with pytest.raises(fp8moe.Fp8MoeError, match="export_merged"):
        model.merge_and_unload()


@pytest.fixture(params=["w8a16", "w8a8-down"])
def precision(request, device, use_precision):
    """The forward FP8 GEMMs' precision of the device's engine for one test (conftest's
    use_precision: skipped where W8A8 cannot run, w8a16 again afterwards)."""
    use_precision(request.param, device)
    return request.param


def test_loss_parity_over_100_steps(root, device, gen, precision):
    """100 LoRA steps (attention + experts) on fp8moe and on transformers + PEFT over the same
    dequantized values: same data, seed, adapter initialisation and optimizer; the loss curves stay
    within 2% of each other (in 10-step means, so that a single near-tie routing flip in BF16 on the
    GPU does not decide it).

    16 sequences, each seen six or seven times: with 4 seen 25 times each, the run memorised them
    (loss 5.8 -> 1.9) and amplified rounding alone to the 2% bound (2.5% on an H100 for one seed).
    The proxy measured on the CPU for this choice, the peer in BF16 against fp8moe in F32: 4
    sequences gap 0.7-2.1% (8 seeds), 16 sequences 0.2-0.6% (20 seeds); with the expert adapters
    left untrained on fp8moe's side, 16 sequences gap 16-18% (4 seeds).

    Also under W8A8 on the down projection (Hopper): issue 13 makes W8A8 the default there only if
    this check and the layer-accuracy one hold with it. That case uses 128-wide dimensions, which
    the W8A8 kernel takes (K a multiple of 16; gate and up in whole 128-row scale blocks)."""
    fp8 = models.fp8_checkpoint(root, "qwen3_moe", "block") if precision == "w8a16" else \
        models.fp8_checkpoint(root, "qwen3_moe", "block", name="bf16-128", **models.TRANSFORMERS_FP8_DIMS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = peft.LoraConfig(r=4, lora_alpha=8, **TARGETS)
    torch.manual_seed(5)
    ours = peft.get_peft_model(fp8moe.from_pretrained(fp8, device=device, dtype=dtype), cfg)
    peer = peft.get_peft_model(models.exact_peer(fp8, dtype=dtype).to(device), cfg)
    peft.set_peft_model_state_dict(peer, peft.get_peft_model_state_dict(ours))
    data = torch.randint(0, 256, (16, 2, 24), generator=gen).to(device)
    if precision != "w8a16":  # the case is about W8A8: it must have run (it changes the bits)
        with torch.no_grad():
            fast = ours(input_ids=data[0], labels=data[0]).loss
            fp8moe.set_gemm_precision("w8a16", device)
            precise = ours(input_ids=data[0], labels=data[0]).loss
            fp8moe.set_gemm_precision(precision, device)
        assert float(fast) != float(precise), f"{precision} left the loss bit-identical to w8a16: W8A8 did not run"
    curves = []
    for model in (ours, peer):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for step in range(100):
            ids = data[step % data.shape[0]]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        curves.append(torch.tensor(losses))
    a, b = (c.reshape(10, 10).mean(dim=1) for c in curves)
    assert curves[0][-10:].mean() < 0.8 * curves[0][:10].mean()  # it learns (0.74-0.77x on the CPU, 20 seeds)
    assert ((a - b).abs() / b).max() < 0.02, (a, b)

"""fp8moe.ops against the independent fp64 reference (reference.py): forward and every gradient,
fresh random inputs, the hard cases (T = 0 and 1, experts without tokens, one expert taking every
token, dims that are not multiples of a tile or of 128), and torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch

import fp8moe
from fp8moe import ops

import reference as ref

# name, T, k, E, H, I, scale kind, activation kind, layout, bias, lora rank, FP8 format, routing
CASES = [
    ("silu_block_lora", 9, 2, 5, 48, 40, "block", 0, 0, False, 4, 1, "uniform"),
    ("silu_block_seg_small_blocks", 7, 3, 4, 64, 48, "block16", 0, 0, False, 0, 1, "uniform"),
    ("gptoss_channel_bias_lora", 8, 2, 4, 40, 24, "channel", 1, 1, True, 3, 1, "uniform"),
    ("tensor_e5m2", 6, 2, 3, 32, 16, "tensor", 0, 0, False, 2, 2, "uniform"),
    ("group_scales", 5, 2, 3, 64, 32, "group", 0, 0, False, 0, 1, "uniform"),
    ("plain_weights_lora", 6, 2, 4, 24, 20, "none", 0, 0, False, 4, 0, "uniform"),
    ("one_token", 1, 2, 6, 40, 24, "block", 0, 0, False, 4, 1, "uniform"),
    ("zero_tokens", 0, 2, 4, 32, 16, "block", 0, 0, False, 4, 1, "uniform"),
    ("one_hot_expert", 12, 1, 6, 32, 24, "channel", 0, 0, False, 4, 1, "one_hot"),
    ("empty_experts", 10, 2, 8, 32, 24, "block", 0, 0, True, 2, 1, "few"),
]


def make_case(case, device, gen, dtype):
    name, T, k, E, H, I, kind, akind, layout, bias, r, code, routing = case
    segments, block = 1, (128, 128)
    if kind == "block16":
        kind, segments, block = "block", 2, (16, 16)
    gu = ref.random_stack(E, 2 * I, H, kind, gen, code=code, segments=segments, block=block, group=16)
    dn = ref.random_stack(E, H, I, kind, gen, code=code, block=block, group=16)
    act = [float(akind), float(layout), 1.702, 7.0]
    x = torch.randn(T, H, generator=gen)
    if routing == "one_hot":
        ids = torch.full((T, k), 2, dtype=torch.int64)
    elif routing == "few":  # experts 1, 4 and 6 only: the others get no tokens
        pool = torch.tensor([1, 4, 6])
        ids = torch.stack([pool[torch.randperm(3, generator=gen)[:k]] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.int64)
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(T, k, generator=gen) + 0.1
    biases = (torch.randn(E, 2 * I, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1) if bias else (None, None)
    lora = (None,) * 4
    if r:
        lora = (torch.randn(E, r, H, generator=gen) * 0.2, torch.randn(E, 2 * I, r, generator=gen) * 0.2,
                torch.randn(E, r, I, generator=gen) * 0.2, torch.randn(E, H, r, generator=gen) * 0.2)
    dev = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return dict(
        x=x, ids=ids, w=w, gu=gu, dn=dn, act=act, biases=biases, lora=lora,
        args=dict(hidden=dev(x, dtype), topk_ids=dev(ids), topk_weights=dev(w, dtype),
                  gate_up=dev(gu[0]), gate_up_scale=dev(gu[1]), down=dev(dn[0]), down_scale=dev(dn[1]),
                  specs=[*gu[2], *dn[2], code], act=act, gate_up_bias=dev(biases[0]), down_bias=dev(biases[1])),
        lora_dev=tuple(dev(t, torch.float32) for t in lora),
    )


def tolerance(device) -> float:
    # CPU: the fp64 oracle with F32 inputs; CUDA: BF16 activations and MMAs.
    return 2e-6 if device.type == "cpu" else 2.5e-2


def act_dtype(device):
    return torch.float32 if device.type == "cpu" else torch.bfloat16


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_moe_experts_forward_backward_match_reference(case, device, gen):
    c = make_case(case, device, gen, act_dtype(device))
    a = c["args"]
    hidden = a["hidden"].clone().requires_grad_(True)
    weights = a["topk_weights"].clone().requires_grad_(True)
    lora = tuple(None if t is None else t.clone().requires_grad_(True) for t in c["lora_dev"])
    scaling = 0.75
    out = ops.moe_experts(hidden, a["topk_ids"], weights, a["gate_up"], a["gate_up_scale"], a["down"],
                          a["down_scale"], a["specs"], a["act"], a["gate_up_bias"], a["down_bias"], lora, scaling)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype

    # The reference, fp64, on the same (rounded) inputs.
    xr = hidden.detach().double().cpu().requires_grad_(True)
    wr = weights.detach().double().cpu().requires_grad_(True)
    lr = tuple(None if t is None else t.detach().double().cpu().requires_grad_(True) for t in lora)
    gu, dn = c["gu"], c["dn"]
    bias = tuple(None if b is None else b.double() for b in c["biases"])
    out_ref = ref.moe(xr, c["ids"], wr, ref.dequantize(*gu), ref.dequantize(*dn), c["act"], *bias, lr, scaling)
    tol = tolerance(device)
    assert torch.isfinite(out.float()).all()
    assert ref.rel_err(out, out_ref) < tol

    if out.numel() == 0:
        return
    g = torch.randn(out.shape, generator=gen)
    out.backward(g.to(out.device, out.dtype))
    (out_ref * g.double()).sum().backward()
    assert ref.rel_err(hidden.grad, xr.grad) < tol
    assert ref.rel_err(weights.grad, wr.grad) < tol
    for got, want in zip(lora, lr):
        if got is not None:
            assert got.grad is not None and torch.isfinite(got.grad).all()
            assert ref.rel_err(got.grad, want.grad) < tol
    # Experts without tokens get exact zeros in every adapter gradient.
    used = set(c["ids"].flatten().tolist())
    for t in lora:
        if t is not None:
            for e in range(t.shape[0]):
                if e not in used:
                    assert torch.count_nonzero(t.grad[e]) == 0


@pytest.mark.parametrize("kind", ["block", "channel", "none"])
@pytest.mark.parametrize("rank", [0, 4])
def test_fp8_linear_matches_reference(kind, rank, device, gen):
    T, K, N = 11, 80, 72
    codes, scale, spec, code = ref.random_stack(1, N, K, kind, gen, block=(32, 32))
    x = torch.randn(2, T, K, generator=gen).to(device, act_dtype(device)).requires_grad_(True)
    A = (torch.randn(rank, K, generator=gen) * 0.2).to(device).requires_grad_(True) if rank else None
    B = (torch.randn(N, rank, generator=gen) * 0.2).to(device).requires_grad_(True) if rank else None
    bias = torch.randn(N, generator=gen).to(device)
    y = ops.fp8_linear(x, codes[0].to(device), None if scale is None else scale[0].to(device), [*spec, code], bias,
                       A, B, 0.5)
    W = ref.dequantize(codes, scale, spec, code)[0]
    xr = x.detach().double().cpu().requires_grad_(True)
    Ar = None if A is None else A.detach().double().cpu().requires_grad_(True)
    Br = None if B is None else B.detach().double().cpu().requires_grad_(True)
    yr = xr @ W.T + bias.double().cpu()
    if rank:
        yr = yr + 0.5 * (xr @ Ar.T) @ Br.T
    tol = tolerance(device)
    assert y.shape == (2, T, N) and ref.rel_err(y, yr) < tol
    g = torch.randn(y.shape, generator=gen)
    y.backward(g.to(y.device, y.dtype))
    (yr * g.double()).sum().backward()
    assert ref.rel_err(x.grad, xr.grad) < tol
    if rank:
        assert ref.rel_err(A.grad, Ar.grad) < tol and ref.rel_err(B.grad, Br.grad) < tol


def test_frozen_weights_refuse_gradients(gen):
    c = make_case(CASES[0], torch.device("cpu"), gen, torch.float32)
    a = dict(c["args"])
    bias = torch.randn(a["gate_up"].shape[0], a["gate_up"].shape[1] // 1, generator=gen)
    bias = bias[:, : a["gate_up"].shape[1]].requires_grad_(True)
    out = ops.moe_experts(a["hidden"].requires_grad_(True), a["topk_ids"], a["topk_weights"], a["gate_up"],
                          a["gate_up_scale"], a["down"], a["down_scale"], a["specs"], a["act"], bias)
    with pytest.raises(fp8moe.Fp8MoeError, match="frozen"):
        out.sum().backward()


def test_bad_input_names_the_tensor(gen):
    c = make_case(CASES[0], torch.device("cpu"), gen, torch.float32)
    a = c["args"]
    with pytest.raises(fp8moe.Fp8MoeError, match="hidden"):
        ops.moe_experts(a["hidden"][:, :-1], a["topk_ids"], a["topk_weights"], a["gate_up"], a["gate_up_scale"],
                        a["down"], a["down_scale"], a["specs"], a["act"])
    with pytest.raises(fp8moe.Fp8MoeError, match="topk_ids"):
        ops.moe_experts(a["hidden"], a["topk_ids"].float(), a["topk_weights"], a["gate_up"], a["gate_up_scale"],
                        a["down"], a["down_scale"], a["specs"], a["act"])
    bad = a["topk_ids"].clone()
    bad[0, 0] = 99
    with pytest.raises(fp8moe.Fp8MoeError, match="outside the expert range"):
        ops.moe_experts(a["hidden"], bad, a["topk_weights"], a["gate_up"], a["gate_up_scale"], a["down"],
                        a["down_scale"], a["specs"], a["act"])


@pytest.mark.parametrize("rank", [0, 4])
def test_opcheck_moe_experts(rank, device, gen):
    case = ("opcheck", 6, 2, 4, 32, 16, "block", 0, 0, True, rank, 1, "uniform")
    c = make_case(case, device, gen, act_dtype(device))
    a = c["args"]
    hidden = a["hidden"].requires_grad_(True)
    weights = a["topk_weights"].requires_grad_(True)
    lora = tuple(None if t is None else t.requires_grad_(True) for t in c["lora_dev"])
    args = (hidden, a["topk_ids"], weights, a["gate_up"], a["gate_up_scale"], a["down"], a["down_scale"],
            a["gate_up_bias"], a["down_bias"], *lora, a["specs"], a["act"], 0.5, True)
    torch.library.opcheck(ops.moe_experts_op, args)


def test_opcheck_fp8_linear(device, gen):
    codes, scale, spec, code = ref.random_stack(1, 24, 40, "block", gen, block=(16, 16))
    x = torch.randn(5, 40, generator=gen).to(device, act_dtype(device)).requires_grad_(True)
    A = (torch.randn(4, 40, generator=gen) * 0.2).to(device).requires_grad_(True)
    B = (torch.randn(24, 4, generator=gen) * 0.2).to(device).requires_grad_(True)
    args = (x, codes[0].to(device), scale[0].to(device), None, A, B, [*spec, code], 0.5, True)
    torch.library.opcheck(ops.fp8_linear_op, args)


def _grads_of(run, tensors):
    out = run()
    out.backward(torch.ones_like(out))
    grads = [None if t is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("rank", [0, 4])
def test_eager_path_equals_the_registered_op(rank, device, gen):
    """Eager calls take an autograd.Function over the same engine calls as the custom op (which
    torch.compile sees): outputs and every gradient must be the same bits."""
    case = ("eager", 9, 3, 5, 48, 24, "block", 0, 0, True, rank, 1, "uniform")
    c = make_case(case, device, gen, act_dtype(device))
    a = c["args"]
    hidden = a["hidden"].clone().requires_grad_(True)
    weights = a["topk_weights"].clone().requires_grad_(True)
    lora = tuple(None if t is None else t.clone().requires_grad_(True) for t in c["lora_dev"])
    tensors = (hidden, weights, *lora)
    fixed = (a["gate_up"], a["gate_up_scale"], a["down"], a["down_scale"])
    eager = _grads_of(lambda: ops.moe_experts(hidden, a["topk_ids"], weights, *fixed, a["specs"], a["act"],
                                              a["gate_up_bias"], a["down_bias"], lora, 0.5), tensors)
    op = _grads_of(lambda: ops.moe_experts_op(hidden, a["topk_ids"], weights, *fixed, a["gate_up_bias"],
                                              a["down_bias"], *lora, a["specs"], a["act"], 0.5, True)[0], tensors)
    assert torch.equal(eager[0], op[0])
    for x, y in zip(eager[1], op[1]):
        assert (x is None and y is None) or torch.equal(x, y)

    codes, scale, spec, code = ref.random_stack(1, 24, 40, "block", gen, block=(16, 16))
    x = torch.randn(5, 40, generator=gen).to(device, act_dtype(device)).requires_grad_(True)
    A = (torch.randn(4, 40, generator=gen) * 0.2).to(device).requires_grad_(True) if rank else None
    B = (torch.randn(24, 4, generator=gen) * 0.2).to(device).requires_grad_(True) if rank else None
    w, s = codes[0].to(device), scale[0].to(device)
    eager = _grads_of(lambda: ops.fp8_linear(x, w, s, [*spec, code], None, A, B, 0.5), (x, A, B))
    op = _grads_of(lambda: ops.fp8_linear_op(x, w, s, None, A, B, [*spec, code], 0.5, True)[0], (x, A, B))
    assert torch.equal(eager[0], op[0])
    for p, q in zip(eager[1], op[1]):
        assert (p is None and q is None) or torch.equal(p, q)

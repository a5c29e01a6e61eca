"""An independent fp64 reference for the fp8moe ops, written for clarity in plain torch: FP8 codes
decoded by torch's own float8 dtypes, scales expanded by the ScaleSpec rule of quant.hpp, the MoE
layer as a loop over (token, slot) pairs. Nothing here calls the engine."""

from __future__ import annotations

import math

import torch

FP8 = {1: torch.float8_e4m3fn, 2: torch.float8_e5m2}
KIND = {"none": 0, "tensor": 1, "channel": 2, "block": 3, "group": 4}


def spec_of(kind: str, rows: int, cols: int, segments: int = 1, block: tuple[int, int] = (128, 128), group: int = 32):
    """[kind, rows, cols, segments, block_n, block_k] as quant.hpp's ScaleSpec factories make it."""
    if kind == "none":
        return [0, rows, cols, 1, 1, 1]
    if kind == "tensor":
        return [1, rows, cols, segments, rows // segments, cols]
    if kind == "channel":
        return [2, rows, cols, 1, 1, cols]
    if kind == "block":
        return [3, rows, cols, segments, block[0], block[1]]
    return [4, rows, cols, 1, 1, group]


def scale_shape(spec) -> tuple[int, int]:
    _kind, rows, cols, seg, bn, bk = spec
    return seg * math.ceil(rows // seg / bn), math.ceil(cols / bk)


def random_stack(E: int, N: int, K: int, kind: str, gen: torch.Generator, code: int = 1, segments: int = 1,
                 block=(128, 128), group: int = 32):
    """Random FP8 codes (uint8 bytes of finite values) and positive F32 scales, or a plain F32 stack."""
    spec = spec_of(kind, N, K, segments, block, group)
    if kind == "none":
        return torch.randn(E, N, K, generator=gen) * 0.2, None, spec, 0
    values = torch.randn(E, N, K, generator=gen) * 4.0
    codes = values.to(FP8[code]).view(torch.uint8)
    sr, sc = scale_shape(spec)
    scale = torch.rand(E, sr, sc, generator=gen) * 0.05 + 0.01
    return codes, scale, spec, code


def dequantize(data: torch.Tensor, scale, spec, code: int) -> torch.Tensor:
    """value = code x scale, element (e, n, k) taking scale[e][seg(n) * grid_n + (n % seg_rows) // bn][k // bk]."""
    if code == 0:
        return data.double()
    vals = data.view(FP8[code]).double()
    _kind, rows, cols, seg, bn, bk = spec
    seg_rows = rows // seg
    grid_n = math.ceil(seg_rows / bn)
    n = torch.arange(rows)
    ri = (n // seg_rows) * grid_n + (n % seg_rows) // bn
    ci = torch.arange(cols) // bk
    return vals * scale.double()[:, ri][:, :, ci]


def act_forward(h: torch.Tensor, act) -> torch.Tensor:
    """h [.., 2I] -> [.., I] (act = [kind, layout, alpha, limit])."""
    kind, layout, alpha, limit = act
    if layout == 0:
        gate, up = h.chunk(2, dim=-1)
    else:
        gate, up = h[..., 0::2], h[..., 1::2]
    if kind == 0:
        return torch.nn.functional.silu(gate) * up
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def moe(x, ids, w, gate_up, down, act, gate_up_bias=None, down_bias=None, lora=(None,) * 4, scaling=1.0):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]); every tensor fp64, weights dequantized
    [E, 2I, H] and [E, H, I]; lora = (A_gu [E, r, H], B_gu [E, 2I, r], A_d [E, r, I], B_d [E, H, r])."""
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    A1, B1, A2, B2 = lora
    rows = []
    for t in range(T):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(k):
            e = int(ids[t, j])
            h = gate_up[e] @ x[t]
            if A1 is not None:
                h = h + scaling * (B1[e] @ (A1[e] @ x[t]))
            if gate_up_bias is not None:
                h = h + gate_up_bias[e]
            a = act_forward(h, act)
            y = down[e] @ a
            if A2 is not None:
                y = y + scaling * (B2[e] @ (A2[e] @ a))
            if down_bias is not None:
                y = y + down_bias[e]
            acc = acc + w[t, j] * y
        rows.append(acc)
    return torch.stack(rows) if rows else out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)

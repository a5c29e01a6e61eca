"""Shared fixtures: the devices to run on, fresh seeds (printed on failure), tiny model factories."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

import fp8moe  # noqa: F401  (registers the ops and the PEFT hookup)

os.environ.setdefault("FP8MOE_QUIET", "1")


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available() and fp8moe._C.cuda_available():
        out.append("cuda")
    return out


@pytest.fixture(params=devices())
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator with a fresh seed for every test (FP8MOE_SEED pins it to rerun a failure)."""
    seed = int(os.environ.get("FP8MOE_SEED", secrets.randbits(62)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed {seed} (rerun with FP8MOE_SEED={seed})")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return g


@pytest.fixture
def use_precision():
    """use(precision, device): sets the device engine's forward GEMM precision for this test, or
    skips the test where that precision cannot run (W8A8 outside Hopper builds with its kernel);
    every engine it touched is back on w8a16 when the test ends, passed or not."""
    touched: list[torch.device] = []

    def use(precision: str, device: torch.device) -> None:
        try:
            fp8moe.set_gemm_precision(precision, device)
        except fp8moe.Fp8MoeError as e:
            pytest.skip(f"{precision} cannot run here: {e}")
        touched.append(device)

    yield use
    for d in touched:
        fp8moe.set_gemm_precision("w8a16", d)

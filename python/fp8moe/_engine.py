"""Glue between torch tensors and the C++ engine (fp8moe._C): one engine per device, the
current stream, torch's allocator for temporaries, and the layout of saved buffers.

Nothing here computes: every number comes out of the C++ engine.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _C

Fp8MoeError = _C.Error

# The dtype of the intermediates each backend computes in (the CPU backend is the fp64 oracle):
# the fake implementations need it without an engine. Checked against the engine when one is made.
_ACTIVATION = {"cpu": "F64", "cuda": "BF16"}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}

_engines: dict[tuple[str, int], _C.Engine] = {}


def engine_for(device: torch.device) -> _C.Engine:
    """The engine of `device`, made on first use. Make it outside CUDA-graph capture: a new CUDA
    engine allocates its fault word with cudaMalloc (the model loaders do so at load time)."""
    kind = device.type
    if kind not in _ACTIVATION:
        raise Fp8MoeError(f"fp8moe runs on 'cpu' or 'cuda' tensors, found a tensor on '{device}'")
    index = (device.index if device.index is not None else torch.cuda.current_device()) if kind == "cuda" else 0
    key = (kind, index)
    eng = _engines.get(key)
    if eng is None:
        if kind == "cuda" and not _C.cuda_available():
            raise Fp8MoeError("a CUDA tensor reached fp8moe, but this build of fp8moe has no usable CUDA backend "
                              "(built without nvcc, or no GPU visible to it); rebuild with nvcc on the PATH")
        eng = _C.Engine(kind, index)
        if eng.activation_dtype != _ACTIVATION[kind]:
            raise Fp8MoeError(f"internal: the {kind} engine computes in {eng.activation_dtype}, the binding expects "
                              f"{_ACTIVATION[kind]}")
        _engines[key] = eng
    return eng


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """`device` as fp8moe uses it: None means the current GPU when this build has a usable CUDA
    backend, else the CPU; a bare "cuda" gets the current device's index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _C.cuda_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


GEMM_PRECISIONS = ("w8a16", "w8a8", "w8a8-down")  # the engine's names (backend.hpp), for option lists


def set_gemm_precision(precision: str, device: Union[str, torch.device, None] = None) -> None:
    """Selects how `device`'s engine runs the forward FP8 GEMMs (experts and FP8 projections):

    - "w8a16" (the default): FP8 weights dequantized inside the kernel, BF16 activations. Precise;
      every GPU from sm_80, and the CPU.
    - "w8a8": activations quantized to FP8 E4M3 per token and 128-wide group, FP8 tensor cores
      (Hopper, sm_90a builds). Faster, with E4M3 rounding of the activations. GEMMs it cannot take
      (the backward ones, other scale schemes) stay W8A16; each such forward GEMM is said once on
      stderr.
    - "w8a8-down": W8A8 for the experts' down projection only, W8A16 elsewhere. One E4M3 rounding
      instead of two keeps the layer output near 2.3e-2 of the exact result (W8A8: ~4e-2), and the
      down projection is where W8A8 gains most.

    The setting belongs to the device's engine, so it applies to every fp8moe module on that device
    from the next call on (a CUDA graph keeps the kernels it captured). Raises Fp8MoeError where
    W8A8 cannot run (CPU, a card other than sm_90, a build without the kernel), naming why.
    """
    # The engine parses the name (any case) and says which ones it takes.
    engine_for(resolve_device(device)).gemm_precision = str(precision)


def gemm_precision(device: Union[str, torch.device, None] = None) -> str:
    """The forward FP8 GEMMs' precision on `device`: "w8a16", "w8a8" or "w8a8-down" (see
    set_gemm_precision).
    The CUDA engine starts from the environment variable FP8MOE_PRECISION (unset: w8a16)."""
    return engine_for(resolve_device(device)).gemm_precision


def activation_name(device: torch.device) -> str:
    if device.type not in _ACTIVATION:
        raise Fp8MoeError(f"fp8moe runs on 'cpu' or 'cuda' tensors, found a tensor on '{device}'")
    return _ACTIVATION[device.type]


def saved_buffers(layout: Sequence[tuple[str, str, Sequence[int]]], pairs, device: torch.device) -> list[torch.Tensor]:
    """Allocates the buffers a layer keeps for backward, as the engine's layout query lists them
    (-1 in a shape stands for the pair count, which may be symbolic under torch.compile)."""
    return [torch.empty([pairs if d == -1 else d for d in shape], dtype=_DTYPES[dtype], device=device)
            for _name, dtype, shape in layout]


def dl(t: Optional[torch.Tensor]):
    """A tensor as the binding takes it: a DLPack capsule. Made by torch's C exporter directly,
    which is ~10x cheaper than `Tensor.__dlpack__` (Python) on a detached copy; the engine never
    writes through an input, and it works on torch's current stream (no stream handshake)."""
    return None if t is None else _to_dlpack(t)


def _torch_allocator() -> tuple[Callable[[int, int], int], Callable[[int], None]]:
    """The binding's allocator for temporaries: (allocate(nbytes, stream) -> address, free(address))
    on the current CUDA device. torch's raw caching-allocator entry points, where this torch has
    them, give a block without making a tensor object for it (several per engine call, hundreds
    of calls per step); otherwise each block is a torch uint8 tensor held until its free. Either
    way the blocks come from torch's caching allocator, on the call's stream (and from a CUDA
    graph's pool under capture)."""
    raw_alloc = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)
    raw_delete = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", None)
    if callable(raw_alloc) and callable(raw_delete):
        return raw_alloc, raw_delete
    return _tensor_allocator()


def _tensor_allocator() -> tuple[Callable[[int, int], int], Callable[[int], None]]:
    """The stand-in over torch.empty: the call's stream is torch's current stream (Call)."""
    live: dict[int, torch.Tensor] = {}

    def alloc(nbytes: int, stream: int) -> int:
        t = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")
        live[t.data_ptr()] = t
        return t.data_ptr()

    def free(address: int) -> None:
        live.pop(address, None)

    return alloc, free


_ALLOCATOR: Optional[tuple[Callable[[int, int], int], Callable[[int], None]]] = None


class Call:
    """The stream and the allocator of one engine call on `device`: torch's current stream, and
    temporaries from torch's caching allocator (freed in stream order when the call returns).
    Kept cheap: it runs several times per layer and step. Under torch.profiler the call is a
    labelled range (`name`), so that a profile shows the host time spent in fp8moe's calls."""

    __slots__ = ("engine", "stream", "alloc", "guard", "label")

    def __init__(self, device: torch.device, name: str = "fp8moe"):
        self.engine = engine_for(device)
        self.guard = None
        self.label = torch.autograd.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else None
        if device.type == "cuda":
            global _ALLOCATOR
            self.stream = torch.cuda.current_stream(device).cuda_stream
            self.alloc = _ALLOCATOR or (_ALLOCATOR := _torch_allocator())
            if device.index is not None and device.index != torch.cuda.current_device():
                self.guard = torch.cuda.device(device)  # DLPack export needs the tensor's device current
        else:
            self.stream, self.alloc = 0, None

    def __enter__(self) -> "Call":
        if self.label is not None:
            self.label.__enter__()
        if self.guard is not None:
            self.guard.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.guard is not None:
            self.guard.__exit__(*exc)
        if self.label is not None:
            self.label.__exit__(*exc)

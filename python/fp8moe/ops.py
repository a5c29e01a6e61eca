"""torch.library custom ops over the C++ engine.

    fp8moe::moe_experts            the MoE expert layer forward (FP8 experts, split LoRA, bias,
                                   activation, routing weights, combine)
    fp8moe::moe_experts_backward   its backward: gradients to the input, routing weights, adapters
    fp8moe::fp8_linear             a dense W8A16 projection with an optional LoRA delta (G = 1)
    fp8moe::fp8_linear_backward    its backward

Each op has a fake (meta) implementation and is registered for autograd, so torch.compile sees one
opaque node per layer. The buffers forward keeps for backward are extra outputs of the forward op
(laid out by the engine's saved-layout query), so they belong to autograd: gradient checkpointing
frees them like any activation. Work runs on torch's current stream; temporaries come from torch's
caching allocator; nothing synchronises with the host.

Conventions (the engine's): D = X @ W^T with W stored [N, K]; experts gate_up [E, 2I, H] and down
[E, H, I] as FP8 codes (uint8 bytes, format in `specs`) with F32 scales, or plain weights; LoRA per
expert A [E, r, in], B [E, out, r]; M = T * k (token, slot) pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C
from ._engine import Call, Fp8MoeError, activation_name, dl, saved_buffers


def _rank(a: Optional[Tensor]) -> int:
    return 0 if a is None else int(a.shape[1])


def _wants_save(tracked) -> bool:
    """Whether autograd will call backward: only then does forward keep its buffers."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked)


def _grad_slots(like, needs, anchor: Tensor) -> list[Tensor]:
    """One output per gradient slot of a backward op: shaped like its input, or empty when not
    needed (custom ops return tensors, not None). The real and the fake implementation share it."""
    return [torch.empty_like(t) if n else anchor.new_empty(0) for t, n in zip(like, needs)]


def _backward_needs(ctx, grad_inputs, frozen, what: str) -> list[bool]:
    """The gradient slots autograd wants; refuses gradients to frozen inputs and a forward that
    kept nothing."""
    if any(ctx.needs_input_grad[i] for i in frozen):
        raise Fp8MoeError(f"fp8moe: a gradient to the frozen {what} (or its scales or biases) was requested; "
                          f"fp8moe trains LoRA adapters on a frozen {what}")
    if not ctx.save:
        raise Fp8MoeError(f"fp8moe: backward through a {what} whose forward ran without keeping its buffers (it ran "
                          "with grad disabled or with no input requiring grad)")
    return [ctx.needs_input_grad[i] for i in grad_inputs]


def _traced() -> bool:
    """Whether torch.compile (or export) is tracing: the graph then holds the custom ops, which have
    fake implementations. Eager calls take an autograd.Function over the same engine calls
    instead: the custom op's dispatch (schema defaults, pytree, a redispatch per key) cost more
    host time per call than the engine call itself, and a fine-tuning step makes hundreds of them."""
    return torch.compiler.is_compiling()


def _eager_function(name: str, forward, setup_context, backward, backward_grads) -> type:
    """An op's autograd in eager mode, without the dispatcher (see _traced): the op's own forward
    body, context and backward, with the backward body called directly instead of its op."""

    def fwd(ctx, *inputs):  # the old style: a separate setup_context costs an inspect.signature per call
        output = forward(*inputs)
        ctx.mark_non_differentiable(*output[1:])
        setup_context(ctx, inputs, output)
        return tuple(output)

    def bwd(ctx, *grads):
        return backward(ctx, grads, backward_grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _input_grads(grads, needs, grad_inputs, n_inputs: int) -> tuple:
    """The backward op's slots -> autograd's per-input gradients (None where not needed)."""
    out: list[Optional[Tensor]] = [None] * n_inputs
    for slot, i in enumerate(grad_inputs):
        out[i] = grads[slot] if needs[slot] else None
    return tuple(out)


# The operator library. Each op is declared by its schema and gets one Python kernel for the CPU and
# the CUDA dispatch keys, a fake implementation and an autograd formula. torch.library.custom_op
# would wrap the kernel in a layer of its own (a CompositeExplicitAutograd kernel that looks the
# device up and redispatches): ~12-17 us more per call on this project's CPU, which a compiled
# step, calling the ops from its graphs ~720 times, pays in full.
_LIB = torch.library.Library("fp8moe", "DEF")


def _define(name: str, schema: str, kernel):
    """Declares fp8moe::<name><schema> with `kernel` for the CPU and CUDA keys; returns the op."""
    _LIB.define(name + schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, kernel, key)
    return getattr(torch.ops.fp8moe, name).default


# =============================================================================================
# The MoE expert layer

_MOE_N_INPUTS = 17
_MOE_GRAD_INPUTS = (0, 2, 9, 10, 11, 12)  # hidden, topk_weights, gate_up_A, gate_up_B, down_A, down_B
_MOE_FROZEN = (3, 4, 5, 6, 7, 8)          # the expert weights, their scales and biases


def _moe_outputs(hidden, topk_ids, gate_up, gate_up_A, down_A, save) -> list[Tensor]:
    """[out [T, H], *saved]: the saved buffers as the engine lays them out, M = T * k pairs."""
    out = torch.empty_like(hidden)
    if not save:
        return [out]
    E, two_i, H = gate_up.shape
    layout = _C.moe_saved_layout(activation_name(hidden.device), int(E), int(H), int(two_i) // 2, _rank(gate_up_A),
                                 _rank(down_A))
    return [out, *saved_buffers(layout, topk_ids.shape[0] * topk_ids.shape[1], hidden.device)]


def _moe_call_args(hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale, gate_up_bias, down_bias,
                   gate_up_A, gate_up_B, down_A, down_B):
    """The binding's (inputs, experts, lora) tuples."""
    return ((dl(hidden), dl(topk_ids), dl(topk_weights)),
            (dl(gate_up), dl(gate_up_scale), dl(down), dl(down_scale), dl(gate_up_bias), dl(down_bias)),
            (dl(gate_up_A), dl(gate_up_B), dl(down_A), dl(down_B)))


def _moe_forward(hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale, gate_up_bias, down_bias,
                 gate_up_A, gate_up_B, down_A, down_B, specs, act, scaling, save) -> list[Tensor]:
    """The forward's engine call: [out [T, H], *saved] (saved: empty unless `save`)."""
    with Call(hidden.device, "fp8moe.moe_forward") as c:
        outputs = _moe_outputs(hidden, topk_ids, gate_up, gate_up_A, down_A, save)
        inputs, experts, lora = _moe_call_args(hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale,
                                               gate_up_bias, down_bias, gate_up_A, gate_up_B, down_A, down_B)
        _C.moe_forward(c.engine, c.stream, c.alloc, inputs, experts, specs, act, lora, scaling, dl(outputs[0]),
                       [dl(t) for t in outputs[1:]] if save else None)
    return outputs


# Returns [out [T, H], *saved] (saved: empty unless `save`).
moe_experts_op = _define(
    "moe_experts", "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor? gate_up_scale, "
    "Tensor down, Tensor? down_scale, Tensor? gate_up_bias, Tensor? down_bias, Tensor? gate_up_A, Tensor? gate_up_B, "
    "Tensor? down_A, Tensor? down_B, int[] specs, float[] act, float scaling, bool save) -> Tensor[]", _moe_forward)


@torch.library.register_fake("fp8moe::moe_experts")
def _moe_experts_fake(hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale, gate_up_bias,
                      down_bias, gate_up_A, gate_up_B, down_A, down_B, specs, act, scaling, save):
    return _moe_outputs(hidden, topk_ids, gate_up, gate_up_A, down_A, save)


def _moe_backward_grads(grad_out, hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale,
                        gate_up_bias, down_bias, gate_up_A, gate_up_B, down_A, down_B, saved, specs, act, scaling,
                        needs) -> list[Tensor]:
    """The backward's engine call: the gradient slots of (hidden, topk_weights, gate_up_A,
    gate_up_B, down_A, down_B); a slot not in `needs` is an empty tensor."""
    with Call(hidden.device, "fp8moe.moe_backward") as c:
        grads = _grad_slots((hidden, topk_weights, gate_up_A, gate_up_B, down_A, down_B), needs, hidden)
        inputs, experts, lora = _moe_call_args(hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale,
                                               gate_up_bias, down_bias, gate_up_A, gate_up_B, down_A, down_B)
        _C.moe_backward(c.engine, c.stream, c.alloc, inputs, experts, specs, act, lora, scaling,
                        [dl(s) for s in saved], dl(grad_out), tuple(dl(g) if n else None for g, n in zip(grads, needs)))
    return grads


# Returns the gradients to (hidden, topk_weights, gate_up_A, gate_up_B, down_A, down_B); a slot not in
# `needs` is an empty tensor.
moe_experts_backward_op = _define(
    "moe_experts_backward", "(Tensor grad_out, Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, "
    "Tensor? gate_up_scale, Tensor down, Tensor? down_scale, Tensor? gate_up_bias, Tensor? down_bias, "
    "Tensor? gate_up_A, Tensor? gate_up_B, Tensor? down_A, Tensor? down_B, Tensor[] saved, int[] specs, float[] act, "
    "float scaling, bool[] needs) -> Tensor[]", _moe_backward_grads)


@torch.library.register_fake("fp8moe::moe_experts_backward")
def _moe_experts_backward_fake(grad_out, hidden, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale,
                               gate_up_bias, down_bias, gate_up_A, gate_up_B, down_A, down_B, saved, specs, act,
                               scaling, needs):
    return _grad_slots((hidden, topk_weights, gate_up_A, gate_up_B, down_A, down_B), needs, hidden)


def _moe_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:13], *output[1:])
    ctx.specs, ctx.act, ctx.scaling, ctx.save = inputs[13], inputs[14], inputs[15], inputs[16]


def _moe_backward(ctx, grads, run=moe_experts_backward_op):
    needs = _backward_needs(ctx, _MOE_GRAD_INPUTS, _MOE_FROZEN, "expert weights")
    tensors = ctx.saved_tensors
    g = run(grads[0].contiguous(), *tensors[:13], list(tensors[13:]), ctx.specs, ctx.act, ctx.scaling, needs)
    return _input_grads(g, needs, _MOE_GRAD_INPUTS, _MOE_N_INPUTS)


torch.library.register_autograd("fp8moe::moe_experts", _moe_backward, setup_context=_moe_setup_context)


_MoeExpertsEager = _eager_function("_MoeExpertsEager", _moe_forward, _moe_setup_context, _moe_backward,
                                   _moe_backward_grads)


def moe_experts(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up: Tensor,
                gate_up_scale: Optional[Tensor], down: Tensor, down_scale: Optional[Tensor], specs: list[int],
                act: list[float], gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                lora: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None,) * 4,
                scaling: float = 1.0) -> Tensor:
    """The MoE expert layer: out [T, H] = sum_j w[t, j] * expert_{ids[t, j]}(hidden[t]).

    hidden [T, H] (BF16/F32 on CUDA), topk_ids [T, k] int32/int64, topk_weights [T, k];
    lora = (gate_up_A [E, r, H], gate_up_B [E, 2I, r], down_A [E, r, I], down_B [E, H, r]).
    """
    save = _wants_save((hidden, topk_weights, *lora))
    res = (moe_experts_op if _traced() else _MoeExpertsEager.apply)(hidden.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), gate_up,
                         gate_up_scale, down, down_scale, gate_up_bias, down_bias,
                         *[None if t is None else t.contiguous() for t in lora], specs, act, float(scaling), save)
    return res[0]


# =============================================================================================
# The dense linear (G = 1)

_LINEAR_N_INPUTS = 9
_LINEAR_GRAD_INPUTS = (0, 4, 5)  # x, lora_A, lora_B
_LINEAR_FROZEN = (1, 2, 3)       # the weight, its scale and bias


def _linear_outputs(x, weight, lora_A, save) -> list[Tensor]:
    """[out [T, N], *saved]."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    if not save:
        return [out]
    layout = _C.linear_saved_layout(activation_name(x.device), 0 if lora_A is None else int(lora_A.shape[0]))
    return [out, *saved_buffers(layout, x.shape[0], x.device)]


def _one(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-matrix tensor as the engine's one-matrix stack [1, ...]."""
    return None if t is None else dl(t.unsqueeze(0))


def _linear_forward(x, weight, weight_scale, bias, lora_A, lora_B, spec, scaling, save) -> list[Tensor]:
    """The forward's engine call: [out [T, N], *saved]."""
    with Call(x.device, "fp8moe.linear_forward") as c:
        outputs = _linear_outputs(x, weight, lora_A, save)
        _C.linear_forward(c.engine, c.stream, c.alloc, dl(x), (_one(weight), _one(weight_scale), _one(bias)), spec,
                          (_one(lora_A), _one(lora_B)), scaling, dl(outputs[0]),
                          [dl(t) for t in outputs[1:]] if save else None)
    return outputs


# x [T, K] -> [out [T, N], *saved]; weight [N, K], lora_A [r, K], lora_B [N, r], bias [N].
fp8_linear_op = _define(
    "fp8_linear", "(Tensor x, Tensor weight, Tensor? weight_scale, Tensor? bias, Tensor? lora_A, Tensor? lora_B, "
    "int[] spec, float scaling, bool save) -> Tensor[]", _linear_forward)


@torch.library.register_fake("fp8moe::fp8_linear")
def _fp8_linear_fake(x, weight, weight_scale, bias, lora_A, lora_B, spec, scaling, save):
    return _linear_outputs(x, weight, lora_A, save)


def _linear_backward_grads(grad_out, x, weight, weight_scale, bias, lora_A, lora_B, saved, spec, scaling,
                           needs) -> list[Tensor]:
    """The backward's engine call: the gradient slots of (x, lora_A, lora_B)."""
    with Call(x.device, "fp8moe.linear_backward") as c:
        grads = _grad_slots((x, lora_A, lora_B), needs, x)
        _C.linear_backward(c.engine, c.stream, c.alloc, dl(x), (_one(weight), _one(weight_scale), _one(bias)), spec,
                           (_one(lora_A), _one(lora_B)), scaling, [dl(s) for s in saved], dl(grad_out),
                           (dl(grads[0]) if needs[0] else None, _one(grads[1]) if needs[1] else None,
                            _one(grads[2]) if needs[2] else None))
    return grads


# Gradients to (x, lora_A, lora_B); a slot not in `needs` is an empty tensor.
fp8_linear_backward_op = _define(
    "fp8_linear_backward", "(Tensor grad_out, Tensor x, Tensor weight, Tensor? weight_scale, Tensor? bias, "
    "Tensor? lora_A, Tensor? lora_B, Tensor[] saved, int[] spec, float scaling, bool[] needs) -> Tensor[]",
    _linear_backward_grads)


@torch.library.register_fake("fp8moe::fp8_linear_backward")
def _fp8_linear_backward_fake(grad_out, x, weight, weight_scale, bias, lora_A, lora_B, saved, spec, scaling, needs):
    return _grad_slots((x, lora_A, lora_B), needs, x)


def _linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *output[1:])
    ctx.spec, ctx.scaling, ctx.save = inputs[6], inputs[7], inputs[8]


def _linear_backward(ctx, grads, run=fp8_linear_backward_op):
    needs = _backward_needs(ctx, _LINEAR_GRAD_INPUTS, _LINEAR_FROZEN, "FP8 linear weight")
    tensors = ctx.saved_tensors
    g = run(grads[0].contiguous(), *tensors[:6], list(tensors[6:]), ctx.spec, ctx.scaling, needs)
    return _input_grads(g, needs, _LINEAR_GRAD_INPUTS, _LINEAR_N_INPUTS)


torch.library.register_autograd("fp8moe::fp8_linear", _linear_backward, setup_context=_linear_setup_context)


_Fp8LinearEager = _eager_function("_Fp8LinearEager", _linear_forward, _linear_setup_context, _linear_backward,
                                  _linear_backward_grads)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Optional[Tensor], spec: list[int],
               bias: Optional[Tensor] = None, lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
               scaling: float = 1.0) -> Tensor:
    """y [..., N] = x W^T + scaling * (x A^T) B^T + b for x [..., K]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    save = _wants_save((x2, lora_A, lora_B))
    res = (fp8_linear_op if _traced() else _Fp8LinearEager.apply)(x2, weight, weight_scale, bias, None if lora_A is None else lora_A.contiguous(),
                        None if lora_B is None else lora_B.contiguous(), spec, float(scaling), save)
    return res[0].reshape(*lead, weight.shape[0])

"""A decoder layer with fp8moe experts, FP8 projections and PEFT LoRA compiles with
torch.compile(fullgraph=True) and gives the eager results (CPU and GPU: the graph holds the custom
ops, eager runs take the autograd.Function); on the GPU the ops capture into a CUDA graph whose
replays match eager runs on new inputs (no host synchronisation, no allocation outside torch)."""

from __future__ import annotations

import pytest
import torch

import fp8moe
from fp8moe import ops

import models
import reference as ref

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fp8moe._C.cuda_available()), reason="needs a CUDA GPU")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compile"))
    made = {}

    def get(device: str):
        if device not in made:
            model = fp8moe.from_pretrained(models.fp8_checkpoint(root, "qwen3_moe", "block"), device=device,
                                           dtype=torch.bfloat16)
            cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "o_proj"],
                                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
            made[device] = peft.get_peft_model(model, cfg)
        return made[device]
    return get


def _layer_inputs(model, T, gen):
    inner = model.base_model.model.model
    H = inner.config.hidden_size
    dev, dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
    x = (torch.randn(1, T, H, generator=gen) * 0.5).to(dev, dtype).requires_grad_(True)
    pos = torch.arange(T, device=dev).unsqueeze(0)
    return inner, x, pos, inner.rotary_emb(x, pos)


def _router_near_ties(layer, run) -> tuple[object, torch.Tensor]:
    """(run()'s output, [T] bool): marks the tokens whose k-th and (k+1)-th router logits, as eager `run()` computes them, lie
    within 2^-4 of the k-th's magnitude (8-16 BF16 ulps). Inductor's fused router math rounds
    differently from eager, and so does the attention before it, so such a token may get another
    expert set in the compiled graph: seen on the CPU in BF16, a token at 1.5 ulps taking a different
    expert in 4 seeds of 30, up to 77% error on that token. Every other token must match."""
    gate, seen = layer.mlp.gate, []

    def keep_input(module, args):  # returns None: the router's input stays as it is
        seen.append(args[0].detach())

    hook = gate.register_forward_pre_hook(keep_input)
    try:
        out = run()
    finally:
        hook.remove()
    logits = torch.nn.functional.linear(seen[0].reshape(-1, gate.weight.shape[1]), gate.weight).float()
    top = logits.topk(gate.top_k + 1, dim=-1).values
    kth = top[:, gate.top_k - 1]
    return out, (kth - top[:, gate.top_k]) <= 2.0 ** -4 * kth.abs()


def test_decoder_layer_compiles_fullgraph(peft_models, device, gen):
    # 48 tokens: the near-tie count varies more than a binomial with the inputs (0-7 of 24, 2-11 of
    # 48 over 30-60 seeds); at least 24 tokens are always compared (18 of 24 before, which a
    # seed with 7 near ties missed in CI).
    inner, x, pos, pe = _layer_inputs(peft_models(device.type), 48, gen)
    layer = inner.layers[1]
    eager, ties = _router_near_ties(layer, lambda: layer(x, position_embeddings=pe, position_ids=pos,
                                                          attention_mask=None))
    eager = eager[0] if isinstance(eager, tuple) else eager
    assert int((~ties).sum()) >= 24, "too many router near-ties to compare the rest (random router weights?)"
    # A near-tie token is left out of the comparison and, by a zero output gradient, out of the
    # backward: its expert output reaches no other token (the MLP comes after the attention).
    keep = ~ties.to(eager.device)
    g = torch.randn_like(eager) * keep[None, :, None]
    params = [p for p in layer.parameters() if p.requires_grad]
    grads_e = torch.autograd.grad(eager, [x, *params], g)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, position_embeddings=pe, position_ids=pos, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    grads_c = torch.autograd.grad(out, [x, *params], g)
    assert ref.rel_err(out[:, keep], eager[:, keep]) < 1e-2
    for a, b in zip(grads_c, grads_e):
        assert ref.rel_err(a, b) < 2e-2


@cuda
def test_ops_capture_in_a_cuda_graph(gen):
    E, H, I, T, k, r = 8, 256, 192, 64, 2, 16
    gu = ref.random_stack(E, 2 * I, H, "block", gen)
    dn = ref.random_stack(E, H, I, "block", gen)
    dev = lambda t: t.cuda()  # noqa: E731
    weights = dict(gate_up=dev(gu[0]), gate_up_scale=dev(gu[1]), down=dev(dn[0]), down_scale=dev(dn[1]),
                   specs=[*gu[2], *dn[2], 1], act=[0.0, 0.0, 1.702, 7.0])
    lora = [(torch.randn(s, generator=gen) * 0.1).cuda().requires_grad_(True)
            for s in ((E, r, H), (E, 2 * I, r), (E, r, I), (E, H, r))]
    static_x = torch.empty(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_ids = torch.empty(T, k, device="cuda", dtype=torch.int64)
    static_w = torch.empty(T, k, device="cuda", dtype=torch.float32, requires_grad=True)
    static_g = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)

    def fresh():
        x = torch.randn(T, H, generator=gen).to("cuda", torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).cuda()
        w = torch.rand(T, k, generator=gen).cuda()
        g = torch.randn(T, H, generator=gen).to("cuda", torch.bfloat16)
        return x, ids, w, g

    def step():
        out = ops.moe_experts(static_x, static_ids, static_w, weights["gate_up"], weights["gate_up_scale"],
                              weights["down"], weights["down_scale"], weights["specs"], weights["act"],
                              lora=tuple(lora), scaling=0.5)
        return out, torch.autograd.grad(out, [static_x, static_w, *lora], static_g)

    def load(batch):
        with torch.no_grad():
            for dst, src in zip((static_x, static_ids, static_w, static_g), batch):
                dst.copy_(src)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch's graph docs ask
        load(fresh())
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    load(fresh())
    with torch.cuda.graph(graph):
        static_out, static_grads = step()
    for _ in range(3):
        batch = fresh()
        load(batch)
        graph.replay()
        eager_out, eager_grads = step()  # same static inputs, run eagerly
        torch.cuda.synchronize()
        assert ref.rel_err(static_out, eager_out) < 1e-6
        for a, b in zip(static_grads, eager_grads):
            assert ref.rel_err(a, b) < 1e-6


def test_compile_decoder_layers_takes_every_layer_and_refuses_other_models(tmp_path):
    model = fp8moe.from_pretrained(models.fp8_checkpoint(str(tmp_path), "qwen3_moe", "block"), device="cpu")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    n = len(model.model.layers)
    assert fp8moe.compile_decoder_layers(wrapped) == n
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    with pytest.raises(fp8moe.Fp8MoeError, match="no `layers` list"):
        fp8moe.compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))

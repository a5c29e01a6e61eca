"""Tiny models of transformers' own classes, saved as BF16 checkpoints and converted to FP8 by
fp8moe's converter (no download). Each factory returns the checkpoint directory."""

from __future__ import annotations

import os

import torch

from fp8moe import _C


def _config(family: str):
    import transformers as tf

    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                                 norm_topk_prob=True, tie_word_embeddings=False)
    if family == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                    n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4,
                                    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
                                    qk_nope_head_dim=16, max_position_embeddings=128,
                                    mlp_layer_types=["dense", "sparse", "sparse"])
    if family == "gpt_oss":
        return tf.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=128, sliding_window=16,
                               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                   n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                   topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                                   qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                                   max_position_embeddings=128)
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "glm4_moe_lite", "gpt_oss", "deepseek_v3")


def bf16_checkpoint(root: str, family: str, seed: int = 0, name: str = "bf16", **overrides) -> str:
    """A random BF16 checkpoint of `family` (config fields `overrides` changed), saved by
    transformers' save_pretrained into `<family>-<name>`."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(root, f"{family}-{name}")
    if not os.path.exists(path):
        torch.manual_seed(seed)
        cfg = _config(family)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        with torch.no_grad():  # larger than the default init, so that every layer matters
            for name, p in model.named_parameters():
                if "norm" not in name and p.dim() >= 2:
                    p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if "experts" not in name else 0.15)
        model.save_pretrained(path)
    return path


def _quantize_fused_experts(path: str, scheme: str) -> None:
    """fp8moe's converter quantizes Linear weights; GPT-OSS keeps its experts as fused parameters
    stored [E, in, out]. Quantize those here the way an FP8 GPT-OSS-style checkpoint stores them:
    E4M3 codes in the stored orientation, scales laid on it (128x128 blocks `_scale_inv`, or one
    per output column `_scale` [E, 1, out])."""
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    for name in [n for n in t if n.endswith("mlp.experts.gate_up_proj") or n.endswith("mlp.experts.down_proj")]:
        w = t[name].float()
        E, R, C = w.shape
        if scheme == "block":
            pr, pc = -R % 128, -C % 128
            wp = torch.nn.functional.pad(w.abs(), (0, pc, 0, pr))
            amax = wp.reshape(E, (R + pr) // 128, 128, (C + pc) // 128, 128).amax(dim=(2, 4))
            scale = (amax / 448.0).clamp(min=1e-12)
            full = scale.repeat_interleave(128, 1)[:, :R].repeat_interleave(128, 2)[:, :, :C]
            t[name + "_scale_inv"] = scale
        else:
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)  # [E, 1, out]
            full = scale.expand(E, R, C)
            t[name + "_scale"] = scale
        t[name] = (w / full).to(torch.float8_e4m3fn)
    save_file(t, f, metadata={"format": "pt"})


def fp8_checkpoint(root: str, family: str, scheme: str = "block", name: str = "bf16", **overrides) -> str:
    """The BF16 checkpoint (`bf16_checkpoint(root, family, name=name, **overrides)`) converted to FP8
    by fp8moe (block: fine-grained 128x128 `fp8`; channel: compressed-tensors FP8_DYNAMIC)."""
    src = bf16_checkpoint(root, family, name=name, **overrides)
    dst = os.path.join(root, f"{family}-fp8-{scheme}" + ("" if name == "bf16" else f"-{name}"))
    if not os.path.exists(dst):
        _C.convert_checkpoint(src, dst, "fp8", scheme, 128)
        if family == "gpt_oss":
            _quantize_fused_experts(dst, scheme)
    return dst


def dequantized_checkpoint(root: str, fp8_dir: str) -> str:
    """BF16 weights = bf16(code x scale) of an FP8 checkpoint: what a BF16 peer trains on."""
    dst = fp8_dir + "-dequant"
    if not os.path.exists(dst):
        _C.convert_checkpoint(fp8_dir, dst, "bf16")
    return dst


def exact_tensors(fp8_dir: str, dtype=torch.float32) -> dict:
    """Every weight of an FP8 checkpoint at its exact value code x scale, computed in torch
    (float8 dtypes, scales expanded per block / channel / tensor) with no fp8moe code."""
    import math

    from safetensors import safe_open

    fp8_types = {torch.float8_e4m3fn, torch.float8_e5m2}
    out = {}
    with safe_open(os.path.join(fp8_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith("_scale") or name.endswith("_scale_inv"):
                continue
            t = f.get_tensor(name)
            if t.dtype in fp8_types:
                sname = name + "_scale_inv" if name + "_scale_inv" in names else name + "_scale"
                s = f.get_tensor(sname).float()
                N, K = t.shape[-2:]
                s = s.reshape(*t.shape[:-2], *s.shape[-2:]) if s.dim() >= 2 else s.reshape(*([1] * t.dim()))
                if s.shape[-2:] == (N, 1) or s.shape[-2:] == (1, K) or s.shape[-2:] == (1, 1):
                    full = s.expand(t.shape)  # per channel (either orientation) or per tensor
                else:  # 128 x 128 blocks laid on the stored orientation, partial edge blocks
                    assert s.shape[-2:] == (math.ceil(N / 128), math.ceil(K / 128)), (name, s.shape)
                    full = s.repeat_interleave(128, -2)[..., :N, :].repeat_interleave(128, -1)[..., :K]
                t = t.float() * full
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def exact_peer(fp8_dir: str, dtype=torch.float32):
    """transformers' own model on the FP8 checkpoint's exact values (exact_tensors): the
    independent reference every fp8moe model must match."""
    import json
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = exact_tensors(fp8_dir, dtype)
    d = tempfile.mkdtemp(prefix="fp8moe-peer-")
    save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(fp8_dir, "config.json")))
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def add_tokenizer(path: str) -> str:
    """A character-level tokenizer (built offline with `tokenizers`) with a chat template, saved
    into checkpoint `path`: ids 0-3 special, then printable ASCII (fits a vocabulary of 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def compressed_tensors_checkpoint(root: str, family: str = "qwen3_moe") -> str:
    """An FP8_DYNAMIC checkpoint written by compressed-tensors itself (the library llmcompressor
    saves with): its preset scheme applied to transformers' model, per-channel weight scales from
    its own calculate_qparams, compressed and saved by its ModelCompressor. transformers 5 keeps
    MoE experts as fused parameters, not Linear modules, so the preset quantizes the projections
    and the experts stay BF16, as such a checkpoint of a transformers-5 model does."""
    import shutil

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    out = os.path.join(root, f"{family}-compressed-tensors")
    if os.path.exists(out):
        return out
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint(root, family), dtype=torch.bfloat16)
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for _name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        amax = m.weight.detach().float().abs().amax(dim=1, keepdim=True)
        scale, _zp = calculate_qparams(-amax, amax, scheme.weights)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    compressor.update_config(tmp)
    os.rename(tmp, out)
    return out


# transformers' FP8 quantizer passes a matrix whose dims are not multiples of its 128x128 block
# through unquantized and never writes its scale (the saved scale is uninitialised memory), so the
# model it quantizes has every projection 128-aligned.
TRANSFORMERS_FP8_DIMS = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                             num_key_value_heads=4, head_dim=32)


def transformers_fp8_checkpoint(root: str, family: str = "qwen3_moe") -> str:
    """A fine-grained FP8 checkpoint (128x128 blocks) written by transformers' own FP8 quantizer:
    quantized while loading, then saved by save_pretrained. Without a GPU, the quantizer's
    environment check (which refuses to quantize on the CPU) is skipped for the load: its
    quantization is torch code that runs on the CPU alike, and the files are transformers' own.
    The BF16 source is `bf16_checkpoint(root, family, name="bf16-128", **TRANSFORMERS_FP8_DIMS)`."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    out = os.path.join(root, f"{family}-transformers-fp8")
    if not os.path.exists(out):
        source = bf16_checkpoint(root, family, name="bf16-128", **TRANSFORMERS_FP8_DIMS)
        cuda = torch.cuda.is_available()
        check = FineGrainedFP8HfQuantizer.validate_environment
        if not cuda:
            FineGrainedFP8HfQuantizer.validate_environment = lambda self, *a, **k: None
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16,
                                                         quantization_config=FineGrainedFP8Config(),
                                                         device_map="cuda" if cuda else "cpu")
        finally:
            FineGrainedFP8HfQuantizer.validate_environment = check
        model.save_pretrained(out)
    return out

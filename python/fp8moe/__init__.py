"""fp8moe: LoRA fine-tuning of FP8 Mixture-of-Experts models on FP8 weights.

    import fp8moe, peft
    model = fp8moe.from_pretrained("/models/Qwen3-30B-A3B-FP8")            # FP8 experts on the GPU
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    ...train (transformers.Trainer, or your loop)...; model.save_pretrained("adapter/")

The engine (kernels, checkpoint loader) is C++ (fp8moe._C); this package is the PyTorch /
transformers / PEFT glue: custom ops (fp8moe.ops), modules (fp8moe.modeling), loading
(fp8moe.loading), the PEFT hookup (fp8moe.peft_integration), merged export (fp8moe.export) and
the fine-tuning command (python -m fp8moe.finetune), the chunked causal-LM loss (fp8moe.loss),
the optimizer stepped from backward (fp8moe.optim) and the training step as one CUDA graph
(fp8moe.graphs).
"""

from __future__ import annotations

from ._engine import Fp8MoeError, gemm_precision, set_gemm_precision
from ._version import __version__
from . import ops
from .modeling import Fp8Experts, Fp8Linear, compile_decoder_layers
from .loading import from_pretrained, patch
from .export import export_merged
from . import loss
from . import optim
from . import graphs
from .graphs import CudaGraphStep

try:
    from . import peft_integration as _peft_integration

    if _peft_integration._HAVE_PEFT:
        _peft_integration.install()
except ImportError:  # pragma: no cover - PEFT missing or broken: fp8moe still loads and trains
    pass

__all__ = ["Fp8MoeError", "Fp8Experts", "Fp8Linear", "from_pretrained", "patch", "export_merged", "ops", "loss", "optim",
           "graphs", "CudaGraphStep",
           "set_gemm_precision", "gemm_precision", "compile_decoder_layers", "__version__"]

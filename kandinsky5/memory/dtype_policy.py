"""The DiT's dtype policy, written down in one place: which parameter is stored in which dtype.

Every loader, converter and memory estimate asks :func:`param_dtype`; nothing else decides a storage dtype.

=================================================  ==============  =============================================
parameters                                         bf16 run        fp8 run (``--fp8_base``)
=================================================  ==============  =============================================
``time_embeddings.*`` and every ``*modulation.*``  as stored      as stored: bf16/fp16/fp32 as in the checkpoint
                                                   (fp32 if       (never rounded); computed in fp32 with
                                                   unknown)       autocast off, as the official model does
block attention q/k/v/out + FFN in/out weights     run dtype       ``float8_e4m3fn`` + fp32 ``scale_weight``
                                                                   of shape (out, in/64, 1)
biases of those linears                            run dtype       run dtype
everything else (text / pooled / visual            run dtype       run dtype
embeddings, q/k RMSNorm weights, output layer)
LoRA parameters (``networks.lora``)                fp32            fp32
=================================================  ==============  =============================================

"run dtype" is the ``dtype`` given to the loader (bf16 in practice, fp32 in CPU tests).  The conditioning rows are
~12 % of Pro's parameters (2.38 B: 2.27 B of them are the 60 visual modulation linears).  The official model stores
them as the checkpoint has them and computes them in fp32 (``autocast(fp32)`` upcasts the weights), so we do the
same: a bf16 checkpoint keeps them in bf16 (4.8 GB on Pro) and the DiT's ``FP32Linear`` upcasts at use, which is
bit-for-bit the official computation and saves 4.8 GB against storing fp32 copies; an fp32 checkpoint keeps fp32.
When the stored dtype is unknown (a plan made without a file) the policy assumes fp32, the upper bound.

The fp8 set (:data:`FP8_LINEAR`) is exactly the linears that hold the FLOPs and the bytes: 16.9 B of Pro's 19.3 B
parameters.  Embeddings, modulation, norms and the output layer stay in high precision (they are small, and the
modulation / time path is precision-sensitive: it scales every residual branch).  Pre-quantised checkpoints (musubi
``--fp8_scaled`` files) may quantise more linears (musubi also quantises modulation and ``out_layer``); those are
loaded as they are, i.e. a file's ``*.scale_weight`` keys override this table for the modules they name.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "FP32_PARAMS",
    "FP8_LINEAR",
    "FP8_DTYPE",
    "SCALE_DTYPE",
    "LORA_DTYPE",
    "is_fp8_linear",
    "param_dtype",
    "load_dtype",
]

# Conditioning weights: the time MLP and every modulation linear.  Never rounded to the run dtype; computed in fp32
# (official autocast(fp32); diffusers _keep_in_fp32_modules).
FP32_PARAMS = re.compile(r"(^time_embeddings\.|modulation\.)")

# Module paths (not keys) of the block linears stored in fp8 under --fp8_base.
FP8_LINEAR = re.compile(
    r"^(text|visual)_transformer_blocks\.\d+\."
    r"((self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)|feed_forward\.(in_layer|out_layer))$"
)

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
LORA_DTYPE = torch.float32


def is_fp8_linear(module_path: str) -> bool:
    """True for the module paths whose weight the policy stores in fp8 (``...self_attention.to_query`` etc.)."""
    return FP8_LINEAR.match(module_path) is not None


_KEEP_AS_STORED = (torch.float32, torch.bfloat16, torch.float16)


def param_dtype(key: str, dtype: torch.dtype, fp8: bool = False, stored: torch.dtype | None = None) -> torch.dtype:
    """Storage dtype of state-dict entry ``key`` in a run with weight dtype ``dtype`` (fp8 policy when ``fp8``).

    ``stored`` is the dtype of the tensor in the checkpoint, when known (it decides the conditioning weights).
    """
    module, _, leaf = key.rpartition(".")
    if fp8 and is_fp8_linear(module):
        if leaf == "weight":
            return FP8_DTYPE
        if leaf == "scale_weight":
            return SCALE_DTYPE
    if leaf == "scale_weight":  # a pre-quantised file's scale: always fp32 in memory
        return SCALE_DTYPE
    if FP32_PARAMS.search(key):
        return stored if stored in _KEEP_AS_STORED else torch.float32
    return dtype


def load_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Dtype a checkpoint tensor is converted to while loading: fp8 tensors stay fp8, the rest follow the policy."""
    return FP8_DTYPE if tensor.dtype == FP8_DTYPE else param_dtype(key, dtype, stored=tensor.dtype)

"""The DiT's dtype policy, written down in one place: which parameter is stored in which dtype.

Every loader, converter and memory estimate asks :func:`param_dtype`; nothing else decides a storage dtype.

=================================================  ==============  =============================================
parameters                                         bf16 run        fp8 run (``--fp8_base``)
=================================================  ==============  =============================================
``time_embeddings.*`` and every ``*modulation.*``  fp32            fp32 (the official model computes them in fp32)
block attention q/k/v/out + FFN in/out weights     run dtype       ``float8_e4m3fn`` + fp32 ``scale_weight``
                                                                   of shape (out, in/64, 1)
biases of those linears                            run dtype       run dtype
everything else (text / pooled / visual            run dtype       run dtype
embeddings, q/k RMSNorm weights, output layer)
LoRA parameters (``networks.lora``)                fp32            fp32
=================================================  ==============  =============================================

"run dtype" is the ``dtype`` given to the loader (bf16 in practice, fp32 in CPU tests).  The fp32 rows are ~12 % of
Pro's parameters (2.38 B: 2.27 B of them are the 60 visual modulation linears), so they cost 9.5 GB in fp32.

The fp8 set (:data:`FP8_LINEAR`) is exactly the linears that hold the FLOPs and the bytes: 16.9 B of Pro's 19.3 B
parameters.  Embeddings, modulation, norms and the output layer stay in high precision (they are small, and the
modulation / time path is precision-sensitive: it scales every residual branch).  Pre-quantised checkpoints (musubi
``--fp8_scaled`` files) may quantise more linears (musubi also quantises modulation and ``out_layer``); those are
loaded as they are, i.e. a file's ``*.scale_weight`` keys override this table for the modules they name.
"""

from __future__ import annotations

import re

import torch

__all__ = ["FP32_PARAMS", "FP8_LINEAR", "FP8_DTYPE", "SCALE_DTYPE", "LORA_DTYPE", "is_fp8_linear", "param_dtype"]

# Stay fp32 whatever the run dtype: the time MLP and every modulation linear (official autocast(fp32); diffusers
# _keep_in_fp32_modules).
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


def param_dtype(key: str, dtype: torch.dtype, fp8: bool = False) -> torch.dtype:
    """Storage dtype of state-dict entry ``key`` in a run with weight dtype ``dtype`` (fp8 policy when ``fp8``)."""
    module, _, leaf = key.rpartition(".")
    if fp8 and is_fp8_linear(module):
        if leaf == "weight":
            return FP8_DTYPE
        if leaf == "scale_weight":
            return SCALE_DTYPE
    if leaf == "scale_weight":  # a pre-quantised file's scale: always fp32 in memory
        return SCALE_DTYPE
    return torch.float32 if FP32_PARAMS.search(key) else dtype

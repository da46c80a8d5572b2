"""Model FLOPs per trained token and device peaks, for MFU.

Per token, a forward pass costs ``2N + A`` (N = parameters in matmuls, A = causal attention's
``2 * layers * seq_len * attn_width``); the backward pass costs ``2N + 2A`` for activation
gradients plus ``2 * N_trainable`` for weight gradients. Full fine-tuning is then the usual
``6N + 3A``; LoRA (N_trainable ~ 0) about ``4N + 3A``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxtune.models.layers import LORA_A, LORA_B
from jaxtune.models.quant import is_quantized

# Dense bf16 tensor-core peaks (fp32 runs on TF32 units on NVIDIA, so half of these).
_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


def peak_flops(device_kind: str | None = None, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device (default: the first) for ``dtype`` matmuls, or None when
    unknown (e.g. CPUs)."""
    kind = device_kind or jax.devices()[0].device_kind
    for name, peak in _PEAK_BF16:
        if name.lower() in kind.lower():
            return peak if dtype in ("bfloat16", "float16") else peak / 2
    return None


def matmul_params(params: Any, labels: Any | None = None) -> tuple[int, int]:
    """(parameters used in matmuls, of which trainable): kernels and adapter factors; embedding
    tables count only when they are also the output projection (tied)."""
    total = trainable = 0
    flat_labels = dict(jax.tree_util.tree_leaves_with_path(labels)) if labels is not None else {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_quantized):  # a quantized kernel is one
        name = str(getattr(path[-1], "key", path[-1]))
        if name not in ("kernel", LORA_A, LORA_B):
            continue
        n = int(np.prod(leaf.shape))
        total += n
        if flat_labels.get(path, "freeze") != "freeze":
            trainable += n
    return total, trainable


def train_flops_per_token(n_matmul: int, n_trainable: int, *, layers: int, attn_width: int, seq_len: int) -> float:
    """Model FLOPs to train on one token (see the module docstring)."""
    attention = 2.0 * layers * seq_len * attn_width
    return 4.0 * n_matmul + 2.0 * n_trainable + 3.0 * attention

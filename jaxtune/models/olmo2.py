"""OLMo 2 (``Olmo2ForCausalLM``): the Llama-style decoder with its norms moved behind each branch.

Two differences from :mod:`jaxtune.models.decoder`, both from transformers' ``modeling_olmo2``:

- the block norms each branch's *output* before the residual add, and its input not at all:
  ``x + post_attention_layernorm(attn(x))``, then ``x + post_feedforward_layernorm(mlp(x))``;
- q and k are RMS-normed over the whole projection (a ``(heads * head_dim,)`` gain, before the
  split into heads), where Qwen3 norms each head: the decoder's ``qk_norm="projection"`` switch.

Everything else (config reading, GQA, RoPE, SwiGLU, tensor names, KV cache, generation, the
sequence classifier) is the decoder family's; ``attention_bias`` puts biases on q/k/v and o alike.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jaxtune.models.decoder import (
    MLP,
    Attention,
    Decoder,
    DecoderClassifier,
    DecoderConfig,
    common_fields,
)
from jaxtune.models.kv_cache import LayerCache
from jaxtune.models.layers import Array, RMSNorm, hf_architecture

ARCHITECTURES = ("Olmo2ForCausalLM",)
CLASSIFIERS = {"Olmo2ForSequenceClassification": "Olmo2ForCausalLM"}
MODEL_TYPES = {"olmo2": "Olmo2ForCausalLM"}


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
    """A :class:`DecoderConfig` for an OLMo 2 ``config.json`` dict (causal LM or sequence classifier)."""
    hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "OLMo 2", CLASSIFIERS)  # raises on another family's config
    bias = bool(hf.get("attention_bias", False))
    fields = dict(common_fields(hf, "Olmo2ForCausalLM"), qkv_bias=bias, o_bias=bias, qk_norm="projection")
    return DecoderConfig(**{**fields, **overrides})


class Olmo2RMSNorm(RMSNorm):
    """transformers' ``Olmo2RMSNorm``: ``(weight * x).to(dtype)``, one rounding where Llama's rounds twice."""

    gain_in_float32: bool = True


class Olmo2Block(nn.Module):
    """``x + post_attention_layernorm(attn(x))``, then ``x + post_feedforward_layernorm(mlp(x))``.

    Called like :class:`jaxtune.models.decoder.DecoderBlock`; with a ``cache`` returns ``(x, (k, v))``.
    """

    cfg: DecoderConfig
    window: int | None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        attn = Attention(cfg, self.window, name="self_attn")(x, positions, segment_ids, deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        x = x + Olmo2RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="post_attention_layernorm")(attn)
        h = MLP(cfg, name="mlp")(x, deterministic)
        x = x + Olmo2RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="post_feedforward_layernorm")(h)
        return x if cache is None else (x, kv)


class Olmo2(Decoder):
    """An OLMo 2 causal language model: a :class:`~jaxtune.models.decoder.Decoder` with
    :class:`Olmo2Block` blocks (same calling convention, methods and KV cache)."""

    block_class = Olmo2Block
    norm_class = Olmo2RMSNorm


class Olmo2Classifier(DecoderClassifier):
    """``Olmo2ForSequenceClassification``: the OLMo 2 body and a bias-free ``score`` on the last real token."""

    body_class = Olmo2

"""Gemma, Gemma 2 and Gemma 3 (text) decoders in one family.

Gemma is the Llama-style decoder (:mod:`jaxtune.models.decoder`) with these differences, each a
switch in :class:`GemmaConfig`:

=====================  ==========  ====================  ===============  =====================
architecture           q/k norm    norms per block       soft-capping     sliding windows, RoPE
=====================  ==========  ====================  ===============  =====================
GemmaForCausalLM       no          2 (pre-norm)          no               none; one RoPE
Gemma2ForCausalLM      no          4 (pre + post)        attention, final per ``layer_types``; one RoPE
Gemma3ForCausalLM      yes         4 (pre + post)        final only       per ``layer_types``; local RoPE
                                                                          base on sliding layers
=====================  ==========  ====================  ===============  =====================

All three scale the token embeddings by ``sqrt(hidden_size)`` (in the compute dtype, as HF
multiplies in the weights' dtype: bf16 rounds ``sqrt(3072)`` to 55.5), use RMSNorm with a
``(1 + weight)`` gain computed in float32, a GeGLU MLP (``gelu`` with the tanh approximation),
``head_dim`` from the config and, by default, tied input/output embeddings. Gemma 2 and 3 scale
attention scores by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``.

The parameter tree and HF tensor names are the Llama family's (``model.layers.3.self_attn.q_proj``
is ``layers_3/self_attn/q_proj``); Gemma's norm weights load as stored (the ``+ 1`` is in the
module), so checkpoints round-trip tensor by tensor. :class:`Gemma` is a
:class:`~jaxtune.models.decoder.Decoder` (same ``embed``/``hidden``/``decode``/``logits`` and KV
cache), so training, chunked losses, prompt tuning and generation need nothing Gemma-specific.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.decoder import MLP, Decoder, DecoderClassifier, DecoderConfig, project_heads
from jaxtune.models.kv_cache import LayerCache, rope_attend
from jaxtune.models.layers import (
    QUANTIZED_PARTS,
    Array,
    Dtype,
    PartitionRules,
    hf_architecture,
    partition_rules,
    softcap,
)
from jaxtune.models.rope import SUPPORTED_ROPE_TYPES

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
MODEL_TYPES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Sequence classifiers -> their causal LM. Gemma 3's text-only one is Gemma3TextForSequenceClassification
# (Gemma3ForSequenceClassification wraps the image-text model, whose tensors sit under model.language_model).
CLASSIFIERS = {"GemmaForSequenceClassification": "GemmaForCausalLM",
               "Gemma2ForSequenceClassification": "Gemma2ForCausalLM",
               "Gemma3TextForSequenceClassification": "Gemma3ForCausalLM"}
PARTITION_RULES: PartitionRules = partition_rules(
    column=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), row=("o_proj", "down_proj")
) + ((rf"lm_head/kernel{QUANTIZED_PARTS}$", ("fsdp", "tensor")),)
# HF's activation names -> jax.nn.gelu's ``approximate``. Gemma (1) checkpoints say "gelu" but mean the
# tanh approximation, and transformers rewrites it so (GemmaConfig.__post_init__); Gemma 2/3 take it literally.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}
_DEFAULT_THETA = {"GemmaForCausalLM": 10_000.0, "Gemma2ForCausalLM": 10_000.0, "Gemma3ForCausalLM": 1_000_000.0}
_DEFAULT_LOCAL_THETA = 10_000.0  # Gemma 3's rope_local_base_freq


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """:class:`DecoderConfig` plus Gemma's switches. ``layer_windows`` marks the sliding layers."""

    query_pre_attn_scalar: float | None = None  # attention scale ** -2; None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and the MLP too
    local_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (None: rope_theta)
    local_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    gelu_approximate: bool = True

    def mlp_activation(self, x: Array) -> Array:
        """GeGLU's gate: gelu, with the tanh approximation unless the checkpoint says exact."""
        return nn.gelu(x, approximate=self.gelu_approximate)

    @property
    def embedding_scale(self) -> float:
        """What the token embeddings are multiplied by: ``sqrt(hidden_size)``."""
        return math.sqrt(self.hidden_size)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> GemmaConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 layout)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a Gemma model jaxtune supports", CLASSIFIERS)
        if hf.get("use_bidirectional_attention"):
            raise ValueError("config.json: use_bidirectional_attention is set (an EmbeddingGemma-style encoder); "
                             "jaxtune's Gemma family is causal: load a *ForCausalLM checkpoint")
        heads, n = hf["num_attention_heads"], hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        (theta, scaling), local = _rope(hf, arch)
        gemma1 = arch == "GemmaForCausalLM"
        act = hf.get("hidden_act") if gemma1 else hf.get("hidden_activation")
        act = act or "gelu_pytorch_tanh"
        if act not in _GELU_APPROXIMATE:
            raise ValueError(f"config.json: activation {act!r} is not supported by the Gemma family; "
                             f"supported: {', '.join(_GELU_APPROXIMATE)}")
        attention_bias = bool(hf.get("attention_bias", False))
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            qk_norm=arch == "Gemma3ForCausalLM",
            # Gemma configs default to tied embeddings, so a config.json without the key is tied.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            layer_windows=_layer_windows(hf, arch),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
            query_pre_attn_scalar=float(head_dim if gemma1 else hf.get("query_pre_attn_scalar") or 256),
            # transformers' Gemma 3 attention never passes attn_logit_softcapping on (only Gemma 2 does).
            attn_logit_softcapping=hf.get("attn_logit_softcapping") if arch == "Gemma2ForCausalLM" else None,
            final_logit_softcapping=None if gemma1 else hf.get("final_logit_softcapping"),
            sandwich_norms=not gemma1,
            local_rope_theta=local[0] if local else None,
            local_rope_scaling=local[1] if local else None,
            gelu_approximate=gemma1 or _GELU_APPROXIMATE[act],
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
        )
        fields.update(overrides)
        return cls(**fields)


def _rope_entry(entry: dict[str, Any] | None, theta: float) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """``(theta, scaling)`` of one HF ``rope_parameters`` dict (``rope_theta`` inside, else ``theta``)."""
    entry = dict(entry or {})
    theta = float(entry.pop("rope_theta", theta))
    kind = entry.get("rope_type", entry.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: rope type {kind!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return theta, (tuple(sorted(entry.items())) if kind != "default" else None)


def _rope(hf: dict[str, Any], arch: str) -> tuple[tuple[float, Any], tuple[float, Any] | None]:
    """The global RoPE ``(theta, scaling)`` and, for Gemma 3, the sliding layers' own.

    transformers v5 writes Gemma 3's as ``rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}``; v4 wrote ``rope_theta`` + ``rope_scaling`` (global layers only) +
    ``rope_local_base_freq``. Gemma and Gemma 2 have one RoPE (v5 ``rope_parameters``, v4 ``rope_theta``).
    """
    params = hf.get("rope_parameters") or {}
    default = hf.get("rope_theta") or _DEFAULT_THETA[arch]
    if "full_attention" in params or "sliding_attention" in params:
        return (_rope_entry(params.get("full_attention"), default),
                _rope_entry(params.get("sliding_attention"), hf.get("rope_local_base_freq") or _DEFAULT_LOCAL_THETA))
    global_rope = _rope_entry(params or hf.get("rope_scaling"), default)
    if arch != "Gemma3ForCausalLM":
        return global_rope, None
    return global_rope, (float(hf.get("rope_local_base_freq") or _DEFAULT_LOCAL_THETA), None)


def _layer_windows(hf: dict[str, Any], arch: str) -> tuple[int | None, ...]:
    """Per-layer sliding window (None = global attention). Without ``layer_types`` (v4 configs),
    Gemma 2 alternates sliding and global from layer 0, and Gemma 3 makes every
    ``sliding_window_pattern``-th layer (default 6) global."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if arch == "GemmaForCausalLM" or not window:
        return (None,) * n
    types = hf.get("layer_types")
    if not types:
        pattern = 2 if arch == "Gemma2ForCausalLM" else hf.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"config.json: layer_types has {len(types)} entries for {n} layers; give one per layer")
    return tuple(window if t == "sliding_attention" else None for t in types)


class GemmaRMSNorm(nn.Module):
    """RMSNorm with gain ``1 + scale``, all in float32 before casting back (HF: ``(x * w).to(dtype)``,
    where Llama casts first). ``scale`` starts at zero (the identity) and is the checkpoint's weight as stored.

    Shapes: ``x`` ``(..., d)`` -> same shape, in ``dtype``.
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class GemmaAttention(nn.Module):
    """Grouped-query attention with Gemma's score scale, optional soft-capping and q/k norms, and the
    layer's own RoPE (``local``: Gemma 3's sliding-layer base). Called like
    :class:`jaxtune.models.decoder.Attention`; with a ``cache`` returns ``(out, (k, v))``."""

    cfg: GemmaConfig
    window: int | None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        q, k, v = project_heads(cfg, x, deterministic)
        if cfg.qk_norm:
            q = GemmaRMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="q_norm")(q)
            k = GemmaRMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="k_norm")(k)
        local = self.window is not None and cfg.local_rope_theta is not None
        theta, scaling = (cfg.local_rope_theta, cfg.local_rope_scaling) if local else (cfg.rope_theta, cfg.rope_scaling)
        out, kv = rope_attend(self, cfg, q, k, v, positions, segment_ids, self.window, cache, deterministic,
                              rope=(theta, scaling), scale=(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
                              logit_cap=cfg.attn_logit_softcapping)
        out = cfg.linear(cfg.hidden_size, "o_proj", cfg.o_bias)(out, deterministic)
        return out if cache is None else (out, kv)


class GemmaBlock(nn.Module):
    """Gemma: ``x + attn(norm(x))``, ``x + mlp(norm(x))`` (norms ``input_layernorm``,
    ``post_attention_layernorm``). Gemma 2/3 also norm each branch's output before the residual
    add: ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
    ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``.

    Called like :class:`jaxtune.models.decoder.DecoderBlock`; with a ``cache`` returns ``(x, (k, v))``.
    """

    cfg: GemmaConfig
    window: int | None

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
        cache: LayerCache | None = None,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name=name)

        attn = GemmaAttention(cfg, self.window, name="self_attn")(
            norm("input_layernorm")(x), positions, segment_ids, deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        if cfg.sandwich_norms:
            attn = norm("post_attention_layernorm")(attn)
        x = x + attn
        h = norm("pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm")(x)
        h = MLP(cfg, name="mlp")(h, deterministic)
        if cfg.sandwich_norms:
            h = norm("post_feedforward_layernorm")(h)
        x = x + h
        return x if cache is None else (x, kv)


class Gemma(Decoder):
    """A Gemma, Gemma 2 or Gemma 3 causal language model: a :class:`~jaxtune.models.decoder.Decoder`
    (same calling convention and methods) with Gemma's embedding scale, blocks, norms and final
    logit soft-capping. ``__call__(input_ids, segment_ids, positions, deterministic)`` -> logits
    ``(B, T, vocab)`` in the compute dtype."""

    cfg: GemmaConfig

    block_class = GemmaBlock
    norm_class = GemmaRMSNorm

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings times ``sqrt(hidden_size)`` ``(B, T, D)``, in the compute dtype. Prompt
        tuning's virtual tokens (``inputs_embeds``) are not scaled, as in PEFT."""
        normalizer = jnp.asarray(self.cfg.embedding_scale, self.cfg.compute_dtype)
        return self.embed_tokens(input_ids) * normalizer

    def logits(self, hidden: Array) -> Array:
        """Vocabulary logits ``(..., vocab)`` for hidden states ``(..., D)``, soft-capped (Gemma 2/3)."""
        return softcap(super().logits(hidden), self.cfg.final_logit_softcapping)


class GemmaClassifier(DecoderClassifier):
    """``Gemma*ForSequenceClassification`` (Gemma 3: ``Gemma3TextForSequenceClassification``): the Gemma
    body and a bias-free ``score`` on the last real token. transformers' head reads the body's final
    normed states, so the causal LM's final logit soft-cap does not apply here."""

    body_class = Gemma

"""Phi-3 (and Phi-4-mini, which transformers loads as ``Phi3ForCausalLM``): a Llama-style decoder whose
checkpoints fuse the attention's query/key/value projections into one ``qkv_proj`` and the MLP's gate
and up projections into one ``gate_up_proj``.

:class:`Phi3` is a :class:`~jaxtune.models.decoder.Decoder` with its own blocks (``block_class``), so
the embeddings, the scanned layer stack, the final norm, the output layer, the KV cache, generation,
chunked losses and prompt tuning are the decoder family's. Its own parts:

- ``self_attn/qkv_proj`` ``(D, (N + 2K) * H)``: one projection whose output is split into the
  queries, keys and values in that order (HF's slicing), then grouped-query attention with RoPE,
  an optional sliding window on every layer (``sliding_window``) and ``o_proj``;
- ``mlp/gate_up_proj`` ``(D, 2I)``: the first half of its output is the gate (silu), the second the
  up projection, then ``down_proj``;
- RoPE: ``default`` or ``longrope`` (Phi-3's short/long factors chosen by the sequence length, with
  transformers' attention scaling; v4 configs say ``su`` or ``yarn`` and mean longrope, as
  transformers reads them), with a ``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head);
- ``resid_pdrop``: dropout on each block's attention and MLP outputs in training.

**Plans address the fused modules as the checkpoint and PEFT do.** The param tree mirrors the HF
names (``layers_3/self_attn/qkv_proj/kernel``), so a plan targets ``qkv_proj``/``gate_up_proj`` as
PEFT's ``target_modules`` do, and LoRA on ``qkv_proj`` is one adapter ``(D, r) @ (r, (N + 2K) * H)``
over the fused output, exactly PEFT's LoRA on that module: exports and imports are one tensor pair
per fused module, with no splitting. ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` do not
exist in this family; a plan naming them matches nothing, and ``apply_plan`` says so.

Sharding: the fused projections are column-parallel like their unfused parts; a ``tensor`` axis then
splits the fused output across devices and XLA moves the q/k/v (gate/up) parts where they are used,
correct but with more communication than an unfused layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxtune.models.decoder import Decoder, DecoderClassifier, DecoderConfig, common_fields
from jaxtune.models.dropout import Dropout
from jaxtune.models.kv_cache import LayerCache, rope_attend
from jaxtune.models.layers import (
    Array,
    PartitionRules,
    RMSNorm,
    hf_architecture,
    partition_rules,
)
from jaxtune.models.rope import rope_inverse_frequencies

ARCHITECTURES = ("Phi3ForCausalLM", "Phi3ForSequenceClassification")
MODEL_TYPES = {"phi3": "Phi3ForCausalLM"}
PARTITION_RULES: PartitionRules = partition_rules(column=("qkv_proj", "gate_up_proj"), row=("o_proj", "down_proj")) + (
    (r"lm_head/kernel$", ("fsdp", "tensor")),)
_ROPE_TYPES = ("default", "longrope")
_LEGACY_LONGROPE = ("su", "yarn")  # what transformers' Phi3Config renames to longrope


@dataclasses.dataclass(frozen=True)
class Phi3Config(DecoderConfig):
    """:class:`DecoderConfig` with Phi-3's ``resid_pdrop``; ``layer_windows`` holds ``sliding_window`` on
    every layer, ``rope_scaling`` the rope dict (kept for ``default`` too when it rotates part of a head)."""

    dropout: float = 0.0  # resid_pdrop

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Phi3Config:
        """Build from a Hugging Face Phi-3 ``config.json`` dict (transformers v4 or v5 layout)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "Phi-3")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind in _LEGACY_LONGROPE:
            rope = {k: v for k, v in rope.items() if k != "type"} | {"rope_type": "longrope"}
            kind = "longrope"
        if kind not in _ROPE_TYPES:
            raise ValueError(f"config.json: rope type {kind!r} is not one Phi-3 uses; supported: "
                             f"{', '.join(_ROPE_TYPES)} (transformers' Phi3Config refuses the others too)")
        # Phi3Config's defaults for what config.json leaves out; its original_max_position_embeddings
        # (always set, 4096 by default) wins over the rope dict's.
        hf = {"original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, **hf, "rope_parameters": rope}
        fields = dict(
            common_fields(hf, arch, "Phi-3", partial_rotary=True),
            layer_windows=(hf.get("sliding_window"),) * hf["num_hidden_layers"],
            dropout=float(hf.get("resid_pdrop", 0.0)),
        )
        cfg = cls(**{**fields, **overrides})
        # A bad rope dict fails here, checked against the head width and base of the config built (overrides included).
        rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling or ()))
        return cfg


class Phi3Attention(nn.Module):
    """``self_attn``: fused ``qkv_proj`` split into q ``(B, T, N, H)``, k and v ``(B, T, K, H)``, RoPE, causal
    attention (windowed on sliding layers), ``o_proj``. With a ``cache`` returns ``(out, (k, v))``."""

    cfg: Phi3Config
    window: int | None

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg = self.cfg
        b, t, _ = x.shape
        n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = cfg.linear((n + 2 * kv) * h, "qkv_proj", bias=False)(x, deterministic)
        q = qkv[..., :n * h].reshape(b, t, n, h)
        k = qkv[..., n * h:(n + kv) * h].reshape(b, t, kv, h)
        v = qkv[..., (n + kv) * h:].reshape(b, t, kv, h)
        out, new_kv = rope_attend(self, cfg, q, k, v, positions, segment_ids, self.window, cache, deterministic)
        out = cfg.linear(cfg.hidden_size, "o_proj", bias=False)(out, deterministic)
        return out if cache is None else (out, new_kv)


class Phi3MLP(nn.Module):
    """``mlp``: ``down_proj(silu(gate) * up)`` with ``gate, up`` the two halves of ``gate_up_proj(x)``."""

    cfg: Phi3Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        gate_up = cfg.linear(2 * cfg.intermediate_size, "gate_up_proj", bias=False)(x, deterministic)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return cfg.linear(cfg.hidden_size, "down_proj", bias=False)(nn.silu(gate) * up, deterministic)


class Phi3Block(nn.Module):
    """Pre-norm block ``x + drop(attn(norm(x)))``, ``x + drop(mlp(norm(x)))``; the decoder block's call
    signature (with a ``cache`` returns ``(x, (k, v))``)."""

    cfg: Phi3Config
    window: int | None

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="input_layernorm")(x)
        attn = Phi3Attention(cfg, self.window, name="self_attn")(h, positions, segment_ids, deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        x = x + Dropout(cfg.dropout)(attn, deterministic=deterministic)
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="post_attention_layernorm")(x)
        x = x + Dropout(cfg.dropout)(Phi3MLP(cfg, name="mlp")(h, deterministic), deterministic=deterministic)
        return x if cache is None else (x, kv)


class Phi3(Decoder):
    """``Phi3ForCausalLM``: :class:`~jaxtune.models.decoder.Decoder`'s interface with Phi-3's blocks
    (see the module docstring). ``__call__(input_ids (B, T), segment_ids, positions, deterministic)`` ->
    logits ``(B, T, vocab)`` in the compute dtype."""

    cfg: Phi3Config
    block_class: ClassVar[type[nn.Module]] = Phi3Block


class Phi3Classifier(DecoderClassifier):
    """``Phi3ForSequenceClassification``: the Phi-3 body and a bias-free ``score`` on the last real token."""

    cfg: Phi3Config
    body_class: ClassVar[type[Decoder]] = Phi3

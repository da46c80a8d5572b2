"""GPT-2: a pre-norm causal decoder with learned absolute positions, LayerNorms, a fused ``c_attn``
query/key/value projection, a GELU MLP and tied input/output embeddings.

:class:`GPT2` is a :class:`~jaxtune.models.decoder.Decoder` in everything the rest of jaxtune relies
on (``embed``/``hidden``/``decode``/``logits``, the calling convention ``(input_ids, segment_ids,
positions, deterministic)``, the :class:`~jaxtune.models.kv_cache.KVCache`), so training, packing,
chunked losses, prompt tuning, heads and generation need nothing GPT-2-specific. Its own are the
blocks and the position embeddings: ``hidden`` adds ``wpe[positions]`` to the token embeddings, so
packed documents (positions restarting at 0) and virtual prompt tokens are placed as transformers
and PEFT place them.

Param tree: the blocks keep HF's names (``layers_3/attn/c_attn``, ``layers_3/ln_1``, ``layers_3/mlp/c_fc``),
so plans target ``c_attn``/``c_proj``/``c_fc`` as PEFT does; the top level uses the decoder family's
names (``embed_tokens``, ``layers_i``, ``norm``, ``lm_head``, plus ``wpe``), so the tuning layer's
handling of tied embeddings, blocks and output layers applies as it is. :func:`hf_module` maps them
(``layers_3`` -> ``transformer.h.3``, ``embed_tokens`` -> ``transformer.wte``, ``norm`` ->
``transformer.ln_f``).

Checkpoints: GPT-2's ``Conv1D`` stores its weight ``(in, out)``, already jaxtune's kernel layout
(:func:`kernel_out_in` says so to the checkpoint I/O), while ``lm_head`` and ``score`` are torch
``Linear``s. LoRA on the fused ``c_attn`` is one adapter on the ``(D, 3D)`` projection, exactly
PEFT's LoRA on the ``c_attn`` module (``fan_in_fan_out``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from jaxtune.models.decoder import Decoder, DecoderClassifier, DecoderConfig, renamed_hf_module
from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS
from jaxtune.models.kv_cache import LayerCache, attend
from jaxtune.models.layers import (
    QUANTIZED_PARTS,
    Array,
    Embed,
    LayerNorm,
    PartitionRules,
    attention_dropout_key,
    feed_forward,
    hf_architecture,
    partition_rules,
)

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2ForSequenceClassification")
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}
PARTITION_RULES: PartitionRules = partition_rules(column=("c_attn", "c_fc"), row=("c_proj",)) + (
    (rf"lm_head/kernel{QUANTIZED_PARTS}$", ("fsdp", "tensor")),)
_CONV1D = ("c_attn", "c_proj", "c_fc")


@dataclasses.dataclass(frozen=True)
class GPT2Config(DecoderConfig):
    """:class:`DecoderConfig` with GPT-2's own fields; ``rms_norm_eps`` holds ``layer_norm_epsilon``
    (the final norm is built from it as in every decoder), ``num_kv_heads == num_heads``."""

    max_position_embeddings: int = 1024
    activation: str = "gelu_new"
    dropout: float = 0.1  # resid_pdrop and embd_pdrop: after the embeddings and each block's two projections
    scale_attn_weights: bool = True

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> GPT2Config:
        """Build from a Hugging Face GPT-2 ``config.json`` dict."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "GPT-2")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(flag):
                raise ValueError(f"config.json: {flag} is set, which jaxtune's GPT-2 does not implement; "
                                 "only plain GPT-2 checkpoints load")
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"config.json: activation_function {act!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        d, heads = hf["n_embd"], hf["n_head"]
        if hf.get("resid_pdrop", 0.1) != hf.get("embd_pdrop", 0.1):
            raise ValueError("config.json: resid_pdrop and embd_pdrop differ; jaxtune's GPT-2 has one dropout rate "
                             "for both: set them equal")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            intermediate_size=hf.get("n_inner") or 4 * d,
            num_layers=hf["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d // heads,
            rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
            max_position_embeddings=hf.get("n_positions", 1024),
            activation=act,
            dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=float(hf.get("attn_pdrop", 0.1)),
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        )
        fields.update(overrides)
        return cls(**fields)

    def layer_norm(self, name: str | None = None) -> LayerNorm:
        """A :class:`LayerNorm` with ``layer_norm_epsilon`` (held by ``rms_norm_eps``)."""
        return LayerNorm(self.rms_norm_eps, self.compute_dtype, self.param_dtype, name=name)


class GPT2Attention(nn.Module):
    """``attn``: the fused ``c_attn`` projection ``(D, 3D)`` split into q, k, v, causal attention, ``c_proj``.
    With a ``cache`` it returns ``(out, (k, v))`` as :class:`~jaxtune.models.decoder.Attention` does."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg = self.cfg
        b, t, d = x.shape
        qkv = cfg.linear(3 * d, "c_attn")(x, deterministic).reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
        scale = None if cfg.scale_attn_weights else 1.0
        key = attention_dropout_key(self, cfg.attention_dropout, deterministic or cache is not None)
        out, kv = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_ids, None, cache, scale=scale,
                         dropout_rate=cfg.attention_dropout, dropout_rng=key)
        out = cfg.linear(d, "c_proj")(out.reshape(b, t, d), deterministic)
        out = Dropout(cfg.dropout)(out, deterministic=deterministic)
        return out if cache is None else (out, kv)


class GPT2MLP(nn.Module):
    """``mlp``: ``c_proj(act(c_fc(x)))`` then dropout."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        h = feed_forward(cfg, x, ("c_fc", "c_proj"), ACTIVATIONS[cfg.activation], deterministic)
        return Dropout(cfg.dropout)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-norm block ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``; the decoder block's call signature."""

    cfg: GPT2Config
    window: int | None = None  # the decoder blocks' signature; GPT-2 attends to everything before

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True,
                 cache: LayerCache | None = None) -> Array | tuple[Array, tuple[Array, Array]]:
        cfg = self.cfg
        attn = GPT2Attention(cfg, name="attn")(cfg.layer_norm("ln_1")(x), segment_ids, deterministic, cache)
        attn, kv = (attn, None) if cache is None else attn
        x = x + attn
        x = x + GPT2MLP(cfg, name="mlp")(cfg.layer_norm("ln_2")(x), deterministic)
        return x if cache is None else (x, kv)


class GPT2(Decoder):
    """``GPT2LMHeadModel``: :class:`~jaxtune.models.decoder.Decoder`'s interface (see the module docstring)."""

    cfg: GPT2Config
    block_class: ClassVar[type[nn.Module]] = GPT2Block

    def setup(self) -> None:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dt, cfg.param_dtype)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, dt, cfg.param_dtype)
        self.layers = self._layer_modules()  # scanned runs, as every decoder's
        self.norm = cfg.layer_norm()
        self.drop = Dropout(cfg.dropout)
        if not cfg.tie_word_embeddings and cfg.lm_head:
            self.lm_head = cfg.linear(cfg.vocab_size, bias=False)

    def _inputs(self, input_ids: Array | None, inputs_embeds: Array | None, positions: Array | None,
                deterministic: bool) -> tuple[Array, Array]:
        """Token plus position embeddings ``(B, T, D)`` (after dropout) and the positions ``(B, T)``."""
        x, positions = super()._inputs(input_ids, inputs_embeds, positions, deterministic)
        return self.drop(x + self.wpe(positions), deterministic=deterministic), positions


class GPT2Classifier(DecoderClassifier):
    """``GPT2ForSequenceClassification``: the GPT-2 body and a bias-free ``score`` on the last real token."""

    cfg: GPT2Config
    body_class: ClassVar[type[Decoder]] = GPT2


def hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a param path's modules: ``('layers_0', 'attn', 'c_attn')`` ->
    ``'transformer.h.0.attn.c_attn'``; ``lm_head`` and ``score`` sit beside ``transformer``."""
    return renamed_hf_module(modules, "transformer", "h", {"embed_tokens": "wte", "norm": "ln_f"})


def kernel_out_in(modules: tuple[str, ...]) -> bool:
    """Whether the checkpoint stores this module's kernel ``(out, in)`` (torch ``Linear``: ``lm_head``,
    ``score``) rather than ``(in, out)`` (``Conv1D``: ``c_attn``, ``c_proj``, ``c_fc``)."""
    return modules[-1] not in _CONV1D

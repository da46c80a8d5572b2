"""ModernBERT (answerdotai/ModernBERT-base and -large, and their fine-tunes): a bidirectional encoder.

It shares little computation with BERT (:mod:`jaxtune.models.encoder`), hence its own file:

- no position or token-type embeddings: RoPE on queries and keys, with one base for the global
  layers and another for the local ones (``rope_parameters["full_attention" | "sliding_attention"]``;
  older configs: ``global_rope_theta`` / ``local_rope_theta``);
- global and local layers alternate (``layer_types``; older configs: every
  ``global_attn_every_n_layers``-th layer, from layer 0, is global): a local layer's token ``i``
  attends to keys ``j`` with ``|i - j| <= local_attention // 2``;
- pre-norm blocks: the embedding norm stands in for layer 0's attention norm, and a ``final_norm``
  closes the stack; LayerNorms without bias when ``norm_bias`` is false (the released models);
- fused projections: ``Wqkv`` (queries, keys, values stacked on the output axis) and a GeGLU MLP
  whose ``Wi`` holds the input and gate halves;
- ``ModernBertForSequenceClassification`` pools (``classifier_pooling``: the first token, ``cls``, or
  the ``mean`` of real tokens), then ``head.dense`` -> ``classifier_activation`` -> ``head.norm`` ->
  dropout -> ``classifier``: a :class:`jaxtune.models.layers.ClassifierLayout` with a norm.

:class:`ModernBert` is the bare model (``ModernBertModel``; a ``ModernBertForMaskedLM`` checkpoint loads
as it, without its prediction head); :class:`ModernBertClassifier` is the classifier, the body under
``model`` and the head under ``head`` laid out as ``jaxtune.tuning``'s heads are (``dense_0``, ``norm``,
``out``). Param paths mirror HF names: ``layers.2.attn.Wqkv.weight`` is
``params["layers_2"]["attn"]["Wqkv"]["kernel"]`` (transposed); see :func:`hf_module`.

Dropout: ``embedding_dropout``, ``mlp_dropout``, ``attention_dropout`` (on the attention
probabilities and after ``Wo``, HF's ``out_drop``) and ``classifier_dropout`` as transformers applies
them. The released models set all of them to 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS
from jaxtune.models.layers import (
    Array,
    ClassifierLayout,
    Embed,
    LayerNorm,
    ModuleBuilders,
    PartitionRules,
    attention_dropout_key,
    dot_product_attention,
    hf_architecture,
    partition_rules,
    pool,
)
from jaxtune.models.rope import SUPPORTED_ROPE_TYPES, apply_rope, rope_inverse_frequencies

ARCHITECTURES = ("ModernBertModel", "ModernBertForSequenceClassification")
CLASSIFIERS = ("ModernBertForSequenceClassification",)
# model_type -> bare architecture, for checkpoints whose class jaxtune does not load (``ModernBertForMaskedLM``...).
MODEL_TYPES = {"modernbert": "ModernBertModel"}
# Wqkv and Wi are fused; splitting their output axis over ``tensor`` is still exact (the split
# into q/k/v or input/gate happens after the matmul), if not the cheapest layout.
PARTITION_RULES: PartitionRules = partition_rules(column=("Wqkv", "Wi"), row=("Wo",))
POOLINGS = ("cls", "mean")
_GLOBAL, _LOCAL = "full_attention", "sliding_attention"
_DEFAULT_THETA = {_GLOBAL: 160_000.0, _LOCAL: 10_000.0}
_V4_THETA_KEYS = {_GLOBAL: "global_rope_theta", _LOCAL: "local_rope_theta"}
# The classifier's head modules (jaxtune's head/dense_0, head/norm, head/out) -> HF module names.
_HEAD_NAMES = {"dense_0": "head.dense", "norm": "head.norm", "out": "classifier"}

RopeScaling = tuple[tuple[str, Any], ...] | None


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(ModuleBuilders):
    """Everything that shapes a ModernBERT. Hashable, so it can sit on a linen module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    # Per layer: None for global attention, else the half-window ``w`` of a local layer (``|i - j| <= w``).
    layer_windows: tuple[int | None, ...] = ()
    global_rope_theta: float = _DEFAULT_THETA[_GLOBAL]
    local_rope_theta: float = _DEFAULT_THETA[_LOCAL]
    global_rope_scaling: RopeScaling = None  # HF rope_parameters without rope_theta, as sorted items
    local_rope_scaling: RopeScaling = None
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "gelu"
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    num_labels: int = 2  # ModernBertClassifier only
    classifier_pooling: str = "cls"
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    classifier_dropout: float = 0.0
    architecture: str = "ModernBertModel"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModernBertConfig:
        """Build from a Hugging Face ``config.json`` dict (transformers v5, or v4 as on the hub)."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a ModernBERT jaxtune supports")
        for key in ("hidden_activation", "classifier_activation"):
            if hf.get(key, "gelu") not in ACTIVATIONS:
                raise ValueError(f"config.json: {key} {hf[key]!r} is not supported; "
                                 f"supported: {', '.join(ACTIVATIONS)}")
        pooling = hf.get("classifier_pooling", "cls")
        if pooling not in POOLINGS:
            raise ValueError(f"config.json: classifier_pooling {pooling!r} is not supported; use one of "
                             f"{', '.join(POOLINGS)}")
        if hf["hidden_size"] % hf["num_attention_heads"]:
            raise ValueError(f"config.json: hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads "
                             f"{hf['num_attention_heads']}")
        (global_theta, global_scaling), (local_theta, local_scaling) = (_rope(hf, kind) for kind in (_GLOBAL, _LOCAL))
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            layer_windows=_layer_windows(hf),
            global_rope_theta=global_theta,
            local_rope_theta=local_theta,
            global_rope_scaling=global_scaling,
            local_rope_scaling=local_scaling,
            norm_eps=hf.get("norm_eps", 1e-5),
            norm_bias=bool(hf.get("norm_bias", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_activation", "gelu"),
            embedding_dropout=float(hf.get("embedding_dropout", 0.0)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            mlp_dropout=float(hf.get("mlp_dropout", 0.0)),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            classifier_pooling=pooling,
            classifier_bias=bool(hf.get("classifier_bias", False)),
            classifier_activation=hf.get("classifier_activation", "gelu"),
            classifier_dropout=float(hf.get("classifier_dropout") or 0.0),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def classifier_layout(self) -> ClassifierLayout:
        return ClassifierLayout("model", self.classifier_pooling, (_HEAD_NAMES["dense_0"],),
                                self.classifier_activation, _HEAD_NAMES["out"], input_dropout=False,
                                dense_bias=self.classifier_bias, norm=_HEAD_NAMES["norm"], norm_eps=self.norm_eps,
                                norm_bias=self.norm_bias)

    def rope(self, local: bool) -> Array:
        """Inverse RoPE frequencies ``(head_dim // 2,)`` float32 of the local or the global layers."""
        theta, scaling = ((self.local_rope_theta, self.local_rope_scaling) if local
                          else (self.global_rope_theta, self.global_rope_scaling))
        return rope_inverse_frequencies(self.hidden_size // self.num_heads, theta, dict(scaling or ()))

    def layer_norm(self, name: str | None = None) -> LayerNorm:
        """A :class:`LayerNorm` with ``norm_eps``, its bias as ``norm_bias`` says."""
        return LayerNorm(self.norm_eps, self.compute_dtype, self.param_dtype, use_bias=self.norm_bias, name=name)


def _rope(hf: dict[str, Any], kind: str) -> tuple[float, RopeScaling]:
    """``(theta, scaling)`` of the global (``full_attention``) or local (``sliding_attention``) layers."""
    params = dict((hf.get("rope_parameters") or {}).get(kind) or {})
    theta = float(params.pop("rope_theta", hf.get(_V4_THETA_KEYS[kind]) or _DEFAULT_THETA[kind]))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: rope_parameters[{kind!r}] rope_type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return theta, None if rope_type == "default" else tuple(sorted(params.items()))


def _layer_windows(hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Per layer: None (global) or the half-window ``local_attention // 2`` (local)."""
    n = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers", 3)
    types = hf.get("layer_types") or [_LOCAL if i % every else _GLOBAL for i in range(n)]
    if len(types) != n or set(types) - {_GLOBAL, _LOCAL}:
        raise ValueError(f"config.json: layer_types must list {n} entries (num_hidden_layers), each "
                         f"{_GLOBAL!r} or {_LOCAL!r}; got {types!r}")
    half = int(hf.get("local_attention", 128)) // 2
    return tuple(half if t == _LOCAL else None for t in types)


class Embeddings(nn.Module):
    """HF's ``embeddings``: token embedding -> LayerNorm -> dropout (no positions, no token types)."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        x = Embed(cfg.vocab_size, cfg.hidden_size, cfg.compute_dtype, cfg.param_dtype, name="tok_embeddings")(input_ids)
        return Dropout(cfg.embedding_dropout)(cfg.layer_norm("norm")(x), deterministic=deterministic)


class Attention(nn.Module):
    """HF's ``attn``: fused ``Wqkv``, RoPE, bidirectional (optionally windowed) attention, ``Wo``."""

    cfg: ModernBertConfig
    window: int | None

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        cfg = self.cfg
        b, t, d = x.shape
        qkv = cfg.linear(3 * d, "Wqkv", cfg.attention_bias)(x, deterministic)
        q, k, v = (qkv.reshape(b, t, 3, cfg.num_heads, d // cfg.num_heads)[:, :, i] for i in range(3))
        inv_freq = cfg.rope(local=self.window is not None)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        # Tokens attend within their segment and, on a local layer, to keys at most ``window``
        # positions away on either side: the kernel's two-sided window (splash's local mask on a TPU).
        window = None if self.window is None else (self.window, self.window)
        out = dot_product_attention(q, k, v, segment_ids=segment_ids, causal=False, window=window,
                                    dropout_rate=cfg.attention_dropout,
                                    dropout_rng=attention_dropout_key(self, cfg.attention_dropout, deterministic)
                                    ).reshape(b, t, d)
        out = cfg.linear(d, "Wo", cfg.attention_bias)(out, deterministic)
        return Dropout(cfg.attention_dropout)(out, deterministic=deterministic)


class MLP(nn.Module):
    """HF's ``mlp``: GeGLU, ``Wo(act(input) * gate)`` with ``input, gate = Wi(x)`` split in halves."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        h, gate = jnp.split(cfg.linear(2 * cfg.intermediate_size, "Wi", cfg.mlp_bias)(x, deterministic), 2, axis=-1)
        h = Dropout(cfg.mlp_dropout)(ACTIVATIONS[cfg.hidden_act](h) * gate, deterministic=deterministic)
        return cfg.linear(x.shape[-1], "Wo", cfg.mlp_bias)(h, deterministic)


class Block(nn.Module):
    """Pre-norm block; layer 0 has no ``attn_norm`` (its input is the normed embedding)."""

    cfg: ModernBertConfig
    window: int | None
    first: bool

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None, deterministic: bool = True) -> Array:
        cfg = self.cfg
        h = x if self.first else cfg.layer_norm("attn_norm")(x)
        x = x + Attention(cfg, self.window, name="attn")(h, positions, segment_ids, deterministic)
        return x + MLP(cfg, name="mlp")(cfg.layer_norm("mlp_norm")(x), deterministic)


class ModernBert(nn.Module):
    """The bare encoder (``ModernBertModel``): token states ``(B, T, D)`` after ``final_norm``.

    Inputs are int32 ``(B, T)``: ``input_ids``; ``segment_ids`` (nonzero on real tokens, 0 on padding;
    distinct values keep packed documents apart); optional ``positions`` (default ``0..T-1``, as
    transformers counts them: RoPE only sees differences, so a document's offset in a packed row or
    left padding does not change its outputs). ``token_type_ids`` is accepted for the common calling
    convention and unused: ModernBERT has no token types.
    """

    cfg: ModernBertConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        self.layers = [Block(cfg, window, i == 0) for i, window in enumerate(cfg.layer_windows)]
        self.final_norm = cfg.layer_norm(None)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        del token_type_ids  # no token-type embeddings (see the class docstring)
        t = input_ids.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), input_ids.shape)
        x = self.embeddings(input_ids, deterministic)
        for layer in self.layers:
            x = layer(x, positions, segment_ids, deterministic)
        return self.final_norm(x)


class _ClassifierHead(nn.Module):
    """``head.dense`` -> activation -> ``head.norm`` -> dropout -> ``classifier``: ``(B, D)`` -> ``(B, num_labels)``."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        x = ACTIVATIONS[cfg.classifier_activation](cfg.linear(cfg.hidden_size, "dense_0", cfg.classifier_bias)(
            x, deterministic))
        x = Dropout(cfg.classifier_dropout)(cfg.layer_norm("norm")(x), deterministic=deterministic)
        return cfg.linear(cfg.num_labels, "out", True)(x, deterministic)


class ModernBertClassifier(nn.Module):
    """``ModernBertForSequenceClassification``: logits ``(B, num_labels)`` from the states pooled by
    ``classifier_pooling`` over real tokens. Params: the body under ``model``, the head under ``head``."""

    cfg: ModernBertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        hidden = ModernBert(self.cfg, name="model")(input_ids, segment_ids, positions, token_type_ids, deterministic)
        real = segment_ids if segment_ids is not None else jnp.ones(input_ids.shape, jnp.int32)
        return _ClassifierHead(self.cfg, name="head")(pool(hidden, real, self.cfg.classifier_pooling), deterministic)


def hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a param path's modules: ``('layers_2', 'attn', 'Wqkv')`` -> ``'layers.2.attn.Wqkv'``;
    a classifier's ``('model', ...)`` keeps its prefix and its ``('head', 'norm')`` is ``'head.norm'``."""
    if modules[0] == "head":
        return _HEAD_NAMES[modules[1]]
    return ".".join("layers." + m[len("layers_"):] if m.startswith("layers_") else m for m in modules)

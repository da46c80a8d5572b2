"""Bidirectional encoders: BERT and the models of its shape (all-MiniLM-L6-v2, BERT-base, ...).

:class:`Encoder` is ``BertModel`` (embeddings with token types and absolute positions,
post-norm blocks, an optional tanh pooler); :class:`EncoderClassifier` is
``BertForSequenceClassification`` (pooler -> dropout -> linear; one output = regression).
Sentence embeddings come from :func:`jaxtune.models.layers.pool` over the token states
(``mean`` as sentence-transformers does, or ``cls``).

Param paths mirror HF names: ``encoder.layer.2.attention.self.query.weight`` is
``params["layer_2"]["attention"]["self"]["query"]["kernel"]`` (transposed); see :func:`hf_module`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtune.models.layers import (
    Array,
    Embed,
    LayerNorm,
    Linear,
    PartitionRules,
    attention_mask,
    dot_product_attention,
    partition_rules,
)

ARCHITECTURES = ("BertModel", "BertForSequenceClassification")
PARTITION_RULES: PartitionRules = partition_rules(column=("query", "key", "value", "intermediate/dense"),
                                                  row=("output/dense",))
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything that shapes a BERT-style encoder. Hashable, so it can sit on a linen module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    use_pooler: bool = True
    num_labels: int = 2  # EncoderClassifier only
    architecture: str = "BertModel"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> EncoderConfig:
        """Build from a Hugging Face ``config.json`` dict."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None and hf.get("model_type") == "bert":
            arch = "BertModel"
        if arch is None:
            raise ValueError(
                f"config.json: architecture {archs or hf.get('model_type')!r} is not an encoder jaxtune supports; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json: only absolute position embeddings are supported "
                             f"(got {hf['position_embedding_type']!r})")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def linear(self, features: int, name: str | None = None) -> Linear:
        return Linear(features, use_bias=True, dtype=self.compute_dtype, param_dtype=self.param_dtype,
                      adapter_dropout=self.adapter_dropout, name=name)

    def layer_norm(self, name: str) -> LayerNorm:
        return LayerNorm(self.layer_norm_eps, self.compute_dtype, self.param_dtype, name=name)


class Embeddings(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, token_type_ids: Array, deterministic: bool) -> Array:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = Embed(cfg.vocab_size, cfg.hidden_size, dt, cfg.param_dtype, name="word_embeddings")(input_ids)
        x = x + Embed(cfg.max_position_embeddings, cfg.hidden_size, dt, cfg.param_dtype,
                      name="position_embeddings")(positions)
        x = x + Embed(cfg.type_vocab_size, cfg.hidden_size, dt, cfg.param_dtype,
                      name="token_type_embeddings")(token_type_ids)
        x = cfg.layer_norm("LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """HF's ``attention.self``: query/key/value projections and the attention itself."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
        cfg = self.cfg
        b, t, d = x.shape
        head_dim = d // cfg.num_heads

        def heads(name: str) -> Array:
            return cfg.linear(d, name)(x, deterministic).reshape(b, t, cfg.num_heads, head_dim)

        out = dot_product_attention(heads("query"), heads("key"), heads("value"), mask, causal=False)
        return out.reshape(b, t, d)


class Output(nn.Module):
    """HF's ``*.output``: dense -> dropout -> LayerNorm(residual + x)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        x = self.cfg.linear(residual.shape[-1], "dense")(x, deterministic)
        x = nn.Dropout(self.cfg.hidden_dropout)(x, deterministic=deterministic)
        return self.cfg.layer_norm("LayerNorm")(x + residual)


class Attention(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool) -> Array:
        h = SelfAttention(self.cfg, name="self")(x, mask, deterministic)
        return Output(self.cfg, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        h = self.cfg.linear(self.cfg.intermediate_size, "dense")(x, deterministic)
        return _ACTIVATIONS[self.cfg.hidden_act](h)


class EncoderBlock(nn.Module):
    """Post-norm block: attention, then the feed-forward, each with residual + LayerNorm."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, deterministic: bool = True) -> Array:
        x = Attention(self.cfg, name="attention")(x, mask, deterministic)
        h = Intermediate(self.cfg, name="intermediate")(x, deterministic)
        return Output(self.cfg, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    """``BertModel``. ``__call__`` returns token states ``(B, T, D)``; :meth:`pooled` the pooler output.

    Inputs are int32 ``(B, T)``: ``input_ids``; ``segment_ids`` (nonzero on real tokens, 0 on
    padding; distinct values keep packed rows apart); optional ``positions`` and ``token_type_ids``.
    """

    cfg: EncoderConfig

    def setup(self) -> None:
        self.embeddings = Embeddings(self.cfg)
        self.layer = [EncoderBlock(self.cfg) for _ in range(self.cfg.num_layers)]
        if self.cfg.use_pooler:
            self.pooler = _Pooler(self.cfg)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids, deterministic)
        mask = attention_mask(segment_ids, causal=False)
        for block in self.layer:
            x = block(x, mask, deterministic)
        if self.cfg.use_pooler and self.is_initializing():
            self.pooler(x)  # create the pooler's params at init
        return x

    def pooled(self, hidden: Array, deterministic: bool = True) -> Array:
        """BERT's pooler: ``tanh(dense(hidden[:, 0]))`` ``(B, D)``."""
        return self.pooler(hidden, deterministic)


class _Pooler(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool = True) -> Array:
        return jnp.tanh(self.cfg.linear(hidden.shape[-1], "dense")(hidden[:, 0], deterministic))


class EncoderClassifier(nn.Module):
    """``BertForSequenceClassification``: logits ``(B, num_labels)`` from the pooled CLS state."""

    cfg: EncoderConfig

    def setup(self) -> None:
        self.bert = Encoder(dataclasses.replace(self.cfg, use_pooler=True))
        self.dropout = nn.Dropout(self.cfg.hidden_dropout)
        self.classifier = self.cfg.linear(self.cfg.num_labels)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        hidden = self.bert(input_ids, segment_ids, positions, token_type_ids, deterministic)
        pooled = self.dropout(self.bert.pooled(hidden, deterministic), deterministic=deterministic)
        return self.classifier(pooled, deterministic)


def hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a param path's modules: ``('layer_2', 'attention', 'self', 'query')`` ->
    ``'encoder.layer.2.attention.self.query'``; ``('bert', 'embeddings', ...)`` keeps its ``bert.``."""
    parts = ["encoder.layer." + m[len("layer_"):] if m.startswith("layer_") else m for m in modules]
    return ".".join(parts)

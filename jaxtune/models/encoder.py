"""Bidirectional encoders: BERT (all-MiniLM-L6-v2, BERT-base, ...), RoBERTa / XLM-RoBERTa and DistilBERT.

The three share one computation (learned absolute positions, post-norm blocks, GELU feed-forward);
their differences are switches in :class:`EncoderConfig`:

=============  =================  ===========  =====================  ======================================
layout         positions          token types  module names           ``*ForSequenceClassification`` head
=============  =================  ===========  =====================  ======================================
``bert``       ``0..T-1``         yes          BERT's                 pooler (tanh) -> dropout -> classifier
``roberta``    ``padding_idx+1``  (one type)   BERT's                 first token -> dropout -> dense -> tanh
               onwards                                                -> dropout -> out_proj
``distilbert`` ``0..T-1``         none         its own (``q_lin``,    first token -> pre_classifier -> ReLU
                                               ``sa_layer_norm``...)  -> dropout -> classifier
=============  =================  ===========  =====================  ======================================

:class:`Encoder` is the bare model (``BertModel``, ``RobertaModel``...; with BERT's optional tanh
pooler); :class:`EncoderClassifier` is the family's ``*ForSequenceClassification``, whose params are
the body under its checkpoint prefix (``bert``, ``roberta``, ``distilbert``) and the head under
``head/`` laid out as ``jaxtune.tuning``'s heads are (``dense_0``, ``out``), so a checkpoint's head
is a tuning head as it is. Sentence embeddings come from :func:`jaxtune.models.layers.pool`.

Param paths mirror HF names below the block level: ``encoder.layer.2.attention.self.query.weight``
is ``params["layer_2"]["attention"]["self"]["query"]["kernel"]`` (transposed), DistilBERT's
``transformer.layer.2.attention.q_lin.weight`` is ``layer_2/attention/q_lin/kernel``; see
:func:`hf_module`.

Dropout in training is transformers': ``hidden_dropout_prob`` after the embeddings and each
sub-layer, ``attention_probs_dropout_prob`` (DistilBERT's ``attention_dropout``) on the attention
probabilities, and the classifier head's own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtune.models.dropout import Dropout
from jaxtune.models.layers import (
    Array,
    ClassifierLayout,
    Embed,
    Linear,
    ModuleBuilders,
    PartitionRules,
    attention_dropout_key,
    dot_product_attention,
    feed_forward,
    hf_architecture,
    partition_rules,
)

# architecture -> (layout, has a classification head)
_ARCHITECTURES = {
    "BertModel": ("bert", False), "BertForSequenceClassification": ("bert", True),
    "RobertaModel": ("roberta", False), "RobertaForSequenceClassification": ("roberta", True),
    "XLMRobertaModel": ("roberta", False), "XLMRobertaForSequenceClassification": ("roberta", True),
    "DistilBertModel": ("distilbert", False), "DistilBertForSequenceClassification": ("distilbert", True),
}
ARCHITECTURES = tuple(_ARCHITECTURES)
BASES = tuple(a for a, (_, head) in _ARCHITECTURES.items() if not head)
# The classifier of each bare architecture (the export target of a body with the family's head).
CLASSIFIERS = {a.replace("Model", "ForSequenceClassification"): a for a in BASES}
# model_type -> bare architecture, for checkpoints whose class jaxtune does not load (``*ForMaskedLM``...).
MODEL_TYPES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
               "distilbert": "DistilBertModel"}
PARTITION_RULES: PartitionRules = partition_rules(
    column=("query", "key", "value", "intermediate/dense", "q_lin", "k_lin", "v_lin", "lin1"),
    row=("output/dense", "out_lin", "lin2"))
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "tanh": jnp.tanh,
}


def layout_of(architecture: str) -> str:
    """The layout (``bert``, ``roberta``, ``distilbert``) of an encoder architecture."""
    return _ARCHITECTURES[architecture][0]


CLASSIFIER_LAYOUTS = {
    "bert": ClassifierLayout("bert", "pooler", (), "gelu", "classifier"),
    "roberta": ClassifierLayout("roberta", "cls", ("classifier.dense",), "tanh", "classifier.out_proj"),
    "distilbert": ClassifierLayout("distilbert", "cls", ("pre_classifier",), "relu", "classifier",
                                   input_dropout=False),
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModuleBuilders):
    """Everything that shapes an encoder. Hashable, so it can sit on a linen module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities (HF's attention_probs_dropout_prob)
    use_pooler: bool = True
    num_labels: int = 2  # EncoderClassifier only
    classifier_dropout: float = 0.1  # dropout of the *ForSequenceClassification head
    layout: str = "bert"  # bert | roberta | distilbert (see the module docstring)
    position_offset: int = 0  # RoBERTa: padding_idx + 1, the position embedding row of a document's first token
    architecture: str = "BertModel"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> EncoderConfig:
        """Build from a Hugging Face ``config.json`` dict."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "an encoder jaxtune supports")
        layout = layout_of(arch)
        hf = _distilbert_keys(hf) if layout == "distilbert" else hf
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("config.json: only absolute position embeddings are supported "
                             f"(got {hf['position_embedding_type']!r})")
        hidden_dropout = hf.get("hidden_dropout_prob", 0.1)
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            # DistilBERT has no pooler; a classifier has one only where its head reads it (BERT).
            use_pooler=layout != "distilbert" and (not _ARCHITECTURES[arch][1]
                                                   or CLASSIFIER_LAYOUTS[layout].pooling == "pooler"),
            type_vocab_size=0 if layout == "distilbert" else hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hidden_dropout,
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            classifier_dropout=hf.get("classifier_dropout") if hf.get("classifier_dropout") is not None
            else hidden_dropout,
            layout=layout,
            position_offset=_padding_idx(hf) + 1 if layout == "roberta" else 0,
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def classifier_layout(self) -> ClassifierLayout:
        return CLASSIFIER_LAYOUTS[self.layout]


def _padding_idx(hf: dict[str, Any]) -> int:
    """RoBERTa's ``padding_idx`` (its ``pad_token_id``, 1 when the config has none)."""
    return 1 if hf.get("pad_token_id") is None else int(hf["pad_token_id"])


def _distilbert_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """DistilBERT's ``config.json`` in BERT's key names (its LayerNorms are fixed at eps 1e-12)."""
    renamed = {"dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
               "n_heads": "num_attention_heads", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
               "attention_dropout": "attention_probs_dropout_prob", "seq_classif_dropout": "classifier_dropout"}
    out = {k: v for k, v in hf.items() if k not in renamed}
    out.update({new: hf[old] for old, new in renamed.items() if old in hf})
    return out


class Embeddings(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, token_type_ids: Array, deterministic: bool) -> Array:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = Embed(cfg.vocab_size, cfg.hidden_size, dt, cfg.param_dtype, name="word_embeddings")(input_ids)
        x = x + Embed(cfg.max_position_embeddings, cfg.hidden_size, dt, cfg.param_dtype,
                      name="position_embeddings")(positions + cfg.position_offset)
        if cfg.type_vocab_size:
            x = x + Embed(cfg.type_vocab_size, cfg.hidden_size, dt, cfg.param_dtype,
                          name="token_type_embeddings")(token_type_ids)
        x = cfg.layer_norm("LayerNorm")(x)
        return Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


def multi_head_attention(cfg: EncoderConfig, x: Array, segment_ids: Array | None, query: Linear, key: Linear,
                         value: Linear, deterministic: bool, module: nn.Module) -> Array:
    """Bidirectional attention of ``x`` ``(B, T, D)`` through the three projections -> ``(B, T, D)``;
    in training, dropout on the probabilities with bits from ``module``'s ``dropout`` stream."""
    b, t, d = x.shape
    heads = [p(x, deterministic).reshape(b, t, cfg.num_heads, d // cfg.num_heads) for p in (query, key, value)]
    return dot_product_attention(*heads, segment_ids=segment_ids, causal=False, dropout_rate=cfg.attention_dropout,
                                 dropout_rng=attention_dropout_key(module, cfg.attention_dropout, deterministic)
                                 ).reshape(b, t, d)


class SelfAttention(nn.Module):
    """HF's ``attention.self``: query/key/value projections and the attention itself."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        cfg = self.cfg
        d = x.shape[-1]
        return multi_head_attention(cfg, x, segment_ids, cfg.linear(d, "query"), cfg.linear(d, "key"),
                                    cfg.linear(d, "value"), deterministic, self)


class Output(nn.Module):
    """HF's ``*.output``: dense -> dropout -> LayerNorm(residual + x)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        x = self.cfg.linear(residual.shape[-1], "dense")(x, deterministic)
        x = Dropout(self.cfg.hidden_dropout)(x, deterministic=deterministic)
        return self.cfg.layer_norm("LayerNorm")(x + residual)


class Attention(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        h = SelfAttention(self.cfg, name="self")(x, segment_ids, deterministic)
        return Output(self.cfg, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        h = self.cfg.linear(self.cfg.intermediate_size, "dense")(x, deterministic)
        return ACTIVATIONS[self.cfg.hidden_act](h)


class EncoderBlock(nn.Module):
    """Post-norm block: attention, then the feed-forward, each with residual + LayerNorm."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool = True) -> Array:
        x = Attention(self.cfg, name="attention")(x, segment_ids, deterministic)
        h = Intermediate(self.cfg, name="intermediate")(x, deterministic)
        return Output(self.cfg, name="output")(h, x, deterministic)


class DistilBertAttention(nn.Module):
    """DistilBERT's ``attention``: ``q_lin``/``k_lin``/``v_lin``, then ``out_lin`` (no dropout after it)."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool) -> Array:
        cfg = self.cfg
        d = x.shape[-1]
        h = multi_head_attention(cfg, x, segment_ids, cfg.linear(d, "q_lin"), cfg.linear(d, "k_lin"),
                                 cfg.linear(d, "v_lin"), deterministic, self)
        return cfg.linear(d, "out_lin")(h, deterministic)


class DistilBertFFN(nn.Module):
    """DistilBERT's ``ffn``: ``lin1`` -> activation -> ``lin2`` -> dropout."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        h = feed_forward(cfg, x, ("lin1", "lin2"), ACTIVATIONS[cfg.hidden_act], deterministic)
        return Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)


class DistilBertBlock(nn.Module):
    """:class:`EncoderBlock`'s computation under DistilBERT's module names."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None, deterministic: bool = True) -> Array:
        attn = DistilBertAttention(self.cfg, name="attention")(x, segment_ids, deterministic)
        x = self.cfg.layer_norm("sa_layer_norm")(attn + x)
        return self.cfg.layer_norm("output_layer_norm")(DistilBertFFN(self.cfg, name="ffn")(x, deterministic) + x)


BLOCKS: dict[str, type[nn.Module]] = {"bert": EncoderBlock, "roberta": EncoderBlock, "distilbert": DistilBertBlock}


def positions_from_segments(segment_ids: Array) -> Array:
    """Each real token's index among the real tokens of its row before it (``0, 1, ...``), -1 on padding
    ``(B, T)`` int32: RoBERTa's ``create_position_ids_from_input_ids`` without the offset."""
    real = (segment_ids != 0).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1) * real - 1).astype(jnp.int32)


class Encoder(nn.Module):
    """The bare encoder. ``__call__`` returns token states ``(B, T, D)``; :meth:`pooled` BERT's pooler output.

    Inputs are int32 ``(B, T)``: ``input_ids``; ``segment_ids`` (nonzero on real tokens, 0 on
    padding; distinct values keep packed rows apart); optional ``positions`` (0-based within each
    document; RoBERTa's offset is added here) and ``token_type_ids``. Without ``positions`` BERT
    counts ``0..T-1`` and RoBERTa counts real tokens only, as transformers does.
    """

    cfg: EncoderConfig

    def setup(self) -> None:
        self.embeddings = Embeddings(self.cfg)
        self.layer = [BLOCKS[self.cfg.layout](self.cfg) for _ in range(self.cfg.num_layers)]
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
        if positions is None and self.cfg.position_offset and segment_ids is not None:
            positions = positions_from_segments(segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids, deterministic)
        for block in self.layer:
            x = block(x, segment_ids, deterministic)
        if self.cfg.use_pooler and self.is_initializing():
            self.pooler(x)  # create the pooler's params at init
        return x

    def pooled(self, first: Array, deterministic: bool = True) -> Array:
        """BERT's pooler on the first token's states ``first`` ``(..., D)``: ``tanh(dense(first))``."""
        return self.pooler(first, deterministic)


class _Pooler(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, first: Array, deterministic: bool = True) -> Array:
        return jnp.tanh(self.cfg.linear(first.shape[-1], "dense")(first, deterministic))


class _ClassifierHead(nn.Module):
    """The layers of a :class:`ClassifierLayout` after pooling: ``(B, D)`` -> ``(B, num_labels)``."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg, layout = self.cfg, self.cfg.classifier_layout
        drop = Dropout(cfg.classifier_dropout)
        for i in range(len(layout.dense)):
            if i or layout.input_dropout:
                x = drop(x, deterministic=deterministic)
            x = ACTIVATIONS[layout.activation](cfg.linear(cfg.hidden_size, f"dense_{i}")(x, deterministic))
        return cfg.linear(cfg.num_labels, "out")(drop(x, deterministic=deterministic), deterministic)


class EncoderClassifier(nn.Module):
    """The family's ``*ForSequenceClassification``: logits ``(B, num_labels)`` from the pooled first token
    (see :class:`ClassifierLayout`). Params: the body under its checkpoint prefix, the head under ``head``."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        layout = self.cfg.classifier_layout
        body = Encoder(dataclasses.replace(self.cfg, use_pooler=layout.pooling == "pooler"), name=layout.body)
        hidden = body(input_ids, segment_ids, positions, token_type_ids, deterministic)
        pooled = body.pooled(hidden[:, 0], deterministic) if layout.pooling == "pooler" else hidden[:, 0]
        return _ClassifierHead(self.cfg, name="head")(pooled, deterministic)


def hf_module(modules: tuple[str, ...], layout: str = "bert") -> str:
    """HF module name of a param path's modules: ``('layer_2', 'attention', 'self', 'query')`` ->
    ``'encoder.layer.2.attention.self.query'`` (DistilBERT: ``transformer.layer.2...``); a classifier's
    ``('bert', 'embeddings', ...)`` keeps its prefix and its ``('head', 'out')`` is the layout's output layer."""
    if modules[0] == "head":
        return CLASSIFIER_LAYOUTS[layout].hf_names()[modules[1]]
    stack = "transformer.layer." if layout == "distilbert" else "encoder.layer."
    return ".".join(stack + m[len("layer_"):] if m.startswith("layer_") else m for m in modules)


def hf_module_for(layout: str) -> functools.partial:
    """:func:`hf_module` of one layout (a family's name map)."""
    return functools.partial(hf_module, layout=layout)

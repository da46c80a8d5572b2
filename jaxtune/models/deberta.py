"""DeBERTa-v2 and DeBERTa-v3 (microsoft/deberta-v3-base, -large, their fine-tunes, OpenAssistant's reward
models): transformers' ``DebertaV2Model`` and ``DebertaV2ForSequenceClassification`` (``model_type:
deberta-v2``).

A post-norm encoder like BERT (:mod:`jaxtune.models.encoder`), but its attention is disentangled, hence
its own file:

- embeddings: word embeddings, plus learned absolute positions only where ``position_biased_input``
  (DeBERTa-v3 has none, so its rows may run past ``max_position_embeddings``, as in transformers), plus
  token types where ``type_vocab_size > 0``; an ``embed_proj`` (no bias) when ``embedding_size !=
  hidden_size``; LayerNorm; padding embeddings zeroed;
- disentangled self-attention: the content score ``q_i . k_j`` plus, per ``pos_att_type``,
  content-to-position ``q_i . Kr[d(i, j)]`` (``c2p``) and position-to-content ``k_j . Qr[-d(j, i)]``
  (``p2c``), all divided by ``sqrt(head_dim * scale_factor)`` with ``scale_factor = 1 + len(pos_att_type)``.
  ``Kr``/``Qr`` project one relative-position table shared by every layer (``encoder.rel_embeddings``,
  LayerNorm-ed where ``norm_rel_ebd: layer_norm``) through the layer's ``key_proj``/``query_proj``
  (``share_att_key``, v3) or its own ``pos_key_proj``/``pos_query_proj``. ``d(i, j) = i - j``, log-bucketed
  beyond ``position_buckets // 2`` up to ``max_relative_positions`` (:func:`relative_positions`), then
  clipped to the table's ``2 * att_span`` rows;
- ``DebertaV2ForSequenceClassification``: HF's ``ContextPooler`` (the first token -> dropout
  ``pooler_dropout`` -> ``pooler.dense`` -> ``pooler_hidden_act``) -> dropout (``cls_dropout``, else
  ``hidden_dropout_prob``) -> ``classifier``: a :class:`jaxtune.models.layers.ClassifierLayout`.

Relative positions are index differences, so they need no position ids: a document packed into a row at
any offset, or after left padding, sees the same ``d(i, j)`` as alone; segments keep packed documents
from attending to each other. Absolute positions (``position_biased_input``) come from ``positions``.

:class:`Deberta` is the bare model (``DebertaV2Model``; a ``DebertaV2ForMaskedLM`` checkpoint loads as it,
without its prediction head); :class:`DebertaClassifier` is the classifier, the body under ``deberta`` and
the head under ``head`` laid out as ``jaxtune.tuning``'s heads are (``dense_0``, ``out``). Param paths
mirror HF names: ``encoder.layer.2.attention.self.query_proj.weight`` is
``params["layer_2"]["attention"]["self"]["query_proj"]["kernel"]`` (transposed), ``encoder.rel_embeddings``
is ``params["encoder"]["rel_embeddings"]``; see :func:`hf_module`.

Not supported, refused at load naming the field: ``conv_kernel_size > 0`` (deberta-v2-xlarge/-xxlarge's
convolution beside layer 0), ``pooler_hidden_size != hidden_size``, ``pos_att_type`` entries other than
``c2p``/``p2c``, and DeBERTa v1 (``model_type: deberta``, a different architecture).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS, Intermediate, Output
from jaxtune.models.layers import (
    Array,
    ClassifierLayout,
    Embed,
    ModuleBuilders,
    PartitionRules,
    hf_architecture,
    partition_rules,
)

ARCHITECTURES = ("DebertaV2Model", "DebertaV2ForSequenceClassification")
CLASSIFIERS = ("DebertaV2ForSequenceClassification",)
# model_type -> bare architecture, for checkpoints whose class jaxtune does not load (``DebertaV2ForMaskedLM``...).
MODEL_TYPES = {"deberta-v2": "DebertaV2Model"}
PARTITION_RULES: PartitionRules = partition_rules(
    column=("query_proj", "key_proj", "value_proj", "intermediate/dense"), row=("output/dense",))
POSITION_ATTENTION = ("c2p", "p2c")
# The classifier's head modules (jaxtune's head/dense_0, head/out) -> HF module names.
_HEAD_NAMES = {"dense_0": "pooler.dense", "out": "classifier"}


@dataclasses.dataclass(frozen=True)
class DebertaConfig(ModuleBuilders):
    """Everything that shapes a DeBERTa-v2/v3. Hashable, so it can sit on a linen module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    embedding_size: int = 0  # 0: hidden_size (no embed_proj)
    # Rows of the absolute position table (position_biased_input), None without one (DeBERTa-v3): rows are then
    # not limited to config.json's max_position_embeddings, as in transformers.
    max_position_embeddings: int | None = 512
    type_vocab_size: int = 0
    relative_attention: bool = False
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    position_buckets: int = -1
    max_relative_positions: int = 512  # config.json's, or its max_position_embeddings where that is < 1
    norm_rel_ebd: bool = False  # LayerNorm on the relative-position table (norm_rel_ebd: layer_norm)
    layer_norm_eps: float = 1e-7
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    num_labels: int = 2  # DebertaClassifier only
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    classifier_dropout: float = 0.1  # cls_dropout, else hidden_dropout_prob
    architecture: str = "DebertaV2Model"
    dtype: str = "float32"
    param_dtype: str = "float32"
    adapter_dropout: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> DebertaConfig:
        """Build from a Hugging Face ``config.json`` dict; a ValueError naming the field for what is not supported."""
        arch = hf_architecture(hf, ARCHITECTURES, MODEL_TYPES, "a DeBERTa-v2/v3 jaxtune supports")
        if hf.get("model_type", "deberta-v2") != "deberta-v2":
            raise ValueError(f"config.json: model_type {hf['model_type']!r} is not supported by {arch}; "
                             "jaxtune reads DeBERTa-v2/v3 (model_type 'deberta-v2') only")
        for key in ("hidden_act", "pooler_hidden_act"):
            if hf.get(key, "gelu") not in ACTIVATIONS:
                raise ValueError(f"config.json: {key} {hf[key]!r} is not supported; "
                                 f"supported: {', '.join(ACTIVATIONS)}")
        if hf.get("conv_kernel_size", 0) > 0:
            raise ValueError(f"config.json: conv_kernel_size {hf['conv_kernel_size']} (a convolution beside the first "
                             "layer, as in deberta-v2-xlarge) is not supported; jaxtune reads DeBERTa configs with "
                             "conv_kernel_size 0 (DeBERTa-v3)")
        if hf["hidden_size"] % hf["num_attention_heads"]:
            raise ValueError(f"config.json: hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads "
                             f"{hf['num_attention_heads']}")
        if hf.get("attention_head_size", hf["hidden_size"] // hf["num_attention_heads"]) \
                != hf["hidden_size"] // hf["num_attention_heads"]:
            raise ValueError(f"config.json: attention_head_size {hf['attention_head_size']} is not supported; "
                             "it must be hidden_size / num_attention_heads")
        if hf.get("pooler_hidden_size", hf["hidden_size"]) != hf["hidden_size"]:
            raise ValueError(f"config.json: pooler_hidden_size {hf['pooler_hidden_size']} differs from hidden_size "
                             f"{hf['hidden_size']}, which transformers' classifier cannot run either; set it to "
                             "hidden_size")
        pos_att_type = _pos_att_type(hf.get("pos_att_type"))
        norm_rel = [x.strip() for x in str(hf.get("norm_rel_ebd") or "none").lower().split("|")]
        if set(norm_rel) - {"none", "layer_norm"}:
            raise ValueError(f"config.json: norm_rel_ebd {hf['norm_rel_ebd']!r} is not supported; "
                             "use 'layer_norm' or 'none'")
        hidden_dropout = float(hf.get("hidden_dropout_prob", 0.1))
        embedding_size = hf.get("embedding_size") or hf["hidden_size"]
        positions, max_relative = int(hf.get("max_position_embeddings", 512)), int(hf.get("max_relative_positions", -1))
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            embedding_size=0 if embedding_size == hf["hidden_size"] else int(embedding_size),
            max_position_embeddings=positions if hf.get("position_biased_input", True) else None,
            type_vocab_size=int(hf.get("type_vocab_size", 0)),
            relative_attention=bool(hf.get("relative_attention", False)),
            pos_att_type=pos_att_type,
            share_att_key=bool(hf.get("share_att_key", False)),
            position_buckets=int(hf.get("position_buckets", -1)),
            max_relative_positions=max_relative if max_relative >= 1 else positions,
            norm_rel_ebd="layer_norm" in norm_rel,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-7)),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hidden_dropout,
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
            pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
            pooler_dropout=float(hf.get("pooler_dropout", 0.0)),
            classifier_dropout=float(hf["cls_dropout"] if hf.get("cls_dropout") is not None else hidden_dropout),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def classifier_layout(self) -> ClassifierLayout:
        # jaxtune's head has one dropout rate (classifier_dropout); HF drops the pooled token at pooler_dropout
        # (0 in the released configs) and the pooler output at cls_dropout.
        return ClassifierLayout("deberta", "cls", (_HEAD_NAMES["dense_0"],), self.pooler_hidden_act,
                                _HEAD_NAMES["out"], input_dropout=self.pooler_dropout > 0)

    @property
    def att_span(self) -> int:
        """Relative distances reach ``-att_span .. att_span - 1`` rows of the position table (HF's ``pos_ebd_size``)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def position_biased_input(self) -> bool:
        """Whether absolute position embeddings are added to the word embeddings (config.json's field)."""
        return self.max_position_embeddings is not None

    @property
    def scale(self) -> float:
        """The divisor of every attention score: ``sqrt(head_dim * (1 + len(pos_att_type)))``."""
        return math.sqrt(self.hidden_size // self.num_heads * (1 + len(self.pos_att_type)))


def _pos_att_type(value: Any) -> tuple[str, ...]:
    """``pos_att_type`` (a list, or HF's ``"p2c|c2p"`` string) as a tuple of ``c2p``/``p2c``."""
    kinds = [x.strip().lower() for x in value.split("|")] if isinstance(value, str) else list(value or [])
    unknown = [k for k in kinds if k not in POSITION_ATTENTION]
    if unknown:
        raise ValueError(f"config.json: pos_att_type {value!r} has {unknown!r}, which is not supported; "
                         f"use a list of {', '.join(POSITION_ATTENTION)}")
    return tuple(dict.fromkeys(kinds))


def relative_positions(length: int, bucket_size: int, max_position: int) -> np.ndarray:
    """``d(i, j)`` int32 ``(length, length)``: ``i - j``, log-bucketed beyond ``bucket_size // 2`` when both
    sizes are positive, as transformers' ``build_relative_position`` (in float32, as it computes them)."""
    rel = np.arange(length)[:, None] - np.arange(length)[None, :]
    if bucket_size <= 0 or max_position <= 0:
        return rel.astype(np.int32)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
    scale = np.log(np.float32((max_position - 1) / mid), dtype=np.float32)
    log_pos = np.ceil(np.log(abs_pos / np.float32(mid), dtype=np.float32) / scale * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * np.sign(rel)).astype(np.int32)


class Embeddings(nn.Module):
    """HF's ``embeddings``: words (+ positions, + token types) -> ``embed_proj`` -> LayerNorm -> padding
    zeroed -> dropout."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, token_type_ids: Array, real: Array,
                 deterministic: bool) -> Array:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        width = cfg.embedding_size or cfg.hidden_size
        x = Embed(cfg.vocab_size, width, dt, cfg.param_dtype, name="word_embeddings")(input_ids)
        if cfg.position_biased_input:
            x = x + Embed(cfg.max_position_embeddings, width, dt, cfg.param_dtype,
                          name="position_embeddings")(positions)
        if cfg.type_vocab_size:
            x = x + Embed(cfg.type_vocab_size, width, dt, cfg.param_dtype, name="token_type_embeddings")(token_type_ids)
        if cfg.embedding_size:
            x = cfg.linear(cfg.hidden_size, "embed_proj", bias=False)(x, deterministic)
        x = cfg.layer_norm("LayerNorm")(x) * real[..., None].astype(dt)
        return Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    """HF's ``attention.self`` (``DisentangledSelfAttention``): content and relative-position scores, softmax,
    values."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, x: Array, allowed: Array, rel_table: Array | None, rel_pos: Array | None,
                 deterministic: bool) -> Array:
        """``x`` ``(B, T, D)``; ``allowed`` bool ``(B, 1, T, T)``; ``rel_table`` ``(2 * att_span, D)``; ``rel_pos``
        int32 ``(T, T)`` -> ``(B, T, D)``."""
        cfg = self.cfg
        b, t, d = x.shape
        heads = lambda y: y.reshape(*y.shape[:-1], cfg.num_heads, d // cfg.num_heads)  # noqa: E731
        query, key = cfg.linear(d, "query_proj"), cfg.linear(d, "key_proj")
        q, k = heads(query(x, deterministic)), heads(key(x, deterministic))
        v = heads(cfg.linear(d, "value_proj")(x, deterministic))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if cfg.relative_attention:
            span = cfg.att_span
            rows = jnp.arange(t)[:, None]
            if "c2p" in cfg.pos_att_type:  # q_i . Kr[d(i, j)]
                pos_key = heads(key(rel_table, deterministic) if cfg.share_att_key
                                else cfg.linear(d, "pos_key_proj")(rel_table, deterministic))
                c2p = jnp.einsum("bqhd,rhd->bhqr", q, pos_key, preferred_element_type=jnp.float32)
                scores = scores + c2p[:, :, rows, jnp.clip(rel_pos + span, 0, 2 * span - 1)]
            if "p2c" in cfg.pos_att_type:  # k_j . Qr[-d(j, i)]
                pos_query = heads(query(rel_table, deterministic) if cfg.share_att_key
                                  else cfg.linear(d, "pos_query_proj")(rel_table, deterministic))
                p2c = jnp.einsum("bkhd,rhd->bhkr", k, pos_query, preferred_element_type=jnp.float32)
                scores = scores + jnp.swapaxes(p2c[:, :, rows, jnp.clip(span - rel_pos, 0, 2 * span - 1)], -1, -2)
        # A query with no key to attend to (padding) gets uniform weights over all keys, as in transformers.
        scores = jnp.where(allowed, scores / cfg.scale, jnp.finfo(jnp.float32).min)
        probs = Dropout(cfg.attention_dropout)(nn.softmax(scores, axis=-1).astype(v.dtype),
                                               deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


class Attention(nn.Module):
    """HF's ``attention``: disentangled self-attention, then BERT's ``output`` (dense -> dropout ->
    LayerNorm(x + residual))."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, x: Array, allowed: Array, rel_table: Array | None, rel_pos: Array | None,
                 deterministic: bool) -> Array:
        h = SelfAttention(self.cfg, name="self")(x, allowed, rel_table, rel_pos, deterministic)
        return Output(self.cfg, name="output")(h, x, deterministic)


class Block(nn.Module):
    """Post-norm block (``encoder.layer.i``): attention, then BERT's ``intermediate`` + ``output``."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, x: Array, allowed: Array, rel_table: Array | None, rel_pos: Array | None,
                 deterministic: bool = True) -> Array:
        cfg = self.cfg
        x = Attention(cfg, name="attention")(x, allowed, rel_table, rel_pos, deterministic)
        h = Intermediate(cfg, name="intermediate")(x, deterministic)
        return Output(cfg, name="output")(h, x, deterministic)


class _RelativeTable(nn.Module):
    """HF's ``encoder.rel_embeddings`` (+ ``encoder.LayerNorm``): the ``(2 * att_span, D)`` relative-position table."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, deterministic: bool) -> Array:
        cfg = self.cfg
        rows = jnp.arange(2 * cfg.att_span)
        table = Embed(2 * cfg.att_span, cfg.hidden_size, cfg.compute_dtype, cfg.param_dtype,
                      name="rel_embeddings")(rows)
        if cfg.norm_rel_ebd:
            table = cfg.layer_norm("LayerNorm")(table)
        return Dropout(cfg.hidden_dropout)(table, deterministic=deterministic)  # HF's pos_dropout


class Deberta(nn.Module):
    """The bare encoder (``DebertaV2Model``): token states ``(B, T, D)``.

    Inputs are int32 ``(B, T)``: ``input_ids``; ``segment_ids`` (nonzero on real tokens, 0 on padding;
    distinct values keep packed documents apart); optional ``positions`` (absolute positions, read only
    where ``position_biased_input``; default ``0..T-1``, as transformers counts them) and ``token_type_ids``.
    """

    cfg: DebertaConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        self.layer = [Block(cfg) for _ in range(cfg.num_layers)]
        if cfg.relative_attention:
            self.encoder = _RelativeTable(cfg)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.cfg
        t = input_ids.shape[1]
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        real = segment_ids != 0
        allowed = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :])[:, None]
        x = self.embeddings(input_ids, positions, token_type_ids, real, deterministic)
        rel_table = rel_pos = None
        if cfg.relative_attention:
            rel_table = self.encoder(deterministic)
            rel_pos = jnp.asarray(relative_positions(t, cfg.position_buckets, cfg.max_relative_positions))
        for block in self.layer:
            x = block(x, allowed, rel_table, rel_pos, deterministic)
        return x


class _ClassifierHead(nn.Module):
    """HF's ``ContextPooler`` + ``classifier`` after the first token: ``(B, D)`` -> ``(B, num_labels)``."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        x = Dropout(cfg.pooler_dropout)(x, deterministic=deterministic)
        x = ACTIVATIONS[cfg.pooler_hidden_act](cfg.linear(cfg.hidden_size, "dense_0")(x, deterministic))
        x = Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
        return cfg.linear(cfg.num_labels, "out")(x, deterministic)


class DebertaClassifier(nn.Module):
    """``DebertaV2ForSequenceClassification``: logits ``(B, num_labels)`` from the first token's states.
    Params: the body under ``deberta``, the head under ``head``."""

    cfg: DebertaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        hidden = Deberta(self.cfg, name="deberta")(input_ids, segment_ids, positions, token_type_ids, deterministic)
        return _ClassifierHead(self.cfg, name="head")(hidden[:, 0], deterministic)


def hf_module(modules: tuple[str, ...]) -> str:
    """HF module name of a param path's modules: ``('layer_2', 'attention', 'self', 'query_proj')`` ->
    ``'encoder.layer.2.attention.self.query_proj'``; a classifier's ``('deberta', ...)`` keeps its prefix and
    its ``('head', 'dense_0')`` is ``'pooler.dense'``."""
    if modules[0] == "head":
        return _HEAD_NAMES[modules[1]]
    return ".".join("encoder.layer." + m[len("layer_"):] if m.startswith("layer_") else m for m in modules)

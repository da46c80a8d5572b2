"""Added layers: a classification or regression head on a pretrained body.

The head reads the body's token states ``(B, T, D)``, optionally runs ``extra_blocks`` fresh
transformer blocks (on a decoder body Llama's pre-norm causal block, whatever the family; on an encoder
or image body BERT's post-norm block: fresh layers train from scratch, so they need not be the body's
own), pools to ``(B, D)`` (``mean``, ``cls``, ``last`` real token, or BERT's ``pooler``; ``(B, 2D)``
for DINOv2's ``cls_mean``, the first token ++ the mean of the rest), optionally runs GELU layers of
widths ``hidden``, and ends in a linear ``out`` with ``num_outputs`` outputs (classification logits
or regression values). Its params live under ``head/``: ``head/block_i/...``, ``head/dense_i/...``, ``head/out/...``.

The heads that are exactly Hugging Face's export to transformers and PEFT: last-token pooling into
a bias-free ``out`` on a decoder (``*ForSequenceClassification.score``), and on an encoder its
family's classifier (:class:`jaxtune.models.layers.ClassifierLayout`: BERT's pooler into
``classifier``; RoBERTa's first token through ``classifier.dense`` + tanh into
``classifier.out_proj``; DistilBERT's through ``pre_classifier`` + ReLU into ``classifier``; ModernBERT's
first token or mean through ``head.dense`` + GELU + ``head.norm`` into ``classifier``). An encoder head's
defaults are its family's classifier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.deberta import DebertaConfig
from jaxtune.models.decoder import DecoderBlock, DecoderConfig
from jaxtune.models.dropout import Dropout
from jaxtune.models.encoder import ACTIVATIONS, EncoderBlock
from jaxtune.models.layers import Array, ClassifierLayout, LayerNorm, Linear, pool
from jaxtune.models.modernbert import ModernBertConfig
from jaxtune.tuning.plan import PlanError, Rule


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A resolved head: every default filled in."""

    task: str  # classification | regression
    num_outputs: int
    pooling: str  # mean | cls | last | pooler
    hidden: tuple[int, ...] = ()
    extra_blocks: int = 0
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # after each hidden layer
    input_dropout: bool = True  # dropout on the pooled features too (DistilBERT's classifier has none there)
    dense_bias: bool = True  # a bias on the hidden layers (ModernBERT's head.dense has none by default)
    norm_eps: float | None = None  # a LayerNorm after the hidden layers (ModernBERT's head.norm), or None
    norm_bias: bool = True  # whether that LayerNorm has a bias


def head_spec(rule: Rule, body_cfg: Any, has_pooler: bool, where: str) -> HeadSpec:
    """Fill in a ``head`` rule's defaults for this body (``where`` names the rule in errors): a decoder's
    are HF's ``score`` on the last token, an encoder's its family's HF classifier."""
    decoder = isinstance(body_cfg, DecoderConfig)
    layout = None if decoder else body_cfg.classifier_layout
    default = "last" if decoder else layout.pooling if layout.pooling != "pooler" or has_pooler else "cls"
    pooling = rule.pooling or default
    if pooling == "pooler" and not has_pooler:
        raise PlanError(f"{where}: pooling 'pooler' needs a BERT pooler, which this model has not; "
                        "use mean, cls or last")
    if rule.extra_blocks and isinstance(body_cfg, ModernBertConfig):
        raise PlanError(f"{where}: extra_blocks is not supported on ModernBERT (its blocks need RoPE positions and "
                        "a layer type); drop extra_blocks, or add LoRA/train rules on the body's last layers instead")
    if rule.extra_blocks and isinstance(body_cfg, DebertaConfig):
        raise PlanError(f"{where}: extra_blocks is not supported on DeBERTa (its blocks read the body's relative-"
                        "position table); drop extra_blocks, or add LoRA/train rules on the body's last layers instead")
    # The encoder family's own classifier, unless the rule changes its pooling or hidden layers.
    family = layout is not None and pooling == layout.pooling and rule.hidden is None
    hidden = tuple(rule.hidden) if rule.hidden is not None else \
        (body_cfg.hidden_size,) * len(layout.dense) if family else ()
    return HeadSpec(
        task=rule.task,
        num_outputs=rule.num_labels or (2 if rule.task == "classification" else 1),
        pooling=pooling,
        hidden=hidden,
        extra_blocks=rule.extra_blocks or 0,
        # HF's classifiers: encoders apply their classifier dropout before (and between) the layers; decoders none.
        dropout=float(rule.dropout if rule.dropout is not None else (0.0 if decoder else body_cfg.classifier_dropout)),
        bias=bool(rule.bias if rule.bias is not None else not decoder),
        activation=layout.activation if family and layout.dense else "gelu",
        input_dropout=layout.input_dropout if family else True,
        **(_layout_extras(layout) if family else {}),
    )


def _layout_extras(layout: ClassifierLayout) -> dict[str, Any]:
    """The :class:`HeadSpec` fields of a family classifier's hidden-layer bias and trailing norm."""
    return dict(dense_bias=layout.dense_bias, norm_eps=layout.norm_eps if layout.norm else None,
                norm_bias=layout.norm_bias)


def family_head(layout: ClassifierLayout, task: str, num_outputs: int, hidden_size: int, dropout: float) -> HeadSpec:
    """The :class:`HeadSpec` that is exactly an encoder family's ``*ForSequenceClassification`` head."""
    return HeadSpec(task=task, num_outputs=num_outputs, pooling=layout.pooling,
                    hidden=(hidden_size,) * len(layout.dense), dropout=dropout, bias=True,
                    activation=layout.activation if layout.dense else "gelu", input_dropout=layout.input_dropout,
                    **_layout_extras(layout))


def hf_head_modules(spec: HeadSpec, body_cfg: Any) -> dict[str, str] | None:
    """The transformers module of each head module (``out``, ``dense_i``) when the head is exactly HF's
    ``*ForSequenceClassification`` head of the body's family; else None."""
    plain = not spec.extra_blocks
    if isinstance(body_cfg, DecoderConfig):
        return {"out": "score"} if plain and not spec.hidden and spec.pooling == "last" and not spec.bias else None
    layout = body_cfg.classifier_layout
    same = (spec.pooling == layout.pooling and spec.hidden == (body_cfg.hidden_size,) * len(layout.dense)
            and spec.bias and (not layout.dense or spec.activation == layout.activation)
            and spec.input_dropout == layout.input_dropout
            and (not layout.dense or spec.dense_bias == layout.dense_bias)
            and spec.norm_eps == (layout.norm_eps if layout.norm else None)
            and (layout.norm is None or spec.norm_bias == layout.norm_bias))
    return layout.hf_names() if plain and same else None


class Head(nn.Module):
    """The head's layers. :meth:`transform` runs the extra blocks on ``(B, T, D)`` token states;
    ``__call__`` maps pooled features ``(..., D)`` (``(B, D)``, or ``(B, S, D)`` for packed rows) to
    ``(..., num_outputs)``."""

    spec: HeadSpec
    body_cfg: Any  # DecoderConfig | EncoderConfig

    def setup(self) -> None:
        cfg, spec = self.body_cfg, self.spec
        decoder = isinstance(cfg, DecoderConfig)
        # Fresh blocks, initialised like HF's: Llama's (causal) on a decoder, BERT's on an encoder or image body.
        self.block = [DecoderBlock(cfg, None) if decoder else EncoderBlock(cfg) for _ in range(spec.extra_blocks)]
        dt = cfg.compute_dtype
        # adapter_dropout: a plan may put LoRA on the head's layers (a loaded classifier's), and its dropout with it
        linear = functools.partial(Linear, dtype=dt, param_dtype=jnp.float32, adapter_dropout=cfg.adapter_dropout)
        self.dense = [linear(w, use_bias=spec.dense_bias) for w in spec.hidden]
        self.norm = (None if spec.norm_eps is None
                     else LayerNorm(spec.norm_eps, dt, jnp.float32, use_bias=spec.norm_bias))
        self.out = linear(spec.num_outputs, use_bias=spec.bias)
        self.drop = Dropout(spec.dropout)

    def transform(self, hidden: Array, positions: Array | None, segment_ids: Array | None,
                  deterministic: bool = True) -> Array:
        if not self.block:
            return hidden
        if isinstance(self.body_cfg, DecoderConfig):
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(hidden.shape[1], dtype=jnp.int32), hidden.shape[:2])
            for block in self.block:
                hidden = block(hidden, positions, segment_ids, deterministic)
            return hidden
        for block in self.block:
            hidden = block(hidden, segment_ids, deterministic)
        return hidden

    def __call__(self, features: Array, deterministic: bool = True) -> Array:
        x = features
        for i, dense in enumerate(self.dense):
            if i or self.spec.input_dropout:
                x = self.drop(x, deterministic=deterministic)
            x = ACTIVATIONS[self.spec.activation](dense(x, deterministic))
        if self.norm is not None:
            x = self.norm(x)
        return self.out(self.drop(x, deterministic=deterministic), deterministic)

    def _init_all(self, hidden: Array) -> Array:
        # Pooled as the head pools, so the first layer's width is right (``cls_mean`` doubles it).
        how = "cls" if self.spec.pooling == "pooler" else self.spec.pooling
        return self(pool(self.transform(hidden, None, None), jnp.ones(hidden.shape[:2], jnp.int32), how))


def init_head(spec: HeadSpec, body_cfg: Any, rng: jax.Array) -> dict[str, Any]:
    """Fresh head params (float32), without touching the body."""
    dummy = jnp.zeros((1, 2, body_cfg.hidden_size), jnp.float32)
    init = jax.jit(lambda key: Head(spec, body_cfg).init(key, dummy, method=Head._init_all)["params"])
    return init(rng)

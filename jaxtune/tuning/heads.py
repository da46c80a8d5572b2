"""Added layers: a classification or regression head on a pretrained body.

The head reads the body's token states ``(B, T, D)``, optionally runs ``extra_blocks`` fresh
transformer blocks of the body's family, pools to ``(B, D)`` (``mean``, ``cls``, ``last`` real
token, or BERT's ``pooler``), optionally runs GELU layers of widths ``hidden``, and ends in a
linear ``out`` with ``num_outputs`` outputs (classification logits or regression values).
Its params live under ``head/``: ``head/block_i/...``, ``head/dense_i/...``, ``head/out/...``.

Two heads are exactly Hugging Face's, so they export to transformers and PEFT: last-token
pooling into a bias-free ``out`` on a decoder (``*ForSequenceClassification.score``) and the
pooler into ``out`` with bias on BERT (``BertForSequenceClassification.classifier``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.decoder import DecoderBlock, DecoderConfig
from jaxtune.models.encoder import EncoderBlock
from jaxtune.models.layers import Array, Linear, attention_mask
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


def head_spec(rule: Rule, body_cfg: Any, has_pooler: bool, where: str) -> HeadSpec:
    """Fill in a ``head`` rule's defaults for this body (``where`` names the rule in errors)."""
    decoder = isinstance(body_cfg, DecoderConfig)
    # A family may say which pooling its HF classifier uses (ViT: the final [CLS] state, not its pooler).
    pooling = rule.pooling or ("last" if decoder else getattr(body_cfg, "classifier_pooling", None)
                               or ("pooler" if has_pooler else "cls"))
    if pooling == "pooler" and not has_pooler:
        raise PlanError(f"{where}: pooling 'pooler' needs a BERT pooler, which this model has not; "
                        "use mean, cls or last")
    return HeadSpec(
        task=rule.task,
        num_outputs=rule.num_labels or (2 if rule.task == "classification" else 1),
        pooling=pooling,
        hidden=tuple(rule.hidden or ()),
        extra_blocks=rule.extra_blocks or 0,
        # HF's classifiers: BERT applies its hidden dropout before the classifier; decoders none.
        dropout=float(rule.dropout if rule.dropout is not None else (0.0 if decoder else body_cfg.hidden_dropout)),
        bias=bool(rule.bias if rule.bias is not None else not decoder),
    )


def hf_head_name(spec: HeadSpec, body_cfg: Any) -> str | None:
    """The transformers module that ``head/out`` is, when the head is exactly HF's; else None."""
    plain = not spec.hidden and not spec.extra_blocks
    if isinstance(body_cfg, DecoderConfig):
        return "score" if plain and spec.pooling == "last" and not spec.bias else None
    hf_pooling = getattr(body_cfg, "classifier_pooling", "pooler")
    return "classifier" if plain and spec.pooling == hf_pooling and spec.bias else None


class Head(nn.Module):
    """The head's layers. :meth:`transform` runs the extra blocks on ``(B, T, D)`` token states;
    ``__call__`` maps pooled features ``(B, D)`` to ``(B, num_outputs)``."""

    spec: HeadSpec
    body_cfg: Any  # DecoderConfig | EncoderConfig

    def setup(self) -> None:
        cfg, spec = self.body_cfg, self.spec
        decoder = isinstance(cfg, DecoderConfig)
        # Fresh blocks of the body's family (causal for decoders), initialised like HF's.
        self.block = [DecoderBlock(cfg, None) if decoder else EncoderBlock(cfg) for _ in range(spec.extra_blocks)]
        dt = cfg.compute_dtype
        self.dense = [Linear(w, use_bias=True, dtype=dt, param_dtype=jnp.float32) for w in spec.hidden]
        self.out = Linear(spec.num_outputs, use_bias=spec.bias, dtype=dt, param_dtype=jnp.float32)
        self.drop = nn.Dropout(spec.dropout)

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
        mask = attention_mask(segment_ids, causal=False)
        for block in self.block:
            hidden = block(hidden, mask, deterministic)
        return hidden

    def __call__(self, features: Array, deterministic: bool = True) -> Array:
        x = features
        for dense in self.dense:
            x = nn.gelu(dense(self.drop(x, deterministic=deterministic)), approximate=False)
        return self.out(self.drop(x, deterministic=deterministic))

    def _init_all(self, hidden: Array) -> Array:
        return self(self.transform(hidden, None, None)[:, 0])


def init_head(spec: HeadSpec, body_cfg: Any, rng: jax.Array) -> dict[str, Any]:
    """Fresh head params (float32), without touching the body."""
    dummy = jnp.zeros((1, 2, body_cfg.hidden_size), jnp.float32)
    init = jax.jit(lambda key: Head(spec, body_cfg).init(key, dummy, method=Head._init_all)["params"])
    return init(rng)

"""A reward model's side of preference training (``preference.method: reward``): each answer's score
from the scalar head, the Bradley-Terry loss of a paired batch on them, and the scores of a whole
source.

The model is a body with a scalar head (``{action: head, task: regression}``: exactly transformers'
``*ForSequenceClassification`` with ``num_labels=1``, as TRL trains it): a decoder pools each packed
segment's last token into a bias-free ``score``, an encoder (BERT, RoBERTa, DistilBERT, ModernBERT, DeBERTa)
its family's classifier pooling of the segment (the first token, BERT's pooler, or ModernBERT's mean).
The chosen answer's score should exceed the rejected one's by the pair's ``margins`` (optional, per
token, 0 by default). It needs no reference and no log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.training.preference_config import PreferenceConfig
from jaxtune.training.preference_logprobs import paired_rows, segment_sums
from jaxtune.training.preference_losses import pair_metrics, reward_terms, score_range_sums
from jaxtune.training.preference_tables import pair_table
from jaxtune.training.sharding import jit_on_mesh
from jaxtune.tuning.peft_io import pad_token_id
from jaxtune.tuning.tuned import Tuned

Array = jax.Array
Batch = dict[str, Array]
Params = dict[str, Any]


def reward_pad_id(model: Tuned) -> int | None:
    """The token a decoder reward model's pooling skips at the end of an answer: the ``pad_token_id``
    its export writes (:func:`jaxtune.tuning.peft_io.pad_token_id`), which transformers'
    ``*ForSequenceClassification`` (and so TRL's ``RewardTrainer``) pools before. A plain answer ends
    with EOS, often that id: the score is then the last answer token's. None for an encoder (its
    classifier reads the first token, the pooler, or the mean of the segment: nothing to skip)."""
    if not model.is_decoder:
        return None
    source = Path(model.source)
    return pad_token_id(model.hf_config, source if source.is_dir() else None)


def reward_scores(module: nn.Module, params: Params, rows: Batch, segments: int, *, pad_id: int | None = None,
                  deterministic: bool = True, rng: Array | None = None) -> Array:
    """float32 ``(R, S)``: the scalar head's score of each packed segment ``1..S`` of ``rows`` ``(R, L)``,
    arbitrary where a row has no such segment. ``pad_id``: tokens with this id are left out of the
    pooling (not of attention), as transformers pools the last token that is not ``pad_token_id``."""
    seg = rows["segment_ids"]
    pool_ids = None if pad_id is None else jnp.where(rows["input_ids"] == pad_id, 0, seg)
    out = module.apply({"params": params}, input_ids=rows["input_ids"], segment_ids=seg,
                       positions=rows.get("positions"), deterministic=deterministic, segments=segments,
                       pool_ids=pool_ids, rngs={"dropout": rng} if rng is not None else {})
    return out[..., 0].astype(jnp.float32)


def pair_rewards(model: Tuned, params: Params, batches: Iterable[Batch], size: int,
                 to_device: Callable[[Batch], Batch], *, sharding: Any = None) -> np.ndarray:
    """float32 ``(size, 2)``: the reward model ``model``'s (chosen, rejected) scores of each pair of a
    source of ``size`` pairs, from host paired batches with ``pair_ids`` (:func:`pair_table`; NaN for a
    pair no batch held). ``to_device`` places a batch as ``params`` are placed (without its host
    keys); ``sharding``: the batch's, on the params' mesh, or None off a mesh."""
    pad_id = reward_pad_id(model)

    def compute(params: Params, batch: Batch) -> Array:
        rows = paired_rows(batch)
        b, length = batch["segment_ids"].shape[0], batch["segment_ids"].shape[-1]
        return reward_scores(model.module, params, rows, length // 2, pad_id=pad_id).reshape(b, 2, length // 2)

    compute = jit_on_mesh(compute, getattr(sharding, "mesh", None), out_shardings=sharding)
    return pair_table(lambda batch: compute(params, to_device(batch)), batches, size, "scoring the pairs")


def reward_objective(config: PreferenceConfig, scores: Array, rows: Batch, pairs_shape: tuple[int, int],
                     margins: Array | None) -> tuple[Array, Array, dict[str, Array]]:
    """The reward model's loss of a paired batch from its scores.

    Args:
      config: the method (``reward``) and its ``center_rewards_coefficient``.
      scores: float32 ``(2B, S)``, each segment's score (rows interleaved chosen, rejected, ...).
      rows: the paired batch reshaped to ``(2B, L)``.
      pairs_shape: ``(B, S)``.
      margins: float ``(2B, L)``, each token's pair margin (read on the chosen row), or None (0).

    Returns:
      ``(loss_sum, pairs, outputs)`` as :func:`preference_objective`: ``outputs`` holds per-pair
      ``(B, S)`` ``chosen_rewards``, ``rejected_rewards`` (the scores), ``pair`` and the
      :func:`pair_metrics` and :func:`score_range_sums` sums under ``metrics``.
    """
    b, s = pairs_shape
    seg = rows["segment_ids"]
    real = (seg > 0).astype(jnp.float32)
    counts = segment_sums(real, seg, s).reshape(b, 2, s)
    pair = ((counts[:, 0] > 0) & (counts[:, 1] > 0)).astype(jnp.float32)
    both = scores.reshape(b, 2, s)
    chosen, rejected = both[:, 0], both[:, 1]
    margin = None
    if margins is not None:  # every token of a segment carries its pair's margin: their mean is it
        sums = segment_sums(margins.astype(jnp.float32) * real, seg, s).reshape(b, 2, s)
        margin = sums[:, 0] / jnp.maximum(counts[:, 0], 1.0)
    # Absent pairs pool an arbitrary (finite) token: weighed out here, they add nothing, gradient included.
    losses = reward_terms(chosen, rejected, margin, center_rewards_coefficient=config.center_rewards_coefficient)
    metrics = {**pair_metrics(chosen, rejected, None, None, pair), **score_range_sums(chosen, rejected, pair)}
    outputs = {"chosen_rewards": chosen, "rejected_rewards": rejected, "pair": pair, "metrics": metrics}
    return jnp.sum(losses * pair), pair.sum(), outputs


"""Losses as sums with their weights, so micro-batches and hosts combine them exactly.

Every loss returns ``(weighted_sum, weight_sum)``; the mean is taken once, over the whole
(accumulated, global) batch. That makes k micro-batches of b rows equal one batch of k*b rows,
and packed rows equal unpacked ones, whatever the number of real tokens in each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from jaxtune.data.packing import ANSWER_INDEX
from jaxtune.models.decoder import AUX, AUX_LOSS

Array = jax.Array


def causal_lm_loss(
    hidden: Array,
    targets: Array,
    weights: Array,
    project: Callable[[Array], Array],
    *,
    chunk_tokens: int = 2048,
) -> tuple[Array, Array]:
    """Token-weighted next-token cross-entropy, computed chunk by chunk over the vocabulary projection.

    Args:
      hidden: final hidden states ``(B, T, D)``.
      targets: int ``(B, T)``, the token each position predicts (already shifted).
      weights: float ``(B, T)``; 0 on prompt, padding and segment ends.
      project: hidden ``(N, D)`` -> logits ``(N, V)`` (the LM head).
      chunk_tokens: tokens per chunk. Only one chunk's float32 logits ``(chunk, V)`` exist at a
        time, forward and backward (each chunk is rematerialised), instead of ``(B*T, V)``.
        When all tokens fit in one chunk nothing is rematerialised.

    Returns:
      ``(sum of weight * CE, sum of weights)``, float32 scalars.
    """
    d = hidden.shape[-1]
    h, y, w = token_chunks((hidden.reshape(-1, d), targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)),
                      chunk_tokens)

    def chunk_loss(args: tuple[Array, Array, Array]) -> Array:
        h_c, y_c, w_c = args
        logits = project(h_c).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - picked) * w_c)

    if h.shape[0] == 1:
        # One chunk: rematerialising would recompute the vocabulary projection in the backward
        # pass for no memory saving (the backward holds logits and their gradient either way).
        return chunk_loss((h[0], y[0], w[0])), w.sum()
    return jax.lax.map(jax.checkpoint(chunk_loss), (h, y, w)).sum(), w.sum()


def answer_positions(rows: Mapping[str, Array]) -> Array | None:
    """int32 ``(R, K)``: the rows' supervised positions, ``rows["answer_index"]`` (the loader's
    :func:`jaxtune.data.packing.answer_index`), or None when the rows carry none or it is as wide as
    the rows (``K == T``: gathering would save nothing)."""
    index = rows.get(ANSWER_INDEX)
    return None if index is None or index.shape[-1] >= rows["targets"].shape[-1] else index


def at_positions(x: Array, index: Array) -> Array:
    """``x`` ``(R, T, ...)`` at ``index`` int ``(R, K)`` along its second axis: ``(R, K, ...)``
    (an index of -1 reads position 0; :func:`answer_rows` weighs those slots out)."""
    safe = jnp.maximum(index, 0).reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, safe, axis=1)


def answer_rows(rows: Mapping[str, Array]) -> dict[str, Array]:
    """The loss fields (``targets``, ``loss_weights``, ``segment_ids``) at the rows' supervised
    positions, ``(R, K)`` each with weight 0 and segment 0 on the index's -1 slots; the rows' own
    ``(R, T)`` fields when :func:`answer_positions` is None. A sum over positions of ``weight *
    f(target)`` (the LM loss, a segment's log-probability) is the same over either."""
    index = answer_positions(rows)
    if index is None:
        return {k: rows[k] for k in ("targets", "loss_weights", "segment_ids") if k in rows}
    real = index >= 0
    out = {"targets": at_positions(rows["targets"], index),
           "loss_weights": jnp.where(real, at_positions(rows["loss_weights"], index), 0)}
    if "segment_ids" in rows:
        out["segment_ids"] = jnp.where(real, at_positions(rows["segment_ids"], index), 0)
    return out


def answer_hidden(hidden: Array, rows: Mapping[str, Array]) -> Array:
    """The hidden states ``(R, T, D)`` at the rows' supervised positions, ``(R, K, D)``, aligned
    with :func:`answer_rows`; ``hidden`` itself when :func:`answer_positions` is None."""
    index = answer_positions(rows)
    return hidden if index is None else at_positions(hidden, index)


def token_chunks(flat: tuple[Array, ...], chunk_tokens: int) -> tuple[Array, ...]:
    """Each ``(N, ...)`` array split into ``ceil(N / chunk_tokens)`` equal chunks (zero-padded at the
    end, by fewer rows than there are chunks), ``(chunks, chunk, ...)``: the chunk is at most
    ``chunk_tokens`` and as small as that many chunks allow. Chunks of ``chunk_tokens`` itself would
    pad 2,560 tokens to 4,096 at 2,048 a chunk: 60% more LM-head work and (chunk, V) buffers."""
    n = flat[0].shape[0]
    chunks = -(-n // max(chunk_tokens, 1))
    chunk = -(-n // chunks)
    pad = chunks * chunk - n
    return tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:]) for x in flat)


def projected_columns(hidden: Array, project: Callable[[Array], Array], columns: Sequence[int], *,
                      chunk_tokens: int = 2048) -> Array:
    """The LM head's logits for a few vocabulary ``columns`` at every position, chunk by chunk.

    Args:
      hidden: final hidden states ``(B, T, D)``.
      project: hidden ``(N, D)`` -> logits ``(N, V)``.
      columns: token ids to keep (``C`` of them).
      chunk_tokens: tokens per chunk, as in :func:`causal_lm_loss` (the full ``(chunk, V)``
        logits exist one chunk at a time).

    Returns:
      float32 ``(B, T, C)``. Meant for evaluation (e.g. comparing answer choices); not
      rematerialised.
    """
    b, t, d = hidden.shape
    (h,) = token_chunks((hidden.reshape(-1, d),), chunk_tokens)
    cols = jnp.asarray(columns, jnp.int32)
    picked = jax.lax.map(lambda h_c: project(h_c).astype(jnp.float32)[:, cols], h)
    return picked.reshape(-1, len(columns))[:b * t].reshape(b, t, len(columns))


def classification_loss(logits: Array, labels: Array, weights: Array | None = None) -> tuple[Array, Array]:
    """Cross-entropy of ``logits`` ``(..., C)`` against int ``labels`` ``(...)`` (``(B,)``, or
    ``(B, S)`` for packed rows), weighted by ``weights`` shaped like ``labels``; returns (sum, weight)."""
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * w), w.sum()


def regression_loss(
    predictions: Array, targets: Array, weights: Array | None = None, *, kind: str = "mse", delta: float = 1.0
) -> tuple[Array, Array]:
    """Squared (``mse``) or Huber error of ``predictions`` ``(B,)`` or ``(B, 1)`` against float ``targets`` ``(B,)``
    (packed rows: ``(B, S)`` or ``(B, S, 1)`` against ``(B, S)``), weighted by ``weights`` shaped like ``targets``."""
    pred = predictions.reshape(targets.shape).astype(jnp.float32)
    err = pred - targets.astype(jnp.float32)
    if kind == "mse":
        per = err * err
    elif kind == "huber":
        abs_err = jnp.abs(err)
        per = jnp.where(abs_err <= delta, 0.5 * err * err, delta * (abs_err - 0.5 * delta))
    else:
        raise ValueError(f"regression loss {kind!r} is unknown; choose 'mse' or 'huber'")
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return jnp.sum(per * w), w.sum()


def auxiliary_loss(state: dict) -> Array:
    """The sum of the auxiliary losses a model sowed while training (flax ``sow`` into the
    :data:`~jaxtune.models.decoder.AUX` collection under the name ``AUX_LOSS``, at any depth; e.g. the
    MoE router's load-balancing loss): a float32 scalar, 0 when the model sowed none.

    Each is a *mean* over the forward's batch, like transformers' ``aux_loss``; the loss fn adds it to
    the task loss's weighted sum times the batch's weight, so the step's mean is ``task + aux``.
    """
    values = [v for path, leaf in flatten_dict(state.get(AUX, {})).items() if path[-1] == AUX_LOSS for v in leaf]
    return sum((jnp.asarray(v, jnp.float32).sum() for v in values), jnp.zeros((), jnp.float32))

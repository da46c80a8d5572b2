"""The log-probabilities the preference losses read: each token's under a language model, summed
per packed segment (one answer of a pair), for paired rows ``(2B, L)`` (chosen, rejected, chosen, ...).
The LM head is projected chunk by chunk, as the LM loss does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.data.packing import ANSWER_INDEX, LM_KEYS
from jaxtune.models.decoder import AUX
from jaxtune.training.losses import answer_hidden, answer_rows, auxiliary_loss, token_chunks

Array = jax.Array
Batch = dict[str, Array]
Params = dict[str, Any]


def token_logprobs(hidden: Array, targets: Array, project: Callable[[Array], Array] | None = None, *,
                   chunk_tokens: int = 2048) -> Array:
    """``log p(targets[b, t] | tokens <= t)`` at every position, float32 ``(B, T)``.

    Args:
      hidden: final hidden states ``(B, T, D)`` with ``project`` the LM head (hidden ``(N, D)`` ->
        logits ``(N, V)``), or, with ``project=None``, logits ``(B, T, V)`` themselves.
      targets: int ``(B, T)``, the token each position predicts (already shifted); positions
        that predict nothing may hold any valid id (weigh them out afterwards).
      chunk_tokens: with a ``project``, only one chunk's float32 logits ``(chunk, V)`` exist at a
        time, forward and backward (each chunk is rematerialised), as in
        :func:`jaxtune.training.losses.causal_lm_loss`.
    """
    b, t = targets.shape

    def picked(logits: Array, y: Array) -> Array:
        logits = logits.astype(jnp.float32)
        return jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    if project is None:
        return picked(hidden, targets)
    h, y = token_chunks((hidden.reshape(b * t, -1), targets.reshape(-1)), chunk_tokens)

    def chunk(args: tuple[Array, Array]) -> Array:
        return picked(project(args[0]), args[1])

    if h.shape[0] == 1:  # one chunk: rematerialising would save nothing (see causal_lm_loss)
        out = chunk((h[0], y[0]))
    else:
        out = jax.lax.map(jax.checkpoint(chunk), (h, y))
    return out.reshape(-1)[:b * t].reshape(b, t)


def segment_sums(values: Array, segment_ids: Array, num_segments: int) -> Array:
    """Per-segment sums of ``values`` float ``(R, T)``: float32 ``(R, num_segments)`` whose column
    ``j`` is segment ``j + 1`` (segment 0, padding, and ids above ``num_segments`` are left out)."""
    r = values.shape[0]
    seg = segment_ids.astype(jnp.int32)
    slot = jnp.where((seg >= 1) & (seg <= num_segments), seg - 1, num_segments)  # spill bin, dropped below
    flat = (jnp.arange(r, dtype=jnp.int32)[:, None] * (num_segments + 1) + slot).reshape(-1)
    sums = jax.ops.segment_sum(values.astype(jnp.float32).reshape(-1), flat, num_segments=r * (num_segments + 1))
    return sums.reshape(r, num_segments + 1)[:, :num_segments]


def sequence_logprobs(hidden: Array, targets: Array, loss_weights: Array, segment_ids: Array,
                      project: Callable[[Array], Array] | None = None, *, max_segments: int | None = None,
                      chunk_tokens: int = 2048) -> tuple[Array, Array]:
    """Summed log-probabilities of each segment's answer tokens, for packed or padded LM rows.

    Args:
      hidden: hidden states ``(R, T, D)`` with ``project`` the LM head, or logits ``(R, T, V)``
        with ``project=None`` (see :func:`token_logprobs`).
      targets: int ``(R, T)``, shifted next tokens (the data contract's ``targets``).
      loss_weights: float ``(R, T)``, 1 where the target is an answer token, 0 elsewhere
        (prompt, padding, segment ends).
      segment_ids: int ``(R, T)``: 1, 2, ... per packed example, 0 on padding.
      max_segments: segments per row ``S`` (static); default ``T // 2`` (a segment holding an
        answer token has at least two tokens).
      chunk_tokens: vocabulary-projection chunk, as in :func:`token_logprobs`.

    Returns:
      ``(logps, counts)``, float32 ``(R, S)`` each: column ``j`` is segment ``j + 1``'s sum of
      ``weight * log p(target)`` and its summed weight (answer tokens); 0 for absent segments.
    """
    s = targets.shape[1] // 2 if max_segments is None else max_segments
    w = loss_weights.astype(jnp.float32)
    lp = token_logprobs(hidden, targets, project, chunk_tokens=chunk_tokens)
    return segment_sums(lp * w, segment_ids, s), segment_sums(w, segment_ids, s)


def next_token_mask(segment_ids: Array) -> Array:
    """float32 ``(R, T)``: 1 where position ``t`` predicts a token of its own segment (every real
    token but each segment's last), the positions a full-sequence NLL averages over."""
    seg = segment_ids
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    return jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)


def paired_rows(batch: Batch) -> Batch:
    """Paired ``(B, 2, L)`` arrays -> ``(2B, L)`` rows, chosen and rejected interleaved (the answer
    index ``(B, 2, K)`` likewise)."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in (*LM_KEYS, ANSWER_INDEX) if k in batch}


def policy_token_logprobs(module: nn.Module, params: Params, rows: Batch, *, deterministic: bool = True,
                          rng: Array | None = None, chunk_tokens: int = 2048, with_aux: bool = False,
                          answers: bool = False) -> Array | tuple[Array, Array]:
    """float32 ``(R, T)`` log-probs of ``rows["targets"]`` under ``module`` with ``params``: an LM
    module with ``hidden``/``logits`` methods (a jaxtune ``Decoder`` or ``TunedModel``). With
    ``answers``, those at the rows' supervised positions only, ``(R, K)``, aligned with
    :func:`jaxtune.training.losses.answer_rows` (the LM head then projects ``K`` positions a row, not
    ``T``; the same when the rows carry no narrower answer index). With ``with_aux``, also the
    float32 scalar sum of the auxiliary losses the forward sowed (a mixture-of-experts router's
    load-balancing loss over these rows: :func:`auxiliary_loss`)."""
    variables = {"params": params}
    rngs = {"dropout": rng} if rng is not None else {}
    out = module.apply(variables, input_ids=rows["input_ids"], positions=rows.get("positions"),
                       segment_ids=rows.get("segment_ids"), deterministic=deterministic, method="hidden", rngs=rngs,
                       mutable=[AUX] if with_aux else False)
    hidden, state = out if with_aux else (out, {})

    def project(h: Array) -> Array:
        return module.apply(variables, h, method="logits")

    if answers:
        hidden, targets = answer_hidden(hidden, rows), answer_rows(rows)["targets"]
    else:
        targets = rows["targets"]
    lp = token_logprobs(hidden, targets, project, chunk_tokens=chunk_tokens)
    return (lp, auxiliary_loss(state)) if with_aux else lp


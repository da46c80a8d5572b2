"""Preference training of a language model (DPO, conservative DPO, IPO, SimPO, ORPO), and of a reward model
(``reward``: Bradley-Terry on a scalar head's scores, TRL's ``RewardTrainer``): the loss of a paired batch
(:func:`make_preference_loss_fn`).

Its parts: the method and its checks (:mod:`jaxtune.training.preference_config`), the log-probabilities
the losses read (:mod:`jaxtune.training.preference_logprobs`), the reference model in the step or cached
(:mod:`jaxtune.training.preference_reference`), a reward model's scores and loss
(:mod:`jaxtune.training.reward_model`), and the losses themselves, pure functions of per-pair sequence
log-probabilities (the methods' formulas, their rewards and the metrics TRL logs,
:mod:`jaxtune.training.preference_losses`).

The model side (:func:`make_preference_loss_fn`) reads a *paired batch*: the LM batch contract
(``input_ids``, ``targets``, ``loss_weights``, ``segment_ids``, ``positions``) with every array
shaped ``(B, 2, L)``: ``[:, 0]`` holds chosen answers, ``[:, 1]`` the rejected ones, and segment
``s`` of a chosen row pairs with segment ``s`` of the rejected row beside it. A row may pack
several pairs (segments 1, 2, ...); ``loss_weights`` mark the answer tokens. Keeping the pair on
axis 1 means data sharding and micro-batching (both split axis 0) never separate a pair.

A mixture-of-experts policy adds its router's load-balancing loss over the pairs' chosen and
rejected rows (``MoeConfig.router_aux_loss_coef``: config.json's, or ``model.router_aux_loss_coef``,
times transformers' ``aux_loss``), as the LM loss does and as TRL's DPOTrainer does: the step's mean is
the preference loss plus that term. The reference pass adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.data.preference import MARGINS
from jaxtune.training.losses import answer_rows
from jaxtune.training.preference_config import REWARD, PreferenceConfig
from jaxtune.training.preference_logprobs import next_token_mask, paired_rows, policy_token_logprobs, segment_sums
from jaxtune.training.preference_losses import dpo_terms, ipo_terms, orpo_terms, pair_metrics, simpo_terms
from jaxtune.training.preference_reference import REFERENCE_KEY, reference_logprobs
from jaxtune.training.reward_model import reward_objective, reward_scores

Array = jax.Array
Batch = dict[str, Array]
Params = dict[str, Any]


def preference_objective(config: PreferenceConfig, token_lp: Array, rows: Batch, pairs_shape: tuple[int, int],
                         reference: Array | None) -> tuple[Array, Array, dict[str, Array]]:
    """The loss of a paired batch from the policy's token log-probs.

    Args:
      config: the method.
      token_lp: float32 ``(2B, L)`` policy log-probs of ``rows["targets"]`` (rows interleaved
        chosen, rejected, chosen, ...).
      rows: the paired batch reshaped to ``(2B, L)``.
      pairs_shape: ``(B, S)``.
      reference: float32 ``(B, 2, S)`` reference log-probs (DPO/IPO), else None.

    Returns:
      ``(loss_sum, pairs, outputs)``: the summed loss over real pairs and their number (the step
      divides one by the other, so micro-batches add up), and ``outputs``: per-pair ``(B, S)``
      arrays ``chosen_logps``, ``rejected_logps``, ``chosen_rewards``, ``rejected_rewards``,
      ``pair`` (1 for real pairs) and the :func:`pair_metrics` sums under ``metrics``.
    """
    b, s = pairs_shape
    w = rows["loss_weights"].astype(jnp.float32)
    logps = segment_sums(token_lp * w, rows["segment_ids"], s).reshape(b, 2, s)
    counts = segment_sums(w, rows["segment_ids"], s).reshape(b, 2, s)
    chosen, rejected, n_c, n_r = logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1]
    pair = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
    beta, method = config.beta_value, config.method
    if method in ("dpo", "ipo"):
        ref_c, ref_r = jax.lax.stop_gradient(reference[:, 0]), jax.lax.stop_gradient(reference[:, 1])
        if method == "dpo":
            losses, cr, rr = dpo_terms(chosen, rejected, ref_c, ref_r, beta=beta,
                                       label_smoothing=config.label_smoothing)
        else:
            losses, cr, rr = ipo_terms(chosen, rejected, ref_c, ref_r, n_c, n_r, beta=beta)
        shown = (chosen, rejected)
    else:
        # Absent pairs get a harmless mean log-prob: ORPO's log(1 - e^0) would be -inf there, and a NaN
        # masked out by `where` still poisons the gradient.
        mean_c = jnp.where(pair > 0, chosen / jnp.maximum(n_c, 1.0), -1.0)
        mean_r = jnp.where(pair > 0, rejected / jnp.maximum(n_r, 1.0), -1.0)
        shown = (mean_c, mean_r)
        if method == "simpo":
            losses, cr, rr = simpo_terms(mean_c, mean_r, beta=beta, gamma=config.gamma,
                                         label_smoothing=config.label_smoothing)
        else:
            losses, cr, rr, _ = orpo_terms(mean_c, mean_r, beta=beta)
    losses = losses * pair
    n_pairs = pair.sum()
    total = jnp.sum(losses)
    if method == "orpo":
        # TRL's ORPO adds the NLL averaged over every real token of the chosen rows (prompt and
        # answer). As a sum over pairs: pairs * token-mean, so loss_sum / pairs is TRL's loss for a
        # batch; across micro-batches it is their pair-weighted mean, as with TRL's accumulation.
        chosen_rows = jnp.arange(token_lp.shape[0]) % 2 == 0
        every = next_token_mask(rows["segment_ids"]) * chosen_rows[:, None]
        nll = -jnp.sum(token_lp * every) / jnp.maximum(every.sum(), 1.0)
        total = total + n_pairs * nll
    outputs = {"chosen_logps": shown[0], "rejected_logps": shown[1], "chosen_rewards": cr, "rejected_rewards": rr,
               "pair": pair, "metrics": pair_metrics(cr, rr, *shown, pair)}
    return total, n_pairs, outputs


def make_preference_loss_fn(module: nn.Module, config: PreferenceConfig, *, chunk_tokens: int = 2048,
                            pad_id: int | None = None
                            ) -> Callable[[Params, Batch, Array, bool], tuple[Array, Array, dict[str, Array]]]:
    """The preference loss as a :data:`jaxtune.training.step.LossFn` of the full params.

    ``loss_fn(params, batch, rng, deterministic) -> (loss_sum, pairs, outputs)`` for a paired batch
    (module docstring); see :func:`preference_objective` for the outputs. DPO/IPO read the
    reference log-probs from ``batch["reference_logps"]`` ``(B, 2, S)`` when present (cached),
    else compute them in the same step with :func:`reference_params` (adapters off; starting values
    of other trained leaves from ``params[REFERENCE_KEY]`` when present), deterministically and
    without gradient. ``params[REFERENCE_KEY]`` is removed before the module sees the params.
    ``reward`` scores the pairs with the module's scalar head instead (:func:`reward_objective`;
    the margins from ``batch["margins"]`` when present; ``pad_id`` as :func:`reward_scores`, the
    model's :func:`reward_pad_id`).
    """

    def loss_fn(params: Params, batch: Batch, rng: Array, deterministic: bool) -> tuple[Array, Array, dict[str, Array]]:
        params = dict(params)
        starting = params.pop(REFERENCE_KEY, None)
        rows = paired_rows(batch)
        b, length = batch["targets"].shape[0], batch["targets"].shape[-1]
        s = length // 2 if config.max_segments is None else config.max_segments
        if config.method == REWARD:
            scores = reward_scores(module, params, rows, s, pad_id=pad_id, rng=rng,
                                   deterministic=deterministic or config.disable_dropout)
            margins = batch.get(MARGINS)
            margins = None if margins is None else margins.reshape(-1, length)
            return reward_objective(config, scores, rows, (b, s), margins)
        answers = config.answers_only  # not ORPO, whose NLL term reads every token's log-prob
        token_lp, aux = policy_token_logprobs(module, params, rows, rng=rng,
                                              deterministic=deterministic or config.disable_dropout,
                                              chunk_tokens=chunk_tokens, with_aux=True, answers=answers)
        reference = None
        if config.needs_reference:
            reference = batch.get("reference_logps")
            if reference is None:
                reference = reference_logprobs(module, params, batch, starting=starting, max_segments=s,
                                               chunk_tokens=chunk_tokens)
        total, pairs, outputs = preference_objective(config, token_lp, answer_rows(rows) if answers else rows,
                                                     (b, s), reference)
        # As the LM loss (and TRL's DPOTrainer with a router loss): a training step's mean is loss + aux;
        # an evaluation reports the preference loss alone.
        return (total if deterministic else total + aux * pairs), pairs, outputs

    return loss_fn


"""Preference losses (DPO, conservative DPO, IPO, SimPO, ORPO) on sequence log-probabilities, and
the Bradley-Terry loss of a reward model on its scores.

Pure loss functions take per-pair sequence log-probabilities (or, ``reward``, the reward model's
scores) of any shape (one entry per pair of answers) and return ``(loss, metrics)``: the mean
loss over the pairs ``mask`` keeps, and the means TRL logs (``rewards/chosen``,
``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``, ``logps/chosen``, ``logps/rejected``).
The formulas are TRL 1.x's:

=========  ==========================================================================  ===========
method     loss per pair (``Δ`` = chosen minus rejected)                               reference
=========  ==========================================================================  ===========
``dpo``    ``-(1-ε) logσ(βΔ) - ε logσ(-βΔ)``, ``Δ`` of log-ratios to the reference     yes
           (``ε`` = ``label_smoothing``: conservative DPO; 0 is plain sigmoid DPO)
``ipo``    ``(Δ - 1/(2β))²``, ``Δ`` of log-ratios each divided by its answer length    yes
``simpo``  ``-(1-ε) logσ(βΔ - γ) - ε logσ(-(βΔ - γ))``, ``Δ`` of mean log-probs         no
``orpo``   ``NLL(chosen) - β logσ(log odds(chosen) - log odds(rejected))``,           no
           odds of mean log-probs ``p``: ``log p - log(1 - e^p)``
``reward`` ``-logσ(r_c - r_r - m) + c (r_c + r_r)²``, ``r`` the reward model's scores,  no
           ``m`` the pair's margin (0 without one), ``c`` ``center_rewards_coefficient``
=========  ==========================================================================  ===========

Rewards are ``β`` times what the loss compares (log-ratios for DPO/IPO, mean log-probs for
SimPO/ORPO), as TRL reports them, and a reward model's scores themselves (TRL's
``RewardTrainer``); accuracy is the share of pairs whose chosen reward is higher.

No model here: the log-probabilities these losses read, the reference model and the loss of a paired
batch are :mod:`jaxtune.training.preference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]


def _log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x < 0``, switching formulas at ``-log 2`` to avoid cancellation."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _smoothed_sigmoid(z: Array, label_smoothing: float) -> Array:
    """``-(1-ε) logσ(z) - ε logσ(-z)``: the sigmoid loss with labels flipped with probability ε."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _pair_mask(like: Array, mask: Array | None) -> Array:
    return jnp.ones(like.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1.0)


def pair_metrics(chosen_rewards: Array, rejected_rewards: Array, chosen_logps: Array | None,
                 rejected_logps: Array | None, mask: Array) -> Metrics:
    """Sums over the pairs in ``mask`` (float ``(...)``) of the quantities TRL logs, plus ``pairs``
    (their count); divide by ``pairs`` for means. Sums, so micro-batches and hosts add up. A reward
    model has no log-probs (``chosen_logps`` None): its sums are the ``rewards/`` ones alone.

    ``logps/accuracy`` (not a TRL metric) counts the pairs whose chosen answer the model itself
    finds more likely (higher ``chosen_logps``): unlike ``rewards/accuracy``, which is 0 for the
    untrained policy (every reward is 0 when policy == reference), it scores the base model too.
    """
    cr, rr = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    total = lambda x: jnp.sum(jax.lax.stop_gradient(x).astype(jnp.float32) * mask)  # noqa: E731
    sums = {"pairs": mask.sum(), "rewards/chosen": total(cr), "rewards/rejected": total(rr),
            "rewards/margin": total(cr - rr), "rewards/accuracy": total((cr > rr).astype(jnp.float32))}
    if chosen_logps is not None:
        sums.update({"logps/chosen": total(chosen_logps), "logps/rejected": total(rejected_logps),
                     "logps/accuracy": total((chosen_logps > rejected_logps).astype(jnp.float32))})
    return sums


def score_range_sums(chosen_rewards: Array, rejected_rewards: Array, mask: Array) -> Metrics:
    """A reward model's ``rewards/min``, ``rewards/mean``, ``rewards/max`` (TRL's ``RewardTrainer``
    ``min_reward``, ``mean_reward``, ``max_reward``) over the scores of both answers of the pairs in
    ``mask`` (float ``(...)``), as sums over those pairs like :func:`pair_metrics`: the mean's sum is
    that of ``(r_c + r_r) / 2``, the min's and max's the batch's extreme times its pairs. Divided by
    the pairs they give the batch's min, mean and max; over several batches (micro-batches, a log
    window, an evaluation) the pair-weighted mean of each batch's, which is TRL's mean of its
    per-batch figures when the batches hold as many pairs."""
    c = jax.lax.stop_gradient(chosen_rewards).astype(jnp.float32)
    r = jax.lax.stop_gradient(rejected_rewards).astype(jnp.float32)
    real, n = mask > 0, mask.sum()
    low = jnp.min(jnp.where(real, jnp.minimum(c, r), jnp.inf))
    high = jnp.max(jnp.where(real, jnp.maximum(c, r), -jnp.inf))
    # no pair: the extremes are +-inf, and inf * 0 would be NaN
    return {"rewards/min": jnp.where(n > 0, low * n, 0.0), "rewards/mean": jnp.sum((c + r) * 0.5 * mask),
            "rewards/max": jnp.where(n > 0, high * n, 0.0)}


def mean_metrics(sums: Metrics) -> Metrics:
    """:func:`pair_metrics` sums -> means over the pairs (``pairs`` itself kept as a count)."""
    n = jnp.maximum(sums["pairs"], 1.0)
    return {k: v if k == "pairs" else v / n for k, v in sums.items()}


def _result(losses: Array, rewards: tuple[Array, Array], logps: tuple[Array | None, Array | None], mask: Array | None,
            extra: Metrics | None = None) -> tuple[Array, Metrics]:
    m = _pair_mask(losses, mask)
    metrics = mean_metrics(pair_metrics(*rewards, *logps, m))
    metrics.update(extra or {})
    return _masked_mean(losses, m), metrics


def dpo_terms(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
              beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
    """Per-pair DPO losses and the chosen/rejected rewards ``β (logp - ref logp)``; any shape, float32."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio, beta * rejected_ratio


def dpo_loss(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
             beta: float = 0.1, label_smoothing: float = 0.0, mask: Array | None = None) -> tuple[Array, Metrics]:
    """Sigmoid DPO (Rafailov et al. 2023); with ``label_smoothing`` ε > 0 conservative DPO (cDPO).

    Args:
      chosen_logps, rejected_logps: float ``(...)``, the policy's summed answer log-probs per pair.
      ref_chosen_logps, ref_rejected_logps: the same under the reference model (no gradient flows
        into them by construction of the caller; they are treated as constants here too).
      beta: inverse temperature of the implicit reward.
      label_smoothing: ε in [0, 0.5): the assumed probability that a preference label is flipped.
      mask: float/bool ``(...)``, 1 for real pairs (default all).

    Returns:
      ``(mean loss over the masked pairs, metrics)`` (see the module docstring).
    """
    ref_c, ref_r = jax.lax.stop_gradient(ref_chosen_logps), jax.lax.stop_gradient(ref_rejected_logps)
    losses, cr, rr = dpo_terms(chosen_logps, rejected_logps, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
    return _result(losses, (cr, rr), (chosen_logps, rejected_logps), mask)


def ipo_terms(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
              chosen_lengths: Array, rejected_lengths: Array, *, beta: float = 0.1) -> tuple[Array, Array, Array]:
    """Per-pair IPO losses and rewards (rewards as DPO's: ``β`` times the summed log-ratio)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    # TRL divides each log-ratio by its answer length (confirmed with the IPO authors, says TRL), so
    # β means the same for short and long answers.
    delta = chosen_ratio / jnp.maximum(chosen_lengths, 1.0) - rejected_ratio / jnp.maximum(rejected_lengths, 1.0)
    return (delta - 1.0 / (2.0 * beta)) ** 2, beta * chosen_ratio, beta * rejected_ratio


def ipo_loss(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             chosen_lengths: Array, rejected_lengths: Array, *, beta: float = 0.1,
             mask: Array | None = None) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023), length-normalised as in TRL.

    Args as :func:`dpo_loss`, plus ``chosen_lengths``/``rejected_lengths`` float ``(...)``: answer
    tokens per sequence. ``beta`` is the paper's τ.
    """
    ref_c, ref_r = jax.lax.stop_gradient(ref_chosen_logps), jax.lax.stop_gradient(ref_rejected_logps)
    losses, cr, rr = ipo_terms(chosen_logps, rejected_logps, ref_c, ref_r, chosen_lengths, rejected_lengths,
                               beta=beta)
    return _result(losses, (cr, rr), (chosen_logps, rejected_logps), mask)


def simpo_terms(chosen_mean_logps: Array, rejected_mean_logps: Array, *, beta: float = 2.0, gamma: float = 0.5,
                label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
    """Per-pair SimPO losses and rewards ``β * mean logp``."""
    losses = _smoothed_sigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma, label_smoothing)
    return losses, beta * chosen_mean_logps, beta * rejected_mean_logps


def simpo_loss(chosen_mean_logps: Array, rejected_mean_logps: Array, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, mask: Array | None = None) -> tuple[Array, Metrics]:
    """SimPO (Meng et al. 2024), reference-free: TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``.

    Args:
      chosen_mean_logps, rejected_mean_logps: float ``(...)``, answer log-probs averaged over the
        answer's tokens (TRL's ``average_log_prob=True``).
      beta: reward scale (the paper uses 2 to 2.5; TRL's CPOConfig defaults to 0.1).
      gamma: target reward margin γ, in reward units (TRL's ``simpo_gamma``; the sigmoid reads
        ``βΔ - γ``).
      label_smoothing, mask: as :func:`dpo_loss`.
    """
    losses, cr, rr = simpo_terms(chosen_mean_logps, rejected_mean_logps, beta=beta, gamma=gamma,
                                 label_smoothing=label_smoothing)
    return _result(losses, (cr, rr), (chosen_mean_logps, rejected_mean_logps), mask)


def orpo_terms(chosen_mean_logps: Array, rejected_mean_logps: Array, *, beta: float = 0.1
               ) -> tuple[Array, Array, Array, Array]:
    """Per-pair ORPO odds-ratio losses ``-β logσ(log odds ratio)`` (without the NLL term), the rewards
    ``β * mean logp``, and the log odds ratio itself."""
    c, r = chosen_mean_logps.astype(jnp.float32), rejected_mean_logps.astype(jnp.float32)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -beta * jax.nn.log_sigmoid(log_odds), beta * c, beta * r, log_odds


def orpo_loss(chosen_mean_logps: Array, rejected_mean_logps: Array, chosen_nll: Array, *, beta: float = 0.1,
              mask: Array | None = None) -> tuple[Array, Metrics]:
    """ORPO (Hong et al. 2024), reference-free: ``chosen_nll - β mean logσ(log odds ratio)``.

    Args:
      chosen_mean_logps, rejected_mean_logps: float ``(...)``, mean answer log-probs (each < 0).
      chosen_nll: float scalar, the supervised term: TRL averages the next-token NLL over every
        real token of the chosen sequences, prompt and answer (see :func:`make_preference_loss_fn`).
      beta: weight λ of the odds-ratio term.
      mask: as :func:`dpo_loss`.

    Metrics add ``log_odds_ratio`` (mean ``logσ(log odds)``), ``log_odds_chosen`` (mean log odds)
    and ``nll_loss``, as TRL logs them.
    """
    losses, cr, rr, log_odds = orpo_terms(chosen_mean_logps, rejected_mean_logps, beta=beta)
    m = _pair_mask(losses, mask)
    extra = {"log_odds_ratio": _masked_mean(jax.nn.log_sigmoid(log_odds), m),
             "log_odds_chosen": _masked_mean(log_odds, m), "nll_loss": jnp.asarray(chosen_nll, jnp.float32)}
    loss, metrics = _result(losses, (cr, rr), (chosen_mean_logps, rejected_mean_logps), mask, extra)
    return chosen_nll + loss, metrics


def reward_terms(chosen_rewards: Array, rejected_rewards: Array, margin: Array | None = None, *,
                 center_rewards_coefficient: float | None = None) -> Array:
    """Per-pair Bradley-Terry losses of a reward model, any shape, float32: TRL's ``RewardTrainer``
    loss ``-logσ(r_c - r_r - margin)`` plus ``c (r_c + r_r)²`` (its batch mean is TRL's
    ``c * mean((r_c + r_r)**2)``, which keeps the scores centred on 0)."""
    c, r = chosen_rewards.astype(jnp.float32), rejected_rewards.astype(jnp.float32)
    z = c - r if margin is None else c - r - margin.astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(z)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (c + r) ** 2
    return losses


def reward_loss(chosen_rewards: Array, rejected_rewards: Array, *, margin: Array | None = None,
                center_rewards_coefficient: float | None = None, mask: Array | None = None) -> tuple[Array, Metrics]:
    """The reward model's loss (Bradley-Terry, as TRL's ``RewardTrainer``) on its scores.

    Args:
      chosen_rewards, rejected_rewards: float ``(...)``, the scalar head's score of each answer.
      margin: float ``(...)``, how much higher the chosen score should be (TRL's ``margin`` column);
        None: 0.
      center_rewards_coefficient: weight of the centring term (TRL's ``center_rewards_coefficient``),
        or None for none.
      mask: as :func:`dpo_loss`.

    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy``
    (TRL's ``accuracy`` and ``margin``), the scores' means over the pairs, and ``rewards/min``,
    ``rewards/mean``, ``rewards/max`` over both answers' scores (:func:`score_range_sums`).
    """
    losses = reward_terms(chosen_rewards, rejected_rewards, margin,
                          center_rewards_coefficient=center_rewards_coefficient)
    m = _pair_mask(losses, mask)
    ranges = mean_metrics({"pairs": m.sum(), **score_range_sums(chosen_rewards, rejected_rewards, m)})
    return _result(losses, (chosen_rewards, rejected_rewards), (None, None), mask,
                   {k: v for k, v in ranges.items() if k != "pairs"})

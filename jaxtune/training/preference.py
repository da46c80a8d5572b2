"""Preference training of a language model (DPO, conservative DPO, IPO, SimPO, ORPO), and of a reward model
(``reward``: Bradley-Terry on a scalar head's scores, TRL's ``RewardTrainer``): the log-probabilities the
losses read, the reference model, and the loss of a paired batch.

The losses themselves, pure functions of per-pair sequence log-probabilities (the methods' formulas,
their rewards and the metrics TRL logs), are :mod:`jaxtune.training.preference_losses`.

The model side (:func:`make_preference_loss_fn`) reads a *paired batch*: the LM batch contract
(``input_ids``, ``targets``, ``loss_weights``, ``segment_ids``, ``positions``) with every array
shaped ``(B, 2, L)``: ``[:, 0]`` holds chosen answers, ``[:, 1]`` the rejected ones, and segment
``s`` of a chosen row pairs with segment ``s`` of the rejected row beside it. A row may pack
several pairs (segments 1, 2, ...); ``loss_weights`` mark the answer tokens. Keeping the pair on
axis 1 means data sharding and micro-batching (both split axis 0) never separate a pair.

The reference model of DPO/IPO is the run's starting model: the policy's own module evaluated on
:func:`reference_params`, the same param tree without adapter leaves (LoRA/DoRA off), with the
starting values of whatever started trained laid over it (full or partial plans; adapters a run
starts from, e.g. SFT's). Dropping leaves builds a new dict of the *same* arrays, so
for adapter plans the reference costs no memory beyond activations: one copy of the base
weights serves both passes. (Zeroing ``lora_scale`` would also share the base, but still runs
the adapter matmuls and leaves DoRA's magnitude rescaling on, so it is not the base for DoRA.)
For full or partial fine-tuning the reference needs the starting values of the trained leaves
(:func:`starting_weights`, one extra copy of those leaves, matrices in the compute dtype), or reference
log-probs computed once ahead of training and carried in the batch as ``reference_logps``
(:class:`ReferenceCache`, ``PreferenceConfig(reference="cached")``).

A reward model (``method="reward"``) is the same paired batch through a model with a scalar head
(``{action: head, task: regression}``: a decoder's last token into a bias-free ``score``, exactly
transformers' ``*ForSequenceClassification`` with ``num_labels=1``, as TRL trains it): each packed
segment's last token is pooled and scored, and the chosen answer's score should exceed the
rejected one's by the pair's ``margins`` (optional, per token, 0 by default). It needs no
reference and no log-probabilities.

A mixture-of-experts policy adds its router's load-balancing loss over the pairs' chosen and
rejected rows (``router_aux_loss_coef`` times transformers' ``aux_loss``), as the LM loss does and
as TRL's DPOTrainer does for a model with router logits: the step's mean is the preference loss
plus that term. The reference pass adds nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxtune import processes
from jaxtune.data.pipeline import Loader, evaluation_loader
from jaxtune.data.preference import MARGINS, PAIR_IDS
from jaxtune.data.sources import PREFERENCE
from jaxtune.models.decoder import AUX
from jaxtune.models.layers import ADAPTER_LEAVES, LORA_B, VECTOR_LEAVES
from jaxtune.training.evaluate import in_lockstep
from jaxtune.training.losses import auxiliary_loss, token_chunks
from jaxtune.training.preference_losses import (
    dpo_terms,
    ipo_terms,
    orpo_terms,
    pair_metrics,
    reward_terms,
    score_range_sums,
    simpo_terms,
)
from jaxtune.training.sharding import jit_on_mesh
from jaxtune.tuning.partition import combine
from jaxtune.tuning.peft_io import pad_token_id
from jaxtune.tuning.tuned import Tuned

Array = jax.Array
Batch = dict[str, Array]
Params = dict[str, Any]
log = logging.getLogger(__name__)

METHODS = ("dpo", "ipo", "simpo", "orpo", "reward")
REFERENCE_FREE = ("simpo", "orpo", "reward")
REWARD = "reward"  # the method that trains a reward model (a scalar head) rather than a language model

# Where a loss function finds the starting values of trained non-adapter leaves inside ``params``
# (the trainer puts them in the frozen part; the loss pops them before applying the module).
REFERENCE_KEY = "reference_start"
LM_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


# ----------------------------------------------------------------------------- log-probabilities


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


# ----------------------------------------------------------------------------- reference model


def reference_params(params: Params, starting: Params | None = None) -> Params:
    """The reference model's params: ``params`` without adapter leaves (LoRA/DoRA switched off),
    with ``starting`` (the starting values of trained leaves, if any) laid over them. Modules whose
    adapters ``starting`` holds (a run that starts from trained adapters) keep their other adapter
    leaves (``lora_scale``): their reference is the starting adapter, not the bare base.

    Builds a new nested dict of the same leaf arrays: nothing is copied, so the reference shares
    every base weight with the policy, inside or outside ``jit``.
    """
    start = flatten_dict(starting or {})
    restarted = {path[:-1] for path in start if path[-1] in ADAPTER_LEAVES}
    flat = {path: leaf for path, leaf in flatten_dict(params).items()
            if path[-1] not in ADAPTER_LEAVES or path[:-1] in restarted}
    flat.update(start)
    return unflatten_dict(flat)


def adapters_trained(trainable: Params) -> bool:
    """Whether any adapter has left its initial state: ``lora_b`` starts at zero (LoRA and DoRA), so
    an adapter with an all-zero ``lora_b`` adds nothing and the model is its base there."""
    return any(bool(jnp.any(leaf != 0)) for path, leaf in flatten_dict(trainable).items() if path[-1] == LORA_B)


def starting_weights(trainable: Params, dtype: Any | None = None, *, keep_adapters: bool | None = None) -> Params:
    """What the reference model (the starting model) needs besides the frozen part: a copy of the
    trainable leaves, the weight matrices in ``dtype`` (e.g. the compute dtype, which every layer rounds
    them to before use) or their own, the :data:`~jaxtune.models.layers.VECTOR_LEAVES` (gains, biases)
    in their own: norms read their float32 gain (GPT-2's LayerNorm, Gemma's ``1 + w``), so a rounded
    gain would make the reference another model than the starting policy. Adapter leaves are copied
    only when the adapters are trained (``keep_adapters``, default :func:`adapters_trained`, which
    reads values, so pass it inside ``jit``: a run that starts from SFT adapters); fresh ones are the
    base itself, which the frozen part already is. Empty for a plan of fresh LoRA/DoRA adapters only."""
    keep_adapters = adapters_trained(trainable) if keep_adapters is None else keep_adapters

    def copy(path: tuple[str, ...], leaf: Array) -> Array:
        return jnp.array(leaf, dtype=leaf.dtype if path[-1] in VECTOR_LEAVES else dtype or leaf.dtype, copy=True)

    flat = {path: copy(path, leaf) for path, leaf in flatten_dict(trainable).items()
            if keep_adapters or path[-1] not in ADAPTER_LEAVES}
    return unflatten_dict(flat)


# ----------------------------------------------------------------------------- the model's loss


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Which preference loss, and its constants.

    Attributes:
      method: ``dpo``, ``ipo``, ``simpo`` or ``orpo`` (see the module docstring), or ``reward``: a
        reward model, the plan's scalar head (``{action: head, task: regression}``) trained with
        the Bradley-Terry loss.
      beta: β; None takes the method's usual default (:data:`DEFAULT_BETA`); ``reward`` has none.
      label_smoothing: ε for ``dpo`` (conservative DPO) and ``simpo``; 0 otherwise.
      gamma: SimPO's target reward margin.
      max_segments: pairs per packed row (static; the Trainer's loaders pack at most that many a row);
        None: ``L // 2``.
      reference: where DPO/IPO's reference log-probs come from: ``model`` (the reference model runs
        in every step: no copy for fresh adapters, a frozen copy of the trained leaves otherwise)
        or ``cached`` (computed once per example before training and carried in the batch: no
        copy and no reference forward in the step, a pre-pass over the training and validation
        data instead). See :class:`ReferenceCache`.
      disable_dropout: the policy's forward runs without dropout (the model's and the adapters'), as
        TRL's ``DPOConfig(disable_dropout=True)``: the reference runs without it, so with it on the
        log-ratios carry dropout noise and the run does not start at DPO's log 2. False keeps the
        model's dropout in the policy.
      center_rewards_coefficient: ``reward`` only: the weight ``c`` of ``c * mean((r_c + r_r)²)``
        added to the loss, which keeps the scores centred on 0 (TRL's ``RewardConfig`` field of the
        same name); None for none.
    """

    method: str = "dpo"
    beta: float | None = None
    label_smoothing: float = 0.0
    gamma: float = 0.5
    max_segments: int | None = None
    reference: Literal["model", "cached"] = "model"
    disable_dropout: bool = True
    center_rewards_coefficient: float | None = None

    def __post_init__(self) -> None:
        # Messages name the field as a recipe writes it (the preference: section).
        if self.method not in METHODS:
            raise ValueError(f"preference.method: {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"preference.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"preference.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.method not in ("dpo", "simpo"):
            raise ValueError(f"preference.label_smoothing: applies to dpo and simpo, not {self.method}; set it to 0")
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError(f"preference.max_segments: expected an integer >= 1 or null, got {self.max_segments}")
        if self.reference not in ("model", "cached"):
            raise ValueError(f"preference.reference: expected model or cached, got {self.reference!r}")
        if self.method == REWARD and self.beta is not None:
            raise ValueError("preference.beta: the reward method has no beta (its loss compares the scores "
                             "themselves); remove beta")
        if self.center_rewards_coefficient is not None:
            if self.method != REWARD:
                raise ValueError(f"preference.center_rewards_coefficient: applies to method reward, not "
                                 f"{self.method}; remove it")
            if not self.center_rewards_coefficient >= 0:
                raise ValueError(f"preference.center_rewards_coefficient: must be >= 0 or null, got "
                                 f"{self.center_rewards_coefficient}")
        if self.reference == "cached" and not self.needs_reference:
            raise ValueError(f"preference.reference: {self.method} needs no reference model; set reference: model "
                             "(the default)")

    @property
    def beta_value(self) -> float:
        return DEFAULT_BETA.get(self.method, 0.0) if self.beta is None else self.beta

    @property
    def needs_reference(self) -> bool:
        return self.method not in REFERENCE_FREE


def _rows(batch: Batch) -> Batch:
    """Paired ``(B, 2, L)`` arrays -> ``(2B, L)`` rows, chosen and rejected interleaved."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in LM_KEYS if k in batch}


def policy_token_logprobs(module: nn.Module, params: Params, rows: Batch, *, deterministic: bool = True,
                          rng: Array | None = None, chunk_tokens: int = 2048, with_aux: bool = False
                          ) -> Array | tuple[Array, Array]:
    """float32 ``(R, T)`` log-probs of ``rows["targets"]`` under ``module`` with ``params``: an LM
    module with ``hidden``/``logits`` methods (a jaxtune ``Decoder`` or ``TunedModel``). With
    ``with_aux``, also the float32 scalar sum of the auxiliary losses the forward sowed (a
    mixture-of-experts router's load-balancing loss over these rows: :func:`auxiliary_loss`)."""
    variables = {"params": params}
    rngs = {"dropout": rng} if rng is not None else {}
    out = module.apply(variables, input_ids=rows["input_ids"], positions=rows.get("positions"),
                       segment_ids=rows.get("segment_ids"), deterministic=deterministic, method="hidden", rngs=rngs,
                       mutable=[AUX] if with_aux else False)
    hidden, state = out if with_aux else (out, {})

    def project(h: Array) -> Array:
        return module.apply(variables, h, method="logits")

    lp = token_logprobs(hidden, rows["targets"], project, chunk_tokens=chunk_tokens)
    return (lp, auxiliary_loss(state)) if with_aux else lp


def reference_logprobs(module: nn.Module, params: Params, batch: Batch, *, starting: Params | None = None,
                       max_segments: int | None = None, chunk_tokens: int = 2048) -> Array:
    """The reference model's summed answer log-probs of a paired batch, float32 ``(B, 2, S)``
    (no gradient). ``params`` are the policy's; see :func:`reference_params`. Computed once ahead of
    training, the result can ride in the batch as ``reference_logps``."""
    rows = _rows(batch)
    lp = policy_token_logprobs(module, reference_params(params, starting), rows, chunk_tokens=chunk_tokens)
    s = rows["targets"].shape[1] // 2 if max_segments is None else max_segments
    sums = segment_sums(lp * rows["loss_weights"].astype(jnp.float32), rows["segment_ids"], s)
    return jax.lax.stop_gradient(sums.reshape(batch["targets"].shape[0], 2, s))


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


def reward_pad_id(model: Tuned) -> int | None:
    """The token a decoder reward model's pooling skips at the end of an answer: the ``pad_token_id``
    its export writes (:func:`jaxtune.tuning.peft_io.pad_token_id`), which transformers'
    ``*ForSequenceClassification`` (and so TRL's ``RewardTrainer``) pools before. A plain answer ends
    with EOS, often that id: the score is then the last answer token's. None for an encoder (its
    classifier reads the first token or the pooler)."""
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
        rows = _rows(batch)
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
        rows = _rows(batch)
        b, length = batch["targets"].shape[0], batch["targets"].shape[-1]
        s = length // 2 if config.max_segments is None else config.max_segments
        if config.method == REWARD:
            scores = reward_scores(module, params, rows, s, pad_id=pad_id, rng=rng,
                                   deterministic=deterministic or config.disable_dropout)
            margins = batch.get(MARGINS)
            margins = None if margins is None else margins.reshape(-1, length)
            return reward_objective(config, scores, rows, (b, s), margins)
        token_lp, aux = policy_token_logprobs(module, params, rows, rng=rng,
                                              deterministic=deterministic or config.disable_dropout,
                                              chunk_tokens=chunk_tokens, with_aux=True)
        reference = None
        if config.needs_reference:
            reference = batch.get("reference_logps")
            if reference is None:
                reference = reference_logprobs(module, params, batch, starting=starting, max_segments=s,
                                               chunk_tokens=chunk_tokens)
        total, pairs, outputs = preference_objective(config, token_lp, rows, (b, s), reference)
        # As the LM loss (and TRL's DPOTrainer with a router loss): a training step's mean is loss + aux;
        # an evaluation reports the preference loss alone.
        return (total if deterministic else total + aux * pairs), pairs, outputs

    return loss_fn


# ----------------------------------------------------------------------------- cached reference


def segment_pair_ids(pair_ids: np.ndarray, segment_ids: np.ndarray, num_segments: int) -> np.ndarray:
    """Host-side: int ``(..., S)`` from per-token ``pair_ids`` and ``segment_ids`` ``(..., T)``: the
    pair id (source index + 1) of segment ``s + 1`` of each row, 0 where the row has no such segment."""
    t = segment_ids.shape[-1]
    seg, ids = segment_ids.reshape(-1, t), pair_ids.reshape(-1, t)
    out = np.zeros((seg.shape[0], num_segments), np.int64)
    rows, cols = np.nonzero((seg >= 1) & (seg <= num_segments))
    out[rows, seg[rows, cols] - 1] = ids[rows, cols]  # every token of a segment carries its pair's id
    return out.reshape(*segment_ids.shape[:-1], num_segments)


def pair_table(compute: Callable[[Batch], jax.Array], batches: Iterable[Batch], size: int, doing: str) -> np.ndarray:
    """float32 ``(size, 2)``: row ``i`` the (chosen, rejected) numbers of source pair ``i``, NaN for a
    pair no batch held (dropped by truncation). ``compute`` maps a host paired batch (this process's
    rows, with ``pair_ids``) to float ``(B, 2, S)`` per segment, a global array laid out as the batch
    (each process reads back its own rows). Each process reads its own share of the rows (``doing``
    names the pass in the error another process reports); every process gets the whole table."""
    table = np.full((size, 2), np.nan, np.float32)
    with processes.stop_together(lambda: doing):
        for batch in in_lockstep(batches):  # each process as many steps (empty pairs fill: ids 0)
            out = _local_rows(compute(batch))  # (B, 2, S)
            ids = segment_pair_ids(batch[PAIR_IDS], batch["segment_ids"], out.shape[-1])[:, 0]
            real = ids > 0
            table[ids[real] - 1] = out.transpose(0, 2, 1)[real]
        # Training shuffles every row to any process: each keeps every row's numbers (the shares are
        # disjoint: one process has each).
        tables = processes.stacked(table)
    return np.where((~np.isnan(tables)).any(axis=0), np.nansum(tables, axis=0), np.nan).astype(np.float32)


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in its local batch order."""
    shards = {(s.index[0].start or 0): s for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


@dataclasses.dataclass
class ReferenceCache:
    """The reference model's log-probs of every pair of one source, computed once before training.

    ``table`` float32 ``(N, 2)``: row ``i`` holds source example ``i``'s summed answer log-probs
    (chosen, rejected) under the reference model, NaN if the pre-pass did not see it (a pair
    dropped by truncation is in no batch either). Batches find their pairs by ``pair_ids``, so
    shuffling, packing and resuming change nothing. :meth:`lookup` gives a host batch the
    ``reference_logps`` ``(B, 2, S)`` the loss reads instead of running the reference model: the
    step then holds no frozen copy of the starting weights and does one forward pass less.
    """

    table: np.ndarray
    max_segments: int | None = None

    @classmethod
    def build(cls, module: nn.Module, trainable: Params, frozen: Params, batches: Iterable[Batch], size: int,
              to_device: Callable[[Batch], Batch], *, sharding: Any = None, dtype: Any = None,
              max_segments: int | None = None, chunk_tokens: int = 2048) -> ReferenceCache:
        """One pass over ``batches`` (host paired batches of a source of ``size`` examples, with
        ``pair_ids``) with the starting model ``trainable`` + ``frozen`` as the reference (the same
        :func:`starting_weights` in ``dtype`` as the in-step reference, so both give the same
        numbers). ``to_device`` places a batch on the mesh (without its ``pair_ids``); ``sharding``
        is the batch's (the result is laid out like it, so each process reads back its own rows)."""

        keep_adapters = adapters_trained(trainable)

        def compute(trainable: Params, frozen: Params, batch: Batch) -> Array:
            starting = starting_weights(trainable, dtype, keep_adapters=keep_adapters)
            # S = L // 2: every pair of any row, whatever max_segments the loss takes
            return reference_logprobs(module, combine(trainable, frozen), batch, starting=starting,
                                      chunk_tokens=chunk_tokens)

        compute = jit_on_mesh(compute, getattr(sharding, "mesh", None), out_shardings=sharding)
        table = pair_table(lambda batch: compute(trainable, frozen, to_device(batch)), batches, size,
                           "computing the reference log-probs (preference.reference: cached)")
        return cls(table, max_segments)

    def lookup(self, batch: Batch) -> np.ndarray:
        """float32 ``(B, 2, S)`` reference log-probs for the host batch ``batch`` (``S`` as the
        loss takes it: ``max_segments`` or ``L // 2``); 0 where a row has no pair."""
        segments = batch["segment_ids"]
        b, length = segments.shape[0], segments.shape[-1]
        s = length // 2 if self.max_segments is None else self.max_segments
        ids = segment_pair_ids(batch[PAIR_IDS], segments, s)[:, 0]
        present = segment_pair_ids(np.ones_like(segments), segments, s)[:, 0] > 0
        if (present & (ids == 0)).any():
            raise ValueError("preference.reference: cached needs pair_ids in every batch (paired rows from "
                             "jaxtune.read data); use reference: model for other data")
        values = self.table[ids[present] - 1]
        if np.isnan(values).any():
            raise ValueError("preference.reference: cached: a batch holds a pair the pre-pass did not score (its "
                             "data differs from the data the cache was built from); use reference: model")
        out = np.zeros((b, s, 2), np.float32)
        out[present] = values
        return out.transpose(0, 2, 1)


# ----------------------------------------------------------------------------- the Trainer's wiring


def reference_caches(module: nn.Module, trainable: Params, frozen: Params, splits: dict[str, Any],
                     to_device: Callable[[Batch], Batch], config: PreferenceConfig, *, sharding: Any = None,
                     dtype: Any = None, chunk_tokens: int = 2048) -> dict[str, ReferenceCache]:
    """``preference.reference: cached``: a :class:`ReferenceCache` of the starting model's log-probs of
    every pair of each split (``{"train": loader, "eval": loader}``, None for a split the run lacks), one
    pre-pass each. Each split must be a :class:`~jaxtune.data.Loader` (the cache finds a pair by its
    index in the loader's source)."""
    caches = {}
    for name, data in splits.items():
        if data is None:
            continue
        if not isinstance(data, Loader):
            raise ValueError("preference.reference: cached finds each pair's reference log-probs by its index in "
                             "the source, so the data must come from jaxtune.read; use reference: model")
        log.info("preference: reference log-probs of the %s data (%d pairs), computed once", name, len(data.source))
        passes = evaluation_loader(data.source, data.tokenizer, data.config)
        caches[name] = ReferenceCache.build(module, trainable, frozen, passes, len(data.source), to_device,
                                            sharding=sharding, dtype=dtype, max_segments=config.max_segments,
                                            chunk_tokens=chunk_tokens)
    return caches


def host_keys(config: PreferenceConfig | None) -> frozenset[str]:
    """The keys of a paired host batch that stay on the host: ``pair_ids`` (the cached reference's
    lookup), and ``margins`` but for a reward model, the one loss that reads them."""
    return frozenset({PAIR_IDS} if config is not None and config.method == REWARD else {PAIR_IDS, MARGINS})


def unread_margins(batch: Batch, config: PreferenceConfig | None) -> str | None:
    """A one-line warning when the host paired ``batch`` carries a nonzero pair margin (the rows'
    ``margin`` column) that ``config``'s method drops unread (every method but ``reward``: DPO and
    the others have no margin term, as TRL's DPOTrainer ignores the column), else None."""
    margins = batch.get(MARGINS)
    if config is None or config.method == REWARD or margins is None or not np.any(np.asarray(margins) != 0):
        return None
    return (f"the preference data's 'margin' column is ignored: only preference.method: reward reads it, and "
            f"{config.method} has no margin term; drop the column, or train a reward model")


def check_preference(config: PreferenceConfig | None, data_kinds: set[str], task: str, outputs: int = 1) -> None:
    """Preference data and a preference method come together, on a language model, or for ``reward``
    on a model with one regression output (``outputs``: the head's) (one-line errors that name the field)."""
    pairs = PREFERENCE in data_kinds
    if config is None and pairs:
        raise ValueError("the data is preference pairs but no preference method is set; pass "
                         "preference=PreferenceConfig(method='dpo') (recipe: a preference: section)")
    others = data_kinds - {PREFERENCE}
    if config is not None and others:
        raise ValueError(f"preference.method: {config.method} trains on preference pairs, but the data is "
                         f"{', '.join(sorted(others))}; use data.kind: preference or drop the preference section")
    if config is not None and config.method == REWARD:
        if task != "regression":
            made = "a language model (no head)" if task == "lm" else f"a {task} model"
            raise ValueError(f"preference.method: reward scores each answer with a scalar head, but the plan makes "
                             f"{made}; add {{action: head, task: regression}} to the plan")
        if outputs != 1:
            raise ValueError(f"plan: the reward model's head has {outputs} outputs, but a reward is one number; "
                             "drop num_labels from the head rule")
        return
    if config is not None and task != "lm":
        raise ValueError(f"preference.method: {config.method} tunes a language model, but the plan makes a {task} "
                         "model; remove the head rule from the plan")


def with_reference_start(trainable: Params, frozen: Params, dtype: Any = None) -> Params:
    """``frozen`` plus, under :data:`REFERENCE_KEY`, :func:`starting_weights` in ``dtype``: the
    DPO/IPO reference model is the starting model. Fresh adapter plans add nothing (the reference is
    the frozen base with adapters off); full or partial plans add their trained leaves, and a run
    that starts from trained adapters (SFT) adds those adapters. It rides with the frozen part, so
    checkpoints (trainable + optimizer state) never hold it, and the Trainer's params leave it out
    of exports."""
    start = starting_weights(trainable, dtype=dtype)
    if not start:
        return frozen
    log.info("preference: the reference model keeps a copy of the %d starting trained leaves (%.1f MB)",
             len(jax.tree.leaves(start)), sum(x.nbytes for x in jax.tree.leaves(start)) / 1e6)
    return {**frozen, REFERENCE_KEY: start}

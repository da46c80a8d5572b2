"""What a preference run trains and how (:class:`PreferenceConfig`: DPO, conservative DPO, IPO,
SimPO, ORPO, or a reward model), and the checks that its data, model and batches fit the method.
The losses are :mod:`jaxtune.training.preference`."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from jaxtune.data.packing import ANSWER_INDEX
from jaxtune.data.preference import MARGINS, PAIR_IDS
from jaxtune.data.sources import PREFERENCE
from jaxtune.models.decoder import DecoderConfig

Batch = dict[str, Any]

METHODS = ("dpo", "ipo", "simpo", "orpo", "reward")
REFERENCE_FREE = ("simpo", "orpo", "reward")
REWARD = "reward"  # the method that trains a reward model (a scalar head) rather than a language model
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Which preference loss, and its constants.

    Attributes:
      method: ``dpo``, ``ipo``, ``simpo`` or ``orpo`` (:mod:`jaxtune.training.preference_losses`), or ``reward``: a
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

    @property
    def answers_only(self) -> bool:
        """Whether the loss reads log-probs at the answers alone (the LM head then projects only
        the positions of the loader's answer index): every method but ORPO, whose NLL term reads
        every token, and a reward model, which reads none."""
        return self.method not in (REWARD, "orpo")


def host_keys(config: PreferenceConfig | None) -> frozenset[str]:
    """The keys of a paired host batch that stay on the host: ``pair_ids`` (the cached reference's
    lookup), ``margins`` but for a reward model, the one loss that reads them, and the answer index
    where the loss does not read it (:attr:`PreferenceConfig.answers_only`)."""
    keys = {PAIR_IDS} if config is not None and config.method == REWARD else {PAIR_IDS, MARGINS}
    return frozenset(keys if config is None or config.answers_only else keys | {ANSWER_INDEX})


def unread_margins(batch: Batch, config: PreferenceConfig | None) -> str | None:
    """A one-line warning when the host paired ``batch`` carries a nonzero pair margin (the rows'
    ``margin`` column) that ``config``'s method drops unread (every method but ``reward``: DPO and
    the others have no margin term, as TRL's DPOTrainer ignores the column), else None."""
    margins = batch.get(MARGINS)
    if config is None or config.method == REWARD or margins is None or not np.any(np.asarray(margins) != 0):
        return None
    return (f"the preference data's 'margin' column is ignored: only preference.method: reward reads it, and "
            f"{config.method} has no margin term; drop the column, or train a reward model")


def check_preference(config: PreferenceConfig | None, data_kinds: set[str], task: str, outputs: int = 1, *,
                     model: Any = None) -> None:
    """Preference data and a preference method come together, on a language model, or for ``reward``
    on a model with one regression output (``outputs``: the head's) (one-line errors that name the field).
    ``model`` (its ``config`` and ``architecture``), when given, is refused for a method other than
    ``reward`` if it is an encoder (:func:`check_language_model`)."""
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
    if model is not None:
        check_language_model(config, model)
    if config is not None and task != "lm":
        raise ValueError(f"preference.method: {config.method} tunes a language model, but the plan makes a {task} "
                         "model; remove the head rule from the plan")


def check_language_model(config: PreferenceConfig | None, model: Any) -> None:
    """Refuse a method other than ``reward`` on an encoder (``model``: a loaded, planned or abstract
    model, its ``config`` and ``architecture``): it has no language-model head to take log-probabilities
    from, with or without a head rule, so the plan's own advice (add or drop a head) is no way out."""
    if config is not None and config.method != REWARD and not isinstance(model.config, DecoderConfig):
        raise ValueError(f"preference.method: {config.method} tunes a language model, but {model.architecture} is "
                         "an encoder, which has none; to learn from the pairs, train a reward model: "
                         "preference.method: reward and {action: head, task: regression} in the plan")


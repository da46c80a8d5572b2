"""What a training run is told: how long (``train``), how it is judged (``eval``) and how often
it is saved (``checkpoint``). Each is a recipe section and a :class:`~jaxtune.training.trainer.Trainer`
argument alike, checked when it is built (errors name the field as a recipe writes it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from jaxtune.schema import check_fields


def _at_least(section: str, name: str, value: int | float | None, least: int) -> None:
    if value is not None and value < least:
        raise ValueError(f"{section}.{name}: expected an integer >= {least}, got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train.

    ``steps`` (optimizer updates) or ``epochs`` (passes over the training data; the default is
    one epoch when neither is given). Each update is one batch of ``data.batch_size`` rows;
    ``grad_accum_steps`` computes its gradient in that many micro-batches (the same update, a
    micro-batch's activations in memory at a time), so it must divide the batch size.
    ``log_every``: steps between progress lines and ``metrics.jsonl`` records (the only time the
    host waits for the device). ``chunk_tokens``: tokens per chunk of the LM head + loss (bounds
    the logits' memory). ``regression_loss``: ``mse`` or ``huber``. ``progress``: print progress.
    ``compile_cache``: keep compiled steps on disk, so the next run of the same shapes starts
    without compiling (see :mod:`jaxtune.training.compile_cache`). ``recalibrate_batch_norm``:
    training batches over which the running statistics of the BatchNorms the plan trains are
    re-estimated with the current weights before each evaluation and the final checkpoint (0: keep
    the running averages; see :mod:`jaxtune.training.batch_norm`).
    """

    steps: int | None = None
    epochs: float | None = None
    grad_accum_steps: int = 1
    log_every: int = 10
    seed: int = 0
    chunk_tokens: int = 2048
    regression_loss: Literal["mse", "huber"] = "mse"
    progress: bool = True
    compile_cache: bool = True
    recalibrate_batch_norm: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "train")  # the types a recipe's values are held to, before the ranges below
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"train: give train.steps ({self.steps}) or train.epochs ({self.epochs}), not both")
        _at_least("train", "steps", self.steps, 1)
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"train.epochs: expected a positive number, e.g. 1 or 0.5, got {self.epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"train.seed: expected an integer in [0, 2**32), got {self.seed}")
        for name in ("grad_accum_steps", "log_every", "chunk_tokens"):
            _at_least("train", name, getattr(self, name), 1)
        _at_least("train", "recalibrate_batch_norm", self.recalibrate_batch_norm, 0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation.

    ``every`` N steps during training (and at the end); ``best_metric`` (e.g. ``accuracy``,
    ``loss``) picks the best checkpoint (``best/``) and drives early stopping after
    ``early_stopping_patience`` evaluations without improvement; ``use_best``: the model a run
    ends with is the best checkpoint's rather than the last step's. ``before``/``after``: score
    the base model (once per run directory, then cached) and the fine-tuned one for the report.
    ``choices`` (chat / prompt-completion data whose answers come from a fixed set, e.g.
    ``[positive, negative]``): also report ``choice_accuracy`` and ``choice_macro_f1``, where
    each validation answer is predicted by the choice whose first token has the highest logit
    (the first token after the template's own opening of every reply: Qwen3's empty think block).
    ``baselines`` (classification and regression): the base report also scores a linear probe on
    the frozen model's features and TF-IDF + a linear model on the same split
    (:mod:`jaxtune.training.baselines`; seconds for small data, turn it off for huge data).
    ``cache_base``: keep the base report on disk, so a later run of the same model, plan,
    data and evaluation settings reads it instead of scoring again (:mod:`jaxtune.training.base_cache`).
    """

    every: int | None = None
    best_metric: str | None = None
    early_stopping_patience: int | None = None
    use_best: bool = False
    before: bool = True
    after: bool = True
    choices: tuple[str, ...] | None = None
    baselines: bool = True
    cache_base: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "eval")  # the types a recipe's values are held to, before the ranges below
        _at_least("eval", "every", self.every, 1)
        _at_least("eval", "early_stopping_patience", self.early_stopping_patience, 1)
        if self.early_stopping_patience is not None and not self.best_metric:
            raise ValueError("eval.early_stopping_patience needs eval.best_metric (the metric to watch)")
        if self.use_best and not self.best_metric:
            raise ValueError("eval.use_best needs eval.best_metric (what makes a checkpoint the best)")
        if self.best_metric and not self.every:
            raise ValueError(f"eval.best_metric: {self.best_metric!r} is tracked at each evaluation during training; "
                             "set eval.every (steps between evaluations)")
        if self.choices is not None:
            if not all(self.choices):  # check_fields made them a tuple of strings; an empty one has no token
                raise ValueError(f"eval.choices: expected non-empty answers, got {self.choices}")
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
                raise ValueError(f"eval.choices: expected two or more different answers, got {self.choices}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<run_dir>/checkpoints``: every N steps (and always at the end and on
    Ctrl-C), keeping the latest ``keep``."""

    every: int | None = None
    keep: int = 3

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")  # the types a recipe's values are held to, before the ranges below
        _at_least("checkpoint", "every", self.every, 1)
        _at_least("checkpoint", "keep", self.keep, 1)

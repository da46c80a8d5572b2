"""What :meth:`jaxtune.training.trainer.Trainer.fit` returns (``jaxtune.FitResult``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxtune.tuning.tuned import Tuned


@dataclasses.dataclass
class FitResult:
    """What ``fit`` ended with.

    ``model``: the trained :class:`~jaxtune.tuning.Tuned` (the best checkpoint's with
    ``eval.use_best``). ``state``: ``finished``, ``stopped`` (Ctrl-C; run again to resume),
    ``early_stopped`` or ``failed``. ``failed_step``: a ``failed`` run's non-finite step (the host
    notices one when it next logs, evaluates or saves, so ``step``, where it stopped, may be later; the
    last good step is the one before). ``before``/``after``: base and fine-tuned validation metrics;
    ``report``: both as a markdown table. ``export``: set by ``jaxtune.finetune``.
    """

    model: Tuned
    step: int
    steps: int
    state: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    best: dict[str, Any] | None
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    report: str | None = None
    export: Path | None = None
    failed_step: int | None = None

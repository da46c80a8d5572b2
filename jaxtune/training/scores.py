"""The run's two scores: the base model's before training and the fine-tuned model's after it.

Each is computed once. The base score is kept in the run directory's report (and, with
``eval.cache_base``, in the machine-wide cache of :mod:`jaxtune.training.base_cache`), so a
resumed run does not score the base again unless its validation data changed; the fine-tuned
score reuses the loop's last evaluation, or the report of a finished run run again, when those
scored the very same params on the same data. The functions take the
:class:`~jaxtune.training.trainer.Trainer` whose run it is and read its model, data and run
directory; this module does not import the trainer.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from jaxtune.data.pipeline import Loader
from jaxtune.training import base_cache
from jaxtune.training.baselines import applies as baselines_apply
from jaxtune.training.baselines import baseline_metrics, training_pass
from jaxtune.training.evaluate import comparison_table, metrics_line
from jaxtune.training.preference_config import REWARD

log = logging.getLogger(__name__)


def score_base(trainer: Any) -> dict[str, float] | None:
    """The base model's metrics (the plan's fresh adapters/head), computed once per run directory;
    None when the trainer has no validation data or ``eval.before`` is off."""
    if trainer.eval_data is None or not trainer.eval_config.before:
        return None
    report = trainer.run.report()
    before = report["before"]
    if before is not None and report["evaluated_on"] not in (None, evaluated_on(trainer)):
        log.info("the validation data changed since the base model was scored: scoring it again")
        before = None
    if before is None:
        baselines = (trainer.eval_config.baselines and trainer.task in ("classification", "regression")
                     and baselines_apply(trainer.tuned, trainer.train_data, trainer.eval_data))
        digest = _base_digest(trainer, baselines)
        before = base_cache.load(digest)
        if before is not None:
            log.info("base: scored by an earlier run of the same model, plan, data and evaluation "
                     "(eval.cache_base; kept in %s)", base_cache.directory())
        else:
            log.info("evaluating the base model ...")
            before = trainer.evaluate()
            if baselines:
                before.update(baseline_metrics(trainer.tuned, trainer.trainable, trainer.frozen, trainer.train_data,
                                               trainer.eval_data, mesh=trainer.mesh, to_device=trainer.to_device))
            base_cache.store(digest, before)
        trainer.run.write_report(before, None, 0, evaluated_on(trainer))
    log.info("base: %s", metrics_line(before))
    return before


def score_final(trainer: Any, result: Any) -> None:
    """Set ``result.after`` (the fine-tuned model's metrics) and ``result.report`` (base vs
    fine-tuned), and write them to the run directory; nothing without validation data or with
    ``eval.after`` off. ``result`` is the :class:`~jaxtune.training.result.FitResult` of ``fit``."""
    if trainer.eval_data is None or not trainer.eval_config.after:
        return
    last_eval = {k.removeprefix("eval/"): v for k, v in result.eval_metrics.items()}
    report = trainer.run.report()
    if last_eval and result.model.step == trainer.step and trainer.step == result.step:
        result.after = last_eval  # the loop's last evaluation already scored these very params
    elif (report["after"] is not None and report["step"] == result.model.step
          and report["evaluated_on"] is not None and report["evaluated_on"] == evaluated_on(trainer)):
        result.after = report["after"]  # a run run again: these params were scored on this data already
    else:
        log.info("evaluating the fine-tuned model ...")
        result.after = trainer.evaluate()
        trainer.run.log({"step": result.model.step, **{f"eval/{k}": v for k, v in result.after.items()}})
    trainer.run.write_report(result.before, result.after, result.model.step, evaluated_on(trainer))
    status = trainer.run.status() or {}
    trainer.run.write_status(status.pop("state", result.state), **{**status, "eval": result.after})
    if result.before is not None:
        note = "pretrained model with the plan's fresh (untrained) adapters/head"
        if trainer.preference is not None and trainer.preference.needs_reference:
            note += ("; policy == reference there, so its DPO loss is log 2 and its rewards 0: logps/accuracy "
                     "(the model's own preference) is the comparable score")
        result.report = comparison_table(result.before, result.after, before_note=note,
                                         reward_model=trainer.preference is not None
                                         and trainer.preference.method == REWARD)
    else:
        log.info("fine-tuned: %s", metrics_line(result.after))


def evaluated_on(trainer: Any) -> dict[str, Any] | None:
    """What identifies the validation data (its files, rows, length and choices): a resumed run whose
    data changed scores the base again rather than compare it with scores on other data."""
    if not isinstance(trainer.eval_data, Loader):
        return None
    source = trainer.eval_data.source
    report = getattr(source, "report", None)
    choices = trainer.eval_config.choices
    return {"paths": list(report.paths) if report is not None else None, "rows": len(source),
            "max_length": trainer.eval_data.config.max_length,
            "choices": list(choices) if choices else None}  # as JSON reads it


def _base_digest(trainer: Any, baselines: bool) -> str | None:
    """The key of this run's base report in the machine-wide cache (``eval.cache_base``), or None."""
    if not trainer.eval_config.cache_base or not isinstance(trainer.eval_data, Loader):
        return None
    settings = {"model": trainer.resolved_config.get("model"), "plan": trainer.tuned.plan.to_data(),
                "task": trainer.task, "labels": trainer.tuned.label_names, "choices": trainer.eval_config.choices,
                "baselines": baselines, "devices": [jax.default_backend(), jax.device_count()]}
    train = trainer.train_data if baselines else None
    return base_cache.key(source=trainer.tuned.source, settings=settings, trainable=trainer.trainable,
                          eval_batches=trainer.eval_data, train_rows=train.source if train else None,
                          train_batches=training_pass(train, trainer.eval_data) if train else None)

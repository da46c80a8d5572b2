"""The Trainer: a planned model, data and a run directory in; the trained model and its report out.

::

    result = Trainer(model, train, eval_data=val, run_dir="runs/chat",
                     config=TrainConfig(epochs=1), data=LoaderConfig(batch_size=8, max_length=1024)).fit()
    result.model    # the trained jaxtune.Tuned (export it with jaxtune.export)
    result.report   # base vs fine-tuned metrics, as a markdown table

``fit`` is a short loop of named steps: score the base model (once per run directory), resume
from the latest checkpoint, train (jit once, donate buffers, read metrics only every
``log_every`` steps), evaluate and keep the best, stop early, checkpoint, then score the
fine-tuned model. Everything it writes lives in ``run_dir`` (see :mod:`jaxtune.training.rundir`);
running ``fit`` again on the same directory resumes exactly, and a finished run is a no-op. What
the constructor settles before any compute (loaders, the number of steps, the checks that refuse
data, a mesh or an evaluation that does not fit the model) is :mod:`jaxtune.training.preflight`; the
base and fine-tuned scores, each computed once, are :mod:`jaxtune.training.scores`; the run's status
and the ways a run fails (a non-finite step, another process's error) are
:mod:`jaxtune.training.run_status`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune import processes
from jaxtune.data.pipeline import Loader, LoaderConfig
from jaxtune.data.sources import Source
from jaxtune.models.load import check_not_consumed
from jaxtune.training import compile_cache, memory, preflight, scores
from jaxtune.training.batch_norm import make_statistics_fn, recalibrate
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.evaluate import HIGHER_IS_BETTER, evaluate, metrics_line
from jaxtune.training.loop import Best, StopOnInterrupt, Throughput, TrainRecords
from jaxtune.training.memory import StepMemory
from jaxtune.training.optim import OptimizerConfig, build_optimizer
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preference_config import PreferenceConfig, host_keys, unread_margins
from jaxtune.training.preference_reference import REFERENCE_KEY, reference_caches, with_reference_start
from jaxtune.training.result import FitResult
from jaxtune.training.reward_model import reward_pad_id
from jaxtune.training.run_status import RunStatus
from jaxtune.training.rundir import RunDir, RunDirError
from jaxtune.training.sharding import (
    MeshConfig,
    batch_sharding,
    global_batch,
    jit_on_mesh,
    make_mesh,
    param_shardings,
    shard,
)
from jaxtune.training.step import jit_train_step, make_eval_step, make_loss_fn
from jaxtune.tuning.partition import combine, partition
from jaxtune.tuning.tuned import Tuned

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
Callback = Callable[["Trainer", int, dict[str, float]], None]


class Trainer:
    """Fine-tune a planned model.

    Args:
      model: the model after a plan (:func:`jaxtune.apply_plan`). Training consumes its trainable
        arrays (the step donates them, so a run holds one copy); train on from ``fit().model``.
      train_data: a :class:`~jaxtune.data.Source` (from :func:`jaxtune.read`; batched by
        ``data``), a :class:`~jaxtune.data.Loader`, or any iterable of per-process numpy
        batches (the data contract; with grain's ``get_state``/``set_state`` for exact resume).
        Data that runs out before ``train.steps`` is read again from its start, as transformers'
        Trainer takes another epoch, unless it can be read once only (an iterator or a generator: the
        run ends there, warned of). None for a trainer that only evaluates.
      eval_data: the same kinds; re-iterated for each evaluation (one pass = the eval set).
      run_dir: where checkpoints, metrics, status and the report go; existing checkpoints are
        resumed.
      config: how long to train (:class:`TrainConfig`).
      data: how sources are batched (:class:`~jaxtune.data.LoaderConfig`, or a recipe's
        ``DataConfig``; its ``eval_batch_size`` sizes evaluation batches). The fields that choose and
        read the examples (``train``, ``train_size``, ``skip_bad_rows``...) are :func:`jaxtune.read`'s,
        refused here.
      optimizer: an :class:`OptimizerConfig`, or any optax ``GradientTransformation`` (used as is).
      eval: evaluation, best checkpoint, early stopping, choices (:class:`EvalConfig`).
      checkpoint: how often to save (:class:`CheckpointConfig`).
      mesh: a ``(data, fsdp, tensor)`` mesh or :class:`MeshConfig` (default: every device on ``data``).
      preference: train on preference pairs (``data.kind: preference``) with DPO, IPO, SimPO or ORPO
        (:class:`~jaxtune.training.preference_config.PreferenceConfig`); None for every other task. The
        reference model of DPO/IPO is the starting model: for fresh adapters the frozen base itself
        (no copy), otherwise plus a copy of the starting trained leaves (or trained adapters) in
        the compute dtype, kept out of checkpoints and exports; with ``reference="cached"`` its
        log-probs are computed once before training instead (no copy in the step).
      callbacks: ``f(trainer, step, metrics)`` called after each logged step.
      resolved_config: the run's full config as plain data, saved in ``run_dir`` and each checkpoint.
    """

    def __init__(
        self,
        model: Tuned,
        train_data: Source | Loader | Iterable[Batch] | None = None,
        eval_data: Source | Loader | Iterable[Batch] | None = None,
        *,
        run_dir: str | Path,
        config: TrainConfig = TrainConfig(),
        data: LoaderConfig | None = None,
        optimizer: OptimizerConfig | optax.GradientTransformation = OptimizerConfig(),
        eval: EvalConfig = EvalConfig(),  # noqa: A002 - the recipe section's name
        checkpoint: CheckpointConfig = CheckpointConfig(),
        mesh: Mesh | MeshConfig | None = None,
        preference: PreferenceConfig | None = None,
        callbacks: list[Callback] | None = None,
        resolved_config: dict[str, Any] | None = None,
    ):
        # Each process reads and checks its own files and data here: one failing alone (a file missing on its
        # host, a run directory it cannot read) stops the others, which would wait for it in a collective.
        with processes.ready_together(lambda: "setting up the trainer"):
            preflight.check_arguments(model, config=config, data=data, optimizer=optimizer, eval=eval,
                                      checkpoint=checkpoint, mesh=mesh, preference=preference)
            check_not_consumed(model)
            self.tuned, self.config, self.eval_config, self.checkpoint_config = model, config, eval, checkpoint
            if config.compile_cache:
                compile_cache.enable()
            self.loader_config = data or LoaderConfig()
            self.preference = preference
            self._margins_told = False  # the warning that a method drops the data's margins is given once
            self.task = "preference" if preference is not None else model.task  # what evaluation reports
            # the most preference pairs a packed row may hold: what the loss sees of a row
            self._max_pairs = preference.max_segments if preference is not None else None
            self.train_data = preflight.loader_for(train_data, model, self.loader_config, train=True,
                                                   max_pairs=self._max_pairs)
            self.eval_data = preflight.loader_for(eval_data, model, self.loader_config, train=False,
                                                  max_pairs=self._max_pairs)
            self.run = RunDir(run_dir, main=jax.process_index() == 0)  # one process writes logs and status
            self.run.check()
            self.run_dir = self.run.path
            self.resolved_config = resolved_config or {}
            self.callbacks = list(callbacks or [])
            self.mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh or MeshConfig())
            preflight.check_data(model, self.train_data, self.eval_data, self.mesh, preference)
            self.steps = preflight.count_steps(config, self.train_data)
            preflight.check_accumulation(config, self.train_data)
            preflight.check_recalibration(config, model, self.train_data)
            self.choices = preflight.choice_ids(model, eval, preflight.data_kinds(self.train_data, self.eval_data))
            preflight.check_best_metric(eval, self.task, self.choices is not None)
            preflight.check_evaluation(eval, self.train_data, self.eval_data)

            trainable, frozen = partition(model.params, model.labels)
            if not jax.tree.leaves(trainable):
                raise ValueError("the plan leaves nothing trainable; add a train, lora, prompt or head rule")
            if isinstance(optimizer, OptimizerConfig):
                groups, _ = partition(model.labels, model.labels)
                # a trainer without training data (it evaluates, exports) follows no schedule: nothing to warn of
                self.optimizer, self.schedule = build_optimizer(optimizer, self.steps, groups,
                                                                warn=self.train_data is not None)
            else:
                self.optimizer, self.schedule = optimizer, None
            rules = model.partition_rules
            self._trainable_shardings = param_shardings(trainable, self.mesh, rules)
            self.trainable = shard(trainable, self._trainable_shardings)
            cached = preference is not None and preference.reference == "cached"
            if preference is not None and preference.needs_reference and not cached:
                frozen = with_reference_start(trainable, frozen, getattr(model.config, "dtype", None))
            self.frozen = shard(frozen, param_shardings(frozen, self.mesh, rules))
            # The optimizer state is placed by the same path rules as the params (Adam's mu/nu paths
            # end in the param's path), scalars replicated on the mesh. Left to jit, moments built by
            # zeros_like come out replicated: a full copy of Adam's state on every FSDP device.
            # Off-mesh scalars (step counters) would also make the step compile a second time.
            # Inside the block: a state one host cannot make (its memory, a caller's optimizer) stops the others.
            opt_shardings = param_shardings(jax.eval_shape(self.optimizer.init, self.trainable), self.mesh, rules)
            self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(self.trainable)
        # Before any step: the cache's reference is the starting model (also when a run resumes).
        self._references = reference_caches(
            model.module, self.trainable, self.frozen, {"train": self.train_data, "eval": self.eval_data},
            self.to_device, preference, sharding=batch_sharding(self.mesh), dtype=getattr(model.config, "dtype", None),
            chunk_tokens=config.chunk_tokens) if cached else {}
        if preference is not None:
            loss_fn = eval_loss_fn = make_preference_loss_fn(model.module, preference, chunk_tokens=config.chunk_tokens,
                                                             pad_id=reward_pad_id(model))
        else:
            loss_fn = make_loss_fn(model.module, model.task, chunk_tokens=config.chunk_tokens,
                                   regression=config.regression_loss)
            eval_loss_fn = make_loss_fn(model.module, model.task, chunk_tokens=config.chunk_tokens,
                                        regression=config.regression_loss, choices=self.choices)
        self.train_step = jit_train_step(loss_fn, self.optimizer, grad_accum_steps=config.grad_accum_steps,
                                         mesh=self.mesh, trainable_shardings=self._trainable_shardings,
                                         opt_shardings=opt_shardings)
        # Replicated outputs: every process can read the whole global batch's predictions.
        self.eval_step = jit_on_mesh(make_eval_step(eval_loss_fn), self.mesh,
                                     out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        self._statistics_step = jit_on_mesh(make_statistics_fn(model.module), self.mesh,
                                            out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        self._recalibrated_step: int | None = None
        self.rng = jax.random.key(config.seed)
        self.step = 0
        self._saved_step: int | None = None  # the step whose state the latest checkpoint holds
        self._training_pass: Any = None  # the iterator over the training data that fit reads now
        self._checkpointer: Checkpointer | None = None
        self._resumable_data = False
        self.compile_cache_hit: bool | None = None  # whether the first step's executable came from the disk cache
        self.status = RunStatus(self.run, self.steps)
        self.records = TrainRecords(model, self.schedule, self.steps, progress=config.progress)

    # ------------------------------------------------------------------ state

    @property
    def params(self) -> Any:
        """The full current param tree (trained leaves combined with the frozen ones; a preference
        run's reference copy is not part of the model)."""
        return combine(self.trainable, {k: v for k, v in self.frozen.items() if k != REFERENCE_KEY})

    @property
    def model(self) -> Tuned:
        """The model with the current params (what :func:`jaxtune.export` writes)."""
        return dataclasses.replace(self.tuned, params=self.params, step=self.step)

    @property
    def memory(self) -> StepMemory | None:
        """The compiled train step's bytes per device, once the first step compiled (the status keeps it)."""
        return self.status.memory

    @property
    def failed_step(self) -> int | None:
        """The non-finite step that failed the run, if one did."""
        return self.status.failed_step

    @property
    def checkpointer(self) -> Checkpointer:
        """The run's one checkpoint manager (opened on first use, closed by :meth:`close`); it
        saves the data iterator's position when :meth:`fit` trains from a resumable iterator."""
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.run_dir, max_to_keep=self.checkpoint_config.keep,
                                              with_data=self._resumable_data, report=log.warning)
        return self._checkpointer

    def close(self) -> None:
        """Wait for pending saves, close the checkpoint manager and flush the TensorBoard events
        (closed even when the checkpoint manager fails to close: the writer holds a file)."""
        try:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
        finally:
            self.run.close()

    def restore(self, *, best: bool = False, step: int | None = None) -> int | None:
        """Load the run's latest (or, with ``best``, best; with ``step``, exactly that step's) trained
        params into this trainer; returns the step, or None when the run has no checkpoint. A
        ``step`` not (or no longer) there is a :class:`~jaxtune.training.checkpoint.CheckpointGoneError`,
        one that does not verify a :class:`~jaxtune.training.checkpoint.CheckpointDamagedError`.

        Refused, naming the differences, when this trainer's plan, labels or trainable shapes are
        not the run's (its params would not be the run's model); with ``best``, when the run kept
        no best checkpoint.

        A trainer that has not opened its checkpoints to train reads them read-only: the run may be
        training in another process, and its save in flight or a step it is about to set aside must
        stay as they are (:class:`~jaxtune.training.checkpoint.Checkpointer`'s ``read_only``)."""
        if best and step is not None:
            raise ValueError(f"restore(best=True, step={step}): the best checkpoint and step {step} are two "
                             "checkpoints; give one")
        self.check_plan()
        if self._checkpointer is not None:
            return self._restore_from(self._checkpointer, best, step)
        with Checkpointer(self.run_dir, with_data=False, report=log.warning, read_only=True) as reader:
            return self._restore_from(reader, best, step)

    def _restore_from(self, checkpointer: Checkpointer, best: bool, step: int | None) -> int | None:
        if best:
            restored = checkpointer.restore_best(self.trainable)
            if restored is None:
                raise RunDirError(f"{self.run_dir}: no best checkpoint (a run keeps one when it evaluates during "
                                  "training, eval.every, and eval.best_metric is set; a damaged one is set aside, as "
                                  "reported); use the latest (drop best=True, or --best on the command line)")
            self.trainable, meta = restored
            self.step = int(meta.get("step", self.step))
            return self.step
        # the params only: a run whose optimizer state no longer fits (another jaxtune version's layout) still exports
        restored = checkpointer.restore(self.trainable, None, step=step)
        if restored is None:
            return None
        self.step, self.trainable = restored[0], restored[1]
        self._saved_step = None  # the optimizer state and rng were not restored with it
        return self.step

    # ------------------------------------------------------------------ evaluation

    def to_device(self, batch: Batch, split: str | None = None) -> dict[str, jax.Array]:
        """A host batch (this process's rows) as the compiled steps take it: global arrays on the mesh, without
        the host's pair bookkeeping, plus the ``split``'s (``"train"``, ``"eval"``) cached reference log-probs
        in a ``preference.reference: cached`` run."""
        if not self._margins_told:
            note = unread_margins(batch, self.preference)
            if note:
                log.warning("%s", note)
                self._margins_told = True
        reference = self._references.get(split) if split else None  # None also while the caches are built
        if reference is not None:
            batch = {**batch, "reference_logps": reference.lookup(batch)}
        return global_batch({k: v for k, v in batch.items() if k not in host_keys(self.preference)}, self.mesh)

    def evaluate(self, data: Source | Loader | Iterable[Batch] | None = None,
                 trainable: Any = None) -> dict[str, float]:
        """Metrics of the current (or given) trainable params on ``data`` (default: eval_data)."""
        # Each process reads (and checks) its own share of the rows. The run's status is not this
        # evaluation's (``jaxtune eval`` of a finished run); inside fit, fit's own stop_together holds.
        with processes.stop_together(lambda: "evaluating"):
            return self._evaluate(data, trainable)

    def _evaluate(self, data: Source | Loader | Iterable[Batch] | None, trainable: Any) -> dict[str, float]:
        if self._references and data is not None:
            raise ValueError("preference.reference: cached holds reference log-probs of the training and validation "
                             "data only; evaluate other data in a trainer with reference: model")
        if data is not None:
            data = preflight.loader_for(data, self.tuned, self.loader_config, train=False, max_pairs=self._max_pairs,
                                        name="data")
            preflight.check_data(self.tuned, None, data, self.mesh, self.preference)  # as __init__ checks eval_data
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation data: pass eval_data to the Trainer or data to evaluate()")
        to_device = functools.partial(self.to_device, split="eval")
        return evaluate(self.eval_step, self.trainable if trainable is None else trainable, self.frozen, data,
                        self.task, to_device=to_device)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train to the configured steps (resuming from ``run_dir``), evaluate, report.

        A run directory made by another model, plan, data or shapes is refused (:meth:`check_resume`)
        before anything in it changes."""
        # each process reads the run directory on its own (one that cannot, on its host, stops the others)
        with processes.ready_together(lambda: "checking the run directory, before training"):
            preflight.check_fit(self.config, self.train_data, self.eval_data)
            self.check_resume()
            self.run.create().write_config(self.resolved_config)
            self.run.write_identity(self.identity())
        with self.status.stop_together(lambda: "scoring the base model, before training", lambda: self.step):
            before = scores.score_base(self)
        iterator = iter(self.train_data) if self.train_data is not None else iter(())
        self._training_pass = iterator  # the pass training reads now (:meth:`_another_pass` opens the next)
        try:
            return self._fit(iterator, before)
        finally:  # every exit (finished, stopped, failed, raised): its prefetch threads and worker processes end
            self._close_pass(self._training_pass)

    def _close_pass(self, iterator: Any) -> None:
        """Close a pass over the training data that :meth:`fit` opened (not the caller's own iterator)."""
        if iterator is not self.train_data and callable(getattr(iterator, "close", None)):
            iterator.close()

    def _another_pass(self, spent: Any) -> Any | None:
        """The next pass over training data that ran out (``spent``) before ``train.steps``, as
        transformers' Trainer takes as many epochs as its ``max_steps`` needs; None for data read once
        (an iterator or a generator, whose ``iter()`` is itself) or a pass that holds no batch."""
        fresh = iter(self.train_data)
        if fresh is spent:
            return None
        self._close_pass(spent)
        self._training_pass = fresh
        log.info("training data: a new pass over it at step %d of %d", self.step, self.steps)
        return fresh

    def _fit(self, iterator: Any, before: dict[str, float] | None) -> FitResult:
        """:meth:`fit` on the training ``iterator`` it opened, once the run directory is ready; ``before``:
        the base model's scores. Any checkpoint (the iterator's position included) is written before this returns."""
        self.close()
        self._resumable_data = hasattr(iterator, "get_state")
        with processes.ready_together(lambda: "restoring the latest checkpoint",
                                      lambda message: self.status.stopped_by_another(message, self.step)):
            best = self._resume(iterator)
        previous_status = self.run.status() or {}
        previous = previous_status.get("state")
        try:
            if best.out_of_patience(self.eval_config.early_stopping_patience):  # stopped early: stays stopped
                log.info("stopped early at step %d (%s has not improved for %d evaluations): nothing to train; "
                         "raise eval.early_stopping_patience to train on", self.step, self.eval_config.best_metric,
                         best.bad_evals)
                state, train_metrics, eval_metrics = "early_stopped", {}, {}
            elif self.step >= self.steps:
                log.info("already trained to step %d of %d: nothing to train", self.step, self.steps)
                state = previous if previous in ("finished", "early_stopped") else "finished"
                train_metrics, eval_metrics = {}, {}
            else:
                state, train_metrics, eval_metrics = self._train(iterator, best)
        except Exception as err:  # the run is gone: say so where status readers look, then raise
            self.status.write("failed", self.step, error=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.close()
        if state not in ("failed",):
            # a run with nothing left to train keeps the last training and evaluation it reported
            self.status.write(state, self.step, train=train_metrics or previous_status.get("train", {}),
                              eval=eval_metrics or previous_status.get("eval", {}), best_step=best.step,
                              best_value=best.value)
        result = FitResult(self.model, self.step, self.steps, state, train_metrics, eval_metrics,
                           {"step": best.step, "value": best.value, "metric": self.eval_config.best_metric}
                           if best.step is not None else None, before=before,
                           failed_step=self.failed_step if state == "failed" else None)
        if state in ("finished", "early_stopped"):
            with self.status.stop_together(lambda: f"scoring the trained model (step {self.step})", lambda: self.step):
                self._finish(result)
            self.run.close()  # the final evaluation's record
        return result

    def identity(self) -> dict[str, Any]:
        """What this trainer knows makes its run (``run.json``): the model's source, the plan's
        rules, the trainable params' shapes, the optimizer state's structure and the data's shapes."""
        leaves = jax.tree_util.tree_flatten_with_path(self.trainable)[0]
        state = jax.tree.leaves(self.opt_state)
        layout = str(jax.tree.structure(self.opt_state)) + str([(x.shape, str(x.dtype)) for x in state])
        identity: dict[str, Any] = {
            "model": self.tuned.source,
            "plan rules": self.tuned.plan.to_data(),
            "labels": list(self.tuned.label_names) if self.tuned.label_names is not None else None,
            "params": {jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)}" for path, x in leaves},
            "optimizer state": f"{len(state)} arrays, layout #{hashlib.sha256(layout.encode()).hexdigest()[:12]}",
            "train.seed": self.config.seed,
            "train.grad_accum_steps": self.config.grad_accum_steps,
        }
        if isinstance(self.train_data, Loader):
            cfg = self.train_data.config
            identity.update({"data.kind": self.train_data.source.kind, "data.max_length": cfg.max_length,
                             "data.batch_size": cfg.batch_size,
                             # resolved (data.packing null packs by kind); a new key, which run directories
                             # written before it was resolved (their "data.packing") are not compared on
                             "data.packed": self.train_data.packs,
                             # which rows (a packaged dataset's data.validation_size draws other training rows)
                             "data.rows": f"{len(self.train_data.source)} rows #{self.train_data.source.digest()}"})
        return identity

    def check_plan(self) -> None:
        """Refuse a run directory whose checkpoints hold another plan's params
        (see :meth:`~jaxtune.training.rundir.RunDir.check_plan`)."""
        self.run.check_plan(self.identity())

    def check_resume(self) -> None:
        """Refuse a run directory made by another model, plan, data or shapes, naming every difference
        (see :meth:`~jaxtune.training.rundir.RunDir.check_resume`)."""
        self.run.check_resume(self.resolved_config, self.identity())

    def _resume(self, iterator: Any) -> Best:
        restored = self.checkpointer.restore(self.trainable, self.opt_state, data_iterator=iterator)
        self.run.rewind(restored[0] if restored is not None else 0)  # the steps after it are trained again
        kept = self.checkpointer.forget_best_after(restored[0] if restored is not None else 0)
        if restored is None:
            return Best(self.eval_config.best_metric)
        self.step, self.trainable, self.opt_state, self.rng, meta = restored
        self._saved_step = self.step
        saved = meta.get("metrics", {})
        log.info("resumed from %s at step %d", self.run_dir / "checkpoints" / str(self.step), self.step)
        best = Best.restored(saved, self.eval_config.best_metric)
        if best.step is not None and best.step not in kept:  # a later attempt's best replaced it (one is kept)
            if best.step == self.step:  # these are its weights
                self.checkpointer.save_best(self.step, self.trainable, saved)
            else:
                log.warning("the best checkpoint (step %d) was replaced by an attempt that got further and is gone; "
                            "a better evaluation saves a new one, else the run ends with its last params",
                            best.step)
        return best

    def _save(self, iterator: Any, best: Best, metrics: dict[str, Any]) -> None:
        """Checkpoint the current state; every caller has first read the steps' finite flags (status.non_finite)."""
        if self.step == self._saved_step:
            # This very state is on disk (a periodic save just before a Ctrl-C or the end of the
            # data, or the checkpoint the run resumed from), and Orbax refuses a step twice.
            return
        # The frozen base is not in the checkpoint: its source is, so resuming re-reads it.
        config = {"base_model": self.tuned.source, **self.resolved_config}
        self.checkpointer.save(self.step, self.trainable, self.opt_state, self.rng, data_iterator=iterator,
                               config=config, metrics={**best.as_metadata(), **metrics})
        self._saved_step = self.step

    def _train(self, iterator: Any, best: Best) -> tuple[str, dict[str, float], dict[str, float]]:
        """The step loop; returns ``(state, last train metrics, last eval metrics)``."""
        cfg, ck = self.config, self.checkpoint_config
        state, train_metrics, eval_metrics, pending = "finished", {}, {}, []
        window = Throughput()
        self.status.write("running", self.step)
        try:
            # another process's error (its loader, a callback) stops this one, not a collective it never joins
            stop_together = self.status.stop_together(lambda: f"after step {self.step} of {self.steps}",
                                                      lambda: self.step)
            with stop_together, StopOnInterrupt(self.step) as interrupt:
                while self.step < self.steps:
                    if interrupt.stop_now(self.step):
                        state = "stopped"
                        break
                    batch = next(iterator, None)
                    if batch is None and (again := self._another_pass(iterator)) is not None:
                        iterator, batch = again, next(again, None)
                    if batch is None:
                        log.warning("the training data ran out at step %d of train.steps %d: it can be read once (an "
                                    "iterator or a generator), or a pass over it holds no batch; give train.steps "
                                    "%d, or data that can be read again (a list, a Loader)", self.step, self.steps,
                                    self.step)
                        break
                    pending.append(self._one_step(batch, window))
                    last = self.step == self.steps
                    evaluates = self.eval_data is not None and self.eval_config.every and (
                        self.step % self.eval_config.every == 0 or last)
                    saves = ck.every and self.step % ck.every == 0
                    logs = self.step % cfg.log_every == 0 or last
                    # The host reads whether the steps so far were finite before it logs, evaluates or
                    # saves, so that a non-finite step stops the run before its state is used or written.
                    if (logs or evaluates or saves) and (
                            failed := self.status.non_finite(pending, self.step, self.checkpointer)):
                        return failed, train_metrics, eval_metrics
                    if logs:
                        host, pending = jax.device_get(pending), []
                        window.add(sum(float(m["tokens"]) for m in host), len(host))
                        train_metrics = self.records.record(host, self.step, *window.read())
                        self.run.log(train_metrics)
                        self.status.write("running", self.step, train=train_metrics, eval=eval_metrics,
                                          best_step=best.step)
                        for callback in self.callbacks:
                            callback(self, self.step, train_metrics)
                    if evaluates:
                        with window.paused():
                            self._recalibrate()
                            eval_metrics = self._evaluate_and_track(best)
                        if best.out_of_patience(self.eval_config.early_stopping_patience):
                            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at "
                                     "step %d)", self.step, self.eval_config.best_metric, best.bad_evals, best.value,
                                     best.step)
                            state = "early_stopped"
                            break
                    if saves and not last:
                        with window.paused():
                            self._save(iterator, best, eval_metrics)
                # steps since the last reading (the data ran out, a Ctrl-C)
                if failed := self.status.non_finite(pending, self.step, self.checkpointer):
                    return failed, train_metrics, eval_metrics
                if state == "stopped":
                    # not recalibrated: the resumed run goes on from these very params
                    log.warning("interrupted at step %d%s; saving a checkpoint to resume from", self.step,
                                f" ({interrupt.by} was)" if interrupt.by and not interrupt.requested else "")
                else:
                    self._recalibrate()
                self._save(iterator, best, eval_metrics)
        except KeyboardInterrupt:  # a second Ctrl-C
            state = "stopped"
            # mid-step; or with several processes, which stop_together ended (a save would wait for them)
            if processes.several() or any(x.is_deleted() for x in jax.tree.leaves(self.trainable)):
                log.warning("interrupted during step %d; nothing saved, resume from checkpoint %s", self.step + 1,
                            self.status.resume_point(self.checkpointer))
            elif failed := self.status.non_finite(pending, self.step, self.checkpointer):
                state = failed  # a step since the host last read them was not finite
            else:
                log.warning("interrupted at step %d; saving a checkpoint to resume from", self.step)
                self._save(iterator, best, eval_metrics)
        finally:
            self.checkpointer.wait()
        return state, train_metrics, eval_metrics

    def _recalibrate(self) -> None:
        """Re-estimate the trained BatchNorms' statistics for these weights (``train.recalibrate_batch_norm``
        batches from the start of the training data), once per step: before an evaluation and the final save."""
        n = self.config.recalibrate_batch_norm
        if not n or self._recalibrated_step == self.step:
            return
        batches = (self.to_device(batch) for batch in itertools.islice(iter(self.train_data), n))
        new = recalibrate(self.trainable, batches, self._statistics_step, lambda tr: combine(tr, self.frozen))
        self.trainable = shard(new, self._trainable_shardings)
        self._recalibrated_step = self.step

    def _one_step(self, batch: Batch, window: Throughput) -> dict[str, jax.Array]:
        self.records.observe(batch)
        step_rng = jax.random.fold_in(self.rng, self.step)
        hits = compile_cache.hits()  # the first call compiles (or loads) the step before dispatching it
        batch = self.to_device(batch, "train")
        if self.memory is None and hasattr(self.train_step, "lower"):  # a jitted step (not a caller's wrapper)
            self._report_memory(batch, step_rng)
        self.trainable, self.opt_state, metrics = self.train_step(self.trainable, self.frozen, self.opt_state, batch,
                                                                  step_rng)
        self.step += 1
        if window.first_step_s is None:
            seconds = window.first_step(float(jax.device_get(metrics["tokens"])))  # waits for the step
            self.compile_cache_hit = compile_cache.hits() > hits
            if self.config.progress:
                log.info("step %d took %.1f s (%s)", self.step, seconds, "compiled step loaded from the cache"
                         if self.compile_cache_hit else "compilation included")
        return metrics

    def _report_memory(self, batch: dict[str, jax.Array], rng: jax.Array) -> None:
        """Compile the step (jit keeps the executable, so the step's first call does not compile
        again) and log its memory per device; the run's status keeps it (``memory``)."""
        args = (self.trainable, self.frozen, self.opt_state, batch, rng)
        width = batch["input_ids"].shape[-1] if "input_ids" in batch else None
        self.status.memory = memory.step_memory(self.train_step.lower(*args).compile(), *args[:3], tokens=width)
        note = memory.offload_note(getattr(self.tuned.config, "remat", "none"), self.status.memory.backend)
        if note:
            log.warning("%s", note)
        log.info("%s", self.status.memory.line())
        data = getattr(self.train_data, "config", None)
        if getattr(data, "pad_to_multiple_of", None) is not None and width is not None and width < data.max_length:
            log.info("data.pad_to_multiple_of cuts each batch to its longest row: wider batches compile again and "
                     "need more (jaxtune plan-memory gives the step for rows of data.max_length=%d tokens)",
                     data.max_length)

    def _evaluate_and_track(self, best: Best) -> dict[str, float]:
        metrics = {f"eval/{k}": v for k, v in self.evaluate().items()}
        self.run.log({"step": self.step, **metrics})
        log.info("step %d validation: %s", self.step, metrics_line(metrics))
        name = self.eval_config.best_metric
        if name:
            value = metrics.get(f"eval/{name.removeprefix('eval/')}")
            bare = name.removeprefix("eval/")
            higher = HIGHER_IS_BETTER.get(bare, HIGHER_IS_BETTER.get(bare.split("/")[-1], False))
            if best.update(value, self.step, higher):
                self.checkpointer.save_best(self.step, self.trainable, metrics)
        return metrics

    def _finish(self, result: FitResult) -> None:
        """The final model (best or last), its evaluation and the report."""
        if self.eval_config.use_best and result.best is not None:
            try:
                self.restore(best=True)
            except RunDirError:  # it failed verification and was set aside (reported): the latest params stay
                log.warning("the best checkpoint (step %d) was damaged and set aside; the run ends with its latest "
                            "params (step %d)", result.best["step"], self.step)
            else:
                log.info("using the best checkpoint (step %d, %s %.4f)", result.best["step"], result.best["metric"],
                         result.best["value"])
                result.model = dataclasses.replace(self.model, step=result.best["step"])
            self.close()
        scores.score_final(self, result)

"""The Trainer: a planned model, data and a run directory in; the trained model and its report out.

::

    result = Trainer(model, train, eval_data=val, run_dir="runs/chat",
                     config=TrainConfig(epochs=1), data=LoaderConfig(batch_size=8, max_length=1024)).fit()
    result.model    # the trained jaxtune.Tuned (export it with jaxtune.export)
    result.report   # base vs fine-tuned metrics, as a markdown table

This module builds the trainer (what it trains, on which mesh, with which steps) and holds its
state, restore and evaluation. ``fit`` (:mod:`jaxtune.training.fitting`) is a short loop of named
steps: score the base model (once per run directory), resume from the latest checkpoint, train (jit
once, donate buffers, read metrics only every ``log_every`` steps), evaluate and keep the best, stop
early, checkpoint, then score the fine-tuned model. Everything it writes lives in ``run_dir`` (see
:mod:`jaxtune.training.rundir`); running ``fit`` again on the same directory resumes exactly, and a
finished run is a no-op. What the constructor settles before any compute (loaders, the number of
steps, the checks that refuse data, a mesh or an evaluation that does not fit the model) is
:mod:`jaxtune.training.preflight`; the base and fine-tuned scores, each computed once, are
:mod:`jaxtune.training.scores`; the run's status and the ways a run fails (a non-finite step,
another process's error) are :mod:`jaxtune.training.run_status`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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
from jaxtune.training import compile_cache, preflight
from jaxtune.training.batch_norm import make_statistics_fn
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.evaluate import evaluate
from jaxtune.training.fitting import Fitting
from jaxtune.training.loop import TrainRecords
from jaxtune.training.memory import StepMemory
from jaxtune.training.optim import OptimizerConfig, build_optimizer
from jaxtune.training.preference import make_preference_loss_fn
from jaxtune.training.preference_config import PreferenceConfig, host_keys, unread_margins
from jaxtune.training.preference_reference import REFERENCE_KEY, reference_caches, with_reference_start
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


class Trainer(Fitting):
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
            # the placed leaves, not the ones given (host arrays, or device ones placed again): those are freed
            self.tuned = model = dataclasses.replace(model, params=self.params)
            del trainable, frozen
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

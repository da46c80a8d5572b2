"""What :meth:`Trainer.fit <jaxtune.training.trainer.Trainer.fit>` runs: the run directory checked, the
base model scored, the latest checkpoint resumed, the step loop (jit once, donate buffers, read metrics
only every ``log_every`` steps; evaluate and keep the best, stop early, checkpoint, stop on Ctrl-C), and
the final model scored. A mixin of the :class:`~jaxtune.training.trainer.Trainer`, whose constructor
sets up the state it runs on (annotated below); the trainer's own methods it calls (``evaluate``,
``restore``, ``close``...) are the Trainer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import jax

from jaxtune import processes
from jaxtune.training import compile_cache, memory, preflight, scores
from jaxtune.training.batch_norm import recalibrate
from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
from jaxtune.training.evaluate import HIGHER_IS_BETTER, metrics_line
from jaxtune.training.loop import Best, InFlight, StopOnInterrupt, Throughput, TrainRecords
from jaxtune.training.result import FitResult
from jaxtune.training.run_status import RunStatus
from jaxtune.training.rundir import RunDir, RunDirError
from jaxtune.training.sharding import shard
from jaxtune.tuning.partition import combine
from jaxtune.tuning.tuned import Tuned

log = logging.getLogger("jaxtune.training.trainer")  # the trainer's log, as the user configures it
Batch = dict[str, Any]
# An error or a second Ctrl-C on one of several processes while a checkpoint save is in flight (waited for first)
SAVE_IN_FLIGHT = (
    "waiting for the checkpoint save in flight before stopping the other processes (every process takes part); "
    "press Ctrl-C again to stop them now: told, they wait for this one only JAX's distributed shutdown timeout "
    "(300 s), and a save that takes longer is lost, every process ending with JAX's 'Shutdown barrier has failed'")


class Fitting:
    """The training run of a :class:`~jaxtune.training.trainer.Trainer` (mixed into it)."""

    # set up by the Trainer's constructor
    tuned: Tuned
    config: TrainConfig
    eval_config: EvalConfig
    checkpoint_config: CheckpointConfig
    train_data: Any
    eval_data: Any
    steps: int
    step: int
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    run: RunDir
    resolved_config: dict[str, Any]
    callbacks: list[Any]
    status: RunStatus
    records: TrainRecords
    train_step: Any
    compile_cache_hit: bool | None
    _statistics_step: Any
    _trainable_shardings: Any
    _recalibrated_step: int | None
    _saved_step: int | None
    _training_pass: Any
    _resumable_data: bool
    _in_flight: InFlight

    def fit(self) -> FitResult:
        """Train to the configured steps (resuming from ``run_dir``), evaluate, report.

        A run directory made by another model, plan, data or shapes is refused (:meth:`check_resume`)
        before anything in it changes."""
        # each process reads the run directory on its own (one that cannot, on its host, stops the others)
        with processes.ready_together(lambda: "checking the run directory, before training"):
            preflight.check_fit(self.config, self.train_data, self.eval_data)
            self.check_resume()
            changes = self.run.changes(self.resolved_config)
            if changes:
                log.info("resume: this config changes the run's %s (rewritten now): %s", RunDir.CONFIG,
                         "; ".join(changes))
            self.run.create().write_config(self.resolved_config)
            self.run.write_identity(self.identity())
        where = "scoring the base model, before training"
        with self._failing_outside_loop(where), self.status.stop_together(lambda: where, lambda: self.step,
                                                                          training=False):
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
        where = "restoring the latest checkpoint"
        with self._failing_outside_loop(where), processes.ready_together(
                lambda: where, self.status.on_stop(lambda: self.step, training=False)):
            best = self._resume(iterator)
        self._in_flight = InFlight(self.step)
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
            self.status.write("failed", self._finished_step(), error=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.close()
        if state not in ("failed",):
            # a run with nothing left to train keeps the last training and evaluation it reported
            self.status.write(state, self._finished_step(), train=train_metrics or previous_status.get("train", {}),
                              eval=eval_metrics or previous_status.get("eval", {}), best_step=best.step,
                              best_value=best.value)
        result = FitResult(self.model, self.step, self.steps, state, train_metrics, eval_metrics,
                           {"step": best.step, "value": best.value, "metric": self.eval_config.best_metric}
                           if best.step is not None else None, before=before,
                           failed_step=self.failed_step if state == "failed" else None)
        if state in ("finished", "early_stopped"):
            where = f"scoring the trained model (step {self.step})"
            # ready together: a process done with its share (scored from what it holds) waited for no other, and
            # ended the program as finished while another's error there failed the run
            with self._failing_outside_loop(where), processes.ready_together(
                    lambda: where, self.status.on_stop(lambda: self.step, training=False)):
                self._finish(result)
            self.run.close()  # the final evaluation's record
        return result

    @contextlib.contextmanager
    def _failing_outside_loop(self, where: str) -> Iterator[None]:
        """This process's error ``where`` (restoring or scoring around the step loop) marks the run failed, as
        another process's error there does (its watcher, ``on_stop``): the status says so on every process count."""
        try:
            yield
        except Exception as err:
            self.status.failed_outside_loop(f"failed {where}: {type(err).__name__}: {err}", self.step)
            raise

    def _finished_step(self) -> int:
        """The step the status names when the run ends: on one process every step dispatched finishes (the
        trainer's count); on several, the last that finished (:class:`~jaxtune.training.loop.InFlight`), as a
        step dispatched when another process stopped (a second Ctrl-C, an error) never does."""
        return self._in_flight.finished() if processes.several() else self.step

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
                                                      self._in_flight.finished, training=True,
                                                      settle=self._finish_saving)
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
                        self._in_flight.read(self.step)
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

    def _finish_saving(self) -> None:
        """On several processes, as this one stops (an error, a second Ctrl-C): wait for a checkpoint save in flight
        before the others are told to stop (:func:`~jaxtune.processes.stop_together`'s ``settle``), as they wait
        for this process only JAX's shutdown timeout. One process waits for it as it stops."""
        if self._checkpointer is not None and self._checkpointer.saving():
            log.warning("%s", SAVE_IN_FLIGHT)
            self._checkpointer.wait()

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
        self._in_flight.dispatched(self.step + 1, metrics["finite"])  # before the count: a Ctrl-C may come between
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

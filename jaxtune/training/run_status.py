"""The run's status as it trains, and the ways a run ends badly.

``status.json`` is written by the training loop and, on several processes, by the watcher thread
that learns of another process's error or second Ctrl-C (:func:`jaxtune.processes.stop_together`) while
the loop may still log a step: one lock orders them, and once that is written nothing the loop writes
replaces it. A step whose loss, gradient or update is not finite fails the run, named in the log and
the status with the last good checkpoint; a run stopped mid-step names the checkpoint it resumes from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import jax

from jaxtune import processes
from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.memory import StepMemory
from jaxtune.training.rundir import RunDir

log = logging.getLogger("jaxtune.training.trainer")


class RunStatus:
    """One run's ``status.json`` and its failures, for the :class:`~jaxtune.training.trainer.Trainer`.

    Args:
      run: the run directory the status is written to.
      total_steps: the steps the run trains to, in every status.

    It holds nothing of the trainer (the step, the checkpointer come with each call): a trainer nobody
    holds any more frees its arrays at once, not at the next cyclic garbage collection.
    """

    def __init__(self, run: RunDir, total_steps: int) -> None:
        self.run = run
        self.total_steps = total_steps
        self.memory: StepMemory | None = None  # the compiled train step's bytes per device (first step)
        self.failed_step: int | None = None  # the non-finite step that failed the run
        # Another process's error, once its watcher thread wrote it (stopped_by_another): the loop, still
        # running until that thread ends the process, writes no status over it.
        self._stopped_by: str | None = None
        self._lock = threading.Lock()

    def write(self, state: str, step: int, **fields: Any) -> None:
        """``status.json`` with the compiled step's memory (:attr:`memory`, or the run's earlier one); not
        once another process's error is there (:meth:`stopped_by_another`)."""
        with self._lock:
            if self._stopped_by is None:
                self._write_unlocked(state, step, **fields)

    def _write_unlocked(self, state: str, step: int, **fields: Any) -> None:
        report = self.memory.as_dict() if self.memory is not None else (self.run.status() or {}).get("memory")
        self.run.write_status(state, step=step, total_steps=self.total_steps, **fields,
                              **({"memory": report} if report else {}))

    def stop_together(self, where: Callable[[], str], step: Callable[[], int], *, training: bool,
                      settle: Callable[[], None] | None = None) -> Any:
        """:func:`~jaxtune.processes.stop_together` for this run: another process's error (or second Ctrl-C)
        marks its status, at the trainer's ``step()`` then (:meth:`on_stop`); ``settle`` as there."""
        return processes.stop_together(where, self.on_stop(step, training=training), settle)

    def on_stop(self, step: Callable[[], int], *, training: bool) -> Callable[[str, bool], None]:
        """What another process's error or Ctrl-C does to the status (``on_stop`` of
        :func:`~jaxtune.processes.stop_together`): :meth:`stopped_by_another` at the trainer's ``step()``;
        ``training``: in the step loop, not restoring or scoring around it."""
        return lambda message, interrupted: self.stopped_by_another(message, step(), interrupted=interrupted,
                                                                    training=training)

    def stopped_by_another(self, message: str, step: int, *, interrupted: bool = False, training: bool = True) -> None:
        """Another process failed (``message``, :func:`~jaxtune.processes.stop_together`): the run's status says
        so. Or it was interrupted at once (``interrupted``: a second Ctrl-C in the step loop, any outside it,
        where nothing waits for a step boundary to save): in the step loop (``training``) the
        run stopped, as one process's run interrupted so does, keeping the training and evaluation it last
        reported (a Ctrl-C is no error); outside it (restoring a checkpoint, scoring the model before or after
        training) the status stays as it was, as one process's KeyboardInterrupt there leaves it: the training
        it describes did not change, and ``step`` is not yet the run's while it restores. An error outside it
        marks the run failed as :meth:`failed_outside_loop` does. Either way nothing the loop writes later
        replaces it."""
        with self._lock:
            self._stopped_by = message
            if not training:
                if not interrupted:
                    self._failed_as_it_was(message, step)
                return
            if not interrupted:
                self._write_unlocked("failed", step, error=message)
                return
            self._write_unlocked("stopped", step, **self._reports())

    def failed_outside_loop(self, message: str, step: int) -> None:
        """This process's error outside the step loop (restoring the latest checkpoint, scoring the model
        before or after training): the run failed
        with ``message``, at the step and with the training and evaluation its status last reported,
        as another process's error there is written (:meth:`stopped_by_another`); not once that is there.
        The trainer's ``step`` (0 while it restores) is the status's only where it names none: a failed
        attempt to resume a run left it at step 0 of a run whose checkpoint and status said more."""
        with self._lock:
            if self._stopped_by is None:
                self._failed_as_it_was(message, step)

    def _failed_as_it_was(self, message: str, step: int) -> None:
        last = self.run.status() or {}
        self._write_unlocked("failed", last.get("step", step), error=message, **self._reports(last))

    def _reports(self, last: dict[str, Any] | None = None) -> dict[str, Any]:
        """The training and evaluation the status (``last``, else the file's) reported, to keep in the next."""
        if last is None:
            last = self.run.status() or {}
        return {k: last[k] for k in ("train", "eval", "best_step", "best_value") if k in last}

    def non_finite(self, pending: list[dict[str, jax.Array]], step: int, checkpointer: Checkpointer) -> str | None:
        """``"failed"`` (logged, and written to the status) when one of the ``pending`` steps (the
        last ``len(pending)`` ones up to ``step``) was not finite; None otherwise. The host waits for them."""
        finite = jax.device_get([m["finite"] for m in pending])
        bad = next((i for i, ok in enumerate(finite) if not ok), None)
        if bad is None:
            return None
        return self._failed(step - len(pending) + bad + 1, jax.device_get(pending[bad]), checkpointer)

    def _failed(self, bad_step: int, metrics: dict[str, Any], checkpointer: Checkpointer) -> str:
        self.failed_step = bad_step
        good = checkpointer.latest_good_step()
        what = ("the loss or gradient is not finite (nan/inf)" if not metrics["grad_finite"] else
                "the update made the params or optimizer state non-finite (nan/inf)")
        message = (f"step {bad_step}: {what}; training stopped, and no state from that step on was saved or "
                   f"evaluated. Last good checkpoint: {good if good is not None else 'none'}. Lower the learning "
                   "rate or check the data.")
        log.error("%s", message)
        # The host reads the finite flags only to log, evaluate or save, so the trainer's step may be past
        # bad_step: the status gives the failed step and the last good one, not the step it read them at.
        self.write("failed", bad_step - 1, failed_step=bad_step, error=message)
        return "failed"

    def resume_point(self, checkpointer: Checkpointer) -> str:
        """The checkpoint a run stopped mid-step resumes from, for its last log line. Verifying it takes
        every process (process 0 hashes, all learn the verdict): a process interrupted alone, the
        others still inside the step's collectives, would wait there for ever, so with several
        processes the newest step is named unverified. A save in flight is waited for first, as
        :meth:`~jaxtune.training.checkpoint.Checkpointer.latest_good_step` does on one process: else the step
        it lands is not named. That needs the others' save threads (Orbax's barriers in the distributed
        service's key-value store, not device collectives), which live on: a process told of this one's
        interruption waits for it in ``jax.distributed.shutdown`` (:func:`~jaxtune.processes.stop_together`),
        for JAX's shutdown timeout: a save is waited for before they are told
        (:data:`~jaxtune.training.fitting.SAVE_IN_FLIGHT`)."""
        if processes.several():
            checkpointer.wait()
            steps = checkpointer.steps()
            return f"{steps[-1]} (if its files verify)" if steps else "(none: starts over)"
        good = checkpointer.latest_good_step()
        return str(good) if good is not None else "(none: starts over)"

"""The training loop's small concerns, each an object with a one-line call: Ctrl-C handling,
the steps dispatched and not yet read back, the throughput window, the best evaluation so far, and
the record (and progress line) of each log window."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax

from jaxtune import processes
from jaxtune.training import flops
from jaxtune.tuning.tuned import Tuned, is_image

log = logging.getLogger("jaxtune.training.trainer")


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only asks to stop: the loop stops at the next step
    boundary (:meth:`stop_now`). A KeyboardInterrupt raised mid-step could land after the jitted step
    consumed (donated) the params but before its results were stored, leaving nothing to save.
    Several JAX processes stop at one step, the first every process can reach once any of them was
    interrupted (:class:`~jaxtune.processes.AgreedStop`): one stopping alone to save would leave the
    others waiting in the next step's collectives. A second Ctrl-C interrupts at once (with several
    processes, every one: :func:`~jaxtune.processes.stop_together`). Outside the main thread, signals
    are left alone."""

    def __init__(self, step: int) -> None:
        self._stop = processes.AgreedStop()
        self._step = step
        self._previous: Any = None

    @property
    def requested(self) -> bool:
        """Whether this process was interrupted."""
        return self._stop.asked

    @property
    def by(self) -> str | None:
        """The process that asked to stop, as far as this one knows (several processes only)."""
        return self._stop.by

    def _handle(self, signum: int, frame: Any) -> None:
        if self._stop.asked:
            raise KeyboardInterrupt
        self._stop.ask()
        several = processes.several()
        log.warning("Ctrl-C: stopping after this step%s and saving a checkpoint (press again to stop at once%s)",
                    ", with the other processes," if several else "", ", every process, unsaved" if several else "")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        self._stop.start(self._step)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        self._stop.close()

    def stop_now(self, step: int) -> bool:
        """Whether the loop stops before the step after ``step``: once Ctrl-C was pressed (on one process),
        at the agreed step (on several)."""
        return self._stop.stop_before(step)


# How long a status written as another process stops waits for this process's steps still running (InFlight).
SETTLE_S = 5.0


class InFlight:
    """The steps the host dispatched and has not read back: which step finished last, for a status written
    while some may still run.

    The trainer counts a step once its host dispatches it (JAX runs it asynchronously, and between log steps
    a host may be a few steps ahead of its devices). A status written then (another process's watcher thread,
    a second Ctrl-C or an error on several processes) named that count, a step that may never finish: one
    waiting in a collective for a process that stopped. ``jaxtune status`` then said a step was done that the
    checkpoint and the logged metrics do not have. Steps finish in the order they were dispatched."""

    def __init__(self, step: int) -> None:
        self._read = step  # every step up to this one finished (the host read its results)
        self._steps: list[tuple[int, jax.Array]] = []  # (step, one of its outputs), in dispatch order

    def dispatched(self, step: int, output: jax.Array) -> None:
        """Step ``step`` was dispatched; ``output`` is ready once it finished."""
        self._steps.append((step, output))  # a watcher thread may be reading the list: appends only

    def read(self, step: int) -> None:
        """The host read the results of every step up to ``step``: they finished."""
        self._read = step
        self._steps = []  # a new list: a watcher thread reading the old one sees steps up to ``step`` only

    def finished(self, wait_s: float = SETTLE_S) -> int:
        """The last step that finished, waiting at most ``wait_s`` in all for steps still running (a watcher
        thread calls it). When another process stops after step k, this process's step k has passed its last
        collective but may still be computing (a loaded host lags): it finishes within a step's time, while
        the step after it waits for the stopped process and never does; reading without waiting named k - 1."""
        last, deadline = self._read, time.monotonic() + wait_s
        for step, output in self._steps:
            if isinstance(output, jax.Array):  # a caller's step may return numpy
                while not output.is_ready():
                    if time.monotonic() >= deadline:
                        return last
                    time.sleep(0.01)
            last = step
        return last


class Throughput:
    """Tokens and steps since the last log line. The first step (which compiles) is timed on its
    own and kept out, and so are evaluations and saves (:meth:`paused`), so tokens/s, MFU and the
    ETA are the steady state."""

    def __init__(self) -> None:
        self.start, self.tokens, self.steps = time.perf_counter(), 0.0, 0
        self.first_step_s: float | None = None
        self._first_tokens = 0.0

    def first_step(self, tokens: float) -> float:
        self.first_step_s = time.perf_counter() - self.start
        self._first_tokens = tokens
        self.start, self.tokens, self.steps = time.perf_counter(), -tokens, -1
        return self.first_step_s

    def add(self, tokens: float, steps: int) -> None:
        self.tokens += tokens
        self.steps += steps

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time inside out of the window: an evaluation or a checkpoint save is not training
        throughput (a save every N steps would otherwise lower the logged tokens/s, MFU and ETA)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - started

    def read(self) -> tuple[float, int, float]:
        """(tokens, steps, seconds) of the window, then start a new one."""
        elapsed = time.perf_counter() - self.start
        window = (self.tokens, self.steps, elapsed)
        if self.steps <= 0:  # nothing but the compiling first step yet
            window = (self._first_tokens, 1, self.first_step_s or elapsed)
        self.start, self.tokens, self.steps = time.perf_counter(), 0.0, 0
        return window


@dataclasses.dataclass
class Best:
    """The best evaluation so far by ``metric`` (``eval.best_metric``), and evaluations since it improved."""

    metric: str | None = None
    value: float | None = None
    step: int | None = None
    bad_evals: int = 0

    def as_metadata(self) -> dict[str, Any]:
        return {"best_metric": self.metric, "best_value": self.value, "best_step": self.step,
                "bad_evals": self.bad_evals}

    @classmethod
    def restored(cls, saved: dict[str, Any], metric: str | None) -> Best:
        """The tracker a checkpoint's metadata (``as_metadata``) holds, for ``metric``; a fresh one where
        it tracked another metric (its best is not comparable) or holds a non-finite best."""
        was = saved.get("best_metric", metric)  # checkpoints written before it was recorded: the same
        if was != metric:
            if saved.get("best_step") is not None:
                log.info("eval.best_metric is %s, was %s: the best checkpoint is chosen anew from this run's "
                         "evaluations", metric, was)
            return cls(metric)
        value = saved.get("best_value")
        if value is not None and not math.isfinite(value):
            return cls(metric)
        return cls(metric, value, saved.get("best_step"), int(saved.get("bad_evals", 0)))

    def update(self, value: float | None, step: int, higher_is_better: bool) -> bool:
        """Track an evaluation's ``value`` at ``step``; True when it is the new best. A missing or
        non-finite value (Pearson's r of constant predictions, say) is neither a best nor a step
        toward early stopping, which would otherwise end a run whose loss still falls."""
        if value is None or not math.isfinite(value):
            log.warning("step %d: %s is %s, so it is not compared for the best checkpoint or early stopping "
                        "(choose another eval.best_metric if it stays so)", step, self.metric, value)
            return False
        if self.value is None or (value > self.value if higher_is_better else value < self.value):
            self.value, self.step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        """Whether ``patience`` evaluations have passed without improving on a best."""
        return patience is not None and self.step is not None and self.bad_evals >= patience


class TrainRecords:
    """The record of each log window: mean loss and gradient norm of its steps, throughput (tokens/s,
    or examples/s for an image model), the learning rate, MFU (language models on a device with a
    known peak), a preference loss's own metrics; with ``progress`` also logged as one line.

    Args:
      tuned: the planned model (its config sizes the FLOPs; its labels say which matmuls train).
      schedule: the learning-rate schedule, or None for a caller's own optimizer.
      steps: the run's total steps (the ETA).
      progress: log each record as a progress line.
    """

    def __init__(self, tuned: Tuned, schedule: optax.Schedule | None, steps: int, *, progress: bool):
        cfg = tuned.config
        self.schedule, self.steps, self.progress = schedule, steps, progress
        self._throughput_key = "examples_per_s" if is_image(cfg) else "tokens_per_s"
        self._mfu = tuned.task == "lm"
        self._peak_flops = flops.peak_flops(dtype=getattr(cfg, "dtype", "float32"))
        self._matmul_params = flops.matmul_params(tuned.params, tuned.labels)
        self._layers = getattr(cfg, "num_layers", 0)
        self._attn_width = getattr(cfg, "num_heads", 0) * getattr(cfg, "head_dim", 0) or getattr(cfg, "hidden_size", 0)
        self._flops_per_token: float | None = None

    def observe(self, batch: dict[str, Any]) -> None:
        """Read the sequence length (what attention costs per token) from the run's first batch."""
        if self._flops_per_token is None:
            self._flops_per_token = flops.train_flops_per_token(
                *self._matmul_params, layers=self._layers, attn_width=self._attn_width,
                seq_len=batch["input_ids"].shape[-1]) if "input_ids" in batch else 0.0

    def record(self, host: list[dict[str, Any]], step: int, tokens: float, steps: int,
               elapsed: float) -> dict[str, Any]:
        """The record of the window's ``host`` metrics (one dict per step, on the host) ending at
        ``step``, from the window's ``tokens``, ``steps`` and ``elapsed`` seconds (:meth:`Throughput.read`)."""
        record: dict[str, Any] = {
            "step": step,
            "loss": float(np.mean([float(m["loss"]) for m in host])),
            "grad_norm": float(np.mean([float(m["grad_norm"]) for m in host])),
            # an image step's work is counted in examples (step.py's "tokens" metric), a text step's in tokens
            self._throughput_key: tokens / max(elapsed, 1e-9),
            "steps_per_s": steps / max(elapsed, 1e-9),
        }
        if "metric_sums" in host[0]:  # the loss's own metrics (preference rewards), means over the window's pairs
            sums = {k: sum(float(m["metric_sums"][k]) for m in host) for k in host[0]["metric_sums"]}
            record.update({k: v / max(sums["pairs"], 1.0) for k, v in sums.items() if k != "pairs"})
        if self.schedule is not None:
            record["learning_rate"] = float(self.schedule(step - 1))
        if self._mfu and self._flops_per_token and self._peak_flops:
            record["mfu"] = record["tokens_per_s"] * self._flops_per_token / (self._peak_flops * jax.device_count())
        if self.progress:
            log.info("%s", progress_line(record, self.steps))
        return record


def progress_line(record: dict[str, Any], steps: int) -> str:
    """One progress line from a train record: step, loss, rewards (preference), lr, tokens/s (images/s), MFU, ETA."""
    remaining = (steps - record['step']) / max(record["steps_per_s"], 1e-9)
    parts = [f"step {record['step']}/{steps}", f"loss {record['loss']:.4f}"]
    if "rewards/accuracy" in record:
        logps = f"; logps {record['logps/chosen']:.2f} / {record['logps/rejected']:.2f}" \
            if "logps/chosen" in record else ""  # a reward model has no log-probs
        parts.append(f"reward acc {record['rewards/accuracy']:.2f} margin {record['rewards/margin']:.3f} "
                     f"(chosen {record['rewards/chosen']:.3f} rejected {record['rewards/rejected']:.3f}{logps})")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"{record['examples_per_s']:.1f} images/s" if "examples_per_s" in record
                 else f"{record['tokens_per_s']:.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(remaining))}")
    return " | ".join(parts)

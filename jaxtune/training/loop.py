"""The training loop's small concerns, each an object with a one-line call: Ctrl-C handling,
the throughput window, the best evaluation so far, and the progress line."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any

log = logging.getLogger("jaxtune.training.trainer")


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``; the loop stops at the
    next step boundary. A KeyboardInterrupt raised mid-step could land after the jitted step
    consumed (donated) the params but before its results were stored, leaving nothing to save.
    A second Ctrl-C interrupts at once. Outside the main thread, signals are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (press again to stop at once)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class Throughput:
    """Tokens and steps since the last log line. The first step (which compiles) is timed on its
    own and kept out, so tokens/s, MFU and the ETA are the steady state."""

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

    def pause(self, seconds: float) -> None:
        self.start += seconds  # evaluation is not training throughput

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
    """The best evaluation so far by ``eval.best_metric``, and evaluations since it improved."""

    value: float | None = None
    step: int | None = None
    bad_evals: int = 0

    def as_metadata(self) -> dict[str, Any]:
        return {"best_value": self.value, "best_step": self.step, "bad_evals": self.bad_evals}


def progress_line(record: dict[str, Any], steps: int) -> str:
    """One progress line from a train record: step, loss, rewards (preference), lr, tokens/s (images/s), MFU, ETA."""
    remaining = (steps - record['step']) / max(record["steps_per_s"], 1e-9)
    parts = [f"step {record['step']}/{steps}", f"loss {record['loss']:.4f}"]
    if "rewards/accuracy" in record:
        parts.append(f"reward acc {record['rewards/accuracy']:.2f} margin {record['rewards/margin']:.3f} "
                     f"(chosen {record['rewards/chosen']:.3f} rejected {record['rewards/rejected']:.3f}; "
                     f"logps {record['logps/chosen']:.2f} / {record['logps/rejected']:.2f})")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"{record['examples_per_s']:.1f} images/s" if "examples_per_s" in record
                 else f"{record['tokens_per_s']:.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(remaining))}")
    return " | ".join(parts)

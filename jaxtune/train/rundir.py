"""The run directory: one schema, written and read here only.

::

    <run_dir>/
      config.yaml      the resolved config of the run (every default filled in)
      status.json      state, step, total steps, latest train/eval metrics, best step, error
      metrics.jsonl    one record per logged step ({"step", "loss", ...}) or evaluation ({"step", "eval/...": ...})
      report.json      base vs fine-tuned metrics ({"before", "after", "step"}), the final report
      checkpoints/<step>/   Orbax checkpoints (see jaxtune.train.checkpoint)
      best/<step>/          the best checkpoint by eval.best_metric
      tensorboard/          TensorBoard events

A run is ``running``, ``finished``, ``failed``, ``stopped`` (Ctrl-C; resumable) or
``early_stopped``. Reading needs no JAX, so ``jaxtune status`` is instant. Only the main
process writes (``main=False`` makes every write a no-op).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

STATES = ("running", "finished", "failed", "stopped", "early_stopped")
STALE_AFTER_S = 600.0


class RunDirError(FileNotFoundError):
    """The path is not a run directory (or has nothing to show yet)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


class RunDir:
    """A run directory's files (see the module docstring)."""

    CONFIG, STATUS, METRICS, REPORT = "config.yaml", "status.json", "metrics.jsonl", "report.json"

    def __init__(self, path: str | Path, *, main: bool = True):
        self.path = Path(path)
        self.main = main

    def create(self) -> RunDir:
        if self.main:
            if self.path.exists() and not self.path.is_dir():
                raise RunDirError(f"{self.path}: the run directory is a file; give a directory path (output.dir)")
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ config

    def write_config(self, data: dict[str, Any]) -> None:
        if self.main and data:
            (self.path / self.CONFIG).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    def config(self) -> dict[str, Any] | None:
        """The saved config as plain data, or None."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return None
        return yaml.safe_load(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ status and metrics

    def write_status(self, state: str, **fields: Any) -> None:
        if self.main:
            _write_json(self.path / self.STATUS, {"state": state, "updated": time.time(), **fields})

    def status(self) -> dict[str, Any] | None:
        status = _read_json(self.path / self.STATUS)
        return status if isinstance(status, dict) else None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl``."""
        if self.main:
            with open(self.path / self.METRICS, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (train records have ``loss``; eval ones ``eval/...``)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line being written right now
        return records

    # ------------------------------------------------------------------ the report

    def write_report(self, before: dict[str, float] | None, after: dict[str, float] | None, step: int) -> None:
        if self.main:
            _write_json(self.path / self.REPORT, {"before": before, "after": after, "step": step})

    def report(self) -> dict[str, Any]:
        """``{"before", "after", "step"}``; missing parts are None (``before`` is cached here
        after the first evaluation of the base model, so a resumed run does not redo it)."""
        return {"before": None, "after": None, "step": None, **(_read_json(self.path / self.REPORT) or {})}

    # ------------------------------------------------------------------ what jaxtune status shows

    def checkpoint_steps(self) -> list[int]:
        return _steps(self.path / "checkpoints")

    def summary(self) -> dict[str, Any]:
        """The run's state as one dict: ``state, step, total_steps, train, eval, tokens_per_s,
        eta_s, best, checkpoints, updated, stale, error``."""
        status = self.status()
        if status is None:
            if not (self.path / self.CONFIG).is_file():
                raise RunDirError(f"{self.path}: not a run directory (no {self.STATUS}); give the output.dir "
                                  "of a jaxtune train run")
            status = {"state": "starting", "step": 0}
        records = self.metrics()
        train = status.get("train") or next((r for r in reversed(records) if "loss" in r), {})
        evals = [r for r in records if any(k.startswith("eval/") for k in r)]
        evaluation = status.get("eval") or (evals[-1] if evals else {})
        total, step, state = status.get("total_steps"), status.get("step", 0), status.get("state", "unknown")
        rate = train.get("steps_per_s")
        eta = (total - step) / rate if state == "running" and rate and total else None
        best_step = status.get("best_step")
        best_dirs = _steps(self.path / "best")
        best = None
        if best_step is not None or best_dirs:
            best = {"step": best_step if best_step is not None else best_dirs[-1], "value": status.get("best_value"),
                    "path": str(self.path / "best")}
        updated = status.get("updated")
        stale = state == "running" and updated is not None and time.time() - updated > STALE_AFTER_S
        return {"run_dir": str(self.path), "state": state, "step": step, "total_steps": total,
                "train": {k: v for k, v in train.items() if k != "step"}, "train_step": train.get("step"),
                "eval": {k.removeprefix("eval/"): v for k, v in evaluation.items() if k != "step"},
                "tokens_per_s": train.get("tokens_per_s"), "eta_s": eta, "best": best,
                "checkpoints": self.checkpoint_steps(), "updated": updated, "stale": stale,
                "error": status.get("error")}

"""The run directory: one schema, written and read here only.

::

    <run_dir>/
      config.yaml      the resolved config of the run (every default filled in)
      status.json      state, step, total steps, latest train/eval metrics, best step, error; a run stopped by
                       a non-finite step: failed_step (that step) and step (the last good one before it)
      metrics.jsonl    one record per logged step ({"step", "loss", ...}) or evaluation ({"step", "eval/...": ...});
                       a resumed run forgets those after its checkpoint's step (it logs them again)
      report.json      base vs fine-tuned metrics ({"before", "after", "step", "evaluated_on"}), the final report
      run.json         what made the run (model, plan, trainable param shapes, data shapes), checked on resume
      checkpoints/<step>/   Orbax checkpoints (see jaxtune.training.checkpoint)
      best/<step>/          the best checkpoint by eval.best_metric
      tensorboard/          TensorBoard events

A run is ``running``, ``finished``, ``failed``, ``stopped`` (Ctrl-C; resumable) or
``early_stopped``. Reading needs no JAX, so ``jaxtune status`` is instant. Only the main
process writes (``main=False`` makes every write a no-op).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from jaxtune.training.events import ScalarWriter

_EVENTS_FILES = itertools.count(1)  # TensorBoard events files this process has opened
STATES = ("running", "finished", "failed", "stopped", "early_stopped")
STALE_AFTER_S = 600.0


# How to start a run afresh, for the command line and Python alike: these errors reach both.
AFRESH = ("start afresh: jaxtune train CONFIG --restart, or finetune(config, restart=True) in Python (either moves "
          "the old run aside), or another output.dir (a Trainer's run_dir)")


class RunDirError(FileNotFoundError):
    """The path is not a run directory (or has nothing to show yet, or a file in it is unreadable)."""


class RunMismatchError(ValueError):
    """A run directory was made by another model, plan, data or shapes than the run resuming it."""


# What a run directory is bound to: resuming with any of these changed is refused (see
# :func:`fixed_fields`). Everything else (steps, epochs, evaluation, logging, checkpoint
# frequency, the mesh, validation data, the optimizer's hyperparameters) may change on resume.
# ``data.packing`` is checked as resolved (the trainer's identity, ``data.packed``), so the default
# (None: by kind) and an explicit equal value match.
FIXED_ON_RESUME: dict[str, tuple[str, ...] | None] = {
    "model": ("path", "dtype", "tokenizer"),
    "plan": None,
    "data": ("dataset", "train", "kind", "train_size", "validation_fraction", "max_length", "batch_size", "seed",
             "pack_window", "truncation", "add_eos", "pad_to_multiple_of", "text_unit", "skip_bad_rows",
             "worker_count", "text_field", "pair_field", "label_field", "messages_field", "prompt_field",
             "completion_field"),
    "optimizer": ("name",),
    "train": ("seed", "grad_accum_steps", "regression_loss"),
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a file (another process checks the run directory while
    the main one writes it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str))


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def fixed_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a resolved config (plain data) that a resume must not change, flattened to
    ``section.field`` (``plan`` whole)."""
    out: dict[str, Any] = {}
    for section, names in FIXED_ON_RESUME.items():
        if section not in config:
            continue
        value = config[section]
        if names is None or not isinstance(value, dict):
            out[section] = value
        else:
            out.update({f"{section}.{name}": value.get(name) for name in names if name in value})
    return out


_WHY = {"optimizer state": "another optimizer, clip_grad_norm switched on or off, other group_lr groups, or another "
                           "jaxtune version that lays the same optimizer's state out otherwise: resume with that "
                           "version, or train on from this run's params with a fresh optimizer, exported by "
                           "jaxtune export RUN_DIR --to DIR, in a new run from DIR",
        "data.rows": "other training rows: other files or lines of them, or another data.validation_size of a "
                     "packaged dataset, which draws its training rows from what the validation rows leave"}


def _brief(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for each key both have with different values (JSON-normalised, so
    tuples equal lists). ``params`` (path -> shape) lists how many differ and the first."""
    out = []
    for key in (k for k in saved if k in now):
        before, after = json.loads(json.dumps(saved[key], default=str)), json.loads(json.dumps(now[key], default=str))
        if key == "plan rules":  # optional only skips a rule that matches nothing, which failed before it existed
            before, after = _without_optional(before), _without_optional(after)
        if before == after:
            continue
        if key == "params" and isinstance(before, dict) and isinstance(after, dict):
            paths = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
            first = paths[0]
            out.append(f"trainable params: {len(paths)} differ, e.g. {first} "
                       f"{before.get(first, 'absent')} -> {after.get(first, 'absent')}")
        else:
            why = f" ({_WHY[key]})" if key in _WHY else ""
            out.append(f"{key}: {_brief(before)} -> {_brief(after)}{why}")
    return out


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A config's fields flattened to ``section.field`` (a section that is not a mapping, ``plan``, whole)."""
    out: dict[str, Any] = {}
    for section, value in config.items():
        if isinstance(value, dict):
            out.update({f"{section}.{name}": field for name, field in value.items()})
        else:
            out[section] = value
    return out


def _without_optional(rules: Any) -> Any:
    """Plan rules (as data) without their ``optional`` flag, which changes no trained parameter: runs made
    before ``freeze_all_but`` set it still open and resume."""
    if not isinstance(rules, list):
        return rules
    return [{k: v for k, v in r.items() if k != "optional"} if isinstance(r, dict) else r for r in rules]


class RunDir:
    """A run directory's files (see the module docstring)."""

    CONFIG, STATUS, METRICS, REPORT = "config.yaml", "status.json", "metrics.jsonl", "report.json"
    IDENTITY, TENSORBOARD = "run.json", "tensorboard"

    def __init__(self, path: str | Path, *, main: bool = True):
        self.path = Path(path)
        self.main = main
        self._events: ScalarWriter | None = None  # the TensorBoard events, opened by the first log

    def check(self) -> None:
        """The path can be a run directory: it and its nearest existing parent are directories."""
        for path in (self.path, *self.path.parents):
            if path.exists():
                if not path.is_dir():
                    what = "the run directory" if path == self.path else f"its parent {path}"
                    raise RunDirError(f"{self.path}: {what} is a file, not a directory; give output.dir a directory "
                                      "path (or move the file)")
                return

    def create(self) -> RunDir:
        if self.main:
            self.check()
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def move_aside(self) -> Path | None:
        """Rename an existing run directory to ``<dir>.old-<time>`` (never deleted), for a fresh
        run at the same path; returns where it went (None when there was nothing to move)."""
        if not self.main or not self.path.exists():
            return None
        self.check()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
        self.path.rename(dest)
        return dest

    # ------------------------------------------------------------------ what made the run

    def write_identity(self, identity: dict[str, Any]) -> None:
        """What the Trainer itself knows made this run (model, plan, param and data shapes)."""
        if self.main:
            _write_json(self.path / self.IDENTITY, identity)

    def check_plan(self, identity: dict[str, Any]) -> None:
        """Refuse a directory whose checkpoints hold another plan's params: the plan rules, labels or
        trainable shapes of ``run.json`` differ from ``identity``'s (what opening a run for its weights
        needs; :meth:`check_resume` compares everything that makes a run, for training on)."""
        saved = {k: v for k, v in (self.identity() or {}).items() if k in ("plan rules", "labels", "params")}
        changed = differences(saved, identity)
        if changed:
            raise RunMismatchError(f"{self.path}: the run was trained with another plan or labels, so its "
                                   f"checkpoints are not this model's: {'; '.join(changed)}; open it with the "
                                   "configuration it was trained with (drop the overrides that change these)")

    def check_resume(self, resolved_config: dict[str, Any], identity: dict[str, Any]) -> None:
        """Refuse to resume a directory made by another model, plan, data or shapes: the fixed fields
        of ``config.yaml`` (:data:`FIXED_ON_RESUME`), or without them ``run.json`` (what a Trainer
        knows makes its run), compared with this run's. A new directory, or one with neither, passes."""
        if not self.path.is_dir():
            return
        # The config's fields say it in the recipe's words; without them, what the trainer knows.
        changed = (differences(fixed_fields(self.config() or {}), fixed_fields(resolved_config))
                   or differences(self.identity() or {}, identity))
        if changed:
            raise RunMismatchError(
                f"{self.path}: this run directory was made by another configuration, so it cannot be resumed: "
                f"{'; '.join(changed)}. Change these back to resume, or {AFRESH}. Steps, epochs, evaluation, "
                "logging, checkpoint frequency, the mesh and the optimizer's hyperparameters may change on resume.")

    def identity(self) -> dict[str, Any] | None:
        path = self.path / self.IDENTITY
        if not path.is_file():
            return None
        identity = _read_json(path)
        if not isinstance(identity, dict):
            raise RunDirError(f"{path}: not valid JSON; it records what made this run: restore it, or {AFRESH}")
        return identity

    def changes(self, resolved_config: dict[str, Any]) -> list[str]:
        """``section.field: saved -> now`` for each field this run's config changes against the run's
        ``config.yaml`` (the ones a resume may change: :meth:`check_resume` refuses the others), a field
        the saved config lacks (written by an older jaxtune) shown as ``(not saved)``; empty for a new
        run. Why: the saved config is rewritten as the run resumes, so this is the one record of it."""
        saved = self.config() if self.path.is_dir() and resolved_config else None  # a Python Trainer has none
        if saved is None:
            return []
        before, after = _fields(saved), _fields(resolved_config)
        return (differences(before, after)
                + [f"{key}: (not saved) -> {_brief(value)}" for key, value in after.items() if key not in before]
                + [f"{key}: {_brief(value)} -> (not set)" for key, value in before.items() if key not in after])

    # ------------------------------------------------------------------ config

    def write_config(self, data: dict[str, Any]) -> None:
        if self.main and data:
            _write_text(self.path / self.CONFIG, yaml.safe_dump(data, sort_keys=False))

    def config(self) -> dict[str, Any] | None:
        """The saved config as plain data, or None."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            raise RunDirError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML; restore the run's "
                              f"config, or {AFRESH}") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path}: not a config (a mapping of sections); restore the run's config, or {AFRESH}")
        return data

    # ------------------------------------------------------------------ status and metrics

    def write_status(self, state: str, **fields: Any) -> None:
        if self.main:
            _write_json(self.path / self.STATUS, {"state": state, "updated": time.time(), **fields})

    def status(self, *, strict: bool = False) -> dict[str, Any] | None:
        """``status.json`` as a dict; None when missing (or, unless ``strict``, unreadable)."""
        path = self.path / self.STATUS
        status = _read_json(path)
        if isinstance(status, dict):
            return status
        if strict and path.exists():
            raise RunDirError(f"{path}: not a valid status file (JSON object); the next jaxtune train of this run "
                              "rewrites it, or delete it to see the run as starting")
        return None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (``{"step", ...}``) to ``metrics.jsonl``, and its finite numbers to the
        TensorBoard events in ``tensorboard/``: a scalar per key, at the record's step."""
        if not self.main:
            return
        with open(self.path / self.METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._open_events().add(record["step"], {key: value for key, value in record.items() if key != "step"
                                          and isinstance(value, int | float) and math.isfinite(value)})

    def rewind(self, step: int) -> None:
        """Forget the records after ``step`` (a run resumed from its checkpoint at ``step`` logs those steps
        again): ``metrics.jsonl`` keeps the earlier ones, and TensorBoard is told the run restarted."""
        records = self.metrics()
        kept = [r for r in records if r.get("step", 0) <= step]
        if not self.main or len(kept) == len(records):
            return
        _write_text(self.path / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        self._open_events().restart(step + 1)

    def _open_events(self) -> ScalarWriter:
        if self._events is None:
            # Events files are named by the second they were opened in: the process and a count over all of
            # the process's run directories tell apart the ones opened within one second (a reopening, or
            # another RunDir of the same path), which would overwrite each other.
            self._events = ScalarWriter(self.path / self.TENSORBOARD, suffix=f".{os.getpid()}.{next(_EVENTS_FILES)}")
        return self._events

    def close(self) -> None:
        """Flush and close the TensorBoard events (a later :meth:`log` opens another events file)."""
        if self._events is not None:
            self._events.close()
            self._events = None

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

    def write_report(self, before: dict[str, float] | None, after: dict[str, float] | None, step: int,
                     evaluated_on: dict[str, Any] | None = None) -> None:
        """``evaluated_on``: what identifies the validation data the metrics were computed on."""
        if self.main:
            _write_json(self.path / self.REPORT, {"before": before, "after": after, "step": step,
                                                  "evaluated_on": evaluated_on})

    def report(self) -> dict[str, Any]:
        """``{"before", "after", "step", "evaluated_on"}``; missing parts are None (``before`` is cached
        here after the first evaluation of the base model, so a resumed run does not redo it)."""
        return {"before": None, "after": None, "step": None, "evaluated_on": None,
                **(_read_json(self.path / self.REPORT) or {})}

    # ------------------------------------------------------------------ what jaxtune status shows

    def checkpoint_steps(self) -> list[int]:
        return _steps(self.path / "checkpoints")

    def best_steps(self) -> list[int]:
        return _steps(self.path / "best")

    def summary(self) -> dict[str, Any]:
        """The run's state as one dict: ``state, step, total_steps, train, eval, tokens_per_s,
        examples_per_s`` (image runs; the other is None), ``eta_s, best, checkpoints, updated, stale,
        error, failed_step`` (the non-finite step that failed the run, ``step`` then the last good one;
        else None), ``memory`` (the compiled step's bytes per device,
        :class:`jaxtune.training.memory.StepMemory` as plain data, once training started)."""
        if not self.path.is_dir():
            what = "a file, not a run directory" if self.path.exists() else "no such run directory"
            raise RunDirError(f"{self.path}: {what}; give the output.dir of a jaxtune train run")
        status = self.status(strict=True)
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
                "tokens_per_s": train.get("tokens_per_s"), "examples_per_s": train.get("examples_per_s"),
                "eta_s": eta, "best": best,
                "checkpoints": self.checkpoint_steps(), "updated": updated, "stale": stale,
                "error": status.get("error"), "failed_step": status.get("failed_step"), "memory": status.get("memory")}

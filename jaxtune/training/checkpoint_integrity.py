"""Whether a checkpoint step can be trusted, and what happens to one that cannot.

Orbax 0.12.8 checks nothing that catches a flipped bit (its only checksum, zarr3's crc32c, covers
the shard index, not the data), hence our own: every committed step holds a checksum manifest
(:data:`MANIFEST`: size and sha256 of every file), written by :func:`write_manifest` just before
Orbax renames the step into place, so a step exists only together with its manifest.
:func:`verify` compares a step with it. A step that fails is moved aside by :func:`move_aside` to
``<dir>/.set_aside/<step>-<time>`` (never deleted). A step whose files verify but that does not
restore into the trees asked for is not damaged: whoever opens it has another plan or optimizer,
so that is an error (:class:`CheckpointMismatchError`) and the step stays.

Several JAX processes (a pod, one shared file system): process 0 alone lists the steps and hashes a
step's files, and every process learns its verdict (one small all-gather, :func:`verified_steps`),
so a multi-GB step is read once to verify it, not once per process; all then try the same step and
learn whether every process could read it (:func:`read_everywhere`). A damaged step is moved aside
by process 0 only after every process has learned the verdict and while they wait for the move, so
no process reads a step that is being moved.

What to restore, and when a step is set aside or only skipped, is
:class:`~jaxtune.training.checkpoint.Checkpointer`'s; this module does not import Orbax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np

from jaxtune.processes import barrier, stacked

MANIFEST = "jaxtune_checksums.json"
SET_ASIDE = ".set_aside"
GONE = "removed while it was read"  # starts the reason of a step that vanished under a reader
# Written (or rewritten, with the commit time) by Orbax at the rename, after the manifest: they
# cannot be in it. Neither holds state; a damaged one fails the restore, which sets the step aside.
_WRITTEN_AFTER_COMMIT = frozenset({"commit_success.txt", "_CHECKPOINT_METADATA"})


@dataclasses.dataclass(frozen=True)
class SetAside:
    """A step moved out of the way: which, why, and where it went (kept for inspection)."""

    step: int
    reason: str
    moved_to: Path


class CheckpointMismatchError(ValueError):
    """An intact checkpoint (every file matches its checksum) that does not restore into the trees
    asked for: another plan, model or optimizer is opening it. It is left where it is."""


@dataclasses.dataclass
class LeafMismatch(Exception):
    """The first leaf of a step's ``part`` (``"params"`` or ``"optimizer state"``) whose shape is not
    the one asked for (``None``: that side has no such leaf), found by whoever compared the step's
    metadata with the trees asked for; :func:`read_everywhere` reports it (:func:`_does_not_fit`)."""

    part: str
    leaf: str
    saved: tuple[int, ...] | None
    asked: tuple[int, ...] | None


def primary() -> bool:
    """Whether this is process 0, the one that lists, hashes, writes and moves checkpoint files."""
    return jax.process_index() == 0


def step_dirs(directory: Path) -> list[int]:
    """Committed steps, oldest first: directories named by an integer. Orbax's temporary
    directories (``<step>.orbax-checkpoint-tmp``) and ``.set_aside`` never match. Read from the
    disk, not a manager's cache, so it also works after the managers are closed."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


# ------------------------------------------------------------------ the manifest


def _listing(step_dir: Path) -> dict[str, Path]:
    """Every file of a step the manifest covers, by path relative to the step."""
    files = {}
    for path in step_dir.rglob("*"):
        rel = path.relative_to(step_dir).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in _WRITTEN_AFTER_COMMIT:
            files[rel] = path
    return files


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Record the size and sha256 of every file of ``step_dir`` in :data:`MANIFEST` (atomically:
    a half-written manifest must never look like a whole one)."""
    files = {rel: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for rel, path in sorted(_listing(step_dir).items())}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path) -> str | None:
    """Why ``step_dir`` cannot be trusted (one short phrase), or None when every file matches
    its manifest."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST}: the save did not complete"
    try:
        expected = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(v["bytes"]), str(v["sha256"])) for rel, v in expected.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    try:
        return _compare(step_dir, expected)
    except FileNotFoundError as err:  # a reader's view of a step the training run's rotation removes
        return f"{GONE} ({Path(err.filename or step_dir).name} vanished while it was verified)"


def _compare(step_dir: Path, expected: dict[str, tuple[int, str]]) -> str | None:
    actual = _listing(step_dir)
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"{len(missing)} file(s) missing, first {missing[0]}"
    extra = sorted(set(actual) - set(expected))
    if extra:
        return f"{len(extra)} file(s) not in the manifest, first {extra[0]}"
    for rel, (size, digest) in sorted(expected.items()):
        got = actual[rel].stat().st_size
        if got != size:
            return f"{rel} has {got} bytes, {size} were written" + (" (truncated)" if got < size else "")
        if _sha256(actual[rel]) != digest:
            return f"{rel} does not match its sha256 (changed on disk)"
    return None


def move_aside(directory: Path, step: int, reason: str) -> Path:
    """Move ``directory/<step>`` to ``directory/.set_aside/<step>-<time>``, with ``reason`` in a
    ``.why.txt`` beside it. Never deletes: a damaged step is evidence, and may hold what is
    needed to recover by hand."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = directory / SET_ASIDE / f"{step}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = directory / SET_ASIDE / f"{step}-{stamp}-{n}"
    if primary():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory / str(step), dest)
        dest.with_name(dest.name + ".why.txt").write_text(reason + "\n")
    barrier(f"jaxtune_set_aside:{directory}:{step}")  # not dest: each process reads its own clock
    return dest


# ------------------------------------------------------------------ agreed on by every process

_OK, _DAMAGED, _VANISHED, _FAILED = range(4)
T = TypeVar("T")


def _from_process_0(step: int, status: int) -> tuple[int, int]:
    """Process 0's ``(step, status)`` on every process (one small all-gather all must join)."""
    first = stacked(np.asarray([step, status], np.int32))[0]
    return int(first[0]), int(first[1])


def verified_steps(directory: Path, only: int | None = None) -> Iterator[tuple[int, str | None, bool]]:
    """The steps of ``directory``, newest first (``only`` that one), each as ``(step, why it cannot be
    trusted or None, whether it vanished)``. Process 0 lists and hashes; every other process learns
    its answer, so all try the same steps in the same order and none reads the files to verify them
    again. The caller deals with a step (restores, sets aside or skips it) before asking for the next:
    process 0 lists again then, without the steps it moved."""
    below: int | None = None
    while True:
        step, status, reason, error = -1, _OK, None, None
        if primary():
            try:
                listed = [s for s in step_dirs(directory) if (below is None or s < below) and only in (None, s)]
                if listed:
                    step, reason = listed[-1], verify(directory / str(listed[-1]))
                    gone = reason is not None and (reason.startswith(GONE) or not (directory / str(step)).is_dir())
                    status = _OK if reason is None else _VANISHED if gone else _DAMAGED
            except Exception as err:  # noqa: BLE001 - raised below, once every process knows
                status, error = _FAILED, err
        step, status = _from_process_0(step, status)
        if status == _FAILED:
            if error is not None:
                raise error
            raise RuntimeError(f"{directory}: process 0, which verifies the checkpoints, failed (its log has the "
                               "error)")
        if step < 0:
            return
        if status != _OK and reason is None:
            reason = (GONE if status == _VANISHED
                      else "its files do not match their checksums; process 0's log says which")
        yield step, reason, status == _VANISHED
        below = step


def read_everywhere(step_dir: Path, read: Callable[[], T]) -> T | None:
    """``read()`` of a verified step on every process, or None when the step vanished on some process
    meanwhile (a training run's rotation, under a reader). Intact files that do not restore into the
    trees asked for are a :class:`CheckpointMismatchError` on every process."""
    try:
        result, error = read(), None
    except Exception as err:  # noqa: BLE001 - decided below, once every process knows
        result, error = None, err
    outcomes = stacked(np.int32(_OK if error is None else _FAILED if step_dir.is_dir() else _VANISHED))
    if (outcomes == _OK).all():
        return result
    if (outcomes == _VANISHED).any():
        return None
    if error is not None:
        raise _does_not_fit(step_dir, error) from error
    raise CheckpointMismatchError(f"{step_dir}: another process could not restore the checkpoint (its log says why); "
                                  "nothing was moved")


# What a leaf of each part that differs says of the run that saved it, and what to do.
_WHY_NOT = {
    "params": "it was trained with another model or plan; open it with the model and plan it was trained with",
    "optimizer state": (
        "the optimizer that saved it lays its state out otherwise: another optimizer (or settings that shape its "
        "state: clip_grad_norm, group_lr), or the same one in another jaxtune version; resume it with the optimizer "
        "and jaxtune version that saved it, or train on from its params with a fresh optimizer: export them "
        "(jaxtune export RUN_DIR --to DIR) and start a new run (another output.dir) from DIR (model.path, or "
        "model.adapter for adapters)"),
}


def _does_not_fit(step_dir: Path, err: Exception) -> CheckpointMismatchError:
    intact = f"{step_dir}: the checkpoint is intact (its files match their checksums) but"
    if isinstance(err, LeafMismatch):
        def shape(s: tuple[int, ...] | None) -> str:
            return "absent" if s is None else str(tuple(s))
        return CheckpointMismatchError(
            f"{intact} {err.leaf} of its {err.part} is {shape(err.saved)} there and {shape(err.asked)} in this run; "
            f"{_WHY_NOT[err.part]}. Nothing was moved")
    return CheckpointMismatchError(
        f"{intact} does not restore into this run's params and optimizer state ({type(err).__name__}: "
        f"{_one_line(str(err))[:300]}); open it with the configuration it was trained with. Nothing was moved")


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."

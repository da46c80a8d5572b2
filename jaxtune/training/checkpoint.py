"""Orbax checkpoints of a run: everything needed to resume exactly, nothing that can be re-read.

A checkpoint at step s holds the trainable params, the optimizer state, the step, the run's
base RNG key, the data iterator's state (grain's Orbax handler) and the resolved config. The
frozen base model is *not* copied: the config names its source, and resuming re-loads it.

Saves are asynchronous. Orbax writes each step to ``<step>.orbax-checkpoint-tmp`` and renames it
when complete, so an interrupted save never appears as a step; just before that rename the step's
checksum manifest is written into it. A restore verifies the manifest first; a step that fails
verification is moved aside to ``<dir>/.set_aside/<step>-<time>`` (never deleted), reported in one
line, and the next older step is tried. The same holds for ``best/``. The manifest, the verdict
every process agrees on and the move are :mod:`jaxtune.training.checkpoint_integrity`.

One :class:`Checkpointer` opens one Orbax ``CheckpointManager`` per directory, once, and
:meth:`Checkpointer.close` (or ``with``) closes it. Leftover temporary directories of killed
saves are removed synchronously when it opens: Orbax's own clean-up runs in a background
thread per manager, and two of those on one directory raced (``FileNotFoundError``).

A reader (``Checkpointer(read_only=True)``: evaluation, export, generation of a run that may still
be training) changes nothing on disk: a temporary directory may be the trainer's save in flight,
and a step that fails verification may be one the trainer is about to set aside itself, so the
reader skips it (reported) and tries the next older one. A step the trainer's rotation removes
while a reader verifies or reads it is skipped the same way (reported as gone); asked for by
number (``restore(step=N)``), it is a :class:`CheckpointGoneError`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxtune.processes import barrier
from jaxtune.training.checkpoint_integrity import (
    GONE,
    CheckpointMismatchError,
    LeafMismatch,
    SetAside,
    move_aside,
    primary,
    read_everywhere,
    step_dirs,
    verified_steps,
    write_manifest,
)
from jaxtune.training.sharding import shard

# CheckpointMismatchError (raised by restore) and SetAside (Checkpointer.set_aside's items) live beside the
# checksums; whoever restores meets them here.
__all__ = ["CheckpointDamagedError", "CheckpointGoneError", "CheckpointMismatchError", "Checkpointer", "SetAside",
           "place_like"]

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# What Orbax 0.12.8 logs (absl, WARNING) whenever a read-only manager opens: a reader asked for read-only,
# so the line tells it nothing. Orbax's other read-only warnings (options it resets) are avoided by passing
# the values it would set (_Directory).
_READ_ONLY_NOTICE = "Given directory is read only=%s"


def _warn(line: str) -> None:
    warnings.warn(line, stacklevel=3)


def _remove_unfinished(directory: Path) -> None:
    """Delete the temporary directories of saves that never completed (killed mid-save).

    Synchronous and tolerant of files vanishing under it, unlike Orbax's background clean-up."""
    def ignore_missing(func: Any, path: str, exc_info: Any) -> None:
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    if primary() and directory.is_dir():
        for tmp in directory.glob(f"*{_TMP_SUFFIX}*"):
            shutil.rmtree(tmp, onerror=ignore_missing)
    barrier(f"jaxtune_cleanup:{directory}")


class CheckpointGoneError(LookupError):
    """The step asked for is not (or no longer) in the checkpoint directory: the run's rotation
    (``checkpoint.keep``) removed it, or it never was there."""


class CheckpointDamagedError(RuntimeError):
    """The step asked for does not verify (its files do not match their checksums)."""


class _ManifestOnCommit:
    """Orbax's ``post_finalization_callback``: it runs on the primary process after every item
    is written and *before* the temporary directory is renamed into place. The callback takes
    no arguments, so the step being saved is set here just before each save (saves of one
    manager never overlap: each waits for the previous one)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.step: int | None = None

    def __call__(self) -> None:
        if self.step is None:
            raise RuntimeError("a checkpoint finished saving with no step recorded; this is a jaxtune bug")
        tmp = self.directory / f"{self.step}{_TMP_SUFFIX}"
        write_manifest(tmp if tmp.is_dir() else self.directory / str(self.step))


def _one_process_registry() -> Any | None:
    """Orbax's default type handlers with replica-parallel writing off for ``jax.Array``; None on several
    processes, or where this Orbax lays its defaults out otherwise (its own handlers are used then).

    Replica-parallel writing splits each replicated array among its replicas so that several hosts share
    the writing. On one process every replica is on this host and one writer does all of it anyway, but
    each split is a slice computed on its device, op by op, one small compiled program per shape and
    device: with 8 simulated CPU devices, saving an encoder's LoRA params took ~3 s of compiling
    slices (the tests' and ``mesh.simulate_devices`` runs), for the same values written."""
    if jax.process_count() > 1:
        return None
    try:
        from orbax.checkpoint._src.metadata.array_metadata_store import Store
        from orbax.checkpoint._src.serialization.type_handler_registry import _DEFAULT_TYPE_HANDLERS
    except ImportError:
        return None
    defaults = [(ty, handler) for ty, handler in _DEFAULT_TYPE_HANDLERS if ty is not jax.Array]
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=Store())
    return ocp.type_handlers.create_type_handler_registry(*defaults, (jax.Array, arrays))


def _array_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's standard handler of a tree of arrays, written by one writer on one process (see
    :func:`_one_process_registry`)."""
    handler = ocp.StandardCheckpointHandler()
    registry = _one_process_registry()
    if registry is not None:
        # StandardCheckpointHandler takes no registry; it delegates to this PyTree handler (its defaults, as there)
        handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                                    type_handler_registry=registry)
    return handler


def _handlers(with_opt: bool, with_data: bool) -> dict[str, Any]:
    handlers: dict[str, Any] = {"trainable": _array_handler(), "meta": ocp.JsonCheckpointHandler()}
    if with_opt:
        handlers["opt_state"] = _array_handler()
    if with_data:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    return handlers


class _WithoutReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _READ_ONLY_NOTICE


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
    """Drop Orbax's read-only notice while a read-only manager opens; every other line still gets through."""
    absl = logging.getLogger("absl")  # absl.logging's logger, which Orbax logs to
    quiet = _WithoutReadOnlyNotice()
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


class _Directory:
    """One checkpoint directory (``checkpoints/`` or ``best/``) and its single Orbax manager."""

    def __init__(self, directory: Path, handlers: dict[str, Any], max_to_keep: int | None, async_save: bool,
                 read_only: bool = False) -> None:
        self.path = directory.absolute()
        self.async_save = async_save and not read_only
        self.on_commit = _ManifestOnCommit(self.path)
        if not read_only:
            _remove_unfinished(self.path)
        options = ocp.CheckpointManagerOptions(
            # a reader keeps and saves nothing: Orbax would reset these for read_only, with a warning each
            # (1 is Orbax's default interval)
            max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=self.async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=False,  # done above, synchronously (see the module docstring)
            async_options=ocp.AsyncOptions(post_finalization_callback=self.on_commit) if self.async_save else None)
        with _quiet_read_only_notice() if read_only else contextlib.nullcontext():
            self.manager = ocp.CheckpointManager(self.path, options=options, item_handlers=handlers)

    def save(self, step: int, args: ocp.args.Composite) -> None:
        self.manager.wait_until_finished()  # the previous save's commit callback reads on_commit.step
        self.on_commit.step = step
        self.manager.save(step, args=args, force=True)
        if not self.async_save and primary():
            write_manifest(self.path / str(step))

    def close(self) -> None:
        self.manager.close()


class Checkpointer:
    """Save and restore a run's state under ``run_dir/checkpoints`` (latest K) and
    ``run_dir/best`` (the best by a validation metric, params only).

    Use it as a context manager (or call :meth:`close`): it holds one Orbax manager per directory,
    and a second manager on the same directory must not be opened while it lives.
    ``report`` receives one line per step set aside (default: a ``UserWarning``); every one is
    also kept in :attr:`set_aside`. ``read_only``: a reader of a run that may be training (see the
    module docstring): it removes and moves nothing, and cannot save. On several processes every
    process calls :meth:`restore`, :meth:`restore_best` and :meth:`latest_good_step` (they agree on
    process 0's verdict of each step).
    """

    def __init__(self, run_dir: str | Path, *, max_to_keep: int = 3, with_data: bool = True, async_save: bool = True,
                 report: Callable[[str], None] | None = None, read_only: bool = False):
        self.run_dir = Path(run_dir)
        self.with_data = with_data
        self.read_only = read_only
        self.set_aside: list[SetAside] = []
        self._report = report or _warn
        self._async = async_save
        self._max_to_keep = max_to_keep
        self._latest: _Directory | None = None  # opened on first use: listing steps needs no manager
        self._best: _Directory | None = None
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ managers

    def _open_latest(self) -> _Directory:
        self._check_open()
        if self._latest is None:
            # opt_state's handler is always registered: a stateless optimizer simply saves no such item.
            # A reader registers the data iterator's too, though it never restores it: Orbax warns of every
            # item in a step that no handler is registered for ("could not be restored").
            self._latest = _Directory(self.run_dir / "checkpoints", _handlers(True, self.with_data or self.read_only),
                                      self._max_to_keep, self._async, self.read_only)
        return self._latest

    def _open_best(self) -> _Directory:
        self._check_open()
        if self._best is None:
            self._best = _Directory(self.run_dir / "best", _handlers(False, False), 1, self._async, self.read_only)
        return self._best

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the Checkpointer of {self.run_dir} is closed; open a new one to save or restore")

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"the Checkpointer of {self.run_dir} reads only; open one without read_only to save")

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        trainable: Any,
        opt_state: Any,
        rng: jax.Array,
        *,
        data_iterator: Any = None,
        config: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Start saving ``step`` (asynchronously); returns once device buffers are copied."""
        self._check_writable()
        meta = {"step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                "config": config or {}, "metrics": metrics or {}}
        items = {"trainable": ocp.args.StandardSave(trainable), "meta": ocp.args.JsonSave(meta)}
        if jax.tree.leaves(opt_state):  # stateless optimizers (plain SGD, set_to_zero) have nothing to save
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if self.with_data:
            if data_iterator is None:
                raise ValueError("Checkpointer(with_data=True) needs the data iterator to save its state")
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._open_latest().save(int(step), ocp.args.Composite(**items))

    def save_best(self, step: int, trainable: Any, metrics: dict[str, float]) -> None:
        """Keep ``trainable`` as the best checkpoint so far (the caller decides what "best" is).

        A best checkpoint at this or a later step was left by an earlier attempt that got further
        before the run resumed from an older step: it is set aside, or Orbax would refuse the step
        number (StepAlreadyExistsError) or keep the stale later step over the new one."""
        self._check_writable()
        best = self._open_best()
        best.manager.wait_until_finished()
        for stale in [s for s in step_dirs(best.path) if s >= step]:
            self._set_aside(best.path, best, stale, "best checkpoint of an earlier attempt that reached a later step "
                            "before the run resumed", "")
        best.save(int(step), ocp.args.Composite(trainable=ocp.args.StandardSave(trainable),
                                                meta=ocp.args.JsonSave({"step": step, "metrics": metrics})))

    def forget_best_after(self, step: int) -> list[int]:
        """Set aside best checkpoints later than ``step``, the step a run resumes from: an attempt that
        got further saved them, and the resumed run may never score those steps again (another
        ``eval.every``, or nothing better), so ``use_best`` would end with weights it never made.
        Returns the best steps left."""
        self._check_writable()
        for stale in [s for s in step_dirs(self.run_dir / "best") if s > step]:
            self._set_aside(self.run_dir / "best", self._best, stale, "best checkpoint of an earlier attempt that "
                            "reached a later step before the run resumed", "")
        return step_dirs(self.run_dir / "best")

    # ------------------------------------------------------------------ restore

    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first (not verified: see :meth:`latest_good_step`)."""
        return step_dirs(self.run_dir / "checkpoints")

    def latest_good_step(self) -> int | None:
        """The newest step whose files match their checksums, without restoring it; newer steps
        that fail are set aside (as a restore would). Waits for a save in flight to finish."""
        self.wait()
        for step, reason, gone in verified_steps(self.run_dir / "checkpoints"):
            if reason is None:
                return step
            self._set_aside_latest(step, reason, gone)
        return None

    def restore(
        self,
        trainable_like: Any,
        opt_state_like: Any,
        *,
        data_iterator: Any = None,
        step: int | None = None,
    ) -> tuple[int, Any, Any, jax.Array, dict[str, Any]] | None:
        """Restore the newest good checkpoint, or None when there is none.

        ``trainable_like``/``opt_state_like`` are trees of arrays (or ShapeDtypeStructs with
        shardings) giving the structure and *target* placement: a checkpoint saved on one mesh
        restores onto another; ``opt_state_like`` None reads no optimizer state (a reader of the params:
        evaluation, export) and returns None for it. ``data_iterator`` has its state set in place (and
        put back as it was when no step restores). Returns ``(step, trainable, opt_state, rng, meta)``.

        ``step``: that step and no other; :class:`CheckpointGoneError` when it is not (or no
        longer) there, :class:`CheckpointDamagedError` when it does not verify (it is not moved).
        """
        self.wait()  # a save in flight is the newest step
        data_iterator = data_iterator if self.with_data else None
        initial = data_iterator.get_state() if data_iterator is not None else None
        path = self.run_dir / "checkpoints"
        try:
            for found, reason, gone in verified_steps(path, only=step):
                if reason is None:
                    restored = read_everywhere(path / str(found), lambda s=found: self._restore_step(
                        s, trainable_like, opt_state_like, data_iterator))
                    if restored is not None:
                        return restored
                    reason, gone = GONE, True
                if step is not None:
                    if gone:
                        break
                    raise CheckpointDamagedError(f"{path / str(step)}: the checkpoint does not verify ({reason}); "
                                                 "restore another step (its run's checkpoints/ lists them)")
                self._set_aside_latest(found, reason, gone)
        except BaseException:
            if initial is not None:
                data_iterator.set_state(initial)  # a failed attempt may have set part of it
            raise
        if initial is not None:
            data_iterator.set_state(initial)
        if step is not None:
            raise CheckpointGoneError(f"{path / str(step)}: no such checkpoint (the run's rotation, checkpoint.keep, "
                                      f"removes old ones); those there: {self.steps() or 'none'}")
        return None

    def _restore_step(
        self, step: int, trainable_like: Any, opt_state_like: Any, data_iterator: Any
    ) -> tuple[int, Any, Any, jax.Array, dict[str, Any]]:
        items: dict[str, Any] = {
            "trainable": ocp.args.StandardRestore(_abstract(trainable_like)),
            "meta": ocp.args.JsonRestore(),
        }
        stateful = bool(jax.tree.leaves(opt_state_like))
        if stateful:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = _restore(self._open_latest().manager, step, items,
                            {"trainable": trainable_like, "opt_state": opt_state_like if stateful else None})
        meta = restored["meta"]
        if int(meta["step"]) != step:
            raise ValueError(f"its metadata says step {meta['step']}")
        rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], np.uint32)))
        opt_state = restored["opt_state"] if stateful else opt_state_like
        return step, restored["trainable"], opt_state, rng, meta

    def restore_best(self, trainable_like: Any) -> tuple[Any, dict[str, Any]] | None:
        """The best checkpoint's trainable params and metadata, or None (a damaged one is set
        aside, reported, and None returned: only one best is kept)."""
        self.wait()
        path = (self.run_dir / "best").absolute()
        for step, reason, gone in verified_steps(path):  # agreed first: a manager is opened only for a step
            if reason is None:
                best = self._open_best()
                items = {"trainable": ocp.args.StandardRestore(_abstract(trainable_like)),
                         "meta": ocp.args.JsonRestore()}
                restored = read_everywhere(path / str(step), lambda s=step, b=best, i=items: _restore(
                    b.manager, s, i, {"trainable": trainable_like}))
                if restored is not None:
                    return restored["trainable"], restored["meta"]
                reason, gone = GONE, True
            self._set_aside(path, self._best, step, f"checkpoint is incomplete or corrupt ({reason})",
                            "no best checkpoint left", gone)
        return None

    # ------------------------------------------------------------------ setting aside

    def _set_aside_latest(self, step: int, reason: str, gone: bool = False) -> None:
        older = [s for s in self.steps() if s < step]
        then = f"falling back to step {older[-1]}" if older else "no earlier checkpoint, starting fresh"
        self._set_aside(self.run_dir / "checkpoints", self._latest, step,
                        f"checkpoint is incomplete or corrupt ({reason})", then, gone)

    def _set_aside(self, path: Path, directory: _Directory | None, step: int, what: str, then: str,
                   gone: bool = False) -> None:
        """Move the step aside, make the open manager (if any) forget it so its number can be
        saved again (else Orbax raises StepAlreadyExistsError), and report it in one line. A reader
        moves nothing: it reports the step skipped; nor does anyone move a step already gone."""
        if gone:
            self._report(f"{path / str(step)}: checkpoint {GONE} (the run's rotation, checkpoint.keep, removes old "
                         "ones); skipped" + (f"; {then}" if then else ""))
            return
        if self.read_only:
            self._report(f"{path / str(step)}: {what}; skipped, left in place (read-only)"
                         + (f"; {then}" if then else ""))
            return
        dest = move_aside(path.absolute(), step, what)
        if directory is not None and not self._closed:
            directory.manager.reload()
        self.set_aside.append(SetAside(step, what, dest))
        self._report(f"{path / str(step)}: {what}; moved to {dest}" + (f"; {then}" if then else ""))

    # ------------------------------------------------------------------ lifetime

    def saving(self) -> bool:
        """Whether an asynchronous save is still in flight (:meth:`wait` would wait for it)."""
        return any(directory is not None and directory.manager.is_saving_in_progress()
                   for directory in (self._latest, self._best))

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (with their manifests)."""
        for directory in (self._latest, self._best):
            if directory is not None:
                directory.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and close the managers; safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            for directory in (self._latest, self._best):
                if directory is not None:
                    directory.close()


_PARTS = {"trainable": "params", "opt_state": "optimizer state"}


def _restore(manager: ocp.CheckpointManager, step: int, items: dict[str, Any], asked: dict[str, Any]) -> Any:
    """``manager``'s ``step`` of ``items``; a leaf of the ``asked`` trees (by item) that does not fit the
    step's metadata is raised as a :class:`LeafMismatch`, as Orbax's error names no leaf (it only says
    which shapes differ).

    A leaf held there with another shape is refused before Orbax reads anything: Orbax finds it only
    once its reads of every leaf are running, and its error leaves the others running on an event loop
    it has closed ("Event loop is closed", "Exception ignored in coroutine" tracebacks on stderr when
    they end). A leaf only one side has is looked for once Orbax has failed: Orbax refuses another tree
    structure before reading, and its error stands when the names of the leaves do not compare."""
    try:
        saved = manager.item_metadata(step)
    except Exception:  # noqa: BLE001 - no metadata to compare with: Orbax's restore says what it can
        saved = None
    if saved is not None and (misfit := _first_difference(saved, asked, both_sides=True)):
        raise misfit
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:
        if saved is not None and (misfit := _first_difference(saved, asked, both_sides=False)):
            raise misfit from err
        raise


def _first_difference(saved: Any, asked: dict[str, Any], both_sides: bool) -> LeafMismatch | None:
    """The first leaf (by item, then path order) of the ``asked`` trees whose shape differs from the
    one in a step's Orbax metadata ``saved`` (``both_sides``: only among leaves both sides hold; else
    a leaf one side lacks counts too, its shape None there)."""
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(x.shape)
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}

    for item, tree in asked.items():
        if tree is None or item not in saved:
            continue
        before, now = shapes(getattr(saved[item], "tree", saved[item])), shapes(tree)
        leaves = before.keys() & now.keys() if both_sides else before.keys() | now.keys()
        if differ := sorted(k for k in leaves if before.get(k) != now.get(k)):
            return LeafMismatch(_PARTS[item], differ[0], before.get(differ[0]), now.get(differ[0]))
    return None


def _abstract(tree: Any) -> Any:
    def spec(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(spec, tree)


def place_like(tree: Any, like: Any) -> Any:
    """Put a restored tree on the shardings of ``like`` (no-op when they already match)."""
    return shard(tree, jax.tree.map(lambda x: x.sharding, like))

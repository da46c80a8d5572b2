"""Orbax checkpoints of a run: everything needed to resume exactly, nothing that can be re-read.

A checkpoint at step s holds the trainable params, the optimizer state, the step, the run's
base RNG key, the data iterator's state (grain's Orbax handler) and the resolved config. The
frozen base model is *not* copied: the config names its source, and resuming re-loads it.
Saves are asynchronous; Orbax writes each step to a temporary folder and renames it when
complete, so an interrupted save never appears as a step. A step whose files are damaged is
detected at restore and the previous one is used, with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxtune.train.sharding import shard


def _manager(directory: Path, max_to_keep: int | None, with_data: bool, async_save: bool) -> ocp.CheckpointManager:
    handlers: dict[str, Any] = {
        "trainable": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    if with_data:
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


class Checkpointer:
    """Save and restore a run's state under ``run_dir/checkpoints`` (latest K) and
    ``run_dir/best`` (the best by a validation metric, params only)."""

    def __init__(self, run_dir: str | Path, *, max_to_keep: int = 3, with_data: bool = True, async_save: bool = True):
        self.run_dir = Path(run_dir)
        self.with_data = with_data
        self._latest = _manager(self.run_dir / "checkpoints", max_to_keep, with_data, async_save)
        self._best: ocp.CheckpointManager | None = None
        self._async = async_save

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
        meta = {"step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                "config": config or {}, "metrics": metrics or {}}
        items = {"trainable": ocp.args.StandardSave(trainable), "meta": ocp.args.JsonSave(meta)}
        if jax.tree.leaves(opt_state):  # stateless optimizers (plain SGD, set_to_zero) have nothing to save
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if self.with_data:
            if data_iterator is None:
                raise ValueError("Checkpointer(with_data=True) needs the data iterator to save its state")
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._latest.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, trainable: Any, metrics: dict[str, float]) -> None:
        """Keep ``trainable`` as the best checkpoint so far (the caller decides what "best" is)."""
        if self._best is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=self._async, create=True)
            self._best = ocp.CheckpointManager((self.run_dir / "best").absolute(), options=options,
                                               item_handlers={"trainable": ocp.StandardCheckpointHandler(),
                                                              "meta": ocp.JsonCheckpointHandler()})
        self._best.save(step, args=ocp.args.Composite(trainable=ocp.args.StandardSave(trainable),
                                                      meta=ocp.args.JsonSave({"step": step, "metrics": metrics})),
                        force=True)

    # ------------------------------------------------------------------ restore

    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first."""
        self._latest.reload()
        return sorted(self._latest.all_steps())

    def restore(
        self,
        trainable_like: Any,
        opt_state_like: Any,
        *,
        data_iterator: Any = None,
    ) -> tuple[int, Any, Any, jax.Array, dict[str, Any]] | None:
        """Restore the latest readable checkpoint, or None when there is none.

        ``trainable_like``/``opt_state_like`` are trees of arrays (or ShapeDtypeStructs with
        shardings) giving the structure and *target* placement: a checkpoint saved on one mesh
        restores onto another. ``data_iterator`` has its state set in place.
        Returns ``(step, trainable, opt_state, rng, meta)``.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self._restore_step(step, trainable_like, opt_state_like, data_iterator)
            except Exception as err:  # noqa: BLE001 - any failure means this step is unusable
                previous = [s for s in steps if s < step]
                warnings.warn(
                    f"{self.run_dir / 'checkpoints' / str(step)}: checkpoint is incomplete or corrupt "
                    f"({type(err).__name__}: {str(err)[:200]}); "
                    + (f"falling back to step {previous[-1]}" if previous else "no earlier checkpoint, starting fresh"),
                    stacklevel=2,
                )
        return None

    def _restore_step(self, step: int, trainable_like: Any, opt_state_like: Any,
                      data_iterator: Any) -> tuple[int, Any, Any, jax.Array, dict[str, Any]]:
        items: dict[str, Any] = {
            "trainable": ocp.args.StandardRestore(_abstract(trainable_like)),
            "meta": ocp.args.JsonRestore(),
        }
        stateful = bool(jax.tree.leaves(opt_state_like))
        if stateful:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        if self.with_data and data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._latest.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], np.uint32)))
        opt_state = restored["opt_state"] if stateful else opt_state_like
        return int(meta["step"]), restored["trainable"], opt_state, rng, meta

    def restore_best(self, trainable_like: Any) -> tuple[Any, dict[str, Any]] | None:
        """The best checkpoint's trainable params and metadata, or None."""
        best_dir = self.run_dir / "best"
        if not best_dir.exists():
            return None
        manager = self._best or ocp.CheckpointManager(best_dir.absolute(), item_handlers={
            "trainable": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(_abstract(trainable_like)), meta=ocp.args.JsonRestore()))
        return restored["trainable"], restored["meta"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        if self._best is not None:
            self._best.close()


def _abstract(tree: Any) -> Any:
    def spec(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(spec, tree)


def place_like(tree: Any, like: Any) -> Any:
    """Put a restored tree on the shardings of ``like`` (no-op when they already match)."""
    return shard(tree, jax.tree.map(lambda x: x.sharding, like))

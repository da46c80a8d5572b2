"""Several JAX processes (a multi-host run, ``jax.distributed``): work done once, and agreed on.

Every process runs the same program over one mesh, so a process that goes on alone into a
collective waits there for ever, and files that every process writes are written several times
over, half-written while another reads or renames them. The rules the writers follow:
every process checks (reading only) before any process writes (:func:`barrier`); process 0 alone
writes (:func:`write_once`), and every process then learns whether that worked, so none waits on
a process that failed. Arrays split over other processes' devices are gathered first
(:func:`on_host`), as every process must take part in that. On one process these are plain calls.

Beside the layers: imports no other part of jaxtune.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def several() -> bool:
    """Whether this program runs as several JAX processes."""
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all have reached it (``name``: the same on every process)."""
    if several():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def everyone(ok: bool) -> bool:
    """True when ``ok`` on every process (one small all-gather, which every process must call)."""
    if not several():
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def on_host(tree: Any, *, keep: bool = True) -> Any:
    """``tree`` with every array as a numpy array on this host, whole: a leaf split over other
    processes' devices is gathered (every process must call this, with the same tree). Process 0 can
    then compute and write alone, without the collectives that arrays on several processes' devices
    would start. ``keep=False``: only take part in the gathers (returns None)."""
    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(leaf, tiled=True)
            return np.asarray(gathered) if keep else None
        return np.asarray(jax.device_get(leaf)) if keep else None

    fetched = jax.tree.map(fetch, tree)
    return fetched if keep else None


def write_once(write: Callable[[], T], what: str) -> T | None:
    """``write()`` on process 0 only; returns its result there (None on the others) once it is done.
    Its error is raised on process 0 and, naming ``what``, on every other process: none goes on to
    wait for a process that stopped."""
    if not several():
        return write()
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = write()
        except Exception as err:  # noqa: BLE001 - raised below, once every process knows
            error = err
    if not everyone(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"{what}: process 0 of {jax.process_count()}, which writes it, failed (its log has "
                           "the error)")
    return result


def stacked(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` (of one shape on all), stacked along a new first axis by process index
    (every process must call it); ``x[None]`` on one process."""
    if not several():
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))

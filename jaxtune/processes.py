"""Several JAX processes (a multi-host run, ``jax.distributed``): work done once, and agreed on.

Every process runs the same program over one mesh, so a process that goes on alone into a
collective waits there for ever, and files that every process writes are written several times
over, half-written while another reads or renames them. The rules the writers follow:
every process checks (reading only) before any process writes (:func:`barrier`); process 0 alone
writes (:func:`write_once`), and every process then learns whether that worked, so none waits on
a process that failed. Arrays split over other processes' devices are gathered first
(:func:`on_host`), as every process must take part in that. An error on one process while the others
compute together stops them too (:func:`stop_together`), rather than leaving them in a collective until
JAX's distributed service times out; so does one in the work each process does alone before such a
collective (loading, reading, checking: :func:`ready_together`). On one process these are plain calls.

Beside the layers: imports no other part of jaxtune.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")
log = logging.getLogger(__name__)
_uses = itertools.count()  # numbers each stop_together: the same sequence on every process (one program)
_ready = itertools.count()  # numbers each ready_together's barrier (the same on every process)
_watched = contextvars.ContextVar("jaxtune_stop_together", default=False)  # inside a stop_together already


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


def _client() -> Any:
    """The ``jax.distributed`` client (its key-value store), or None when JAX started without one."""
    from jax._src import distributed  # the client is not public API; the key-value store is what we need

    return getattr(distributed.global_state, "client", None)


@contextlib.contextmanager
def stop_together(where: Callable[[], str], on_stop: Callable[[str], None] | None = None) -> Iterator[None]:
    """While active, an exception on one process stops every other within seconds.

    The others cannot learn of it in their own code: they wait in the next collective of a step the
    failing process will never join, until JAX's distributed service gives up on it (minutes later,
    with a heartbeat error that hides the real one). So the failing process writes
    ``process I failed <where()>: Type: message`` to the distributed service's key-value store, under
    a key each other process's watcher thread is waiting on; the watcher logs it (``...; stopping``),
    calls ``on_stop(message)`` (process 0 marks the run failed), leaves ``jax.distributed`` and ends
    its process (exit status 1): its main thread is inside a collective, where no Python exception
    reaches it. The failing process raises its own error as before. One process: nothing is started,
    nothing is paid (no agreement per step either way). Inside another ``stop_together`` (an
    evaluation during ``fit``) the outer one covers the block: its ``where`` and ``on_stop`` hold."""
    client = _client() if several() and not _watched.get() else None
    if client is None:
        yield
        return
    use, me = next(_uses), jax.process_index()

    def key(process: int) -> str:
        return f"jaxtune/stop/{use}/{process}"

    leaving = threading.Event()  # this process left the block (normally or with its own error): watch no more

    def watch() -> None:
        while True:
            try:
                message = client.blocking_key_value_get(key(me), 60_000)
            except Exception as err:  # noqa: BLE001 - a timeout waits on; the service gone ends the watch
                if "DEADLINE_EXCEEDED" in str(err) and not leaving.is_set():
                    continue
                return
            if leaving.is_set() or not message:
                return
            log.error("%s; stopping", message)
            try:
                if on_stop is not None:
                    on_stop(message)
                jax.distributed.shutdown()  # its shutdown barrier: the failing process's own exit waits there
            except Exception:  # noqa: BLE001 - the process ends below whatever these do
                log.exception("while stopping after another process's error")
            os._exit(1)

    watcher = threading.Thread(target=watch, name="jaxtune-stop-together", daemon=True)
    watcher.start()
    outermost = _watched.set(True)
    try:
        yield
    except Exception as err:
        leaving.set()
        first_line = (str(err).strip().splitlines() or [""])[0]
        message = f"process {me} failed {where()}: {type(err).__name__}: {first_line}"
        for other in range(jax.process_count()):
            if other != me:
                with contextlib.suppress(Exception):  # another process failed first and told it already
                    client.key_value_set(key(other), message)
        raise
    finally:
        _watched.reset(outermost)
        leaving.set()
        with contextlib.suppress(Exception):  # wakes this process's watcher (unless another process's error did)
            client.key_value_set(key(me), "")
        watcher.join(timeout=5)


@contextlib.contextmanager
def ready_together(where: Callable[[], str], on_stop: Callable[[str], None] | None = None) -> Iterator[None]:
    """A block of work each process does on its own (loading a model, reading and checking data, a run
    directory's files) before the processes compute together: it ends when every process has done it,
    and an error on one stops every other, naming it, as :func:`stop_together` does (``on_stop`` as there).

    Without the closing agreement a process that finished its share went on into the next collective
    (or another ``stop_together``, watching another key) while a slower one failed: the failure could
    not reach it, and it waited there until JAX's distributed service gave up on the failed process,
    minutes later, with a heartbeat error that hides the real one. One process: a plain block.

    For errors that end the program: an error every process raises alike (a config's) may end another
    process from its watcher before it raises its own, and a caller that catches one inside an outer
    ``stop_together`` leaves the others waiting at the closing barrier."""
    with stop_together(where, on_stop):
        yield
        # the key-value store's barrier, not a device collective: a process stopped in it is ended by its
        # watcher thread, and it costs no compilation
        name = f"jaxtune/ready/{next(_ready)}"
        client = _client() if several() else None
        if client is not None:
            # a day: a slow host's loading may take long, and a failed one ends the wait through the watcher
            client.wait_at_barrier(name, 24 * 3600 * 1000)
        else:
            barrier(name)

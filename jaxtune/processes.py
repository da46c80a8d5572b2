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
collective (loading, reading, checking: :func:`ready_together`). A stop that one process asks for (a
Ctrl-C) is taken by every process at one step (:class:`AgreedStop`). On one process these are plain calls.

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
_stops = itertools.count()  # numbers each AgreedStop (the same on every process)
_STOPPED = "jaxtune/stopped/"  # under it, each process that stopped in a stop_together block: its message
_watched = contextvars.ContextVar("jaxtune_stop_together", default=False)  # inside a stop_together already
# stop_together's message starts with one of these words: how the other processes end (and mark the run)
_INTERRUPTED, _FAILED = "interrupted", "failed"
INTERRUPTED_EXIT = 130  # a process ended by another's Ctrl-C: jaxtune's exit status for a Ctrl-C (128 + SIGINT)


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


def _wait_for(client: Any, key: str, leaving: threading.Event | None = None,
              meanwhile: Callable[[], str | None] | None = None) -> str | None:
    """The value of ``key`` in the key-value store once some process sets it, or the first message ``meanwhile``
    returns (asked every 2 s); None when ``leaving`` is set first (once the value comes, or the next minute) or
    the distributed service is gone."""
    while True:
        try:
            message = client.blocking_key_value_get(key, 60_000 if meanwhile is None else 2_000)
        except Exception as err:  # noqa: BLE001 - a timeout waits on; the service gone ends the wait
            if "DEADLINE_EXCEEDED" not in str(err) or (leaving is not None and leaving.is_set()):
                return None
            message = meanwhile() if meanwhile is not None else None
            if message is None:
                continue
        return None if leaving is not None and leaving.is_set() else message


def _stopped_elsewhere(client: Any, me: int) -> str | None:
    """The message of another process that stopped in an earlier :func:`stop_together` block (``_STOPPED``), or None.

    It told the processes still in that block; one that had left it (its share done without a collective, as
    scoring from a cache) went on into the next block, where it waited for the failed process for ever (a day,
    at :func:`ready_together`'s barrier)."""
    try:
        told = [message for name, message in client.key_value_dir_get(_STOPPED)
                if name.rstrip("/").rsplit("/", 1)[-1] != str(me)]
    except Exception:  # noqa: BLE001 - the service gone: the watcher's own wait ends too
        return None
    return told[0] if told else None


@contextlib.contextmanager
def stop_together(where: Callable[[], str],
                  on_stop: Callable[[str, bool], None] | None = None,
                  settle: Callable[[], None] | None = None) -> Iterator[None]:
    """While active, an exception (or a KeyboardInterrupt) on one process stops every other within seconds.

    The others cannot learn of it in their own code: they wait in the next collective of a step the
    failing process will never join, until JAX's distributed service gives up on it (minutes later,
    with a heartbeat error that hides the real one). So the failing process writes
    ``process I failed <where()>: Type: message`` to the distributed service's key-value store, under
    a key each other process's watcher thread is waiting on; the watcher logs it (``...; stopping``),
    calls ``on_stop(message, interrupted)`` (process 0 marks the run failed), leaves ``jax.distributed``
    and ends its process (exit status 1): its main thread is inside a collective, where no Python
    exception reaches it. A KeyboardInterrupt (a second Ctrl-C) is no failure: the message says
    ``process I was interrupted (Ctrl-C) <where()>``, ``interrupted`` is True (process 0 marks the run
    stopped, in the training loop) and the others exit with 130, as one process interrupted so would
    (``jaxtune``'s status for a Ctrl-C, a shell's for SIGINT). The failing process raises its own error as
    before. One process: nothing is started, nothing is paid (no agreement per step either way). Inside
    another ``stop_together`` (an evaluation during ``fit``) the outer one covers the block: its ``where`` and
    ``on_stop`` hold.

    ``settle``: what this process finishes on its error or KeyboardInterrupt before it tells the others (a
    checkpoint save in flight, whose background threads on every process meet at a barrier of the distributed
    service): told, each other process waits for this one in ``jax.distributed.shutdown``'s barrier only JAX's
    shutdown timeout (300 s), then every process ends and the save is lost. A Ctrl-C during ``settle`` tells
    them at once."""
    client = _client() if several() and not _watched.get() else None
    if client is None:
        yield
        return
    use, me = next(_uses), jax.process_index()

    def key(process: int) -> str:
        return f"jaxtune/stop/{use}/{process}"

    leaving = threading.Event()  # this process left the block (normally or with its own error): watch no more

    def watch() -> None:
        told = _wait_for(client, key(me), leaving, lambda: _stopped_elsewhere(client, me))
        if not told:
            return
        how, _, message = told.partition(" ")
        interrupted = how == _INTERRUPTED
        (log.warning if interrupted else log.error)("%s; stopping", message)
        try:
            if on_stop is not None:
                on_stop(message, interrupted)
            jax.distributed.shutdown()  # its shutdown barrier: the failing process's own exit waits there
        except Exception:  # noqa: BLE001 - the process ends below whatever these do
            log.exception("while stopping after another process's %s", "Ctrl-C" if interrupted else "error")
        os._exit(INTERRUPTED_EXIT if interrupted else 1)

    watcher = threading.Thread(target=watch, name="jaxtune-stop-together", daemon=True)
    watcher.start()
    outermost = _watched.set(True)
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # a Ctrl-C that stops this process at once stops the others too
        leaving.set()
        first_line = (str(err).strip().splitlines() or [""])[0]
        interrupted = isinstance(err, KeyboardInterrupt)
        if settle is not None:
            try:
                settle()
            except KeyboardInterrupt:  # another Ctrl-C: stop the others now
                log.warning("interrupted again: stopping the other processes without waiting")
            except Exception:  # noqa: BLE001 - the others must still be told; this process raises its own error
                log.exception("while finishing this process's work before stopping the others")
        message = (f"{_INTERRUPTED} process {me} was interrupted (Ctrl-C) {where()}" if interrupted
                   else f"{_FAILED} process {me} failed {where()}: {type(err).__name__}: {first_line}")
        for other in range(jax.process_count()):
            if other != me:
                with contextlib.suppress(Exception):  # another process failed first and told it already
                    client.key_value_set(key(other), message)
        with contextlib.suppress(Exception):  # set already: this process stopped in an earlier block and went on
            client.key_value_set(f"{_STOPPED}{me}", message)  # for a process past this block (_stopped_elsewhere)
        raise
    finally:
        _watched.reset(outermost)
        leaving.set()
        with contextlib.suppress(Exception):  # wakes this process's watcher (unless another process's error did)
            client.key_value_set(key(me), "")
        watcher.join(timeout=5)


@contextlib.contextmanager
def ready_together(where: Callable[[], str],
                   on_stop: Callable[[str, bool], None] | None = None) -> Iterator[None]:
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


class AgreedStop:
    """A stop any process may ask for (:meth:`ask`: a Ctrl-C) that every process takes before the same step.

    Each process calls :meth:`stop_before` at every step boundary (before it reads the step's batch); it
    returns True on every process at one step, the first boundary every process can reach after the ask
    (of any process). A stop taken alone would leave the others waiting in the next step's collectives.

    No agreement per step (a device collective every step would make each host wait for the others'
    steps to finish, draining the pipeline of dispatched steps): an ask goes through the distributed
    service's key-value store. A watcher thread per process waits for one; on it, it takes the step its
    main thread is about to start as that process's ``bound`` (the main thread starts no later step
    until the processes agree) and publishes it. The processes stop at the largest bound: every process
    can reach it without waiting for another's unstarted step, whichever step its host is in (a host
    waiting on a device read of step k has started step k, and its bound is k). A boundary costs a lock
    and two flags until an ask comes. :meth:`start` it and :meth:`close` it; one process: a flag (:meth:`ask`)."""

    def __init__(self) -> None:
        self._client = _client() if several() else None
        self._use = next(_stops) if self._client is not None else None
        self._lock = threading.Lock()
        self.asked = False  # this process was asked (set from a signal handler: no lock there)
        self._posted = False  # the others were told of this process's ask
        self._told = False  # an ask (this process's or another's) reached this process
        self._next = 0  # the step this process's main thread may start without an agreement
        self._bound: int | None = None  # the step this process published
        self._at: int | None = None  # the agreed step
        self.by: str | None = None  # who asked first, as far as this process knows
        self._leaving = threading.Event()
        self._watcher: threading.Thread | None = None

    def _key(self, what: str, process: int) -> str:
        return f"jaxtune/agreed_stop/{self._use}/{what}/{process}"

    def start(self, step: int) -> AgreedStop:
        """Watch for another process's ask, training from ``step``."""
        self._next = step
        if self._client is not None:
            self._watcher = threading.Thread(target=self._watch, name="jaxtune-agreed-stop", daemon=True)
            self._watcher.start()
        return self

    def _watch(self) -> None:
        message = _wait_for(self._client, self._key("ask", jax.process_index()), self._leaving)
        if message:
            self._publish(None, message)

    def _publish(self, step: int | None, by: str) -> None:
        """Take this process's bound (``step``, or the step its main thread starts next) once, and publish it."""
        with self._lock:
            self._told = True
            if self._bound is not None:
                return
            self.by = by
            self._bound = self._next if step is None else step
            self._client.key_value_set(self._key("bound", jax.process_index()), str(self._bound))

    def ask(self) -> None:
        """Ask every process to stop (from a signal handler: only a flag is set here)."""
        self.asked = True

    def stop_before(self, step: int) -> bool:
        """Whether every process stops here, before starting step ``step + 1`` (``step`` steps done)."""
        if self._client is None:
            return self.asked
        if self.asked and not self._posted:
            self._posted = True
            me = jax.process_index()
            for other in range(jax.process_count()):
                if other != me:
                    with contextlib.suppress(Exception):  # another process asked first and told it already
                        self._client.key_value_set(self._key("ask", other), f"process {me}")
            self._publish(step, f"process {me}")
        with self._lock:
            if not self._told:
                self._next = step + 1
                return False
        if self._at is None:
            bounds = [_wait_for(self._client, self._key("bound", p)) for p in range(jax.process_count())]
            self._at = max(int(b) for b in bounds if b)
        return step >= self._at

    def close(self) -> None:
        """Stop watching; a process that leaves (its run finished) publishes the step it ends at, as its bound:
        an ask that comes later still gets every process's bound."""
        if self._client is None:
            return
        self._leaving.set()
        with contextlib.suppress(Exception):  # the bound (or another's ask) is there already; the service is gone
            self._publish(self._next, f"process {jax.process_index()}, ending")
        with contextlib.suppress(Exception):  # wakes this process's watcher (unless an ask did)
            self._client.key_value_set(self._key("ask", jax.process_index()), "")
        if self._watcher is not None:
            self._watcher.join(timeout=5)

"""Compile once per machine, not once per run: JAX's persistent compilation cache.

The train and eval steps are the same program every time a recipe runs on the same shapes, so
their compiled executables are kept on disk (``<jaxtune cache>/xla``, see
:func:`jaxtune.assets.cache_dir`) and a second ``jaxtune train`` loads them instead of
compiling. JAX's own cache does the work; this module turns it on by default, bounds it
(:data:`MAX_BYTES`, least recently used entries evicted first), leaves a directory or setting
the application chose alone, repairs what JAX leaves broken (below), and counts hits so the
trainer can say what happened. A cache directory that cannot be created (a read-only or missing
home, a file in the way) leaves the cache off with one warning: compiling every run is slower,
not wrong.

JAX writes an entry in place, not atomically, and never replaces one: a process killed while
writing leaves a short entry, which failed to decompress at every later read, so its program
compiled again in every run (with JAX's warning) and was never rewritten. A read that fails here
removes an entry that does not decompress, so the compile that follows writes it whole.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jax

from jaxtune.assets import cache_dir

log = logging.getLogger(__name__)
_HIT = "/jax/compilation_cache/cache_hits"
_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_MAX_SIZE_ENV = "JAX_COMPILATION_CACHE_MAX_SIZE"
MAX_BYTES = 4 * 2**30
"""The bound on the folder jaxtune chooses: a large model's compiled steps are tens of MB each, and
every new jaxlib, device, XLA flag or shape compiles afresh beside the old entries."""
# JAX's LRUCache keeps an entry as <key>-cache and, where the cache is bounded, its last use as
# <key>-atime; its readers and writers then hold <dir>/.lockfile (a filelock).
_ENTRY, _USED, _LOCK = "-cache", "-atime", ".lockfile"
_lock = threading.Lock()
_hits = 0
_listening = False
_warned = False
_dated: set[str] = set()


def _count(event: str, **kwargs: object) -> None:
    global _hits
    if event == _HIT:
        with _lock:
            _hits += 1


def _default_directory(directory: str | Path | None) -> Path | None:
    """``directory`` (else ``<jaxtune cache>/xla``), created; None, with one warning a process,
    where it cannot be."""
    global _warned
    try:
        path = Path(directory) if directory is not None else cache_dir() / "xla"
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as error:
        if not _warned:
            _warned = True
            log.warning("compile cache: off, its folder cannot be created (%s); every run compiles its steps "
                        "(set $JAXTUNE_CACHE or JAX_COMPILATION_CACHE_DIR to a writable folder, or "
                        "train.compile_cache: false)", error)
        return None


def enable(directory: str | Path | None = None) -> Path | None:
    """Turn the persistent compilation cache on (idempotent); returns its directory.

    A directory already configured (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept, and
    so are its settings. In the directory jaxtune chooses, programs that compile in under half a
    second are not worth a disk round trip and stay out, and the folder is bounded to
    :data:`MAX_BYTES` (unless the application chose its own minimum compile time, or bound:
    ``JAX_COMPILATION_CACHE_MAX_SIZE``, -1 for none).
    None, and the cache stays off, where ``directory`` (default ``<jaxtune cache>/xla``) cannot
    be created.
    """
    global _listening
    current = jax.config.jax_compilation_cache_dir
    if not current:
        path = _default_directory(directory)
        if path is None:
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
        if _threshold_is_jax_default():
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        # JAX's eviction needs filelock, and its lock file: a folder others filled and this user only
        # reads (a shared $JAXTUNE_CACHE) is read unbounded, as a bounded read would fail to lock
        if (_bound_is_jax_default() and importlib.util.find_spec("filelock") is not None
                and os.access(path, os.W_OK)):
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        current = str(path)
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _repair_failed_reads()
            _listening = True
        # a remote folder (gs://...) is JAX's own business
        undated = ("://" not in current and jax.config.jax_compilation_cache_max_size != -1
                   and current not in _dated)
        if undated:
            _dated.add(current)
    if undated:
        _date_entries(Path(current))
    return Path(current)


def _threshold_is_jax_default() -> bool:
    """Whether the minimum compile time of a cached program is still JAX's default (1 s): one the
    application set (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` or ``jax.config``) is kept."""
    return (_MIN_COMPILE_TIME_ENV not in os.environ
            and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0)


def _bound_is_jax_default() -> bool:
    """Whether the cache's bound is still JAX's default (-1, none): one the application set
    (``JAX_COMPILATION_CACHE_MAX_SIZE`` or ``jax.config``) is kept."""
    return _MAX_SIZE_ENV not in os.environ and jax.config.jax_compilation_cache_max_size == -1


def _date_entries(directory: Path) -> None:
    """Give each entry of a bounded ``directory`` without a last use its write time as one.

    JAX's eviction reads every entry's ``-atime`` and fails each write where one is missing (a
    warning, and the program is not kept), as it is for every entry written while the cache was
    unbounded, all caches before the bound: the bound would never hold. Held under JAX's lock
    file, as its eviction is; skipped (until the next process) where that cannot be had in 10 s.
    """
    try:
        with _folder_lock(directory):
            for entry in directory.glob("*" + _ENTRY):
                used = entry.with_name(entry.name.removesuffix(_ENTRY) + _USED)
                if not used.exists():  # JAX's format: time.time_ns(), 8 bytes little-endian
                    used.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
    except OSError as error:  # filelock.Timeout is one
        log.debug("compile cache: the entries of %s not dated (%s)", directory, error)


def _folder_lock(directory: Path) -> contextlib.AbstractContextManager[Any]:
    """JAX's lock on a bounded cache folder (its readers and writers hold it), taken within 10 s
    or raising ``filelock.Timeout`` (an OSError); nothing to hold without ``filelock``, as JAX then
    locks nothing."""
    try:
        import filelock
    except ImportError:
        return contextlib.nullcontext()
    return filelock.FileLock(directory / _LOCK, timeout=10)


def _repair_failed_reads() -> None:
    """Make every failed read of the persistent cache remove its entry where it does not
    decompress, before JAX compiles the program again and writes it (JAX skips an entry that
    exists). JAX has no hook for this: its module function is wrapped, and a JAX without it is
    left as it is."""
    from jax._src import compilation_cache as jax_cache

    read = getattr(jax_cache, "get_executable_and_time", None)
    if read is None or getattr(read, "jaxtune_repairs", False):
        return

    def get_executable_and_time(cache_key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(cache_key, *args, **kwargs)
        except Exception:
            _remove_if_damaged(cache_key)
            raise  # JAX warns, compiles and writes the entry afresh

    get_executable_and_time.jaxtune_repairs = True  # type: ignore[attr-defined]
    jax_cache.get_executable_and_time = get_executable_and_time


def _remove_if_damaged(key: str) -> None:
    """Remove the entry ``key`` of the configured cache folder where it does not decompress (a
    failed read for another cause, a lock held too long, leaves it)."""
    from jax._src.compilation_cache import decompress_executable

    folder = jax.config.jax_compilation_cache_dir
    if not folder or "://" in folder:
        return
    entry = Path(folder) / (key + _ENTRY)
    try:
        with _folder_lock(Path(folder)):
            data = entry.read_bytes()
            try:
                decompress_executable(data)
                return
            except Exception:  # noqa: BLE001 - zlib.error, zstd's errors: unreadable either way
                entry.unlink()
                entry.with_name(key + _USED).unlink(missing_ok=True)
    except OSError as error:
        log.debug("compile cache: %s not checked (%s)", entry, error)
        return
    log.warning("compile cache: removed %s, which does not decompress (a process stopped while writing it); "
                "its program compiles once more and is kept whole", entry)


def hits() -> int:
    """Executables loaded from the persistent cache so far in this process."""
    with _lock:
        return _hits

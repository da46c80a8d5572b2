"""Compile once per machine, not once per run: JAX's persistent compilation cache.

The train and eval steps are the same program every time a recipe runs on the same shapes, so
their compiled executables are kept on disk (``<jaxtune cache>/xla``, see
:func:`jaxtune.assets.cache_dir`) and a second ``jaxtune train`` loads them instead of
compiling. JAX's own cache does the work; this module only turns it on by default, leaves a
directory the application chose alone, and counts hits so the trainer can say what happened.
A cache directory that cannot be created (a read-only or missing home, a file in the way) leaves
the cache off with one warning: compiling every run is slower, not wrong.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax

from jaxtune.assets import cache_dir

log = logging.getLogger(__name__)
_HIT = "/jax/compilation_cache/cache_hits"
_MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_lock = threading.Lock()
_hits = 0
_listening = False
_warned = False


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

    A directory already configured (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept.
    Programs that compile in under half a second are not worth a disk round trip and stay out
    (unless the application chose its own minimum compile time).
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
        current = str(path)
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _listening = True
    return Path(current)


def _threshold_is_jax_default() -> bool:
    """Whether the minimum compile time of a cached program is still JAX's default (1 s): one the
    application set (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` or ``jax.config``) is kept."""
    return (_MIN_COMPILE_TIME_ENV not in os.environ
            and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0)


def hits() -> int:
    """Executables loaded from the persistent cache so far in this process."""
    with _lock:
        return _hits

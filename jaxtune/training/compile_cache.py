"""Compile once per machine, not once per run: JAX's persistent compilation cache.

The train and eval steps are the same program every time a recipe runs on the same shapes, so
their compiled executables are kept on disk (``<jaxtune cache>/xla``, see
:func:`jaxtune.assets.cache_dir`) and a second ``jaxtune train`` loads them instead of
compiling. JAX's own cache does the work; this module only turns it on by default, leaves a
directory the application chose alone, and counts hits so the trainer can say what happened.
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax

from jaxtune.assets import cache_dir

_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_hits = 0
_listening = False


def _count(event: str, **kwargs: object) -> None:
    global _hits
    if event == _HIT:
        with _lock:
            _hits += 1


def enable(directory: str | Path | None = None) -> Path | None:
    """Turn the persistent compilation cache on (idempotent); returns its directory.

    A directory already configured (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept.
    Programs that compile in under half a second are not worth a disk round trip and stay out.
    """
    global _listening
    current = jax.config.jax_compilation_cache_dir
    if not current:
        path = Path(directory) if directory is not None else cache_dir() / "xla"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        current = str(path)
    with _lock:
        if not _listening:
            jax.monitoring.register_event_listener(_count)
            _listening = True
    return Path(current)


def hits() -> int:
    """Executables loaded from the persistent cache so far in this process."""
    with _lock:
        return _hits

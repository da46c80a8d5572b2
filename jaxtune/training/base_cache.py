"""Score the base model once per machine, not once per run.

The base report (the pretrained model with the plan's fresh adapters or head, and the baselines
beside it) is a pure function of the model's files, the plan's initial params, the evaluation
(and, for the baselines, training) data as the model sees it, the evaluation settings and
jaxtune's code. On a small run it is the largest part of the start (two passes over the data,
a cross-validated probe), and a user who re-runs a recipe with another learning rate or step
count pays it again for the same numbers. So its result is kept on disk (``<jaxtune
cache>/base-metrics``) under a digest of all of those inputs, taken from the things themselves:
the model directory's files (names, sizes, modification times), the initial trainable params'
bytes, the evaluation batches' arrays (tokenized, so a different tokenizer, template or length
is a different key), the training rows and batches when baselines are on, jaxtune's source files,
and the resolved model/plan/evaluation settings. Anything that cannot be fingerprinted this way
(a model that is not a local path, batches that are not a jaxtune loader, several processes)
is simply evaluated, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtune.assets import cache_dir

log = logging.getLogger(__name__)

_FORMAT = "base-metrics/1"
_PACKAGE = Path(__file__).resolve().parents[1]


class _Unhashable(Exception):
    """An input without a faithful fingerprint: no cache for this run."""


def _update(h: Any, value: Any) -> None:
    """Feed ``value`` into the digest unambiguously (type-tagged; arrays by dtype, shape and bytes)."""
    if isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            _update(h, str(key))
            _update(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[%d" % len(value))
        for item in value:
            _update(h, item)
        h.update(b"]")
    elif isinstance(value, (np.ndarray, np.generic, jax.Array)):
        array = np.ascontiguousarray(np.asarray(value))
        h.update(f"a{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"b%d:" % len(value))
        h.update(value)
    elif value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value).encode()
        h.update(b"s%d:" % len(text))
        h.update(text)
    else:
        raise _Unhashable(type(value).__name__)


def _files(root: Path, pattern: str = "*") -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of every file under ``root``, sorted."""
    out = []
    for path in sorted(root.rglob(pattern)):
        if path.is_file():
            stat = path.stat()
            out.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return out


def _model_files(source: str) -> list[tuple[str, int, int]]:
    path = Path(source)
    if path.is_dir():
        return _files(path)
    if path.is_file():  # a GGUF file
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    raise _Unhashable(f"model source {source!r} is not a local path")


def key(*, source: str, settings: Mapping[str, Any], trainable: Any, eval_batches: Iterable[Any],
        train_rows: Iterable[Any] | None = None, train_batches: Iterable[Any] | None = None) -> str | None:
    """The digest under which this base report is kept, or None where it cannot be fingerprinted.

    Args:
      source: the model's local directory (or GGUF file).
      settings: what else decides the numbers: the resolved model section, the plan's rules, the
        task and labels, the evaluation settings (``choices``, ``baselines``).
      trainable: the initial trainable params (fresh adapters and heads: their bytes).
      eval_batches: one pass over the evaluation data, as the evaluation step receives it.
      train_rows, train_batches: the training split's rows and in-order batches (the baselines
        fit on them); None when baselines are off.
    """
    if jax.process_count() > 1:
        return None  # each host has its own cache: one hit and one miss would desynchronise collectives
    h = hashlib.sha256(_FORMAT.encode())
    try:
        _update(h, _model_files(source))
        _update(h, _files(_PACKAGE, "*.py"))
        _update(h, dict(settings))
        _update(h, [leaf for leaf in jax.tree.leaves(jax.device_get(trainable))])
        for batch in eval_batches:
            _update(h, batch)
        h.update(b"|train")
        for row in train_rows or ():
            _update(h, row)
        for batch in train_batches or ():
            _update(h, batch)
    except _Unhashable as why:
        log.debug("base metrics not cached: %s", why)
        return None
    return h.hexdigest()


def directory() -> Path:
    """Where base reports are kept: ``<jaxtune cache>/base-metrics``."""
    return cache_dir() / "base-metrics"


def _path(digest: str) -> Path:
    return directory() / f"{digest}.json"


def load(digest: str | None) -> dict[str, float] | None:
    """The base report kept under ``digest`` by an earlier run, or None."""
    if digest is None:
        return None
    try:
        metrics = json.loads(_path(digest).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def store(digest: str | None, metrics: Mapping[str, float]) -> None:
    """Keep ``metrics`` under ``digest`` (atomically: a concurrent reader sees all of it or nothing);
    a cache that cannot be written (read-only, or its folder cannot be created) keeps nothing, with a
    warning: the run goes on, and a later one scores its base model again."""
    if digest is None:
        return
    try:
        path = _path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(dict(metrics)))
        os.replace(partial, path)
    except OSError as error:
        log.warning("base report not kept for later runs: %s (set $JAXTUNE_CACHE to a writable folder, or "
                    "eval.cache_base: false)", error)

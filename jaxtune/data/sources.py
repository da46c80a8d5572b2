"""Sources: a data file read as any kind (:data:`KINDS`), validated, and split into training and validation.

:func:`read_source` picks the kind's reader: chat and prompt/completion rows
(:mod:`jaxtune.data.row_sources`), raw text (:mod:`jaxtune.data.text_sources`), labeled rows
(:mod:`jaxtune.data.labeled_sources`), preference pairs (:mod:`jaxtune.data.preference`); Parquet
files and folders of shards give every kind the same rows, checked the same way
(:mod:`jaxtune.data.parquet`; ``where`` is then ``"path[row]"``, the row's index in the file). What a
source is and what its records hold: :mod:`jaxtune.data.source_types`.

This module is the readers' public home: :class:`DataError` and the source types, the kinds and the
readers of each are importable from here as from :mod:`jaxtune.data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data.labeled_sources import read_labeled
from jaxtune.data.parquet import is_parquet
from jaxtune.data.preference import read_preference
from jaxtune.data.row_sources import read_jsonl, read_parquet_rows
from jaxtune.data.source_types import (
    KINDS,
    PREFERENCE,
    ROW_CHECKS,
    DataError,
    Source,
    SourceReport,
)
from jaxtune.data.text_sources import read_text

__all__ = ["KINDS", "PREFERENCE", "DataError", "Source", "SourceReport", "read_jsonl", "read_labeled",
           "read_source", "read_splits", "read_text", "split_indices", "split_source"]


def read_source(path: str | os.PathLike, kind: str, *, skip_bad_rows: bool = False, **options: Any) -> Source:
    """Read ``path`` as one of :data:`KINDS`; ``options`` go to the kind's reader (field names,
    ``syntax``...)."""
    if kind in ROW_CHECKS:
        if is_parquet(path):
            return read_parquet_rows(path, kind, skip_bad_rows=skip_bad_rows, **options)
        return read_jsonl(path, kind, skip_bad_rows=skip_bad_rows, **options)
    if kind == "text":
        return read_text(path, skip_bad_rows=skip_bad_rows, **options)
    if kind in ("classification", "regression"):
        return read_labeled(path, kind, skip_bad_rows=skip_bad_rows, **options)
    if kind == PREFERENCE:
        options.pop("syntax", None)  # preference errors keep their own wording
        return read_preference(path, skip_bad_rows=skip_bad_rows, **options)
    raise ValueError(f"unknown data kind {kind!r}; use one of {KINDS}")


def split_indices(n: int, validation: float | int, *, seed: int = 0,
                  labels: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train, validation)`` index arrays over ``range(n)``, each sorted.

    ``validation`` is a fraction in (0, 1) or a row count. With ``labels`` the split is
    stratified: each label gets its share of the validation rows (largest remainders get the
    rounding), so label proportions match in both parts.
    """
    count = int(round(n * validation)) if isinstance(validation, float) else int(validation)
    if isinstance(validation, float) and not 0.0 < validation < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {validation}")
    if not 0 < count < n:
        raise ValueError(f"a validation part of {validation} out of {n} rows leaves a part empty")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(np.asarray(labels) == c) for c in
                                                    sorted(set(labels), key=str)]
    share = np.array([len(g) * count / n for g in groups])
    take = np.floor(share).astype(int)  # below each group's size: every label keeps a training row
    room = np.array([len(g) for g in groups]) - 1 - take
    order = np.argsort(-(share - take), kind="stable")
    # The rounding's extra rows go by largest remainder, first to the groups that keep a training row
    # after it (a label seen only in validation is a class the model never trained on).
    for i in [*order[room[order] > 0], *order[room[order] <= 0]][: count - take.sum()]:
        take[i] += 1
    val = np.concatenate([rng.permutation(g)[:k] for g, k in zip(groups, take)])
    is_val = np.zeros(n, bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_source(source: Source, validation: float | int, *, seed: int = 0,
                 stratify: bool | None = None) -> tuple[Source, Source]:
    """Split into ``(train, validation)`` sources with a fixed seed (see :func:`split_indices`).

    ``stratify`` defaults to on for classification. Rows keep their file order inside each
    part; the loader shuffles.
    """
    stratify = source.kind == "classification" if stratify is None else stratify
    # An image source holds its labels apart (reading a row would decode its image).
    labels = None if not stratify else list(source.labels) if isinstance(getattr(source, "labels", None), np.ndarray) \
        else [source[i]["label"] for i in range(len(source))]
    train, val = split_indices(len(source), validation, seed=seed, labels=labels)
    return source.select(train), source.select(val)


def read_splits(train: str | os.PathLike, kind: str, *, validation: str | os.PathLike | None = None,
                validation_fraction: float | None = None, seed: int = 0, skip_bad_rows: bool = False,
                **options: Any) -> tuple[Source, Source | None]:
    """Training and validation sources: a separate ``validation`` file, a seeded fraction, or none.

    For classification the validation file is read with the training label vocabulary, so a
    label only seen there is an error.
    """
    if validation is not None and validation_fraction is not None:
        raise ValueError("give either a validation file or a validation_fraction, not both")
    source = read_source(train, kind, skip_bad_rows=skip_bad_rows, **options)
    if validation_fraction is not None:
        return split_source(source, validation_fraction, seed=seed)
    if validation is None:
        return source, None
    if kind == "classification":
        options = {**options, "labels": source.label_names}
    return source, read_source(validation, kind, skip_bad_rows=skip_bad_rows, **options)

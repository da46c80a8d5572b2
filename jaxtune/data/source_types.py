"""What a data source is: the kinds, the random-access :class:`Source` types, and :class:`DataError`
with the report of the rows a reader kept and skipped.

Every row is checked when the source is built ("fail at the door"): a bad row raises a
:class:`DataError` naming ``path:line``, what is wrong and how to fix it, or, with
``skip_bad_rows=True``, is left out, counted in ``source.report`` and logged
(:func:`reject_row`, :func:`finish_report`). Nothing is dropped without a count.

A source is random-access (grain's ``RandomAccessDataSource`` protocol: ``len`` and
``[]``), picklable (grain worker processes receive a copy) and thread-safe. JSONL and text
sources (:class:`FileSource`) keep only byte offsets and read rows with ``os.pread``, so a copy
is small and the threads grain reads with never share a file position.

Records (what ``source[i]`` returns) are plain dicts, one per example, with ``"where"``
(``"path:line"``, for later error messages) and, by kind:

- ``chat``: ``messages`` (list of ``{"role", "content"}``; ``name`` kept if given) and
  ``weights`` (one 0/1 per message: 1 for assistant turns that carry loss).
- ``prompt_completion``: ``prompt``, ``completion``.
- ``text``: ``text`` (a file, paragraph or line, see :func:`jaxtune.data.text_sources.read_text`).
- ``classification``: ``text``, optional ``text_pair``, ``label`` (int index into
  ``source.label_names``).
- ``regression``: ``text``, optional ``text_pair``, ``label`` (float).
- ``preference``: ``prompt``, ``chosen``, ``rejected`` (pairs of answers; read and validated by
  :mod:`jaxtune.data.preference`, tokenized by its ``TokenizePairs`` into paired rows).

The readers build on this module: :mod:`jaxtune.data.row_sources` (chat and prompt/completion
rows), :mod:`jaxtune.data.text_sources` (raw text), :mod:`jaxtune.data.labeled_sources` (labeled
rows), :mod:`jaxtune.data.parquet` (any of those rows from Parquet) and
:mod:`jaxtune.data.sources` (a file read as any kind, and split).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.data.rows import PYTHON, RowError, Syntax, check_chat, check_prompt_completion

log = logging.getLogger("jaxtune.data")

KINDS = ("chat", "prompt_completion", "text", "classification", "regression", "preference")
# Kinds tokenized into one LM example per record (Tokenize). Preference pairs also train a language
# model, but as two rows per record (chosen, rejected): they have their own tokenizer and row layout.
LM_KINDS = ("chat", "prompt_completion", "text")
PREFERENCE = "preference"


class DataError(ValueError):
    """Invalid data. ``str(err)`` is ``"<path>:<line>: <problem> — <how to fix it>"``."""

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}" + (f" — {fix}" if fix else ""))


@dataclasses.dataclass
class SourceReport:
    """What a reader kept and what it skipped (``skipped``: ``(where, problem)`` pairs)."""

    paths: list[str]
    rows: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = f"{', '.join(self.paths)}: {self.rows} rows"
        if self.skipped:
            text += f", {len(self.skipped)} bad rows skipped (first: {self.skipped[0][0]}: {self.skipped[0][1]})"
        return text


def reject_row(report: SourceReport, where: str, err: RowError, skip: bool, syntax: Syntax = PYTHON) -> None:
    """A bad row at ``where`` (``path:line``): a :class:`DataError` with the fix and the skip hint, or
    with ``skip`` a count in ``report``."""
    if not skip:
        raise DataError(where, err.problem, f"{err.fix}; {syntax.skip_hint()}")
    report.skipped.append((where, err.problem))


def finish_report(report: SourceReport, kept: int, what: str) -> None:
    """Record the ``kept`` rows, log the skipped ones (``what``: rows, pairs...), and refuse a source
    with none."""
    report.rows = kept
    if report.skipped:
        log.warning("%s: skipped %d bad %s; first: %s: %s", ", ".join(report.paths), len(report.skipped),
                    what, *report.skipped[0])
    if kept == 0:
        where = report.paths[0] if len(report.paths) == 1 else ", ".join(report.paths)
        raise DataError(where,
                        "no usable rows" + (" (all were bad and skipped)" if report.skipped else " (empty file)"),
                        "check that this is the right file and that it is not empty")


# --- random-access sources ------------------------------------------------------------------

class Source(Sequence):
    """Base of all sources: ``kind`` (one of :data:`KINDS`), ``report``, ``label_names``
    (classification vocabulary, else None) and ``select``."""

    kind: str
    report: SourceReport
    label_names: tuple | None = None

    @abc.abstractmethod
    def select(self, indices: Sequence[int]) -> Source:
        """A source of the rows at ``indices`` (same files, same report)."""

    def digest(self) -> str:
        """A short hash of which rows this is, in order: a resumed run must read the rows it started
        with (its data iterator's position points into them). This default hashes every row."""
        return digest_bytes(json.dumps([self[i] for i in range(len(self))], sort_keys=True, default=str).encode())


class FileSource(Source):
    """Rows as byte ranges of files, read with ``os.pread`` (one fd per file per process)."""

    def __init__(self, kind: str, paths: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray,
                 lengths: np.ndarray, lines: np.ndarray, report: SourceReport, fields: dict[str, str] | None = None):
        self.kind, self.paths, self.report = kind, tuple(paths), report
        self.fields = dict(fields or {})  # the row check's field names (messages_field=...)
        self._file_ids, self._offsets, self._lengths, self._lines = file_ids, offsets, lengths, lines
        self._stamps = [file_stamp(p) for p in self.paths]
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except (OSError, TypeError):  # TypeError: os already torn down at interpreter exit
                pass

    def __len__(self) -> int:
        return len(self._offsets)

    def _fd(self, file_id: int) -> int:
        fd = self._fds.get(file_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_id)
                if fd is None:
                    path = self.paths[file_id]
                    fd = os.open(path, os.O_RDONLY)
                    if file_stamp(path, fd) != self._stamps[file_id]:
                        os.close(fd)
                        raise DataError(path, "file changed after it was validated",
                                        "rebuild the data loader after editing data files")
                    self._fds[file_id] = fd
        return fd

    def where(self, index: int) -> str:
        return f"{self.paths[self._file_ids[index]]}:{self._lines[index]}"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        raw = os.pread(self._fd(int(self._file_ids[index])), int(self._lengths[index]), int(self._offsets[index]))
        if self.kind == "text":
            record = {"text": clean_text(raw.decode("utf-8"))}
        else:
            record = ROW_CHECKS[self.kind](json.loads(raw), **self.fields)
        record["where"] = self.where(index)
        return record

    def digest(self) -> str:
        """The files and the lines of them that are rows (not their bytes: an edit of a row resumes)."""
        return digest_bytes(json.dumps(self.paths).encode(), self._file_ids.astype(np.int64).tobytes(),
                       self._lines.astype(np.int64).tobytes())

    def select(self, indices: Sequence[int]) -> FileSource:
        idx = np.asarray(indices, dtype=np.int64)
        out = FileSource(self.kind, self.paths, self._file_ids[idx], self._offsets[idx], self._lengths[idx],
                         self._lines[idx], self.report, self.fields)
        out._stamps = self._stamps
        return out


class ListSource(Source):
    """Records held in memory (labeled rows: small, and their labels need a full pass anyway)."""

    def __init__(self, kind: str, records: list[dict], report: SourceReport, label_names: tuple | None = None):
        self.kind, self.records, self.report, self.label_names = kind, records, report, label_names

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return dict(self.records[int(index)])

    def select(self, indices: Sequence[int]) -> ListSource:
        return ListSource(self.kind, [self.records[int(i)] for i in indices], self.report, self.label_names)


def clean_text(text: str) -> str:
    """A raw-text document as it is trained on, whichever file held it (a ``.txt`` file or a Parquet
    row): without a leading byte-order mark and with Windows line ends (``\\r\\n``, and a ``\\r`` left
    at the end where a unit was cut before its ``\\n``) made ``\\n``; editors write those, and they are
    not text (a tokenizer gives the BOM and each ``\\r`` tokens of their own)."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").rstrip("\r")


def digest_bytes(*parts: bytes) -> str:
    """A 16-hex-digit sha256 of ``parts`` (each length-prefixed, so the split between them counts)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


# The row check of each kind read as JSONL (or Parquet) rows of one object each.
ROW_CHECKS: dict[str, Callable[[Any], dict]] = {"chat": check_chat, "prompt_completion": check_prompt_completion}


def file_stamp(path: str, fd: int | None = None) -> tuple[int, int]:
    """``(size, mtime_ns)`` of ``path`` (of the open ``fd`` when given): a file edited since has others."""
    st = os.fstat(fd) if fd is not None else os.stat(path)
    return st.st_size, st.st_mtime_ns


def existing_file(path: str | os.PathLike) -> str:
    """``path`` as a string, or a :class:`DataError` when it is not a file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "no such file", "check the path")
    return path


def check_columns(where: str, columns: Sequence[str], fields: Mapping[str, str], syntax: Syntax, whose: str) -> None:
    """A :class:`DataError` at ``where`` (``whose``: "header has", "file has") when ``columns`` lack one that
    ``fields`` (option -> column) maps; its fix names the option that would read another column."""
    missing = [(option, column) for option, column in fields.items() if column not in columns]
    if missing:
        option, column = missing[0]
        others = [c for c in columns if c not in fields.values()] or list(columns)
        raise DataError(where, f"{whose} no column {column!r} (columns: {list(columns)})",
                        f"rename the column, or {syntax.verb} {syntax.option(option, others[0])} to read "
                        "another column")

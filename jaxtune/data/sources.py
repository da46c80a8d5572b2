"""Sources: read and validate chat, prompt/completion, raw-text and labeled-row files.

Every row is checked when the source is built ("fail at the door"): a bad row raises a
:class:`DataError` naming ``path:line``, what is wrong and how to fix it, or, with
``skip_bad_rows=True``, is left out, counted in ``source.report`` and logged. Nothing is
dropped without a count.

A source is random-access (grain's ``RandomAccessDataSource`` protocol: ``len`` and
``[]``), picklable (grain worker processes receive a copy) and thread-safe. JSONL and text
sources keep only byte offsets and read rows with ``os.pread``, so a copy is small and the
threads grain reads with never share a file position.

Parquet files (and folders of shards) give every kind the same rows, checked the same way
(:mod:`jaxtune.data.parquet`; ``where`` is then ``"path[row]"``, the row's index in the file); raw
text is one document a row, from its ``text_field`` column.

Records (what ``source[i]`` returns) are plain dicts, one per example, with ``"where"``
(``"path:line"``, for later error messages) and, by kind:

- ``chat``: ``messages`` (list of ``{"role", "content"}``; ``name`` kept if given) and
  ``weights`` (one 0/1 per message: 1 for assistant turns that carry loss).
- ``prompt_completion``: ``prompt``, ``completion``.
- ``text``: ``text`` (a file, paragraph or line, see :func:`read_text`).
- ``classification``: ``text``, optional ``text_pair``, ``label`` (int index into
  ``source.label_names``).
- ``regression``: ``text``, optional ``text_pair``, ``label`` (float).
- ``preference``: ``prompt``, ``chosen``, ``rejected`` (pairs of answers; read and validated by
  :mod:`jaxtune.data.preference`, tokenized by its ``TokenizePairs`` into paired rows).
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data.rows import (
    PYTHON,
    RowError,
    Syntax,
    as_object,
    check_chat,
    check_labeled,
    check_prompt_completion,
    string_field,
)

log = logging.getLogger("jaxtune.data")

KINDS = ("chat", "prompt_completion", "text", "classification", "regression", "preference")
# Kinds tokenized into one LM example per record (Tokenize). Preference pairs also train a language
# model, but as two rows per record (chosen, rejected): they have their own tokenizer and row layout.
LM_KINDS = ("chat", "prompt_completion", "text")
PREFERENCE = "preference"
TEXT_UNITS = ("file", "paragraph", "line")


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
        if self.kind == "text":  # a file's BOM and Windows line ends are not text to train on
            record = {"text": raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n").rstrip("\r")}
        else:
            record = _CHECKS[self.kind](json.loads(raw), **self.fields)
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


def digest_bytes(*parts: bytes) -> str:
    """A 16-hex-digit sha256 of ``parts`` (each length-prefixed, so the split between them counts)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


_CHECKS: dict[str, Callable[[Any], dict]] = {"chat": check_chat, "prompt_completion": check_prompt_completion}


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


def jsonl_lines(path: str, report: SourceReport, skip: bool,
                 syntax: Syntax = PYTHON) -> Iterator[tuple[int, int, int, Any]]:
    """Yield ``(line, offset, length, parsed)`` for each JSON line; blank lines hold no data."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except UnicodeDecodeError as err:
                reject_row(report, f"{path}:{line_no}", RowError(f"not UTF-8 ({err.reason})", "save the file as UTF-8"),
                        skip, syntax)
                continue
            except json.JSONDecodeError as err:
                reject_row(report, f"{path}:{line_no}",
                        RowError(f"malformed JSON at column {err.colno}: {err.msg}",
                                 "each line must be one complete JSON object"), skip, syntax)
                continue
            yield line_no, start, len(line), parsed


def read_jsonl(path: str | os.PathLike, kind: str, *, skip_bad_rows: bool = False, messages_field: str = "messages",
               prompt_field: str = "prompt", completion_field: str = "completion",
               syntax: Syntax = PYTHON) -> FileSource:
    """Read a chat (``kind="chat"``) or ``"prompt_completion"`` JSONL file.

    Chat rows follow the OpenAI fine-tuning format: ``{"messages": [{"role":
    "system"|"user"|"assistant", "content": str, "weight": 0|1 (assistant only, optional),
    "reasoning_content": str (assistant only, optional: for templates that render it, as Qwen3's)},
    ...]}``; ``messages_field`` (``prompt_field``, ``completion_field``) name the keys when a
    file uses others. Raises :class:`DataError` (``path:line``) on the first bad row unless
    ``skip_bad_rows``, in which case bad rows are counted in ``source.report.skipped``.
    ``syntax`` spells the fixes errors suggest (Python arguments or recipe keys).
    """
    fields = _row_fields(kind, messages_field, prompt_field, completion_field)
    path = existing_file(path)
    report = SourceReport([path])
    lines, offsets, lengths = [], [], []
    for line_no, start, length, parsed in jsonl_lines(path, report, skip_bad_rows, syntax):
        try:
            _CHECKS[kind](parsed, **fields, syntax=syntax)
        except RowError as err:
            reject_row(report, f"{path}:{line_no}", err, skip_bad_rows, syntax)
            continue
        lines.append(line_no), offsets.append(start), lengths.append(length)
    finish_report(report, len(offsets), "rows")
    return FileSource(kind, [path], np.zeros(len(offsets), np.int32), np.asarray(offsets, np.int64),
                      np.asarray(lengths, np.int64), np.asarray(lines, np.int64), report, fields)


def _row_fields(kind: str, messages_field: str, prompt_field: str, completion_field: str) -> dict[str, str]:
    """The field options (option -> key) of a chat or prompt/completion row check."""
    if kind not in _CHECKS:
        raise ValueError(f"rows of chat or prompt_completion are read here, not {kind!r}")
    return ({"messages_field": messages_field} if kind == "chat"
            else {"prompt_field": prompt_field, "completion_field": completion_field})


def _read_parquet_rows(path: str | os.PathLike, kind: str, *, skip_bad_rows: bool = False,
                       messages_field: str = "messages", prompt_field: str = "prompt",
                       completion_field: str = "completion", syntax: Syntax = PYTHON) -> Source:
    """:func:`read_jsonl`'s rows from a Parquet file or folder of shards (see :mod:`jaxtune.data.parquet`)."""
    from jaxtune.data.parquet import read_parquet

    fields = _row_fields(kind, messages_field, prompt_field, completion_field)
    return read_parquet(path, kind, functools.partial(_CHECKS[kind], syntax=syntax), fields=fields,
                        skip_bad_rows=skip_bad_rows, syntax=syntax)


_UNIT_PATTERNS = {
    "paragraph": re.compile(rb"(?:[^\n]*\S[^\n]*(?:\n|$))+"),  # runs of non-blank lines
    "line": re.compile(rb"[^\n]*\S[^\n]*"),
}


def read_text(path: str | os.PathLike, *, unit: str = "file", suffixes: Sequence[str] = (".txt", ".md"),
              skip_bad_rows: bool = False, syntax: Syntax = PYTHON, text_field: str | None = None) -> Source:
    """Raw text for continued (domain) training: one file, or every ``suffixes`` file under a folder.

    Each document is a whole file (``unit="file"``), a paragraph (runs of non-blank lines) or a
    non-blank line. Empty files and text that is not UTF-8 are errors (or skipped and counted).

    A Parquet file (or folder or pattern of shards, as hub text corpora ship) gives one document a
    row: its ``text_field`` column (default ``text``), a string that is not blank (else the row is
    an error naming ``path[row]``, or skipped and counted).
    """
    root = os.fspath(path)
    if _is_parquet(root):
        return _read_parquet_text(root, unit, text_field or "text", skip_bad_rows, syntax)
    if text_field is not None:
        raise DataError(root, f"{syntax.option('text_field', text_field)} names a Parquet column, and text files "
                        "have none", "remove it, or read a Parquet file")
    if os.path.isdir(root):
        files = sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise DataError(root, f"folder has no {'/'.join(suffixes)} files", "point at text files or set suffixes")
    else:
        files = [existing_file(root)]
    if unit not in TEXT_UNITS:
        raise ValueError(f"unit must be one of {TEXT_UNITS}, got {unit!r}")
    report = SourceReport(files if len(files) == 1 else [root])
    cols: list[list[int]] = [[], [], [], []]  # file id, offset, length, line
    for file_id, name in enumerate(files):
        with open(name, "rb") as f:
            data = f.read()
        if not data.strip():
            reject_row(report, f"{name}:1", RowError("file is empty", "remove it or add text"), skip_bad_rows, syntax)
            continue
        spans = ([(0, len(data))] if unit == "file"
                 else [m.span() for m in _UNIT_PATTERNS[unit].finditer(data)])
        line, pos = 1, 0
        for start, end in spans:
            line += data.count(b"\n", pos, start)
            pos = start
            try:
                data[start:end].decode("utf-8")
            except UnicodeDecodeError as err:
                bad_line = line + data.count(b"\n", start, start + err.start)
                reject_row(report, f"{name}:{bad_line}",
                           RowError(f"not UTF-8 ({err.reason})", "save the file as UTF-8"), skip_bad_rows, syntax)
                continue
            for col, value in zip(cols, (file_id, start, end - start, line)):
                col.append(value)
    finish_report(report, len(cols[0]), "documents")
    return FileSource("text", files, np.asarray(cols[0], np.int32), np.asarray(cols[1], np.int64),
                      np.asarray(cols[2], np.int64), np.asarray(cols[3], np.int64), report)


def _read_parquet_text(path: str, unit: str, text_field: str, skip: bool, syntax: Syntax) -> Source:
    """:func:`read_text`'s documents from the ``text_field`` column of Parquet rows, one a row."""
    from jaxtune.data.parquet import read_parquet

    if unit != "file":  # a row is a document already; splitting it would renumber what path[row] names
        raise DataError(path, f"{syntax.option('text_unit', unit)}: Parquet rows are one document each",
                        "remove it (the default, file, reads a row as a document)")
    return read_parquet(path, "text", check_text_row, fields={"text_field": text_field}, skip_bad_rows=skip,
                        syntax=syntax)


def check_text_row(obj: dict, *, text_field: str) -> dict:
    """A raw-text row's record ``{"text"}``: its ``text_field``, a string that is not blank."""
    return {"text": string_field(obj, text_field, nonempty=True)}


def _labeled_rows(path: str, report: SourceReport, skip: bool, fields: dict[str, str], optional: Sequence[str],
                  syntax: Syntax) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of a JSONL, CSV/TSV or Parquet file; ``fields`` maps each option (``text_field``...)
    to the column a CSV header or Parquet file must have (Parquet reads those and ``optional``)."""
    if path.lower().endswith((".csv", ".tsv")):
        for line_no, row in _csv_rows(path, fields, syntax):
            yield f"{path}:{line_no}", row
    elif _is_parquet(path):
        from jaxtune.data.parquet import parquet_rows

        for where, _, _, row in parquet_rows(path, fields, optional, syntax):
            yield where, row
    else:
        for line_no, _, _, parsed in jsonl_lines(path, report, skip, syntax):
            yield f"{path}:{line_no}", parsed


def _is_parquet(path: str | os.PathLike) -> bool:
    from jaxtune.data.parquet import is_parquet  # it builds on this module, as preference does

    return is_parquet(path)


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


def _csv_rows(path: str, fields: dict[str, str], syntax: Syntax) -> Iterator[tuple[int, dict | RowError]]:
    """``(first line, row)`` of a CSV/TSV file with a header naming ``fields``' columns."""
    tsv = path.lower().endswith(".tsv")
    delimiter = "\t" if tsv else ","
    reader = csv.DictReader(io.StringIO(_utf8_text(path), newline=""), delimiter=delimiter)
    limit = csv.field_size_limit(sys.maxsize)  # a document may be longer than csv's 128 KiB default
    try:
        try:
            header = reader.fieldnames or []
        except csv.Error as err:
            raise DataError(f"{path}:1", f"the header is not valid CSV ({err})", "fix the header row") from None
        if not header:
            raise DataError(f"{path}:1", "file is empty", "write a header row and data rows")
        check_columns(f"{path}:1", header, fields, syntax, "header has")
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:  # csv would keep only the last column of a name
            raise DataError(f"{path}:1", f"the header names column {twice[0]!r} more than once",
                            "give every column its own name")
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}:{first}", f"not valid CSV ({err})",
                                "quote fields that hold quotes, delimiters or line breaks") from None
            if tsv and reader.line_num > first and any(value and "\t" in value and "\n" in value
                                                      for value in row.values() if isinstance(value, str)):
                # TSV fields hold no tabs or line breaks unless quoted: this is a quote that was not
                # meant to open a field, and it swallowed the rows up to its partner
                raise DataError(f"{path}:{first}", f"a quote opens a field that runs over lines {first}-"
                                f"{reader.line_num}, across tabs", "remove the stray quote, or double it "
                                "inside a quoted field (\"a \"\"b\"\" c\")")
            yield first, _csv_fields(row, header, delimiter)
    finally:
        csv.field_size_limit(limit)


def _utf8_text(path: str) -> str:
    """A CSV/TSV file's text; bytes that are not UTF-8 are an error naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}", f"not UTF-8 ({err.reason} at byte {err.start})",
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _csv_fields(row: dict, header: Sequence[str], delimiter: str) -> dict | RowError:
    """A CSV row, or the error of a row whose field count differs from the header's."""
    name = "tab" if delimiter == "\t" else "comma"
    if None in row:  # more fields than columns: csv puts the extras under the key None
        return RowError(f"{len(header) + len(row[None])} fields but the header has {len(header)} columns",
                        f"quote a field that contains a {name}, e.g. \"a{delimiter} b\"")
    if any(value is None for value in row.values()):
        given = sum(value is not None for value in row.values())
        return RowError(f"{given} field{'' if given == 1 else 's'} but the header has {len(header)} columns",
                        "give every column a value (an empty one between two delimiters)")
    return row


def _vocabulary(keys: Sequence[str]) -> tuple:
    """Label names sorted numerically when all are integers written as Python writes them (so 0..K-1
    map to themselves); otherwise strings, sorted (``01`` and ``1`` stay two labels, as written)."""
    unique = set(keys)
    if all(re.fullmatch(r"-?\d+", k) and str(int(k)) == k for k in unique):
        return tuple(sorted(int(k) for k in unique))
    return tuple(sorted(unique))


def read_labeled(path: str | os.PathLike, task: str = "classification", *, labels: Sequence | None = None,
                 text_field: str = "text", pair_field: str | None = None, label_field: str | None = None,
                 skip_bad_rows: bool = False, syntax: Syntax = PYTHON, require_label: bool = True) -> ListSource:
    """Read labeled rows from JSONL or CSV/TSV (by suffix).

    ``task="classification"``: ``label_field`` (default ``"label"``) holds string or integer
    labels. Without ``labels`` the vocabulary is every label seen (integers sorted
    numerically, strings alphabetically); with ``labels`` (e.g. the training split's
    ``label_names``) a label outside it is an error. ``task="regression"``: ``label_field``
    (default ``"target"``) must be a finite number. ``pair_field`` names an optional second
    text (sentence pairs). The result's ``label_names`` is the vocabulary (None for regression).
    ``require_label=False`` (rows to predict, with ``labels``): a row without a label is kept,
    its ``label`` -1 (classification) or NaN (regression).
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    label_field = label_field or ("label" if task == "classification" else "target")
    path = os.fspath(path) if _is_parquet(path) else existing_file(path)
    report = SourceReport([path])
    fields = {"text_field": text_field, **({"label_field": label_field} if require_label else {}),
              **({"pair_field": pair_field} if pair_field else {})}
    records = []
    for where, row in _labeled_rows(path, report, skip_bad_rows, fields, [label_field], syntax):
        try:
            if isinstance(row, RowError):
                raise row
            record = check_labeled(as_object(row, f"write each line as {{{text_field!r}: ..., "
                                                    f"{label_field!r}: ...}}"),
                                    task=task, text_field=text_field, pair_field=pair_field, label_field=label_field,
                                    syntax=syntax, require_label=require_label)
            if (task == "classification" and labels is not None and record["label"] is not None
                    and record["label"] not in {str(x) for x in labels}):
                raise RowError(f"label {record['label']!r} is not in the label vocabulary {list(labels)}",
                               "fix the label, or build the vocabulary from data that contains it")
        except RowError as err:
            reject_row(report, where, err, skip_bad_rows, syntax)
            continue
        record["where"] = where
        records.append(record)
    finish_report(report, len(records), "rows")
    names = None
    if not require_label and labels is None and task == "classification":
        raise ValueError("require_label=False needs labels= (the vocabulary the model was trained with)")
    if task == "regression":
        for record in records:
            record["label"] = math.nan if record["label"] is None else record["label"]
    if task == "classification":
        names = tuple(labels) if labels is not None else _vocabulary([r["label"] for r in records])
        if len(names) < 2:
            raise DataError(path, f"every row has the label {names[0]!r}; a classifier needs two or more labels",
                            f"add rows of the other classes, or check {label_field!r} is the label column")
        index = {str(name): i for i, name in enumerate(names)}
        for record in records:
            record["label"] = -1 if record["label"] is None else index[record["label"]]
    return ListSource(task, records, report, names)


def read_source(path: str | os.PathLike, kind: str, *, skip_bad_rows: bool = False, **options: Any) -> Source:
    """Read ``path`` as one of :data:`KINDS`; ``options`` go to the kind's reader (field names,
    ``syntax``...)."""
    if kind in _CHECKS:
        if _is_parquet(path):
            return _read_parquet_rows(path, kind, skip_bad_rows=skip_bad_rows, **options)
        return read_jsonl(path, kind, skip_bad_rows=skip_bad_rows, **options)
    if kind == "text":
        return read_text(path, skip_bad_rows=skip_bad_rows, **options)
    if kind in ("classification", "regression"):
        return read_labeled(path, kind, skip_bad_rows=skip_bad_rows, **options)
    if kind == PREFERENCE:
        from jaxtune.data.preference import read_preference  # it builds on this module's helpers

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

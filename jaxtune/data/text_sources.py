"""Raw text for continued (domain) training: ``.txt``/``.md`` files, or a Parquet ``text`` column.

A document is a whole file, a paragraph or a line of a text file, or one Parquet row (see
:func:`read_text`); either reader gives it as :func:`~jaxtune.data.source_types.clean_text` gives it
(no byte-order mark, ``\\n`` line ends), so the same text gives the same tokens from either.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxtune.data.parquet import is_parquet, read_parquet
from jaxtune.data.rows import PYTHON, RowError, Syntax, string_field
from jaxtune.data.source_types import (
    DataError,
    FileSource,
    Source,
    SourceReport,
    clean_text,
    existing_file,
    finish_report,
    reject_row,
)

TEXT_UNITS = ("file", "paragraph", "line")
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
    an error naming ``path[row]``, or skipped and counted), cleaned as a text file's document is (no
    byte-order mark, ``\\n`` line ends).
    """
    root = os.fspath(path)
    if is_parquet(root):
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
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # not text: never a unit of its own
        if not data[bom:].strip():
            reject_row(report, f"{name}:1", RowError("file is empty", "remove it or add text"), skip_bad_rows, syntax)
            continue
        spans = ([(bom, len(data))] if unit == "file"
                 else [m.span() for m in _UNIT_PATTERNS[unit].finditer(data, bom)])
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
    if unit != "file":  # a row is a document already; splitting it would renumber what path[row] names
        raise DataError(path, f"{syntax.option('text_unit', unit)}: Parquet rows are one document each",
                        "remove it (the default, file, reads a row as a document)")
    return read_parquet(path, "text", check_text_row, fields={"text_field": text_field}, skip_bad_rows=skip,
                        syntax=syntax)


def check_text_row(obj: dict, *, text_field: str) -> dict:
    """A raw-text row's record ``{"text"}``: its ``text_field``, a string that is not blank, cleaned as
    a text file's document is (:func:`~jaxtune.data.source_types.clean_text`)."""
    text = clean_text(string_field(obj, text_field, nonempty=True))
    if not text.strip():
        raise RowError(f"{text_field!r} holds only a byte-order mark",
                       f"give {text_field!r} some text or remove the row")
    return {"text": text}

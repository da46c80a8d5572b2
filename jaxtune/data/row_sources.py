"""Chat and prompt/completion rows: a JSONL file (one JSON object a line), or the same rows from Parquet.

Chat rows follow the OpenAI fine-tuning format; each row goes through its check
(:mod:`jaxtune.data.rows`) when the source is built, and a bad one is a :class:`DataError` naming
``path:line`` (``path[row]`` for Parquet) or, with ``skip_bad_rows``, is counted and left out. A
JSONL source keeps each row's byte range (:class:`~jaxtune.data.source_types.FileSource`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxtune.data.parquet import read_parquet
from jaxtune.data.rows import PYTHON, RowError, Syntax
from jaxtune.data.source_types import (
    ROW_CHECKS,
    FileSource,
    Source,
    SourceReport,
    existing_file,
    finish_report,
    reject_row,
)


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
            ROW_CHECKS[kind](parsed, **fields, syntax=syntax)
        except RowError as err:
            reject_row(report, f"{path}:{line_no}", err, skip_bad_rows, syntax)
            continue
        lines.append(line_no), offsets.append(start), lengths.append(length)
    finish_report(report, len(offsets), "rows")
    return FileSource(kind, [path], np.zeros(len(offsets), np.int32), np.asarray(offsets, np.int64),
                      np.asarray(lengths, np.int64), np.asarray(lines, np.int64), report, fields)


def _row_fields(kind: str, messages_field: str, prompt_field: str, completion_field: str) -> dict[str, str]:
    """The field options (option -> key) of a chat or prompt/completion row check."""
    if kind not in ROW_CHECKS:
        raise ValueError(f"rows of chat or prompt_completion are read here, not {kind!r}")
    return ({"messages_field": messages_field} if kind == "chat"
            else {"prompt_field": prompt_field, "completion_field": completion_field})


def read_parquet_rows(path: str | os.PathLike, kind: str, *, skip_bad_rows: bool = False,
                       messages_field: str = "messages", prompt_field: str = "prompt",
                       completion_field: str = "completion", syntax: Syntax = PYTHON) -> Source:
    """:func:`read_jsonl`'s rows from a Parquet file or folder of shards (see :mod:`jaxtune.data.parquet`)."""
    fields = _row_fields(kind, messages_field, prompt_field, completion_field)
    return read_parquet(path, kind, functools.partial(ROW_CHECKS[kind], syntax=syntax), fields=fields,
                        skip_bad_rows=skip_bad_rows, syntax=syntax)

"""Labeled rows for classification and regression: JSONL, CSV/TSV (by suffix) or Parquet.

The label vocabulary of classification is every label seen (or the training split's, given); a
regression target is a finite number. Rows are held in memory (a
:class:`~jaxtune.data.source_types.ListSource`: they are small, and their labels need a full pass).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxtune.data.parquet import is_parquet, parquet_rows
from jaxtune.data.row_sources import jsonl_lines
from jaxtune.data.rows import PYTHON, RowError, Syntax, as_object, check_labeled
from jaxtune.data.source_types import (
    DataError,
    ListSource,
    SourceReport,
    check_columns,
    existing_file,
    finish_report,
    reject_row,
)


def _labeled_rows(path: str, report: SourceReport, skip: bool, fields: dict[str, str], optional: Sequence[str],
                  syntax: Syntax) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of a JSONL, CSV/TSV or Parquet file; ``fields`` maps each option (``text_field``...)
    to the column a CSV header or Parquet file must have (Parquet reads those and ``optional``)."""
    if path.lower().endswith((".csv", ".tsv")):
        for line_no, row in _csv_rows(path, fields, syntax):
            yield f"{path}:{line_no}", row
    elif is_parquet(path):
        for where, _, _, row in parquet_rows(path, fields, optional, syntax):
            yield where, row
    else:
        for line_no, _, _, parsed in jsonl_lines(path, report, skip, syntax):
            yield f"{path}:{line_no}", parsed


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
    path = os.fspath(path) if is_parquet(path) else existing_file(path)
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

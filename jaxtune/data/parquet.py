"""Parquet rows: a ``.parquet`` file, or a folder of them, read as the JSONL file of the same rows.

Parquet is how the Hugging Face hub ships datasets (``refs/convert/parquet``), what
``datasets.Dataset.to_parquet`` and ``pandas.DataFrame.to_parquet`` write, and a folder of
``*.parquet`` shards is what ``datasets``, Spark and the hub's conversion write for a large split
(the shards are read in name order; names starting with ``_`` or ``.``, Spark's ``_SUCCESS`` and
checksums, are not data), or a pattern of files (``data/train-*.parquet``: a hub dataset's
``data/`` holds every split's shards, so reading that folder is refused). Columns are the rows'
keys and nested columns their nested values: a ``messages`` list of structs reads as the JSONL
row's list of ``{"role", "content"}`` objects. A struct has every field in every row, so a field a
row leaves null (``weight`` on a user turn, ``name`` where none was given) is dropped, as if the
JSON object had not written it.

Each row goes through the same check as a JSONL row (:mod:`jaxtune.data.rows`) when the source is
built, and a bad one raises a one-line :class:`~jaxtune.data.source_types.DataError` naming
``path[row]`` (``row`` is the row's index in that file, from 0, as pandas, ``datasets`` and
pyarrow number it) or, with ``skip_bad_rows``, is counted and left out. A file without a column the
rows need is an error naming the column, the file's columns and the option that maps another.

:class:`ParquetSource` (chat, prompt/completion, preference and raw-text rows) keeps only each row's file and
index. ``source[i]`` reads the row group holding row ``i`` with pyarrow (only the columns the kind
reads) and keeps the decoded groups of each process in a cache of at most :data:`CACHE_BYTES`
(least recently used out first), so a file much larger than memory trains without being loaded,
and one that fits is decoded once per process. Threads decode groups at once, each on its own open
file. Rows of a group the cache no longer holds cost the decoding of the whole group, so a file
with more data than the cache, in groups so large that few fit in it (pandas writes up to a
million rows a group), is warned of when read, with the way to write it in smaller groups.
Parquet's pages are compressed, so there is no zero-copy memory map of a ``.parquet`` file (an
uncompressed Arrow copy would be one, at the cost of writing the data again, uncompressed, and
keeping that copy in step with the file). Labeled rows and image rows' paths and labels are held in memory (as from
JSONL: they are small, and their labels need a full pass anyway); image files held in the rows
(``datasets``' ``Image`` feature with its ``bytes``) are a :class:`ParquetSource` of that column,
read by row group when a batch needs them (:func:`parquet_source`, from the rows the image reader
checked).

pyarrow is an optional dependency (``pip install 'jaxtune[parquet]'``); without it a Parquet path
is a one-line error that says so.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data.rows import PYTHON, RowError, Syntax
from jaxtune.data.source_types import (
    DataError,
    Source,
    SourceReport,
    check_columns,
    digest_bytes,
    file_stamp,
    finish_report,
    reject_row,
)

SUFFIX = ".parquet"
CACHE_BYTES = 256 << 20  # decoded row groups a process keeps (each worker process its own)
_SPLIT_SHARD = re.compile(r"(.+?)-\d+-of-\d+(?:-[0-9a-f]+)?\.parquet", re.IGNORECASE)  # the hub's shard names
_BATCH_ROWS = 1024  # rows decoded at once while checking a file
INSTALL = "pip install 'jaxtune[parquet]'"

log = logging.getLogger("jaxtune.data")


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.parquet`` file or pattern of them (by its name) or a folder holding
    ``.parquet`` files."""
    path = Path(path)
    if path.is_dir():
        return bool(_shards(path))
    return path.suffix.lower() == SUFFIX


def parquet_files(path: str | os.PathLike) -> list[str]:
    """The files of ``path``: itself, a folder's ``*.parquet`` shards, or those a pattern names
    (``data/train-*.parquet``), in name order. A folder holding the shards of several splits, as a
    hub dataset's ``data/`` holds ``train-00000-of-00002.parquet`` beside ``test-00000-of-00001.parquet``,
    is an error (it would mix them) that gives the pattern of one split."""
    path = Path(path)
    if path.is_dir():
        files = _shards(path)
        if not files:
            raise DataError(str(path), "folder has no .parquet files", "point at a .parquet file or a folder of them")
        splits = sorted({m[1] for m in (_SPLIT_SHARD.fullmatch(Path(f).name) for f in files) if m})
        if len(splits) > 1:
            split = "train" if "train" in splits else splits[0]
            raise DataError(str(path), f"the folder holds the shards of several splits ({', '.join(splits)})",
                            f"read one split's shards with a pattern, e.g. {path / f'{split}-*.parquet'}")
        return files
    if glob.has_magic(str(path)) and not path.exists():
        files = sorted(f for f in glob.glob(str(path)) if os.path.isfile(f))
        if not files:
            raise DataError(str(path), "no file matches the pattern", "check the path and the pattern")
        return files
    if not path.is_file():
        raise DataError(str(path), "no such file", "check the path")
    return [str(path)]


def _shards(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() == SUFFIX and not p.name.startswith(("_", ".")))


def pyarrow_parquet(path: str) -> Any:
    """``pyarrow.parquet``, or a :class:`DataError` naming ``path`` and the install command."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, "reading Parquet needs pyarrow, which is not installed", f"run {INSTALL}") from None
    return pq


def open_parquet(path: str) -> Any:
    """``pyarrow.parquet.ParquetFile(path)``; a file pyarrow cannot read is a :class:`DataError`."""
    pq = pyarrow_parquet(path)
    import pyarrow as pa

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, f"not a readable Parquet file ({str(err).splitlines()[0]})",
                        "re-write it (e.g. with pandas' or datasets' to_parquet)") from None


def plain(value: Any) -> Any:
    """A row value as JSON would give it: structs as dicts without their null fields, lists as lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def row_columns(path: str, names: Sequence[str], fields: Mapping[str, str], optional: Sequence[str],
                syntax: Syntax) -> list[str]:
    """The columns to read of a file with columns ``names``: those ``fields`` map (option -> column,
    each required) and those of ``optional`` it has; a missing one is a :class:`DataError`."""
    if not names:  # what pyarrow writes for a table of no rows built from no dicts
        raise DataError(path, "file has no columns", "write the rows, with their columns, to it")
    check_columns(path, list(names), fields, syntax, "file has")
    columns = [c for c in names if c in fields.values() or c in optional]
    if not columns:
        raise DataError(path, f"none of the columns {list(optional)} (columns: {list(names)})",
                        "name the columns as the rows' JSONL keys are named")
    return columns


def parquet_rows(path: str | os.PathLike, fields: Mapping[str, str] | None = None, optional: Sequence[str] = (),
                 syntax: Syntax = PYTHON) -> Iterator[tuple[str, int, int, dict]]:
    """``(where, file index, row index, row)`` of every row of ``path`` (a file or a folder of shards),
    each row a dict of the columns :func:`row_columns` picks, in :func:`plain` form."""
    for file_id, name in enumerate(parquet_files(path)):
        pf = open_parquet(name)
        columns = row_columns(name, pf.schema_arrow.names, fields or {}, optional, syntax)
        row = 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            for obj in batch.to_pylist():
                yield f"{name}[{row}]", file_id, row, plain(obj)
                row += 1


class ParquetSource(Source):
    """Rows of Parquet files, as ``(file, row index)`` pairs read by row group (see the module
    docstring): random access, picklable (a copy holds no open file nor cache) and thread-safe.

    ``check`` is the kind's row check (called as ``check(row, **fields)``); ``indexed`` records
    carry ``"index"``, their place in this source (preference pairs: a cached reference model's
    log-probs are found by it)."""

    def __init__(self, kind: str, paths: Sequence[str], file_ids: np.ndarray, rows: np.ndarray,
                 report: SourceReport, check: Callable[..., dict], fields: Mapping[str, str],
                 columns: Sequence[Sequence[str]], group_starts: Sequence[np.ndarray], indexed: bool = False):
        self.kind, self.paths, self.report, self.check = kind, tuple(paths), report, check
        self.fields, self.indexed = dict(fields), indexed
        self._file_ids, self._rows = file_ids, rows
        self._columns = [list(c) for c in columns]
        self._group_starts = list(group_starts)  # per file: the first row of each row group
        self._stamps = [file_stamp(p) for p in self.paths]
        self._content: list[bytes] | None = None
        self._local = threading.local()  # each thread's open files: {file index: ParquetFile}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_local=None, _cache=collections.OrderedDict(), _cached_bytes=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._local = threading.Lock(), threading.local()

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, index: int) -> str:
        return f"{self.paths[self._file_ids[index]]}[{self._rows[index]}]"

    def _group(self, file_id: int, group: int) -> Any:
        """Row group ``group`` of file ``file_id`` decoded (an Arrow table), from the cache or read."""
        key, path = (file_id, group), self.paths[file_id]
        with self._lock:
            table = self._cache.get(key)
            if table is not None:
                self._cache.move_to_end(key)
                return table
        _unchanged(path, self._stamps[file_id])
        # Decoded outside the lock, on this thread's own file object: grain's reading threads decode
        # groups at once, as pyarrow lets go of the GIL to decode.
        files = self._local.__dict__.setdefault("files", {})
        if file_id not in files:
            files[file_id] = open_parquet(path)
        table = files[file_id].read_row_group(group, columns=self._columns[file_id])
        with self._lock:
            if key not in self._cache:  # another thread may have read it meanwhile
                self._cache[key] = table
                self._cached_bytes += table.nbytes
                while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                    self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        file_id, row = int(self._file_ids[index]), int(self._rows[index])
        starts = self._group_starts[file_id]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        obj = plain(self._group(file_id, group).slice(row - int(starts[group]), 1).to_pylist()[0])
        record = self.check(obj, **self.fields)
        if self.indexed:
            record["index"] = index
        record["where"] = self.where(index)
        return record

    def digest(self) -> str:
        """The files' bytes and which of their rows this is: a rewritten file (new rows, another order)
        is other data, which a run must not resume on."""
        if self._content is None:
            content = []
            for path, stamp in zip(self.paths, self._stamps):
                with open(path, "rb") as fh:
                    _unchanged(path, stamp, fh.fileno())
                    content.append(hashlib.file_digest(fh, "sha256").digest())
            self._content = content
        return digest_bytes(*self._content, self._file_ids.astype(np.int64).tobytes(),
                            self._rows.astype(np.int64).tobytes())

    def select(self, indices: Sequence[int]) -> ParquetSource:
        idx = np.asarray(indices, dtype=np.int64)
        out = ParquetSource(self.kind, self.paths, self._file_ids[idx], self._rows[idx], self.report, self.check,
                            self.fields, self._columns, self._group_starts, self.indexed)
        out._stamps, out._content = self._stamps, self._content
        return out


def _unchanged(path: str, stamp: tuple[int, int], fd: int | None = None) -> None:
    """A :class:`DataError` when ``path`` (or the open ``fd``) is no longer the file that was checked."""
    if file_stamp(path, fd) != stamp:
        raise DataError(path, "file changed after it was validated", "rebuild the data loader after editing data files")


def read_parquet(path: str | os.PathLike, kind: str, check: Callable[..., dict], *,
                 fields: Mapping[str, str] | None = None, optional: Sequence[str] = (), skip_bad_rows: bool = False,
                 syntax: Syntax = PYTHON, indexed: bool = False) -> ParquetSource:
    """Rows of a Parquet file or folder of shards as a ``kind`` source, each checked by ``check(row,
    **fields)`` (``fields``: the check's option -> column names, each column required; ``optional``:
    other columns it reads where a file has them; ``check`` picklable, e.g. a module function or a
    ``functools.partial`` of one). A bad row raises a :class:`DataError` naming ``path[row]`` (its
    fix spelled in ``syntax``), or with ``skip_bad_rows`` is counted in ``source.report.skipped``."""
    root, fields = os.fspath(path), dict(fields or {})
    report = SourceReport([root])
    file_ids, rows = [], []
    for where, file_id, row, obj in parquet_rows(root, fields, optional, syntax):
        try:
            check(obj, **fields)
        except RowError as err:
            reject_row(report, where, err, skip_bad_rows, syntax)
            continue
        file_ids.append(file_id), rows.append(row)
    finish_report(report, len(rows), "rows")
    return parquet_source(root, kind, check, file_ids, rows, report, fields=fields, optional=optional, syntax=syntax,
                          indexed=indexed)


def parquet_source(path: str | os.PathLike, kind: str, check: Callable[..., dict], file_ids: Sequence[int],
                   rows: Sequence[int], report: SourceReport, *, fields: Mapping[str, str] | None = None,
                   optional: Sequence[str] = (), syntax: Syntax = PYTHON, indexed: bool = False) -> ParquetSource:
    """The :class:`ParquetSource` of rows already checked: ``rows[i]`` of file ``file_ids[i]`` of
    ``path`` (as :func:`parquet_rows` numbers them), read with ``check`` and the columns
    :func:`row_columns` picks for ``fields`` and ``optional``."""
    root, fields = os.fspath(path), dict(fields or {})
    files = parquet_files(root)
    columns, starts, groups = [], [], []
    for name in files:
        pf = open_parquet(name)
        columns.append(row_columns(name, pf.schema_arrow.names, fields, optional, syntax))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64))
        groups += [(name, *_group_size(pf.metadata.row_group(g), columns[-1])) for g in range(pf.num_row_groups)]
    _warn_of_large_groups(root, groups)
    return ParquetSource(kind, files, np.asarray(file_ids, np.int32), np.asarray(rows, np.int64), report, check,
                         fields, columns, starts, indexed)


def _group_size(group: Any, columns: Sequence[str]) -> tuple[int, int]:
    """``(rows, bytes)`` of a row group's metadata: its rows and the uncompressed bytes of ``columns``."""
    chunks = (group.column(c) for c in range(group.num_columns))
    return group.num_rows, sum(c.total_uncompressed_size for c in chunks if c.path_in_schema.split(".")[0] in columns)


def _warn_of_large_groups(root: str, groups: Sequence[tuple[str, int, int]]) -> None:
    """Log a warning when ``groups`` (``(file, rows, bytes)``) are too large to read rows at random:
    more data than the cache holds, in groups so large that few fit in it, so that a shuffled
    read decodes a whole large group for most rows it reads (pandas writes up to a million rows
    a group)."""
    total = sum(size for *_, size in groups)
    name, rows, size = max(groups, key=lambda g: g[2], default=(root, 0, 0))
    if total > CACHE_BYTES and size > CACHE_BYTES // 8:
        log.warning("%s: row groups of up to %d rows (%.1f MiB decoded%s), %.1f MiB in all: more than the %.1f MiB "
                    "of them a process keeps, so a shuffled read decodes a whole group for most rows it reads, "
                    "slowly; write the file in smaller row groups (pyarrow.parquet.write_table(table, path, "
                    "row_group_size=1000))", root, rows, size / 2**20, "" if name == root else f", in {name}",
                    total / 2**20, CACHE_BYTES / 2**20)

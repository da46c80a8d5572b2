"""Labeled image sources, validated at the door (a bad file or row fails in one line naming it):

- an image folder: ``root/<class name>/*.png`` (classification; classes in sorted order);
- arrays: an ``.npz`` with ``images`` (uint8 ``(N, H, W)`` or ``(N, H, W, C)``) and ``labels``,
  or IDX files (MNIST's format, ``.gz`` or raw) with the labels file beside the images file;
- JSONL rows ``{"image": "path/rel/to/the/file.png", "label": "cat" | 3 | 2.5}``, or Parquet rows
  (a file or a folder of shards) with those columns, their ``image`` also ``datasets``' ``Image``
  feature: the image file itself held in the row (as the hub's image datasets store it; read by
  row group when a batch needs it), or the path of one.

An image file's header is checked when the source is read; the whole file is decoded
(:func:`~jaxtune.data.image_pixels.decode_image`) when a record is read, and by the loader's scan.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data.image_pixels import check_header, decode_image
from jaxtune.data.parquet import is_parquet, parquet_files, parquet_rows, parquet_source
from jaxtune.data.source_types import DataError, Source, SourceReport, digest_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_KINDS = ("classification", "regression")
_IMAGE_KEYS, _LABEL_KEYS = ("images", "x", "image", "X"), ("labels", "y", "label", "Y")
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # regression targets are stored as float32


class ImageSource(Source):
    """Labeled images: file paths or the encoded files in Parquet rows (a source of ``{"image":
    bytes}`` records, or of those and paths: :class:`HeldAndNamedImages`; all decoded when read) or
    uint8 arrays, with int32 class ids (``label_names`` their names) or float32 targets. ``where(i)``
    names the file (or Parquet or array row)."""

    def __init__(self, kind: str, items: np.ndarray | Sequence[str] | Source, labels: np.ndarray, report: SourceReport,
                 label_names: tuple | None = None, origin: str = ""):
        self.kind, self.items, self.labels, self.report = kind, items, labels, report
        self.label_names, self.origin = label_names, origin

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def decodes(self) -> bool:
        """Whether the images are encoded files (decoded when read, so the loader's scan checks them)."""
        return not isinstance(self.items, np.ndarray)

    def where(self, index: int) -> str:
        if isinstance(self.items, np.ndarray):
            return f"{self.origin}[{index}]"
        return self.items.where(index) if isinstance(self.items, Source) else str(self.items[index])

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``(H, W, C)``, decoded where it is a file; an unreadable one is a
        :class:`DataError` naming it."""
        item = self.items[index]
        if isinstance(item, dict):  # a Parquet row's encoded file, read by row group
            return decode_image(item["image"], item["where"])
        return decode_image(item) if isinstance(item, str) else (item[..., None] if item.ndim == 2 else item)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"image": self.image(index), "label": self.labels[index], "where": self.where(index)}

    def digest(self) -> str:
        """The images (array bytes, the Parquet files' bytes, or file paths: decoding every file is the
        loader's scan) and labels."""
        if isinstance(self.items, Source):
            items = self.items.digest().encode()
        elif isinstance(self.items, np.ndarray):
            items = self.items.tobytes()
        else:
            items = json.dumps(list(self.items)).encode()
        return digest_bytes(items, np.asarray(self.labels).tobytes())

    def select(self, indices: Sequence[int]) -> ImageSource:
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.items, np.ndarray | Source):
            items = self.items[idx] if isinstance(self.items, np.ndarray) else self.items.select(idx)
        else:
            items = [self.items[i] for i in idx]
        return ImageSource(self.kind, items, self.labels[idx], self.report, self.label_names, self.origin)


def _labels(values: Sequence[Any], kind: str, where: Sequence[str], vocabulary: Sequence | None) -> tuple:
    """int32 class ids and names (classification) or float32 targets (regression)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"data.kind: images are {' or '.join(IMAGE_KINDS)}, got {kind!r}")
    if kind == "regression":
        out = np.empty(len(values), np.float32)
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                    or not (-_FLOAT32_MAX <= value <= _FLOAT32_MAX):  # NaN and inf fail too
                raise DataError(where[i], f"label {value!r} is not a finite number", "regression labels are numbers")
            out[i] = value
        return out, None
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, str | int | np.integer):
            raise DataError(where[i], f"label {value!r} is a {type(value).__name__}", "use a string or integer label")
        if isinstance(value, str) and not value.strip():
            raise DataError(where[i], "the label is empty", "give every image a label")
    keys = [str(v).strip() for v in values]
    if vocabulary is not None:
        names = tuple(str(v) for v in vocabulary)
    elif all(isinstance(v, int | np.integer) for v in values):
        names = tuple(str(v) for v in sorted(set(int(v) for v in values)))  # class ids keep their order
    else:
        names = tuple(sorted(set(keys)))
    index = {name: i for i, name in enumerate(names)}
    for i, key in enumerate(keys):
        if key not in index:
            raise DataError(where[i], f"label {key!r} is not one of the training labels {list(names)[:10]}",
                            "fix the label or add examples of it to the training data")
    return np.asarray([index[k] for k in keys], np.int32), names


def read_image_folder(root: str | os.PathLike, kind: str = "classification", *,
                      labels: Sequence | None = None) -> ImageSource:
    """``root/<class>/<image>``: one class per sub-folder (sorted), every image file in it."""
    root = Path(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(str(root), "no class folders", "put the images of each class in root/<class name>/")
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:  # an image beside the class folders has no class: training without it would drop it unseen
        raise DataError(str(loose[0]), f"an image outside the class folders ({len(loose)} in {root})",
                        "move each into its class's folder, or out of the tree")
    if kind != "classification":
        raise DataError(str(root), "an image folder gives class labels", "use data.kind classification, or JSONL "
                        "rows {\"image\": ..., \"label\": <number>} for regression")
    paths, names = [], []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(str(file), f"not an image file (suffix {file.suffix or 'none'!r})",
                                f"move it out of {root} or convert it to one of {', '.join(IMAGE_SUFFIXES)}")
            check_header(str(file))
            paths.append(str(file))
            names.append(folder.name)
        if not files:
            raise DataError(str(folder), "class folder without images", "add images or remove the folder")
    ids, label_names = _labels(names, kind, paths, labels if labels is not None else [c.name for c in classes])
    return ImageSource(kind, paths, ids, _report(root, len(paths)), label_names)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format; gzip or raw) as a numpy array; errors name the file."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(path, f"unreadable ({type(err).__name__}: {err})", "re-download the file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise DataError(path, "not an IDX file (bad magic number)", "give an MNIST-style IDX file or an .npz")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    need = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != need:
        raise DataError(path, f"IDX header says shape {shape} ({need} bytes) but the file has {len(data)} bytes",
                        "the file is truncated or corrupt: re-download it")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(where, f"images have dtype {images.dtype} and shape {images.shape}",
                        "store uint8 pixels 0..255 shaped (N, H, W) or (N, H, W, C) with C 1 or 3")
    return images


def read_image_arrays(path: str | os.PathLike, kind: str = "classification", *, labels_file: str | None = None,
                      labels: Sequence | None = None) -> ImageSource:
    """Images and labels from an ``.npz`` (keys ``images``/``labels``, or ``x``/``y``) or IDX
    files (``labels_file``, default: the images file's name with ``images`` -> ``labels`` and
    ``idx3`` -> ``idx1``, as MNIST and Fashion-MNIST name them)."""
    path = str(path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.keys()}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(path, f"not a readable .npz ({type(err).__name__}: {err})", "re-save it with np.savez") \
                from None
        image_key = next((k for k in _IMAGE_KEYS if k in arrays), None)
        label_key = next((k for k in _LABEL_KEYS if k in arrays), None)
        if image_key is None or label_key is None:
            raise DataError(path, f"arrays {list(arrays)}, but images and labels need the keys images/labels (or x/y)",
                            "save with np.savez(path, images=..., labels=...)")
        images, values = arrays[image_key], arrays[label_key]
        if "label_names" in arrays and kind == "classification":  # integer labels with class names beside them
            named = [str(n) for n in arrays["label_names"]]
            bad = np.flatnonzero((values < 0) | (values >= len(named)))
            if len(bad):
                raise DataError(f"{path}[{bad[0]}]", f"label {values[bad[0]]} is not an index into label_names "
                                f"({len(named)} names)", "store labels 0..len(label_names)-1")
            labels = named if labels is None else labels
            values = np.asarray(named, dtype=object)[values]
        labels_where = path
    else:
        images = read_idx(path)
        labels_where = labels_file or _idx_labels_name(path)
        values = read_idx(labels_where)
    _check_images(images, path)
    if values.ndim != 1 or len(values) != len(images):
        raise DataError(labels_where, f"{values.shape} labels for {len(images)} images in {path}",
                        "give one label per image")
    values = values.tolist()
    where = [f"{labels_where}[{i}]" for i in range(len(values))]
    ids, names = _labels(values, kind, where, labels)
    return ImageSource(kind, images, ids, _report(Path(path), len(images)), names, origin=path)


def _idx_labels_name(images_path: str) -> str:
    name = os.path.basename(images_path)
    guess = name.replace("images", "labels").replace("idx3", "idx1")
    if guess == name:
        raise DataError(images_path, "no labels file given and none can be guessed from the name",
                        "pass the labels IDX file (labels_file=)")
    return os.path.join(os.path.dirname(images_path), guess)


def read_image_jsonl(path: str | os.PathLike, kind: str = "classification", *,
                     labels: Sequence | None = None, label_field: str = "label") -> ImageSource:
    """JSONL rows ``{"image": <path, relative to the JSONL file's folder>, "label": ...}`` (the label
    under ``label_field``)."""
    path = Path(path)
    paths, values, where = [], [], []
    try:  # a BOM is no row; rows end at "\n" alone (JSON strings may hold U+2028, which splitlines splits at)
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise DataError(str(path), f"not UTF-8 ({err})", "save the file as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        here = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(here, f"not valid JSON ({err.msg})", "one JSON object per line") from None
        paths.append(_image_row(row, here, path.parent, label_field))
        values.append(row[label_field])
        where.append(here)
    if not paths:
        raise DataError(str(path), "no rows", "add one JSON object per image")
    ids, names = _labels(values, kind, where, labels)
    return ImageSource(kind, paths, ids, _report(path, len(paths)), names)


def _image_row(row: Any, here: str, folder: Path, label_field: str) -> str:
    """The checked image path of a row ``{"image": path, label_field: label}`` at ``here`` (a relative
    path is relative to ``folder``, the rows file's)."""
    if not isinstance(row, dict) or not isinstance(row.get("image"), str) or label_field not in row:
        raise DataError(here, f"a row needs \"image\" (a file path) and {label_field!r}",
                        f'write {{"image": "cats/1.png", "{label_field}": "cat"}}'
                        + ("" if label_field != "label" or not isinstance(row, dict) else
                           ", or name the label's key with label_field"))
    image = row["image"] if os.path.isabs(row["image"]) else str(folder / row["image"])
    if not os.path.isfile(image):
        raise DataError(here, f"image {image} not found", "fix the path (relative to the rows file's folder)")
    check_header(image, here)
    return image


def read_image_parquet(path: str | os.PathLike, kind: str = "classification", *,
                       labels: Sequence | None = None, label_field: str = "label") -> ImageSource:
    """Parquet rows (a file or a folder of shards) with an ``image`` column and a label column
    ``label_field``. The image is a path (relative to the Parquet file's folder:
    :func:`read_image_jsonl`'s rows) or datasets' ``Image`` feature, a ``{"bytes", "path"}`` struct:
    the encoded file itself in ``bytes`` (as the hub's image datasets store it; read by row group
    when a batch needs it, not held decoded), or, with ``bytes`` null, the path of a file. A source's
    rows may hold some files and name others, as ``datasets``' ``to_parquet`` writes a column of
    images some of which were in memory and some files (it does not embed the files)."""
    folders = [Path(f).parent for f in parquet_files(path)]
    # paths: each row's checked image path, None where the row holds the file; rows: (file, row) of those
    paths, values, where, rows = [], [], [], []
    for here, file_id, row_index, row in parquet_rows(path, {"label_field": label_field}, optional=["image"]):
        image = row.get("image")
        held = isinstance(image, dict) and "bytes" in image  # datasets' Image feature with the file in the row
        if held:
            if not isinstance(image["bytes"], bytes):
                raise DataError(here, f"the image's bytes are a {type(image['bytes']).__name__}",
                                "store the encoded file (PNG/JPEG bytes), as datasets' Image feature does")
            if label_field not in row:
                raise DataError(here, f"the row's {label_field!r} is null", "give every image a label")
            check_header(image["bytes"], here)
            rows.append((file_id, row_index))
            paths.append(None)
        else:
            if isinstance(image, dict):  # datasets' Image feature of a file: {"path"}, its bytes null
                row = {**row, "image": image.get("path")}
            paths.append(_image_row(row, here, folders[file_id], label_field))
        values.append(row[label_field])
        where.append(here)
    if not where:
        raise DataError(str(path), "no rows", "add one row per image")
    ids, names = _labels(values, kind, where, labels)
    report = _report(Path(path), len(where))
    if not rows:
        return ImageSource(kind, paths, ids, report, names)
    file_ids, row_ids = zip(*rows)
    items = parquet_source(path, "image", _embedded_image, file_ids, row_ids, report, optional=["image"])
    if len(rows) < len(paths):
        items = HeldAndNamedImages(items, paths, report)
    return ImageSource(kind, items, ids, report, names)


class HeldAndNamedImages(Source):
    """The images of Parquet rows of which some hold their file and some name one: ``held``, the
    :class:`~jaxtune.data.parquet.ParquetSource` of the rows that hold theirs (in row order), and
    ``paths``, each row's checked file path or None where the row holds its file. ``source[i]`` is
    row ``i``'s ``{"image": bytes, "where"}`` record or its path, as :class:`ImageSource` reads
    either."""

    kind = "image"

    def __init__(self, held: Source, paths: Sequence[str | None], report: SourceReport):
        self.held, self.paths, self.report = held, list(paths), report
        self._held_at = np.cumsum([p is None for p in self.paths]) - 1  # row i's index in held, where it holds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | str:
        index = int(index)
        path = self.paths[index]
        return self.held[int(self._held_at[index])] if path is None else path

    def where(self, index: int) -> str:
        path = self.paths[int(index)]
        return self.held.where(int(self._held_at[int(index)])) if path is None else path

    def digest(self) -> str:
        """The held rows' (their files' bytes) and the paths, None where a row holds its file."""
        return digest_bytes(self.held.digest().encode(), json.dumps(self.paths).encode())

    def select(self, indices: Sequence[int]) -> HeldAndNamedImages:
        idx = [int(i) for i in indices]
        held = self.held.select([int(self._held_at[i]) for i in idx if self.paths[i] is None])
        return HeldAndNamedImages(held, [self.paths[i] for i in idx], self.report)


def _embedded_image(row: dict) -> dict:
    """A Parquet row's record ``{"image": bytes}``: the encoded file datasets' ``Image`` feature holds
    (checked when the source was read)."""
    return {"image": row["image"]["bytes"]}


def read_images(path: str | os.PathLike, kind: str = "classification", *, labels: Sequence | None = None,
                labels_file: str | None = None, label_field: str | None = None) -> ImageSource:
    """Any image source by its layout: a folder, an ``.npz``, IDX files, or JSONL or Parquet rows (whose
    label is under ``label_field``, default ``label``)."""
    p = Path(path)
    if is_parquet(p):  # a file, a folder of shards or a pattern of them
        return read_image_parquet(p, kind, labels=labels, label_field=label_field or "label")
    if not p.exists():
        raise DataError(str(p), "no such file or folder", "give an image folder, .npz, IDX, JSONL or Parquet file")
    if p.suffix.lower() == ".jsonl":
        return read_image_jsonl(p, kind, labels=labels, label_field=label_field or "label")
    if label_field is not None:
        raise DataError(str(p), f"label_field {label_field!r} names a JSONL key or Parquet column, and this is "
                        f"{'a class-folder tree' if p.is_dir() else 'an array file'}", "remove label_field")
    if p.is_dir():
        return read_image_folder(p, kind, labels=labels)
    return read_image_arrays(p, kind, labels_file=labels_file, labels=labels)


def _report(path: Path, count: int) -> SourceReport:
    return SourceReport(paths=[str(path)], rows=count)

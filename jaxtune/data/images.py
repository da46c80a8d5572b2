"""Images on grain: labeled image sources, decoding, resizing, normalising and augmenting, batches.

Sources (all validated at the door; a bad file or row fails in one line naming it):

- an image folder: ``root/<class name>/*.png`` (classification; classes in sorted order);
- arrays: an ``.npz`` with ``images`` (uint8 ``(N, H, W)`` or ``(N, H, W, C)``) and ``labels``,
  or IDX files (MNIST's format, ``.gz`` or raw) with the labels file beside the images file;
- JSONL rows ``{"image": "path/rel/to/the/file.png", "label": "cat" | 3 | 2.5}``, or Parquet rows
  (a file or a folder of shards) with those columns, their ``image`` also ``datasets``' ``Image``
  feature: the image file itself held in the row (as the hub's image datasets store it; read by
  row group when a batch needs it), or the path of one.

A record is decoded (Pillow) where grain reads it, in its threads or worker processes, then made
the model's input by :class:`ToPixels`: resized to the model's square ``size``, scaled to [0, 1],
normalised with the model's mean/std, channels first: float32 ``(C, H, W)``. Training may add
``augment``: ``flip`` (horizontal, p=0.5) and ``crop`` (a random box of 70-100% of each side, the
image's own aspect, resized back as evaluation resizes the whole image). Batches are
``{"pixel_values": (B, C, H, W) f32, "labels": (B,) int32 | f32, "example_weights": (B,) f32}``
(weight 0 on the rows that fill a last partial evaluation batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import io
import json
import logging
import os
import struct
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxtune.data.parquet import is_parquet, parquet_files, parquet_rows, parquet_source
from jaxtune.data.pipeline import Loader, LoaderConfig, _shard, in_workers, reading_config
from jaxtune.data.sources import DataError, Source, SourceReport, digest_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUGMENTATIONS = ("flip", "crop")
IMAGE_KINDS = ("classification", "regression")
_IMAGE_KEYS, _LABEL_KEYS = ("images", "x", "image", "X"), ("labels", "y", "label", "Y")
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # regression targets are stored as float32
_FIX_IMAGE = "replace the file with a readable PNG/JPEG or remove it"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the model takes: square ``size``, ``channels`` (1 or 3), per-channel ``mean``/``std``
    applied to pixels scaled by ``rescale`` (1/255: to [0, 1]), resized with PIL's ``resample``
    filter (2: bilinear; transformers' processors name theirs by the same numbers)."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = 2
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"image channels: expected 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"image mean/std: need {self.channels} values each, got {self.mean} / {self.std}")

    @classmethod
    def for_model(cls, model_config: Any, model_dir: str | os.PathLike | None) -> ImageSpec:
        """The spec of an image model: its config's ``image_size`` and ``num_channels``, and the
        mean/std of its directory's image processor (see :meth:`from_model_dir`)."""
        size, channels = getattr(model_config, "image_size", None), getattr(model_config, "num_channels", 3)
        if size is None:
            raise ValueError(f"the data are images but the model ({type(model_config).__name__}) takes no images; "
                             "load an image model (ViT, EfficientNet-Lite)")
        return cls.from_model_dir(size, channels, model_dir)

    @classmethod
    def from_model_dir(cls, size: int, channels: int, model_dir: str | os.PathLike | None) -> ImageSpec:
        """The spec of a model of square ``size`` and ``channels``, with the mean/std, resampling filter
        and rescale of its ``preprocessor_config.json`` (transformers' image processor) when it has one
        (``do_normalize``/``do_rescale`` false: none), else mean and std 0.5, bilinear, 1/255."""
        mean, std, resample, rescale = (0.5,) * channels, (0.5,) * channels, 2, 1 / 255
        path = Path(model_dir) / "preprocessor_config.json" if model_dir else None
        if path is not None and path.is_file():
            try:
                processor = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(str(path), f"not valid JSON ({err})",
                                "restore the model's preprocessor_config.json") from None
            if processor.get("do_normalize", True):
                mean = tuple(float(v) for v in processor.get("image_mean", mean))
                std = tuple(float(v) for v in processor.get("image_std", std))
            else:
                mean, std = (0.0,) * channels, (1.0,) * channels
            resample = int(processor.get("resample", resample))
            rescale = float(processor.get("rescale_factor", rescale)) if processor.get("do_rescale", True) else 1.0
        return cls(size, channels, mean, std, resample, rescale)


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str | bytes, where: str | None = None) -> np.ndarray:
    """The image at ``path`` (or the encoded file ``path`` is, as bytes) as uint8 ``(H, W, C)`` (C = 1
    grey or 3 RGB; alpha and palettes converted), turned upright by its EXIF orientation as
    transformers' ``load_image`` turns it (a phone's portrait photo is stored sideways with an
    orientation tag). Raises :class:`DataError` naming ``where`` (default: the file) when it is
    missing or unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = where or str(path)
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            array = _deep_grey(image) if image.mode.startswith(("I", "F")) else \
                np.asarray(image.convert("L" if image.mode in ("1", "L") else "RGB"))
    except FileNotFoundError:
        raise DataError(where, "image file not found", "restore it or remove the row/file that names it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(where, f"not a readable image ({type(err).__name__}: {err})", _FIX_IMAGE) from None
    return array[..., None] if array.ndim == 2 else array


def _deep_grey(image: Any) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as uint8: PIL's ``convert("L")`` clips such values
    at 255 (a 16-bit scan came out nearly all white) where they need scaling: 16-bit (and 32-bit
    integers past 255) by their top 8 bits, floats in [0, 1] by 255."""
    values = np.asarray(image)
    if image.mode.startswith("F"):
        values = values.astype(np.float64) * (255.0 if values.size and values.max() <= 1.0 else 1.0)
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        values = values.astype(np.int64) >> 8
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _first_undecodable(source: ImageSource, index: int, count: int) -> int:
    """The first of the positions ``index::count`` of ``source`` whose image does not decode, or
    ``len(source)`` when all do. The images decode on threads; the rest are cancelled at the first
    failure; the pixels are dropped (a scan keeps no images in memory)."""
    positions = range(index, len(source), count)
    pool = concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))
    try:
        for position, decoded in zip(positions, pool.map(functools.partial(_decodes, source), positions)):
            if not decoded:
                return position
        return len(source)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decodes(source: ImageSource, index: int) -> bool:
    try:
        source.image(index)
    except DataError:
        return False
    return True


def _check_header(path: str | bytes, row: str | None = None) -> None:
    """Open the image's header only (cheap): a non-image or empty file (or bytes) fails at the door,
    its error naming ``row`` (``file:line`` of the row that names the image, ``file[row]`` of the
    Parquet row holding it) where there is one."""
    from PIL import Image, UnidentifiedImageError

    embedded = isinstance(path, bytes)
    where, image = (row, "" if embedded else f"image {path}: ") if row else (str(path), "")
    try:
        with Image.open(io.BytesIO(path) if embedded else path):
            pass
    except FileNotFoundError:
        raise DataError(where, f"{image}image file not found", "restore it or remove the row that names it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(where, f"{image}not a readable image ({type(err).__name__}: {err})", _FIX_IMAGE) from None


class ToPixels(grain.transforms.RandomMap):
    """A record ``{"image": uint8 (H, W, C), "label": ...}`` -> ``{"pixel_values": f32 (C, S, S),
    "labels", "example_weights"}``, with the ``augment`` steps drawn from grain's per-record rng."""

    def __init__(self, spec: ImageSpec, augment: Sequence[str] = ()):
        unknown = sorted(set(augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"data.augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        self.spec, self.augment = spec, tuple(augment)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return self.pixels(record, rng)

    def pixels(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        from PIL import Image

        spec, image = self.spec, record["image"]
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        picture = picture.convert("L" if spec.channels == 1 else "RGB")
        box = None
        if rng is not None and "crop" in self.augment:
            # 70-100% of each side: the box keeps the image's aspect, so the resize squashes a crop as
            # evaluation squashes the whole image (a square box would train on unsquashed shapes).
            w, h = picture.size
            fraction = rng.uniform(0.7, 1.0)
            width, height = max(1, int(round(w * fraction))), max(1, int(round(h * fraction)))
            left, top = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
            box = (left, top, left + width, top + height)
        picture = picture.resize((spec.size, spec.size), Image.Resampling(spec.resample), box=box)
        x = np.asarray(picture, np.float32).reshape(spec.size, spec.size, spec.channels)
        x = x / np.float32(255.0) if spec.rescale == 1 / 255 else x * np.float32(spec.rescale)
        if rng is not None and "flip" in self.augment and rng.random() < 0.5:
            x = x[:, ::-1]
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return {"pixel_values": np.ascontiguousarray(x.transpose(2, 0, 1)), "labels": record["label"],
                "example_weights": np.float32(1.0)}


# ----------------------------------------------------------------------------- sources


class ImageSource(Source):
    """Labeled images: file paths or the encoded files in Parquet rows (a source of ``{"image":
    bytes}`` records; both decoded when read) or uint8 arrays, with int32 class ids
    (``label_names`` their names) or float32 targets. ``where(i)`` names the file (or Parquet or
    array row)."""

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
            _check_header(str(file))
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
    _check_header(image, here)
    return image


def read_image_parquet(path: str | os.PathLike, kind: str = "classification", *,
                       labels: Sequence | None = None, label_field: str = "label") -> ImageSource:
    """Parquet rows (a file or a folder of shards) with an ``image`` column and a label column
    ``label_field``. The image is a path (relative to the Parquet file's folder:
    :func:`read_image_jsonl`'s rows) or datasets' ``Image`` feature, a ``{"bytes", "path"}`` struct:
    the encoded file itself in ``bytes`` (as the hub's image datasets store it; read by row group
    when a batch needs it, not held decoded), or, with ``bytes`` null, the path of a file. The rows
    of one source are all one or the other."""
    folders = [Path(f).parent for f in parquet_files(path)]
    paths, values, where, rows = [], [], [], []  # rows: (file, row) of each image file held in a row
    for here, file_id, row_index, row in parquet_rows(path, {"label_field": label_field}, optional=["image"]):
        image = row.get("image")
        held = isinstance(image, dict) and "bytes" in image  # datasets' Image feature with the file in the row
        if where and held != bool(rows):
            raise DataError(here, f"the image is {'held in the row' if held else 'a path'}, and in the rows before "
                            f"it {'a path' if held else 'held in the row'}",
                            "store every image the same way: all as files in the rows, or all as paths")
        if held:
            if not isinstance(image["bytes"], bytes):
                raise DataError(here, f"the image's bytes are a {type(image['bytes']).__name__}",
                                "store the encoded file (PNG/JPEG bytes), as datasets' Image feature does")
            if label_field not in row:
                raise DataError(here, f"the row's {label_field!r} is null", "give every image a label")
            _check_header(image["bytes"], here)
            rows.append((file_id, row_index))
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
    if rows:
        file_ids, row_ids = zip(*rows)
        items = parquet_source(path, "image", _embedded_image, file_ids, row_ids, report, optional=["image"])
        return ImageSource(kind, items, ids, report, names)
    return ImageSource(kind, paths, ids, report, names)


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


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """What one look at an image source found (the image twin of ``TokenStats``)."""

    records: int
    examples: int

    def summary(self) -> str:
        return f"{self.records} images"


class ImageLoader(Loader):
    """Batches of images (see the module docstring) with the batching fields of ``config``
    (``batch_size``, ``seed``, ``worker_count`` (training only), ``read_threads``...; token fields are unused),
    resumable like every grain iterator. A :class:`~jaxtune.data.Loader`, so the Trainer
    counts epochs, checks shapes and checkpoints its state the same way."""

    def __init__(self, source: ImageSource, spec: ImageSpec, config: LoaderConfig, augment: Sequence[str] = ()):
        self.source, self.config, self.spec, self.tokenizer = source, config, spec, None
        self.shard_index, self.shard_count = _shard(config)
        self.batch_size = config.batch_size // self.shard_count
        self.lm = self.pairs = self.packs = False  # one image per row
        self.to_pixels = ToPixels(spec, augment if config.shuffle else ())
        self.dataset = self._build()
        self._stats: ImageStats | None = None

    def _build(self) -> grain.IterDataset:
        cfg = self.config
        ds = grain.MapDataset.source(self.source).seed(cfg.seed)
        if cfg.shuffle:
            ds = ds.shuffle()
        ds = ds.repeat(cfg.num_epochs)[self.shard_index::self.shard_count]
        ds = ds.random_map(self.to_pixels) if self.to_pixels.augment else ds.map(self.to_pixels.pixels)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        it = in_workers(it, cfg)
        it = it.batch(self.batch_size, drop_remainder=cfg.drop_remainder)
        if not cfg.drop_remainder:
            it = it.map(_FillImages(self.batch_size))
        return it

    def scan(self) -> ImageStats:
        """Decode every image file of the source once (cached): raises the first :class:`DataError`
        a record would raise during training, so a truncated or corrupt file fails before the first
        step rather than when its batch comes up (reading checked headers only). Array sources are
        checked whole when read. Decoding runs on threads (Pillow releases the GIL).

        Where JAX processes share the data (each reads its shard), each decodes only every
        ``shard_count``-th file and the processes agree on the first bad one, so that every process
        raises the same error (one that went on alone would wait at the first step's collective)."""
        if self._stats is None:
            source = self.source
            if source.decodes and len(source):
                start = time.perf_counter()
                split = self.config.shard_index is None and self.shard_count > 1  # the processes', not a caller's
                index, count = (self.shard_index, self.shard_count) if split else (0, 1)
                bad = _first_undecodable(source, index, count)
                if split:
                    from jax.experimental import multihost_utils

                    bad = int(np.min(multihost_utils.process_allgather(np.int32(bad))))
                if bad < len(source):
                    source.image(bad)  # raises, naming the file or row, on every process
                log.info("data: %d image files decode (%s checked in %.1f s)", len(source),
                         f"{len(range(index, len(source), count))} by this process," if split else "all",
                         time.perf_counter() - start)
            self._stats = ImageStats(len(self.source), len(self.source))
        return self._stats

    def rows_per_epoch(self) -> tuple[int, str]:
        return len(self.source), f"{len(self.source)} images"

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        s, b = self.spec, self.batch_size
        return {"pixel_values": ((b, s.channels, s.size, s.size), np.dtype(np.float32)),
                "labels": ((b,), np.dtype(np.int32 if self.source.kind == "classification" else np.float32)),
                "example_weights": ((b,), np.dtype(np.float32))}


class _FillImages:
    """Pads a partial last batch with zero images of weight 0, so every batch has one shape."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.size - len(batch["labels"])
        if missing <= 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def image_loader(source: ImageSource, spec: ImageSpec, config: LoaderConfig, *, train: bool,
                 augment: Sequence[str] | None = None, batch_size: int | None = None) -> ImageLoader:
    """The loader a run reads, in the role of :func:`~jaxtune.data.pipeline.reading_config`
    (training also augments; evaluation reads once in order on threads and fills the last batch).
    ``augment`` and ``batch_size`` (evaluation) default to a ``DataConfig``'s ``augment`` and
    ``eval_batch_size``."""
    augment = getattr(config, "augment", ()) if augment is None else augment
    batch_size = batch_size or getattr(config, "eval_batch_size", None)
    return ImageLoader(source, spec, reading_config(config, train=train, batch_size=batch_size), augment)

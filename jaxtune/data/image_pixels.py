"""An image file to the model's input: decoding (Pillow) and :class:`ToPixels`, what the model takes
(:class:`ImageSpec`), resizing, normalising and augmenting.

A record is decoded where grain reads it, in its threads or worker processes, then made the model's
input by :class:`ToPixels`: resized and centre-cropped as the model's image processor
(``preprocessor_config.json``, read by :mod:`jaxtune.data.image_processor`) does it with transformers'
PIL backend (without one, squashed to the model's square ``image_size``), scaled to [0, 1], normalised
with the model's mean/std, channels first: float32 ``(C, H, W)``. Training may add ``augment``: ``flip``
(horizontal, p=0.5) and ``crop`` (a random box of 70-100% of each side, the image's own aspect, cut
before the resize, then resized and cropped as evaluation does the whole image).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxtune.data.image_processor import read_processor
from jaxtune.data.source_types import DataError

AUGMENTATIONS = ("flip", "crop")
_FIX_IMAGE = "replace the file with a readable PNG/JPEG or remove it"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the model takes: ``size`` (a square's side, or ``(height, width)``), ``channels`` (1 or 3),
    per-channel ``mean``/``std`` applied to pixels scaled by ``rescale`` (1/255: to [0, 1]), resized
    with PIL's ``resample`` filter (2: bilinear; transformers' processors name theirs by the same numbers).

    How an image becomes ``size`` (transformers' PIL-backend steps): resized to ``resize`` ``(height,
    width)``; or, with ``shortest_edge``, keeping its aspect, its shortest edge to that (capped so its
    longest is at most ``longest_edge``); or, with neither, straight to ``size`` whatever its aspect;
    or, ``do_resize`` false, not at all. Then its centre ``size`` is cropped (zero-padded where the
    image is smaller), as transformers' ``center_crop``."""

    size: int | tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = 2
    rescale: float = 1 / 255
    resize: tuple[int, int] | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None
    do_resize: bool = True

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"image channels: expected 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"image mean/std: need {self.channels} values each, got {self.mean} / {self.std}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the model's input."""
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    @classmethod
    def for_model(cls, model_config: Any, model_dir: str | os.PathLike | None) -> ImageSpec:
        """The spec of an image model: its config's ``image_size`` and ``num_channels``, read with its
        directory's image processor (see :meth:`from_model_dir`). A size the model cannot take (its
        config's ``image_input_problem`` says why) is refused here, naming the processor file, before
        any image is read."""
        size, channels = getattr(model_config, "image_size", None), getattr(model_config, "num_channels", 3)
        if size is None:
            raise ValueError(f"the data are images but the model ({type(model_config).__name__}) takes no images; "
                             "load an image model (ViT, DINOv2, EfficientNet-Lite)")
        spec = cls.from_model_dir(size, channels, model_dir)
        check = getattr(model_config, "image_input_problem", None)
        problem = check(*spec.shape) if check is not None else None
        if problem:
            path = Path(model_dir) / "preprocessor_config.json" if model_dir else None
            where = str(path) if path is not None and path.is_file() else "the model's image_size"
            height, width = spec.shape
            raise DataError(where, f"the images come out {height} x {width}, but {problem}",
                            "give the processor a size/crop_size the model takes, or load a model made for that size")
        return spec

    @classmethod
    def from_model_dir(cls, size: int, channels: int, model_dir: str | os.PathLike | None) -> ImageSpec:
        """The spec of a model of square ``size`` and ``channels`` as its directory's
        ``preprocessor_config.json`` (transformers' image processor) says
        (:func:`jaxtune.data.image_processor.read_processor`; a key jaxtune cannot honour is refused,
        naming the file), else squashed to ``size``, mean and std 0.5, bilinear, 1/255. The processor's
        size wins over ``size`` (DINOv2's config says 518, the size its positions were learned at; its
        processor gives 224)."""
        path = Path(model_dir) / "preprocessor_config.json" if model_dir else None
        if path is None or not path.is_file():
            return cls(size, channels, (0.5,) * channels, (0.5,) * channels)
        return cls(channels=channels, **read_processor(path, size, channels))


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


def check_header(path: str | bytes, row: str | None = None) -> None:
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
    """A record ``{"image": uint8 (H, W, C), "label": ...}`` -> ``{"pixel_values": f32 (C, *spec.shape),
    "labels", "example_weights"}``, with the ``augment`` steps drawn from grain's per-record rng."""

    def __init__(self, spec: ImageSpec, augment: Sequence[str] = ()):
        unknown = sorted(set(augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"data.augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        self.spec, self.augment = spec, tuple(augment)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        return self.pixels(record, rng)

    def pixels(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        """``record``'s image as the model's input, float32 ``(C, H, W)`` (``spec.shape``), with the
        augmentations drawn from ``rng`` (none without one)."""
        from PIL import Image

        spec, image = self.spec, record["image"]
        picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        picture = picture.convert("L" if spec.channels == 1 else "RGB")
        box = None
        if rng is not None and "crop" in self.augment:
            # 70-100% of each side: the box keeps the image's aspect, so the crop is resized as evaluation
            # resizes the whole image, squashed where it squashes (a square box would train on unsquashed shapes).
            w, h = picture.size
            fraction = rng.uniform(0.7, 1.0)
            width, height = max(1, int(round(w * fraction))), max(1, int(round(h * fraction)))
            left, top = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
            box = (left, top, left + width, top + height)
        resized = np.asarray(_resize(picture, spec, box))
        x = _center_crop(resized.reshape(*resized.shape[:2], spec.channels), *spec.shape).astype(np.float32)
        x = x / np.float32(255.0) if spec.rescale == 1 / 255 else x * np.float32(spec.rescale)
        if rng is not None and "flip" in self.augment and rng.random() < 0.5:
            x = x[:, ::-1]
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return {"pixel_values": np.ascontiguousarray(x.transpose(2, 0, 1)), "labels": record["label"],
                "example_weights": np.float32(1.0)}


def _resize(picture: Any, spec: ImageSpec, box: tuple[int, int, int, int] | None = None) -> Any:
    """``picture`` (PIL), or its ``box`` (left, top, right, bottom), resized as ``spec`` says: to
    ``spec.resize`` or ``spec.size``, or keeping its aspect to ``spec.shortest_edge`` (the other side in
    proportion, rounded down: transformers' ``get_resize_output_image_size``; with ``longest_edge``, its
    ``get_size_with_aspect_ratio``); not at all when ``spec.do_resize`` is false (the box cut out)."""
    from PIL import Image

    if not spec.do_resize:
        return picture.crop(box) if box else picture
    # PIL resamples the box straight from the whole picture: its filter reads past the box's edges
    # as it would read past a crop's, where cutting the crop out first would clamp them.
    w, h = (box[2] - box[0], box[3] - box[1]) if box else picture.size
    if spec.shortest_edge is None:
        height, width = spec.resize or spec.shape
    elif spec.longest_edge is None:
        edge = spec.shortest_edge
        height, width = (int(edge * h / w), edge) if w <= h else (edge, int(edge * w / h))
    else:
        height, width = _capped_size(h, w, spec.shortest_edge, spec.longest_edge)
    return picture.resize((width, height), Image.Resampling(spec.resample), box=box)


def _capped_size(h: int, w: int, edge: int, longest: int) -> tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio``: ``(height, width)`` with the shortest side ``edge``,
    unless the longest would pass ``longest``: then the longest is ``longest`` (the float size kept for
    the long side's rounding, as there)."""
    raw = None
    if max(h, w) / min(h, w) * edge > longest:
        raw = longest * min(h, w) / max(h, w)
        edge = int(round(raw))
    if (h <= w and h == edge) or (w <= h and w == edge):
        return h, w
    scale = raw if raw is not None else edge
    return (int(scale * h / w), edge) if w < h else (edge, int(scale * w / h))


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre ``height x width`` of ``x`` ``(H, W, C)``, from ``(side - crop) // 2``; a side
    shorter than the crop padded with zeros first, the odd one on top/left (transformers' ``center_crop``)."""
    h, w = x.shape[:2]
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if pad_h or pad_w:
        x = np.pad(x, (((pad_h + 1) // 2, pad_h // 2), ((pad_w + 1) // 2, pad_w // 2), (0, 0)))
        h, w = x.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]

"""An image file to the model's input: decoding (Pillow) and :class:`ToPixels`, what the model takes
(:class:`ImageSpec`), resizing, normalising and augmenting.

A record is decoded where grain reads it, in its threads or worker processes, then made the model's
input by :class:`ToPixels`: resized to the model's square ``size`` (or, where the model's image processor
says so, as DINOv2's does, its shortest edge resized and the centre cropped), scaled to [0, 1], normalised
with the model's mean/std, channels first: float32 ``(C, H, W)``. Training may add ``augment``: ``flip``
(horizontal, p=0.5) and ``crop`` (a random box of 70-100% of each side, the image's own aspect,
resized back as evaluation resizes the whole image).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxtune.data.source_types import DataError

AUGMENTATIONS = ("flip", "crop")
_FIX_IMAGE = "replace the file with a readable PNG/JPEG or remove it"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the model takes: square ``size``, ``channels`` (1 or 3), per-channel ``mean``/``std``
    applied to pixels scaled by ``rescale`` (1/255: to [0, 1]), resized with PIL's ``resample``
    filter (2: bilinear; transformers' processors name theirs by the same numbers). With
    ``shortest_edge``, an image is resized keeping its aspect to that shortest edge, then its centre
    ``size`` square cropped (transformers' ``size: {shortest_edge}`` with ``do_center_crop``); without,
    it is resized to the square whatever its aspect."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = 2
    rescale: float = 1 / 255
    shortest_edge: int | None = None

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
                             "load an image model (ViT, DINOv2, EfficientNet-Lite)")
        return cls.from_model_dir(size, channels, model_dir)

    @classmethod
    def from_model_dir(cls, size: int, channels: int, model_dir: str | os.PathLike | None) -> ImageSpec:
        """The spec of a model of square ``size`` and ``channels``, with the mean/std, resampling filter
        and rescale of its ``preprocessor_config.json`` (transformers' image processor) when it has one
        (``do_normalize``/``do_rescale`` false: none), else mean and std 0.5, bilinear, 1/255. A processor
        that resizes the shortest edge and crops the centre (DINOv2's) gives its ``crop_size`` as the
        size, in place of ``size`` (DINOv2's config says 518, the size its positions were learned at;
        its processor gives 224)."""
        mean, std, resample, rescale, shortest = (0.5,) * channels, (0.5,) * channels, 2, 1 / 255, None
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
            size, shortest = _crop_size(processor, size, str(path))
        return cls(size, channels, mean, std, resample, rescale, shortest)


def _crop_size(processor: dict[str, Any], size: int, where: str) -> tuple[int, int | None]:
    """The square a processor that resizes the shortest edge and crops the centre ends in, and that edge;
    ``(size, None)`` for any other processor."""
    resize = processor.get("size") if processor.get("do_resize", True) else None
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if not isinstance(resize, dict) or "shortest_edge" not in resize or not isinstance(crop, dict):
        return size, None
    if crop.get("height") != crop.get("width") or not isinstance(crop.get("height"), int):
        raise DataError(where, f"crop_size {crop} is not a square", "give crop_size equal height and width")
    return crop["height"], int(resize["shortest_edge"])



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
        if spec.shortest_edge is None:
            picture = picture.resize((spec.size, spec.size), Image.Resampling(spec.resample), box=box)
        else:
            picture = _resize_and_crop(picture.crop(box) if box else picture, spec)
        x = np.asarray(picture, np.float32).reshape(spec.size, spec.size, spec.channels)
        x = x / np.float32(255.0) if spec.rescale == 1 / 255 else x * np.float32(spec.rescale)
        if rng is not None and "flip" in self.augment and rng.random() < 0.5:
            x = x[:, ::-1]
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return {"pixel_values": np.ascontiguousarray(x.transpose(2, 0, 1)), "labels": record["label"],
                "example_weights": np.float32(1.0)}


def _resize_and_crop(picture: Any, spec: ImageSpec) -> Any:
    """``picture`` (PIL) with its shortest edge resized to ``spec.shortest_edge`` (the other side in
    proportion, rounded down, as transformers' ``get_resize_output_image_size``), then its centre
    ``spec.size`` square (``(side - size) // 2`` from the top-left, as transformers' ``center_crop``)."""
    from PIL import Image

    w, h = picture.size
    edge = spec.shortest_edge
    new = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    picture = picture.resize(new, Image.Resampling(spec.resample))
    left, top = (new[0] - spec.size) // 2, (new[1] - spec.size) // 2
    return picture.crop((left, top, left + spec.size, top + spec.size))

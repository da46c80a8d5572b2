"""A model directory's ``preprocessor_config.json`` read as transformers' PIL-backend image processors
read it: the fields of :class:`~jaxtune.data.image_pixels.ImageSpec` it gives, and a one-line refusal
(naming the file and the key) of anything in it that jaxtune cannot reproduce.

Honoured: ``ViTImageProcessor``, ``DeiTImageProcessor``, ``BitImageProcessor`` (DINOv2's),
``CLIPImageProcessor`` and ``ConvNextImageProcessor`` (its ``crop_pct``), and a file with no type
(jaxtune's EfficientNet-Lite writes one), read as ViT's with the model's ``image_size``. A key the file
leaves out takes its class's default, as transformers' ``from_pretrained`` does (DeiT's filter is
bicubic, ViT's bilinear; an int ``size`` is a square for ViT/DeiT, the shortest edge for BiT/CLIP/ConvNeXt).
The steps are transformers' PIL backend's: resize (to ``{height, width}``; or keeping the aspect, to a
``shortest_edge``, capped at ``longest_edge``), centre crop to ``crop_size`` (padding with zeros where
the image is smaller), rescale, normalise. The defaults are written here, not read from transformers'
classes, because those classes' names and modules changed within transformers 5 (the ``*Pil`` classes
are recent); the tests check this table against the installed transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxtune.data.source_types import DataError

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_SQUARE = {"height": 224, "width": 224}
# What every processor class starts from (transformers' BaseImageProcessor and PIL backend: a resample
# left unset is bilinear, mean/std IMAGENET_STANDARD 0.5, a scalar here so a grey model gets one value).
_BASE: dict[str, Any] = {"do_resize": True, "size": None, "default_to_square": True, "resample": 2,
                         "do_center_crop": False, "crop_size": None, "do_rescale": True, "rescale_factor": 1 / 255,
                         "do_normalize": True, "image_mean": 0.5, "image_std": 0.5, "do_pad": False,
                         "pad_size": None, "do_convert_rgb": None}
_TYPES: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {"size": _SQUARE},
    "DeiTImageProcessor": {"size": {"height": 256, "width": 256}, "crop_size": _SQUARE, "do_center_crop": True,
                           "resample": 3},
    "BitImageProcessor": {"size": {"shortest_edge": 224}, "default_to_square": False, "crop_size": _SQUARE,
                          "do_center_crop": True, "resample": 3, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
    "CLIPImageProcessor": {"size": {"shortest_edge": 224}, "default_to_square": False, "crop_size": _SQUARE,
                           "do_center_crop": True, "resample": 3, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD},
    "ConvNextImageProcessor": {"size": {"shortest_edge": 384}, "default_to_square": False, "resample": 3,
                               "crop_pct": 224 / 256},
}
# Keys that change no pixel: names and output options. do_convert_rgb: jaxtune gives a 3-channel model
# RGB whatever it says (grey replicated, as convert_to_rgb does; alpha is dropped when the file is
# decoded, as transformers' load_image drops it).
_INERT = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map", "model_input_names",
          "return_tensors", "data_format", "input_data_format", "device", "disable_grouping", "do_convert_rgb"}
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
_FILTERS = range(6)  # PIL's: nearest, lanczos, bilinear, bicubic, box, hamming


def read_processor(path: Path, model_size: int, channels: int) -> dict[str, Any]:
    """The :class:`ImageSpec` fields (all but ``channels``) of the processor file ``path`` for a model
    of square ``model_size`` (the size of a file with no type and no ``size``) taking ``channels``.
    Raises :class:`DataError` naming ``path`` and the key jaxtune cannot honour."""
    where = str(path)
    try:
        given = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(where, f"not valid JSON ({err})", "restore the model's preprocessor_config.json") from None
    if not isinstance(given, dict):
        raise DataError(where, "not a JSON object", "restore the model's preprocessor_config.json")
    kind = _processor_type(given, where)
    # A null stays null, as from_pretrained reads it, not the class's default (transformers then refuses
    # a null size, resample, crop_size or mean/std that a step needs; so does jaxtune).
    p = {**_BASE, **_TYPES.get(kind, {}), **given}
    for key in given:
        if not key.startswith("_") and key not in _INERT and key not in _BASE and key not in _TYPES.get(kind, {}):
            raise DataError(where, f"{key!r}: jaxtune does not know what this key does to a "
                                   f"{kind or 'processor'}'s pixels", "remove it if transformers ignores it, or "
                                   "preprocess the images yourself and give a processor without it")
    if p["do_pad"]:
        raise DataError(where, "do_pad: true: jaxtune does not pad images after normalising",
                        "set do_pad false (with do_center_crop, a smaller image is padded before it is normalised)")
    resample = p["resample"] if p["do_resize"] else 2  # unused without a resize
    if not isinstance(resample, int) or isinstance(resample, bool) or resample not in _FILTERS:
        raise DataError(where, f"resample {p['resample']!r} is not one of PIL's filters 0-5",
                        "give 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic), 4 (box) or 5 (hamming)")
    if p["do_rescale"] and not _is_number(p["rescale_factor"]):
        raise DataError(where, f"rescale_factor {p['rescale_factor']!r} is not a number", "give one, e.g. 1/255")
    return {"resample": resample, "rescale": float(p["rescale_factor"]) if p["do_rescale"] else 1.0,
            **_normalisation(p, channels, where), **_layout(p, kind, model_size, where)}


def _is_number(value: Any) -> bool:
    """Whether a JSON value is a number (JSON's true/false are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _processor_type(given: dict[str, Any], where: str) -> str | None:
    """The processor class the file names, without transformers' backend suffixes (``Fast``, ``Pil``);
    an old ``feature_extractor_type`` read as its image processor, as ``AutoImageProcessor`` reads it."""
    kind = given.get("image_processor_type")
    if kind is None and given.get("feature_extractor_type"):
        kind = str(given["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    if kind is None:
        return None
    kind = str(kind).removesuffix("Fast").removesuffix("Pil")
    if kind not in _TYPES:
        raise DataError(where, f"image_processor_type {kind!r}: jaxtune reproduces only {', '.join(_TYPES)}",
                        "preprocess the images yourself, or give one of those types with the same settings")
    return kind


def _normalisation(p: dict[str, Any], channels: int, where: str) -> dict[str, tuple[float, ...]]:
    """``mean``/``std`` per channel: the file's, or none (0 and 1) when ``do_normalize`` is false."""
    if not p["do_normalize"]:
        return {"mean": (0.0,) * channels, "std": (1.0,) * channels}
    out = {}
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        value = p[key]
        values = [value] * channels if _is_number(value) else value
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise DataError(where, f"{key} {value!r} is not a number or a list of numbers", f"give {key} per channel")
        if len(values) != channels:
            raise DataError(where, f"{key} has {len(values)} values, but the model takes {channels} channels",
                            f"give {channels} values")
        out[field] = tuple(float(v) for v in values)
    return out


def _size_dict(value: Any, key: str, square: bool, where: str) -> dict[str, int]:
    """``value`` as transformers' ``get_size_dict`` reads it: an int is a square (``square``) or the
    shortest edge, a pair is ``(height, width)``; a dict must be a layout jaxtune reproduces."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square else {"shortest_edge": value}
    elif isinstance(value, list | tuple) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict) or set(value) not in _SIZE_KEYS:
        raise DataError(where, f"{key} {value!r}: jaxtune resizes to {{height, width}} or to "
                               "{shortest_edge} (with an optional longest_edge)", f"give {key} one of those")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise DataError(where, f"{key} {value!r}: sides must be positive integers", f"fix {key}")
    return value


def _layout(p: dict[str, Any], kind: str | None, model_size: int, where: str) -> dict[str, Any]:
    """The resize and crop: ``size`` (the output, an int when square), ``resize``, ``shortest_edge``,
    ``longest_edge``, ``do_resize`` (see :class:`ImageSpec`). Every layout ends in one fixed size, as a
    batch needs: a resize that keeps each image's aspect needs a centre crop after it."""
    crop = None
    if p["do_center_crop"]:
        if p["crop_size"] is None:
            raise DataError(where, "do_center_crop: true but no crop_size", "give crop_size {height, width}")
        crop = _size_dict(p["crop_size"], "crop_size", True, where)
        if set(crop) != {"height", "width"}:
            raise DataError(where, f"crop_size {crop}: a crop is {{height, width}}", "give crop_size height and width")
    out: dict[str, Any] = {}
    if not p["do_resize"]:
        out["do_resize"] = False
    else:
        if p["size"] is None and kind is not None:
            raise DataError(where, "do_resize: true but size is null", "give size {height, width} or {shortest_edge}")
        size = _size_dict(p["size"], "size", bool(p["default_to_square"]), where) if p["size"] is not None \
            else {"height": model_size, "width": model_size}
        if kind == "ConvNextImageProcessor":
            return _convnext_layout(p, size, crop, where)
        if "height" in size:
            if crop is None:
                return {"size": _side(size["height"], size["width"])}
            out["resize"] = (size["height"], size["width"])
        else:
            out["shortest_edge"], out["longest_edge"] = size["shortest_edge"], size.get("longest_edge")
    if crop is None:
        what = "do_resize: false" if not p["do_resize"] else f"size {p['size']} keeps each image's aspect"
        raise DataError(where, f"{what} and no centre crop: each image would come out its own size, and a "
                               "batch needs one", "set do_center_crop true with a crop_size, or size {height, width}")
    return {**out, "size": _side(crop["height"], crop["width"])}


def _convnext_layout(p: dict[str, Any], size: dict[str, int], crop: dict[str, int] | None,
                     where: str) -> dict[str, Any]:
    """ConvNeXt's resize: below 384, the shortest edge to ``shortest_edge / crop_pct`` and the centre
    ``shortest_edge`` square cropped; from 384, squashed to that square."""
    if set(size) != {"shortest_edge"}:
        raise DataError(where, f"size {p['size']}: a ConvNextImageProcessor's size is {{shortest_edge}}",
                        "give size {shortest_edge}")
    if crop is not None:
        raise DataError(where, "do_center_crop: true after ConvNeXt's crop_pct crop: jaxtune does not crop twice",
                        "set do_center_crop false (crop_pct already crops the centre)")
    edge, fraction = size["shortest_edge"], p["crop_pct"]
    if not _is_number(fraction) or fraction <= 0:
        raise DataError(where, f"crop_pct {fraction!r} is not a positive number", "give crop_pct such as 0.875")
    if edge >= 384:
        return {"size": edge}
    return {"size": edge, "shortest_edge": int(edge / fraction)}


def _side(height: int, width: int) -> int | tuple[int, int]:
    """A square's side, or ``(height, width)``."""
    return height if height == width else (height, width)

"""The ``data`` section: where the examples come from and how they are batched, and reading it.

:class:`DataConfig` is one flat dataclass because a recipe's ``data:`` section is flat: the
batching fields are :class:`~jaxtune.data.pipeline.LoaderConfig`'s own (inherited, not
repeated), and the fields below choose the source. :func:`read` turns it into validated
sources; the Python API says the same thing in one call::

    train, val = read("chat.jsonl", kind="chat", validation=0.05)
    train, val = read("rotten_tomatoes", train_size=1024, validation_size=500)
    pairs, held_out = read("pairs.jsonl", kind="preference", validation=0.1)   # DPO/IPO/SimPO/ORPO
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import inspect
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxtune import assets
from jaxtune.data.image_pixels import AUGMENTATIONS
from jaxtune.data.image_sources import read_images
from jaxtune.data.pipeline import LoaderConfig
from jaxtune.data.rows import PYTHON, RECIPE, Syntax
from jaxtune.data.sources import KINDS, Source, read_source, split_source

Kind = Literal["chat", "prompt_completion", "text", "classification", "regression", "preference"]


@dataclasses.dataclass(frozen=True)
class DataConfig(LoaderConfig):
    """Training and validation data: a packaged ``dataset`` or files (``train`` + ``kind``), plus
    the batching fields of :class:`~jaxtune.data.pipeline.LoaderConfig`.

    ``dataset``: a packaged dataset (``jaxtune fetch`` lists them). ``train``/``validation``:
    files (JSONL, CSV/TSV for labeled rows, text files or folders; Parquet files or folders of shards
    for every kind but raw text: :mod:`jaxtune.data.parquet`). ``validation_fraction``
    splits validation off ``train`` (stratified for classification) when there is no file.
    ``train_size``/``validation_size``: rows to use (the prepared split's size for packaged
    datasets that support it, else a seeded random subset). ``eval_batch_size``: rows per
    evaluation batch (default ``batch_size``). ``text_unit``: one example per ``file``,
    ``paragraph`` or ``line`` of raw text. ``skip_bad_rows``: leave out (and count) invalid rows
    instead of stopping at the first. ``images``: the files are labeled images
    (:mod:`jaxtune.data.image_sources`: a class-folder tree, ``.npz``, IDX, or JSONL or Parquet rows with an
    ``image`` path; packaged image datasets set it themselves), ``kind`` classification or
    regression; ``augment``: training augmentations (``flip``, ``crop``); ``verify_images``
    (default true): the Trainer decodes every image file once as it starts, so a corrupt file fails
    before step 1; false skips that pass (a folder of millions of files), and a corrupt file then
    fails when its batch is read, naming it.

    Field mapping, for files whose keys (JSONL) or columns (CSV/TSV, Parquet) have other names:
    ``text_field`` (default ``text``), ``pair_field`` (an optional second text),
    ``label_field`` (default ``label``; ``target`` for regression) for classification and
    regression (for images: the label's key in JSONL rows, default ``label``); ``messages_field``
    (default ``messages``) for chat; ``prompt_field`` / ``completion_field`` for prompt/completion.
    A CSV with columns ``statement,party`` trains with ``text_field: statement`` and
    ``label_field: party``.
    """

    dataset: str | None = None
    train: str | None = None
    validation: str | None = None
    validation_fraction: float | None = None
    kind: Kind | None = None
    train_size: int | None = None
    validation_size: int | None = None
    eval_batch_size: int | None = None
    text_unit: Literal["file", "paragraph", "line"] = "file"
    skip_bad_rows: bool = False
    text_field: str | None = None
    pair_field: str | None = None
    label_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    images: bool = False
    augment: tuple[str, ...] = ()
    verify_images: bool = True

    def __post_init__(self) -> None:
        for name in ("train", "validation"):  # a path from Python is the string a recipe writes
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        super().__post_init__()  # the types of every field, this class's too, then the batching ranges
        for name, kinds in FIELD_OPTIONS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name}: expected a key or column name, got {value!r}")
            kind = self.kind or (assets.resolve(self.dataset, "dataset").data_kind if self.dataset else None)
            if kind is not None and kind not in kinds:
                raise ValueError(f"data.{name}: names a field of {' or '.join(kinds)} data, but data.kind is {kind}; "
                                 "remove it")
        if self.dataset is not None:
            try:
                asset = assets.resolve(self.dataset, "dataset")
            except KeyError as err:
                raise ValueError(f"data.dataset: {err.args[0]}") from None
            if self.train is not None:
                raise ValueError(f"data: give data.dataset ({self.dataset}) or data.train ({self.train}), not both")
            if self.kind not in (None, asset.data_kind):
                raise ValueError(f"data.kind: dataset {self.dataset} is {asset.data_kind}, got {self.kind!r}")
        elif self.train is not None and self.kind is None:
            raise ValueError(f"data.kind: required with data.train (one of {', '.join(KINDS)})")
        if self.validation is not None and self.validation_fraction is not None:
            raise ValueError("data: give data.validation (a file) or data.validation_fraction, not both")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction: expected a number in (0, 1), got {self.validation_fraction}")
        for name in ("train_size", "validation_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name}: expected an integer >= 1, got {value}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"data.augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if self.augment and not self.is_images:
            raise ValueError("data.augment: augmentations apply to images; set data.images: true (or remove them)")
        if not self.verify_images and not self.is_images:
            raise ValueError("data.verify_images: applies to images; set data.images: true (or remove it)")
        if self.is_images:  # image rows have an image and a label (label_field: its JSONL key), nothing else
            for name in ("text_field", "pair_field", "skip_bad_rows"):
                if getattr(self, name):
                    what = "text" if name != "skip_bad_rows" else "bad rows to skip (an unreadable image stops it)"
                    raise ValueError(f"data.{name}: image data has no {what}; remove it")

    @property
    def is_images(self) -> bool:
        """Whether the examples are labeled images (said, or a packaged image dataset)."""
        return self.images or (self.dataset is not None and assets.resolve(self.dataset, "dataset").images)

    @property
    def source_kind(self) -> str:
        """The kind of the examples (given, or that of the packaged dataset); raises when the
        config names no data at all."""
        if self.dataset is None and self.train is None:
            raise ValueError("data: give a packaged dataset (data.dataset: " + ", ".join(assets.DATASETS)
                             + ") or a training file (data.train + data.kind)")
        return self.kind or assets.resolve(self.dataset, "dataset").data_kind


# The fields that choose and read the examples: jaxtune.read and a recipe use them, a Trainer (handed the
# examples already read) would ignore them, so it refuses them. The others batch (or check) the examples;
# images stays with them because augment and verify_images, which the Trainer applies, need it.
_BATCHING = {f.name for f in dataclasses.fields(LoaderConfig)} | {"eval_batch_size", "augment", "images",
                                                                  "verify_images"}
SOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name not in _BATCHING)


def source_fields(config: DataConfig) -> list[str]:
    """The :data:`SOURCE_FIELDS` that ``config`` sets (to other than their defaults)."""
    defaults = DataConfig()
    return [name for name in SOURCE_FIELDS if getattr(config, name) != getattr(defaults, name)]


def batching(config: DataConfig) -> DataConfig:
    """``config`` without its source fields (all at their defaults): the part a Trainer given the
    examples read from it takes."""
    defaults = DataConfig()
    return dataclasses.replace(config, **{name: getattr(defaults, name) for name in SOURCE_FIELDS},
                               images=config.is_images)


# Field-mapping options and the kinds whose rows they name.
FIELD_OPTIONS = {"text_field": ("classification", "regression", "text"), "pair_field": ("classification", "regression"),
                 "label_field": ("classification", "regression"), "messages_field": ("chat",),
                 "prompt_field": ("prompt_completion",), "completion_field": ("prompt_completion",)}


def field_options(config: DataConfig) -> dict[str, str]:
    """The field-mapping options the config sets (the reader's keyword arguments)."""
    return {name: getattr(config, name) for name in FIELD_OPTIONS if getattr(config, name) is not None}


def _subset(source: Source, size: int | None, seed: int) -> Source:
    if size is None or size >= len(source):
        return source
    return source.select(np.sort(np.random.default_rng(seed).permutation(len(source))[:size]))


def _packaged(config: DataConfig) -> tuple[Path, Path, bool]:
    """(train file, test file, whether the preparation already sized the splits) of a packaged dataset."""
    asset = assets.resolve(config.dataset, "dataset")
    prepare = asset.builder()
    sizes = {k: v for k, v in (("train_size", config.train_size), ("test_size", config.validation_size))
             if v is not None}
    # Datasets with a sized, stratified preparation take the sizes; the others are subset after reading.
    sized = all(k in inspect.signature(prepare).parameters for k in sizes)
    prepared = prepare(seed=config.seed, **(sizes if sized else {}))
    return prepared.train, prepared.test, sized


def read_data(config: DataConfig, *, train: bool = True, validation: bool = True,
              syntax: Syntax = RECIPE) -> tuple[Source | None, Source | None]:
    """The config's sources, read and validated (no tokenization yet): ``(train, validation)``.

    ``train=False`` reads only what evaluation needs (a validation file, or the split of
    ``train`` when validation is a fraction); ``validation`` is None when the data has none.
    ``validation=False`` reads no validation data at all (a packaged dataset's own split neither);
    with ``train=False`` only a classification's training labels are read (they order the head).
    ``syntax``: errors suggest fixes as recipe keys (``data.skip_bad_rows=true``, the default) or
    Python arguments (``jaxtune.read``).
    """
    kind = config.source_kind
    options: dict[str, Any] = {"unit": config.text_unit} if kind == "text" else {}
    options.update(field_options(config))
    if kind != "preference":
        options["syntax"] = syntax
    if config.dataset is not None:
        train_path, val_path, sized = _packaged(config)
        if kind == "text":
            options["unit"] = "line"  # one review per line
        val_path = Path(config.validation) if config.validation else val_path
    else:
        train_path, val_path, sized = Path(config.train), config.validation and Path(config.validation), False
    if validation and config.validation_size is not None and val_path is None and config.validation_fraction is None:
        # else it would cap nothing, without a word
        fix = ("pass validation=0.1 (a fraction of the rows to hold out) or validation=FILE" if syntax == PYTHON
               else "set data.validation_fraction=0.1 (a fraction of the rows to hold out) or data.validation=FILE")
        raise ValueError(f"{syntax.option('validation_size', config.validation_size)}: there is no validation data "
                         f"to cap; {fix}")
    if not validation:
        config, val_path = dataclasses.replace(config, validation_fraction=None), None
    need_train = train or config.validation_fraction is not None or kind == "classification"

    def read_one(path: Path, **labels: Any) -> Source:
        if config.is_images:
            return read_images(path, kind, label_field=config.label_field, **labels)
        return read_source(path, kind, skip_bad_rows=config.skip_bad_rows, **options, **labels)

    train_source = read_one(train_path) if need_train else None
    validation = None
    if config.validation_fraction is not None:
        train_source, validation = split_source(train_source, config.validation_fraction, seed=config.seed)
    elif val_path is not None:
        validation = read_one(val_path, **({"labels": train_source.label_names} if kind == "classification" else {}))
    if not sized:
        train_source = _subset(train_source, config.train_size, config.seed) if train_source is not None else None
        validation = _subset(validation, config.validation_size, config.seed + 1) if validation is not None else None
    return train_source, validation


def _source_field(name: str) -> dict[str, str]:
    """The :class:`DataConfig` field that ``read``'s ``data`` names: ``train`` for a file or folder,
    ``dataset`` for a packaged dataset (or its alias). Neither is refused here, suggesting a close
    packaged name: as a file that does not exist it failed for want of a data.kind."""
    if Path(name).exists() or glob.has_magic(name):  # a pattern of Parquet shards (data/train-*.parquet)
        return {"train": name}
    try:
        assets.resolve(name, "dataset")
    except KeyError:
        close = difflib.get_close_matches(name, assets.DATASETS, n=1)
        raise ValueError(f"data: {name!r} is neither a file or folder nor a packaged dataset "
                         f"({', '.join(assets.DATASETS)}); "
                         + (f"did you mean {close[0]!r}?" if close else "check the path")) from None
    return {"dataset": name}


def read(data: str | os.PathLike[str] | DataConfig, *, kind: Kind | None = None,
         validation: float | str | os.PathLike[str] | None = None, **fields: Any) -> tuple[Source, Source | None]:
    """Read training (and validation) examples, validated at the door.

    Args:
      data: a file or folder, a packaged dataset name, or a :class:`DataConfig`.
      kind: what the rows are (``chat``, ``prompt_completion``, ``text``, ``classification``,
        ``regression``, ``preference``: pairs of answers in OpenAI's or TRL's format, see
        :mod:`jaxtune.data.preference`); not needed for packaged datasets.
      validation: a fraction of ``data`` to hold out (seeded, stratified for classification),
        or a validation file.
      fields: other :class:`DataConfig` fields (``train_size``, ``skip_bad_rows``, ``seed``...).

    Returns:
      ``(train, validation)`` sources; ``validation`` is None when none was asked for and the
      dataset has no split of its own.
    """
    if isinstance(data, DataConfig):
        config = dataclasses.replace(data, **({"kind": kind} if kind else {}), **fields)
    else:
        config = DataConfig(**_source_field(str(data)), kind=kind, **fields)
    if isinstance(validation, int | bool):
        raise ValueError(f"validation={validation!r}: give a fraction of the rows to hold out (e.g. 0.1) or a "
                         "validation file; validation_size= caps the held-out rows")
    if isinstance(validation, float):
        config = dataclasses.replace(config, validation_fraction=validation, validation=None)
    elif validation is not None:
        config = dataclasses.replace(config, validation=str(validation), validation_fraction=None)
    train, val = read_data(config, syntax=PYTHON)
    return train, val

"""Images on grain: labeled image sources to batches of the model's pixels.

The image pipeline's public entry points are importable from here: the sources
(:func:`read_images` and :class:`ImageSource`, :mod:`jaxtune.data.image_sources`), what the model
takes and how a record becomes it (:class:`ImageSpec`, :class:`ToPixels`,
:mod:`jaxtune.data.image_pixels`), and this module's loader. Batches are
``{"pixel_values": (B, C, H, W) f32, "labels": (B,) int32 | f32, "example_weights": (B,) f32}``
(weight 0 on the rows that fill a last partial evaluation batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence

import grain
import numpy as np

from jaxtune.data.image_pixels import ImageSpec, ToPixels
from jaxtune.data.image_sources import ImageSource, read_images
from jaxtune.data.pipeline import Loader, LoaderConfig, _shard, in_workers, reading_config
from jaxtune.data.source_types import DataError

__all__ = ["ImageLoader", "ImageSource", "ImageSpec", "ImageStats", "ToPixels", "image_loader", "read_images"]

log = logging.getLogger(__name__)


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

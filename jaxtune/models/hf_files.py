"""A Hugging Face model directory's files: finding the directory, reading its ``config.json``,
listing its ``*.safetensors`` weight files and viewing the tensors in them (memory-mapped).

These are the file-level steps under :mod:`jaxtune.models.hf`, which maps the tensors to a model
family's params and writes checkpoints; this module knows nothing of families or params.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# The dtype names of a safetensors header; bf16 has no numpy dtype of its own, so ml_dtypes supplies it.
_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file/tensor and the fix."""


# ----------------------------------------------------------------------------- locating files


def resolve(path_or_id: str | os.PathLike[str]) -> Path:
    """A local model directory for ``path_or_id``: an existing folder, or a hub id downloaded
    (safetensors, configs and tokenizer files only) when a hub is reachable."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory (config.json + *.safetensors), got a file")
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(f"{text}: no such directory (and not a hub id of the form 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise CheckpointError(
            f"{text}: not a local directory, and the Hugging Face hub could not provide it ({type(err).__name__}: "
            f"{str(err)[:200]}). Download it where a hub is reachable, or use jaxtune.models.assets.fetch_model."
        ) from None


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model directory, with clear errors for missing or broken files."""
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json; a Hugging Face model directory needs one")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); restore the model's config.json (re-download or "
                              "save_pretrained the model again)") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model directory (its index's shards, or every one there);
    pickle checkpoints are refused, naming the command that converts them."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err}); re-download the model or remove the "
                                  "index") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) {missing} that are not in {model_dir}; download the "
                                  "missing shards")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}); jaxtune refuses them because unpickling "
            "runs arbitrary code. Convert once where you trust the file: python -c \"from transformers import "
            f"AutoModel; AutoModel.from_pretrained('{model_dir}').save_pretrained('{model_dir}')\" (writes safetensors)"
        )
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found; put the model's weights there (e.g. "
                          "model.save_pretrained(dir) writes model.safetensors) or point model.path at the full model")


# ----------------------------------------------------------------------------- safetensors reading


class SafetensorsReader:
    """Zero-copy views of the tensors in one or more ``.safetensors`` files (memory-mapped).

    ``reader[name]`` is a read-only numpy view (bf16 as ``ml_dtypes.bfloat16``); nothing is
    read from disk until a view's bytes are touched. :meth:`release` gives a copied tensor's pages
    back to the page cache.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, int, str, list[int], tuple[int, int]]] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for file in files:
            try:
                with open(file, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if n > os.fstat(fh.fileno()).st_size - 8:
                        raise OSError(f"header length {n} exceeds the file size")
                    header = json.loads(fh.read(n))
            except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{file}: unreadable safetensors file ({type(err).__name__}: {err})") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._where[name] = (file, 8 + n, info["dtype"], info["shape"], tuple(info["data_offsets"]))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][3])

    def __getitem__(self, name: str) -> np.ndarray:
        file, base, dtype, shape, (start, end) = self._where[name]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        if file not in self._maps:
            with open(file, "rb") as fh:  # the map keeps its own reference to the file
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        np_dtype = np.dtype(_DTYPES[dtype])
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * np_dtype.itemsize or base + end > len(self._maps[file]):
            raise CheckpointError(f"{file}: tensor {name} is truncated or its header is corrupt")
        return np.frombuffer(self._maps[file], np_dtype, count, base + start).reshape(shape)

    def release(self, name: str) -> None:
        """Unmap the pages of tensor ``name`` that reading touched: they stay in the page cache, and a
        view that reads them again maps them again. Why: a load copies every tensor out of the map, and
        the pages it read counted in the process's resident memory beside the copies (the model twice at
        the end of a load, where transformers, whose tensors are the mapped pages, holds it once)."""
        file, base, _, _, (start, end) = self._where[name]
        if file not in self._maps or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = (base + start) // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes a page-aligned start
        if base + end > first:
            self._maps[file].madvise(mmap.MADV_DONTNEED, first, base + end - first)

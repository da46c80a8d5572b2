"""``docs/models.md``: the supported families and what jaxtune does with each, generated from the code.

Every fact comes from the family registry (:data:`jaxtune.models.families.FAMILIES`) or from the code it
names (a decoder module generates and takes prompt tuning; the GGUF importer's architectures), so
the page cannot drift: ``tests/test_catalog.py`` fails when it is stale. Regenerate it with::

    python -m jaxtune.models.catalog docs/models.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxtune.models import gguf_architectures
from jaxtune.models.decoder import Decoder
from jaxtune.models.families import FAMILIES, Family

COMMAND = "python -m jaxtune.models.catalog docs/models.md"
_HEADER = f"""# Supported model families

Generated from `jaxtune.models.families.FAMILIES` by `{COMMAND}`; do not edit by hand (a test fails when this
page and the code disagree).

Every family trains every way a plan allows: full or partial fine-tuning, LoRA, DoRA (on any linear) and
new classification/regression heads; logits or token states equal transformers' (fp32, within 1e-4) in
the tests. A loaded `*ForSequenceClassification` checkpoint is its body plus that head.

- **Prompt tuning** and **generation** (KV cache, greedy or sampled): causal language models.
- A **decoder body** is a causal LM's bare `*Model` checkpoint (how decoder embedding models such as
  e5-mistral are saved): it loads without an output layer, a head plan trains it and exports it as the
  family's classifier, and it generates only where it ties its output layer to the embedding (Gemma, GPT-2).
- **Head exports as**: the transformers class that a body with the family's default head exports to
  (merged directory, or the base of a PEFT adapter).
- **Merged export**: an HF directory with adapters folded in, which transformers loads as this class
  (with a head: as the head's class). **PEFT export**: a LoRA/DoRA (or prompt-tuning) adapter that `peft`
  loads onto that class.
- **GGUF**: `jaxtune.load("file.gguf")` converts llama.cpp files of this architecture.
- Image families read `pixel_values`; EfficientNet-Lite has no transformers class, so its runs keep
  their Orbax checkpoints instead of an HF or PEFT export.
"""
_COLUMNS = ("Architecture", "Family", "Kind", "Prompt tuning", "Generation", "Head exports as", "Merged export",
            "PEFT export", "GGUF")


def _row(architecture: str, family: Family) -> tuple[str, ...]:
    causal = issubclass(family.body_module, Decoder)
    classifier = family.body is not None
    kind = "sequence classifier" if classifier else "decoder body" if family.lm else "causal LM" if causal \
        else "encoder"
    if family.modality == "image":
        kind = "image classifier" if classifier else "image encoder"
    exports = family.transformers
    gguf_arch = family.gguf if family.gguf in gguf_architectures.SUPPORTED_ARCHITECTURES else None
    yes = "yes" if causal else "—"
    merged = architecture if classifier else family.classifier if family.lm else family.base or architecture
    return (
        f"`{architecture}`", family.name, kind, yes,
        "—" if classifier else "if tied" if family.lm else yes,
        f"`{family.classifier}`" if family.classifier else "—",
        f"`{merged}`" if exports else "—",
        "LoRA, DoRA" + (", prompt" if causal else "")
        # transformers 5 fuses a MoE layer's experts into 3-D parameters that PEFT's target_modules cannot name
        + (" (not on experts or router)" if family.expert_tensor else "") if exports else "—",
        f"`{gguf_arch}`" if gguf_arch else "—",
    )


def render() -> str:
    """The Markdown of ``docs/models.md``."""
    rows = [_COLUMNS, tuple("---" for _ in _COLUMNS)] + [_row(a, f) for a, f in FAMILIES.items()]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return f"{_HEADER}\n{table}\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):  # `--help` is a request, not a file to write
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

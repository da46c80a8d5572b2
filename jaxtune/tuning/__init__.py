"""Tuning methods as one plan over the parameter pytree: full, partial, LoRA/DoRA, prompt tuning
and added heads; partition into trainable/frozen parts; merge; HF and PEFT export/import.

Typical use::

    base = jaxtune.load("path/to/model", dtype="bfloat16")
    tuned = tuning.apply_plan(base, tuning.lora(rank=8, alpha=16) + tuning.head("regression"))
    print(tuning.summary(tuned.params, tuned.labels))
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    ...  # optimise `trainable` only; `combine(trainable, frozen)` is the full tree
    tuning.export(dataclasses.replace(tuned, params=tuning.combine(trainable, frozen), step=n), "out/adapter")
"""

from jaxtune.tuning.heads import HeadSpec
from jaxtune.tuning.labels import FROZEN, GROUPS
from jaxtune.tuning.lora import AdapterSpec, merge, unmerge
from jaxtune.tuning.partition import cast_by_label, combine, count, nbytes, partition, quantize_leaves, summary
from jaxtune.tuning.peft_import import apply_plan, load_peft
from jaxtune.tuning.peft_io import (
    ExportError,
    export,
    export_format,
    export_merged,
    export_peft,
    hf_module_name,
)
from jaxtune.tuning.plan import (
    Plan,
    PlanError,
    Rule,
    as_plan,
    dora,
    freeze,
    freeze_all_but,
    full,
    head,
    lora,
    prompt_tuning,
    train,
)
from jaxtune.tuning.tuned import Tuned, TunedModel

__all__ = [
    "AdapterSpec", "ExportError", "export", "export_format", "FROZEN", "GROUPS", "HeadSpec", "Plan", "PlanError",
    "Rule", "Tuned", "TunedModel",
    "apply_plan", "as_plan", "cast_by_label", "combine", "count", "dora", "export_merged", "export_peft", "freeze",
    "freeze_all_but", "full", "head", "hf_module_name", "load_peft", "lora", "merge", "nbytes", "partition",
    "prompt_tuning", "quantize_leaves", "summary", "train", "unmerge",
]

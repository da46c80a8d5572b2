"""What the packed quality runs trained on, against PyTorch's padded batches (no timing):

    python benchmarks/packing_audit.py            # the three packed tasks' rows, ~2 minutes on 2 CPU cores
    python benchmarks/packing_audit.py --smoke    # 16 rows a task: checks that the script works

Per task of ``quality.py --packing`` (MiniLM / Rotten Tomatoes, VADER, SmolLM2 chat; minilm-full reads
minilm-lora-head's rows): one epoch's packed rows and steps as the loader counted them before 2026-12-05
(``ceil(tokens / max_length)`` rows) and as its packer fills them now (``Loader.rows_per_epoch``), at the
task's ``packed_rows`` and at 32 rows a step; how many examples the old step count reads; and the token
slots PyTorch's side computes in its seeded order (each batch padded to its longest row: its own
``encode_rows``) against the real tokens. Writes ``--out`` JSON (default
``benchmarks/results/packing-audit.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, machine, now, steps_of, versions
from quality import TASKS, Task, jaxtune_recipe, smoke, write_rows
from quality_reference import encode_rows, train_order

AUDITED = ("minilm-lora-head", "vader-lora-head", "smollm2-chat-lora")


def packed_loader(task: Task, files: dict[str, Any], folder: Path) -> Any:
    """The training Loader jaxtune's run of ``task`` (packed) reads: the recipe quality.py runs."""
    from jaxtune import config as config_lib
    from jaxtune.recipe import trainer_for

    recipe = jaxtune_recipe(task, {k: str(v) for k, v in files.items()}, str(folder / "run"))
    return trainer_for(config_lib.validate(config_lib.from_data(config_lib.Config, recipe))).train_data


def examples_in(batch: dict[str, Any]) -> int:
    """Examples a packed batch holds: its weighted examples (classifiers), or its segments (LM rows)."""
    if "example_weights" in batch:
        return int((batch["example_weights"] > 0).sum())
    return sum(len(set(row[row > 0].tolist())) for row in batch["segment_ids"])


def epoch_counts(loader: Any, max_length: int) -> dict[str, int]:
    """One packed epoch counted the old way and by the packer, and the examples the old step count reads."""
    stats = loader.scan()
    batch = loader.config.batch_size
    old_rows, (new_rows, _) = math.ceil(stats.tokens / max_length), loader.rows_per_epoch()
    batches = iter(loader)
    read = sum(examples_in(next(batches)) for _ in range(old_rows // batch))
    return {"rows_a_step": batch, "examples": stats.examples, "tokens": stats.tokens, "old_rows": old_rows,
            "old_steps": old_rows // batch, "new_rows": new_rows, "new_steps": new_rows // batch,
            "examples_read_by_old_steps": read}


def pytorch_padding(task: Task, files: dict[str, Any]) -> dict[str, int]:
    """Real tokens and token slots of the batches PyTorch's side trains on (its order, its encoding)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(files["train"]).read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows}) if task.kind == "classification" else None
    order, real, slots = train_order(len(rows)), 0, 0
    for step in range(steps_of(task)):
        batch = [rows[i] for i in order[step * task.batch_size:(step + 1) * task.batch_size]]
        mask = encode_rows(task, tokenizer, labels, batch, for_eval=False)["attention_mask"]
        real, slots = real + int(mask.sum()), slots + mask.numel()
    return {"steps": steps_of(task), "real_tokens": real, "token_slots": slots}


def audit(name: str, task: Task, folder: Path, wide: int = 32) -> dict[str, Any]:
    """One task's record: its epoch counts at packed_rows and (classifiers) at ``wide`` rows a step, as
    ``quality.py --packing --packed-rows 32`` ran them on 2026-12-02; PyTorch's padding."""
    files = write_rows(task, folder)
    counts = {}
    for rows in dict.fromkeys((task.packed_rows, wide) if task.kind != "chat" else (task.packed_rows,)):
        packed = dataclasses.replace(task, packing=True, packed_rows=rows)
        counts[str(rows)] = epoch_counts(packed_loader(packed, files, folder / f"rows{rows}"), task.max_length)
    return {"task": name, "packed": counts, "pytorch": pytorch_padding(task, files)}


def table(records: list[dict[str, Any]]) -> str:
    out = ["| task | rows a step | steps, old count -> packer | examples read by the old steps | "
           "PyTorch token slots / real tokens |", "|---|---|---|---|---|"]
    for r in records:
        torch = r["pytorch"]
        for c in r["packed"].values():
            out.append(f"| {r['task']} | {c['rows_a_step']} | {c['old_steps']} -> {c['new_steps']} | "
                       f"{c['examples_read_by_old_steps']} of {c['examples']} | {torch['token_slots']:,} / "
                       f"{torch['real_tokens']:,} = {torch['token_slots'] / torch['real_tokens']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(AUDITED))
    ap.add_argument("--smoke", action="store_true", help="16 train rows a task")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/packing-audit.json)")
    args = ap.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    work = Path(tempfile.mkdtemp(prefix="jaxtune-packing-audit-"))
    records = []
    for name in args.tasks.split(","):
        # --smoke: 16 rows fill a few packed rows, so a step takes 2 of them (or 4) instead of 13 (or 32).
        task = dataclasses.replace(smoke(TASKS[name]), packed_rows=2) if args.smoke else TASKS[name]
        records.append(audit(name, task, work / name, wide=4 if args.smoke else 32))
        print(f"done {name}", file=sys.stderr, flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "packing-audit.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": now(), "command": " ".join(sys.argv), "machine": machine(),
                               "versions": versions(), "tasks": records}, indent=2))
    print(table(records))
    print(f"\n{now()}, {machine()}; JSON {out}")


if __name__ == "__main__":
    main()

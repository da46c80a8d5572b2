"""Where the chat task's two sides part: one seed of the quality benchmark's ``smollm2-chat-lora``
(SmolLM2-135M-Instruct, LoRA r8 on q, k, v, o, 100 steps of 8 chats) run step for step on the
same batches from the same start, as ``paired_drift.py`` does for the image task:

    python benchmarks/chat_drift.py --seed 0 --out benchmarks/results/chat-drift-seed0.json

jaxtune runs its recipe unpacked (padded batches of 8 chats, as PyTorch's side runs them) and logs
every step; before training it writes its batches (token ids, targets, loss weights) and its
adapter's initial values (a PEFT adapter). PyTorch (transformers + PEFT) loads that adapter, trains
on those batches with the same schedule, AdamW and clipping, and also scores jaxtune's final adapter
(exported the same way), so that a difference of evaluation shows apart from one of training.

A difference of method (loss weighting, schedule, optimizer, LoRA scaling) shows as the loss curves
parting at a step by more than float noise; float noise starts near 1e-7 and grows as Adam's first
steps amplify it. Equal curves and accuracies place any gap between the quality benchmark's sides in
what differs by construction there: the batches (packed rows on jaxtune's side) and the random draws
(row order, adapter init).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from common import drift_main, torch_adamw
from quality import TASKS, Task, jaxtune_recipe, smoke, write_rows
from quality_reference import encode_rows

BATCH_KEYS = ("input_ids", "targets", "loss_weights", "positions", "segment_ids")


def jaxtune_worker(task: Task, files: dict[str, str], work: Path) -> dict[str, Any]:
    """The benchmark's jaxtune recipe, unpacked, logging every step; its batches, starting adapter
    and final adapter written to ``work`` for the PyTorch worker."""
    from jaxtune import config as config_lib
    from jaxtune import tuning
    from jaxtune.recipe import trainer_for

    recipe = jaxtune_recipe(task, files, str(work / "run"))
    recipe["train"]["log_every"] = 1
    trainer = trainer_for(config_lib.validate(config_lib.from_data(config_lib.Config, recipe)))
    # A Loader starts each iteration at the first batch of its seeded order: fit reads these same batches.
    batches = list(itertools.islice(iter(trainer.train_data), trainer.steps))
    np.savez(work / "batches.npz", **{f"{i}/{k}": np.asarray(b[k]) for i, b in enumerate(batches) for k in BATCH_KEYS})
    tuning.export_peft(trainer.model, work / "start-adapter")
    result = trainer.fit()
    tuning.export_peft(trainer.model, work / "final-adapter")
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "grad_norm" in r]
    return {"before": result.before, "after": result.after, "steps": len(batches),
            "losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps]}


def pytorch_worker(task: Task, files: dict[str, str], work: Path) -> dict[str, Any]:
    """PyTorch trains from jaxtune's starting adapter on jaxtune's batches (loss: cross-entropy at
    jaxtune's targets, weighted by its loss weights, over the batch's weight); its choice accuracy,
    and that of jaxtune's final adapter loaded into a fresh PEFT model."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    rows = [json.loads(line) for line in Path(files["test"]).read_text(encoding="utf-8").splitlines()]
    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in task.choices]

    def peft_model(adapter: Path, trainable: bool) -> Any:
        base = transformers.AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32)
        return peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)

    @torch.no_grad()
    def accuracy(model: Any) -> float:
        model.eval()
        right = 0
        for i in range(0, len(rows), task.batch_size):
            batch = rows[i:i + task.batch_size]
            logits = model(**encode_rows(task, tokenizer, None, batch, for_eval=True)).logits[:, -1, choice_ids]
            truth = torch.tensor([task.choices.index(r["messages"][-1]["content"]) for r in batch])
            right += int((logits.argmax(-1) == truth).sum())
        return right / len(rows)

    model = peft_model(work / "start-adapter", trainable=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch_adamw(trainable, lr=task.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=task.weight_decay)
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())
    saved = np.load(work / "batches.npz")
    steps = len(saved.files) // len(BATCH_KEYS)
    if steps != len(learning_rates):
        raise RuntimeError(f"jaxtune ran {steps} steps, the schedule has {len(learning_rates)}")
    model.train()
    losses, grad_norms = [], []
    for step in range(steps):
        batch = {k: torch.from_numpy(saved[f"{step}/{k}"]) for k in BATCH_KEYS}
        logits = model(input_ids=batch["input_ids"].long(), attention_mask=(batch["segment_ids"] > 0).long(),
                       position_ids=batch["positions"].long()).logits
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten().long(),
                                                      reduction="none")
        weights = batch["loss_weights"].flatten()
        loss = (per_token * weights).sum() / weights.sum()
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rates[step]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"losses": losses, "grad_norms": grad_norms, "accuracy": accuracy(model),
            "jaxtune_adapter_accuracy": accuracy(peft_model(work / "final-adapter", trainable=False))}


def chat_task(seed: int, smoke_run: bool) -> Task:
    """The benchmark's chat task, unpacked (padded batches, as PyTorch's side runs it), with this seed."""
    task = dataclasses.replace(TASKS["smollm2-chat-lora"], packing=False, seeds=(seed,))
    return smoke(task) if smoke_run else task


def main() -> None:
    drift_main(__file__, "chat-drift", "16 train / 16 test chats, 2 steps (checks the script only)", chat_task,
               write_rows, {"jaxtune": jaxtune_worker, "pytorch": pytorch_worker}, {0, 1, 2, 3, 4, 9, 19, 29, 49, 74},
               lambda r: f"choice accuracy: jaxtune {r['jaxtune']['after']['choice_accuracy']:.4f}, PyTorch "
                         f"{r['pytorch']['accuracy']:.4f}; jaxtune's adapter scored by PyTorch "
                         f"{r['pytorch']['jaxtune_adapter_accuracy']:.4f}")


if __name__ == "__main__":
    main()

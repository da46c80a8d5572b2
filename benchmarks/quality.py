"""Fine-tuning quality: jaxtune vs PyTorch (transformers + PEFT) on real tasks whose model and data \
install from PyPI (jaxtune.assets).

    python benchmarks/quality.py                       # all four tasks, ~1 hour on 2 CPU cores
    python benchmarks/quality.py --tasks minilm-full   # one task
    python benchmarks/quality.py --smoke               # seconds per side: checks that it works
    python benchmarks/quality.py --packing             # jaxtune packs the examples, several per row
    python benchmarks/quality.py --tasks smollm2-dpo-lora   # preference tuning vs TRL's DPOTrainer
    python benchmarks/quality.py --tasks smollm2-dpo-lora --seeds 1 --sides jaxtune --out a.json
    python benchmarks/quality.py --merge a.json b.json ... --out all.json   # one table of such runs

Each task runs end to end twice, each side in its own process: jaxtune through its public run
API (:func:`jaxtune.finetune`, what ``jaxtune train`` runs) and an equivalent PyTorch script
written here with transformers + PEFT. Both sides read the same rows (written once by this
driver), start from the same pretrained weights, and use the same method, hyperparameters and
budget: AdamW (weight decay on matrices only), the same learning-rate schedule (linear warmup
from ``lr/warmup`` to ``lr``, cosine decay to 0), per-group learning-rate multipliers for new
heads, gradient clipping at 1.0, the same batch size, max length and epochs. Row order
differs (each side shuffles with its own generator); ``--seeds S`` seeds both sides' row order and
initialisation with S.

Metrics come from one place, :mod:`jaxtune.training.evaluate`: the PyTorch worker returns raw
predictions and the driver scores them with the functions jaxtune itself uses. Per side: base
(pretrained body + fresh head/adapters) and fine-tuned metrics, training wall time (first step
and compile included) and the whole run's wall time (loading, both evaluations, training).

Host memory: jaxtune runs as it ships (``JAXTUNE_HOST_MALLOC=auto``: on the CPU it keeps freed memory
for the next step, ``jaxtune.host_memory``); the other sides run with glibc's defaults, as their users
run them, unless ``--reference-host-malloc keep`` gives them jaxtune's settings (the equal-settings
arm). The record's ``host_malloc`` and the last line of the output say which ran.

Tasks:
  minilm-lora-head   all-MiniLM-L6-v2 + Rotten Tomatoes (4k train / 2k test): LoRA r8 on all
                     linears + a mean-pooled classification head.
  minilm-full        the same data: every weight + BERT's pooler head (PyTorch reference in benchmarks/RESULTS.md:
                     0.795 after 1 epoch).
  smollm2-chat-lora  SmolLM2-135M-Instruct, reviews as a chat question answered
                     "positive"/"negative" (800 / 400): LoRA r8 on q,k,v,o; choice accuracy
                     (first-token logit of "positive" vs "negative"; PyTorch reference: 0.59 zero-shot).
  vader-lora-head    MiniLM + VADER human sentiment ratings (-4..4), 4k train / 1k test
                     subsets: LoRA r8 + a mean-pooled regression head with a 128-wide GELU
                     layer, Huber loss.

  smollm2-dpo-lora   SmolLM2-135M-Instruct + rotten_tomatoes_preference (the chat task's reviews,
                     the true sentiment word preferred over the wrong one; 800 / 400 pairs):
                     LoRA-DPO (r8 on q,k,v,o, beta 0.1) against TRL's DPOTrainer (reference: the
                     model with adapters off, as jaxtune's), 3 seeds per side for TRL's
                     run-to-run spread. Held-out rewards/accuracy (0 for the base model on both
                     sides: policy == reference) and logps/accuracy (how often the model itself
                     prefers the true word; comparable between base and tuned).

The PyTorch and TRL sides of these tasks are in ``quality_reference.py``. Image tasks
(``fashion-mnist-lite0``, ``count-lite0``, and ``--paired`` / ``--recalibrate N`` for them) are
not in the default list; run them with ``--tasks``: ``quality_images.py`` holds them, every side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    load_average,
    machine,
    now,
    steps_of,
    timed_finetune,
    versions,
    worker_env,
    write_learning_rates,
)
from quality_images import IMAGE_TASKS, ImageTask, image_worker, write_image_data
from quality_reference import torch_side, trl_side


@dataclasses.dataclass(frozen=True)
class Task:
    """One fine-tuning task, as both sides run it."""

    model: str  # a packaged model (jaxtune fetch)
    dataset: str  # rotten_tomatoes | rotten_tomatoes_chat | vader
    kind: str  # classification | regression | chat
    method: str  # lora-head | full-pooler | lora
    train: int
    test: int
    max_length: int
    batch_size: int
    learning_rate: float
    head_lr: float = 1.0  # the head's learning-rate multiplier
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: int = 1
    rank: int = 8
    alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # empty: every linear layer of the body
    hidden: tuple[int, ...] = ()  # GELU layers of the head before its output
    regression_loss: str = "mse"
    choices: tuple[str, ...] = ()
    pad_to_multiple_of: int | None = 16  # jaxtune's dynamic padding (PyTorch pads each batch to its longest row)
    # ``--packing``: jaxtune packs several examples per row, each its own segment, and trains the same epochs.
    # ``packed_rows`` rows a step then hold about ``batch_size`` examples, so that both sides take about the
    # same number of optimizer steps of the same number of examples (the optimisation is the same, only
    # the padding is gone); None keeps ``batch_size`` rows (fewer, larger steps).
    packing: bool = False
    packed_rows: int | None = None
    beta: float = 0.1  # preference tasks: DPO's beta
    seeds: tuple[int, ...] = (0,)  # preference tasks: one run per seed and side (the run-to-run spread)


TASKS: dict[str, Task] = {
    # 64-token rows hold 2.4 reviews on average (2.6 VADER texts; first fit), 160-token rows 2 chats.
    "minilm-lora-head": Task("all-MiniLM-L6-v2", "rotten_tomatoes", "classification", "lora-head", 4000, 2000, 64, 32,
                             1e-3, head_lr=5.0, packed_rows=13),
    "minilm-full": Task("all-MiniLM-L6-v2", "rotten_tomatoes", "classification", "full-pooler", 4000, 2000, 64, 32,
                        5e-5, head_lr=20.0, packed_rows=13),
    "smollm2-chat-lora": Task("SmolLM2-135M-Instruct", "rotten_tomatoes_chat", "chat", "lora", 800, 400, 160, 8, 2e-4,
                              weight_decay=0.0, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                              choices=("positive", "negative"), pad_to_multiple_of=32, packed_rows=4),
    "vader-lora-head": Task("all-MiniLM-L6-v2", "vader", "regression", "lora-head", 4000, 1000, 64, 32, 1e-3,
                            head_lr=3.0, hidden=(128,), regression_loss="huber", packed_rows=12),
    "smollm2-dpo-lora": Task("SmolLM2-135M-Instruct", "rotten_tomatoes_preference", "preference", "lora", 800, 400,
                             160, 8, 1e-4, weight_decay=0.0, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                             pad_to_multiple_of=32, beta=0.1, seeds=(0, 1, 2)),
}


def smoke(task: Task) -> Task:
    """The task at a size that only checks the script works: 2 steps of 8 rows, 16 test rows."""
    return dataclasses.replace(task, train=16, test=16, batch_size=8, seeds=task.seeds[:1])


# ----------------------------------------------------------------------------- data (driver)


def write_rows(task: Task, folder: Path) -> dict[str, Path]:
    """The exact train/test rows both sides read, as JSONL in ``folder``, and the model directory."""
    import numpy as np

    from jaxtune.data import datasets
    from jaxtune.models.assets import fetch_model

    if task.dataset == "rotten_tomatoes":
        prepared = datasets.prepare_rotten_tomatoes(train_size=task.train, test_size=task.test)
    elif task.dataset == "rotten_tomatoes_chat":
        prepared = datasets.prepare_rotten_tomatoes_chat(train_size=task.train, test_size=task.test)
    elif task.dataset == "rotten_tomatoes_preference":
        prepared = datasets.prepare_rotten_tomatoes_preference(train_size=task.train, test_size=task.test)
    else:
        prepared = datasets.prepare_vader()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, size, seed in (("train", task.train, 0), ("test", task.test, 1)):
        lines = getattr(prepared, split).read_text(encoding="utf-8").splitlines()
        if len(lines) > size:  # a seeded subset (VADER; the Rotten Tomatoes splits are already this size)
            keep = np.sort(np.random.default_rng(seed).permutation(len(lines))[:size])
            lines = [lines[i] for i in keep]
        out[split] = folder / f"{split}.jsonl"
        out[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out["model"] = fetch_model(task.model)
    out["learning_rates"] = write_learning_rates(task, folder)
    return out


# ----------------------------------------------------------------------------- jaxtune side (worker)


def jaxtune_side(task: Task, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The task through ``jaxtune.finetune``; returns metrics and timings."""
    return timed_finetune(jaxtune_recipe(task, files, run_dir))


def jaxtune_recipe(task: Task, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The task as a jaxtune recipe (the data of a YAML file)."""
    if task.method == "full-pooler":
        plan = [{"preset": "full"}, {"action": "head", "task": "classification", "pooling": "pooler"}]
    else:
        lora = {"preset": "lora", "rank": task.rank, "alpha": task.alpha}
        plan = [{**lora, "targets": list(task.lora_targets)} if task.lora_targets else lora]
        if task.method == "lora-head":
            plan.append({"action": "head", "task": task.kind, "pooling": "mean", "hidden": list(task.hidden)})
    data = {
        "model": {"path": files["model"]},
        "plan": plan,
        "data": {"train": files["train"], "validation": files["test"], "kind": task.kind,
                 "max_length": task.max_length, "packing": task.packing,
                 "batch_size": task.packed_rows if task.packing and task.packed_rows else task.batch_size,
                 "eval_batch_size": task.batch_size,
                 "pad_to_multiple_of": task.pad_to_multiple_of, "seed": task.seeds[0]},
        "optimizer": {"learning_rate": task.learning_rate, "weight_decay": task.weight_decay,
                      "warmup_ratio": task.warmup_ratio, "schedule": "cosine", "clip_grad_norm": 1.0,
                      **({"group_lr": {"head": task.head_lr}} if task.head_lr != 1.0 else {})},
        "train": {**({"epochs": task.epochs} if task.packing else {"steps": steps_of(task)}), "progress": False,
                  "log_every": 10, "regression_loss": task.regression_loss, "seed": task.seeds[0]},
        # The PyTorch side scores its base model in every run (no base report from an earlier run here) and fits
        # no baselines (jaxtune's linear probe and TF-IDF would add their time to its whole run only).
        "eval": {"cache_base": False, "baselines": False, **({"choices": list(task.choices)} if task.choices else {})},
        "checkpoint": {"every": 10**9, "keep": 1},
        "output": {"dir": run_dir, "export": "none"},
    }
    return preference_recipe(task, data) if task.kind == "preference" else data


def preference_recipe(task: Task, data: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a preference task: DPO on unpacked pairs (``batch_size`` pairs a step, as TRL
    counts them), the seed of this run."""
    return {**data, "data": {**data["data"], "kind": "preference"},
            "preference": {"method": "dpo", "beta": task.beta},
            "train": {**data["train"], "seed": task.seeds[0]}}


# ----------------------------------------------------------------------------- driver


def keep_freed_memory() -> None:
    """A reference worker's equal-settings arm (``--reference-host-malloc keep``): jaxtune's host-memory
    settings, set before torch starts its threads (an arena binds to a thread at its first allocation);
    the text sides import no jaxtune otherwise, so nothing else would apply them."""
    import jaxtune.host_memory

    if not jaxtune.host_memory.configure():
        raise RuntimeError("JAXTUNE_HOST_MALLOC=keep did not apply (not glibc?)")


def score(task: Task, outputs: list, labels: list) -> dict[str, float]:
    """Metrics of raw predictions with jaxtune's own metric functions."""
    import numpy as np

    from jaxtune.training.evaluate import classification_metrics, regression_metrics

    out, y = np.asarray(outputs, np.float64), np.asarray(labels)
    if task.kind.removeprefix("image-") == "regression":
        return regression_metrics(out.reshape(-1), y)
    metrics = classification_metrics(out, y.astype(np.int64))
    if task.kind == "image-classification":  # the test cross-entropy, as jaxtune's evaluation reports it
        shifted = out - out.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        metrics["loss"] = float(-log_probs[np.arange(len(y)), y.astype(np.int64)].mean())
    return {f"choice_{k}": v for k, v in metrics.items()} if task.kind == "chat" else metrics


def malloc_note(malloc: dict[str, str]) -> str:
    """The host-memory settings a run's sides had, for its output: the comparison is at equal settings
    only with ``--reference-host-malloc keep`` (jaxtune's ``auto`` keeps freed memory on the CPU)."""
    note = f"host malloc (JAXTUNE_HOST_MALLOC): jaxtune {malloc['jaxtune']}, other sides {malloc['other sides']}"
    if malloc["other sides"] == "system":
        note += " (glibc's defaults, not jaxtune's settings: --reference-host-malloc keep compares at equal settings)"
    return note


def headline(task: Task) -> str:
    return {"classification": "accuracy", "regression": "pearson", "chat": "choice_accuracy",
            "image-classification": "accuracy", "image-regression": "mae"}[task.kind]


def run_side(name: str, task: Task, side: str, files: dict[str, Path], work: Path, env: dict[str, str],
             reference_malloc: str = "system") -> dict[str, Any]:
    """One side of one task in a fresh process (the task travels as JSON); its result and wall time.
    ``reference_malloc``: the non-jaxtune sides' ``JAXTUNE_HOST_MALLOC`` (``--reference-host-malloc``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--task-json",
           json.dumps(dataclasses.asdict(task)), "--files", json.dumps({k: str(v) for k, v in files.items()}),
           "--run-dir", str(work / side)]
    if side != "jaxtune":  # as its users run it (glibc's malloc), or with jaxtune's settings (equal-settings arm)
        env = {**env, "JAXTUNE_HOST_MALLOC": reference_malloc}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{name} / {side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "before_outputs" in result:  # raw predictions (PyTorch, baselines), scored here; jaxtune and TRL score their own
        result = {"before": score(task, result.pop("before_outputs"), result["labels"]),
                  "after": score(task, result.pop("after_outputs"), result.pop("labels")), **result}
    return {**result, "wall_s": wall}


def seed_metrics(task: Task | ImageTask) -> tuple[str, ...]:
    """The metrics a task's seeded runs are summarised by (the headline first)."""
    if task.kind == "preference":
        return ("rewards/accuracy", "logps/accuracy", "rewards/margin")
    return (headline(task),)


def run_seeds(name: str, task: Task | ImageTask, files: dict[str, Path], work: Path, env: dict[str, str],
              sides: list[str], log: Path | None = None, reference_malloc: str = "system") -> dict[str, Any]:
    """A task run once per seed and side (``pytorch`` means TRL for a preference task; the image
    baseline is deterministic and runs once); per side the runs and, per metric, the mean and the
    min..max spread over seeds. Each finished run is also appended to ``log`` (JSON lines) at once,
    so that a stopped run of hours keeps the seeds it finished."""
    metrics = seed_metrics(task)
    record: dict[str, Any] = {"task": name, "kind": "seeded", "setup": dataclasses.asdict(task),
                              "metric": metrics[0], "metrics": list(metrics), "sides": {}}
    if task.kind.startswith("image-"):
        sides = [*sides, "baseline"]
    for side in sides:
        side = "trl" if side == "pytorch" and task.kind == "preference" else side
        runs = []
        for seed in task.seeds[:1] if side == "baseline" else task.seeds:
            run = run_side(name, dataclasses.replace(task, seeds=(seed,)), side, files, work / f"seed{seed}", env,
                           reference_malloc)
            runs.append({"seed": seed, **run})
            if log is not None:
                with log.open("a") as fh:
                    fh.write(json.dumps({"date": now(), "task": name, "side": side, **runs[-1]}) + "\n")
            shown = ", ".join(f"{m} {run['before'][m]:.3f} -> {run['after'][m]:.3f}" for m in metrics)
            print(f"{name} / {side} / seed {seed}: {shown}, train {run['train_s']:.0f} s, run {run['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
        record["sides"][side] = {"runs": runs, "summary": summarise(runs)}
    return record


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, before and after, the mean and min..max over a side's seeded runs; the mean
    training and whole-run seconds."""
    import numpy as np

    summary = {}
    for when in ("before", "after"):
        for key in runs[0][when]:
            values = np.asarray([r[when][key] for r in runs], np.float64)
            summary[f"{when}/{key}"] = {"mean": float(values.mean()), "min": float(values.min()),
                                        "max": float(values.max())}
    for key in ("train_s", "wall_s"):
        summary[key] = {"mean": float(np.mean([r[key] for r in runs]))}
    return summary


def merge_records(paths: list[Path]) -> dict[str, Any]:
    """One record from the seeded records of separate runs (one side or a few seeds each, as
    the hours-long tasks are run): per task and side, the runs of every file by seed, and the
    summary over them. A task whose setup differs between files (other than its seeds), or a
    seed of one side found twice, is an error naming both files."""
    tasks: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str, int], Path] = {}
    sources = []
    for path in paths:
        record = json.loads(path.read_text())
        sources.append({"file": str(path), **{k: record.get(k) for k in ("date", "command", "machine", "versions",
                                                                         "load_average_at_start")}})
        for task in record["tasks"]:
            if task.get("kind") != "seeded":
                raise ValueError(f"{path}: task {task['task']!r} is not a seeded record; --merge takes seeded "
                                 "tasks (those run with several --seeds, and preference tasks)")
            # A record written before a field existed lacks it: it ran with that field's default.
            kind = ImageTask if task["setup"]["kind"].startswith("image-") else Task
            setup = {**{f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING},
                     **task["setup"]}
            setup = {k: list(v) if isinstance(v, tuple) else v for k, v in setup.items() if k != "seeds"}
            merged = tasks.setdefault(task["task"], {**task, "setup": {**setup, "seeds": []}, "sides": {},
                                                     "file": path})
            if {k: v for k, v in merged["setup"].items() if k != "seeds"} != setup:
                raise ValueError(f"{path}: task {task['task']!r} was run with another setup than in "
                                 f"{merged['file']}; merge only runs of one setup")
            for side, result in task["sides"].items():
                for run in result["runs"]:
                    key = (task["task"], side, run["seed"])
                    if key in seen:
                        raise ValueError(f"{path}: {side} seed {run['seed']} of {task['task']!r} is also in "
                                         f"{seen[key]}; leave one of the files out")
                    seen[key] = path
                    merged["sides"].setdefault(side, {"runs": []})["runs"].append(run)
    for task in tasks.values():
        del task["file"]
        for result in task["sides"].values():
            result["runs"].sort(key=lambda r: r["seed"])
            result["summary"] = summarise(result["runs"])
        task["setup"]["seeds"] = sorted({r["seed"] for res in task["sides"].values() for r in res["runs"]})
    return {"date": now(), "command": " ".join(sys.argv), "merged_from": sources, "tasks": list(tasks.values())}


def seeded_rows(record: dict[str, Any]) -> list[str]:
    """Table rows of a seeded task: means over seeds with the min..max spread."""
    rows = []
    for side, result in record["sides"].items():
        summary = result["summary"]
        for metric in record["metrics"]:
            before, after = summary.get(f"before/{metric}"), summary.get(f"after/{metric}")
            if before is None or after is None:
                continue
            runs = len(result["runs"])
            rows.append(f"| {record['task']} | {side} ({runs} seed{'s' if runs > 1 else ''}) | {metric} | "
                        f"{before['mean']:.3f} | {after['mean']:.3f} ({after['min']:.3f}..{after['max']:.3f}) | "
                        f"{result['runs'][0]['steps']} | {summary['train_s']['mean']:.0f} s | "
                        f"{summary['wall_s']['mean']:.0f} s |")
    return rows


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| task | side | metric | base | fine-tuned | steps | train wall | whole run |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("kind") == "seeded":
            rows += seeded_rows(r)
            continue
        metric = r["metric"]
        for side, s in r["sides"].items():
            rows.append(f"| {r['task']} | {side} | {metric} | {s['before'][metric]:.3f} | {s['after'][metric]:.3f} | "
                        f"{s['steps']} | {s['train_s']:.0f} s | {s['wall_s']:.0f} s |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--smoke", action="store_true", help="16 train / 16 test rows per task")
    ap.add_argument("--train-size", type=int, default=None, metavar="N",
                    help="training rows of every text task (a shorter run, to compare step times)")
    ap.add_argument("--test-size", type=int, default=None, metavar="N", help="held-out rows of every text task")
    ap.add_argument("--sides", default="jaxtune,pytorch")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for every task (default: each task's own)")
    ap.add_argument("--static-padding", action="store_true",
                    help="jaxtune pads every row to max_length (one compilation) instead of per batch")
    ap.add_argument("--packing", action="store_true",
                    help="jaxtune packs the examples several per row, each task's packed_rows rows a step (about "
                    "its batch_size examples; PyTorch pads each batch to its longest row)")
    ap.add_argument("--packed-rows", type=int, default=None,
                    help="with --packing: rows per step for every task (default: each task's packed_rows)")
    ap.add_argument("--paired", action="store_true",
                    help="image tasks: no dropout or drop-connect on either side; PyTorch reads jaxtune's row order "
                    "and starts from its head init (differences are of method, not seed)")
    ap.add_argument("--recalibrate", type=int, default=0, metavar="N",
                    help="image tasks: the trained blocks' BatchNorm statistics train and are re-estimated over N "
                    "training batches after training, on both sides")
    ap.add_argument("--reference-host-malloc", choices=("system", "keep"), default="system",
                    help="JAXTUNE_HOST_MALLOC of the PyTorch, TRL and baseline sides: system (glibc's defaults, as "
                    "their users run them) or keep (jaxtune's settings on the CPU: the comparison at equal settings)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality.json); seeded tasks "
                    "also append each finished run to its .runs.jsonl sibling as it ends")
    ap.add_argument("--work", default=None, help="folder for rows and runs (default: a temporary one)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the seeded records of separate runs (per side, per seed) into one record at "
                    "--out and print its table; runs nothing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one side of one task
    ap.add_argument("--task-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--files", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge:
        if not args.out:
            ap.error("--merge writes the combined record to --out; give its path")
        try:
            merged = merge_records([Path(p) for p in args.merge])
        except (OSError, ValueError, KeyError) as err:
            ap.error(f"--merge: {err}")
        Path(args.out).write_text(json.dumps(merged, indent=2))
        print(table(merged["tasks"]))
        return
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS and n not in IMAGE_TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {', '.join([*TASKS, *IMAGE_TASKS])}")
    chosen = {n: TASKS.get(n) or IMAGE_TASKS[n] for n in names}
    tasks = {n: smoke(t) if args.smoke else t for n, t in chosen.items()}
    sizes = {k: v for k, v in (("train", args.train_size), ("test", args.test_size)) if v is not None}
    if sizes:
        if any(isinstance(t, ImageTask) for t in tasks.values()):
            ap.error("--train-size and --test-size apply to the text tasks; the image tasks have their own splits")
        tasks = {n: dataclasses.replace(t, **sizes) for n, t in tasks.items()}
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        tasks = {n: dataclasses.replace(t, seeds=seeds) for n, t in tasks.items()}
    if args.static_padding:
        tasks = {n: dataclasses.replace(t, pad_to_multiple_of=None) for n, t in tasks.items()}
    if args.paired:
        if not any(isinstance(t, ImageTask) for t in tasks.values()):
            ap.error("--paired applies to the image tasks (fashion-mnist-lite0, count-lite0); choose one with --tasks")
        tasks = {n: dataclasses.replace(t, paired=True) if isinstance(t, ImageTask) else t for n, t in tasks.items()}
    if args.recalibrate:
        if not any(isinstance(t, ImageTask) for t in tasks.values()):
            ap.error("--recalibrate applies to the image tasks (fashion-mnist-lite0, count-lite0); choose one with "
                     "--tasks")
        tasks = {n: dataclasses.replace(t, recalibrate=args.recalibrate, frozen_statistics=False)
                 if isinstance(t, ImageTask) else t for n, t in tasks.items()}
    if args.packing:
        tasks = {n: dataclasses.replace(t, packing=True, packed_rows=args.packed_rows or t.packed_rows)
                 if t.kind in ("classification", "regression", "chat") else t for n, t in tasks.items()}
    if args.worker:
        if args.worker != "jaxtune" and os.environ.get("JAXTUNE_HOST_MALLOC") == "keep":
            keep_freed_memory()
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # grain reads absl flags
        fields = json.loads(args.task_json)
        image = fields["kind"].startswith("image-")
        task = (ImageTask if image else Task)(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        files = json.loads(args.files)
        if args.worker == "trl":
            result = trl_side(task, files, args.run_dir)
        elif image:
            result = image_worker(args.worker, task, files, args.run_dir)
        else:
            result = jaxtune_side(task, files, args.run_dir) if args.worker == "jaxtune" else torch_side(task, files)
        print(json.dumps(result))
        return

    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="jaxtune-quality-"))
    env = worker_env()
    malloc = {"jaxtune": os.environ.get("JAXTUNE_HOST_MALLOC", "auto"), "other sides": args.reference_host_malloc}
    record = {"date": now(), "command": " ".join(sys.argv), "machine": machine(), "versions": versions(),
              "load_average_at_start": load_average(), "host_malloc": malloc, "tasks": []}
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quality-smoke.json" if args.smoke else "quality.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, task in tasks.items():
        image = isinstance(task, ImageTask)
        files = write_image_data(task, work / name) if image else write_rows(task, work / name)
        if len(task.seeds) > 1 or task.kind == "preference":
            record["tasks"].append(run_seeds(name, task, files, work / name, env, args.sides.split(","),
                                             log=out.with_suffix(".runs.jsonl"),
                                             reference_malloc=args.reference_host_malloc))
            continue
        sides = {}
        for side in args.sides.split(",") + (["baseline"] if image else []):
            sides[side] = run_side(name, task, side, files, work / name, env, args.reference_host_malloc)
            s = sides[side]
            print(f"{name} / {side}: {headline(task)} {s['before'][headline(task)]:.3f} -> "
                  f"{s['after'][headline(task)]:.3f}, train {s['train_s']:.0f} s, run {s['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
        record["tasks"].append({"task": name, "setup": dataclasses.asdict(task), "metric": headline(task),
                                "sides": sides})
    out.write_text(json.dumps(record, indent=2))
    print(table(record["tasks"]))
    print(f"\n{record['date']}, {record['machine']}; {malloc_note(malloc)}; JSON {out}")


if __name__ == "__main__":
    main()

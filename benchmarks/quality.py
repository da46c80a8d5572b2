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
differs (each side shuffles with its own seeded generator).

Metrics come from one place, :mod:`jaxtune.training.evaluate`: the PyTorch worker returns raw
predictions and the driver scores them with the functions jaxtune itself uses. Per side: base
(pretrained body + fresh head/adapters) and fine-tuned metrics, training wall time (first step
and compile included) and the whole run's wall time (loading, both evaluations, training).

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

Image tasks (``IMAGE_TASKS``; not in the default list, run them with ``--tasks``): EfficientNet-Lite0
(real ImageNet weights) with its last 6 blocks, head conv and a new head trained; the BatchNorms of
the trained modules normalise with batch statistics and update their running ones (PyTorch's
``model.train()`` on them), the frozen stages' stay as pretrained. The PyTorch side is the
reference package ``efficientnet-lite-pytorch`` with the same plan, and a third side,
``baseline``, fits logistic regression (classification) or ridge regression (counting) on the
frozen pretrained features (mean-pooled, from the PyTorch model).
  fashion-mnist-lite0  Fashion-MNIST, 2,000 train / 1,000 test (stratified), 224x224, 3 epochs, accuracy;
                       3 seeds per side (head init, dropout and row order), for the run-to-run spread.
  count-lite0          84x84 canvases with 0-5 Fashion-MNIST items, regress the count, MAE; BatchNorm
                       statistics stay pretrained everywhere (updated ones lag the weights over 125
                       steps and cost the regression: benchmarks/RESULTS.md).
  --paired             (image tasks) the same run on both sides but for float drift: no dropout or
                       drop-connect, and PyTorch reads grain's row order and starts its new head from
                       jaxtune's initial head, so a difference in the result is one of method, not of seed.
  --recalibrate N      (image tasks) the trained blocks' BatchNorm statistics train (also counting's) and
                       are re-estimated for the final weights over the first N batches of each side's
                       epoch-1 order before the final evaluation: jaxtune's train.recalibrate_batch_norm,
                       PyTorch's BatchNorm2d(momentum=None) over the same pass (swa_utils.update_bn's method).

  smollm2-dpo-lora   SmolLM2-135M-Instruct + rotten_tomatoes_preference (the chat task's reviews,
                     the true sentiment word preferred over the wrong one; 800 / 400 pairs):
                     LoRA-DPO (r8 on q,k,v,o, beta 0.1) against TRL's DPOTrainer (reference: the
                     model with adapters off, as jaxtune's), 3 seeds per side for TRL's
                     run-to-run spread. Held-out rewards/accuracy (0 for the base model on both
                     sides: policy == reference) and logps/accuracy (how often the model itself
                     prefers the true word; comparable between base and tuned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, load_average, machine, now, versions, worker_env


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


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """One image fine-tuning task (see the module docstring), as every side runs it."""

    model: str  # a packaged image model (efficientnet-lite0)
    dataset: str  # fashion_mnist | fashion_mnist_count
    kind: str  # image-classification | image-regression
    train: int
    test: int
    batch_size: int
    learning_rate: float
    last_blocks: int = 6  # blocks that train (with the head conv and the new head)
    head_lr: float = 3.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: int = 1
    regression_loss: str = "mse"
    seeds: tuple[int, ...] = (0,)  # one run per seed and side (head init, dropout, row order)
    frozen_statistics: bool = False  # BatchNorm statistics stay pretrained in the trained blocks too
    paired: bool = False  # --paired: no random parts; PyTorch takes jaxtune's row order and head init
    recalibrate: int = 0  # --recalibrate N: re-estimate the trained statistics over N batches after training


IMAGE_TASKS: dict[str, ImageTask] = {
    "fashion-mnist-lite0": ImageTask("efficientnet-lite0", "fashion_mnist", "image-classification", 2000, 1000, 32,
                                     1e-3, epochs=3, seeds=(0, 1, 2)),
    "count-lite0": ImageTask("efficientnet-lite0", "fashion_mnist_count", "image-regression", 2000, 1000, 32, 1e-3,
                             epochs=2, regression_loss="huber", frozen_statistics=True),
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


def write_learning_rates(task: Task, folder: Path) -> Path:
    """jaxtune's learning-rate schedule for ``task``, step by step, as JSON: the PyTorch side
    follows these values, so both sides run one schedule function."""
    from jaxtune.training.optim import OptimizerConfig, make_schedule

    total = steps_of(task)
    schedule = make_schedule(OptimizerConfig(learning_rate=task.learning_rate, warmup_ratio=task.warmup_ratio,
                                             schedule="cosine"), total)
    path = folder / "learning_rates.json"
    path.write_text(json.dumps([float(schedule(step)) for step in range(total)]))
    return path


def steps_of(task: Task) -> int:
    return task.train * task.epochs // task.batch_size


# ----------------------------------------------------------------------------- jaxtune side (worker)


def jaxtune_side(task: Task, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The task through ``jaxtune.finetune``; returns metrics and timings."""
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
                 "pad_to_multiple_of": task.pad_to_multiple_of},
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
    if task.kind == "preference":
        data = preference_recipe(task, data)
    return timed_finetune(data)


def timed_finetune(data: dict[str, Any]) -> dict[str, Any]:
    """``jaxtune.finetune`` of a recipe written as data; its metrics, steps and training time."""
    import logging

    from jaxtune import config as config_lib
    from jaxtune.recipe import finetune

    marks: dict[str, float] = {}

    class Marks(logging.Handler):
        """Training time: from the base model's score to the start of the final evaluation."""

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("base:"):
                marks["train_start"] = time.perf_counter()
            elif message.startswith("evaluating the fine-tuned"):
                marks["train_end"] = time.perf_counter()

    logging.getLogger("jaxtune").addHandler(Marks())
    result = finetune(config_lib.validate(config_lib.from_data(config_lib.Config, data)))
    return {"before": result.before, "after": result.after, "steps": result.step,
            "train_s": marks["train_end"] - marks["train_start"]}


def preference_recipe(task: Task, data: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a preference task: DPO on unpacked pairs (``batch_size`` pairs a step, as TRL
    counts them), the seed of this run."""
    return {**data, "data": {**data["data"], "kind": "preference"},
            "preference": {"method": "dpo", "beta": task.beta},
            "train": {**data["train"], "seed": task.seeds[0]}}


# ----------------------------------------------------------------------------- PyTorch side (worker)


def torch_side(task: Task, files: dict[str, str]) -> dict[str, Any]:
    """The same task written the usual way with transformers + PEFT; returns raw predictions."""
    import numpy as np
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    directory = files["model"]  # no jaxtune import here: JAX's thread pool in the process slows torch
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = {split: [json.loads(line) for line in Path(files[split]).read_text(encoding="utf-8").splitlines()]
            for split in ("train", "test")}
    labels = sorted({r["label"] for r in rows["train"]}) if task.kind == "classification" else None

    if task.kind == "chat":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=task.rank, lora_alpha=task.alpha, lora_dropout=0.0,
                                                           target_modules=list(task.lora_targets)))
        head_params: list[torch.nn.Parameter] = []
    elif task.method == "full-pooler":
        model = transformers.BertForSequenceClassification.from_pretrained(directory, num_labels=len(labels))
        head_params = list(model.classifier.parameters())
    else:
        body = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False)
        body = peft.get_peft_model(body, peft.LoraConfig(r=task.rank, lora_alpha=task.alpha, lora_dropout=0.0,
                                                         target_modules=["query", "key", "value", "dense"]))
        model = mean_pool_model(body, len(labels) if labels else 1, task.hidden, body.config.hidden_dropout_prob)
        head_params = list(model.head.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    groups = []
    for is_head in (False, True):
        for decay in (True, False):
            params = [p for p in trainable if (id(p) in head_ids) == is_head and (p.ndim >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": task.weight_decay if decay else 0.0,
                               "lr_scale": task.head_lr if is_head else 1.0})
    optimizer = torch.optim.AdamW(groups, lr=task.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())
    total = len(learning_rates)

    def encode(batch_rows: list[dict], *, for_eval: bool) -> dict[str, torch.Tensor]:
        if task.kind != "chat":
            enc = tokenizer([r["text"] for r in batch_rows], truncation=True, max_length=task.max_length,
                            padding=True, return_tensors="pt")
            if task.kind == "classification":
                enc["labels"] = torch.tensor([labels.index(r["label"]) for r in batch_rows])
            else:
                enc["labels"] = torch.tensor([float(r["target"]) for r in batch_rows])
            return enc
        if for_eval:  # the prompt only, left-padded: the next token's logits are at the end
            prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                       for r in batch_rows]
            tokenizer.padding_side = "left"
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            return enc
        ids, targets = [], []
        for r in batch_rows:  # prompt tokens get label -100: loss on the assistant's answer only
            prompt = tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(r["messages"], tokenize=False)
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            a = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False).input_ids
            ids.append((p + a)[:task.max_length])
            targets.append(([-100] * len(p) + a)[:task.max_length])
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                "labels": torch.tensor([y + [-100] * (width - len(y)) for y in targets])}

    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in task.choices]

    @torch.no_grad()
    def predict() -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        outputs, truth = [], []
        for i in range(0, len(rows["test"]), task.batch_size):
            batch_rows = rows["test"][i:i + task.batch_size]
            enc = encode(batch_rows, for_eval=True)
            if task.kind == "chat":
                logits = model(**enc).logits[:, -1, choice_ids]
                truth += [task.choices.index(r["messages"][-1]["content"]) for r in batch_rows]
            else:
                target = enc.pop("labels")
                logits = model(**enc).logits
                truth += target.tolist()
            outputs.append(logits.float().numpy())
        model.train()
        return np.concatenate(outputs), np.asarray(truth)

    start = time.perf_counter()
    before = predict()
    train_start = time.perf_counter()
    model.train()
    order = torch.randperm(len(rows["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    losses = []
    for step in range(total):
        idx = order[step * task.batch_size:(step + 1) * task.batch_size]
        enc = encode([rows["train"][i] for i in idx], for_eval=False)
        target = enc.pop("labels")
        logits = model(**enc).logits
        if task.kind == "chat":
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(),
                                                     ignore_index=-100)
        elif task.kind == "classification":
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
        else:
            pred = logits.float().reshape(-1)
            loss = (torch.nn.functional.huber_loss(pred, target, delta=1.0) if task.regression_loss == "huber"
                    else torch.nn.functional.mse_loss(pred, target))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rates[step] * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    train_s = time.perf_counter() - train_start
    after = predict()
    return {"before_outputs": before[0].tolist(), "after_outputs": after[0].tolist(), "labels": before[1].tolist(),
            "steps": total, "train_s": train_s, "eval_and_train_s": time.perf_counter() - start,
            "last_losses": losses[-5:]}


def trl_side(task: Task, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """A preference task with TRL's ``DPOTrainer`` on a PEFT LoRA model (the reference is the model
    with the adapter off, TRL's default for a PEFT model), jaxtune's learning rates step by step;
    returns TRL's evaluation metrics before and after training (renamed to jaxtune's keys) and
    logps/accuracy from the same evaluation's per-pair log-probs."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    seed = task.seeds[0]
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    directory = files["model"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=task.rank, lora_alpha=task.alpha, lora_dropout=0.0,
                                                       target_modules=list(task.lora_targets)))
    splits = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in Path(files[split]).read_text(encoding="utf-8").splitlines()]
        splits[split] = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                    for r in rows])
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=task.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rates[min(step, len(learning_rates) - 1)] / task.learning_rate)
    args = trl.DPOConfig(output_dir=run_dir, per_device_train_batch_size=task.batch_size,
                         per_device_eval_batch_size=task.batch_size, max_steps=len(learning_rates),
                         learning_rate=task.learning_rate, beta=task.beta, max_length=task.max_length,
                         max_grad_norm=1.0, logging_steps=10, report_to=[], seed=seed, data_seed=seed,
                         save_strategy="no", eval_strategy="no", use_cpu=True, dataloader_num_workers=0,
                         gradient_checkpointing=False)  # jaxtune's run keeps activations too (remat: none)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["test"],
                             processing_class=tokenizer, optimizers=(optimizer, schedule))
    names = {"eval_loss": "loss", "eval_rewards/accuracies": "rewards/accuracy", "eval_rewards/margins":
             "rewards/margin", "eval_logps/chosen": "logps/chosen", "eval_logps/rejected": "logps/rejected"}

    def evaluate() -> dict[str, float]:
        metrics = trainer.evaluate()
        out = {ours: float(metrics[theirs]) for theirs, ours in names.items() if theirs in metrics}
        out["logps/accuracy"] = preference_logps_accuracy(model, tokenizer, splits["test"], task.max_length)
        return out

    start = time.perf_counter()
    before = evaluate()
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    after = evaluate()
    return {"before": before, "after": after, "steps": len(learning_rates), "train_s": train_s,
            "eval_and_train_s": time.perf_counter() - start}


def preference_logps_accuracy(model: Any, tokenizer: Any, pairs: Any, max_length: int) -> float:
    """The share of pairs whose chosen answer ``model`` finds more likely (summed answer log-probs
    under the chat template), jaxtune's ``logps/accuracy``; TRL reports only means of log-probs."""
    import torch

    wins = []
    model.eval()
    with torch.no_grad():
        for pair in pairs:
            prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            scores = []
            for side in ("chosen", "rejected"):
                full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
                a = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False).input_ids
                ids = torch.tensor([(p + a)[:max_length]])
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                picked = logps.gather(-1, ids[0, 1:, None])[:, 0]
                scores.append(float(picked[len(p) - 1:].sum()))
            wins.append(scores[0] > scores[1])
    model.train()
    return sum(wins) / max(len(wins), 1)


def mean_pool_model(body: Any, outputs: int, hidden: tuple[int, ...], dropout: float) -> Any:
    """A BERT body + masked mean pooling + (dropout, Linear, GELU)* + dropout + Linear: the
    module jaxtune's ``{action: head, pooling: mean, hidden: [...]}`` builds, initialised the
    same way (normal(0.02) weights, zero biases). Returns an ``nn.Module`` whose output has
    ``.logits`` ``(B, outputs)``."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPoolModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            layers: list[torch.nn.Module] = []
            width = body.config.hidden_size
            for w in hidden:
                layers += [torch.nn.Dropout(dropout), torch.nn.Linear(width, w), torch.nn.GELU()]
                width = w
            layers += [torch.nn.Dropout(dropout), torch.nn.Linear(width, outputs)]
            self.head = torch.nn.Sequential(*layers)
            for m in self.head:
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=0.02)
                    torch.nn.init.zeros_(m.bias)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            states = self.body(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask[..., None].to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return SequenceClassifierOutput(logits=self.head(pooled))

    return MeanPoolModel()


# ----------------------------------------------------------------------------- image tasks


def write_image_data(task: ImageTask, folder: Path) -> dict[str, Path]:
    """The prepared image splits (.npz) every side reads, the model directory, the schedule."""
    from jaxtune.data import image_datasets
    from jaxtune.models.assets import fetch_model

    prepare = {"fashion_mnist": image_datasets.prepare_fashion_mnist,
               "fashion_mnist_count": image_datasets.prepare_fashion_mnist_count}[task.dataset]
    prepared = prepare(train_size=task.train, test_size=task.test)
    folder.mkdir(parents=True, exist_ok=True)
    model = fetch_model(task.model)
    if task.paired:  # the model directory with its dropout and drop-connect rates at 0
        quiet = folder / "model-without-random-parts"
        shutil.copytree(model, quiet, dirs_exist_ok=True)
        config = json.loads((model / "config.json").read_text())
        (quiet / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0, "drop_connect_rate": 0.0}))
        model = quiet
    return {"train": prepared.train, "test": prepared.test, "model": model,
            "learning_rates": write_learning_rates(task, folder)}


def _jaxtune_start(task: ImageTask, files: dict[str, str], train: Any) -> tuple[Any, Any]:
    """What ``--paired`` gives PyTorch from jaxtune's run: the row order of each epoch (grain's, as
    jaxtune's image loader shuffles; checked against that loader's first batch) and the new head's
    initial ``(kernel (1280, K), bias (K,))`` (``apply_plan`` with the run's key, as the recipe does)."""
    import grain
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning
    from jaxtune.data import LoaderConfig
    from jaxtune.data.images import ImageSpec, image_loader
    from jaxtune.models import hf

    seed, n = task.seeds[0], len(train)
    shuffled = grain.MapDataset.range(n).seed(seed).shuffle().repeat(None)
    order = np.concatenate([[shuffled[e * n + i] for i in range(n)] for e in range(task.epochs)])
    first = next(iter(image_loader(train, ImageSpec.from_model_dir(224, 3, files["model"]),
                                   LoaderConfig(batch_size=task.batch_size, seed=seed), train=True)))
    if not np.array_equal(first["labels"], train.labels[order[:task.batch_size]]):
        raise RuntimeError("--paired: grain's row order here is not the one jaxtune's image loader reads")
    plan = tuning.Plan.from_data(jaxtune_image_recipe(task, files, "")["plan"])
    tuned = tuning.apply_plan(hf.load_pretrained(files["model"]), plan, jax.random.key(seed), data=train)
    flat = flatten_dict(tuned.params)
    return order, (np.asarray(flat[("head", "out", "kernel")]), np.asarray(flat[("head", "out", "bias")]))


def jaxtune_image_side(task: ImageTask, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The image task through ``jaxtune.finetune``."""
    return timed_finetune(jaxtune_image_recipe(task, files, run_dir))


def jaxtune_image_recipe(task: ImageTask, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """The image task as a jaxtune recipe (the data of a YAML file)."""
    kind = task.kind.removeprefix("image-")
    return {
        "model": {"path": files["model"]},
        "plan": [{"preset": "freeze_all_but", "last_n_blocks": task.last_blocks},
                 *([{"action": "freeze", "match": "running_(mean|var)$"}] if task.frozen_statistics else []),
                 {"action": "head", "task": kind}],
        "data": {"train": files["train"], "validation": files["test"], "kind": kind, "images": True,
                 "batch_size": task.batch_size, "seed": task.seeds[0]},
        "optimizer": {"learning_rate": task.learning_rate, "weight_decay": task.weight_decay,
                      "warmup_ratio": task.warmup_ratio, "schedule": "cosine", "clip_grad_norm": 1.0,
                      "group_lr": {"head": task.head_lr}},
        "train": {"steps": steps_of(task), "progress": False, "log_every": 10, "regression_loss": task.regression_loss,
                  "seed": task.seeds[0], "recalibrate_batch_norm": task.recalibrate},
        "eval": {"cache_base": False},  # the PyTorch side scores its base model in every run too
        "checkpoint": {"every": 10**9, "keep": 1},
        "output": {"dir": run_dir, "export": "none"},
    }


def _image_inputs(task: ImageTask, files: dict[str, str]) -> tuple[Any, Any, Any]:
    """Both splits (jaxtune's readers) and a function of indices -> pixel tensors (jaxtune's
    ``ToPixels``: the same resize and normalisation for every side)."""
    import numpy as np
    import torch

    from jaxtune.data.images import ImageSpec, ToPixels, read_images

    kind = task.kind.removeprefix("image-")
    train = read_images(files["train"], kind)
    test = read_images(files["test"], kind, labels=train.label_names)
    to_pixels = ToPixels(ImageSpec.from_model_dir(224, 3, files["model"]))

    def pixels(source: Any, idx: Any) -> Any:
        return torch.from_numpy(np.stack([to_pixels.pixels(source[int(i)])["pixel_values"] for i in idx]))

    return train, test, pixels


def _reference_lite0(task: ImageTask) -> Any:
    from efficientnet_lite_pytorch import EfficientNet

    from jaxtune.assets import ASSETS, package_path

    return EfficientNet.from_pretrained(task.model, weights_path=str(package_path(ASSETS[task.model])))


def torch_image_side(task: ImageTask, files: dict[str, str]) -> dict[str, Any]:
    """The same plan on the reference PyTorch EfficientNet-Lite0: the last blocks, head conv and
    a new linear head train; the BatchNorms of those modules run in train mode (batch statistics,
    running ones updated), the frozen stages' in eval mode."""
    import numpy as np
    import torch

    seed = task.seeds[0]
    torch.manual_seed(seed)
    kind = task.kind.removeprefix("image-")
    train, test, pixels = _image_inputs(task, files)
    model = _reference_lite0(task)
    for p in model.parameters():
        p.requires_grad = False
    for module in (*model._blocks[-task.last_blocks:], model._conv_head, model._bn1):
        for p in module.parameters():
            p.requires_grad = True
    model._fc = torch.nn.Linear(1280, len(train.label_names) if kind == "classification" else 1)
    torch.nn.init.normal_(model._fc.weight, std=0.02)  # jaxtune's head init, as the text side's heads
    torch.nn.init.zeros_(model._fc.bias)
    if task.paired:
        model._dropout.p = 0.0
        model._global_params = model._global_params._replace(drop_connect_rate=0.0)
        order, (kernel, bias) = _jaxtune_start(task, files, train)
        order = order.tolist()
        with torch.no_grad():
            model._fc.weight.copy_(torch.from_numpy(kernel.T.copy()))
            model._fc.bias.copy_(torch.from_numpy(bias.copy()))
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(task.epochs)]).tolist()
    head = {id(p) for p in model._fc.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": ps, "weight_decay": task.weight_decay if decay else 0.0,
               "lr_scale": task.head_lr if is_head else 1.0}
              for is_head in (False, True) for decay in (True, False)
              if (ps := [p for p in trainable if (id(p) in head) == is_head and (p.ndim >= 2) == decay])]
    optimizer = torch.optim.AdamW(groups, lr=task.learning_rate)
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())

    def train_mode() -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and (task.frozen_statistics or not m.weight.requires_grad):
                m.eval()  # pretrained statistics (a frozen stage computes the pretrained features)

    def predict() -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return np.concatenate([model(pixels(test, range(i, min(i + 64, len(test))))).numpy()
                                   for i in range(0, len(test), 64)])

    before = predict()
    train_start = time.perf_counter()
    train_mode()
    for step, lr in enumerate(learning_rates):
        idx = order[step * task.batch_size:(step + 1) * task.batch_size]
        out = model(pixels(train, idx)).float()
        target = torch.from_numpy(train.labels[idx])
        if kind == "classification":
            loss = torch.nn.functional.cross_entropy(out, target.long())
        else:
            loss = (torch.nn.functional.huber_loss(out.reshape(-1), target, delta=1.0)
                    if task.regression_loss == "huber" else torch.nn.functional.mse_loss(out.reshape(-1), target))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if task.recalibrate:  # the trained BatchNorms average the statistics of the epoch's first batches
        model.eval()  # no dropout or drop-connect: the network evaluation runs
        trained = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad]
        for m in trained:
            m.reset_running_stats()
            m.momentum = None  # the cumulative average
            m.train()
        with torch.no_grad():
            for step in range(task.recalibrate):
                model(pixels(train, order[step * task.batch_size:(step + 1) * task.batch_size]))
    train_s = time.perf_counter() - train_start
    return {"before_outputs": before.tolist(), "after_outputs": predict().tolist(), "labels": test.labels.tolist(),
            "steps": len(learning_rates), "train_s": train_s}


def baseline_image_side(task: ImageTask, files: dict[str, str]) -> dict[str, Any]:
    """Frozen pretrained features (mean-pooled, PyTorch reference) + logistic / ridge regression."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression, Ridge

    train, test, pixels = _image_inputs(task, files)
    model = _reference_lite0(task).eval()

    def features(source: Any) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([model.extract_features(pixels(source, range(i, min(i + 64, len(source)))))
                                   .mean(dim=(2, 3)).numpy() for i in range(0, len(source), 64)])

    start = time.perf_counter()
    x_train, x_test = features(train), features(test)
    if task.kind == "image-classification":
        fit = LogisticRegression(max_iter=2000).fit(x_train, train.labels)
        outputs = fit.predict_log_proba(x_test)
    else:
        outputs = Ridge(alpha=1.0).fit(x_train, train.labels).predict(x_test)[:, None]
    return {"before_outputs": outputs.tolist(), "after_outputs": outputs.tolist(), "labels": test.labels.tolist(),
            "steps": 0, "train_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- driver


def score(task: Task, outputs: list, labels: list) -> dict[str, float]:
    """Metrics of raw predictions with jaxtune's own metric functions."""
    import numpy as np

    from jaxtune.training.evaluate import classification_metrics, regression_metrics

    out, y = np.asarray(outputs, np.float64), np.asarray(labels)
    if task.kind.removeprefix("image-") == "regression":
        return regression_metrics(out.reshape(-1), y)
    metrics = classification_metrics(out, y.astype(np.int64))
    return {f"choice_{k}": v for k, v in metrics.items()} if task.kind == "chat" else metrics


def headline(task: Task) -> str:
    return {"classification": "accuracy", "regression": "pearson", "chat": "choice_accuracy",
            "image-classification": "accuracy", "image-regression": "mae"}[task.kind]


def run_side(name: str, task: Task, side: str, files: dict[str, Path], work: Path, env: dict[str, str]
             ) -> dict[str, Any]:
    """One side of one task in a fresh process (the task travels as JSON); its result and wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--task-json",
           json.dumps(dataclasses.asdict(task)), "--files", json.dumps({k: str(v) for k, v in files.items()}),
           "--run-dir", str(work / side)]
    if side != "jaxtune":  # the reference runs as its users run it: glibc's malloc (it imports jaxtune for data)
        env = {**env, "JAXTUNE_HOST_MALLOC": "system"}
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
              sides: list[str], log: Path | None = None) -> dict[str, Any]:
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
            run = run_side(name, dataclasses.replace(task, seeds=(seed,)), side, files, work / f"seed{seed}", env)
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
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # grain reads absl flags
        fields = json.loads(args.task_json)
        image = fields["kind"].startswith("image-")
        task = (ImageTask if image else Task)(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        files = json.loads(args.files)
        if args.worker == "trl":
            result = trl_side(task, files, args.run_dir)
        elif image:
            side = {"jaxtune": lambda: jaxtune_image_side(task, files, args.run_dir),
                    "pytorch": lambda: torch_image_side(task, files),
                    "baseline": lambda: baseline_image_side(task, files)}
            result = side[args.worker]()
        else:
            result = jaxtune_side(task, files, args.run_dir) if args.worker == "jaxtune" else torch_side(task, files)
        print(json.dumps(result))
        return

    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="jaxtune-quality-"))
    env = worker_env()
    record = {"date": now(), "command": " ".join(sys.argv), "machine": machine(), "versions": versions(),
              "load_average_at_start": load_average(), "tasks": []}
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quality-smoke.json" if args.smoke else "quality.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, task in tasks.items():
        image = isinstance(task, ImageTask)
        files = write_image_data(task, work / name) if image else write_rows(task, work / name)
        if len(task.seeds) > 1 or task.kind == "preference":
            record["tasks"].append(run_seeds(name, task, files, work / name, env, args.sides.split(","),
                                             log=out.with_suffix(".runs.jsonl")))
            continue
        sides = {}
        for side in args.sides.split(",") + (["baseline"] if image else []):
            sides[side] = run_side(name, task, side, files, work / name, env)
            s = sides[side]
            print(f"{name} / {side}: {headline(task)} {s['before'][headline(task)]:.3f} -> "
                  f"{s['after'][headline(task)]:.3f}, train {s['train_s']:.0f} s, run {s['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
        record["tasks"].append({"task": name, "setup": dataclasses.asdict(task), "metric": headline(task),
                                "sides": sides})
    out.write_text(json.dumps(record, indent=2))
    print(table(record["tasks"]))
    print(f"\n{record['date']}, {record['machine']}; JSON {out}")


if __name__ == "__main__":
    main()

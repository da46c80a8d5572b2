"""The PyTorch side of the quality benchmark's text tasks (``quality.py``), run as its workers:
each task written the usual way with transformers + PEFT (:func:`torch_side`), and preference
tasks with TRL's ``DPOTrainer`` (:func:`trl_side`). Both read the rows and the learning-rate
schedule the driver wrote for jaxtune's side; :func:`torch_side` returns raw predictions, which
the driver scores with jaxtune's own metric functions."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import adamw_kind, torch_adamw

if TYPE_CHECKING:
    from quality import Task


def torch_side(task: Task, files: dict[str, str]) -> dict[str, Any]:
    """The same task written the usual way with transformers + PEFT; returns raw predictions."""
    import numpy as np
    import peft
    import torch
    import transformers

    seed = task.seeds[0]  # as jaxtune's side: the new head's or adapters' init and the row order
    torch.manual_seed(seed)
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
    optimizer = torch_adamw(groups, lr=task.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())
    total = len(learning_rates)

    def encode(batch_rows: list[dict], *, for_eval: bool) -> dict[str, torch.Tensor]:
        return encode_rows(task, tokenizer, labels, batch_rows, for_eval=for_eval)

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
    order = train_order(len(rows["train"]), seed)
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
            "last_losses": losses[-5:], "adamw": adamw_kind(optimizer)}


def train_order(n: int, seed: int = 0) -> list[int]:
    """The PyTorch text side's row order: one permutation of the ``n`` training rows, drawn from ``seed`` (the
    run's, as jaxtune's side reshuffles with its own)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def encode_rows(task: Task, tokenizer: Any, labels: list | None, batch_rows: list[dict], *, for_eval: bool
                ) -> dict[str, Any]:
    """One batch as the PyTorch text side feeds it: padded to its longest row (``attention_mask`` marks the
    real tokens); chat rows for training with labels on the answer only, for evaluation the left-padded
    prompt."""
    import torch

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


def trl_side(task: Task, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """A preference task with TRL's ``DPOTrainer`` on a PEFT LoRA model (the reference is the model
    with the adapter off, TRL's default for a PEFT model), jaxtune's learning rates step by step;
    returns TRL's evaluation metrics before and after training (renamed to jaxtune's keys) and
    logps/accuracy, which TRL does not report, from the per-pair log-probs of TRL's own evaluation
    forwards (:func:`policy_logps_accuracy`): no extra pass, so TRL's timed run holds TRL's work only."""
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
    optimizer = torch_adamw([p for p in model.parameters() if p.requires_grad], lr=task.learning_rate,
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
        sums: list[Any] = []  # each fused forward's per-sequence summed answer log-probs, in call order
        hook = model.get_base_model().register_forward_hook(
            lambda _module, _args, output: sums.append(output.log_probs.detach().sum(-1))
            if getattr(output, "log_probs", None) is not None else None)
        try:
            metrics = trainer.evaluate()
        finally:
            hook.remove()
        out = {ours: float(metrics[theirs]) for theirs, ours in names.items() if theirs in metrics}
        out["logps/accuracy"] = policy_logps_accuracy(sums, len(splits["test"]), metrics["eval_logps/chosen"])
        return out

    start = time.perf_counter()
    before = evaluate()
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    after = evaluate()
    return {"before": before, "after": after, "steps": len(learning_rates), "train_s": train_s,
            "eval_and_train_s": time.perf_counter() - start, "adamw": adamw_kind(optimizer)}


def policy_logps_accuracy(sums: list[Any], pairs: int, mean_chosen: float) -> float:
    """jaxtune's ``logps/accuracy`` (the share of pairs whose chosen answer the policy finds more likely,
    by summed answer log-probs) from TRL's own DPO evaluation, which reports only batch means. For each
    batch of pairs TRL 1.16 runs the policy's fused forward, then the reference's (adapters off), each
    over the chosen sequences stacked on the rejected ones; ``sums`` holds every such forward's
    per-sequence sums (TRL sums exactly these for its ``logps``), so the policy's are every other one.
    ``mean_chosen`` is TRL's reported ``eval_logps/chosen``, which the capture must reproduce: a TRL
    that evaluates otherwise (e.g. precomputed reference log-probs) is refused, not misread."""
    import torch

    policy = sums[0::2]
    counted = sum(len(s) for s in policy) // 2
    recomputed = float(torch.stack([s.chunk(2)[0].mean() for s in policy]).mean()) if policy else float("nan")
    if len(sums) % 2 or counted != pairs or abs(recomputed - mean_chosen) > 1e-3 * max(1.0, abs(mean_chosen)):
        raise RuntimeError(f"TRL's evaluation forwards were not read as expected: {len(sums)} forwards, {counted} of "
                           f"{pairs} pairs, chosen log-prob mean {recomputed} against TRL's {mean_chosen}")
    wins = sum(int((c > r).sum()) for c, r in (s.chunk(2) for s in policy))
    return wins / pairs


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

"""Held-out metrics per task, and the before-vs-after report.

Metrics are computed on the host from what the eval step returns (loss sums and per-example
outputs), so any number of batches and hosts combine exactly: LM loss is the token-weighted
mean; classification gives accuracy and macro-F1; regression MAE, RMSE and Pearson's r;
preference pairs the pair-weighted loss and the means of the loss's reward and log-prob sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

# The metrics evaluate() reports per task (LMs also report choice_* with answer choices).
METRICS = {"lm": ("loss", "perplexity"), "classification": ("loss", "accuracy", "macro_f1"),
           "regression": ("loss", "mae", "rmse", "pearson"),
           "preference": ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
                          "logps/chosen", "logps/rejected", "logps/accuracy")}
# A reward model's evaluation (task preference, method reward) has the rewards alone (no log-probs), and the
# range of its scores, as TRL's RewardTrainer logs it (min_reward, mean_reward, max_reward).
REWARD_RANGE = ("rewards/min", "rewards/mean", "rewards/max")
METRICS["reward"] = METRICS["preference"][:5] + REWARD_RANGE
# A reward model's scores are only compared within a pair, so their level (chosen, rejected, the range)
# moving up or down is neither better nor worse; its margin and accuracy keep their direction.
REWARD_SCORES = ("rewards/chosen", "rewards/rejected", *REWARD_RANGE)
# Which direction is better, for choosing the best checkpoint and for the report's arrows.
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "choice_accuracy": True, "choice_macro_f1": True,
                    "pearson": True, "loss": False, "perplexity": False, "mae": False, "rmse": False,
                    "rewards/accuracy": True, "rewards/margin": True, "logps/accuracy": True,
                    # the chosen answer's reward and log-prob up, the rejected one's down
                    "rewards/chosen": True, "logps/chosen": True, "rewards/rejected": False, "logps/rejected": False}


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of ``logits`` ``(N, C)`` against int ``labels`` ``(N,)``.

    Macro-F1 averages F1 over the classes present in labels or predictions (a class never
    seen nor predicted has no defined F1 and is left out, as scikit-learn's zero_division does).
    """
    pred = np.argmax(logits, axis=-1)
    labels = np.asarray(labels).astype(np.int64)
    classes = range(num_classes or logits.shape[-1])
    f1s = []
    for c in classes:
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == labels)) if len(labels) else float("nan"),
            "macro_f1": float(np.mean(f1s)) if f1s else float("nan")}


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and Pearson's r of predictions against targets (both ``(N,)``)."""
    pred, target = np.asarray(pred, np.float64).ravel(), np.asarray(target, np.float64).ravel()
    err = pred - target
    if pred.std() > 0 and target.std() > 0:
        pearson = float(np.corrcoef(pred, target)[0, 1])
    else:
        pearson = float("nan")  # a constant predictor has no correlation
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))), "pearson": pearson}


def in_lockstep(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches``, and on several processes as many as the process with the most has: each eval step
    is a collective, and a process whose shard of the rows fills one batch fewer (9 rows, 2 a process
    a batch: 3 and 2) would leave the others waiting in it forever. A process out of batches steps on
    empty ones (every row padding: no weight, no example), so the metrics are unchanged."""
    if jax.process_count() == 1:
        yield from batches
        return
    from jax.experimental import multihost_utils

    spec = getattr(batches, "batch_spec", None)
    rows, template = iter(batches), None
    while True:
        batch = next(rows, None)
        template = batch if template is None else template
        if not np.any(multihost_utils.process_allgather(np.int32(batch is not None))):
            return
        if batch is None:
            if template is None and spec is None:
                raise ValueError("evaluation: this process has no rows where others have some; give each process "
                                 "at least one batch, or evaluate with a Loader (it knows its batch shapes)")
            batch = ({k: np.zeros_like(v) for k, v in template.items()} if template is not None
                     else {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec().items()})
        yield batch


def evaluate(
    eval_step: Callable[[Any, Any, dict[str, Any]], dict[str, Any]],
    trainable: Any,
    frozen: Any,
    batches: Iterable[dict[str, Any]],
    task: str,
    *,
    to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
) -> dict[str, float]:
    """Run ``eval_step`` over ``batches`` and reduce to the task's metrics.

    Empty rows (no real token; they fill a last partial batch) are excluded from
    classification/regression metrics; LM padding carries zero token weight. When the LM eval
    step scores answer choices (``make_loss_fn(choices=...)``), every answer start counts
    as one example: ``choice_accuracy`` and ``choice_macro_f1`` compare the choices' logits.
    ``task="preference"`` (a preference loss: weight = pairs) reports the loss per pair and the
    means over all pairs of the metric sums in ``outputs["metrics"]`` (:data:`METRICS`).
    """
    loss_sum, weight, outputs, labels = 0.0, 0.0, [], []
    sums: dict[str, float] = {}
    for batch in in_lockstep(batches):
        result = jax.device_get(eval_step(trainable, frozen, to_device(batch)))
        loss_sum += float(result["loss_sum"])
        weight += float(result["weight"])
        if task == "preference":
            for key, value in result["outputs"]["metrics"].items():
                sums[key] = sums.get(key, 0.0) + float(value)
        elif task == "lm" and isinstance(result["outputs"], dict):
            out = result["outputs"]
            start = np.asarray(out["start"])
            outputs.append(np.asarray(out["logits"])[start])
            labels.append(np.asarray(out["choice"])[start])
        elif task != "lm":
            keep = np.asarray(result["keep"])
            outputs.append(np.asarray(result["outputs"])[keep])
            labels.append(np.asarray(result["labels"])[keep])
    if weight == 0:
        raise ValueError("evaluation saw no examples (or no supervised tokens): check the validation data")
    metrics = {"loss": loss_sum / weight}
    if task == "preference":
        # a reward model's loss sums its scores only (no log-probs)
        metrics.update({k: sums[k] / sums["pairs"] for k in METRICS["preference"][1:] + REWARD_RANGE if k in sums})
    elif task == "lm":
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        metrics["tokens"] = weight
        if outputs:
            labels_all = np.concatenate(labels)
            if (labels_all < 0).any():
                raise ValueError(f"{int((labels_all < 0).sum())} of {len(labels_all)} validation answers do not start "
                                 "with the first token of any answer choice: make every validation answer one of "
                                 "eval.choices, or drop eval.choices")
            choice = classification_metrics(np.concatenate(outputs), labels_all)
            metrics.update({f"choice_{k}": v for k, v in choice.items()})
    elif task == "classification":
        metrics.update(classification_metrics(np.concatenate(outputs), np.concatenate(labels)))
    else:
        metrics.update(regression_metrics(np.concatenate(outputs), np.concatenate(labels)))
    return metrics


# Baselines the base report may carry (``<key>/<metric>``, see jaxtune.training.baselines), by column title.
BASELINE_COLUMNS = {"probe": "linear probe", "tfidf": "TF-IDF"}
BASELINE_DESCRIPTIONS = {"probe": "logistic/ridge regression on the frozen model's mean-pooled features",
                         "tfidf": "word 1-2-gram TF-IDF + logistic/ridge regression; strengths by 3-fold CV"}


def comparison_table(before: dict[str, float], after: dict[str, float], *, before_note: str = "",
                     reward_model: bool = False) -> str:
    """A markdown table of base vs fine-tuned metrics, with the change and whether it improved.

    When ``before`` holds baselines (``probe/accuracy``, ``tfidf/accuracy``...), each gets a
    column, and a last column says how far the fine-tuned model is from the best of them.
    ``reward_model``: the metrics are a reward model's (``preference.method: reward``), whose
    scores' level (:data:`REWARD_SCORES`) gets a change but no better/worse.
    """
    baselines = [key for key in BASELINE_COLUMNS if any(k.startswith(f"{key}/") for k in before)]
    head = ["metric", "base", *(BASELINE_COLUMNS[b] for b in baselines), "fine-tuned", "change"]
    if baselines:
        head.append("vs best baseline")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def versus(a: float, b: float, better: bool | None) -> str:
        mark = "" if better is None or a == b else (" better" if (a > b) == better else " worse")
        return f"{a - b:+.4f}{mark}"

    for name in [k for k in after if k in before and k != "tokens"]:
        b, a = before[name], after[name]
        better = None if reward_model and name in REWARD_SCORES else HIGHER_IS_BETTER.get(name)
        scores = [before.get(f"{key}/{name}") for key in baselines]
        cells = [name, f"{b:.4f}", *("-" if s is None else f"{s:.4f}" for s in scores), f"{a:.4f}",
                 versus(a, b, better)]
        if baselines:
            known = [s for s in scores if s is not None and math.isfinite(s)]
            best = (max(known) if better else min(known)) if known and better is not None else None
            cells.append("-" if best is None else versus(a, best, better))
        rows.append("| " + " | ".join(cells) + " |")
    notes = [f"base: {before_note}"] if before_note else []
    if baselines:
        notes.append("baselines, fit on the training split and scored on the same held-out rows: "
                     + "; ".join(f"{BASELINE_COLUMNS[b]} ({BASELINE_DESCRIPTIONS[b]}, "
                                 f"{before.get(f'{b}/seconds', float('nan')):.1f} s)" for b in baselines))
    return "\n".join(rows) + "".join(f"\n{n}" for n in notes)



def metrics_line(metrics: dict[str, float]) -> str:
    """``metrics`` as one log line (``loss 0.5000, accuracy 0.9000``), token counts left out."""
    return ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items()
                     if not k.endswith("tokens") and isinstance(v, (int, float)))

"""Quickstart: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes reviews with LoRA + a new
classification head, and print base vs fine-tuned accuracy on held-out reviews.

    python -m jaxtune.quickstart            # ~2000 reviews, a few minutes on 2 CPU cores
    python -m jaxtune.quickstart --train 512 --test 256 --epochs 1   # smaller

The model and data come from PyPI packages (no model hub needed). "Base" is the pretrained
body with the new, untrained head: what you have before fine-tuning. Everything here is the
public Python API (:func:`jaxtune.run.train`, the glue behind ``jaxtune train
configs/quickstart.yaml``, which runs the same recipe at the CPU size of the README).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from jaxtune import config as config_lib
from jaxtune import run as run_lib



def run(
    *,
    train_size: int = 2000,
    test_size: int = 500,
    epochs: int = 1,
    batch_size: int = 32,
    max_length: int = 64,
    rank: int = 8,
    learning_rate: float = 1e-3,
    head_lr_multiplier: float = 5.0,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune and evaluate; returns ``{"before", "after", "table", "steps", "run_dir"}``.

    The same flow as ``jaxtune train configs/quickstart.yaml`` (:func:`jaxtune.run.train`),
    with the recipe's choices spelled out here as data.
    """
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="jaxtune-quickstart-"))
    data = {
        "model": {"path": "all-MiniLM-L6-v2"},
        "plan": [{"preset": "lora", "rank": rank, "alpha": 2 * rank},
                 {"action": "head", "task": "classification", "num_labels": 2, "pooling": "mean"}],
        "data": {"dataset": "rotten_tomatoes", "train_size": train_size, "validation_size": test_size,
                 "max_length": max_length, "batch_size": batch_size, "seed": seed},
        "optimizer": {"learning_rate": learning_rate, "warmup_ratio": 0.1, "weight_decay": 0.01,
                      "group_lr": {"head": head_lr_multiplier}},
        "train": {"epochs": epochs, "seed": seed, "progress": progress, "log_every": 10},
        "output": {"dir": str(run_dir), "export": "none"},
    }
    out = run_lib.train(config_lib.validate(config_lib.from_data(config_lib.Config, data)))
    return {"before": out["before"], "after": out["after"], "table": out["table"], "steps": out["step"],
            "run_dir": out["run_dir"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="training reviews")
    ap.add_argument("--test", type=int, default=500, help="held-out reviews")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    out = run(train_size=args.train, test_size=args.test, epochs=args.epochs, run_dir=args.run_dir)
    print(f"\nMiniLM + Rotten Tomatoes, LoRA r8 + head, {out['steps']} steps ({args.train} reviews x {args.epochs} "
          f"epoch); {args.test} held-out reviews\n")
    print(out["table"])
    gain = out["after"]["accuracy"] - out["before"]["accuracy"]
    print(f"\naccuracy {out['before']['accuracy']:.3f} -> {out['after']['accuracy']:.3f} "
          f"({'+' if gain >= 0 else ''}{gain:.3f}); run directory: {out['run_dir']}")
    if not math.isfinite(out["after"]["loss"]):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()

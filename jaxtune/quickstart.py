"""Quickstart: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes reviews with LoRA + a new
classification head, and print base vs fine-tuned accuracy on held-out reviews.

    python -m jaxtune.quickstart            # ~2000 reviews, a few minutes on 2 CPU cores
    python -m jaxtune.quickstart --train 512 --test 256 --epochs 1   # smaller

The model and data come from PyPI packages (no model hub needed). "Base" is the pretrained
body with the new, untrained head: what you have before fine-tuning. Everything here is the
public Python API; the CLI issue turns it into ``jaxtune train configs/quickstart.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from jaxtune import tuning
from jaxtune.data import LoaderConfig, make_loader, read_source
from jaxtune.data.datasets import prepare_rotten_tomatoes
from jaxtune.models import hf
from jaxtune.models.assets import fetch_model
from jaxtune.train.evaluate import comparison_table
from jaxtune.train.optim import OptimizerConfig
from jaxtune.train.trainer import TrainConfig, Trainer


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
    """Fine-tune and evaluate; returns ``{"before", "after", "table", "steps", "run_dir"}``."""
    model_dir = fetch_model("all-MiniLM-L6-v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_rotten_tomatoes(train_size=train_size, test_size=test_size, seed=seed)
    train_source = read_source(data.train, "classification")
    test_source = read_source(data.test, "classification", labels=train_source.label_names)
    train = make_loader(train_source, tokenizer, LoaderConfig(batch_size=batch_size, max_length=max_length,
                                                              num_epochs=epochs, seed=seed))
    test = make_loader(test_source, tokenizer, LoaderConfig(batch_size=batch_size, max_length=max_length,
                                                            num_epochs=1, shuffle=False, drop_remainder=False))
    plan = tuning.lora(rank=rank, alpha=2 * rank) + tuning.head("classification", num_labels=2, pooling="mean")
    tuned = tuning.apply_plan(hf.load_pretrained(model_dir), plan)
    print(tuning.summary(tuned.params, tuned.labels))
    steps = epochs * (len(train_source) // batch_size)
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="jaxtune-quickstart-"))
    trainer = Trainer(
        tuned, train_data=train, eval_data=test, run_dir=run_dir,
        optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_ratio=0.1, weight_decay=0.01,
                                  group_lr={"head": head_lr_multiplier}),
        config=TrainConfig(steps=steps, log_every=max(1, min(10, steps // 5)), seed=seed, progress=progress),
        resolved_config={"model": str(model_dir), "data": str(data.train), "plan": plan.to_data()
                         if hasattr(plan, "to_data") else repr(plan)},
    )
    before = trainer.evaluate()
    result = trainer.fit()
    after = trainer.evaluate()
    table = comparison_table(before, after, before_note="pretrained MiniLM body + fresh untrained head")
    (run_dir / "comparison.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    return {"before": before, "after": after, "table": table, "steps": result.step, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="training reviews")
    ap.add_argument("--test", type=int, default=500, help="held-out reviews")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)
    from absl import flags

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

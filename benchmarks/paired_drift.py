"""Where a paired Fashion-MNIST run's two sides part: one seed of

    python benchmarks/quality.py --tasks fashion-mnist-lite0 --paired --recalibrate 32 --seeds N

with each side's training loss and gradient norm at every step, and jaxtune's final weights (its
recalibrated BatchNorm statistics included) evaluated by the reference PyTorch model, so that a
difference of evaluation would show apart from one of training:

    python benchmarks/paired_drift.py --seed 11 --out benchmarks/results/paired-drift-seed11.json

A difference of method (schedule, optimizer, BatchNorm, loss) shows as the two loss curves parting
at a step, by more than float noise; float noise starts near 1e-7 and grows as Adam's first steps
amplify it (elements whose gradient is near zero take either sign on either side).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import drift_main
from quality_images import (
    IMAGE_TASKS,
    ImageTask,
    _image_inputs,
    _reference_lite0,
    jaxtune_image_recipe,
    reference_name,
    swap_layout,
    torch_image_side,
    write_image_data,
)


def jaxtune_worker(task: ImageTask, files: dict[str, str], work: Path) -> dict[str, Any]:
    """The quality benchmark's jaxtune run, logging every step; its final params saved for the PyTorch worker."""
    import jax
    from flax.traverse_util import flatten_dict

    from jaxtune import config as config_lib
    from jaxtune.recipe import trainer_for
    from jaxtune.tuning import combine

    recipe = jaxtune_image_recipe(task, files, str(work / "run"))
    recipe["train"]["log_every"] = 1
    trainer = trainer_for(config_lib.validate(config_lib.from_data(config_lib.Config, recipe)))
    result = trainer.fit()
    flat = flatten_dict(jax.device_get(combine(trainer.trainable, trainer.frozen)))
    np.savez(work / "jaxtune-params.npz", **{"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()})
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "grad_norm" in r]
    return {"after": result.after, "losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps]}


def pytorch_worker(task: ImageTask, files: dict[str, str], work: Path) -> dict[str, Any]:
    """The quality benchmark's PyTorch run (its per-step losses), then jaxtune's saved final params
    evaluated by a fresh reference model (PyTorch's layout: kernels transposed)."""
    import torch

    run = torch_image_side(task, files)
    _, test, pixels = _image_inputs(task, files)
    model = _reference_lite0(task)
    model._fc = torch.nn.Linear(1280, 10)
    theirs = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    saved = np.load(work / "jaxtune-params.npz")
    with torch.no_grad():
        for key in saved.files:
            value = np.ascontiguousarray(swap_layout(saved[key]))
            theirs[reference_name(tuple(key.split("/")))].copy_(torch.from_numpy(value))
    model.eval()
    with torch.no_grad():
        logits = np.concatenate([model(pixels(test, range(i, min(i + 64, len(test))))).numpy()
                                 for i in range(0, len(test), 64)])
    labels = np.asarray(run["labels"])
    ours = np.asarray(run["after_outputs"])
    return {"losses": run["losses"], "grad_norms": run["grad_norms"],
            "accuracy": float((ours.argmax(-1) == labels).mean()),
            "jaxtune_weights_accuracy": float((logits.argmax(-1) == labels).mean())}


def image_task(seed: int, smoke_run: bool) -> ImageTask:
    """The paired Fashion-MNIST task with this seed (a small one for ``--smoke``)."""
    task = dataclasses.replace(IMAGE_TASKS["fashion-mnist-lite0"], paired=True, recalibrate=32, seeds=(seed,))
    return dataclasses.replace(task, train=64, test=32, batch_size=16, epochs=1, recalibrate=2) if smoke_run else task


def main() -> None:
    drift_main(__file__, "paired-drift", "64 train / 32 test images, 4 steps (checks the script only)", image_task,
               write_image_data, {"jaxtune": jaxtune_worker, "pytorch": pytorch_worker},
               {0, 1, 2, 3, 4, 5, 9, 14, 19, 29, 49, 61, 62, 99, 149},
               lambda r: f"accuracy: jaxtune {r['jaxtune']['after']['accuracy']:.3f}, PyTorch "
                         f"{r['pytorch']['accuracy']:.3f}; jaxtune's weights evaluated by PyTorch "
                         f"{r['pytorch']['jaxtune_weights_accuracy']:.3f}")


if __name__ == "__main__":
    main()

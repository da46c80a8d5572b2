"""The quality benchmark's image tasks, every side (``quality.py`` drives them: not in its
default list, run them with ``--tasks``):

    python benchmarks/quality.py --tasks fashion-mnist-lite0
    python benchmarks/quality.py --tasks count-lite0 --recalibrate 32

EfficientNet-Lite0
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from common import adamw_kind, steps_of, timed_finetune, torch_adamw, worker_env, write_learning_rates


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

    @classmethod
    def from_json(cls, text: str) -> ImageTask:
        """The task ``json.dumps(dataclasses.asdict(task))`` wrote (its lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


IMAGE_TASKS: dict[str, ImageTask] = {
    "fashion-mnist-lite0": ImageTask("efficientnet-lite0", "fashion_mnist", "image-classification", 2000, 1000, 32,
                                     1e-3, epochs=3, seeds=(0, 1, 2)),
    "count-lite0": ImageTask("efficientnet-lite0", "fashion_mnist_count", "image-regression", 2000, 1000, 32, 1e-3,
                             epochs=2, regression_loss="huber", frozen_statistics=True),
}


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


def paired_start(task: ImageTask, files: dict[str, str]) -> tuple[list[int], tuple[Any, Any]]:
    """:func:`_jaxtune_start` in a process of its own, its result passed back in an .npz file: JAX
    started in the PyTorch worker would leave its thread pool there, and PyTorch in a process that
    also holds JAX ran 3.6x slower (``benchmarks/throughput.py``'s docstring)."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="paired-start-") as folder:
        out = Path(folder) / "start.npz"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--paired-start", json.dumps(dataclasses.asdict(task)),
               json.dumps(files), str(out)]
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"--paired: jaxtune's row order and head init failed:\n{proc.stderr[-4000:]}")
        with np.load(out) as start:
            return start["order"].tolist(), (start["kernel"], start["bias"])


def _write_paired_start(task_json: str, files_json: str, out: str) -> None:
    """The ``--paired-start`` process: :func:`_jaxtune_start` of the task, saved to ``out`` (.npz)."""
    import numpy as np
    from absl import flags

    from jaxtune.data.images import read_images

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    task, files = ImageTask.from_json(task_json), json.loads(files_json)
    train = read_images(files["train"], task.kind.removeprefix("image-"))
    order, (kernel, bias) = _jaxtune_start(task, files, train)
    np.savez(out, order=order, kernel=kernel, bias=bias)


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


def reference_name(path: tuple[str, ...]) -> str:
    """The reference package's name of jaxtune's EfficientNet-Lite0 param (or statistic) at ``path``;
    a new head is its ``_fc``."""
    from jaxtune.models.efficientnet import hf_module

    if path[0] == "head":
        return "_fc.weight" if path[-1] == "kernel" else "_fc.bias"
    return f"{hf_module(path[:-1])}.{ {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])}"


def swap_layout(array: Any) -> Any:
    """jaxtune's layout <-> PyTorch's, the same transpose both ways: a conv kernel (H, W, in, out) <->
    (out, in, H, W), a linear kernel (in, out) <-> (out, in); vectors as they are."""
    return array.transpose(3, 2, 1, 0) if array.ndim == 4 else array.T if array.ndim == 2 else array


def prefetched(load: Callable[[Any], Any], keys: Iterable[Any], ahead: int = 2) -> Iterator[Any]:
    """``load(key)`` for each key in order, each computed in a background thread up to ``ahead`` keys
    before it is asked for: the pixel conversion (PIL resize, normalisation) runs beside the step,
    as jaxtune's image loader prefetches its batches in grain's threads, not inside the timed step."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixels") as pool:
        pending: deque[Any] = deque()
        for key in keys:
            pending.append(pool.submit(load, key))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def reference_model(task: ImageTask, outputs: int, channels_last: bool = True) -> Any:
    """The reference EfficientNet-Lite0 with the task's plan: the last blocks, head conv and a new
    linear head (jaxtune's init: normal(0.02), zero bias) trainable, the rest frozen. In PyTorch's
    ``channels_last`` memory format by default, as a PyTorch user runs a CNN on the CPU (oneDNN's
    convolutions prefer it; the inputs must be converted too: :func:`to_model_layout`)."""
    import torch

    model = _reference_lite0(task)
    for p in model.parameters():
        p.requires_grad = False
    for module in (*model._blocks[-task.last_blocks:], model._conv_head, model._bn1):
        for p in module.parameters():
            p.requires_grad = True
    model._fc = torch.nn.Linear(1280, outputs)
    torch.nn.init.normal_(model._fc.weight, std=0.02)  # jaxtune's head init, as the text side's heads
    torch.nn.init.zeros_(model._fc.bias)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def to_model_layout(pixels: Any) -> Any:
    """A batch of NCHW pixels in the channels_last memory format :func:`reference_model` runs in
    (same shape and values; only the strides change)."""
    import torch

    return pixels.contiguous(memory_format=torch.channels_last)


def torch_image_side(task: ImageTask, files: dict[str, str]) -> dict[str, Any]:
    """The same plan on the reference PyTorch EfficientNet-Lite0 (:func:`reference_model`); the
    BatchNorms of the trained modules run in train mode (batch statistics, running ones updated),
    the frozen stages' in eval mode. Run as a PyTorch user runs it on the CPU: every core's thread
    (as the text side), channels_last, fused AdamW, and the next batches' pixels prepared in a
    background thread while the step runs (:func:`prefetched`)."""
    import numpy as np
    import torch

    # --paired: jaxtune's row order and head init, from a process of its own, before torch starts threads.
    start = paired_start(task, files) if task.paired else None
    seed = task.seeds[0]
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    kind = task.kind.removeprefix("image-")
    train, test, pixels = _image_inputs(task, files)
    model = reference_model(task, len(train.label_names) if kind == "classification" else 1)
    if start is not None:
        model._dropout.p = 0.0
        model._global_params = model._global_params._replace(drop_connect_rate=0.0)
        order, (kernel, bias) = start
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
    optimizer = torch_adamw(groups, lr=task.learning_rate)
    learning_rates = json.loads(Path(files["learning_rates"]).read_text())

    def batches(source: Any, index_lists: Iterable[Any]) -> Iterator[Any]:
        return prefetched(lambda idx: to_model_layout(pixels(source, idx)), index_lists)

    def epoch_batches(steps: int) -> list[list[int]]:
        return [order[step * task.batch_size:(step + 1) * task.batch_size] for step in range(steps)]

    def train_mode() -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and (task.frozen_statistics or not m.weight.requires_grad):
                m.eval()  # pretrained statistics (a frozen stage computes the pretrained features)

    def predict() -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return np.concatenate([model(x).numpy() for x in batches(
                test, [range(i, min(i + 64, len(test))) for i in range(0, len(test), 64)])])

    before = predict()
    losses, grad_norms = [], []  # per step, as jaxtune's metrics.jsonl logs them (benchmarks/paired_drift.py)
    train_start = time.perf_counter()
    train_mode()
    steps = epoch_batches(len(learning_rates))
    for idx, lr, x in zip(steps, learning_rates, batches(train, steps), strict=True):
        out = model(x).float()
        target = torch.from_numpy(train.labels[idx])
        if kind == "classification":
            loss = torch.nn.functional.cross_entropy(out, target.long())
        else:
            loss = (torch.nn.functional.huber_loss(out.reshape(-1), target, delta=1.0)
                    if task.regression_loss == "huber" else torch.nn.functional.mse_loss(out.reshape(-1), target))
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, 1.0)))
        losses.append(float(loss.detach()))
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
            for x in batches(train, epoch_batches(task.recalibrate)):
                model(x)
    train_s = time.perf_counter() - train_start
    return {"before_outputs": before.tolist(), "after_outputs": predict().tolist(), "labels": test.labels.tolist(),
            "steps": len(learning_rates), "train_s": train_s, "losses": losses, "grad_norms": grad_norms,
            "adamw": adamw_kind(optimizer), "memory_format": "channels_last", "torch_threads": torch.get_num_threads()}


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


def image_worker(side: str, task: ImageTask, files: dict[str, str], run_dir: str) -> dict[str, Any]:
    """One side of an image task in this (worker) process: ``jaxtune`` through ``jaxtune.finetune``
    (metrics), ``pytorch`` and ``baseline`` (raw predictions, which the driver scores)."""
    if side == "jaxtune":
        return timed_finetune(jaxtune_image_recipe(task, files, run_dir))
    if side == "pytorch":
        return torch_image_side(task, files)
    if side == "baseline":
        return baseline_image_side(task, files)
    raise ValueError(f"image tasks run on the sides jaxtune, pytorch and baseline, not {side!r}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--paired-start"] or len(sys.argv) != 5:
        sys.exit("usage (internal, from paired_start): quality_images.py --paired-start TASK_JSON FILES_JSON OUT.npz")
    _write_paired_start(*sys.argv[2:])

"""How close each side's float32 training gradient is to the float64 one, on the image task's step.

The quality benchmark's Fashion-MNIST plan (``quality_images.py``: EfficientNet-Lite0 with real
ImageNet weights, the last 6 blocks, head conv and a new head trained, their BatchNorms on batch
statistics; dropout and drop-connect off) on real images. For each batch, the gradient of the
mean cross-entropy at the start of training (jaxtune's head init copied into PyTorch's) from

- jaxtune in float32 (its jitted loss, as the Trainer computes it), and
- the reference PyTorch package in float32,

each against the same PyTorch model in float64, the truth to float32's precision. A library whose
arithmetic loses precision (an approximate convolution, a one-pass variance, a lower-precision
matmul) shows a larger error here than the other: the quality benchmark's paired runs part by
float drift alone only if both sides' errors are of one size.

    python benchmarks/gradient_precision.py                     # 3 batches of 32 at 224x224
    python benchmarks/gradient_precision.py --batches 1 --size 96 --batch-size 8 --out /tmp/g.json

Reported per batch: the loss's relative error, the relative error of the whole gradient (its
norm), and the median of the per-leaf relative errors (the six BatchNorm biases whose gradient
is zero in exact arithmetic — each residual block's last one, whose constant shift every
BatchNorm downstream removes — are left out of the median: float noise is all they hold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import machine, now, versions
from quality_images import reference_name, swap_layout


def _batches(size: int, batch_size: int, count: int) -> list[dict[str, Any]]:
    import numpy as np

    from jaxtune.data import read
    from jaxtune.data.images import ImageSpec, ToPixels
    from jaxtune.models.assets import fetch_model

    images, _ = read("fashion_mnist", train_size=2000, validation_size=10)
    to_pixels = ToPixels(ImageSpec.from_model_dir(size, 3, fetch_model("efficientnet-lite0")))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        idx = rng.choice(len(images), batch_size, replace=False)
        out.append({"pixel_values": np.stack([to_pixels.pixels(images[int(i)])["pixel_values"] for i in idx]),
                    "labels": np.asarray([images[int(i)]["label"] for i in idx], np.int32),
                    "example_weights": np.ones(batch_size, np.float32)})
    return out


def jaxtune_gradients(batches: list[dict[str, Any]]) -> tuple[Any, list[tuple[float, dict]]]:
    """The planned model and, per batch, jaxtune's float32 loss and gradients (path -> float64 array)."""
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning
    from jaxtune.models import hf
    from jaxtune.models.assets import fetch_model
    from jaxtune.training.step import make_loss_fn

    pretrained = hf.load_pretrained(fetch_model("efficientnet-lite0"), hidden_dropout=0.0, drop_connect_rate=0.0)
    tuned = tuning.apply_plan(pretrained, tuning.freeze_all_but(6) + tuning.head("classification", 10),
                              jax.random.key(0))
    loss_fn = make_loss_fn(tuned.module, "classification")
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)

    def mean_loss(t: Any, batch: dict[str, Any]) -> Any:
        total, weight, _ = loss_fn(tuning.combine(t, frozen), batch, jax.random.key(0), False)
        return total / weight

    grad = jax.jit(jax.value_and_grad(mean_loss))
    out = []
    for batch in batches:
        loss, grads = grad(trainable, batch)
        out.append((float(loss), {p: np.asarray(g, np.float64) for p, g in flatten_dict(grads).items()}))
    return tuned, out


def torch_gradients(tuned: Any, batches: list[dict[str, Any]], dtype: Any) -> list[tuple[float, dict]]:
    """The reference package's loss and gradients in ``dtype``, per batch, on jaxtune's paths and layout."""
    import numpy as np
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from flax.traverse_util import flatten_dict

    from jaxtune.assets import ASSETS, package_path

    flat, labels = flatten_dict(tuned.params), flatten_dict(tuned.labels)
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=str(package_path(ASSETS["efficientnet-lite0"])))
    model._global_params = model._global_params._replace(drop_connect_rate=0.0)
    model._dropout.p = 0.0
    model._fc = torch.nn.Linear(1280, 10)
    with torch.no_grad():
        model._fc.weight.copy_(torch.from_numpy(np.asarray(flat[("head", "out", "kernel")]).T.copy()))
        model._fc.bias.copy_(torch.from_numpy(np.asarray(flat[("head", "out", "bias")]).copy()))
    for p in model.parameters():
        p.requires_grad = False
    for module in (*model._blocks[-6:], model._conv_head, model._bn1, model._fc):
        for p in module.parameters():
            p.requires_grad = True
    model = model.to(dtype).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad:
            m.eval()  # the frozen stages normalise with the pretrained statistics
    named = dict(model.named_parameters())
    trained = [p for p, label in labels.items() if label in ("train", "head")]

    def theirs(path: tuple[str, ...]) -> torch.Tensor:
        return named[reference_name(path)]

    def ours(tensor: torch.Tensor) -> np.ndarray:  # PyTorch's layout -> jaxtune's
        return swap_layout(tensor.detach().double().numpy())

    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}  # the running statistics stay as they were
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(batch["pixel_values"]).to(dtype)),
                                                 torch.from_numpy(batch["labels"]).long())
        loss.backward()
        out.append((float(loss), {p: ours(theirs(p).grad) for p in trained}))
        model.load_state_dict(state)
    return out


def compare(truth: tuple[float, dict], other: tuple[float, dict]) -> dict[str, float]:
    """Relative errors of ``other`` (loss, gradients) against ``truth``."""
    import numpy as np

    (true_loss, true_grads), (loss, grads) = truth, other
    total = np.sqrt(sum(np.sum(g ** 2) for g in true_grads.values()))
    error = np.sqrt(sum(np.sum((grads[p] - g) ** 2) for p, g in true_grads.items()))
    # Leaves whose true gradient is zero to float64's precision hold float noise only.
    per_leaf = [np.linalg.norm(grads[p] - g) / np.linalg.norm(g) for p, g in true_grads.items()
                if np.linalg.norm(g) > 1e-12 * total]
    return {"loss": abs(loss - true_loss) / abs(true_loss), "gradient": float(error / total),
            "leaf_median": float(np.median(per_leaf)), "leaves": len(per_leaf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="image side (the benchmark's: 224)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gradient-precision.json")
    args = ap.parse_args()
    import torch

    batches = _batches(args.size, args.batch_size, args.batches)
    tuned, jax32 = jaxtune_gradients(batches)
    torch64 = torch_gradients(tuned, batches, torch.float64)
    torch32 = torch_gradients(tuned, batches, torch.float32)
    rows = [{"batch": i, "jaxtune_fp32": compare(t, j), "pytorch_fp32": compare(t, p)}
            for i, (t, j, p) in enumerate(zip(torch64, jax32, torch32))]
    record = {"date": now(), "machine": machine(), "versions": versions(),
              "setup": {"batches": args.batches, "batch_size": args.batch_size, "size": args.size}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("| batch | side | loss rel. error | gradient rel. error | per-leaf median |")
    print("|---|---|---|---|---|")
    for row in rows:
        for side in ("jaxtune_fp32", "pytorch_fp32"):
            r = row[side]
            print(f"| {row['batch']} | {side} | {r['loss']:.1e} | {r['gradient']:.2e} | {r['leaf_median']:.2e} |")


if __name__ == "__main__":
    main()

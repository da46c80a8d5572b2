"""What every benchmark shares: this checkout's jaxtune on the path (for the driver and its
worker processes), and what each record holds beside its numbers (versions, machine, date); and
what the quality benchmark's text and image tasks (``quality.py``, ``quality_images.py``) share:
the step count, the one learning-rate schedule both sides follow, a timed ``jaxtune.finetune``."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark this checkout, whichever jaxtune is installed
    sys.path.insert(0, str(ROOT))


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's worker processes: this checkout first on PYTHONPATH,
    one CPU device (the test suite's simulated device count is dropped; a caller's other
    ``XLA_FLAGS`` pass through), quiet tokenizers, no GPU memory preallocation."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TOKENIZERS_PARALLELISM": "false", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, **extra}

def drift_main(script: str, name: str, smoke_help: str, task_for: Callable[[int, bool], Any],
               write_data: Callable[[Any, Path], dict[str, Any]], workers: dict[str, Callable[..., dict[str, Any]]],
               steps: set[int], summary: Callable[[dict[str, Any]], str]) -> None:
    """The command line of a drift benchmark (``paired_drift.py``, ``chat_drift.py``): ``--seed N [--smoke]
    [--out PATH]`` writes the task's data (``write_data(task, work)``) to a scratch folder, runs
    ``workers["jaxtune"]`` then ``workers["pytorch"]`` (each ``(task, files, work) -> result``) in a process of
    its own (JAX and torch in one process slow each other; the PyTorch worker reads what jaxtune's leaves in
    ``work``), prints both training curves at ``steps`` (0-based) and ``summary(record)``, and saves the record
    as ``results/NAME-seedN.json``."""
    import argparse
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{name}-seedN.json)")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--worker", choices=tuple(workers), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    task = task_for(args.seed, args.smoke)
    if args.worker:
        work = Path(args.work)
        print(json.dumps(workers[args.worker](task, json.loads((work / "files.json").read_text()), work)))
        return
    work = Path(tempfile.mkdtemp(prefix=f"jaxtune-{name}-"))
    (work / "files.json").write_text(json.dumps({k: str(v) for k, v in write_data(task, work).items()}))
    record: dict[str, Any] = {"date": now(), "command": " ".join(sys.argv), "machine": machine(),
                              "load_average_at_start": load_average(), "seed": args.seed}
    for side in ("jaxtune", "pytorch"):
        proc = subprocess.run([sys.executable, script, "--seed", str(args.seed), "--worker", side, "--work", str(work),
                               *(["--smoke"] if args.smoke else [])], env=worker_env(), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        record[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, theirs = (record[side]["losses"] for side in ("jaxtune", "pytorch"))
    print("step  loss jaxtune  loss PyTorch  difference  grad norm jaxtune / PyTorch")
    for i in sorted((steps | {len(ours) - 1}) & set(range(len(ours)))):
        print(f"{i + 1:4d}  {ours[i]:12.5f}  {theirs[i]:12.5f}  {ours[i] - theirs[i]:+10.2e}  "
              f"{record['jaxtune']['grad_norms'][i]:.4f} / {record['pytorch']['grad_norms'][i]:.4f}")
    print(summary(record))
    out = Path(args.out or Path(script).parent / "results" / f"{name}-seed{args.seed}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"{record['date']}, {record['machine']}; JSON {out}")


PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "tokenizers")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages both sides use ("missing" if absent)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine() -> str:
    """Host name, architecture and CPU count, e.g. ``"box x86_64, 2 CPU cores"``."""
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores"


def now() -> str:
    """The UTC date and time a record was made."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a busy machine skews timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ----------------------------------------------------------------------------- quality tasks


def write_learning_rates(task: Any, folder: Path) -> Path:
    """jaxtune's learning-rate schedule for ``task``, step by step, as JSON: the PyTorch side
    follows these values, so both sides run one schedule function."""
    from jaxtune.training.optim import OptimizerConfig, make_schedule

    total = steps_of(task)
    schedule = make_schedule(OptimizerConfig(learning_rate=task.learning_rate, warmup_ratio=task.warmup_ratio,
                                             schedule="cosine"), total)
    path = folder / "learning_rates.json"
    path.write_text(json.dumps([float(schedule(step)) for step in range(total)]))
    return path


def steps_of(task: Any) -> int:
    """Optimizer steps of a quality task (``quality.Task`` or ``quality_images.ImageTask``): whole batches
    over its epochs."""
    return task.train * task.epochs // task.batch_size


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


def torch_adamw(params: Any, **kwargs: Any) -> Any:
    """``torch.optim.AdamW`` as a competent PyTorch user runs it: fused (one kernel over every
    tensor, on the CPU as on CUDA; torch's default leaves it off and is slower), or ``foreach``
    where the fused kernel refuses the params (a device or dtype it lacks). Which one ran:
    :func:`adamw_kind`."""
    import torch

    params = list(params)  # a generator would be spent by the first try
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def adamw_kind(optimizer: Any) -> str:
    """``fused`` or ``foreach``: which AdamW implementation a PyTorch side ran (for its record)."""
    return "fused" if optimizer.defaults.get("fused") else "foreach"

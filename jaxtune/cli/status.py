"""What ``jaxtune status RUN_DIR`` shows, from :meth:`jaxtune.training.rundir.RunDir.summary`
(no JAX import: instant). A ``running`` run whose status has not changed for a long time is
flagged: the process may have been killed (it resumes from its last checkpoint when started again).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jaxtune.training.rundir import RunDir, RunDirError


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(metrics: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    parts = []
    for key, value in metrics.items():
        if key in skip or not isinstance(value, (int, float)):
            continue
        parts.append(f"{key} {value:.3e}" if key == "learning_rate" else f"{key} {value:.4f}")
    return ", ".join(parts) or "-"


def format_status(info: dict[str, Any]) -> str:
    """Human-readable lines for :func:`read`'s dict."""
    total = info["total_steps"]
    progress = f"{info['step']}/{total}" + (f" ({100 * info['step'] / total:.0f}%)" if total else "")
    if info.get("failed_step") is not None:  # the step is the last good one, before the one that failed
        progress += f", the last good step: step {info['failed_step']} was not finite"
    state = info["state"]
    if info["stale"]:
        state += f" (no update for {_hms(time.time() - info['updated'])}: the process may have died; " \
                 "run jaxtune train again to resume)"
    elif state == "stopped":
        state += " (interrupted; run jaxtune train again on this directory to resume)"
    lines = [f"run:         {info['run_dir']}", f"state:       {state}", f"step:        {progress}"]
    if info["updated"]:
        lines.append(f"updated:     {_hms(time.time() - info['updated'])} ago")
    if info["train"]:
        lines.append(f"train:       {_fmt(info['train'], ('tokens_per_s', 'examples_per_s', 'steps_per_s'))}"
                     + (f" (step {info['train_step']})" if info.get("train_step") else ""))
    if info["eval"]:
        lines.append(f"validation:  {_fmt(info['eval'], ('tokens',))}")
    if info["tokens_per_s"] or info.get("examples_per_s"):
        speed = info["train"].get("steps_per_s")
        rate = (f"{info['tokens_per_s']:.0f} tokens/s (real input tokens, padding excluded)" if info["tokens_per_s"]
                else f"{info['examples_per_s']:.1f} images/s (real examples, padding excluded)")
        lines.append(f"speed:       {rate}"
                     + (f", {speed:.3f} steps/s" if speed else ""))
    if info["eta_s"] is not None:
        lines.append(f"ETA:         {_hms(info['eta_s'])}")
    if info["best"]:
        value = info["best"]["value"]
        lines.append(f"best:        step {info['best']['step']}" + (f" ({value:.4f})" if value is not None else "")
                     + f" in {info['best']['path']}")
    if info["checkpoints"]:
        lines.append(f"checkpoints: {', '.join(map(str, info['checkpoints']))} (latest {info['checkpoints'][-1]})")
    if info.get("memory"):
        memory = info["memory"]
        lines.append(f"memory:      {memory['GiB']:.3g} GiB per device ({memory['devices']} {memory['backend']} "
                     f"device(s); params {memory['params'] / 2**30:.3g}, optimizer {memory['optimizer'] / 2**30:.3g}, "
                     f"activations+temporaries {memory['temporaries'] / 2**30:.3g} GiB)")
    if info["error"]:
        lines.append(f"error:       {info['error']}")
    return "\n".join(lines)


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """A PNG of the training and validation loss curves (default ``<run_dir>/loss.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if out and Path(out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--plot {out}: give a .png (or .svg, .pdf) file name")
    records = RunDir(run_dir).metrics()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    if not train and not evals:
        raise RunDirError(f"{run_dir}: no metrics logged yet (metrics.jsonl is empty)")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss.png"
    if not out.parent.is_dir():
        raise RunDirError(f"--plot {out}: the folder {out.parent} does not exist; create it or give another path")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""What ``jaxtune status RUN_DIR`` shows: a run's state from the files the Trainer writes
(``status.json``, ``metrics.jsonl``, ``checkpoints/``, ``best/``), without importing JAX.

A run is ``running``, ``finished``, ``failed``, ``stopped`` (Ctrl-C; resumable) or
``early_stopped``. A ``running`` run whose status has not changed for a long time is flagged:
the process may have been killed (it resumes from its last checkpoint when started again).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STALE_AFTER_S = 600.0


class RunDirError(FileNotFoundError):
    """The path is not a run directory (or has nothing to show yet)."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (train records have ``loss``; eval ones ``eval/...``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return records


def read(run_dir: str | Path) -> dict[str, Any]:
    """The run's status as one dict: ``state, step, total_steps, train, eval, tokens_per_s,
    eta_s, best, checkpoints, updated, stale, error``."""
    run_dir = Path(run_dir)
    status = _json(run_dir / "status.json")
    if status is None:
        if (run_dir / "config.yaml").is_file():
            status = {"state": "starting", "step": 0}
        else:
            raise RunDirError(f"{run_dir}: not a run directory (no status.json); "
                                    "give the output.dir of a jaxtune train run")
    records = metrics(run_dir)
    train = status.get("train") or next((r for r in reversed(records) if "loss" in r), {})
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    evaluation = status.get("eval") or (evals[-1] if evals else {})
    total, step = status.get("total_steps"), status.get("step", 0)
    rate = train.get("steps_per_s")
    state = status.get("state", "unknown")
    eta = (total - step) / rate if state == "running" and rate and total else None
    best_step = status.get("best_step")
    best_dirs = _steps(run_dir / "best")
    best = None
    if best_step is not None or best_dirs:
        best = {"step": best_step if best_step is not None else best_dirs[-1], "value": status.get("best_value"),
                "path": str(run_dir / "best")}
    updated = status.get("updated")
    stale = state == "running" and updated is not None and time.time() - updated > STALE_AFTER_S
    return {"run_dir": str(run_dir), "state": state, "step": step, "total_steps": total,
            "train": {k: v for k, v in train.items() if k != "step"}, "train_step": train.get("step"),
            "eval": {k.removeprefix("eval/"): v for k, v in evaluation.items() if k != "step"},
            "tokens_per_s": train.get("tokens_per_s"), "eta_s": eta, "best": best,
            "checkpoints": _steps(run_dir / "checkpoints"), "updated": updated, "stale": stale,
            "error": status.get("error")}


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
        lines.append(f"train:       {_fmt(info['train'], ('tokens_per_s', 'steps_per_s'))}"
                     + (f" (step {info['train_step']})" if info.get("train_step") else ""))
    if info["eval"]:
        lines.append(f"validation:  {_fmt(info['eval'], ('tokens',))}")
    if info["tokens_per_s"]:
        speed = info["train"].get("steps_per_s")
        lines.append(f"speed:       {info['tokens_per_s']:.0f} tokens/s (real input tokens, padding excluded)"
                     + (f", {speed:.3f} steps/s" if speed else ""))
    if info["eta_s"] is not None:
        lines.append(f"ETA:         {_hms(info['eta_s'])}")
    if info["best"]:
        value = info["best"]["value"]
        lines.append(f"best:        step {info['best']['step']}" + (f" ({value:.4f})" if value is not None else "")
                     + f" in {info['best']['path']}")
    if info["checkpoints"]:
        lines.append(f"checkpoints: {', '.join(map(str, info['checkpoints']))} (latest {info['checkpoints'][-1]})")
    if info["error"]:
        lines.append(f"error:       {info['error']}")
    return "\n".join(lines)


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """A PNG of the training and validation loss curves (default ``<run_dir>/loss.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = metrics(run_dir)
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
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""Time to the first training step, cold and warm: what the persistent compilation cache saves.

Runs ``jaxtune train RECIPE`` in fresh processes against one new, empty compilation cache (the
packaged models and datasets are shared with the user's cache through symlinks, so nothing is
downloaded): the first run compiles every step (evaluation and training), the later ones load
them. Each process is timed from its launch to the log line of its first training step (model
load, data, the base evaluation and its baselines included), then stopped.

    python benchmarks/startup.py                       # configs/quickstart.yaml, cold then 2 warm
    python benchmarks/startup.py --config configs/chat_sentiment.yaml --runs 2

Writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_average, machine, now, versions, worker_env

FIRST_STEP = re.compile(r"step 1 took ([\d.]+) s \((.*)\)")


def shared_cache(root: Path) -> None:
    """``root`` as a jaxtune cache that shares the user's fetched assets but neither compiled steps
    nor base reports (the two things a second run reuses)."""
    from jaxtune.assets import cache_dir

    for entry in cache_dir().iterdir():
        if entry.name not in ("xla", "base-metrics"):
            (root / entry.name).symlink_to(entry)


def time_to_first_step(config: str, run_dir: Path, env: dict[str, str], limit_s: float) -> dict[str, object]:
    """Launch one training run, return the seconds until its first step's log line and what it said."""
    cmd = [sys.executable, "-m", "jaxtune", "train", config, f"output.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            match = FIRST_STEP.search(line)
            if match:
                return {"to_first_step_s": round(time.perf_counter() - start, 1),
                        "first_step_s": float(match.group(1)), "first_step": match.group(2)}
            if time.perf_counter() - start > limit_s:
                break
        raise RuntimeError(f"{' '.join(cmd)}: no first step within {limit_s} s (exit {proc.poll()})")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--runs", type=int, default=3, help="the first is cold, the rest warm")
    ap.add_argument("--limit", type=float, default=900, help="seconds to wait for a first step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = ap.parse_args()
    record = {"date": now(), "command": " ".join(["python", *sys.argv]), "machine": machine(),
              "versions": versions(), "load_average_at_start": load_average(), "config": args.config, "runs": []}
    with tempfile.TemporaryDirectory(prefix="jaxtune-startup-") as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        shared_cache(cache)
        env = worker_env(JAXTUNE_CACHE=str(cache))
        for i in range(args.runs):
            run = time_to_first_step(args.config, Path(tmp) / f"run{i}", env, args.limit)
            run["cache"] = "cold" if i == 0 else "warm"
            record["runs"].append(run)
            print(f"run {i} ({run['cache']}): first step after {run['to_first_step_s']} s; the step itself "
                  f"{run['first_step_s']} s ({run['first_step']})", flush=True)
    cold, warm = record["runs"][0]["to_first_step_s"], [r["to_first_step_s"] for r in record["runs"][1:]]
    if warm:
        record["warm_over_cold"] = round(max(warm) / cold, 3)
        print(f"warm / cold time to first step: {record['warm_over_cold']:.2f} (worst warm run)")
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['date']}, {record['machine']}, load {record['load_average_at_start']}; JSON {args.out}")


if __name__ == "__main__":
    main()

"""Predicted memory per device of the Llama-3.1-8B LoRA step: 1 device and FSDP over 8.

    python benchmarks/memory_8b.py [--seq 4096] [--remat block] [--devices 1 8] [--out FILE]

Each row is what ``jaxtune plan-memory`` prints for a recipe with ``model.path`` a directory
holding only Llama-3.1-8B's ``config.json`` (no weights are made or read), ``model.dtype:
bfloat16``, LoRA r16 (alpha 32) on every linear, AdamW, ``seq`` tokens per row and one row per
device: the train step (``jaxtune.training.memory.compile_planned_step``) compiled ahead of time on
simulated CPU devices, its ``memory_analysis()`` split into params, optimizer state and
temporaries. One fresh process per row (the device count is fixed when JAX starts). On the CPU
backend the figures are XLA:CPU's program, a prediction of a GPU's; ``--backend gpu`` on a GPU
machine (with ``--devices`` its real device count) gives that device's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from qlora_memory import LLAMA_31_8B


def plan(devices: int, seq: int, remat: str, rank: int, base: str) -> dict:
    """One row: compile and report (runs in a process whose JAX sees ``devices`` devices)."""
    from jaxtune import tuning
    from jaxtune.models.load import ModelConfig
    from jaxtune.training.memory import GiB, plan_step_memory
    from jaxtune.training.sharding import MeshConfig

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA_31_8B))
        rules = (tuning.freeze(quantize=base) if base != "bf16" else tuning.Plan()) + tuning.lora(rank, alpha=2 * rank)
        started = time.perf_counter()
        report = plan_step_memory(ModelConfig(path=tmp, dtype="bfloat16", remat=remat), rules, batch_size=devices,
                                  seq_len=seq, mesh=MeshConfig(data=1, fsdp=devices))
    row = {"devices": devices, "mesh": f"fsdp {devices}", "base": base, "seq": seq, "rows_per_device": 1,
           "lora_rank": rank, "remat": remat, "compile_s": round(time.perf_counter() - started, 1),
           "line": report.line()}
    row.update({f"{k}_GiB": round(v / GiB, 3) for k, v in report.as_dict().items() if isinstance(v, int)
                and k != "devices"})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--remat", default="block")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--base", default="bf16", help="bf16, or a freeze quantization: nf4, int8, ...")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backend", default="cpu", choices=["cpu", "gpu", "tpu"])
    ap.add_argument("--out", type=Path, default=common.ROOT / "benchmarks" / "results" / "memory-8b.json")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # worker mode: this many devices
    args = ap.parse_args()
    if args.one:
        print(json.dumps(plan(args.one, args.seq, args.remat, args.rank, args.base)), flush=True)
        return
    rows = []
    for n in args.devices:
        env = common.worker_env(JAX_PLATFORMS=args.backend)
        if args.backend == "cpu":  # after worker_env, which drops any XLA_FLAGS
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--seq", str(args.seq), "--remat",
                               args.remat, "--rank", str(args.rank), "--base", args.base],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"memory_8b.py worker ({n} devices) failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1]["line"], f"(compile {rows[-1]['compile_s']} s)", flush=True)
    record = {"benchmark": "memory-8b", "command": " ".join(["python", *sys.argv]), "date": common.now(),
              "machine": common.machine(), "load_average": common.load_average(), "versions": common.versions(),
              "backend": args.backend, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

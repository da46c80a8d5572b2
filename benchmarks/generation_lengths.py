"""Generation over requests of mixed lengths, as a server sees them: jaxtune against transformers.

One request at a time, each a prompt of a random length with a random number of new tokens, greedy,
no stop token (every request generates exactly its ``max_new_tokens`` on both sides), on the packaged
SmolLM2-135M-Instruct in float32. jaxtune compiles one program per length bucket (prefill, loop):
the first requests of each new bucket pay a compilation, later ones reuse it, so the record gives
the wall time of every request, the number of compiled programs, and the tokens per second over
all requests and over the second half alone. transformers runs eagerly (nothing to compile). Both
sides read the same token ids and the record says on how many requests their tokens agree.

    python benchmarks/generation_lengths.py --requests 24 --out benchmarks/results/generation-lengths.json

Each side runs in its own worker process (one library's threads never share a process with the
other's), with every core: PyTorch with ``torch.set_num_threads(os.cpu_count())``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_average, machine, now, versions, worker_env  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def requests(count: int, seed: int, vocab: int, prompt: tuple[int, int], new: tuple[int, int]) -> list[dict[str, Any]]:
    """``count`` requests: token ids of a random length in ``prompt`` (inclusive), and a number of
    new tokens in ``new`` (inclusive), drawn from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(prompt[0], prompt[1] + 1))
        out.append({"ids": [int(i) for i in rng.integers(100, vocab, length)],
                    "new": int(rng.integers(new[0], new[1] + 1))})
    return out


def run_jaxtune(directory: Path, todo: list[dict[str, Any]]) -> dict[str, Any]:
    from jaxtune.models import generate as gen
    from jaxtune.models import hf

    pretrained = hf.load_pretrained(directory)
    walls, tokens = [], []
    for request in todo:
        start = time.perf_counter()
        out = gen.generate(pretrained.module, pretrained.params, [request["ids"]], max_new_tokens=request["new"])
        walls.append(time.perf_counter() - start)
        tokens.append(out[0])
    grow = getattr(gen, "_grow", None)  # absent before the length buckets (one program per 32-token band)
    programs = {"prefill": gen._prefill._cache_size(), "loop": gen._decode_loop._cache_size(),
                "grow": grow._cache_size() if grow is not None else 0}
    return {"walls": walls, "tokens": tokens, "programs": programs}


def run_pytorch(directory: Path, todo: list[dict[str, Any]]) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    walls, tokens = [], []
    with torch.inference_mode():
        for request in todo:
            ids = torch.tensor([request["ids"]])
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request["new"],
                                 min_new_tokens=request["new"], do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            walls.append(time.perf_counter() - start)
            tokens.append(out[0, ids.shape[1]:].tolist())
    return {"walls": walls, "tokens": tokens}


def summary(side: dict[str, Any], todo: list[dict[str, Any]]) -> dict[str, Any]:
    walls, new = side["walls"], [r["new"] for r in todo]
    half = len(walls) // 2
    return {"wall_s": round(sum(walls), 2), "tokens_per_s": round(sum(new) / sum(walls), 1),
            "second_half_tokens_per_s": round(sum(new[half:]) / sum(walls[half:]), 1),
            "slowest_request_s": round(max(walls), 2)}


def _commit() -> str:
    """The checkout's commit (which jaxtune the workers ran: this checkout comes first on their path)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", type=int, nargs=2, default=(5, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--new", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--sides", default="jaxtune,pytorch")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=("jaxtune", "pytorch"), help=argparse.SUPPRESS)
    parser.add_argument("--todo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        todo = json.loads(args.todo.read_text())
        run = run_jaxtune if args.worker == "jaxtune" else run_pytorch
        print(json.dumps(run(args.directory, todo)))
        return

    from jaxtune.models.assets import fetch_model

    directory = fetch_model(MODEL)
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    todo = requests(args.requests, args.seed, vocab, tuple(args.prompt), tuple(args.new))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"generation-lengths-{os.getpid()}.json"
    scratch.write_text(json.dumps(todo))
    record: dict[str, Any] = {"benchmark": "generation_lengths", "date": now(), "machine": machine(),
                              "load_average_at_start": load_average(), "versions": versions(), "model": MODEL,
                              "command": " ".join(sys.argv), "commit": _commit(),
                              "requests": [(len(r["ids"]), r["new"]) for r in todo],
                              "sides": {}}
    results = {}
    try:
        for side in args.sides.split(","):
            out = subprocess.run([sys.executable, __file__, "--worker", side, "--todo", str(scratch),
                                  "--directory", str(directory)], env=worker_env(), cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            results[side] = json.loads(out.strip().splitlines()[-1])
            record["sides"][side] = {**summary(results[side], todo),
                                     "walls": [round(w, 3) for w in results[side]["walls"]],
                                     **({"programs": results[side]["programs"]} if "programs" in results[side] else {})}
            print(side, json.dumps({k: v for k, v in record["sides"][side].items() if k != "walls"}), flush=True)
    finally:
        scratch.unlink(missing_ok=True)
    if {"jaxtune", "pytorch"} <= results.keys():
        same = sum(a == b for a, b in zip(results["jaxtune"]["tokens"], results["pytorch"]["tokens"], strict=True))
        record["requests_with_equal_tokens"] = f"{same}/{len(todo)}"
        print("requests with equal tokens:", record["requests_with_equal_tokens"])
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Compile time of the LoRA train step against depth: the scanned layer stack and the unrolled one.

    python benchmarks/compile.py [--layers 4 32] [--out benchmarks/results/compile.json] [--smoke]

A tiny-width Llama (random weights, no download) with LoRA r8 on every linear; the train step
(loss, gradients, AdamW update: ``jaxtune.training.step``) is traced, lowered and compiled for one
batch shape, once per (depth, stack). With the scanned stack (the default, ``scan_layers``) each
run of identically planned layers is one loop body, so the program does not grow with depth;
the unrolled stack (``scan_layers: false``) repeats every layer. Each figure is measured in a
fresh process (no trace or compilation cache shared). Times are wall-clock on a possibly busy
machine: the record carries the load average.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common


def measure(layers: int, scan: bool, seq: int = 64, batch: int = 2) -> dict[str, float]:
    """Seconds to trace+lower and to compile the LoRA train step of a ``layers``-deep tiny Llama."""
    import jax
    import jax.numpy as jnp

    from jaxtune import tuning
    from jaxtune.models.decoder import Decoder, DecoderConfig
    from jaxtune.models.hf import Pretrained
    from jaxtune.training.optim import OptimizerConfig, build_optimizer
    from jaxtune.training.step import make_loss_fn, make_train_step

    cfg = DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                        num_kv_heads=2, head_dim=16, scan_layers=scan)
    module = Decoder(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    tuned = tuning.apply_plan(Pretrained(cfg, module, params, {}, "random", "LlamaForCausalLM"), tuning.lora(rank=8))
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    groups, _ = tuning.partition(tuned.labels, tuned.labels)
    optimizer, _ = build_optimizer(OptimizerConfig(), 100, groups)
    step = jax.jit(make_train_step(make_loss_fn(tuned.module, "lm"), optimizer), donate_argnums=(0, 2))
    ids = jnp.zeros((batch, seq), jnp.int32)
    batch_ = {"input_ids": ids, "targets": ids, "loss_weights": jnp.ones((batch, seq), jnp.float32),
              "segment_ids": jnp.ones((batch, seq), jnp.int32),
              "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}
    start = time.perf_counter()
    lowered = step.lower(trainable, frozen, optimizer.init(trainable), batch_, jax.random.key(0))
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return {"lower_s": traced, "compile_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--out", type=Path, default=None, help="write the record here as JSON")
    ap.add_argument("--smoke", action="store_true", help="1 and 2 layers, to check the script works")
    ap.add_argument("--one", nargs=2, metavar=("LAYERS", "SCAN"), help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1] == "scan")))
        return
    layers = [1, 2] if args.smoke else args.layers
    rows = []
    for n in layers:
        for stack in ("scan", "unrolled"):
            proc = subprocess.run([sys.executable, __file__, "--one", str(n), stack], capture_output=True, text=True,
                                  env=common.worker_env(JAX_PLATFORMS="cpu"), check=False)
            if proc.returncode:
                sys.exit(f"compile.py worker ({n} layers, {stack}) failed:\n{proc.stderr[-3000:]}")
            times = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"layers": n, "stack": stack, **times, "total_s": times["lower_s"] + times["compile_s"]})
    total = {(r["layers"], r["stack"]): r["total_s"] for r in rows}
    lo, hi = min(layers), max(layers)
    ratios = {s: total[(hi, s)] / total[(lo, s)] for s in ("scan", "unrolled")}
    record = {"benchmark": "compile", "date": common.now(), "machine": common.machine(),
              "load_average": common.load_average(), "versions": common.versions(),
              "workload": "tiny Llama (hidden 64, 4 heads, 2 KV heads), LoRA r8 all-linear, AdamW, batch 2 x 64",
              "results": rows, f"ratio_{hi}_vs_{lo}_layers": ratios}
    print("| layers | stack | trace+lower s | compile s | total s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['stack']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['total_s']:.2f} |")
    print(f"{hi} vs {lo} layers: scanned {ratios['scan']:.2f}x, unrolled {ratios['unrolled']:.2f}x "
          f"(load average {record['load_average']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

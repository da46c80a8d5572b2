"""Training throughput: jaxtune vs Hugging Face transformers + PEFT, side by side in one run.

    python benchmarks/throughput.py --mode cpu     # tiny Llama, 2-core CPU, ~2 minutes
    python benchmarks/throughput.py --mode cpu-long  # the same in rows of 1,024 tokens
    python benchmarks/throughput.py --mode gpu     # Llama-3 1B/8B shapes, seq 2048, bf16 (H100)
    python benchmarks/throughput.py --smoke        # seconds: checks that the script works
    python benchmarks/throughput.py --rescore benchmarks/results/throughput-cpu-long.json  # both speed-ups of a record

Each side of each workload runs in its own long-lived worker process (so peak-memory counters
are its own, and the two runtimes' thread pools never compete: measured here, PyTorch in a
process that also holds JAX ran 3.6x slower). The driver alternates timed rounds between the
workers (every other round in reverse order), which wait idle on a pipe while the other side runs.
Per side: non-pad tokens/s from its median round, the speed-up over HF+PEFT as the median of the
rounds' ratios (each round's sides ran back to back, so the machine's drift between rounds
cancels), in CPU mode also over HF+PEFT with jaxtune's host-memory settings (below), MFU (model
FLOPs from jaxtune.training.flops: 6N full / ~4N LoRA + causal attention, against the device
peak), peak device memory (JAX ``peak_bytes_in_use`` vs ``torch.cuda.max_memory_allocated``; not
measured on CPU) and the first step's time (compile included). Outputs: a markdown table on
stdout, ``--out`` JSON with the full setup, and a PNG.

Same work on both sides: a random-initialised Llama, rows of ``seq`` real tokens, one document a row
(jaxtune reads them as packed rows of one segment, with segment ids and positions: its packed path,
without the work that several documents a row would save it), causal-LM loss, AdamW with the
gradient clipped to global norm 1.0 (PyTorch's fused AdamW, on the CPU too); LoRA r16 alpha 32 on
all linear layers, or full fine-tuning. Precision: fp32 on CPU; on GPU bf16 compute with fp32
trainable weights on both sides (jaxtune: frozen base in bf16; torch: base in bf16 for LoRA, fp32
master + autocast for full fine-tuning).

Host memory (CPU mode): jaxtune keeps freed host memory for the next step (``jaxtune.host_memory``,
on by default where JAX computes on the CPU); HF+PEFT runs with glibc's defaults, as its users run
it, and once more with jaxtune's settings (``hf+peft+keep``), so that the comparison is fair in both
directions. Every side's speed-up is reported twice, side by side in the table, the JSON and the chart:
over ``hf+peft`` (HF+PEFT as its users run it) and over ``hf+peft+keep`` (the same allocator settings
as jaxtune: what jaxtune's own code gains, without its allocator choice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, adamw_kind, load_average, machine, now, torch_adamw, versions, worker_env

SHAPES: dict[str, dict[str, Any]] = {
    "smoke": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}
MODES: dict[str, list[dict[str, Any]]] = {
    # Every branch of both sides, in two workloads: LoRA in GPU mode's precision recipe (bf16 compute, frozen
    # base in bf16; torch's base in bf16 under autocast) on the CPU, so CI checks that path, and full fine-tuning
    # in fp32 (CPU mode's). A third, fp32 LoRA, would run no code these two do not (3 more worker processes).
    "smoke": [dict(shape="smoke", method="lora", seq=32, batch=2, bf16=True),
              dict(shape="smoke", method="full", seq=32, batch=2)],
    "cpu": [dict(shape="tiny", method="lora", seq=256, batch=4), dict(shape="tiny", method="full", seq=256, batch=4)],
    # The same tokens a step in rows of 1,024 (instruction tuning's lengths): attention's share grows.
    "cpu-long": [dict(shape="tiny", method="lora", seq=1024, batch=1),
                 dict(shape="tiny", method="full", seq=1024, batch=1)],
    "gpu": [dict(shape="llama3-1b", method="lora", seq=2048, batch=8),
            dict(shape="llama3-1b", method="full", seq=2048, batch=8),
            dict(shape="llama3-8b", method="lora", seq=2048, batch=2, remat="block")],
}


# Both sides clip the gradient's global norm, as jaxtune's recipes and HF's Trainer (max_grad_norm) do by default.
CLIP_GRAD_NORM = 1.0

# Each side's host malloc (jaxtune.host_memory): jaxtune as it ships ("auto": on the CPU it keeps freed
# memory for the next step), HF+PEFT as its users run it (glibc's defaults), and, so that the comparison
# is fair in both directions, HF+PEFT again with jaxtune's settings ("hf+peft+keep", CPU mode).
HOST_MALLOC = {"jaxtune": "auto", "hf+peft": "system", "hf+peft+keep": "keep", "hf+peft+compile": "system"}
# The two baselines every speed-up is reported against: (record key suffix, side, table heading).
BASELINES = (("", "hf+peft", "vs HF+PEFT"), ("_same_malloc", "hf+peft+keep", "vs HF+PEFT, same malloc"))


# ----------------------------------------------------------------------------- one workload (subprocess)


def _tokens(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    return rng.randint(0, vocab, (batch, seq)).astype(np.int32)


def _jax_side(work: dict[str, Any], hf_config: dict[str, Any], gpu: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune import tuning
    from jaxtune.models import hf
    from jaxtune.training import flops
    from jaxtune.training.optim import OptimizerConfig, build_optimizer
    from jaxtune.training.step import make_loss_fn, make_train_step
    from jaxtune.tuning.partition import partition

    bf16 = work.get("bf16", gpu)
    compute = "bfloat16" if bf16 else "float32"
    unroll = {"auto": "auto", "true": True, "false": False}[work.get("unroll_layers", "auto")]
    arch, cfg, module = hf.build(hf_config, dtype=compute, param_dtype=compute, remat=work.get("remat", "none"),
                                 unroll_layers=unroll)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    plan = tuning.lora(rank=16, alpha=32) if work["method"] == "lora" else tuning.full()
    tuned = tuning.apply_plan(hf.Pretrained(cfg, module, params, hf_config, "random", arch), plan,
                              frozen_dtype=jnp.bfloat16 if bf16 else None)
    del params
    trainable, frozen = partition(tuned.params, tuned.labels)
    optimizer, _ = build_optimizer(OptimizerConfig(learning_rate=1e-5, weight_decay=0.0, schedule="constant",
                                                   clip_grad_norm=CLIP_GRAD_NORM), 1000)
    step = jax.jit(make_train_step(make_loss_fn(tuned.module, "lm"), optimizer), donate_argnums=(0, 2))
    opt_state = optimizer.init(trainable)
    b, t = work["batch"], work["seq"]
    ids = _tokens(b, t, hf_config["vocab_size"])
    # One document a row, as PyTorch's side reads them: jaxtune's attention skips the key blocks a packed
    # row's other documents hold, so two documents a row would be less attention work than PyTorch's.
    weights = np.ones((b, t), np.float32)
    weights[:, t - 1] = 0
    batch = jax.device_put({"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_weights": weights,
                            "segment_ids": np.ones((b, t), np.int32),
                            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()})
    state = {"trainable": trainable, "opt": opt_state}

    def run(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            state["trainable"], state["opt"], metrics = step(state["trainable"], frozen, state["opt"], batch,
                                                             jax.random.key(i))
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    first = run(1)
    n_matmul, n_trainable = flops.matmul_params(tuned.params, tuned.labels)
    stats = jax.devices()[0].memory_stats() or {}
    return {"run": run, "first_step_s": first, "n_matmul": n_matmul, "n_trainable": n_trainable,
            "peak_memory": lambda: (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
            "device": jax.devices()[0].device_kind, "memory_before": stats.get("bytes_in_use")}


def _torch_side(work: dict[str, Any], hf_config: dict[str, Any], gpu: bool, compile_: bool) -> dict[str, Any]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = "cuda" if gpu else "cpu"
    config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    lora = work["method"] == "lora"
    bf16 = work.get("bf16", gpu)
    dtype = torch.bfloat16 if bf16 and lora else torch.float32
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if work.get("remat") == "block":
        model.gradient_checkpointing_enable()
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))  # adapters kept in fp32 by peft
    model.train()
    if compile_:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch_adamw(params, lr=1e-5, weight_decay=0.0)
    ids = torch.as_tensor(_tokens(work["batch"], work["seq"], hf_config["vocab_size"]), device=device).long()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    first = run(1)
    return {"run": run, "first_step_s": first, "adamw": adamw_kind(optimizer),
            "peak_memory": (lambda: torch.cuda.max_memory_allocated()) if gpu else (lambda: None)}


def _hf_config(work: dict[str, Any]) -> dict[str, Any]:
    return {**SHAPES[work["shape"]], "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "max_position_embeddings": max(4096, work["seq"])}


def serve_side(side: str, work: dict[str, Any], threads: int) -> None:
    """Worker loop: build one side, then answer ``run N`` with the seconds N steps took and
    ``stats`` with its counters, one JSON line each, until ``quit``."""
    gpu = work.get("gpu", False)
    if side.endswith("+keep"):  # before torch's threads allocate: see HOST_MALLOC
        import jaxtune.host_memory

        assert jaxtune.host_memory.configure(), "JAXTUNE_HOST_MALLOC=keep did not apply"
    hf_config = _hf_config(work)
    if side == "jaxtune":
        impl = _jax_side(work, hf_config, gpu)  # torch not imported: its thread pool is no part of this side
    else:
        import torch

        torch.set_num_threads(threads)
        impl = _torch_side(work, hf_config, gpu, compile_=side.endswith("compile"))
    impl["run"](2)  # warm-up beyond the first step (allocator, autotuning)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            print(json.dumps({"seconds": impl["run"](int(cmd[1]))}), flush=True)
        elif cmd[0] == "stats":
            print(json.dumps({k: impl.get(k) for k in ("first_step_s", "n_matmul", "n_trainable", "device", "adamw")}
                             | {"peak_memory_bytes": impl["peak_memory"]()}), flush=True)
        else:
            return


class _Worker:
    def __init__(self, side: str, work: dict[str, Any], threads: int, env: dict[str, str]):
        cmd = [sys.executable, __file__, "--serve", side, "--workload", json.dumps(work), "--threads", str(threads)]
        self.side = side
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ask(None)

    def ask(self, command: str | None) -> dict[str, Any]:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.side} worker failed:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def run_workload(work: dict[str, Any], rounds: int, steps: int, threads: int, compile_: bool,
                 env: dict[str, str], malloc: dict[str, str] = HOST_MALLOC) -> dict[str, Any]:
    """Both sides of one workload, in alternating timed rounds; returns the record."""
    from jaxtune.training import flops

    gpu = work.get("gpu", False)
    hf_config = _hf_config(work)
    names = ["jaxtune", "hf+peft"] + ([] if gpu else ["hf+peft+keep"]) + (["hf+peft+compile"] if compile_ else [])
    workers = {name: _Worker(name, work, threads, {**env, "JAXTUNE_HOST_MALLOC": malloc[name]}) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        # Every other round in the reverse order, so that no side always runs right after another.
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(workers[name].ask(f"run {steps}")["seconds"] / steps)
    stats = {name: worker.ask("stats") for name, worker in workers.items()}
    for worker in workers.values():
        worker.close()
    tokens = work["batch"] * work["seq"]
    head_dim = hf_config.get("head_dim", hf_config["hidden_size"] // hf_config["num_attention_heads"])
    model_flops = flops.train_flops_per_token(
        stats["jaxtune"]["n_matmul"], stats["jaxtune"]["n_trainable"], layers=hf_config["num_hidden_layers"],
        attn_width=hf_config["num_attention_heads"] * head_dim, seq_len=work["seq"])
    device = stats["jaxtune"]["device"]
    peak = flops.peak_flops(device, dtype="bfloat16" if work.get("bf16", gpu) else "float32")
    result = {"workload": work, "device": device, "tokens_per_step": tokens, "flops_per_token": model_flops,
              "sides": {}}
    for name in names:
        step_s = statistics.median(times[name])
        tps = tokens / step_s
        result["sides"][name] = {"tokens_per_s": tps, "step_s": step_s, "all_step_s": times[name],
                                 "mfu": tps * model_flops / peak if peak else None,
                                 "peak_memory_bytes": stats[name]["peak_memory_bytes"],
                                 "first_step_s": stats[name]["first_step_s"]}
        if stats[name].get("adamw"):
            result["sides"][name]["adamw"] = stats[name]["adamw"]
    for suffix, base, _ in BASELINES:
        if base in times:  # hf+peft+keep: CPU mode only
            for name in names:
                result["sides"][name] |= paired_speedups(times[base], times[name], suffix)
    return result


def rescore(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A recorded run's results with every side's speed-ups recomputed from its rounds' step times, over
    both baselines (records written before both were reported hold only the one over plain HF+PEFT)."""
    for result in record["results"]:
        times = {name: side["all_step_s"] for name, side in result["sides"].items()}
        for suffix, base, _ in BASELINES:
            if base in times:
                for name, side in result["sides"].items():
                    side |= paired_speedups(times[base], times[name], suffix)
    return record["results"]


def paired_speedups(base: list[float], own: list[float], suffix: str) -> dict[str, Any]:
    """A side's speed-up over ``base`` from their per-round step times: each round's ratio and their
    median. Paired by round: both sides of a round ran within seconds of each other, so a drift of the
    machine's speed between rounds (this VM's moves by up to 1.5x within minutes) cancels in the ratio."""
    ratios = [b / o for b, o in zip(base, own)]
    return {f"round_speedups_vs_hf{suffix}": ratios, f"speedup_vs_hf{suffix}": statistics.median(ratios)}


def speedups_text(side: dict[str, Any], sep: str = " | ") -> str:
    """A side's speed-ups over both baselines (``n/a`` where a mode has no ``hf+peft+keep`` arm)."""
    return sep.join(f"{side[f'speedup_vs_hf{suffix}']:.2f}x" if f"speedup_vs_hf{suffix}" in side else "n/a"
                    for suffix, _, _ in BASELINES)


# ----------------------------------------------------------------------------- driver


def table(results: list[dict[str, Any]]) -> str:
    headings = " | ".join(h for _, _, h in BASELINES)
    rows = [f"| workload | side | tokens/s | {headings} | MFU | peak memory | first step |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["workload"]
        name = f"{w['shape']} {w['method']} b{w['batch']}x{w['seq']}" + (" bf16" if w.get("bf16") else "")
        for side, s in r["sides"].items():
            mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] else "n/a"
            mem = f"{s['peak_memory_bytes'] / 2**30:.2f} GiB" if s["peak_memory_bytes"] else "n/a"
            rows.append(f"| {name} | {side} | {s['tokens_per_s']:.0f} | {speedups_text(s)} | {mfu} | {mem} | "
                        f"{s['first_step_s']:.1f} s |")
    return "\n".join(rows)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Both of jaxtune's speed-ups under each workload, neither hidden (the bars show tokens/s).
    labels = [f"{r['workload']['shape']}\n{r['workload']['method']}" + (" bf16" if r['workload'].get('bf16') else "")
              + "\njaxtune " + speedups_text(r["sides"]["jaxtune"], " / ") for r in results]
    sides = list(results[0]["sides"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results), 3.6))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        ax.bar([x + i * width for x in range(len(results))], [r["sides"][side]["tokens_per_s"] for r in results],
               width, label=side)
    ax.set_xticks([x + width * (len(sides) - 1) / 2 for x in range(len(results))], labels)
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"jaxtune vs HF+PEFT on {results[0]['device']}\n(speed-ups: {' / '.join(h for _, _, h in BASELINES)})",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="same as --mode smoke")
    ap.add_argument("--rounds", type=int, default=None, help="alternating timed rounds per side")
    ap.add_argument("--steps", type=int, default=None, help="steps per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each side")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd HF+PEFT")
    ap.add_argument("--jaxtune-host-malloc", choices=("auto", "keep", "system"), default="auto",
                    help="JAXTUNE_HOST_MALLOC for jaxtune (system: glibc's defaults, as before it kept freed memory)")
    ap.add_argument("--jaxtune-unroll-layers", choices=("auto", "true", "false"), default="auto",
                    help="jaxtune's model.unroll_layers (auto: as it ships; false: the layer loop, as before it)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput-MODE.json)")
    ap.add_argument("--rescore", nargs="+", default=None, metavar="JSON",
                    help="print both speed-ups of recorded runs (a record, or a file of them under 'runs'), "
                    "recomputed from their rounds; runs nothing")
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)  # internal: worker mode
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rescore:
        for path in args.rescore:
            data = json.loads(Path(path).read_text())
            for record in data.get("runs", [data]):
                if not all("sides" in result for result in record["results"]):  # an older summary, no rounds
                    print(f"\n{path}: {record.get('name') or record.get('date')}: no per-round record; skipped")
                    continue
                print(f"\n{path}: {record.get('date')} (load {record.get('load_average_at_start')})\n"
                      f"{table(rescore(record))}")
        return
    mode = "smoke" if args.smoke else args.mode
    rounds = args.rounds or (1 if mode == "smoke" else 9)
    steps = args.steps or (1 if mode == "smoke" else 3)
    if args.serve is not None:
        serve_side(args.serve, json.loads(args.workload), args.threads)
        return
    env = worker_env()
    load_at_start = load_average()
    malloc = {**HOST_MALLOC, "jaxtune": args.jaxtune_host_malloc}
    results = []
    for work in MODES[mode]:
        results.append(run_workload({**work, "gpu": mode == "gpu", "unroll_layers": args.jaxtune_unroll_layers},
                                    rounds, steps, args.threads,
                                    args.torch_compile, env, malloc))
        print(f"done {work['shape']} {work['method']}", file=sys.stderr)
    record = {"date": now(), "command": " ".join(sys.argv), "mode": mode, "machine": machine(),
              "load_average_at_start": load_at_start,
              "threads_per_side": args.threads, "rounds": rounds, "steps_per_round": steps,
              "host_malloc": malloc, "jaxtune_unroll_layers": args.jaxtune_unroll_layers,
              "versions": versions(), "shapes": {w["shape"]: SHAPES[w["shape"]] for w in MODES[mode]},
              "results": results}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"throughput-{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    chart(results, out.with_suffix(".png"))
    print(table(results))
    print(f"\n{record['date']}, {record['machine']}, {results[0]['device']}; "
          f"JSON {out}, chart {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

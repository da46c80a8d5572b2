"""Memory of loading and planning a model, up to the Trainer's placement: jaxtune loaded on the
device (``jt.load``'s default), jaxtune loaded on the host (``on_host=True``, what ``jaxtune train``
does), and transformers + peft (``from_pretrained`` then ``get_peft_model``), each in a fresh process.

The model is a random transformers ``LlamaForCausalLM`` saved as safetensors (hidden 1024, MLP 4096,
16 layers, vocabulary 1000: 936 MiB of fp32 weights by default). Per phase it records the seconds, the
process's peak resident memory (glibc's own malloc: ``JAXTUNE_HOST_MALLOC=system``, so freed memory
goes back), and what the device holds: on a GPU its allocator's peak (``memory_stats``,
``torch.cuda.max_memory_allocated``); on the CPU, where device memory is host memory, the bytes of the
live arrays (jax) or of the model's tensors (torch) at the phase's end.

    python benchmarks/load_memory.py                 # LoRA r=8 on every linear, and NF4 + LoRA (jaxtune)
    python benchmarks/load_memory.py --layers 4      # a quick look

Both sides import their modules before the clock starts (transformers' tokenizer and torch on jaxtune's
side, which ``jt.load`` needs); each phase's seconds are its own work. Writes
``benchmarks/results/load-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_average, machine, now, versions, worker_env

MIB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_model(path: Path, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=4)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def jaxtune_side(model_dir: str, plan_name: str, on_host: bool) -> list[dict]:
    import jax
    import transformers.models.auto.tokenization_auto  # noqa: F401 - imported before the clock, as torch's side

    import jaxtune as jt
    from jaxtune.models import load  # noqa: F401 - jt.load's modules, imported lazily
    from jaxtune.training import trainer  # noqa: F401
    from jaxtune.training.config import TrainConfig
    from jaxtune.training.optim import OptimizerConfig

    device = jax.devices()[0]

    def held() -> float:
        stats = device.memory_stats()
        if stats:  # an accelerator's allocator
            return stats["peak_bytes_in_use"] / MIB
        return sum(x.nbytes for x in jax.live_arrays()) / MIB

    phases, start = [], time.perf_counter()

    def phase(name: str) -> None:
        nonlocal start
        phases.append({"phase": name, "seconds": round(time.perf_counter() - start, 2),
                       "peak_rss_mib": round(peak_rss_mib()), "device_mib": round(held())})
        start = time.perf_counter()

    model = jt.load(model_dir, on_host=on_host)
    phase("load")
    plan = jt.lora(rank=8) if plan_name == "lora" else jt.freeze(quantize="nf4") + jt.lora(rank=8)
    tuned = jt.apply_plan(model, plan)
    phase("apply_plan")
    del model  # as jaxtune train does: the caller keeps only the planned model
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = jt.Trainer(tuned, train_data=(), optimizer=OptimizerConfig(learning_rate=1e-4),
                             config=TrainConfig(steps=1, progress=False), run_dir=run_dir)
        del tuned
        phase("Trainer (placed)")
        del trainer
    return phases


def torch_side(model_dir: str, plan_name: str) -> list[dict]:
    import peft
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401 - imported before the clock

    cuda = torch.cuda.is_available()

    def held(model: torch.nn.Module) -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / MIB
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / MIB

    phases, start = [], time.perf_counter()

    def phase(name: str, model: torch.nn.Module) -> None:
        nonlocal start
        phases.append({"phase": name, "seconds": round(time.perf_counter() - start, 2),
                       "peak_rss_mib": round(peak_rss_mib()), "device_mib": round(held(model))})
        start = time.perf_counter()

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              device_map="cuda" if cuda else None)
    phase("from_pretrained", model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    phase("get_peft_model", model)
    return phases


def worker(side: str, model_dir: str, plan_name: str) -> None:
    phases = torch_side(model_dir, plan_name) if side == "torch" else jaxtune_side(model_dir, plan_name,
                                                                                 side == "jaxtune-host")
    print("RESULT " + json.dumps(phases), flush=True)


def run_worker(side: str, model_dir: Path, plan_name: str) -> list[dict]:
    proc = subprocess.run([sys.executable, __file__, "--worker", side, str(model_dir), plan_name], cwd=ROOT,
                          env=worker_env(JAXTUNE_HOST_MALLOC="system"), capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} {plan_name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--worker", nargs=3, metavar=("SIDE", "MODEL_DIR", "PLAN"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load-memory.json"))
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    record = {"date": now(), "command": " ".join(["python", *sys.argv]), "machine": machine(),
              "versions": versions(), "load_average_at_start": load_average(), "layers": args.layers, "runs": []}
    with tempfile.TemporaryDirectory(prefix="jaxtune-load-memory-") as tmp:
        model_dir = Path(tmp) / "llama"
        save_model(model_dir, args.layers)
        for side, plan_name in (("jaxtune-device", "lora"), ("jaxtune-host", "lora"), ("torch", "lora"),
                                ("jaxtune-device", "nf4"), ("jaxtune-host", "nf4")):
            phases = run_worker(side, model_dir, plan_name)
            record["runs"].append({"side": side, "plan": plan_name, "phases": phases})
            for p in phases:
                print(f"{side:15} {plan_name:5} {p['phase']:17} {p['seconds']:6.2f} s  peak RSS "
                      f"{p['peak_rss_mib']:6} MiB  device {p['device_mib']:6} MiB", flush=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['date']}, {record['machine']}, load {record['load_average_at_start']}; JSON {args.out}")


if __name__ == "__main__":
    main()

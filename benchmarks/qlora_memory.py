"""Will a QLoRA step fit? The compiled LoRA train step of a Llama-3.1-8B-shaped model, with its
frozen base in NF4 (or bf16 for comparison), asked for its memory ahead of time.

No weights are made: the params are ``jax.ShapeDtypeStruct`` leaves (the plan applied under
``jax.eval_shape``), and the jaxtune train step (LM loss, AdamW, LoRA on every linear) is
``jax.jit(...).lower(...).compile()``d for one device; XLA's ``memory_analysis()`` then gives the
bytes of the arguments (params, optimizer state, batch), the outputs and the temporaries. The
donated trainable params and optimizer state alias their outputs, so the predicted peak is
arguments + temporaries.

    python benchmarks/qlora_memory.py                 # CPU compile (a few minutes), JSON to results/
    python benchmarks/qlora_memory.py --layers 2      # a quick look at the same shapes, 2 layers
    python benchmarks/qlora_memory.py --backend gpu   # the same on a GPU (compiled for it)

On the CPU backend the compiler is XLA:CPU, whose fusion and scheduling differ from a GPU's: the
figure predicts the program's footprint, not a GPU allocator's peak (run ``--backend gpu`` there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from common import ROOT, machine, now, versions  # puts this checkout on the path
from flax.traverse_util import flatten_dict

from jaxtune import tuning
from jaxtune.models import hf, quant
from jaxtune.models.layers import REMAT_POLICIES
from jaxtune.training.memory import abstract_plan
from jaxtune.training.optim import OptimizerConfig, build_optimizer
from jaxtune.training.step import jit_train_step, make_loss_fn

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
GB = 2 ** 30


def step_memory(quantize: str | None, *, layers: int, seq: int, batch: int, rank: int, remat: str,
                chunk_tokens: int) -> dict:
    """Compile the LoRA step on abstract params; its memory analysis in bytes and GiB."""
    hf_config = {**LLAMA_31_8B, "num_hidden_layers": layers}
    arch, cfg, module = hf.build(hf_config, dtype="bfloat16", param_dtype="bfloat16", remat=remat)
    pretrained = hf.Pretrained(cfg, module, hf.abstract_params(module, cfg), hf_config, "llama-3.1-8b-shape", arch)
    plan = (tuning.freeze(quantize=quantize) if quantize else tuning.Plan()) + tuning.lora(rank, alpha=2 * rank)
    tuned = abstract_plan(pretrained, plan)
    trainable, frozen = tuning.partition(tuned.params, tuned.labels)
    groups, _ = tuning.partition(tuned.labels, tuned.labels)
    optimizer, _ = build_optimizer(OptimizerConfig(learning_rate=1e-4), 1000, groups)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    step = jit_train_step(make_loss_fn(tuned.module, "lm", chunk_tokens=chunk_tokens), optimizer)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_spec = {"input_ids": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
                  "loss_weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    started = time.perf_counter()
    compiled = step.lower(
        trainable, frozen, opt_state, batch_spec, jax.eval_shape(lambda: jax.random.key(0))).compile()
    seconds = time.perf_counter() - started
    mem = compiled.memory_analysis()
    frozen_bytes = sum(quant.nbytes(x) for x in flatten_dict(frozen).values())
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    return {
        "base": quantize or "bf16", "layers": layers, "seq": seq, "batch": batch, "lora_rank": rank, "remat": remat,
        "chunk_tokens": chunk_tokens,
        "frozen_GiB": frozen_bytes / GB, "trainable_params": tuning.count(trainable),
        "arguments_GiB": mem.argument_size_in_bytes / GB, "temporaries_GiB": mem.temp_size_in_bytes / GB,
        "outputs_GiB": mem.output_size_in_bytes / GB, "aliased_GiB": mem.alias_size_in_bytes / GB,
        "predicted_peak_GiB": peak / GB, "compile_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--remat", default="block", choices=REMAT_POLICIES)
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="train.chunk_tokens: tokens per logits chunk")
    parser.add_argument("--bases", default="nf4,bf16", help="comma-separated: nf4, nf4_dq, int8, fp8, bf16")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "gpu", "tpu"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora-memory.json"))
    args = parser.parse_args()
    jax.config.update("jax_platforms", args.backend)
    rows = []
    for base in args.bases.split(","):
        row = step_memory(None if base == "bf16" else base, layers=args.layers, seq=args.seq, batch=args.batch,
                          rank=args.rank, remat=args.remat, chunk_tokens=args.chunk_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "date": now(),
              "machine": machine(), "backend": jax.default_backend(), "load_average": os.getloadavg(),
              "versions": versions(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

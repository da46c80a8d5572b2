"""Host overhead of the Trainer loop per step, against the bare jitted step on the same batches.

    python benchmarks/step_overhead.py [--steps 60] [--smoke]

Both sides run the same compiled step on a tiny Llama (LoRA r8) with batches from the real
grain loader. "bare" dispatches the step in a Python loop and blocks once at the end; "trainer"
is ``Trainer.fit`` (loader, global-batch assembly, metrics every ``log_every`` steps, one
checkpoint at the end). The difference per step is what jaxtune's loop costs on the host.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts this checkout's jaxtune first on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="timed steps (multiple of 10)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, to check the script works")
    args = ap.parse_args()
    steps = 10 if args.smoke else args.steps
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    import jax
    from helpers import tiny_hf_model

    from jaxtune import tuning
    from jaxtune.data import LoaderConfig, make_loader
    from jaxtune.data.sources import read_source
    from jaxtune.data.testing import synthetic_chat_rows, tiny_tokenizer, write_jsonl
    from jaxtune.models import hf
    from jaxtune.training.config import TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.sharding import MeshConfig, global_batch, make_mesh
    from jaxtune.training.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="jaxtune-overhead-"))
    tiny_hf_model("LlamaForCausalLM", work / "model")
    data = write_jsonl(work / "chat.jsonl", synthetic_chat_rows(512, seed=0))
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    loader = make_loader(read_source(data, "chat"), tiny_tokenizer(),
                         LoaderConfig(batch_size=8, max_length=128, num_epochs=None), scan_first=False)

    def trainer(run: str, n: int) -> Trainer:
        tuned = tuning.apply_plan(hf.load_pretrained(work / "model"), tuning.lora(rank=8))
        return Trainer(tuned, train_data=loader, optimizer=OptimizerConfig(), mesh=mesh, run_dir=work / run,
                       config=TrainConfig(steps=n, log_every=10, progress=False))

    bare = trainer("bare", steps)
    it = iter(loader)
    batches = [global_batch(next(it), mesh) for _ in range(steps)]
    tr, st = bare.trainable, bare.opt_state
    tr, st, m = bare.train_step(tr, bare.frozen, st, batches[0], jax.random.key(0))  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        tr, st, m = bare.train_step(tr, bare.frozen, st, batch, jax.random.key(i))
    jax.block_until_ready(m)
    bare_s = (time.perf_counter() - start) / steps

    # The trainer's first logging window includes its compile; time the windows after it.
    looped = trainer("loop", steps + 10)
    looped.fit()
    windows = [json.loads(line) for line in (work / "loop" / "metrics.jsonl").read_text().splitlines()][1:]
    loop_s = sum(1.0 / w["steps_per_s"] for w in windows) / len(windows)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, "
              f"{__import__('os').cpu_count()} cores", "steps": steps, "bare_step_ms": 1e3 * bare_s,
              "trainer_step_ms": 1e3 * loop_s, "host_overhead_ms": 1e3 * (loop_s - bare_s)}
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

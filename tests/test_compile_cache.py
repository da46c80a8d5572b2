"""Compile once per machine: a second process training the same shapes loads the compiled step
from the persistent cache instead of compiling it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import tiny_hf_model

from jaxtune.data.testing import synthetic_chat_rows, tiny_tokenizer, write_jsonl

SCRIPT = textwrap.dedent("""
    import json, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jaxtune as jt
    model_dir, data, run_dir = sys.argv[1:4]
    model = jt.apply_plan(jt.load(model_dir), jt.lora(rank=4))
    train, _ = jt.read(data, kind="chat")
    trainer = jt.Trainer(model, train, run_dir=run_dir, config=jt.TrainConfig(steps=2, progress=False),
                         data=jt.DataConfig(batch_size=4, max_length=64))
    trainer.fit()
    print(json.dumps({"hit": trainer.compile_cache_hit}))
""")


@pytest.mark.slow
def test_a_second_run_loads_the_compiled_step(tmp_path):
    tiny_hf_model("LlamaForCausalLM", tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", synthetic_chat_rows(32, seed=0, max_words=6))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}

    def run(name: str) -> bool:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model"), str(data), str(tmp_path / name)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["hit"]

    assert run("first") is False  # an empty cache: the step compiles
    assert list((tmp_path / "xla").iterdir())  # and is written to disk
    assert run("second") is True  # another process, another run directory: loaded, not compiled

"""Checkpoint verification on two JAX processes (one CPU device each, on localhost) sharing one
file system, as on a pod: process 0 hashes, the others learn its verdict, and a damaged step is
moved aside while no process reads it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoint_integrity import damage
from test_processes import _processes

from jaxtune.training.checkpoint import Checkpointer
from jaxtune.training.checkpoint_integrity import MANIFEST, SET_ASIDE

SCRIPT = Path(__file__).with_name("checkpoint_processes_script.py")
pytestmark = pytest.mark.slow


def test_two_processes_hash_a_step_once_and_agree_on_its_set_aside(tmp_path):
    """Every process hashed every file of every step it tried (N times the bytes of a multi-GB step
    on a shared file system), and a process still hashing the damaged newest step when process 0
    moved it aside hit a raw FileNotFoundError while process 0 waited for it (both stopped). Now
    process 0 alone hashes, both fall back to step 4 together, and step 8 is moved aside once."""
    run = tmp_path / "run"
    with Checkpointer(run, with_data=False) as writer:
        for step in (4, 8):
            writer.save(step, {"w": np.arange(8.0, dtype=np.float32) + step}, {}, jax.random.key(0))
    damage(run / "checkpoints" / "8" / "trainable", "flipped_bit")
    (tmp_path / "out").mkdir()
    _processes([str(SCRIPT), "{address}", "{process}", "{count}", str(run), str(tmp_path / "out")],
               tmp_path / "out", timeout=120)
    results = [json.loads((tmp_path / "out" / f"restore-{i}.json").read_text()) for i in range(2)]
    assert [r["step"] for r in results] == [4, 4]
    assert [r["w"] for r in results] == [(np.arange(8.0) + 4).tolist()] * 2
    assert results[1]["hashed"] == []
    step_4 = {f"4/{rel}" for rel in json.loads((run / "checkpoints" / "4" / MANIFEST).read_text())["files"]}
    assert len(results[0]["hashed"]) == len(set(results[0]["hashed"])) and step_4 <= set(results[0]["hashed"])
    assert Checkpointer(run).steps() == [4]
    assert [p.name.split("-")[0] for p in (run / "checkpoints" / SET_ASIDE).iterdir() if p.is_dir()] == ["8"]

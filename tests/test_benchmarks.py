"""Benchmarks are not timed tests: CI runs each at a smoke size to check it still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path):
    proc = _run(str(BENCH / "throughput.py"), "--smoke", "--out", str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "t.json").read_text())
    assert {r["workload"]["method"] for r in record["results"]} == {"lora", "full"}
    for r in record["results"]:
        assert set(r["sides"]) == {"jaxtune", "hf+peft"} and all(s["tokens_per_s"] > 0 for s in r["sides"].values())
    assert (tmp_path / "t.png").stat().st_size > 0 and "| workload | side |" in proc.stdout


@pytest.mark.slow
def test_step_overhead_benchmark_smoke():
    proc = _run(str(BENCH / "step_overhead.py"), "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert record["bare_step_ms"] > 0 and record["trainer_step_ms"] > 0


@pytest.mark.slow
def test_data_throughput_benchmark_smoke():
    proc = _run(str(BENCH / "data_throughput.py"), "--smoke", "--tokenizer", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout + proc.stderr

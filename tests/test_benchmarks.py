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
    assert any(r["workload"].get("bf16") for r in record["results"])  # GPU mode's precision, on the CPU
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


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    """Both sides of three tasks (full + pooler head, chat LoRA with choice accuracy, LoRA +
    regression head) run end to end on the real assets; the base metrics of the chat task are
    the same model's, so the two sides must agree on them."""
    tasks = "minilm-full,smollm2-chat-lora,vader-lora-head"
    proc = _run(str(BENCH / "quality.py"), "--smoke", "--tasks", tasks, "--out", str(tmp_path / "q.json"),
                "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "q.json").read_text())
    assert [t["task"] for t in record["tasks"]] == tasks.split(",")
    for task in record["tasks"]:
        metric = task["metric"]
        for side in ("jaxtune", "pytorch"):
            s = task["sides"][side]
            assert s["steps"] == 2 and s["train_s"] > 0 and 0 <= abs(s["after"][metric]) <= 1
        if task["task"] == "smollm2-chat-lora":  # the same pretrained model, scored the same way
            # (one near-tie of the 16 answers may flip between the two numerics)
            before = [task["sides"][side]["before"][metric] for side in ("jaxtune", "pytorch")]
            assert abs(before[0] - before[1]) <= 1 / 16 + 1e-9
    assert "| task | side | metric |" in proc.stdout

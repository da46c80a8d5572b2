"""Benchmarks are not timed tests: CI runs each at a smoke size to check it still works."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
REAL_RUN = subprocess.run  # the quality fixture replaces subprocess.run with canned worker results


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
        # HF+PEFT twice: glibc's malloc, and jaxtune's host-memory settings (fair in both directions)
        assert set(r["sides"]) == {"jaxtune", "hf+peft", "hf+peft+keep"}
        assert all(s["tokens_per_s"] > 0 for s in r["sides"].values())
        # The speed-up is paired by round (each round's ratio, their median), over both baselines: HF+PEFT as
        # its users run it, and HF+PEFT with jaxtune's allocator settings; neither is left out of the record.
        for suffix, base in (("", "hf+peft"), ("_same_malloc", "hf+peft+keep")):
            hf = r["sides"][base]["all_step_s"]
            for s in r["sides"].values():
                assert s[f"round_speedups_vs_hf{suffix}"] == [a / b for a, b in zip(hf, s["all_step_s"])]
                assert s[f"speedup_vs_hf{suffix}"] == statistics.median(s[f"round_speedups_vs_hf{suffix}"])
            assert r["sides"][base][f"speedup_vs_hf{suffix}"] == 1.0
        assert {r["sides"][side]["adamw"] for side in ("hf+peft", "hf+peft+keep")} == {"fused"}  # on the CPU too
    assert record["host_malloc"] == {"jaxtune": "auto", "hf+peft": "system", "hf+peft+keep": "keep",
                                     "hf+peft+compile": "system"}
    assert (tmp_path / "t.png").stat().st_size > 0 and "| vs HF+PEFT | vs HF+PEFT, same malloc |" in proc.stdout


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
def test_gradient_precision_benchmark_smoke(tmp_path):
    """One small batch: both float32 gradients are close to the float64 one (the real weights; their
    BatchNorms keep float32's error near 1e-3 of the gradient's norm), and the record holds both sides."""
    proc = _run(str(BENCH / "gradient_precision.py"), "--batches", "1", "--batch-size", "4", "--size", "64",
                "--out", str(tmp_path / "g.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads((tmp_path / "g.json").read_text())["rows"]
    for side in ("jaxtune_fp32", "pytorch_fp32"):
        assert row[side]["loss"] < 1e-5 and row[side]["gradient"] < 2e-2 and row[side]["leaves"] == 53
    assert "| batch | side |" in proc.stdout


@pytest.mark.slow
def test_packing_audit_smoke(tmp_path):
    """packing_audit.py counts each packed task's epoch both ways and PyTorch's padded token slots."""
    proc = _run(str(BENCH / "packing_audit.py"), "--smoke", "--out", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "p.json").read_text())
    assert [t["task"] for t in record["tasks"]] == ["minilm-lora-head", "vader-lora-head", "smollm2-chat-lora"]
    for task in record["tasks"]:
        for counts in task["packed"].values():  # the packer never fills fewer rows than the token count allows
            assert counts["new_rows"] >= counts["old_rows"] > 0
        assert task["pytorch"]["token_slots"] >= task["pytorch"]["real_tokens"] > 0
    assert "| task | rows a step |" in proc.stdout


@pytest.mark.slow
def test_quality_benchmark_smoke(tmp_path):
    """Both sides of two tasks (chat LoRA with choice accuracy, LoRA + regression head) run end to end
    on the real assets; the base metrics of the chat task are the same model's, so the two sides must
    agree on them. (Each side of a task is a process of its own, tens of seconds of CI: the
    classification tasks' scoring is checked with canned outputs below.)"""
    tasks = "smollm2-chat-lora,vader-lora-head"
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


@pytest.fixture
def quality(monkeypatch):
    """benchmarks/quality.py as a module, its workers replaced by canned results (``quality.outputs``)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))  # quality.py imports its sibling common.py, as a script does
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, quality)  # its dataclasses look their module up there
    spec.loader.exec_module(quality)
    quality.outputs = {
        "pytorch": {"before_outputs": [[0.0, 1.0], [1.0, 0.0]], "after_outputs": [[1.0, 0.0], [1.0, 0.0]],
                    "labels": [0, 0], "steps": 2, "train_s": 1.0},
        "trl": {"before": {"rewards/accuracy": 0.0, "logps/accuracy": 0.7, "rewards/margin": 0.0},
                "after": {"rewards/accuracy": 0.75, "logps/accuracy": 0.8, "rewards/margin": 0.4}, "steps": 2,
                "train_s": 1.0},
        "jaxtune": {"before": {"rewards/accuracy": 0.0, "logps/accuracy": 0.7, "rewards/margin": 0.0},
                    "after": {"rewards/accuracy": 0.8, "logps/accuracy": 0.8, "rewards/margin": 0.5}, "steps": 2,
                    "train_s": 1.0},
    }
    monkeypatch.setattr(quality.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(
        cmd, 0, stdout=json.dumps(quality.outputs[cmd[cmd.index("--worker") + 1]]) + "\n", stderr=""))
    return quality


def test_quality_run_side_scores_raw_predictions_and_passes_scored_sides_through(quality, tmp_path):
    """A side that returns raw predictions (PyTorch) is scored by the driver; one that scores itself
    (jaxtune, TRL's DPOTrainer) passes through: the full DPO run once lost TRL's 30-minute result
    to a KeyError here."""
    task = quality.TASKS["minilm-full"]
    scored = quality.run_side("t", task, "pytorch", {}, tmp_path, {})
    assert scored["before"]["accuracy"] == 0.5 and scored["after"]["accuracy"] == 1.0 and scored["steps"] == 2
    assert "before_outputs" not in scored and scored["wall_s"] >= 0
    passed = quality.run_side("t", quality.TASKS["smollm2-dpo-lora"], "trl", {}, tmp_path, {})
    assert passed["after"] == quality.outputs["trl"]["after"] and passed["before"] == quality.outputs["trl"]["before"]


def test_quality_scores_an_image_classification_with_the_test_cross_entropy(quality):
    """The PyTorch side's raw logits get the test loss jaxtune's evaluation reports (a continuous
    metric that paired runs compare beside the accuracy), equal to torch's cross-entropy."""
    import numpy as np
    import torch

    logits = np.random.default_rng(0).normal(size=(50, 10)) * 5
    labels = np.random.default_rng(1).integers(0, 10, 50)
    metrics = quality.score(quality.IMAGE_TASKS["fashion-mnist-lite0"], logits.tolist(), labels.tolist())
    reference = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert metrics["loss"] == pytest.approx(reference, rel=1e-12)
    assert metrics["accuracy"] == np.mean(logits.argmax(-1) == labels)
    assert "loss" not in quality.score(quality.TASKS["minilm-full"], logits.tolist(), labels.tolist())


def test_quality_seeded_runs_are_logged_as_each_ends(quality, tmp_path):
    """Each finished seed is appended to the log at once (a stopped run of hours keeps it), and the
    summary is the mean and min..max over the seeds."""
    import dataclasses

    task = dataclasses.replace(quality.TASKS["smollm2-dpo-lora"], seeds=(0, 1))
    log = tmp_path / "q.runs.jsonl"
    record = quality.run_seeds("dpo", task, {}, tmp_path, {}, ["jaxtune", "pytorch"], log=log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["side"], r["seed"]) for r in lines] == [("jaxtune", 0), ("jaxtune", 1), ("trl", 0), ("trl", 1)]
    assert lines[0]["after"]["rewards/accuracy"] == 0.8 and all(r["task"] == "dpo" for r in lines)
    summary = record["sides"]["jaxtune"]["summary"]["after/rewards/accuracy"]
    assert summary == {"mean": 0.8, "min": 0.8, "max": 0.8}
    assert set(record["sides"]) == {"jaxtune", "trl"}


def test_quality_merge_combines_seeded_records_of_separate_runs(quality, tmp_path):
    """Records of one side or a few seeds each (how the hours-long DPO task is run) merge into one
    table: runs by seed per side, the summary over all of them; a seed found twice, or a task run
    with another setup, is an error naming the files."""
    import dataclasses

    base = quality.TASKS["smollm2-dpo-lora"]
    paths = []
    for seed, side, accuracy in ((0, "jaxtune", 0.8), (1, "jaxtune", 0.9), (1, "pytorch", 0.7)):
        quality.outputs["jaxtune"]["after"]["rewards/accuracy"] = accuracy
        quality.outputs["trl"]["after"]["rewards/accuracy"] = accuracy
        record = quality.run_seeds("dpo", dataclasses.replace(base, seeds=(seed,)), {}, tmp_path, {}, [side])
        paths.append(tmp_path / f"{side}{seed}.json")
        paths[-1].write_text(json.dumps({"date": "d", "tasks": [record]}))
    merged = quality.merge_records(paths)
    (task,) = merged["tasks"]
    assert task["setup"]["seeds"] == [0, 1] and [s["file"] for s in merged["merged_from"]] == list(map(str, paths))
    jax_side = task["sides"]["jaxtune"]
    assert [r["seed"] for r in jax_side["runs"]] == [0, 1]
    assert jax_side["summary"]["after/rewards/accuracy"] == pytest.approx({"mean": 0.85, "min": 0.8, "max": 0.9})
    assert task["sides"]["trl"]["summary"]["after/rewards/accuracy"]["mean"] == 0.7
    assert "| dpo | jaxtune (2 seeds) | rewards/accuracy |" in quality.table(merged["tasks"])

    older = json.loads(paths[1].read_text())
    del older["tasks"][0]["setup"]["beta"]  # a record from before a field existed ran with its default (0.1)
    paths[1].write_text(json.dumps(older))
    assert quality.merge_records(paths)["tasks"][0]["setup"]["beta"] == base.beta == 0.1

    with pytest.raises(ValueError, match=r"jaxtune seed 0 of 'dpo' is also in .*jaxtune0\.json"):
        quality.merge_records([paths[0], paths[0]])
    other = json.loads(paths[2].read_text())
    other["tasks"][0]["setup"]["beta"] = 0.5
    paths[2].write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"pytorch1\.json: task 'dpo' was run with another setup"):
        quality.merge_records(paths)


@pytest.mark.slow
def test_paired_image_runs_give_pytorch_jaxtunes_row_order_and_head_init(quality, tmp_path, monkeypatch):
    """``quality.py --paired``: the PyTorch side reads the rows in the order jaxtune's run reads them
    (its trainer's loader: a whole epoch and the next epoch's first batch) and starts its head from
    the run's initial head; the model directory has no random parts. ``--recalibrate`` reaches the run."""
    import dataclasses

    import numpy as np
    import quality_images as images  # quality.py's sibling (the fixture put benchmarks/ on the path)
    from flax.traverse_util import flatten_dict
    from helpers import skip_or_fail

    from jaxtune import config as config_lib
    from jaxtune.assets import FetchError
    from jaxtune.data.images import read_images
    from jaxtune.recipe import trainer_for

    task = dataclasses.replace(images.IMAGE_TASKS["fashion-mnist-lite0"], train=64, test=16, batch_size=16, epochs=2,
                               seeds=(3,), paired=True, recalibrate=2)
    try:
        files = {k: str(v) for k, v in images.write_image_data(task, tmp_path).items()}
    except FetchError as err:
        skip_or_fail(f"EfficientNet-Lite0 or Fashion-MNIST could not be fetched here: {err}")
    config = json.loads((Path(files["model"]) / "config.json").read_text())
    assert config["dropout_rate"] == config["drop_connect_rate"] == 0.0
    train = read_images(files["train"], "classification")
    monkeypatch.setattr(subprocess, "run", REAL_RUN)  # the fixture's canned workers stand in for quality.py's only
    order, (kernel, bias) = images.paired_start(task, files)  # in a process of its own, as the PyTorch side runs it
    assert sorted(order[:64]) == list(range(64)) and not np.array_equal(order[:64], order[64:128])

    recipe = images.jaxtune_image_recipe(task, files, str(tmp_path / "run"))
    trainer = trainer_for(config_lib.validate(config_lib.from_data(config_lib.Config, recipe)))
    labels = [batch["labels"] for _, batch in zip(range(5), trainer.train_data)]  # 4 batches an epoch, then 1
    np.testing.assert_array_equal(np.concatenate(labels), train.labels[order[:80]])
    # --recalibrate: both sides re-estimate from the first batches of this order (a fresh pass on jaxtune's side).
    assert trainer.config.recalibrate_batch_norm == 2
    head = flatten_dict(trainer.tuned.params)
    np.testing.assert_array_equal(kernel, np.asarray(head[("head", "out", "kernel")]))
    np.testing.assert_array_equal(bias, np.asarray(head[("head", "out", "bias")]))
    assert kernel.shape == (1280, 10) and np.abs(kernel).max() > 0


@pytest.mark.slow
def test_image_reference_in_channels_last_computes_what_nchw_does(quality):
    """The PyTorch image side runs the reference CNN in channels_last (oneDNN's preferred layout on
    the CPU). In the train mode it trains in (dropout off, as --paired runs it), its logits and
    trainable gradients are as close to a float64 run as contiguous NCHW's are: the layout changes
    float rounding only (the batch-statistics BatchNorms of a batch of 4 amplify that rounding in
    the gradients to ~1e-2 relative in either layout, so the two float32 layouts are not compared
    with each other)."""
    import dataclasses

    import numpy as np
    import quality_images as images
    import torch
    from helpers import skip_or_fail

    from jaxtune.assets import FetchError
    from jaxtune.models.assets import fetch_model

    try:
        fetch_model("efficientnet-lite0")
    except FetchError as err:
        skip_or_fail(f"EfficientNet-Lite0 could not be fetched here: {err}")
    task = dataclasses.replace(images.IMAGE_TASKS["fashion-mnist-lite0"], paired=True)
    pixels = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(channels_last: bool, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(0)  # the same new head in every run
        model = images.reference_model(task, 10, channels_last=channels_last).to(dtype)
        model._dropout.p = 0.0
        model._global_params = model._global_params._replace(drop_connect_rate=0.0)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()
        x = pixels.to(dtype)
        logits = model(images.to_model_layout(x) if channels_last else x)
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        grads = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters() if p.requires_grad])
        return logits.detach().double().numpy(), grads

    exact_logits, exact_grads = run(False, torch.float64)
    (nchw_logits, nchw_grads), (last_logits, last_grads) = run(False, torch.float32), run(True, torch.float32)
    assert images.to_model_layout(pixels).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(nchw_logits, exact_logits, atol=1e-4)
    np.testing.assert_allclose(last_logits, exact_logits, atol=1e-4)

    def error(grads: np.ndarray) -> float:
        return float(np.linalg.norm(grads - exact_grads) / np.linalg.norm(exact_grads))

    assert error(last_grads) <= 2 * error(nchw_grads) + 1e-6, (error(last_grads), error(nchw_grads))


def test_trl_logps_accuracy_is_read_from_trls_own_evaluation_forwards(quality):
    """TRL's side takes logps/accuracy from the per-sequence log-prob sums of TRL's evaluation forwards
    (policy, then reference, per batch of [chosen; rejected]): the policy's, every other forward. A capture
    that does not reproduce TRL's reported chosen mean, or miscounts the pairs, is refused."""
    import quality_reference
    import torch

    policy = [torch.tensor([-1.0, -5.0, -2.0, -3.0]), torch.tensor([-1.0, -4.0])]  # chosen half, then rejected
    reference = [torch.tensor([-9.0, 0.0, 0.0, -9.0]), torch.tensor([0.0, -9.0])]  # would score the opposite
    sums = [policy[0], reference[0], policy[1], reference[1]]
    mean_chosen = (-3.0 + -1.0) / 2  # TRL's mean of the batches' means
    assert quality_reference.policy_logps_accuracy(sums, 3, mean_chosen) == pytest.approx(2 / 3)
    with pytest.raises(RuntimeError, match="not read as expected"):
        quality_reference.policy_logps_accuracy(sums, 3, -1.0)
    with pytest.raises(RuntimeError, match="not read as expected"):
        quality_reference.policy_logps_accuracy(sums[:3], 3, mean_chosen)


def test_both_text_sides_draw_their_row_order_from_the_runs_seed(quality):
    """`quality.py --seeds S` reseeds both sides' row order (and initialisation): jaxtune's recipe shuffles with
    data.seed S, the PyTorch text side's permutation (and its torch seed) come from S, so seeds are different
    runs on both sides; seed 0 keeps the order every record so far used."""
    import dataclasses

    import quality_reference
    import torch

    task = dataclasses.replace(quality.TASKS["smollm2-chat-lora"], seeds=(3,))
    recipe = quality.jaxtune_recipe(task, {"model": "m", "train": "t.jsonl", "test": "v.jsonl"}, "run")
    assert recipe["data"]["seed"] == recipe["train"]["seed"] == 3

    recorded = torch.randperm(800, generator=torch.Generator().manual_seed(0)).tolist()
    assert quality_reference.train_order(800) == quality_reference.train_order(800, 0) == recorded
    assert quality_reference.train_order(800, 1) != recorded
    assert sorted(quality_reference.train_order(800, 1)) == list(range(800))

"""Several JAX processes (one CPU device each, ``jax.distributed`` on localhost), as on a TPU pod: an
export of params split over them, predictions, a restart, a Ctrl-C that reaches one process and DPO
with cached reference log-probs. Each file is written once, by process 0, every process ends with what
one process would, and no process is left waiting for another in a collective."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from helpers import tiny_hf_model

import jaxtune as jt
from jaxtune import tuning
from jaxtune.cli import main as cli
from jaxtune.data.testing import synthetic_preference_rows, tiny_tokenizer, write_jsonl
from jaxtune.models import hf
from jaxtune.training.sharding import MeshConfig, make_mesh

SCRIPT = Path(__file__).with_name("processes_script.py")
TRAIN_SCRIPT = Path(__file__).with_name("train_script.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(argv: list[str], logs: Path, timeout: float, count: int = 2) -> list[str]:
    """Run ``argv + [coordinator, process id]``-style commands (``{address}`` and ``{process}`` in
    ``argv`` are filled in) as ``count`` processes; their stderr. Fails when one exits with an error or
    they do not all finish within ``timeout`` seconds (a process waiting for another in a collective)."""
    codes, errs = _run(argv, logs, timeout, count)
    for code, err in zip(codes, errs):
        assert code == 0, err[-3000:]
    return errs


def _run(argv: list[str], logs: Path, timeout: float, count: int = 2) -> tuple[list[int], list[str]]:
    """:func:`_processes`' commands, run; their exit statuses and stderr (fails only on the timeout)."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = []
    for i in range(count):
        command = [a.replace("{address}", address).replace("{process}", str(i)).replace("{count}", str(count))
                   for a in argv]
        with open(logs / f"process-{i}.log", "w") as err:  # a file, not a pipe: a full pipe would block it
            procs.append(subprocess.Popen([sys.executable, *command], env=env, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the processes did not all finish in {timeout} s (one waits for another): "
                    + " | ".join((logs / f"process-{i}.log").read_text()[-1500:] for i in range(count)))
    return [p.returncode for p in procs], [(logs / f"process-{i}.log").read_text() for i in range(count)]


def _script(jobs: dict[str, dict]) -> list[str]:
    """tests/processes_script.py's command for ``jobs`` ({job: args}, run in order by one pair of processes)."""
    return [str(SCRIPT), "{address}", "{process}", "{count}", json.dumps(jobs)]


def _jobs(jobs: dict[str, dict], logs: Path, timeout: float) -> dict[str, list[dict]]:
    """Run ``jobs`` on two processes (:func:`_script`); what each job returned on each, by job."""
    for args in jobs.values():
        Path(args["out"]).mkdir(parents=True, exist_ok=True)
    _processes(_script(jobs), logs, timeout)
    return {job: [json.loads((Path(args["out"]) / f"{job}-{i}.json").read_text()) for i in range(2)]
            for job, args in jobs.items()}


def _same_files(a: Path, b: Path) -> None:
    """Two export directories hold the same files: equal tensors (bitwise), equal JSON."""
    from safetensors.numpy import load_file

    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        if path.suffix == ".safetensors":
            ours, theirs = load_file(path), load_file(b / path.name)
            assert ours.keys() == theirs.keys()
            for key in ours:
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{path.name}: {key}")
        elif path.suffix == ".json":
            assert json.loads(path.read_text()) == json.loads((b / path.name).read_text()), path.name


def test_an_export_of_params_split_over_processes_is_gathered_and_written_by_one(launched, tmp_path):
    """Every process exports (the recipes and ``jaxtune export`` run on each): a leaf split over
    several processes' devices (fsdp) could not be read (``device_get`` of an array spanning
    non-addressable devices), and with replicated params every process wrote and renamed the same
    files. Now all gather, process 0 writes, and the files equal one process's export."""
    two = launched["export"]
    assert two[1]["written"] == [] and len(two[0]["written"]) == 2, two  # the adapter and the merged weights
    tuned = tuning.apply_plan(hf.load_pretrained(launched["model"]), tuning.lora(rank=4, alpha=8), jax.random.key(0))
    params = jax.tree.map(lambda x: np.asarray(x) * np.asarray(1.01, x.dtype) + np.asarray(0.001, x.dtype),
                          tuned.params)
    model = dataclasses.replace(tuned, params=params, step=1)
    jt.export(model, tmp_path / "one" / "peft")
    jt.export(model, tmp_path / "one" / "merged", format="merged")
    for kind in ("peft", "merged"):
        _same_files(launched["root"] / "export" / kind, tmp_path / "one" / kind)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT (with its character tokenizer), a LoRA + head recipe on 16 labeled rows, trained 2 steps
    on one process, and 9 rows to predict (5 for process 0, 4 for process 1)."""
    root = tmp_path_factory.mktemp("classifier")
    tiny_hf_model("BertModel", root / "bert", vocab_size=112, max_position_embeddings=64)
    tiny_tokenizer(bos=True).save_pretrained(root / "bert")
    rng = np.random.default_rng(0)
    words = {"spam": ["win", "cash", "prize", "free"], "ham": ["lunch", "meeting", "notes", "today"]}

    def rows(n: int) -> str:
        labels = [("spam", "ham")[i % 2] for i in range(n)]
        return "".join(json.dumps({"text": " ".join(rng.choice(words[c], int(rng.integers(2, 6)))), "label": c})
                       + "\n" for c in labels)

    (root / "train.jsonl").write_text(rows(16))
    (root / "test.jsonl").write_text(rows(9))
    config = {"model": {"path": str(root / "bert")},
              "plan": [{"preset": "lora", "rank": 4, "alpha": 8}, {"action": "head", "task": "classification",
                                                                    "pooling": "pooler"}],
              "data": {"train": str(root / "train.jsonl"), "kind": "classification", "max_length": 48,
                       "batch_size": 8, "packing": True, "seed": 0},
              "train": {"steps": 2, "log_every": 1}, "optimizer": {"learning_rate": 0.05},
              "eval": {"before": False, "after": False}, "output": {"dir": str(root / "run"), "export": "none"}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    assert cli(["train", str(root / "recipe.yaml")]) == 0
    return {"root": root, "run": root / "run", "test": root / "test.jsonl", "recipe": root / "recipe.yaml"}


@pytest.fixture(scope="module")
def launched(classifier, tmp_path_factory) -> dict:
    """The jobs that end well (an export, predictions, DPO, a restart), run in that order by one pair of
    processes: each launch imports JAX and jaxtune and connects, seconds paid once. Each job's results
    by its name (``[process 0's, process 1's]``), its files in ``root/<job>``; each test compares them
    with one process's."""
    root = tmp_path_factory.mktemp("launched")
    tiny_hf_model("LlamaForCausalLM", root / "model")
    tiny_hf_model("LlamaForCausalLM", root / "llama")  # DPO's: with a tokenizer
    tiny_tokenizer().save_pretrained(root / "llama")
    write_jsonl(root / "pairs.jsonl", synthetic_preference_rows(16, seed=0))
    # restart: a first run of the classifier recipe (one process, 1 step), then the same with another data.seed
    config = yaml.safe_load(classifier["recipe"].read_text())
    first = {**config, "output": {"dir": str(root / "restart" / "run"), "export": "none"},
             "train": {"steps": 1, "log_every": 1}}
    (root / "first.yaml").write_text(yaml.safe_dump(first))
    assert cli(["train", str(root / "first.yaml")]) == 0
    (root / "again.yaml").write_text(yaml.safe_dump({**first, "data": {**first["data"], "seed": 1}}))
    dpo = {"model": str(root / "llama"), "train": str(root / "pairs.jsonl")}
    jobs = {"export": {"model": str(root / "model"), "out": str(root / "export")},
            "predict": {"run": str(classifier["run"]), "data": str(classifier["test"]), "out": str(root / "predict")},
            "dpo": {**dpo, "out": str(root / "dpo")},
            "restart": {"recipe": str(root / "again.yaml"), "out": str(root / "restart"), "delay": 5}}
    return {**_jobs(jobs, root, timeout=420), "root": root, "model": root / "model", "dpo_args": dpo}


def test_predict_on_two_processes_shares_the_rows_out_and_writes_once(classifier, launched):
    """Each process read, tokenized and wrote every row (both writing one file); now each reads every
    other row, every process gets every prediction in file order, equal to one process's, and process 0
    writes the file. 9 rows: process 0 has one batch more unpacked (5 and 4 rows, 4 a batch). A model in
    memory (params on the run's mesh, or whole on each process) ran every row on every process; now
    it shares them out as well."""
    two, out = launched["predict"], launched["root"] / "predict"
    one = {"packed": jt.predict(classifier["run"], classifier["test"]),
           "unpacked": jt.predict(classifier["run"], classifier["test"], packing=False)}
    one["on_mesh"] = one["held"] = one["unpacked"]
    names = sorted(one["packed"][0]["probabilities"])
    for process, result in enumerate(two):
        assert result["shares"] == [[process, 2]] * 4
        for how in ("packed", "unpacked", "on_mesh", "held"):
            assert [r["text"] for r in result[how]] == [r["text"] for r in one[how]]
            assert [r["prediction"] for r in result[how]] == [r["prediction"] for r in one[how]]
            np.testing.assert_allclose([[r["probabilities"][n] for n in names] for r in result[how]],
                                       [[r["probabilities"][n] for n in names] for r in one[how]], atol=1e-5)
    assert two[0]["written"] == [str(out / "predictions.jsonl")] and two[1]["written"] == []
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in written] == [r["prediction"] for r in one["packed"]]


def test_a_restart_on_two_processes_waits_until_the_old_run_is_moved_aside(launched):
    """``restart`` moves the old run aside on process 0; the other went on at once and read the old run
    directory (here: another data.seed, so it refused to resume it, and process 0 was left waiting)."""
    root = launched["root"] / "restart"
    assert [r["state"] for r in launched["restart"]] == ["finished", "finished"]
    assert len(list(root.glob("run.old-*"))) == 1
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["data"]["seed"] == 1


def _chat_rows(path: Path) -> Path:
    """32 chat rows (a user's words, the assistant's first word upper-cased) at ``path``."""
    words = ["alpha", "beta", "gamma", "delta"]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": " ".join(words[i % 4:] or words)},
        {"role": "assistant", "content": words[i % 4].upper()}]}) + "\n" for i in range(32)))
    return path


def _train_script(tmp_path: Path, *options: str) -> list[str]:
    """tests/train_script.py's command for 6 steps of a tiny Llama's LoRA on 32 chat rows (written to
    ``tmp_path``), 4 a batch, as :func:`_processes` runs it, with ``options``."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "model")
    return [str(TRAIN_SCRIPT), "--model", str(tmp_path / "model"), "--data", str(_chat_rows(tmp_path / "train.jsonl")),
            "--run", str(tmp_path / "run"), "--steps", "6", "--batch", "4", "--no-packing", *options,
            "--coordinator", "{address}", "--num-processes", "{count}", "--process-id", "{process}"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """:func:`_train_script`'s run of 8 steps, each logged, on two processes, never interrupted: its run
    directory (``run``, the metrics it logged) and final trainable params (``run.npz``), which the tests
    compare the runs that a Ctrl-C or an error stopped with (one launch for them all)."""
    root = tmp_path_factory.mktemp("whole")
    _processes([*_train_script(root, "--steps", "8"), "--out", str(root / "run.npz")], root, timeout=180)
    return root


def test_a_ctrl_c_that_reaches_one_process_stops_every_process_at_the_next_step_and_resumes_exactly(tmp_path, whole):
    """The signal reaches each process at another moment (here: process 1 only, after step 2 of 8). The
    processes agreed on it only at log steps: with ``log_every`` past the run's end it never took effect,
    and the run finished. Now every process stops at the same step, the first each can reach, saves one
    checkpoint there and reports "stopped" (exit status 130, as ``jaxtune train``'s); the run resumed from
    it ends with the params of a run never interrupted."""
    argv = _train_script(tmp_path, "--log-every", "100", "--steps", "8")
    codes, errs = _run([*argv, "--interrupt-at", "2", "--interrupt-on", "1"], tmp_path, timeout=180)
    assert codes == [130, 130], [err[-1500:] for err in errs]
    done = [[line for line in err.splitlines() if line.startswith("done ")] for err in errs]
    assert done[0] == done[1] and len(done[0]) == 1 and done[0][0].endswith("state=stopped"), errs[1][-1500:]
    stopped = int(done[0][0].split()[1].removeprefix("step="))
    assert 2 <= stopped < 8
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == [str(stopped)]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["state"], status["step"]) == ("stopped", stopped), status
    errs = _processes([*argv, "--out", str(tmp_path / "resumed.npz")], tmp_path, timeout=180)
    assert all("done step=8 state=finished" in err for err in errs), [err[-1500:] for err in errs]
    resumed, uninterrupted = np.load(tmp_path / "resumed.npz"), np.load(whole / "run.npz")
    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        np.testing.assert_allclose(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("interrupted", [1, 0])
def test_a_second_ctrl_c_on_one_process_stops_the_others_at_once_as_one_process_stops(tmp_path, interrupted):
    """Two Ctrl-Cs on one process after step 2 (the second stops at once, unsaved): process 1 stopped alone,
    its KeyboardInterrupt no error that told the others, and process 0 waited in the next step's collectives
    until JAX's distributed service gave up on process 1. Then the others stopped at once, naming it, but as
    after an error: exit status 1, and the run's status (process 0's) "failed" with that line when process 1
    was the one interrupted. Now every process ends as one process's run does after a second Ctrl-C
    (test_trainer, test_cli): the run's status "stopped", no error, and ``jaxtune train``'s exit status 130."""
    other = 1 - interrupted
    argv = _train_script(tmp_path, "--log-every", "100", "--steps", "8", "--interrupt-at", "2", "--interrupt-on",
                         str(interrupted), "--twice")
    codes, errs = _run(argv, tmp_path, timeout=90)
    assert codes == [130, 130], [err[-1500:] for err in errs]
    assert "done step=2 state=stopped" in errs[interrupted], errs[interrupted][-1500:]
    assert "interrupted during step 3; nothing saved" in errs[interrupted]
    stopping = f"process {interrupted} was interrupted (Ctrl-C) after step 2 of 8; stopping"
    assert stopping in errs[other], errs[other][-1500:]
    assert "heartbeat" not in errs[0] + errs[1]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    # the last step that finished: process 0 may have dispatched step 3 (which never finishes) as process 1 stopped
    assert status["state"] == "stopped" and status["step"] == 2 and "error" not in status, status


def test_a_second_ctrl_c_while_a_save_is_in_flight_waits_for_it_and_names_it(tmp_path):
    """A save every step, process 0's kept in flight for seconds (a slow disk), and two Ctrl-Cs on process 1
    after step 2: Orbax's save of step 1 needs both processes (its background threads meet at a barrier of
    the distributed service). It ends: process 0's watcher waits in ``jax.distributed.shutdown`` for process 1,
    so its save thread lives on and meets process 1's. But process 1 named the checkpoint to resume from
    before that save was done ("none: starts over"), while one process waits for it first (test_trainer);
    now it waits too, and names step 1, which is on disk when both have stopped."""
    argv = _train_script(tmp_path, "--log-every", "100", "--steps", "8", "--save-every", "1", "--slow-save", "5",
                         "--interrupt-at", "2", "--interrupt-on", "1", "--twice")
    codes, errs = _run(argv, tmp_path, timeout=120)
    assert codes == [130, 130], [err[-1500:] for err in errs]
    assert "interrupted during step 3; nothing saved, resume from checkpoint 1 (if its files verify)" in errs[1], (
        errs[1][-1500:])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "stopped"


@pytest.mark.parametrize("phase", ["restore", "base", "final"])
def test_a_ctrl_c_restoring_or_scoring_leaves_the_status_as_one_process_leaves_it(tmp_path, phase):
    """A Ctrl-C on process 1 as it restores the latest checkpoint (resuming a 2-step run to 4 steps), scores
    the base model or scores the trained one: outside the step loop there is no step boundary to wait for,
    so it stops every process at once (exit status 130). One process leaves the run's status as it was (its
    KeyboardInterrupt passes the status by): the training it describes did not change. On two processes,
    process 0's watcher wrote "stopped" at the trainer's step then: 0 of 4 while restoring a run whose
    checkpoint and status say step 2, "stopped" for a finished run whose final scoring was interrupted, and
    only when the interrupted process was not process 0. Now the status is one process's."""
    outcomes = []
    for count in (1, 2):
        d = tmp_path / str(count)
        d.mkdir()
        argv = _train_script(d, "--log-every", "1", "--steps", "2", "--scores")
        if phase == "restore":
            _processes(argv, d, timeout=180, count=count)
            argv = [*argv, "--steps", "4"]
        status = d / "run" / "status.json"
        before = json.loads(status.read_text()) if status.exists() else None
        codes, errs = _run([*argv, "--interrupt-in", phase, "--interrupt-on", str(count - 1)], d, timeout=180,
                           count=count)
        assert codes == [130] * count and "jaxtune: interrupted" in errs[-1], [err[-1500:] for err in errs]
        after = json.loads(status.read_text()) if status.exists() else None
        kept = ("state", "step", "total_steps", "error")
        outcomes.append(after and {k: after.get(k) for k in kept})
        if phase != "final":  # the final scoring's status (finished) is written before it starts
            assert after == before, (before, after)
        if count == 2:
            doing = {"restore": "restoring the latest checkpoint", "base": "scoring the base model, before training",
                     "final": "scoring the trained model (step 2)"}[phase]
            assert f"process 1 was interrupted (Ctrl-C) {doing}; stopping" in errs[0], errs[0][-1500:]
    assert outcomes[1] == outcomes[0]
    if phase == "final":
        assert outcomes[0]["state"] == "finished" and outcomes[0]["step"] == 2, outcomes[0]


@pytest.mark.parametrize("how", ["second Ctrl-C", "error"])
def test_a_process_that_stops_keeps_a_save_longer_than_the_shutdown_timeout(tmp_path, how):
    """As the test above (or an error in process 1's callback after step 2), but process 0's save of step 1
    takes 10 s and JAX's distributed shutdown timeout is 2 s (300 s by default: a save of a large model on a
    slow disk): process 1 told process 0 to stop before it waited for the save, process 0's watcher waited for
    process 1 in the shutdown barrier, which gave up while process 1 still waited for the save, and every
    process ended with JAX's fatal "Shutdown barrier has failed", the save lost, unsaid. Now process 1 says it
    waits for the save, then tells the others: the save is kept, and every process ends as without the slow
    save (130 after a second Ctrl-C, naming step 1 to resume from; 1 after an error)."""
    stop = (["--interrupt-at", "2", "--interrupt-on", "1", "--twice", "--log-every", "100"] if how == "second Ctrl-C"
            else ["--fail-at", "2", "--log-every", "1"])  # a callback runs at a log step
    argv = _train_script(tmp_path, "--steps", "8", "--save-every", "1", "--slow-save", "10", "--shutdown-timeout", "2",
                         *stop)
    codes, errs = _run(argv, tmp_path, timeout=120)
    assert codes == ([130, 130] if how == "second Ctrl-C" else [1, 1]), [err[-1500:] for err in errs]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["state"], status["step"]) == ("stopped" if how == "second Ctrl-C" else "failed", 2), status
    if how == "second Ctrl-C":
        assert "nothing saved, resume from checkpoint 1 (if its files verify)" in errs[1], errs[1][-1500:]
    from jaxtune.training.fitting import SAVE_IN_FLIGHT

    assert SAVE_IN_FLIGHT in errs[1], errs[1][-1500:]


def test_an_error_on_one_process_stops_the_others_at_once_naming_it(tmp_path):
    """A callback raises on process 1 alone after step 2 (as a corrupt image in its loader or a user's
    source could): process 0 waited in step 3's collectives until JAX's distributed service gave up on
    process 1, about 5 minutes later, with a heartbeat error instead of the real one. Now process 1
    raises its own error and tells the others, which stop at once with a line naming it; the run's
    status says failed, with that line."""
    error = "ValueError: a callback's error on process 1 only, at step 2"
    codes, errs = _run(_train_script(tmp_path, "--fail-at", "2"), tmp_path, timeout=120)
    assert codes[1] == 1 and errs[1].rstrip().endswith(error), errs[1][-1500:]
    assert codes[0] == 1 and f"process 1 failed after step 2 of 6: {error}; stopping" in errs[0], errs[0][-1500:]
    assert "heartbeat" not in errs[0] + errs[1]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == f"process 1 failed after step 2 of 6: {error}", status


def test_a_status_written_as_another_process_fails_names_the_last_step_that_finished(tmp_path, whole):
    """Process 1's callback raises 3 s after step 2 (8 steps, each logged): process 0 has dispatched step 3 by
    then, and it waits in that step's collectives for process 1, for ever. Its watcher wrote the run's status
    at the trainer's count of steps, 3: ``jaxtune status`` said step 3 was done, which neither the checkpoint
    nor the logged metrics hold. Now it names step 2, the last that finished: the run's records end there,
    and they are an uninterrupted run's."""
    codes, errs = _run(_train_script(tmp_path, "--steps", "8", "--fail-at", "2", "--fail-after", "3"), tmp_path,
                       timeout=120)
    assert codes == [1, 1] and "process 1 failed after step 2 of 8" in errs[0], [err[-1500:] for err in errs]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    records, uninterrupted = ([r for r in map(json.loads, (d / "run" / "metrics.jsonl").read_text().splitlines())
                               if "loss" in r] for d in (tmp_path, whole))
    assert status["state"] == "failed" and status["step"] == records[-1]["step"] == 2, (status, records)
    assert [r["step"] for r in uninterrupted[:2]] == [r["step"] for r in records]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in uninterrupted[:2]], rtol=1e-5)


def test_an_error_on_one_process_scoring_the_base_model_stops_the_others_too(tmp_path):
    """The evaluation before training is a collective per batch too: process 1's error there left
    process 0 waiting in it for 5 minutes."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    args = {"model": str(tmp_path / "llama"), "train": str(_chat_rows(tmp_path / "train.jsonl")), "out": str(tmp_path)}
    codes, errs = _run(_script({"base_fails": args}), tmp_path,
                       timeout=120)
    error = "OSError: rows.jsonl: a row process 1 cannot read"
    assert codes[1] == 1 and errs[1].rstrip().endswith(error), errs[1][-1500:]
    stopping = f"process 1 failed scoring the base model, before training: {error}; stopping"
    assert codes[0] == 1 and stopping in errs[0], errs[0][-1500:]


def test_an_error_on_one_process_after_the_others_left_its_block_stops_them_in_the_next(tmp_path):
    """Process 0 raising late in a block (its own work there done, as writing a report) that process 1 had
    already left, with no collective to wait in: process 0 told the watcher of a block process 1 was no longer in,
    and process 1 waited for it at the next block's barrier for a day. Now it stops there, naming the error."""
    codes, errs = _run(_script({"late_fails": {"out": str(tmp_path)}}), tmp_path, timeout=60)
    error = "OSError: a report process 0 cannot write"
    assert codes[0] == 1 and errs[0].rstrip().endswith(error), errs[0][-1500:]
    stopping = f"process 0 failed in the first block: {error}; stopping"
    assert codes[1] == 1 and stopping in errs[1], errs[1][-1500:]


@pytest.mark.parametrize(("job", "error", "doing"), [
    ("setup_fails", "PermissionError: run: a directory process 1 cannot read", "setting up the trainer"),
    ("optimizer_fails", "MemoryError: the optimizer state: out of memory on process 1", "setting up the trainer"),
    ("read_fails", "missing.jsonl", "loading the model and reading the data"),
    ("restore_fails", "PermissionError: checkpoints/2: a file process 1 cannot read",
     "restoring the latest checkpoint"),
    ("open_fails", "PermissionError: checkpoints/2: a file process 1 cannot read", "restoring the run's checkpoint"),
])
def test_an_error_on_one_process_setting_up_stops_the_others_too(tmp_path, job, error, doing):
    """What each process does alone before the processes compute together (each host reads its own
    files): a recipe's training file missing on process 1's host, its run directory or its checkpoint
    unreadable there (in training, or opening the run to evaluate it), its optimizer state failing there.
    Process 1 raised alone; process 0 went on into the first collective (a step, an evaluation's batch)
    and waited there until Gloo's set-up
    or JAX's distributed service gave up on process 1, hiding its error. Now process 0 waits until every
    process is done with that work, and stops at once, naming the error."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    args = {"model": str(tmp_path / "llama"), "train": str(_chat_rows(tmp_path / "train.jsonl")), "out": str(tmp_path)}
    codes, errs = _run(_script({job: args}), tmp_path, timeout=150)
    # its error ends its log (then a note of JAX's where it was raised in a traced function)
    assert codes[1] == 1 and any(error in line for line in errs[1].rstrip().splitlines()[-3:]), errs[1][-1500:]
    stopping = [line for line in errs[0].splitlines() if line.endswith("; stopping")]
    assert codes[0] == 1 and len(stopping) == 1 and f"process 1 failed {doing}: " in stopping[0], errs[0][-1500:]
    assert error in stopping[0] and "heartbeat" not in errs[0] + errs[1]
    if job == "restore_fails":  # the run's status (written by process 0) says why it stopped
        _assert_failed_as_it_was(tmp_path, f"process 1 failed {doing}: {error}")


def _assert_failed_as_it_was(out: Path, error: str, total_steps: int = 4) -> None:
    """OUT/run's status says the run failed with ``error``, at the step and with the reports of its status
    before (OUT/status-2.json: 2 steps, :func:`processes_script.restore_fails`), of ``total_steps``."""
    status = json.loads((out / "run" / "status.json").read_text())
    before = json.loads((out / "status-2.json").read_text())
    assert status["state"] == "failed" and status["error"] == error, status
    assert status["step"] == before["step"] == 2 and status["total_steps"] == total_steps, status
    assert "loss" in status["train"], status
    ignore = ("state", "error", "updated", "total_steps")
    assert {k: v for k, v in status.items() if k not in ignore} == {k: v for k, v in before.items() if k not in ignore}


@pytest.mark.parametrize("count", [1, 2])
def test_a_failed_restore_on_process_0_marks_the_run_failed_at_its_own_step(tmp_path, count):
    """Resuming a 2-step run to 4 steps, its checkpoint unreadable on process 0 (the one that writes the
    status): one process left the status as it was (the run's, step 2, so the failed attempt went unsaid);
    two processes did too, while an error on process 1 (above) wrote "failed" at the trainer's step 0,
    with none of the run's reports. Now each marks the run failed, at its step, keeping its reports."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    args = {"model": str(tmp_path / "llama"), "train": str(_chat_rows(tmp_path / "train.jsonl")), "out": str(tmp_path),
            "failing": 0}
    codes, errs = _run(_script({"restore_fails": args}), tmp_path, timeout=150, count=count)
    error = "PermissionError: checkpoints/2: a file process 0 cannot read"
    assert codes == [1] * count and error in errs[0], [err[-1500:] for err in errs]
    _assert_failed_as_it_was(tmp_path, f"failed restoring the latest checkpoint: {error}")


@pytest.mark.parametrize(("when", "doing", "total", "count"), [
    ("before", "scoring the base model, before training", 4, 1),
    ("after", "scoring the trained model (step 2)", 2, 1),
    ("after", "scoring the trained model (step 2)", 2, 2)])
def test_a_failed_score_on_one_process_marks_the_run_failed_at_its_own_step(tmp_path, when, doing, total, count):
    """A 2-step run again, the base model's score (resuming to 4 steps) or the trained model's (nothing left to
    train) raising: one process left the status as it was ('finished' at step 2), while on a pod another
    process's error there wrote 'failed' (RunStatus.on_stop). Now one process marks the run failed too,
    at its step, keeping its reports. On two processes, process 0 raising after training while process 1 scored
    from what it held: process 1 ended as finished; now it stops, naming process 0's error. (Before training,
    process 1 went on to wait at the restore's barrier: the test above with a block of its own.)"""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    args = {"model": str(tmp_path / "llama"), "train": str(_chat_rows(tmp_path / "train.jsonl")), "out": str(tmp_path),
            "when": when, "failing": 0}
    codes, errs = _run(_script({"score_fails": args}), tmp_path, timeout=150, count=count)
    error = "OSError: rows.jsonl: a row process 0 cannot read"
    assert codes == [1] * count and error in errs[0], [err[-1500:] for err in errs]
    if count == 2:
        assert f"process 0 failed {doing}: {error}; stopping" in errs[1], errs[1][-1500:]
    _assert_failed_as_it_was(tmp_path, f"failed {doing}: {error}", total)


def test_a_cached_reference_on_two_processes_holds_every_row_on_each(launched, tmp_path):
    """``preference.reference: cached`` scores the pairs once before training, each process its share of
    the file's rows (every other one); training shuffles every row to either process, which then found
    no reference log-probs for the other's rows ("a batch holds a pair the pre-pass did not score"). Now
    each keeps every row's: the losses equal one process's (the same global batches). Both processes list
    the answers at one width narrower than a row (their policy and reference project only there)."""
    from processes_script import dpo_run

    assert [r["state"] for r in launched["dpo"]] == ["finished", "finished"]
    assert [r["answer_width"] for r in launched["dpo"]] == [24, 24]  # of 48 positions a row
    dpo_run({**launched["dpo_args"], "out": str(tmp_path)}, mesh=make_mesh(MeshConfig(), jax.devices()[:2]))
    losses = {name: [r["loss"] for r in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines())
                     if "loss" in r] for name, out in (("one", tmp_path), ("two", launched["root"] / "dpo"))}
    assert len(losses["one"]) == 3
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5)


def test_a_process_killed_without_an_error_ends_the_others_after_the_heartbeat_timeout(tmp_path):
    """Process 1 is SIGKILLed after step 2 (as the kernel's out-of-memory killer would): no error of its
    own tells the others, so JAX's distributed service notices it only by its missing heartbeats, and
    process 0 waited JAX's default 100 s for that. ``distributed.heartbeat_timeout_s: 10`` ends it
    within seconds of the timeout, with the service's line naming the process that stopped."""
    codes, errs = _run(_train_script(tmp_path, "--kill-at", "2", "--kill-on", "1", "--heartbeat-timeout", "10"),
                       tmp_path, timeout=240)
    ended = time.time()
    killed = [line for line in errs[1].splitlines() if line.startswith("killed at ")]
    assert codes[1] == -signal.SIGKILL and len(killed) == 1, errs[1][-1500:]
    assert codes[0] != 0 and "Task 1 heartbeat timeout" in errs[0], errs[0][-3000:]
    assert ended - float(killed[0].split()[-1]) < 60  # JAX's default: over 100 s


@pytest.mark.parametrize(("job", "doing"), [("predict_fails", "predicting"), ("evaluate_fails", "evaluating")])
def test_an_error_on_one_process_predicting_or_evaluating_stops_the_others_too(classifier, tmp_path, job, doing):
    """Each process reads its own share of the rows, so a row only process 1 reads (a corrupt image) raised
    there alone, mid-way (``jt.predict``, ``jaxtune eval``), and process 0 waited in the next batch's collective
    for minutes, until JAX's distributed service gave up. Now process 1 raises its own error and process 0
    stops at once, naming it."""
    args = {"run": str(classifier["run"]), "data": str(classifier["test"]), "out": str(tmp_path)}
    codes, errs = _run(_script({job: args}), tmp_path, timeout=120)
    error = "OSError: row 3: a file process 1 cannot read"
    assert codes[1] == 1 and error in errs[1].splitlines(), errs[1][-1500:]  # then grain's note on its traceback
    assert codes[0] == 1 and f"process 1 failed {doing}: {error}; stopping" in errs[0], errs[0][-1500:]


def test_an_error_on_one_process_gathering_an_export_stops_the_others_too(tmp_path):
    """The params split over the processes are gathered one by one, each gather a collective: process 0
    running out of host memory in the second (it alone keeps them all) left process 1 waiting in the
    third for minutes. Now process 0 raises its own error and process 1 stops at once, naming it."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "model")
    args = {"model": str(tmp_path / "model"), "out": str(tmp_path)}
    codes, errs = _run(_script({"export_fails": args}), tmp_path, timeout=120)
    error = "MemoryError: gathering a param on process 0"
    assert codes[0] == 1 and errs[0].rstrip().endswith(error), errs[0][-1500:]
    stopping = f"process 0 failed gathering the params to export to {tmp_path / 'peft'}: {error}; stopping"
    assert codes[1] == 1 and stopping in errs[1], errs[1][-1500:]


def test_an_error_on_one_process_computing_cached_reference_log_probs_stops_the_others_too(tmp_path):
    """``preference.reference: cached`` scores each process's share of the pairs before training (in the
    Trainer, before fit), a collective a batch: process 1's error reading a pair there left process 0
    waiting in it for minutes."""
    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    write_jsonl(tmp_path / "train.jsonl", synthetic_preference_rows(16, seed=0))
    args = {"model": str(tmp_path / "llama"), "train": str(tmp_path / "train.jsonl"), "out": str(tmp_path)}
    codes, errs = _run(_script({"dpo_fails": args}), tmp_path, timeout=120)
    error = "OSError: pair 3: a read that failed on process 1"
    assert codes[1] == 1 and error in errs[1].splitlines(), errs[1][-1500:]
    stopping = f"process 1 failed computing the reference log-probs (preference.reference: cached): {error}; stopping"
    assert codes[0] == 1 and stopping in errs[0], errs[0][-1500:]

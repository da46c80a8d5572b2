"""The jobs service's queue (:mod:`jaxtune.serve.runner`) against a fake ``jaxtune train``: a
small script that writes what a run directory records (``status.json``, ``metrics.jsonl``,
``checkpoints/``, its log) in milliseconds, told what to do by ``<job dir>/fake.json``. Fast and
deterministic where tests/test_serve.py trains real models: pause and resume, failures, database
errors and restarts, each in a second or two."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jaxtune.serve.runner import Runner, job_environment, process_alive, set_for_server
from jaxtune.serve.store import Store

pytestmark = pytest.mark.timeout(120)

FAKE_TRAIN = r'''
"""A stand-in for `jaxtune train CONFIG`, as <job dir>/fake.json says: steps, step_s, save_s (the
checkpoint a SIGINT saves takes that long), fail_at/fail_message (a non-finite step), loss, deaf."""
import ctypes, fcntl, json, os, signal, sys, time
from pathlib import Path

job = Path(sys.argv[-1]).parent
pdeathsig = ctypes.c_int(0)
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(2, ctypes.byref(pdeathsig))  # PR_GET_PDEATHSIG
sigint = signal.getsignal(signal.SIGINT)  # Python's own handler where the process started with SIGINT's default
sigint = "default" if sigint is signal.default_int_handler else str(sigint)
(job / "started.json").write_text(json.dumps({"pdeathsig": pdeathsig.value, "sigint": sigint}))
run = job / "run"
run.mkdir(exist_ok=True)
spec = json.loads((job / "fake.json").read_text())
journal = open(job.parent.parent / "journal.log", "a")


def note(what):
    journal.write(f"{time.time():.3f} {what} {job.name} {os.getpid()}\n")
    journal.flush()


lock = open(job / "active", "w")  # two processes training one run directory at once: an "overlap"
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    note("overlap")
note("start")
stop = []
if spec.get("deaf"):  # hangs on SIGINT (a stuck collective), and has a data-loader worker of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import subprocess
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (job / "worker.pid").write_text(str(worker.pid))
else:
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))


def status(state, step, **fields):
    tmp = run / "status.json.tmp"
    tmp.write_text(json.dumps({"state": state, "step": step, "total_steps": spec["steps"], **fields}))
    tmp.replace(run / "status.json")


saved = sorted(int(p.name) for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else []
for step in range((saved or [0])[-1] + 1, spec["steps"] + 1):
    if stop:
        time.sleep(spec.get("save_s", 0))
        (run / "checkpoints" / str(step - 1)).mkdir(parents=True, exist_ok=True)
        status("stopped", step - 1)
        print(f"training stopped at step {step - 1}; run the same command again to resume", flush=True)
        note("exit")
        sys.exit(130)
    if step == spec.get("fail_at"):
        print(spec["fail_message"], file=sys.stderr, flush=True)
        status("failed", step - 1, error=spec["fail_message"])
        print(f"training failed at step {step - 1} (see above)", flush=True)
        note("exit")
        sys.exit(1)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "loss": spec.get("loss", 1.0 / step), "steps_per_s": 2.0,
                             "tokens_per_s": 100.0}) + "\n")
    status("running", step)
    print(f"step {step}/{spec['steps']}", flush=True)
    time.sleep(spec.get("step_s", 0.01))
status("finished", spec["steps"])
print(f"trained {spec['steps']} steps (finished)", flush=True)
note("exit")
'''


class FakeRunner(Runner):
    """A :class:`Runner` whose jobs run the fake trainer."""

    fake: Path

    def command(self, config: Path) -> list[str]:
        return [sys.executable, str(self.fake), str(config)]


@pytest.fixture
def make_runner(tmp_path) -> Callable[..., FakeRunner]:
    """``make_runner(device_sets=..., data_dir=...)``: a runner over a fresh store, stopped (and
    its job processes killed) at the end of the test."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    made: list[FakeRunner] = []

    def make(device_sets=({},), data_dir: Path | None = None, **kwargs: Any) -> FakeRunner:
        data = data_dir or tmp_path / "data"
        kwargs.setdefault("grace_s", 5)
        runner = FakeRunner(Store(data / "serve.sqlite"), data, device_sets, poll_s=0.02, **kwargs)
        runner.fake = fake
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close(timeout=10)
        for job in runner.store.jobs():
            if job["pid"] and process_alive(job["pid"]):
                os.kill(job["pid"], signal.SIGKILL)
        runner.store.close()


def add_job(runner: Runner, job_id: str, **spec: Any) -> None:
    """A queued job whose process does what ``spec`` says (see ``FAKE_TRAIN``)."""
    folder = runner.job_dir(job_id)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("{}\n")
    (folder / "fake.json").write_text(json.dumps({"steps": 10, **spec}))
    runner.store.add_job("key-test", job_id, {"fine_tuned_model": f"ft:tiny:key-test::{job_id}"})


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.time() + timeout
    while not (result := condition()):
        assert time.time() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.02)
    return result


def status_of(runner: Runner, job_id: str, statuses: tuple[str, ...]) -> Callable[[], dict | None]:
    def check() -> dict | None:
        job = runner.store.job(job_id)
        return job if job["status"] in statuses else None

    return check


def last_event(runner: Runner, job_id: str, prefix: str) -> list[dict] | None:
    """The job's events (newest first) once the newest starts with ``prefix`` (the event comes
    after the status change it reports)."""
    events = runner.store.events(job_id)
    return events if events and events[0]["message"].startswith(prefix) else None


def journal(runner: Runner) -> list[list[str]]:
    """The fake trainer's ``time what job pid`` lines."""
    path = runner.data_dir / "journal.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_job_runs_to_success_with_its_events(make_runner):
    runner = make_runner()
    add_job(runner, "ftjob-ok", steps=5)
    runner.start()
    events = wait_until(lambda: last_event(runner, "ftjob-ok", "The job"), what="the job to end")
    assert events[0]["message"] == "The job has successfully completed"
    job = runner.store.job("ftjob-ok")
    assert job["status"] == "succeeded" and job["pid"] is None and job["trained_tokens"] == 250
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"][::-1] == [1, 2, 3, 4, 5]


def test_resume_waits_for_the_paused_process_with_two_device_sets(make_runner):
    """Resumed while its paused process still saves the checkpoint, a job is not started again on
    the other device set until that process has ended: one process per run directory."""
    runner = make_runner(device_sets=[{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}])
    add_job(runner, "ftjob-a", steps=400, step_s=0.02, save_s=1.0)
    runner.start()
    wait_until(lambda: (runner.run_dir("ftjob-a") / "metrics.jsonl").exists(), what="training to begin")
    assert runner.pause("ftjob-a") and runner.resume("ftjob-a")
    wait_until(lambda: [e for e in journal(runner) if e[1] == "start"][1:], what="the second start")
    events = journal(runner)
    assert "overlap" not in [e[1] for e in events], events
    starts, exits = [e for e in events if e[1] == "start"], [e for e in events if e[1] == "exit"]
    assert exits and float(exits[0][0]) <= float(starts[1][0]), events
    job = wait_until(status_of(runner, "ftjob-a", ("running",)))
    assert job["pid"] == int(starts[1][3])
    assert runner.cancel("ftjob-a")


def test_a_job_resumed_as_its_paused_process_ends_is_not_failed(make_runner, monkeypatch):
    """Resumed while its paused process saves, a job is claimed by the other device set the moment
    that process is recorded as ended. The first worker, still recording the end (reading the last
    log lines: slowed here to widen the window a loaded machine opens), must not take the job it
    then reads as running for its own and mark it failed, stopping the new process's run."""
    runner = make_runner(device_sets=[{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}])
    add_job(runner, "ftjob-a", steps=400, step_s=0.02, save_s=0.3)
    ingest = runner._ingest_or_log

    def slow_after_the_first_exit(job_id: str) -> None:
        if any(e[1] == "exit" for e in journal(runner)):
            time.sleep(0.5)
        ingest(job_id)

    monkeypatch.setattr(runner, "_ingest_or_log", slow_after_the_first_exit)
    runner.start()
    wait_until(lambda: (runner.run_dir("ftjob-a") / "metrics.jsonl").exists(), what="training to begin")
    assert runner.pause("ftjob-a") and runner.resume("ftjob-a")
    wait_until(lambda: [e for e in journal(runner) if e[1] == "exit"], what="the paused process to end")
    job = wait_until(lambda: (j := runner.store.job("ftjob-a"))["status"] == "failed" and j
                     or j["status"] == "running" and (j["pid"] or 0) > 0 and j, what="the job to run again")
    assert job["status"] == "running" and job["error"] is None, job
    wait_until(lambda: [e for e in runner.store.events("ftjob-a") if e["message"].startswith("Training stopped")],
               what="the first process's end")
    job = runner.store.job("ftjob-a")
    assert job["status"] == "running" and job["error"] is None, job
    assert process_alive(job["pid"]) and "overlap" not in [e[1] for e in journal(runner)]
    assert runner.cancel("ftjob-a")


def test_a_claimed_job_is_claimed_once_until_its_process_ends(make_runner):
    """Paused and resumed between its claim and its process's start, a job is not claimed again;
    a restart in that window frees it (no process ever started: pid 0 is never signalled)."""
    runner = make_runner()
    add_job(runner, "ftjob-a")
    assert runner.store.claim_next()["pid"] == 0
    assert runner.pause("ftjob-a") and runner.resume("ftjob-a")
    assert runner.store.claim_next() is None
    runner.recover()
    job = runner.store.job("ftjob-a")
    assert job["status"] == "queued" and job["pid"] is None
    assert runner.store.claim_next()["id"] == "ftjob-a"


def test_a_failed_job_says_why(make_runner):
    """A non-finite step's error is the run's status.json error, not the log's last line ('training
    failed at step N (see above)'); a process killed by a signal (the OOM killer) says so."""
    runner = make_runner()
    message = "step 3: the loss or gradient is not finite (nan/inf); training stopped. Lower the learning rate."
    add_job(runner, "ftjob-nan", fail_at=3, fail_message=message)
    add_job(runner, "ftjob-oom", steps=400, step_s=0.02)
    runner.start()
    job = wait_until(status_of(runner, "ftjob-nan", ("failed", "succeeded")), what="the non-finite job to fail")
    assert job["error"] == {"code": "training_failed", "message": message, "param": None}
    pid = wait_until(lambda: (runner.store.job("ftjob-oom")["pid"] or 0) > 0
                     and (runner.run_dir("ftjob-oom") / "metrics.jsonl").exists()
                     and runner.store.job("ftjob-oom")["pid"], what="the second job to train")
    os.kill(pid, signal.SIGKILL)
    job = wait_until(status_of(runner, "ftjob-oom", ("failed", "succeeded")), what="the killed job to fail")
    error = job["error"]["message"]
    assert error.startswith("jaxtune train was killed by signal SIGKILL (out of memory?)"), error
    assert "step " in error  # its last log line, for context


class FullDisk:
    """Makes every database write of a store fail while ``on`` (sqlite's 'database or disk is full')."""

    def __init__(self, store: Store):
        self.on, self._tx = False, store._tx
        store._tx = self

    def __call__(self):
        if self.on:
            raise sqlite3.OperationalError("database or disk is full")
        return self._tx()


def test_a_failed_database_write_is_retried_not_fatal(make_runner):
    """Writes failing for a while (a full disk) neither kill the running job (its monitor thread
    dying would: PR_SET_PDEATHSIG) nor stop the queue, and lose or repeat no event."""
    runner = make_runner()
    add_job(runner, "ftjob-a", steps=60, step_s=0.02)
    add_job(runner, "ftjob-b", steps=3)
    disk = FullDisk(runner.store)
    runner.start()
    wait_until(lambda: (runner.run_dir("ftjob-a") / "metrics.jsonl").exists(), what="training to begin")
    disk.on = True
    time.sleep(0.3)
    disk.on = False
    for job_id, steps in (("ftjob-a", 60), ("ftjob-b", 3)):
        job = wait_until(status_of(runner, job_id, ("succeeded", "failed")), timeout=20, what=f"{job_id} to end")
        assert job["status"] == "succeeded", job["error"]
        metrics = [e["data"]["step"] for e in runner.store.events(job_id) if e["type"] == "metrics"]
        assert metrics[::-1] == list(range(1, steps + 1))
    assert all(thread.is_alive() for thread in runner._threads)


def test_a_job_whose_process_cannot_be_recorded_is_stopped(make_runner, monkeypatch):
    """A write failing once the process has started fails the job and kills its process (nothing
    would watch it train on); the queue goes on."""
    runner = make_runner()
    add_job(runner, "ftjob-a", steps=400, step_s=0.02)
    add_job(runner, "ftjob-b", steps=3)
    update, started = runner.store.update_job, []

    def refuse_pid(job_id: str, **fields: Any) -> bool:
        if job_id == "ftjob-a" and fields.get("pid"):
            started.append(fields["pid"])
            raise sqlite3.OperationalError("database or disk is full")
        return update(job_id, **fields)

    monkeypatch.setattr(runner.store, "update_job", refuse_pid)
    runner.start()
    job = wait_until(status_of(runner, "ftjob-a", ("failed",)), what="the job to fail")
    assert "the server could not run this job: OperationalError" in job["error"]["message"]
    assert started and not process_alive(started[0])
    assert wait_until(status_of(runner, "ftjob-b", ("succeeded", "failed")))["status"] == "succeeded"


def test_a_second_server_on_one_data_directory_is_refused(make_runner, tmp_path, capsys):
    """It would take the first's running job for a leftover of its own, SIGKILL it and run it again."""
    first = make_runner()
    add_job(first, "ftjob-a", steps=400, step_s=0.02)
    first.start()
    pid = int(wait_until(lambda: [e for e in journal(first) if e[1] == "start"], what="the job to start")[0][3])
    second = make_runner()
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'data'} is in use by another jaxtune serve"):
        second.start()
    assert process_alive(pid) and first.store.job("ftjob-a")["status"] == "running"
    assert len([e for e in journal(first) if e[1] == "start"]) == 1

    from jaxtune.cli import main

    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    assert f"{tmp_path / 'data'} is in use by another jaxtune serve" in capsys.readouterr().err
    first.close(timeout=10)
    second.start()  # the first has let go
    job = wait_until(status_of(second, "ftjob-a", ("running",)))
    assert job["error"] is None


@pytest.mark.parametrize("server_sigint", ["handled", "ignored"])
def test_close_stops_a_job_whose_process_is_just_starting(make_runner, monkeypatch, server_sigint):
    """A server stopping while a job's process starts (claimed, not yet watched) sends it SIGINT like
    any running job's, instead of waiting for it to train to the end. Also from a server whose SIGINT
    is ignored (a script's background job; pytest-xdist's workers): exec passed that on to the job,
    and the SIGINT, sent before the job set its own handler, was lost."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if server_sigint == "ignored"
                             else signal.default_int_handler)
    try:
        runner = make_runner()
        add_job(runner, "ftjob-a", steps=1000, step_s=0.02)
        closed: list[float] = []

        def close() -> None:
            start = time.time()
            runner.close(timeout=15)
            closed.append(time.time() - start)

        def command(config: Path) -> list[str]:
            threading.Thread(target=close).start()
            wait_until(runner._closing.is_set)
            return FakeRunner.command(runner, config)

        monkeypatch.setattr(runner, "command", command)
        runner.start()
        wait_until(lambda: closed, timeout=30, what="close() to return")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert closed[0] < 5, closed
    job = runner.store.job("ftjob-a")
    assert job["status"] == "running" and job["pid"] is None  # stopped; the next server resumes it


def test_a_job_deaf_to_sigint_is_killed_with_its_workers(make_runner):
    """Past the grace period a cancelled job's whole process group is killed: its data loader's
    worker processes do not outlive it."""
    runner = make_runner(grace_s=0.5)
    add_job(runner, "ftjob-a", steps=1000, step_s=0.02, deaf=True)
    runner.start()
    worker = int(wait_until(lambda: (runner.job_dir("ftjob-a") / "worker.pid").exists()
                            and (runner.job_dir("ftjob-a") / "worker.pid").read_text(), what="the worker"))
    assert runner.cancel("ftjob-a")
    wait_until(lambda: last_event(runner, "ftjob-a", "Training stopped"), what="the job to stop")
    wait_until(lambda: not process_alive(worker), timeout=5, what="its worker to die")


def test_metrics_rewound_by_a_resume_lose_no_record(make_runner):
    """A resumed run rewinds metrics.jsonl to its checkpoint (RunDir.rewind rewrites it) and logs
    the later steps again: the byte offset into the old file means nothing in the new one."""
    from jaxtune.training.rundir import RunDir

    runner = make_runner()
    add_job(runner, "ftjob-a")
    run = RunDir(runner.run_dir("ftjob-a")).create()
    (runner.job_dir("ftjob-a") / "train.log").write_text("")

    def log(steps: range, tokens_per_s: float) -> None:
        for step in steps:
            run.log({"step": step, "loss": 1.0 / step, "steps_per_s": 2.0, "tokens_per_s": tokens_per_s})

    log(range(1, 11), 1234.56789)  # a first process logs steps 1-10, with a checkpoint at 5
    runner._ingest("ftjob-a")
    run.rewind(5)  # the resumed process drops 6-10 ...
    log(range(6, 16), 100.0)  # ... and logs them again, then more (other throughput digits: shorter lines)
    runner._ingest("ftjob-a")
    run.close()
    steps = [e["data"]["step"] for e in runner.store.events("ftjob-a") if e["type"] == "metrics"]
    assert steps[::-1] == list(range(1, 16))


@pytest.mark.parametrize("server_sigint", ["handled", "ignored"])
def test_a_job_starts_without_python_between_fork_and_exec(make_runner, monkeypatch, server_sigint):
    """No preexec_fn: it runs Python in the forked child of the server's threaded process, where a
    lock another thread held at the fork stays held (a deadlock). The job's process still starts
    with SIGINT's default (close() reaches it) and dies with the server (PR_SET_PDEATHSIG)."""
    popen, calls = subprocess.Popen, []
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: calls.append(kwargs) or popen(*args, **kwargs))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if server_sigint == "ignored"
                             else signal.default_int_handler)
    try:
        runner = make_runner()
        add_job(runner, "ftjob-a", steps=3)
        runner.start()
        started = runner.job_dir("ftjob-a") / "started.json"
        wait_until(lambda: started.is_file() and started.read_text().endswith("}"), what="the job to start")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls and all(kwargs.get("preexec_fn") is None for kwargs in calls), calls
    assert json.loads(started.read_text()) == {"pdeathsig": signal.SIGKILL if sys.platform == "linux" else 0,
                                               "sigint": "default"}
    assert wait_until(status_of(runner, "ftjob-a", ("succeeded", "failed")))["status"] == "succeeded"


def test_a_job_keeps_a_value_set_after_the_server_set_its_own():
    """What the server sets for its own process stays out of a job's environment, but only while it
    has the server's value: one set since (the user's, for a second server in one process) is kept."""
    environ: dict[str, str] = {"HOME": "/home/x"}
    set_for_server("XLA_PYTHON_CLIENT_PREALLOCATE", "false", environ)
    assert environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert job_environment(environ, {}) == {"HOME": "/home/x", "PYTHONUNBUFFERED": "1"}
    environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
    set_for_server("XLA_PYTHON_CLIENT_PREALLOCATE", "false", environ)  # the user's value stands
    assert job_environment(environ, {"CUDA_VISIBLE_DEVICES": "1"}) == {
        "HOME": "/home/x", "XLA_PYTHON_CLIENT_PREALLOCATE": "true", "CUDA_VISIBLE_DEVICES": "1",
        "PYTHONUNBUFFERED": "1"}

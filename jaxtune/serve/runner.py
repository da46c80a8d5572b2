"""The job queue: one worker thread per device set, each running its jobs one at a time as
``jaxtune train <job dir>/config.yaml`` processes, and turning what a run directory records
(``metrics.jsonl``, ``checkpoints/``, ``status.json``, the process's log) into job events.

A job is a separate process so the server stays responsive and a crashing job cannot take it
down. Everything a job needs to continue is on disk, so a restarted server picks up where the
last one stopped: queued jobs stay queued, and a job that was running is queued first again and
resumes from its last checkpoint (``jaxtune train`` on an existing run directory resumes it
exactly). Cancel and pause send the process SIGINT, which makes ``jaxtune train`` stop at the
next step boundary and save a checkpoint; SIGKILL follows if it has not exited after a grace period.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from jaxtune.serve.store import Store
from jaxtune.training.rundir import RunDir

log = logging.getLogger(__name__)
ACTIVE = ("validating_files", "queued", "running", "paused")
FINAL = ("succeeded", "failed", "cancelled")
# The variables the server set in its environment for its own process only, with the values it set
# (a JSON object): a job's process starts without them, with JAX's defaults, as ``jaxtune train`` run
# by hand would. A variable whose value is no longer the server's has been set since by someone else.
SERVER_ONLY = "JAXTUNE_SERVE_OWN_ENV"

# The start of a job's process, run by a Python of its own, which then becomes the job (exec): on
# Linux the job is killed when the server dies (PR_SET_PDEATHSIG), so a restarted server never finds
# two processes training one run directory (elsewhere, recovery kills the orphan instead), and its
# SIGINT is the default (a server started with SIGINT ignored, as a script's background job or a test
# runner's worker is, would pass that on through exec, and a SIGINT from Runner.close before the job
# sets its own handler would be lost). Not a preexec_fn: Python run between fork and exec in the
# server's threaded process deadlocks on any lock another thread held at the fork. SIGINT arrives
# blocked (Runner._run), so one sent before the default is set here waits for it, not ignored.
_LAUNCH = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
if sys.platform == "linux":
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(sys.argv[1]):
        os._exit(1)  # the server died before prctl: nobody would stop this job
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
os.execvp(sys.argv[2], sys.argv[2:])
"""


def launch(command: Sequence[str]) -> list[str]:
    """``command`` started as :data:`_LAUNCH` says: it dies with this process, with SIGINT's default."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCH, str(os.getpid()), *command]


def set_for_server(name: str, value: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``name`` to ``value`` for the server's own process, unless the user set it: job
    processes do not inherit it (:func:`job_environment`)."""
    if name in environ:
        return
    environ[name] = value
    environ[SERVER_ONLY] = json.dumps({**_server_only(environ), name: value})


def _server_only(environ: Mapping[str, str]) -> dict[str, str]:
    try:
        own = json.loads(environ.get(SERVER_ONLY) or "{}")
    except ValueError:
        return {}
    return own if isinstance(own, dict) else {}


def job_environment(environ: Mapping[str, str], device_set: Mapping[str, str]) -> dict[str, str]:
    """A job process's environment: the server's less what :func:`set_for_server` set (where it
    still has the value set there), then the device set's variables."""
    env = dict(environ)
    for name, value in _server_only(env).items():
        if env.get(name) == value:
            del env[name]
    env.pop(SERVER_ONLY, None)
    return {**env, **device_set, "PYTHONUNBUFFERED": "1"}


class DataDirBusy(RuntimeError):
    """Another server holds this data directory."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """An exclusive lock on ``<data_dir>/serve.lock``, held while the returned file is open: a
    second server on one data directory would take the first's jobs for its own leftovers
    (recovery SIGKILLs them) and run its queue twice. Raises :class:`DataDirBusy`."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "serve.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataDirBusy(f"{data_dir} is in use by another jaxtune serve (it holds serve.lock there); stop that "
                          "server first, or give this one another --data-dir") from None
    return handle


def process_alive(pid: int, marker: str | None = None) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: nobody may have reaped it yet) whose
    command line contains ``marker`` (our job's config) when given."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no /proc: trust the pid
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":
            return False
        return marker is None or marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return False


def _level(line: str) -> str:
    low = line.lower()
    if low.startswith("jaxtune: error") or "traceback" in low:
        return "error"
    if "warning" in low or "ctrl-c" in low or "interrupted" in low or "skipped" in low:
        return "warn"
    return "info"


def trained_tokens(records: Sequence[Mapping[str, Any]]) -> int | None:
    """Real input tokens the run trained on (padding excluded), from the logged windows: each
    train record's ``tokens_per_s / steps_per_s`` is its window's tokens per step."""
    last: dict[int, Mapping[str, Any]] = {}
    for r in records:
        if "loss" in r and r.get("steps_per_s"):
            last[int(r["step"])] = r  # a step logged again after a resume keeps the resumed record
    total, previous = 0.0, 0
    for step in sorted(last):
        r = last[step]
        total += r.get("tokens_per_s", 0.0) / r["steps_per_s"] * (step - previous)
        previous = step
    return int(round(total)) if last else None


class Runner:
    """Runs queued jobs. ``device_sets``: one environment per set (e.g. ``{"CUDA_VISIBLE_DEVICES":
    "0,1"}``); each set runs one job at a time. ``[{}]``: one set, every device."""

    def __init__(self, store: Store, data_dir: Path, device_sets: Sequence[Mapping[str, str]] = ({},), *,
                 poll_s: float = 0.5, grace_s: float = 30.0):
        self.store, self.data_dir = store, Path(data_dir).resolve()  # job recipes hold paths under it
        self.device_sets = [dict(d) for d in device_sets] or [{}]
        self.poll_s, self.grace_s = poll_s, grace_s
        self._procs: dict[str, subprocess.Popen] = {}
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._data_lock: IO[str] | None = None
        self._lock = threading.Lock()
        self._failing: set[str] = set()  # jobs whose last progress could not be written to the database
        self._metrics_inodes: dict[str, int | None] = {}  # of each job's metrics.jsonl when last read

    # ------------------------------------------------------------------ paths

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def run_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run"

    def command(self, config: Path) -> list[str]:
        """The process a job runs (the runner's tests stand a fake trainer in for it)."""
        return [sys.executable, "-m", "jaxtune", "train", str(config)]

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Lock the data directory (:class:`DataDirBusy` if another server has it), recover, and
        start a worker per device set."""
        self._data_lock = lock_data_dir(self.data_dir)
        self.recover()
        for index, env in enumerate(self.device_sets):
            thread = threading.Thread(target=self._worker, args=(env,), name=f"jaxtune-jobs-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def recover(self) -> None:
        """After a restart: stop any job process the last server left behind, and queue its
        running jobs first again (they resume from their last checkpoint)."""
        for job in self.store.jobs():
            if job["pid"] is not None:
                if job["status"] in ACTIVE:
                    self._kill_leftover(job["id"], job["pid"])
                self.store.update_job(job["id"], pid=None)
            if job["status"] == "running":
                self.store.update_job(job["id"], status="queued", priority=1, error=None)
                steps = RunDir(self.run_dir(job["id"])).checkpoint_steps()
                self.store.add_event(job["id"], "The server restarted; the job resumes from "
                                     + (f"its checkpoint at step {steps[-1]}" if steps else "the start"))

    def _kill_leftover(self, job_id: str, pid: int) -> None:
        """SIGKILL the last server's process of a job, if it still runs; pid 0 (claimed, never
        started) is no process, and must never reach os.kill (0 is our own process group)."""
        marker = str(self.job_dir(job_id) / "config.yaml")
        if pid > 0 and process_alive(pid, marker):
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid, marker):
                time.sleep(0.05)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the workers; running jobs get SIGINT (a checkpoint) and stay ``running`` in the
        database, so the next server resumes them."""
        self._closing.set()
        self._wake.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _signal(proc, signal.SIGINT)
        deadline = time.time() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.time()))
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
        if self._data_lock is not None:
            self._data_lock.close()  # releases the data directory to the next server
            self._data_lock = None

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ requests

    def cancel(self, job_id: str) -> bool:
        """Mark the job cancelled and stop its process; False when it had already ended."""
        if not self.store.update_job(job_id, only_if=ACTIVE, status="cancelled", finished_at=int(time.time())):
            return False
        self.store.add_event(job_id, "Fine-tuning job cancelled")
        self._stop(job_id)
        return True

    def pause(self, job_id: str) -> bool:
        if not self.store.update_job(job_id, only_if=("queued", "running"), status="paused"):
            return False
        self.store.add_event(job_id, "Fine-tuning job paused; resume continues from its last checkpoint")
        self._stop(job_id)
        return True

    def resume(self, job_id: str) -> bool:
        if not self.store.update_job(job_id, only_if=("paused",), status="queued", priority=1, error=None):
            return False
        self.store.add_event(job_id, "Fine-tuning job resumed; queued")
        self.wake()
        return True

    def _stop(self, job_id: str) -> None:
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None:
            return
        _signal(proc, signal.SIGINT)  # jaxtune train saves a checkpoint at the next step boundary

        def kill_late() -> None:
            try:
                proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                _kill(proc)

        threading.Thread(target=kill_late, daemon=True).start()

    # ------------------------------------------------------------------ the workers

    def _worker(self, env: Mapping[str, str]) -> None:
        while not self._closing.is_set():
            try:
                job = self.store.claim_next()
            except Exception:  # noqa: BLE001 - the database may recover (disk space freed): keep polling
                log.exception("could not claim the next job")
                job = None
            if job is None:
                self._wake.wait(self.poll_s * 4)
                self._wake.clear()
                continue
            try:
                self._run(job, env)
            except Exception as err:  # noqa: BLE001 - a broken job must not stop the queue
                log.exception("job %s", job["id"])
                self._give_up(job["id"], f"the server could not run this job: {type(err).__name__}: {err}")

    def _give_up(self, job_id: str, message: str) -> None:
        """Fail a job the server could not run; if even that write fails, the job stays running
        in the database (the next server's recovery queues it again) and the worker goes on."""
        try:
            job = self.store.end_process(job_id, _failed(message))  # claimed (pid 0) or started: no process now
            if job is not None and job["status"] == "running":
                self.store.add_event(job_id, f"The job failed: {message}", level="error")
        except Exception:  # noqa: BLE001 - this worker's thread must survive
            log.exception("job %s: could not record its failure", job_id)

    def _run(self, job: dict[str, Any], env: Mapping[str, str]) -> None:
        job_id = job["id"]
        config = self.job_dir(job_id) / "config.yaml"
        steps = RunDir(self.run_dir(job_id)).checkpoint_steps()
        self.store.add_event(job_id, f"Fine-tuning job resumed from step {steps[-1]}" if steps
                             else "Fine-tuning job started")
        # Before the process can rewind metrics.jsonl: what the last one left, and the file's inode.
        self._ingest_or_log(job_id)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the child inherits it; launch unblocks
        try:
            with open(self.job_dir(job_id) / "train.log", "ab") as logfile:
                proc = subprocess.Popen(
                    launch(self.command(config)), stdout=logfile, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=job_environment(os.environ, env),
                    start_new_session=True)  # the server's own Ctrl-C must not reach it; close() signals it
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            self._watch(job_id, proc)
        except BaseException:
            _kill(proc)  # nothing watches it any more: it must not train on, unrecorded
            raise
        finally:
            with self._lock:
                self._procs.pop(job_id, None)
        self._ingest_or_log(job_id)  # its last lines, while no other worker can claim the job
        self._finish(job_id, proc.returncode)

    def _watch(self, job_id: str, proc: subprocess.Popen) -> None:
        """Record the job's process and turn its progress into events until it exits."""
        with self._lock:
            self._procs[job_id] = proc
            closing = self._closing.is_set()  # close() may have listed the processes before this one
        if closing:
            _signal(proc, signal.SIGINT)  # as close() does: a checkpoint, and the next server resumes it
        self.store.update_job(job_id, pid=proc.pid)
        if (self.store.job(job_id) or {}).get("status") != "running":
            self._stop(job_id)  # cancelled or paused between the claim and the start
        while proc.poll() is None:
            self._ingest_or_log(job_id)
            time.sleep(self.poll_s)

    def _finish(self, job_id: str, code: int) -> None:
        """Record the end of a job's process and the outcome it leaves: succeeded or failed where
        the job is still running, a stop where it was cancelled, paused or resumed meanwhile. The
        outcome is worked out from the run directory first and written with the end of the process
        (:meth:`Store.end_process`), as the job may be claimed again from that moment."""
        job = self.store.job(job_id)
        if job is None:
            return
        run = RunDir(self.run_dir(job_id))
        status = run.status() or {}
        succeeded = code == 0 and status.get("state") in ("finished", "early_stopped")
        if self._closing.is_set():
            outcome: dict[str, Any] = {}  # the server is stopping: the next one resumes a running job
        elif succeeded:
            outcome = {"status": "succeeded", "finished_at": int(time.time()),
                       "fine_tuned_model": job["data"]["fine_tuned_model"],
                       "trained_tokens": trained_tokens(run.metrics())}
        else:
            message = self._failure(job_id, code, status)
            outcome = _failed(message)
        ended = self.store.end_process(job_id, outcome)
        if ended is None or ended["status"] == "running" and not outcome:
            return
        if ended["status"] == "running":
            self.store.add_event(job_id, "The job has successfully completed" if succeeded else
                                 f"The job failed: {message}", level="info" if succeeded else "error")
        elif ended["status"] in ("cancelled", "paused", "queued"):  # queued: resumed before its process ended
            step = status.get("step")
            self.store.add_event(job_id, f"Training stopped at step {step}" if step is not None else "Training stopped")

    def _failure(self, job_id: str, code: int, status: Mapping[str, Any]) -> str:
        """Why a job's process failed, in one message: the run's own error when it recorded one
        (a non-finite step's, whose log ends 'training failed at step N (see above)'), the signal
        that killed it (the OOM killer's SIGKILL leaves only a progress line), else its log's error."""
        if status.get("state") == "failed" and status.get("error"):
            return str(status["error"])[:1000]
        last = self._last_error(job_id)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"jaxtune train was killed by signal {name}{hint}" + (f"; its last output: {last}" if last else "")
        return last or f"jaxtune train exited with code {code}"

    def _last_error(self, job_id: str) -> str | None:
        """The log's last ``jaxtune: error:`` line, else its last line."""
        path = self.job_dir(job_id) / "train.log"
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln.removeprefix("jaxtune: error: ") for ln in lines if ln.startswith("jaxtune: error:")]
        return errors[-1] if errors else (lines[-1][:1000] if lines else None)

    # ------------------------------------------------------------------ events

    def _ingest(self, job_id: str) -> None:
        """New log lines, metrics records and checkpoints of a job become its events, written with
        the new offsets in one transaction (a failed write is retried whole by the next poll)."""
        job = self.store.job(job_id)
        if job is None:
            return
        run = RunDir(self.run_dir(job_id))
        output = _new_lines(self.job_dir(job_id) / "train.log", job["log_offset"])
        events = [{"message": line.strip()[:1000], "level": _level(line)} for line in output.lines if line.strip()]
        metrics = _new_lines(run.path / RunDir.METRICS, job["metrics_offset"], self._metrics_inodes.get(job_id))
        records = _records(metrics.lines)
        if metrics.rewritten:  # rewound: the records it kept are events already
            records = self._not_yet_events(job_id, records)
        total = (run.status() or {}).get("total_steps")
        for record in records:
            text, data = _metrics_event(record, total)
            events.append({"message": text, "type": "metrics", "data": data})
        known = {c["step"] for c in job["checkpoints"]}
        new = [s for s in run.checkpoint_steps() if s not in known]
        checkpoints = list(job["checkpoints"])
        if new:
            by_step = {}
            for record in run.metrics():
                by_step.setdefault(int(record["step"]), {}).update(record)
            for step in new:
                checkpoints.append({"step": step, "created_at": int(time.time()),
                                    "metrics": checkpoint_metrics(by_step.get(step, {}), step)})
                events.append({"message": f"Checkpoint created at step {step}"})
        self.store.record(job_id, events, log_offset=output.offset, metrics_offset=metrics.offset,
                          checkpoints=checkpoints)
        self._metrics_inodes[job_id] = metrics.inode  # only once the offset that goes with it is stored

    def _not_yet_events(self, job_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` less those whose step (train or validation) already has a metrics event."""
        done = {(e["data"].get("step"), "train_loss" in e["data"]) for e in self.store.events(job_id, type="metrics")
                if e["data"]}
        return [r for r in records if (int(r.get("step", 0)), "loss" in r) not in done]

    def _ingest_or_log(self, job_id: str) -> None:
        """:meth:`_ingest`, an error logged rather than raised: a database write that fails (a full
        disk) must not end the job's monitor, which would kill the job (PR_SET_PDEATHSIG fires when
        the thread that started it exits) and stop the queue. The next poll retries."""
        try:
            self._ingest(job_id)
        except Exception:  # noqa: BLE001
            if job_id not in self._failing:  # once per outage, not once per poll
                log.exception("job %s: could not record its progress; retrying at each poll", job_id)
            self._failing.add(job_id)
            return
        if job_id in self._failing:
            self._failing.discard(job_id)
            log.warning("job %s: recording its progress again", job_id)


def _failed(message: str) -> dict[str, Any]:
    """A failed job's columns."""
    return {"status": "failed", "finished_at": int(time.time()),
            "error": {"code": "training_failed", "message": message, "param": None}}


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a job's process group and reap the process: it leads a session of its own, and its
    data loader's worker processes (grain) in that group must not outlive it."""
    if proc.poll() is None:  # not reaped: its pid is still its own
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
    proc.wait()


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except OSError:
        pass


class Tail(NamedTuple):
    """What :func:`_new_lines` read."""

    offset: int  # where the next read starts
    lines: list[str]
    inode: int | None  # the file's, to tell a rewritten file at the next read
    rewritten: bool  # read from the start: the file was rewritten since ``offset`` was taken


def _new_lines(path: Path, offset: int, inode: int | None = None) -> Tail:
    """Complete lines appended to ``path`` after byte ``offset``. A file rewritten since (shorter
    than ``offset``, or another inode than ``inode``: RunDir.rewind replaces metrics.jsonl when a
    resumed run drops its records past the checkpoint) is read from its start."""
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            rewritten = stat.st_size < offset or inode not in (None, stat.st_ino)
            start = 0 if rewritten else offset
            fh.seek(start)
            chunk = fh.read()
    except OSError:
        return Tail(offset, [], inode, False)
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    return Tail(start + end, chunk[:end].decode("utf-8", errors="replace").splitlines(), stat.st_ino, rewritten)


def _records(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The metrics records among ``lines`` (a torn or foreign line is skipped)."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def checkpoint_metrics(record: Mapping[str, Any], step: int) -> dict[str, Any]:
    """OpenAI's checkpoint metrics from a run's records at that step."""
    out: dict[str, Any] = {"step": step}
    if "loss" in record:
        out["train_loss"] = record["loss"]
    if "eval/loss" in record:
        out["valid_loss"] = out["full_valid_loss"] = record["eval/loss"]
    return out


def _metrics_event(record: Mapping[str, Any], total: int | None) -> tuple[str, dict[str, Any]]:
    step = int(record.get("step", 0))
    data: dict[str, Any] = {"step": step, "total_steps": total}
    if "loss" in record:
        data["train_loss"] = record["loss"]
        data.update({k: record[k] for k in ("learning_rate", "grad_norm", "tokens_per_s") if k in record})
        text = f"Step {step}/{total}: training loss={record['loss']:.4f}"
    else:
        data.update({k.replace("eval/", "valid_"): v for k, v in record.items() if k.startswith("eval/")})
        text = f"Step {step}/{total}: validation loss={record.get('eval/loss', float('nan')):.4f}"
    return text, data

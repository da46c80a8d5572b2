"""The jobs service's HTTP layer (:mod:`jaxtune.serve.app`) in a uvicorn server thread, asked
with the standard library's HTTP client, with job processes that exit at once: request limits,
error objects and what the API returns, without training anything (tests/test_serve.py drives a
real server with the OpenAI clients)."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from jaxtune.serve.app import Settings, create_app  # noqa: E402
from jaxtune.serve.jobs import BaseModel  # noqa: E402
from jaxtune.serve.runner import Runner  # noqa: E402
from jaxtune.serve.store import Store  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROWS = "".join(json.dumps({"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]})
               + "\n" for w in ("alpha", "beta gamma", "delta", "omega kappa"))
BOUNDARY = "jaxtune-test-boundary"
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"  # JAX's: preallocate 75% of each GPU at the backend's start


class Client:
    """Requests to a server on ``port`` with a key's Authorization header; replies as
    ``(status, JSON body or text)``."""

    def __init__(self, port: int, key: str, owner: str, data_dir: Path):
        self.port, self.headers = port, {"Authorization": f"Bearer {key}"}
        self.owner, self.data_dir = owner, data_dir

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={**self.headers, **(headers or {})}, encode_chunked=chunked)
            reply = conn.getresponse()
            text = reply.read().decode()
        finally:
            conn.close()
        try:
            return reply.status, json.loads(text)
        except ValueError:
            return reply.status, text

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        return self.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def upload(self, rows: str = ROWS) -> tuple[int, Any]:
        return self.request("POST", "/v1/files", multipart(rows.encode()),
                            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def multipart(content: bytes) -> bytes:
    """A ``purpose=fine-tune`` form with ``content`` as its file."""
    head, tail = form_parts()
    return head + content + tail


def form_parts() -> tuple[bytes, bytes]:
    """What comes before and after the file's bytes in a ``purpose=fine-tune`` form."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--{BOUNDARY}\r\n'
            'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    return head.encode(), f"\r\n--{BOUNDARY}--\r\n".encode()


def chunked_upload(client: Client, size: int) -> tuple[int, int]:
    """A chunked upload (no Content-Length) of ``size`` bytes, sent until the server answers:
    ``(status, file bytes sent by then)``."""
    head, tail = form_parts()
    sent, block = 0, b"x" * 65536
    with socket.create_connection(("127.0.0.1", client.port), timeout=30) as sock:
        headers = {**client.headers, "Host": "test", "Transfer-Encoding": "chunked",
                   "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        sock.sendall(("POST /v1/files HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                      + "\r\n").encode())
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        try:
            while sent < size and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
            if sent >= size:
                sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        except OSError:  # the server answered and closed the connection while we sent
            pass
        reply = sock.recv(65536)
    return int(reply.split()[1]), sent


@pytest.fixture
def api(tmp_path, monkeypatch):
    """``api(data_dir=..., **settings)``: a server over a data directory (default in ``tmp_path``)
    with a model ``tiny`` (never loaded) and a :class:`Client` with a key; stopped at the end."""
    monkeypatch.setattr(Runner, "command", lambda self, config: [sys.executable, "-c", "pass"])
    environ = dict(os.environ)  # create_app sets the server's own variables: put back as it was at the end
    monkeypatch.delenv(PREALLOCATE, raising=False)
    servers = []

    def make(data_dir: Path | None = None, **settings: Any) -> Client:
        data = data_dir or tmp_path / "data"
        store = Store(data / "serve.sqlite")
        key = store.create_key("test")[1]
        owner = store.key_owner(key)
        store.close()
        app = create_app(Settings(data_dir=data, models={"tiny": BaseModel("tiny", str(tmp_path / "tiny"))},
                                  **settings))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return Client(port, key, owner, data.resolve())

    yield make
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)
    os.environ.clear()
    os.environ.update(environ)


def test_a_relative_data_dir_is_resolved_at_start(api, tmp_path, monkeypatch):
    """A job's recipe names its files and run directory absolutely: a server restarted from another
    working directory finds them."""
    monkeypatch.chdir(tmp_path)
    client = api(data_dir=Path("data"))
    status, file = client.upload()
    assert status == 200, file
    status, job = client.post_json("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file["id"]})
    assert status == 200, job
    config = yaml.safe_load((tmp_path / "data" / "jobs" / job["id"] / "config.yaml").read_text())
    assert Path(config["data"]["train"]).is_absolute() and Path(config["output"]["dir"]).is_absolute(), config
    assert Path(config["data"]["train"]).is_file()


def test_non_finite_metrics_are_null_in_events_and_checkpoints(api):
    """A NaN loss (a diverged run) is JSON's null where the API returns it, not a 500 forever after."""
    client = api()
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-nan", {"fine_tuned_model": "ft:tiny:x::nan"}, status="failed")
    store.add_event("ftjob-nan", "Step 5/10: training loss=nan", type="metrics",
                    data={"step": 5, "train_loss": float("nan"), "grad_norm": float("inf")})
    store.update_job("ftjob-nan", checkpoints=[{"step": 5, "created_at": 0,
                                                "metrics": {"step": 5, "train_loss": float("nan")}}])
    store.close()
    (client.data_dir / "jobs" / "ftjob-nan" / "run" / "checkpoints" / "5").mkdir(parents=True)
    status, events = client.request("GET", "/v1/fine_tuning/jobs/ftjob-nan/events")
    assert status == 200, events
    assert events["data"][0]["data"] == {"step": 5, "train_loss": None, "grad_norm": None}
    status, checkpoints = client.request("GET", "/v1/fine_tuning/jobs/ftjob-nan/checkpoints")
    assert status == 200, checkpoints
    assert checkpoints["data"][0]["metrics"] == {"step": 5, "train_loss": None}


def test_a_checkpoint_model_name_with_a_non_ascii_digit_is_not_found(api):
    client = api()
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-ck", {"fine_tuned_model": "ft:tiny:x::ck"}, status="running")
    store.close()
    for step in ("²", "٣", "x"):
        status, reply = client.post_json("/v1/chat/completions", {
            "model": f"ft:tiny:x::ck:ckpt-step-{step}", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and reply["error"]["code"] == "model_not_found", reply


def test_request_bodies_are_capped_as_they_arrive(api):
    """An upload sent chunked (no Content-Length to check first) is refused once past the cap, not
    spooled whole first; a JSON body past its cap is a 413 too, declared or chunked."""
    client = api(max_upload_bytes=1 << 20, max_json_bytes=4096)
    status, sent = chunked_upload(client, 64 << 20)
    assert status == 413 and sent < 16 << 20, (status, sent >> 20)
    body = json.dumps({"model": "tiny", "training_file": "file-x", "metadata": {"pad": "x" * 8192}}).encode()
    for chunked in (False, True):
        status, reply = client.request("POST", "/v1/fine_tuning/jobs", iter([body]) if chunked else body,
                                       {"Content-Type": "application/json"}, chunked=chunked)
        assert status == 413 and reply["error"]["code"] == "request_too_large", reply
    status, file = client.upload()
    assert status == 200, file


def test_less_than_one_batch_is_refused_at_create(api):
    """As jaxtune train refuses it at its start, but naming the request's field."""
    client = api()
    status, file = client.upload()  # 4 rows
    assert status == 200, file
    method = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 16, "n_epochs": 2}}}
    status, reply = client.post_json("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file["id"],
                                                             "method": method})
    assert status == 400, reply
    assert reply["error"]["param"] == "method.supervised.hyperparameters.batch_size", reply
    assert "2 epoch(s) of the training file's 4 rows is less than one batch of 16 rows" in reply["error"]["message"]
    method["supervised"]["hyperparameters"]["n_epochs"] = 4  # 16 rows: one batch
    status, reply = client.post_json("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file["id"],
                                                             "method": method})
    assert status == 200, reply


def test_events_are_paged_by_the_database_newest_first(api, monkeypatch):
    """OpenAI's events list: newest first, ``limit`` of them after the event ``after``, ``has_more``
    until the oldest; each page read as a page of the table, not the job's every event."""
    client = api()
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-ev", {"fine_tuned_model": "ft:tiny:x::ev"}, status="failed")
    for n in range(150):
        store.add_event("ftjob-ev", f"event {n}")
    every = [e["id"] for e in store.events("ftjob-ev")]
    store.close()
    assert len(every) == 150
    read: list[int] = []
    all_rows = Store._all

    def counted(self: Store, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        rows = all_rows(self, sql, args)
        if "FROM events" in sql:
            read.append(len(rows))
        return rows

    monkeypatch.setattr(Store, "_all", counted)
    pages, after = [], None
    while True:
        status, reply = client.request("GET", "/v1/fine_tuning/jobs/ftjob-ev/events?limit=40"
                                       + (f"&after={after}" if after else ""))
        assert status == 200, reply
        pages.append(reply)
        if not reply["has_more"]:
            break
        after = reply["data"][-1]["id"]
    assert [len(p["data"]) for p in pages] == [40, 40, 40, 30]
    assert [e["id"] for p in pages for e in p["data"]] == every
    assert pages[0]["data"][0]["message"] == "event 149" and pages[-1]["data"][-1]["message"] == "event 0"
    assert read and max(read) <= 41, read  # a page and one more (has_more), never all 150
    status, reply = client.request("GET", "/v1/fine_tuning/jobs/ftjob-ev/events?after=ftevent-nope")
    assert status == 400 and reply["error"]["param"] == "after", reply
    status, reply = client.request("GET", "/v1/fine_tuning/jobs/ftjob-ev/events?limit=0")
    assert status == 400 and reply["error"]["param"] == "limit", reply


@pytest.mark.parametrize("user", [None, "true"])
def test_the_server_allocates_on_demand_and_its_jobs_as_jax_does(api, monkeypatch, user):
    """Chat completions' JAX shares the accelerator with the jobs: it does not preallocate 75% of
    it, unless the user said otherwise; a job's process keeps JAX's default (or the user's value)."""
    if user is not None:
        monkeypatch.setenv(PREALLOCATE, user)
    dump = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    monkeypatch.setattr(Runner, "command", lambda self, config: [sys.executable, "-c", dump,
                                                                 str(config.parent / "env.json")])
    client = api()
    assert os.environ.get(PREALLOCATE) == (user or "false")
    status, file = client.upload()
    assert status == 200, file
    status, job = client.post_json("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file["id"]})
    assert status == 200, job
    dumped = client.data_dir / "jobs" / job["id"] / "env.json"
    deadline = time.time() + 30
    while not (dumped.is_file() and dumped.read_text().endswith("}")):
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    env = json.loads(dumped.read_text())
    assert env.get(PREALLOCATE) == user


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> dict[str, Any]:
    """A tiny LoRA run with checkpoints at steps 2 and 4 (``run``), and what each step's weights answer
    to ``messages`` greedily (``expected``), from a copy of the run holding that checkpoint alone."""
    import shutil

    from helpers import tiny_hf_model

    import jaxtune as jt
    from jaxtune.data.testing import tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("served")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    write_jsonl(root / "train.jsonl", [{"messages": [{"role": "user", "content": w},
                                                     {"role": "assistant", "content": w.upper() * 3}]}
                                       for w in ("alpha", "beta gamma", "delta", "omega kappa") * 4])
    run = root / "run"
    jt.finetune({"model": {"path": str(root / "llama")},
                 "plan": [{"preset": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}],
                 "data": {"train": str(root / "train.jsonl"), "kind": "chat", "max_length": 32, "batch_size": 8},
                 "optimizer": {"learning_rate": 0.1, "warmup_steps": 0},
                 "train": {"steps": 4, "progress": False}, "checkpoint": {"every": 2, "keep": 3},
                 "eval": {"before": False, "after": False}, "output": {"dir": str(run), "export": "none"}})
    messages = [{"role": "user", "content": "alpha"}]
    expected = {}
    for step in (2, 4):
        copy = root / f"at-{step}"
        shutil.copytree(run, copy)
        shutil.rmtree(copy / "checkpoints" / str(6 - step))
        [item] = jt.complete(jt.open_run(copy, evaluation=False).model, [messages], chat=True, max_new_tokens=6)
        expected[step] = item["text"]
    assert expected[2] != expected[4]  # the two steps are told apart
    return {"run": run, "messages": messages, "expected": expected}


def _running_job(client: Client, trained_run: dict[str, Any]) -> Path:
    """``trained_run``'s run as the run directory of the running job ``ft:tiny:x::run``."""
    import shutil

    run = client.data_dir / "jobs" / "ftjob-run" / "run"
    shutil.copytree(trained_run["run"], run)
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-run", {"fine_tuned_model": "ft:tiny:x::run"}, status="running")
    store.close()
    return run


@pytest.mark.parametrize("when", ["before it is opened", "while it is verified", "while it is read"])
def test_a_checkpoint_rotated_away_while_it_loads_is_not_found(api, trained_run, monkeypatch, when):
    """A running job's rotation (checkpoint.keep) deletes its old checkpoints: one removed after the
    request named it, as the server opens, verifies or reads it, is a 404 that says so, not a 500,
    and the server goes on answering for the checkpoints still there."""
    import shutil

    import jaxtune
    from jaxtune.training import checkpoint, checkpoint_integrity

    client = api()
    run = _running_job(client, trained_run)

    def rotate_then(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if (run / "checkpoints" / "2").is_dir():
                shutil.rmtree(run / "checkpoints" / "2")
            return real(*args, **kwargs)
        return call

    module, name = {"before it is opened": (jaxtune, "open_run"),
                    "while it is verified": (checkpoint_integrity, "_sha256"),
                    "while it is read": (checkpoint.Checkpointer, "_restore_step")}[when]
    monkeypatch.setattr(module, name, rotate_then(getattr(module, name)))
    for listed in (True, False):  # then no longer listed
        status, reply = client.post_json("/v1/chat/completions", {
            "model": "ft:tiny:x::run:ckpt-step-2", "messages": trained_run["messages"]})
        assert status == 404 and reply["error"]["code"] == "model_not_found", reply
        assert ("checkpoint.keep" in reply["error"]["message"]) == listed, reply
    monkeypatch.undo()
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::run:ckpt-step-4", "messages": trained_run["messages"], "max_tokens": 6,
        "temperature": 0})
    assert status == 200 and reply["choices"][0]["message"]["content"] == trained_run["expected"][4], reply


def _damage(run: Path, step: int) -> None:
    """Flip a byte of the largest file of ``run``'s checkpoint at ``step``: it no longer verifies."""
    victim = max((p for p in (run / "checkpoints" / str(step) / "trainable").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_naming_the_step_and_the_ones_to_use(api, trained_run):
    """A checkpoint whose files no longer match their checksums is the request's to change, not a
    server error: a 400 (a 500 the OpenAI SDKs retry, reloading the damaged step each time) whose
    one line names the step and the checkpoints to use instead; the others still answer."""
    client = api()
    run = _running_job(client, trained_run)
    _damage(run, 2)
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::run:ckpt-step-2", "messages": trained_run["messages"]})
    assert status == 400, reply
    assert reply["error"]["code"] == "model_damaged" and reply["error"]["param"] == "model", reply
    message = reply["error"]["message"]
    assert "\n" not in message and "step 2" in message and "ft:tiny:x::run:ckpt-step-4" in message, message
    assert "/v1/fine_tuning/jobs/ftjob-run/checkpoints" in message, message
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::run:ckpt-step-4", "messages": trained_run["messages"], "max_tokens": 6,
        "temperature": 0})
    assert status == 200 and reply["choices"][0]["message"]["content"] == trained_run["expected"][4], reply


def test_a_fine_tuned_model_whose_last_checkpoint_is_damaged_is_refused_not_an_older_one(api, trained_run):
    """The ``ft:`` model is the step its run ended with: where that checkpoint no longer verifies,
    the server answered 200 with the step before's weights in its place (a warning in its log
    only); now the same 400 as for the damaged checkpoint itself, naming the step to ask for."""
    import shutil

    client = api()
    run = client.data_dir / "jobs" / "ftjob-run" / "run"
    shutil.copytree(trained_run["run"], run)
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-run", {"fine_tuned_model": "ft:tiny:x::run"}, status="succeeded")
    store.close()
    _damage(run, 4)
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::run", "messages": trained_run["messages"], "max_tokens": 6, "temperature": 0})
    assert status == 400 and reply["error"]["code"] == "model_damaged", reply
    message = reply["error"]["message"]
    assert "'ft:tiny:x::run'" in message and "step 4" in message and "'ft:tiny:x::run:ckpt-step-2'" in message
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::run:ckpt-step-2", "messages": trained_run["messages"], "max_tokens": 6,
        "temperature": 0})
    assert status == 200 and reply["choices"][0]["message"]["content"] == trained_run["expected"][2], reply


def test_a_running_jobs_checkpoints_are_read_in_place_and_change_nothing(api, trained_run, monkeypatch):
    """A job's checkpoint, the latest or an earlier one, answers as that step's weights do; it is
    verified and read where the job keeps it (no copy, nothing written beside it), and loading it
    leaves the job's directory as it was: the save its trainer has in flight (an opened checkpoint
    directory drops unfinished saves) stays."""
    from jaxtune.training import checkpoint_integrity

    client = api()
    run = _running_job(client, trained_run)
    in_flight = run / "checkpoints" / "6.orbax-checkpoint-tmp-1"  # the trainer's next save, being written
    in_flight.mkdir()
    (in_flight / "trainable").write_text("...")
    job_dir = sorted(str(p) for p in run.parent.rglob("*"))
    verified = []
    verify = checkpoint_integrity.verify

    def spy(step_dir: Path) -> str | None:
        verified.append(step_dir)
        assert sorted(str(p) for p in run.parent.rglob("*")) == job_dir  # nothing added while it loads
        return verify(step_dir)

    monkeypatch.setattr(checkpoint_integrity, "verify", spy)
    for step in (4, 2):
        status, reply = client.post_json("/v1/chat/completions", {
            "model": f"ft:tiny:x::run:ckpt-step-{step}", "messages": trained_run["messages"], "max_tokens": 6,
            "temperature": 0})
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == trained_run["expected"][step], step
        assert verified[-1] == run / "checkpoints" / str(step)
    assert sorted(str(p) for p in run.parent.rglob("*")) == job_dir


@pytest.mark.parametrize("best_checkpoint", ["kept", "set aside"])
def test_a_fine_tuned_model_is_the_model_its_run_ended_with(api, monkeypatch, best_checkpoint):
    """With eval.use_best a run ends with (and exports) its best checkpoint's params, while its
    latest checkpoint holds the last step's: the ``ft:`` model is the best one; the latest where
    the run set the best aside as damaged (moved out of best/), as it then ended with its latest
    params."""
    import jaxtune
    from jaxtune.serve import inference
    from jaxtune.training.rundir import RunDirError

    client = api()
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-best", {"fine_tuned_model": "ft:tiny:x::best"}, status="succeeded")
    store.close()
    run = client.data_dir / "jobs" / "ftjob-best" / "run"
    (run / "checkpoints" / "6").mkdir(parents=True)
    (run / "best" / ("2" if best_checkpoint == "kept" else ".set_aside/2-20260101T000000")).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"every": 2, "best_metric": "loss", "use_best": True}}))

    def open_run(run_dir: Path, evaluation: bool = True, best: bool = False, restore: bool = True) -> Any:
        if best and best_checkpoint == "set aside":
            raise RunDirError(f"{run_dir}: no best checkpoint")
        return type("Trainer", (), {"model": f"{'best' if best else 'latest'} model", "close": lambda self: None,
                                    "restore": lambda self, step: step})()

    monkeypatch.setattr(jaxtune, "open_run", open_run, raising=False)
    monkeypatch.setattr(inference, "complete", lambda model, messages, opts: {
        "text": model, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "ids": [1]})
    status, reply = client.post_json("/v1/chat/completions", {
        "model": "ft:tiny:x::best", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == ("best model" if best_checkpoint == "kept" else "latest model")


def test_a_fine_tuned_model_whose_best_checkpoint_is_damaged_is_refused_not_the_latest(api, tmp_path):
    """With eval.use_best the ``ft:`` model is the best checkpoint's; one damaged since the run
    ended (still in best/: a reader moves nothing) made the server answer 200 with the latest
    step's weights in its place. Now a 400 naming the best step; the checkpoints still answer."""
    from helpers import tiny_hf_model

    import jaxtune as jt
    from jaxtune.data.testing import tiny_tokenizer, write_jsonl
    from jaxtune.training.rundir import RunDir

    tiny_hf_model("LlamaForCausalLM", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    rows = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": w}, {
        "role": "assistant", "content": w.upper()}]} for w in ("alpha", "beta gamma", "delta", "omega kappa") * 4])
    client = api()
    run = client.data_dir / "jobs" / "ftjob-best" / "run"
    jt.finetune({"model": {"path": str(tmp_path / "llama")},
                 "plan": [{"preset": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}],
                 "data": {"train": str(rows), "validation": str(rows), "kind": "chat", "max_length": 32,
                          "batch_size": 8},
                 "optimizer": {"learning_rate": 0.1, "warmup_steps": 0}, "train": {"steps": 4, "progress": False},
                 "checkpoint": {"every": 2}, "output": {"dir": str(run), "export": "none"},
                 "eval": {"before": False, "after": False, "every": 2, "use_best": True, "best_metric": "loss"}})
    store = Store(client.data_dir / "serve.sqlite")
    store.add_job(client.owner, "ftjob-best", {"fine_tuned_model": "ft:tiny:x::best"}, status="succeeded")
    store.close()
    [best] = RunDir(run).best_steps()
    victim = max((p for p in (run / "best" / str(best) / "trainable").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    messages = [{"role": "user", "content": "alpha"}]
    status, reply = client.post_json("/v1/chat/completions", {"model": "ft:tiny:x::best", "messages": messages})
    assert status == 400 and reply["error"]["code"] == "model_damaged", reply
    message = reply["error"]["message"]
    assert f"the job's best checkpoint at step {best} is damaged" in message, message
    assert "'ft:tiny:x::best:ckpt-step-4'" in message, message  # its own copy under checkpoints/ is intact
    status, reply = client.post_json("/v1/chat/completions", {"model": "ft:tiny:x::best:ckpt-step-4",
                                                              "messages": messages, "max_tokens": 4})
    assert status == 200, reply

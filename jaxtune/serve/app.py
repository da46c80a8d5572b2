"""The HTTP API: OpenAI's fine-tuning endpoints (files, jobs, events, checkpoints, models) and
chat completions, as a Starlette app over :mod:`jaxtune.serve.store`, :mod:`~jaxtune.serve.runner`
and :mod:`~jaxtune.serve.inference`.

Shapes, field names, status values, list pagination (``after``/``limit``/``has_more``) and error
objects (``{"error": {"message", "type", "param", "code"}}``) follow OpenAI's published API, so
the official SDKs work unchanged with ``base_url`` pointed here. Every request needs
``Authorization: Bearer <key>``; a key sees only what it made (another key's objects are 404).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxtune.serve import inference
from jaxtune.serve.http_api import (
    Handler,
    authed,
    capped,
    error,
    finite,
    json_body,
    list_object,
    no_such_after,
    not_found,
    page,
    page_limit,
    upload_too_large,
)
from jaxtune.serve.jobs import BaseModel, RequestError, check_upload, job_recipe, method_of
from jaxtune.serve.runner import ACTIVE, Runner
from jaxtune.serve.store import Store, new_id
from jaxtune.training.rundir import RunDir

PAST = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}
log = logging.getLogger(__name__)
CREATE_FIELDS = {"model", "training_file", "validation_file", "suffix", "seed", "hyperparameters", "method",
                 "metadata", "integrations"}


@dataclasses.dataclass
class Settings:
    """What ``jaxtune serve`` is told: where its data lives and what it may tune."""

    data_dir: Path
    models: dict[str, BaseModel]
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)  # the operator's recipe defaults
    device_sets: list[dict[str, str]] = dataclasses.field(default_factory=lambda: [{}])
    max_upload_bytes: int = 512 * 2**20
    max_json_bytes: int = 16 * 2**20  # a JSON request body (a job, a chat completion's messages)
    loaded_models: int = 2


# ----------------------------------------------------------------------------- objects


def file_object(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def job_object(job: Mapping[str, Any], runner: Runner) -> dict[str, Any]:
    data = job["data"]
    estimated = None
    if job["status"] == "running":
        try:
            eta = RunDir(runner.run_dir(job["id"])).summary().get("eta_s")
        except OSError:
            eta = None
        estimated = int(time.time() + eta) if eta is not None else None
    method = data["method"]
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "error": job["error"],
        "fine_tuned_model": job["fine_tuned_model"], "finished_at": job["finished_at"],
        "hyperparameters": data["hyperparameters"], "model": data["model"], "organization_id": job["owner"],
        "result_files": [], "seed": data["seed"], "status": job["status"], "trained_tokens": job["trained_tokens"],
        "training_file": data["training_file"], "validation_file": data["validation_file"],
        "estimated_finish": estimated, "integrations": [], "metadata": data["metadata"],
        "method": {"type": method, method: {"hyperparameters": data["hyperparameters"]}},
        "user_provided_suffix": data["suffix"],
    }


def checkpoint_objects(job: Mapping[str, Any], runner: Runner) -> list[dict[str, Any]]:
    """The job's checkpoints still on disk (each a model id), newest first."""
    on_disk = set(RunDir(runner.run_dir(job["id"])).checkpoint_steps())
    return [{"id": f"ftckpt-{job['id'].removeprefix('ftjob-')}-{c['step']}", "object": "fine_tuning.job.checkpoint",
             "created_at": c["created_at"], "fine_tuning_job_id": job["id"], "step_number": c["step"],
             "metrics": finite(c["metrics"]),
             "fine_tuned_model_checkpoint": f"{job['data']['fine_tuned_model']}:ckpt-step-{c['step']}"}
            for c in sorted(job["checkpoints"], key=lambda c: -c["step"]) if c["step"] in on_disk]


# ----------------------------------------------------------------------------- files


async def create_file(request: Request, owner: str) -> Response:
    settings: Settings = request.app.state.settings
    # The form's other fields and framing get 64 KiB on top of the file's limit, checked exactly below.
    body = capped(request, settings.max_upload_bytes + 65536, lambda: upload_too_large(settings.max_upload_bytes))
    try:
        form = await body.form(max_files=1, max_fields=8)
    except RequestError:
        raise
    except Exception as err:  # noqa: BLE001 - starlette raises several kinds for a malformed body
        raise RequestError(f"expected a multipart form with 'file' and 'purpose': {err}", "file") from None
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "fine-tune":
        raise RequestError(f"purpose: this server takes 'fine-tune' files, got {purpose!r}", "purpose")
    if upload is None or isinstance(upload, str):
        raise RequestError("file: missing (send it as the multipart field 'file')", "file")
    file_id = new_id("file")
    folder = settings.data_dir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_id}.jsonl"  # the stored name is ours; the client's filename is only metadata
    filename = Path(upload.filename or "upload.jsonl").name[:255]

    def store() -> tuple[int, str, int]:
        size = 0
        with open(path, "wb") as out:
            while chunk := upload.file.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise upload_too_large(settings.max_upload_bytes)
                out.write(chunk)
        kind, rows = check_upload(path, filename)
        return size, kind, rows

    try:
        size, kind, rows = await run_in_threadpool(store)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        await form.close()
    row = request.app.state.store.add_file(owner, file_id, filename, purpose, size, kind, rows)
    return JSONResponse(file_object(row))


def _file(request: Request, owner: str, param: str | None = None, file_id: str | None = None) -> dict[str, Any]:
    file_id = file_id or request.path_params["file_id"]
    row = request.app.state.store.file(owner, file_id)
    if row is None:
        raise not_found("file", file_id, param)
    return row


async def list_files(request: Request, owner: str) -> Response:
    rows = request.app.state.store.files(owner, request.query_params.get("purpose"))
    if request.query_params.get("order", "desc") == "desc":
        rows.reverse()
    return JSONResponse(page([file_object(r) for r in rows], request, default_limit=10000, max_limit=10000))


async def retrieve_file(request: Request, owner: str) -> Response:
    return JSONResponse(file_object(_file(request, owner)))


async def file_content(request: Request, owner: str) -> Response:
    row = _file(request, owner)
    path = request.app.state.settings.data_dir / "files" / f"{row['id']}.jsonl"
    return Response(path.read_bytes(), media_type="application/octet-stream")


async def delete_file(request: Request, owner: str) -> Response:
    row = _file(request, owner)
    request.app.state.store.delete_file(owner, row["id"])
    return JSONResponse({"id": row["id"], "object": "file", "deleted": True})


# ----------------------------------------------------------------------------- jobs


async def create_job(request: Request, owner: str) -> Response:
    settings: Settings = request.app.state.settings
    runner: Runner = request.app.state.runner
    body = await json_body(request)
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        known = ", ".join(sorted(CREATE_FIELDS))
        raise RequestError(f"{unknown[0]}: not a fine-tuning job field here (known: {known})", unknown[0])
    if body.get("integrations"):
        raise RequestError("integrations: not supported by this server; remove them", "integrations")
    model = body.get("model")
    if not isinstance(model, str) or model not in settings.models:
        raise RequestError(f"model: '{model}' cannot be fine-tuned here (available: {', '.join(settings.models)})",
                           "model", "model_not_available")
    suffix = body.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and 1 <= len(suffix) <= 64
                                   and all(c.isalnum() or c in "-_." for c in suffix)):
        raise RequestError("suffix: up to 64 letters, digits, '-', '_' or '.'", "suffix")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RequestError(f"seed: expected an integer, got {seed!r}", "seed")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise RequestError("metadata: up to 16 string keys with string values", "metadata")

    method, hyperparameters = method_of(body)
    want = "preference" if method == "dpo" else "chat"
    files = {}
    for param in ("training_file", "validation_file"):
        if body.get(param) is None:
            if param == "training_file":
                raise RequestError("training_file: required (a file id from POST /v1/files)", param)
            continue
        row = _file(request, owner, param, str(body[param]))
        if row["kind"] != want:
            raise RequestError(f"{param}: {row['filename']} holds {row['kind']} rows, but a {method} job needs "
                               f"{want} rows", param, "invalid_file_format")
        files[param] = row

    job_id = new_id("ftjob")
    folder = lambda row: settings.data_dir / "files" / f"{row['id']}.jsonl"  # noqa: E731

    def recipe() -> tuple[dict[str, Any], dict[str, Any]]:  # a packaged base model may be fetched here
        valid = files.get("validation_file")
        return job_recipe(model_path=settings.models[model].local_path(), method=method,
                          hyperparameters=hyperparameters, seed=seed, training_file=folder(files["training_file"]),
                          validation_file=folder(valid) if valid else None, run_dir=runner.run_dir(job_id),
                          operator=settings.recipe, training_rows=files["training_file"]["rows"])

    config, resolved = await run_in_threadpool(recipe)
    job_dir = runner.job_dir(job_id)
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    name = f"ft:{model}:{owner}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"
    data = {"model": model, "training_file": files["training_file"]["id"],
            "validation_file": files["validation_file"]["id"] if "validation_file" in files else None,
            "suffix": suffix, "seed": seed, "method": method, "hyperparameters": resolved, "metadata": metadata,
            "fine_tuned_model": name}
    store: Store = request.app.state.store
    job = store.add_job(owner, job_id, data)
    store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    store.add_event(job_id, f"Files validated: {files['training_file']['rows']} training rows"
                    + (f", {files['validation_file']['rows']} validation rows" if "validation_file" in files else ""))
    runner.wake()
    return JSONResponse(job_object(job, runner))


def _job(request: Request, owner: str) -> dict[str, Any]:
    job = request.app.state.store.job(request.path_params["job_id"], owner)
    if job is None:
        raise not_found("job", request.path_params["job_id"])
    return job


async def list_jobs(request: Request, owner: str) -> Response:
    runner = request.app.state.runner
    return JSONResponse(page([job_object(j, runner) for j in request.app.state.store.jobs(owner)], request))


async def retrieve_job(request: Request, owner: str) -> Response:
    return JSONResponse(job_object(_job(request, owner), request.app.state.runner))


def _transition(action: str, allowed: tuple[str, ...]) -> Handler:
    async def handler(request: Request, owner: str) -> Response:
        runner: Runner = request.app.state.runner
        job = _job(request, owner)
        if not getattr(runner, action)(job["id"]):
            status = request.app.state.store.job(job["id"])["status"]
            raise RequestError(f"Job {job['id']} is {status}; only a job that is {' or '.join(allowed)} can be "
                               f"{PAST[action]}", None, "invalid_job_state")
        return JSONResponse(job_object(request.app.state.store.job(job["id"]), runner))

    return handler


async def job_events(request: Request, owner: str) -> Response:
    job = _job(request, owner)
    limit = page_limit(request, max_limit=10000)
    after = request.query_params.get("after") or None
    try:  # one more than the page: whether there is more
        rows = request.app.state.store.events(job["id"], after=after, limit=limit + 1)
    except KeyError:
        raise no_such_after(str(after)) from None
    events = [{"id": e["id"], "object": "fine_tuning.job.event", "created_at": e["created_at"], "level": e["level"],
               "message": e["message"], "data": finite(e["data"]), "type": e["type"]} for e in rows]
    return JSONResponse(list_object(events, limit))


async def job_checkpoints(request: Request, owner: str) -> Response:
    job = _job(request, owner)
    return JSONResponse(page(checkpoint_objects(job, request.app.state.runner), request, default_limit=10))


# ----------------------------------------------------------------------------- models


def owned_models(request: Request, owner: str) -> list[dict[str, Any]]:
    models = [{"id": m, "object": "model", "created": 0, "owned_by": "jaxtune"}
              for m in request.app.state.settings.models]
    models += [{"id": j["fine_tuned_model"], "object": "model", "created": j["finished_at"], "owned_by": owner}
               for j in request.app.state.store.jobs(owner, "succeeded")]
    return models


async def list_models(request: Request, owner: str) -> Response:
    return JSONResponse({"object": "list", "data": owned_models(request, owner)})


async def retrieve_model(request: Request, owner: str) -> Response:
    name = request.path_params["model"]
    found = [m for m in owned_models(request, owner) if m["id"] == name]
    if not found:
        raise not_found("model", name, "model")
    return JSONResponse(found[0])


def _resolve_model(request: Request, owner: str, name: Any) -> tuple[Any, Callable[[], Any]]:
    """``(cache key, loader)`` of a model a key may use: a base model, one of its fine-tuned
    models, or a checkpoint of one of its jobs (``<ft model>:ckpt-step-N``)."""
    settings: Settings = request.app.state.settings
    runner: Runner = request.app.state.runner
    if not isinstance(name, str):
        raise RequestError("model: required", "model")
    if name in settings.models:
        base = settings.models[name]

        def load_base() -> Any:
            import jaxtune as jt

            return jt.load(base.local_path())

        return ("base", name), load_base
    ft, _, step = name.partition(":ckpt-step-")
    job = next((j for j in request.app.state.store.jobs(owner) if j["data"]["fine_tuned_model"] == ft), None)
    if job is None or (not step and job["status"] != "succeeded"):
        raise not_found("model", name, "model")
    run_dir = runner.run_dir(job["id"])
    if not step:
        return ("run", job["id"]), refusing_damaged(lambda: inference.load_final(run_dir), job, name, ft, run_dir)
    # int("²") raises; a checkpoint the job's rotation (checkpoint.keep) removed is not listed either
    if not (step.isascii() and step.isdigit()) or int(step) not in RunDir(run_dir).checkpoint_steps():
        raise not_found("model", name, "model")

    def load_step() -> Any:
        try:
            return inference.load_checkpoint(run_dir, int(step))
        except inference.CheckpointGone:
            raise RequestError(f"No such model: '{name}' (the job's checkpoint rotation, checkpoint.keep, has just "
                               "removed that checkpoint; its checkpoints list names those still there)", "model",
                               "model_not_found", status=404) from None

    return ("checkpoint", job["id"], int(step)), refusing_damaged(load_step, job, name, ft, run_dir)


def refusing_damaged(load: Callable[[], Any], job: Mapping[str, Any], name: str, ft: str,
                     run_dir: Path) -> Callable[[], Any]:
    """``load``, its :class:`~jaxtune.serve.inference.CheckpointDamaged` the request's error:
    a 400 (a 500 or 409 the OpenAI SDKs would retry, loading the damaged step again each time;
    only asking for another model helps) naming the step and the newest other checkpoint."""

    def call() -> Any:
        try:
            return load()
        except inference.CheckpointDamaged as err:
            log.warning("model %s: %s", name, err)  # the operator's copy names the file that does not verify
            # the best checkpoint is a copy of its own: the step's checkpoint under checkpoints/ is another
            others = sorted((s for s in RunDir(run_dir).checkpoint_steps() if err.best or s != err.step),
                            reverse=True)
            instead = (f"use another of the job's checkpoints, such as the newest, '{ft}:ckpt-step-{others[0]}'"
                       if others else "the job has no other checkpoint on disk")
            which = "best checkpoint" if err.best else "checkpoint"
            raise RequestError(f"The model '{name}' cannot be loaded: the job's {which} at step {err.step} is "
                               f"damaged (its files no longer match their checksums); {instead} (GET "
                               f"/v1/fine_tuning/jobs/{job['id']}/checkpoints lists them)", "model",
                               "model_damaged") from None

    return call


async def chat_completions(request: Request, owner: str) -> Response:
    body = await json_body(request)
    messages = inference.chat_messages(body.get("messages"))
    opts = inference.options(body)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):  # checked before the generation runs, not after
        raise RequestError("stream_options: expected an object such as {\"include_usage\": true}", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(f"stream: expected true or false, got {body['stream']!r}", "stream")
    key, load = _resolve_model(request, owner, body.get("model"))
    models: inference.Models = request.app.state.models

    def run() -> tuple[Any, dict[str, Any]]:
        with models.lock:
            model = models.get(key, load)
            return model, inference.complete(model, messages, opts)

    model, result = await run_in_threadpool(run)
    completion_id, created = new_id("chatcmpl"), int(time.time())
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    head = {"id": completion_id, "created": created, "model": body["model"], "system_fingerprint": None}
    if not body.get("stream"):
        return JSONResponse({**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None,
             "message": {"role": "assistant", "content": result["text"], "refusal": None}}]})

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", **extra, "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}) + "\n\n"

    # The KV-cache loop runs as one compiled program, so the pieces are sent once it ends.
    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": p}) for p in inference.pieces(model.tokenizer, result["ids"], result["text"])]
    parts.append(chunk({}, result["finish_reason"]))
    if stream_options.get("include_usage"):
        parts.append("data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                            "usage": usage}) + "\n\n")
    parts.append("data: [DONE]\n\n")
    return StreamingResponse(iter(parts), media_type="text/event-stream")


# ----------------------------------------------------------------------------- the app


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings) -> Starlette:
    """The ASGI app; its lifespan opens the store and starts (and on shutdown stops) the job queue."""
    # Absolute once, here: job recipes store paths under it, and a server restarted from another
    # working directory must still find them.
    settings = dataclasses.replace(settings, data_dir=settings.data_dir.resolve())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    inference.share_accelerator()  # before anything here starts JAX's backend

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        app.state.store = Store(settings.data_dir / "serve.sqlite")
        app.state.runner = Runner(app.state.store, settings.data_dir, settings.device_sets)
        app.state.models = inference.Models(settings.loaded_models)
        app.state.settings = settings
        app.state.runner.start()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.runner.close)
            app.state.store.close()

    jobs = "/v1/fine_tuning/jobs"
    routes = [
        Route("/health", health),
        Route("/v1/files", authed(create_file), methods=["POST"]),
        Route("/v1/files", authed(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", authed(retrieve_file), methods=["GET"]),
        Route("/v1/files/{file_id}", authed(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", authed(file_content), methods=["GET"]),
        Route(jobs, authed(create_job), methods=["POST"]),
        Route(jobs, authed(list_jobs), methods=["GET"]),
        Route(jobs + "/{job_id}", authed(retrieve_job), methods=["GET"]),
        Route(jobs + "/{job_id}/cancel", authed(_transition("cancel", ACTIVE)), methods=["POST"]),
        Route(jobs + "/{job_id}/pause", authed(_transition("pause", ("queued", "running"))), methods=["POST"]),
        Route(jobs + "/{job_id}/resume", authed(_transition("resume", ("paused",))), methods=["POST"]),
        Route(jobs + "/{job_id}/events", authed(job_events), methods=["GET"]),
        Route(jobs + "/{job_id}/checkpoints", authed(job_checkpoints), methods=["GET"]),
        Route("/v1/models", authed(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", authed(retrieve_model), methods=["GET"]),
        Route("/v1/chat/completions", authed(chat_completions), methods=["POST"]),
    ]
    async def unknown_route(request: Request, exc: Exception) -> Response:
        return error(404, f"Unknown request URL: {request.method} {request.url.path}", code="unknown_url")

    async def wrong_method(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: unknown_route, 405: wrong_method})

"""The HTTP plumbing of OpenAI's API that every endpoint of :mod:`jaxtune.serve.app` shares: error
objects (``{"error": {"message", "type", "param", "code"}}``), the bearer-key check, request body
limits and JSON bodies, non-finite numbers in responses, and list pagination
(``after``/``limit``/``has_more``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from jaxtune.serve.jobs import RequestError

log = logging.getLogger("jaxtune.serve.app")  # the server's log, as before this module was split out


def error(status: int, message: str, *, param: str | None = None, code: str | None = None,
          type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


def not_found(what: str, name: str, param: str | None = None) -> RequestError:
    return RequestError(f"No such {what}: '{name}'", param, f"{what}_not_found".replace(" ", "_"), status=404)


Handler = Callable[[Request, str], Awaitable[Response]]


def authed(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The key's owner id passed to ``handler``; a missing or unknown key is a 401, a
    :class:`RequestError` its error object."""

    async def endpoint(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return error(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (keys are "
                         "made by: jaxtune serve keys create NAME)", code="missing_api_key")
        owner = request.app.state.store.key_owner(secret.strip())
        if owner is None:
            return error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            return await handler(request, owner)
        except RequestError as err:
            return error(err.status, str(err), param=err.param, code=err.code)
        except Exception as err:  # noqa: BLE001 - a client always gets an error object, never a bare 500
            log.exception("%s %s", request.method, request.url.path)
            return error(500, f"The server had an error processing this request: {type(err).__name__}: {err}",
                         type="server_error")

    return endpoint


def capped(request: Request, limit: int, too_large: Callable[[], RequestError]) -> Request:
    """``request``, its body read refused with ``too_large()`` (a 413) past ``limit`` bytes: a
    Content-Length over it at once, and any body as its bytes arrive (a chunked one declares no
    length), before Starlette buffers or spools it."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise too_large()
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large()
        return message

    return Request(request.scope, receive)


def upload_too_large(limit: int) -> RequestError:
    return RequestError(f"file: larger than this server's upload limit of {limit} bytes (jaxtune serve "
                        "--max-upload-mb)", "file", "file_too_large", status=413)


def json_too_large(limit: int) -> RequestError:
    return RequestError(f"the request body is larger than this server's limit of {limit} bytes for a JSON request",
                        None, "request_too_large", status=413)


async def json_body(request: Request) -> dict[str, Any]:
    limit = request.app.state.settings.max_json_bytes
    try:
        body = await capped(request, limit, lambda: json_too_large(limit)).json()
    except RequestError:
        raise
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def finite(value: Any) -> Any:
    """``value`` with its non-finite floats (a diverged run's NaN loss) as None: JSON has no NaN,
    and a response holding one fails to render."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def page_limit(request: Request, *, default_limit: int = 20, max_limit: int = 100) -> int:
    """The request's ``limit`` query parameter, checked."""
    raw = request.query_params.get("limit")
    try:
        limit = default_limit if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        raise RequestError(f"limit: expected an integer in [1, {max_limit}], got {raw!r}", "limit")
    return limit


def no_such_after(after: str) -> RequestError:
    return RequestError(f"after: no such id in this list: '{after}'", "after")


def list_object(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's list object of the first ``limit`` of ``items`` (the page and at least one more
    when there is more: ``has_more``)."""
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def page(items: list[dict[str, Any]], request: Request, *, default_limit: int = 20,
         max_limit: int = 100) -> dict[str, Any]:
    """OpenAI's list object: the items after ``after`` (an id), at most ``limit``, and ``has_more``."""
    limit = page_limit(request, default_limit=default_limit, max_limit=max_limit)
    after = request.query_params.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise no_such_after(after)
        items = items[ids.index(after) + 1:]
    return list_object(items, limit)

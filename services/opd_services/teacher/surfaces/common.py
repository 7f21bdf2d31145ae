"""What every HTTP surface shares: the one mapping of errors to status codes, JSON responses,
the wire's number types (`Int`, `Number`), the tenant dependency, and the ASGI middleware (body
limit, request metrics).

Errors are mapped to HTTP status codes here and only here (`error_status`); a dialect renders
the same status in its own protocol's body shape. This module knows no routes of its own.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, Strict, ValidationError
from pydantic_core import PydanticCustomError

from opd_services import metrics
from opd_services.errors import (InvalidRequest, NotFound, OPDError, PayloadTooLarge, PermissionDenied,
                                 ResourceExhausted, Unauthenticated, Unavailable)
from opd_services.tenancy.auth import Tenant

log = logging.getLogger(__name__)


# ---- the wire's numbers: every pydantic model of every HTTP surface uses these -----------------
# JSON true / false is a Python int, so pydantic would take it as 1 / 0 (and a lax float also takes
# "0.5"): a boolean or a string where a number is meant is refused, naming the field.

_NOT_BOOL = "number_not_bool"


def _refuse_bool(what: str) -> BeforeValidator:
    def check(value):
        if isinstance(value, bool):
            raise PydanticCustomError(_NOT_BOOL, "must be {what}, got the boolean {value}",
                                      {"what": what, "value": "true" if value else "false"})
        return value
    return BeforeValidator(check)


Int = Annotated[int, Strict(), _refuse_bool("an integer")]        # not a boolean, a float (1.0) or a string
Number = Annotated[float, Strict(), _refuse_bool("a number")]     # an integer or a float; not a boolean or a string


def json_response(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def error_status(err: Exception) -> tuple[int, dict]:
    """The one mapping of errors to HTTP status codes (and headers) on this surface."""
    if isinstance(err, PayloadTooLarge):
        return 413, {}
    if isinstance(err, InvalidRequest):
        return 422, {}
    if isinstance(err, Unauthenticated):
        return 401, {"www-authenticate": "Bearer"}
    if isinstance(err, PermissionDenied):
        return 403, {}
    if isinstance(err, NotFound):
        return 404, {}
    if isinstance(err, ResourceExhausted):
        return 429, {"retry-after": str(max(1, round(err.retry_after)))}
    if isinstance(err, Unavailable):
        return 503, {"retry-after": "1"}
    return 500, {}


def error_response(err: Exception) -> Response:
    status, headers = error_status(err)
    if not isinstance(err, OPDError):
        rid = uuid.uuid4().hex[:16]
        log.error("internal error, request_id=%s", rid, exc_info=err)
        body = {"code": "internal", "message": f"internal error (request_id {rid}); see the teacher's log",
                "request_id": rid}
    else:
        body = err.to_dict()
    return json_response({"error": body}, status, headers)


def loc_field(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _wire_loc(loc: tuple) -> tuple:
    """A pydantic error location without union-member tags ('list[int]', 'function-after[...]', 'str', a model's
    class name): wire field names are lower-case identifiers."""
    return tuple(p for p in loc if isinstance(p, int) or not (p in _TYPE_TAGS or "[" in p or "-" in p or p[:1].isupper()))


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A JSON body validated into a dialect's pydantic model; InvalidRequest naming the first bad field.
    orjson refuses a string escape such as "\\ud800" (a lone surrogate: no Unicode character) with an
    error naming no field; such a body is valid JSON to Python's json module, so it is read with that
    and the first string holding a lone surrogate is named (a 422 like any other bad field)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _surrogate_error(raw) or InvalidRequest("body", f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # within a union (ids: a list or a list of lists) the boolean is the error to name, not the other member's
        first = next((x for x in errors if x["type"] == _NOT_BOOL), errors[0])
        raise InvalidRequest(loc_field(_wire_loc(tuple(first["loc"]))), first["msg"]) from None


def _surrogate_error(raw: bytes) -> InvalidRequest | None:
    """InvalidRequest naming the first string of a JSON body that holds a lone surrogate, if any."""
    if b"\\u" not in raw:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    where = _surrogate_at(data, "")
    if where is None:
        return None
    field, at = where
    return InvalidRequest(field or "body", f"is not valid Unicode: a lone surrogate at character {at}; send UTF-8 text")


def _surrogate_at(value, path: str) -> tuple[str, int] | None:
    """The field path and character index of the first lone surrogate in a parsed JSON value."""
    if isinstance(value, str):
        at = next((i for i, c in enumerate(value) if "\ud800" <= c <= "\udfff"), None)
        return None if at is None else (path, at)
    if isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    else:
        return None
    for p, v in items:
        found = _surrogate_at(v, p)
        if found is not None:
            return found
    return None


def tenant_dependency(service):
    """A FastAPI dependency: the caller's experiment from `Authorization: Bearer`, labelled on the request."""

    async def tenant(request: Request) -> Tenant:
        t = await service.authenticate(request.headers.get("authorization"))
        request.state.experiment = t.name
        return t
    return tenant


class Observe:
    """ASGI middleware: request count and latency per route and status code. Outermost, it also
    keeps an internal error that was already answered (500 with a request id, logged with its
    traceback by `error_response`) from reaching uvicorn, which would close the keep-alive
    connection under the client's next request."""

    def __init__(self, app, routes: set[str]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["experiment"] = "default"
        path = scope["path"]
        route = path if path in self.routes else ("/v1/admin/experiments" if path.startswith("/v1/admin/") else
                                            "/v1/experiments" if path.startswith("/v1/experiments/") else "other")
        status, answered = [500], [False]   # an app that raises answers 500 (error_response)
        t0 = time.perf_counter()

        async def send_observed(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                answered[0] = True
            await send(msg)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            if not answered[0]:       # not answered in full: let uvicorn answer 500 or close
                raise
        finally:
            if scope["state"].get("client_gone") and status[0] == 500:
                status[0] = 499      # nginx's "client closed request": nobody was answered
            metrics.REQUEST_LATENCY.labels(route).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(route, str(status[0]), scope["state"]["experiment"]).inc()


def _too_slow(timeout_s: float) -> Response:
    body = {"error": {"code": "request_timeout", "field": "body",
                      "message": f"the request body did not arrive within {timeout_s:g} s (OPD_HTTP_BODY_TIMEOUT_S); "
                                 "send it faster or in smaller requests"}}
    return json_response(body, 408, {"connection": "close"})


class BodyLimit:
    """ASGI middleware: refuse a body over the limit before it is read in full (413), and one
    that does not arrive within `timeout_s` (408, connection closed): a client sending a byte a
    second holds its connection for `timeout_s` at most."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = PayloadTooLarge("body", f"request body exceeds {self.max_bytes} bytes; send fewer sequences per request")
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(too_big)(scope, receive, send)
        seen, responded = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive():
            # Past the limit or the deadline: answer 413 / 408 now and tell the app the client went away.
            nonlocal seen, responded
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if not responded:
                    responded = True
                    await _too_slow(self.timeout_s)(scope, receive, send)
                return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    if not responded:
                        responded = True
                        await error_response(too_big)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not responded:
                await send(msg)

        await self.app(scope, limited_receive, guarded_send)


class CancelOnDisconnect:
    """ASGI middleware: when the client disconnects before it was answered (its timeout, a killed
    trainer), cancel the request's handler, so its queued sequences leave the batcher
    (opd_requests_cancelled_total) instead of running for nobody.

    Once the body is read, a watcher waits on `receive` for http.disconnect; the app never reads
    past its body on these routes, and a later `receive` from it gets the watcher's answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read, gone = asyncio.Event(), asyncio.Event()
        answered = False

        async def app_receive():
            if body_read.is_set():
                await gone.wait()
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.disconnect":
                gone.set()
            elif not msg.get("more_body", False):
                body_read.set()
            return msg

        async def app_send(msg):
            nonlocal answered
            answered = True
            await send(msg)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))

        async def watch():
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not answered:
                scope.setdefault("state", {})["client_gone"] = True
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not scope.get("state", {}).get("client_gone"):
                raise            # the server itself is stopping: not a disconnect
        finally:
            watcher.cancel()

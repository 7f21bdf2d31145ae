"""Native HTTP surface (FastAPI): parse, call ScoringService, map the result. Nothing else.

Routes: POST /v1/score, POST /v1/generate, GET /v1/model, GET /healthz, GET /readyz, GET /metrics,
OpenAPI at /docs; the vLLM dialect's routes are mounted on the same app by vllm_compat.py.
Errors are mapped to status codes here and only here (`error_response`).
"""
from __future__ import annotations

import logging
import time
import uuid

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opd_services import metrics
from opd_services.errors import (InvalidRequest, OPDError, PayloadTooLarge, PermissionDenied,
                                 ResourceExhausted, Unauthenticated, Unavailable)
from opd_services.teacher.protocol import (GenerateRequestJSON, GenerateResponseJSON, ModelJSON, ScoreRequestJSON,
                                           ScoreResponseJSON, generate_json, result_json)
from opd_services.teacher.service import ScoringService
from opd_services.tenancy.auth import Tenant

log = logging.getLogger(__name__)
ROUTES = {"/v1/score", "/v1/generate", "/v1/model", "/healthz", "/readyz", "/metrics", "/v1/admin/experiments",
          "/health", "/v1/models", "/v1/completions"}   # the last three: the vLLM dialect (vllm_compat.py)


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


def _loc_field(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(service: ScoringService, max_body_bytes: int, registry=None) -> FastAPI:
    app = FastAPI(title="OPD Teacher", version="1",
                  description="Teacher-as-a-service for on-policy distillation: per-token teacher logprobs.")

    async def tenant(request: Request) -> Tenant:
        t = await service.authenticate(request.headers.get("authorization"))
        request.state.experiment = t.name
        return t

    @app.exception_handler(OPDError)
    async def _opd_error(request: Request, err: OPDError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = _loc_field(tuple(first.get("loc", ())))
        reason = first.get("msg", "invalid")
        if first.get("type") == "json_invalid":
            field, reason = "body", f"malformed JSON: {first.get('ctx', {}).get('error', reason)}"
        return error_response(InvalidRequest(field, reason))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        return error_response(err)

    @app.post("/v1/score", response_model=None, responses={200: {"model": ScoreResponseJSON}})
    async def score(body: ScoreRequestJSON, who: Tenant = Depends(tenant)):
        result = await service.score(body.to_request(), who)
        return json_response(result_json(result))

    @app.post("/v1/generate", response_model=None, responses={200: {"model": GenerateResponseJSON}})
    async def generate(body: GenerateRequestJSON, who: Tenant = Depends(tenant)):
        result = await service.generate(body.to_request(), who)
        return json_response(generate_json(result))

    @app.get("/v1/model", response_model=ModelJSON)
    async def model(who: Tenant = Depends(tenant)):
        return json_response(service.model_info().to_dict())

    @app.get("/healthz")
    async def healthz():
        return json_response({"status": "alive"})

    @app.get("/readyz")
    async def readyz():
        if not service.ready:
            return json_response({"status": "draining" if service.draining else "loading"}, 503)
        return json_response({"status": "ready"})

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if registry is not None:
        from opd_services.teacher.admin_http import admin_router
        app.include_router(admin_router(registry, tenant))
    from opd_services.teacher import vllm_compat
    vllm_compat.mount(app, service)
    return Observe(BodyLimit(app, max_body_bytes))


class Observe:
    """ASGI middleware: request count and latency per route and status code."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["experiment"] = "default"
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/admin/experiments" if path.startswith("/v1/admin/") else
                                            "/v1/experiments" if path.startswith("/v1/experiments/") else "other")
        status = [500]
        t0 = time.perf_counter()

        async def send_observed(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            metrics.REQUEST_LATENCY.labels(route).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(route, str(status[0]), scope["state"]["experiment"]).inc()


class BodyLimit:
    """ASGI middleware: refuse a body over the limit before it is read in full (413)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = PayloadTooLarge("body", f"request body exceeds {self.max_bytes} bytes; send fewer sequences per request")
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(too_big)(scope, receive, send)
        seen, responded = 0, False

        async def limited_receive():
            # Past the limit: answer 413 now and tell the app the client went away.
            nonlocal seen, responded
            msg = await receive()
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

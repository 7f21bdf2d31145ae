"""Native HTTP surface (FastAPI): parse, call ScoringService, map the result. Nothing else.

Routes: POST /v1/score, POST /v1/generate, GET /v1/model, GET /healthz, GET /readyz, GET /metrics,
OpenAPI at /docs (assets served locally). Errors map to status codes in `common.py`; other surfaces (admin, dialects)
are mounted on this app by server.py.
"""
from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opd_services.errors import InvalidRequest, OPDError
from opd_services.teacher.service import ScoringService
from opd_services.teacher.surfaces.common import error_response, json_response, loc_field, tenant_dependency
from opd_services.teacher.surfaces.protocol import (GenerateRequestJSON, GenerateResponseJSON, ModelJSON,
                                                    ScoreRequestJSON, ScoreResponseJSON, generate_json, result_json)
from opd_services.tenancy.auth import Tenant

ROUTES = {"/v1/score", "/v1/generate", "/v1/model", "/healthz", "/readyz", "/metrics"}


def create_app(service: ScoringService) -> FastAPI:
    """The native routes and the app-wide exception handlers; server.py mounts the other surfaces."""
    # /docs and /redoc serve Swagger UI and ReDoc from the fastapi-offline package, never a CDN:
    # the page works on air-gapped clusters (tests/services/teacher/test_docs_offline.py)
    app = FastAPIOffline(title="OPD Teacher", version="1",
                  description="Teacher-as-a-service for on-policy distillation: per-token teacher logprobs.")

    tenant = tenant_dependency(service)

    @app.exception_handler(OPDError)
    async def _opd_error(request: Request, err: OPDError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = loc_field(tuple(first.get("loc", ())))
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

    @app.get("/metrics", response_class=PlainTextResponse)   # documented as text/plain, as it is served
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app

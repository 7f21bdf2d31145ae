"""Native gRPC surface: opd.teacher.v1.Teacher, grpc.health.v1 and server reflection.

A handler parses, calls ScoringService, maps the result. Requests are deserialised here
(not by grpc) so that malformed protobuf answers INVALID_ARGUMENT, not INTERNAL. Errors
are mapped to status codes here and only here (`_status`).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_services import metrics
from opd_services.errors import (InvalidRequest, NotFound, OPDError, PermissionDenied, ResourceExhausted,
                                 Unauthenticated, Unavailable)
from opd_services.teacher.surfaces.protocol import (generate_from_proto, generate_proto, model_proto, request_from_proto,
                                           result_proto)
from opd_services.teacher.service import ScoringService

log = logging.getLogger(__name__)
SERVICE = "opd.teacher.v1.Teacher"


def _status(err: Exception) -> tuple[grpc.StatusCode, str, tuple]:
    """The one mapping of errors to gRPC status codes (and trailing metadata) on this surface."""
    if isinstance(err, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, err.message, (("opd-field", err.field), ("opd-reason", err.reason))
    if isinstance(err, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, err.message, ()
    if isinstance(err, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, err.message, ()
    if isinstance(err, NotFound):
        return grpc.StatusCode.NOT_FOUND, err.message, ()
    if isinstance(err, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, err.message, (("retry-after", str(max(1, round(err.retry_after)))),)
    if isinstance(err, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, err.message, ()
    if isinstance(err, OPDError):
        return grpc.StatusCode.INTERNAL, err.message, ()
    rid = uuid.uuid4().hex[:16]
    log.error("internal error, request_id=%s", rid, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error (request_id {rid}); see the teacher's log", (("opd-request-id", rid),)


def _parse(message_cls, raw: bytes):
    """Deserialise here, not in grpc, so malformed protobuf is INVALID_ARGUMENT naming the body."""
    try:
        return message_cls.FromString(raw)
    except DecodeError as e:
        raise InvalidRequest("body", f"malformed protobuf {message_cls.__name__}: {e}") from None


class TeacherGrpc:
    def __init__(self, service: ScoringService):
        self.service = service
        self.health = health.aio.HealthServicer()

    async def _unary(self, route: str, context: grpc.aio.ServicerContext, call):
        t0, code, who = time.perf_counter(), grpc.StatusCode.OK, "default"
        try:
            md = dict(context.invocation_metadata() or ())
            tenant = await self.service.authenticate(md.get("authorization"))
            who = tenant.name
            return await call(tenant)
        except asyncio.CancelledError:   # deadline passed or the client cancelled: the batcher dropped its work
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # mapped to a status here, the one place for this surface
            code, details, md = _status(e)
            context.set_trailing_metadata(md)
            await context.abort(code, details)
        finally:
            metrics.REQUEST_LATENCY.labels(route).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(route, code.name, who).inc()

    async def score(self, raw: bytes, context) -> pb.ScoreResponse:
        async def call(tenant):
            msg = _parse(pb.ScoreRequest, raw)
            return result_proto(await self.service.score(request_from_proto(msg), tenant))
        return await self._unary(f"/{SERVICE}/Score", context, call)

    async def generate(self, raw: bytes, context) -> pb.GenerateResponse:
        async def call(tenant):
            msg = _parse(pb.GenerateRequest, raw)
            return generate_proto(await self.service.generate(generate_from_proto(msg), tenant))
        return await self._unary(f"/{SERVICE}/Generate", context, call)

    async def get_model(self, raw: bytes, context) -> pb.ModelInfo:
        async def call(tenant):
            return model_proto(self.service.model_info())
        return await self._unary(f"/{SERVICE}/GetModel", context, call)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Score": grpc.unary_unary_rpc_method_handler(self.score, response_serializer=pb.ScoreResponse.SerializeToString),
            "GetModel": grpc.unary_unary_rpc_method_handler(self.get_model, response_serializer=pb.ModelInfo.SerializeToString),
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.generate, response_serializer=pb.GenerateResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["Teacher"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def create_server(service: ScoringService, max_message_bytes: int) -> tuple[grpc.aio.Server, TeacherGrpc]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", 256 << 20),
                                      ("grpc.so_reuseport", 0)])
    surface = TeacherGrpc(service)
    surface.register(server)
    return server, surface

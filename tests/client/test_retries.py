"""The client's retry policy against small real loopback servers (HTTP and gRPC) that answer
a chosen status and count the calls they get: only "the server did not answer" is retried
(HTTP 502/503/504, gRPC UNAVAILABLE and DEADLINE_EXCEEDED), never bad input, auth, quota or a
server bug, and `retry_after` is what the server sent (header or trailer), None when it sent none.

The servers are stand-ins because no real teacher can be made to answer each status on
demand; the real teacher's own 429 / RESOURCE_EXHAUSTED is checked in
tests/services/tenancy/test_share_and_quota.py."""
from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import orjson
import pytest

from opd_client import (AsyncTeacherClient, InvalidRequest, ResourceExhausted, RetryPolicy, TeacherClient,
                        Unavailable)
from opd_client.errors import DeadlineExceeded, InternalError, NotFound, PayloadTooLarge, PermissionDenied, Unauthenticated

POLICY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.01)


class StatusServer:
    """An HTTP server on loopback whose every answer is `status` (+ headers), counting requests."""

    def __init__(self):
        self.status, self.headers, self.hits = 200, {}, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.hits += 1
                body = orjson.dumps({"error": {"code": "x", "message": f"status {outer.status}",
                                               "field": "sequences", "reason": "chosen by the test"}})
                self.send_response(outer.status)
                for k, v in outer.headers.items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, status: int, headers: dict | None = None) -> None:
        self.status, self.headers, self.hits = status, headers or {}, 0


class StatusGrpc:
    """A gRPC server on loopback whose Teacher.Score aborts with `code` (+ trailers), counting calls."""

    def __init__(self):
        self.code, self.trailers, self.hits = grpc.StatusCode.OK, (), 0

        def score(raw, context):
            self.hits += 1
            context.set_trailing_metadata(self.trailers)
            context.abort(self.code, f"status {self.code.name}")

        handler = grpc.method_handlers_generic_handler(
            "opd.teacher.v1.Teacher", {"Score": grpc.unary_unary_rpc_method_handler(score)})
        self.server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(handler,))
        self.url = f"grpc://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def answer(self, code: grpc.StatusCode, trailers: tuple = ()) -> None:
        self.code, self.trailers, self.hits = code, trailers, 0


@pytest.fixture(scope="module")
def http_stub():
    s = StatusServer()
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="module")
def grpc_stub():
    s = StatusGrpc()
    yield s
    s.server.stop(0)


def score(url: str, is_async: bool):
    """One score call through the sync or the async client; returns the exception it raised."""
    if is_async:
        async def go():
            async with AsyncTeacherClient(url, retry=POLICY, timeout=5) as c:
                await c.score([[1, 2, 3]])
        call = lambda: asyncio.run(go())                                  # noqa: E731
    else:
        def call():
            with TeacherClient(url, retry=POLICY, timeout=5) as c:
                c.score([[1, 2, 3]])
    with pytest.raises(Exception) as e:
        call()
    return e.value


HTTP_CASES = [(502, Unavailable, 3), (503, Unavailable, 3), (504, Unavailable, 3),
              (400, InvalidRequest, 1), (401, Unauthenticated, 1), (403, PermissionDenied, 1),
              (404, NotFound, 1), (413, PayloadTooLarge, 1), (422, InvalidRequest, 1),
              (429, ResourceExhausted, 1), (500, InternalError, 1)]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("status,cls,tries", HTTP_CASES, ids=[str(c[0]) for c in HTTP_CASES])
def test_http_retries_only_gateway_and_unavailable_statuses(http_stub, status, cls, tries, is_async):
    http_stub.answer(status)
    err = score(http_stub.url, is_async)
    assert type(err) is cls, (status, err)
    assert http_stub.hits == tries, (status, http_stub.hits)
    if tries > 1:
        assert "3 attempt" in str(err)


GRPC_CASES = [(grpc.StatusCode.UNAVAILABLE, Unavailable, 3),
              (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, 3),   # a timeout: retried
              (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, 1),
              (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted, 1),
              (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated, 1),
              (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, 1),
              (grpc.StatusCode.NOT_FOUND, NotFound, 1),
              (grpc.StatusCode.INTERNAL, InternalError, 1)]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("code,cls,tries", GRPC_CASES, ids=[c[0].name for c in GRPC_CASES])
def test_grpc_retries_only_unavailable(grpc_stub, code, cls, tries, is_async):
    grpc_stub.answer(code)
    err = score(grpc_stub.url, is_async)
    assert type(err) is cls, (code, err)
    assert grpc_stub.hits == tries, (code, grpc_stub.hits)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_retry_after_is_what_the_server_sent(http_stub, grpc_stub, is_async):
    http_stub.answer(429, {"retry-after": "7"})
    assert score(http_stub.url, is_async).retry_after == 7.0
    http_stub.answer(429)
    assert score(http_stub.url, is_async).retry_after is None
    grpc_stub.answer(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "7"),))
    assert score(grpc_stub.url, is_async).retry_after == 7.0
    grpc_stub.answer(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert score(grpc_stub.url, is_async).retry_after is None

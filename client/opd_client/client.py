"""TeacherClient: call the teacher over HTTP or gRPC, sync or async, get numpy arrays back.

    from opd_client import TeacherClient
    with TeacherClient("grpc://127.0.0.1:50051") as teacher:     # or "http://127.0.0.1:8000"
        out = teacher.score([[1, 5, 9, 4]], top_k=5)
        out.results[0].logprobs_T                                # np.float32, len 3

The transport follows the URL's scheme: http:// or https:// -> HTTP JSON, grpc:// or grpcs://
-> gRPC; https:// and grpcs:// speak TLS (`tls=TLS(ca=..., cert=..., key=...)`, see tls.py).
The client's timeout is also each gRPC call's deadline: a call that gives up is cancelled on the
teacher too (its not-yet-scored sequences leave the batcher).
This module does no scoring and no validation beyond shapes: the server validates.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlparse

import grpc
import httpx
import orjson

from opd_client import wire
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc
from opd_client.errors import (BY_CODE, InternalError, InvalidRequest, OPDError, PayloadTooLarge,
                               PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)
from opd_client.tls import TLS
from opd_client.types import GenerateResponse, ModelInfo, ScoreResponse

# ---- Retry policy (the only one in the client) -------------------------------------------
# Scoring is a pure function of the request, so a retry can never double-count anything.
# We still retry only failures that say "the server did not get to answer": connection
# errors, HTTP 502/503/504 and gRPC UNAVAILABLE. Never bad input, auth, or 429 (quota is
# the caller's signal to slow down; ResourceExhausted.retry_after says by how much).
# Attempts back off exponentially with full jitter.


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4            # total tries, the first included
    backoff_s: float = 0.2       # first wait; doubles each retry
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * (2 ** attempt)))


NO_RETRY = RetryPolicy(attempts=1)
_RETRY_HTTP_STATUS = {502, 503, 504}


def _unreachable(url: str, attempts: int, err: Exception) -> Unavailable:
    return Unavailable(
        f"cannot reach the OPD teacher at {url} after {attempts} attempt(s): {err}. "
        "Check that `opd serve` is running and ready (GET /readyz), that OPD_TEACHER_URL points "
        "at it (http://HOST:8000 or grpc://HOST:50051), and that the port is open from here. " + (
            "A teacher with mutual TLS (OPD_TLS_CLIENT_CA) refuses clients without a certificate it trusts: "
            "pass TLS(cert=..., key=...) / OPD_TLS_CLIENT_CERT and OPD_TLS_CLIENT_KEY."
            if url.startswith(("https://", "grpcs://")) else
            "A teacher that serves TLS (OPD_TLS_CERT) needs https:// or grpcs://."))


def _tls_refused(url: str, err: Exception) -> Exception | None:
    """A TLS verification failure never heals by retrying: say so at once, with the fix."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return Unavailable(f"TLS: the teacher at {url} presented a certificate that the CA bundle does not "
                           f"trust ({text[:300]}). Pass TLS(ca=...) / OPD_TLS_CA with the CA that signed it.")
    return None


def _parse_url(url: str) -> tuple[str, str]:
    """Return (transport, address): http base URL or gRPC host:port."""
    p = urlparse(url if "://" in url else f"grpc://{url}")
    if p.scheme in ("http", "https"):
        return "http", url.rstrip("/")
    if p.scheme in ("grpc", "grpcs"):
        if not p.hostname or not p.port:
            raise InvalidRequest("url", f"{url!r} needs a host and a port, e.g. grpc://127.0.0.1:50051")
        host = f"[{p.hostname}]" if ":" in p.hostname else p.hostname
        return "grpc", f"{host}:{p.port}"
    raise InvalidRequest("url", f"{url!r}: scheme must be http, https, grpc or grpcs")


# ---- error mapping: wire -> OPDError (the inverse of the server's one place) -------------

def _http_error(resp: httpx.Response) -> OPDError:
    try:
        err = resp.json().get("error", {})
    except ValueError:
        err = {}
    msg = err.get("message") or resp.text[:500] or f"HTTP {resp.status_code}"
    rid = err.get("request_id")
    if resp.status_code in (413, 422, 400):
        cls = PayloadTooLarge if resp.status_code == 413 else InvalidRequest
        return cls(err.get("field", "request"), err.get("reason", msg), request_id=rid)
    if resp.status_code == 429:
        return ResourceExhausted(msg, retry_after=float(resp.headers.get("retry-after", 1)),
                                 request_id=rid)
    cls = {401: Unauthenticated, 403: PermissionDenied, 503: Unavailable}.get(resp.status_code)
    cls = cls or BY_CODE.get(err.get("code", ""), InternalError)
    if issubclass(cls, InvalidRequest):
        cls = InternalError
    return cls(msg, request_id=rid)


def _grpc_error(e: grpc.RpcError) -> OPDError:
    code, details = e.code(), e.details() or ""
    md = {k: v for k, v in (e.trailing_metadata() or ())}
    rid = md.get("opd-request-id")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(md.get("opd-field", "request"), md.get("opd-reason", details), request_id=rid)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details, retry_after=float(md.get("retry-after", 1)), request_id=rid)
    cls = {grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
           grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
           grpc.StatusCode.UNAVAILABLE: Unavailable}.get(code, InternalError)
    return cls(f"{code.name}: {details}", request_id=rid)


def _retryable(err: Exception) -> bool:
    return isinstance(err, (httpx.TransportError, Unavailable))


def _score_args(sequences, top_k, temperature, entropy):
    return wire.as_sequences(sequences), int(top_k), float(temperature), bool(entropy)


GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20)]


class _Base:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), tls: TLS | None = None):
        self.url = url
        self.transport, self.address = _parse_url(url)
        self.secure = url.startswith(("https://", "grpcs://"))
        self.tls = tls or TLS()
        self.timeout = timeout
        self.retry = retry
        self.api_key = api_key
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()


class TeacherClient(_Base):
    """Synchronous client. Thread-safe; one per process is enough."""

    def __init__(self, url: str, **kw):
        super().__init__(url, **kw)
        if self.transport == "http":
            self._http = httpx.Client(base_url=self.address, timeout=self.timeout, headers=self._headers,
                                      verify=self.tls.ssl_context() if self.secure else True)
        elif self.secure:
            self._channel = grpc.secure_channel(self.address, self.tls.grpc_credentials(), options=GRPC_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
        if self.transport == "grpc":
            self._stub = pb_grpc.TeacherStub(self._channel)

    def _call(self, fn):
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except Exception as e:  # classified below; non-retryable ones re-raise at once
                err = self._classify(e)
                if not _retryable(err):
                    raise err from e
                if (refused := _tls_refused(self.url, err)) is not None:
                    raise refused from e
                last = err
            if attempt + 1 < self.retry.attempts:
                time.sleep(self.retry.delay(attempt))
        raise _unreachable(self.url, self.retry.attempts, last) from last

    def _classify(self, e: Exception) -> Exception:
        if isinstance(e, grpc.RpcError):
            return _grpc_error(e)
        if isinstance(e, httpx.HTTPStatusError):
            return _http_error(e.response)
        return e

    def _http_call(self, method: str, path: str, body: bytes | None = None):
        headers = {"content-type": "application/json"} if body is not None else None
        r = self._http.request(method, path, content=body, headers=headers)
        if r.status_code >= 400:
            raise _http_error(r) if r.status_code not in _RETRY_HTTP_STATUS else Unavailable(r.text[:300])
        return orjson.loads(r.content)

    def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
              entropy: bool = False) -> ScoreResponse:
        seqs, k, t, ent = _score_args(sequences, top_k, temperature, entropy)
        if self.transport == "http":
            body = orjson.dumps(wire.request_json(seqs, k, t, ent))
            return wire.response_from_json(self._call(lambda: self._http_call("POST", "/v1/score", body)))
        req = wire.request_proto(seqs, k, t, ent)
        return wire.response_from_proto(self._call(
            lambda: self._stub.Score(req, timeout=self.timeout, metadata=self._metadata)))

    def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                 stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        """Sample one completion per prompt from the teacher. `prompts`: token-id lists or
        (id, token_ids) pairs. Only retried on connection failures; pass a seed to make a
        retry return the same samples."""
        args = (wire.as_prompts(prompts), max_tokens, temperature, list(stop_ids), seed)
        if self.transport == "http":
            body = orjson.dumps(wire.generate_json(*args))
            return wire.generate_from_json(self._call(lambda: self._http_call("POST", "/v1/generate", body)))
        req = wire.generate_proto(*args)
        return wire.generate_from_proto(self._call(
            lambda: self._stub.Generate(req, timeout=self.timeout, metadata=self._metadata)))

    def model(self) -> ModelInfo:
        if self.transport == "http":
            return wire.model_from_json(self._call(lambda: self._http_call("GET", "/v1/model")))
        return wire.model_from_proto(self._call(
            lambda: self._stub.GetModel(pb.GetModelRequest(), timeout=self.timeout, metadata=self._metadata)))

    def close(self) -> None:
        if self.transport == "http":
            self._http.close()
        else:
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncTeacherClient(_Base):
    """asyncio client with the same methods as TeacherClient, awaited."""

    def __init__(self, url: str, **kw):
        super().__init__(url, **kw)
        if self.transport == "http":
            self._http = httpx.AsyncClient(base_url=self.address, timeout=self.timeout, headers=self._headers,
                                           limits=httpx.Limits(max_connections=256),
                                           verify=self.tls.ssl_context() if self.secure else True)
        elif self.secure:
            self._channel = grpc.aio.secure_channel(self.address, self.tls.grpc_credentials(), options=GRPC_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        if self.transport == "grpc":
            self._stub = pb_grpc.TeacherStub(self._channel)

    async def _call(self, fn):
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                return await fn()
            except Exception as e:  # classified below; non-retryable ones re-raise at once
                err = _grpc_error(e) if isinstance(e, grpc.RpcError) else e
                if not _retryable(err):
                    raise err from e
                if (refused := _tls_refused(self.url, err)) is not None:
                    raise refused from e
                last = err
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(attempt))
        raise _unreachable(self.url, self.retry.attempts, last) from last

    async def _http_call(self, method: str, path: str, body: bytes | None = None):
        headers = {"content-type": "application/json"} if body is not None else None
        r = await self._http.request(method, path, content=body, headers=headers)
        if r.status_code >= 400:
            raise _http_error(r) if r.status_code not in _RETRY_HTTP_STATUS else Unavailable(r.text[:300])
        return orjson.loads(r.content)

    async def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
                    entropy: bool = False) -> ScoreResponse:
        seqs, k, t, ent = _score_args(sequences, top_k, temperature, entropy)
        if self.transport == "http":
            body = orjson.dumps(wire.request_json(seqs, k, t, ent))
            return wire.response_from_json(await self._call(lambda: self._http_call("POST", "/v1/score", body)))
        req = wire.request_proto(seqs, k, t, ent)
        return wire.response_from_proto(await self._call(
            lambda: self._stub.Score(req, timeout=self.timeout, metadata=self._metadata)))

    async def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                       stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        args = (wire.as_prompts(prompts), max_tokens, temperature, list(stop_ids), seed)
        if self.transport == "http":
            body = orjson.dumps(wire.generate_json(*args))
            return wire.generate_from_json(await self._call(lambda: self._http_call("POST", "/v1/generate", body)))
        req = wire.generate_proto(*args)
        return wire.generate_from_proto(await self._call(
            lambda: self._stub.Generate(req, timeout=self.timeout, metadata=self._metadata)))

    async def model(self) -> ModelInfo:
        if self.transport == "http":
            return wire.model_from_json(await self._call(lambda: self._http_call("GET", "/v1/model")))
        return wire.model_from_proto(await self._call(
            lambda: self._stub.GetModel(pb.GetModelRequest(), timeout=self.timeout, metadata=self._metadata)))

    async def close(self) -> None:
        if self.transport == "http":
            await self._http.aclose()
        else:
            await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

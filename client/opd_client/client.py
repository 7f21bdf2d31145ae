"""TeacherClient: call the teacher over HTTP or gRPC, sync or async, get numpy arrays back.

    from opd_client import TeacherClient
    with TeacherClient("grpc://127.0.0.1:50051") as teacher:     # or "http://127.0.0.1:8000"
        out = teacher.score([[1, 5, 9, 4]], top_k=5)
        out.results[0].logprobs_T                                # np.float32, len 3

The transport follows the URL's scheme: http:// or https:// -> HTTP JSON, grpc:// or grpcs://
-> gRPC; https:// and grpcs:// speak TLS (`tls=TLS(ca=..., cert=..., key=...)`, see tls.py).
The client's timeout is also each gRPC call's deadline: a call that gives up is cancelled on the
teacher too (its not-yet-scored sequences leave the batcher).
A URL may name several replicas of one teacher (`grpc://h1:50051,h2:50051`) or a DNS name
that stands for them (`grpc+dns://`, `http+dns://`; see targets.py): requests are spread
over them and fail over between them (the policy block below, balance.py).
This module does no scoring and no validation beyond shapes: the server validates.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Iterable

import grpc
import httpx
import orjson

from opd_client import wire
from opd_client.balance import Pool
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc
from opd_client.errors import (BY_CODE, InternalError, InvalidRequest, NotFound, OPDError, PayloadTooLarge,
                               PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)
from opd_client.targets import DNS_REFRESH_S, parse_target, resolve
from opd_client.tls import TLS
from opd_client.types import GenerateResponse, ModelInfo, ScoreResponse

# ---- Retry and failover policy (the only one in the client) -----------------------------
# Scoring is a pure function of the request, so a retry can never double-count anything.
# We still retry only failures that say "the server did not get to answer": connection
# errors, HTTP 502/503/504 and gRPC UNAVAILABLE (a replica that is down, loading or
# draining). Never bad input, auth, 404 or 429 (quota is the caller's signal to slow down;
# ResourceExhausted.retry_after says by how much).
# With several replicas (targets.py), each request goes to the next one in rotation; a
# replica that fails as above is taken out for a while (balance.Pool) and the retry goes at
# once to a replica this request has not tried yet. Only when every replica has been tried
# does the next attempt wait: exponential backoff with full jitter. `attempts` counts every
# try, failovers included.


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4            # total tries, the first included
    backoff_s: float = 0.2       # first wait; doubles each retry
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * (2 ** attempt)))


NO_RETRY = RetryPolicy(attempts=1)
_RETRY_HTTP_STATUS = {502, 503, 504}


def _retryable(err: Exception) -> bool:
    return isinstance(err, (httpx.TransportError, Unavailable))


def _next_try(pool: Pool, tried: set, attempt: int, policy: RetryPolicy) -> float:
    """Seconds to wait before the next try: 0 while an untried replica is left, else the backoff
    (and every replica is eligible again)."""
    if pool.has_untried(tried):
        return 0.0
    tried.clear()
    return policy.delay(attempt)


def _unreachable(url: str, attempts: int, err: Exception) -> Unavailable:
    return Unavailable(
        f"cannot reach the OPD teacher at {url} after {attempts} attempt(s): {err}. "
        "Check that `opd serve` is running and ready (GET /readyz), that OPD_TEACHER_URL points "
        "at it (http://HOST:8000 or grpc://HOST:50051, several replicas comma-separated), and "
        "that the port is open from here. " + (
            "A teacher with mutual TLS (OPD_TLS_CLIENT_CA) refuses clients without a certificate it trusts: "
            "pass TLS(cert=..., key=...) / OPD_TLS_CLIENT_CERT and OPD_TLS_CLIENT_KEY."
            if url.startswith(("https", "grpcs")) else
            "A teacher that serves TLS (OPD_TLS_CERT) needs https:// or grpcs://."))


def _tls_refused(url: str, err: Exception) -> Exception | None:
    """A TLS verification failure never heals by retrying: say so at once, with the fix."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return Unavailable(f"TLS: the teacher at {url} presented a certificate that the CA bundle does not "
                           f"trust ({text[:300]}). Pass TLS(ca=...) / OPD_TLS_CA with the CA that signed it.")
    return None


# ---- error mapping: wire -> OPDError (the inverse of the server's one place) -------------

def _retry_after(value: str | None) -> float | None:
    """The server's Retry-After (header or trailer) in seconds; None when it sent none (or a date)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


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
        return ResourceExhausted(msg, retry_after=_retry_after(resp.headers.get("retry-after")), request_id=rid)
    cls = {401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 503: Unavailable}.get(resp.status_code)
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
        return ResourceExhausted(details, retry_after=_retry_after(md.get("retry-after")), request_id=rid)
    cls = {grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
           grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
           grpc.StatusCode.NOT_FOUND: NotFound,
           grpc.StatusCode.UNAVAILABLE: Unavailable}.get(code, InternalError)
    return cls(f"{code.name}: {details}", request_id=rid)


def _score_args(sequences, top_k, temperature, entropy, chat_template_kwargs, add_special_tokens):
    opts = wire.ScoreOptions(int(top_k), float(temperature), bool(entropy), chat_template_kwargs,
                             bool(add_special_tokens))
    return wire.as_sequences(sequences), opts


GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
                # a restarted replica is found again within ~2 s, not gRPC's default of up to 120 s
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


def _grpc_options(address: str) -> list:
    if address.startswith("dns:///"):      # grpc+dns: gRPC balances over every resolved address
        return GRPC_OPTIONS + [("grpc.lb_policy_name", "round_robin"), ("grpc.dns_min_time_between_resolutions_ms", 5000)]
    return GRPC_OPTIONS


class _Base:
    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), teacher: str | None = None, tls: TLS | None = None):
        self.url = url
        self.target = parse_target(url)
        self.transport = self.target.transport
        self.secure = self.target.secure
        self.tls = tls or TLS()
        self.timeout = timeout
        self.retry = retry
        self.api_key = api_key
        self.teacher = teacher or ""          # named on every score request; "" = whichever this is
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        http_dns = self.target.dns and self.transport == "http"
        self._refresh_at = time.monotonic() + DNS_REFRESH_S if http_dns else float("inf")
        addrs = resolve(self.target.addresses[0]) if http_dns else list(self.target.addresses)
        self.pool = Pool(addrs, self._connect)

    @property
    def address(self) -> str:
        return ",".join(r.address for r in self.pool.replicas)

    def _connect(self, address: str):
        raise NotImplementedError

    def _resolved(self) -> list:
        """http+dns: re-resolve when due; returns the connections of replicas no longer named."""
        if time.monotonic() < self._refresh_at:
            return []
        self._refresh_at = time.monotonic() + DNS_REFRESH_S
        return [r.conn for r in self.pool.replace(resolve(self.target.addresses[0]))]

    def _verify(self):
        """httpx's `verify`: the TLS context for https://, the default otherwise."""
        return self.tls.ssl_context() if self.secure else True

    def _classify(self, e: Exception) -> Exception:
        if isinstance(e, grpc.RpcError):
            return _grpc_error(e)
        if isinstance(e, httpx.HTTPStatusError):
            return _http_error(e.response)
        return e


def _raise_http(r: httpx.Response):
    if r.status_code >= 400:
        raise _http_error(r) if r.status_code not in _RETRY_HTTP_STATUS else Unavailable(r.text[:300])
    return orjson.loads(r.content)


class TeacherClient(_Base):
    """Synchronous client. Thread-safe; one per process is enough."""

    def _connect(self, address: str):
        if self.transport == "http":
            return httpx.Client(base_url=address, timeout=self.timeout, headers=self._headers, verify=self._verify())
        channel = (grpc.secure_channel(address, self.tls.grpc_credentials(), options=_grpc_options(address))
                   if self.secure else grpc.insecure_channel(address, options=_grpc_options(address)))
        return _GrpcConn(channel, pb_grpc.TeacherStub(channel))

    def _call(self, fn):
        """fn(conn) on a replica, with the retry and failover policy above."""
        for conn in self._resolved():
            conn.close()
        last: Exception | None = None
        tried: set = set()
        for attempt in range(self.retry.attempts):
            r = self.pool.pick(tried)
            try:
                out = fn(r.conn)
                self.pool.succeeded(r)
                return out
            except Exception as e:  # classified below; non-retryable ones re-raise at once
                err = self._classify(e)
                if not _retryable(err):
                    raise err from e
                if (refused := _tls_refused(self.url, err)) is not None:
                    raise refused from e
                last = err
                self.pool.failed(r)
                tried.add(r)
            if attempt + 1 < self.retry.attempts:
                time.sleep(_next_try(self.pool, tried, attempt, self.retry))
        raise _unreachable(self.url, self.retry.attempts, last) from last

    def _http(self, method: str, path: str, body: bytes | None = None):
        headers = {"content-type": "application/json"} if body is not None else None
        return self._call(lambda c: _raise_http(c.request(method, path, content=body, headers=headers)))

    def _rpc(self, name: str, req):
        return self._call(lambda c: getattr(c.stub, name)(req, timeout=self.timeout, metadata=self._metadata))

    def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
              entropy: bool = False, chat_template_kwargs: dict | None = None,
              add_special_tokens: bool = True) -> ScoreResponse:
        seqs, opts = _score_args(sequences, top_k, temperature, entropy, chat_template_kwargs, add_special_tokens)
        if self.transport == "http":
            body = orjson.dumps(wire.request_json(seqs, opts, self.teacher))
            return wire.response_from_json(self._http("POST", "/v1/score", body))
        return wire.response_from_proto(self._rpc("Score", wire.request_proto(seqs, opts, self.teacher)))

    def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                 stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        """Sample one completion per prompt from the teacher. `prompts`: token-id lists or
        (id, token_ids) pairs. Only retried on connection failures; pass a seed to make a
        retry return the same samples."""
        args = (wire.as_prompts(prompts), max_tokens, temperature, list(stop_ids), seed)
        if self.transport == "http":
            return wire.generate_from_json(self._http("POST", "/v1/generate", orjson.dumps(wire.generate_json(*args))))
        return wire.generate_from_proto(self._rpc("Generate", wire.generate_proto(*args)))

    def model(self) -> ModelInfo:
        if self.transport == "http":
            return wire.model_from_json(self._http("GET", "/v1/model"))
        return wire.model_from_proto(self._rpc("GetModel", pb.GetModelRequest()))

    def close(self) -> None:
        for r in self.pool.replicas:
            r.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class _GrpcConn:
    channel: object
    stub: object

    def close(self):
        return self.channel.close()


class AsyncTeacherClient(_Base):
    """asyncio client with the same methods as TeacherClient, awaited."""

    def _connect(self, address: str):
        if self.transport == "http":
            return httpx.AsyncClient(base_url=address, timeout=self.timeout, headers=self._headers,
                                     limits=httpx.Limits(max_connections=256), verify=self._verify())
        channel = (grpc.aio.secure_channel(address, self.tls.grpc_credentials(), options=_grpc_options(address))
                   if self.secure else grpc.aio.insecure_channel(address, options=_grpc_options(address)))
        return _AsyncConn(channel, pb_grpc.TeacherStub(channel))

    async def _call(self, fn):
        for conn in self._resolved():
            await conn.aclose()
        last: Exception | None = None
        tried: set = set()
        for attempt in range(self.retry.attempts):
            r = self.pool.pick(tried)
            try:
                out = await fn(r.conn)
                self.pool.succeeded(r)
                return out
            except Exception as e:  # classified below; non-retryable ones re-raise at once
                err = self._classify(e)
                if not _retryable(err):
                    raise err from e
                if (refused := _tls_refused(self.url, err)) is not None:
                    raise refused from e
                last = err
                self.pool.failed(r)
                tried.add(r)
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(_next_try(self.pool, tried, attempt, self.retry))
        raise _unreachable(self.url, self.retry.attempts, last) from last

    async def _http(self, method: str, path: str, body: bytes | None = None):
        headers = {"content-type": "application/json"} if body is not None else None

        async def go(c):
            return _raise_http(await c.request(method, path, content=body, headers=headers))
        return await self._call(go)

    async def _rpc(self, name: str, req):
        return await self._call(lambda c: getattr(c.stub, name)(req, timeout=self.timeout, metadata=self._metadata))

    async def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
                    entropy: bool = False, chat_template_kwargs: dict | None = None,
                    add_special_tokens: bool = True) -> ScoreResponse:
        seqs, opts = _score_args(sequences, top_k, temperature, entropy, chat_template_kwargs, add_special_tokens)
        if self.transport == "http":
            body = orjson.dumps(wire.request_json(seqs, opts, self.teacher))
            return wire.response_from_json(await self._http("POST", "/v1/score", body))
        return wire.response_from_proto(await self._rpc("Score", wire.request_proto(seqs, opts, self.teacher)))

    async def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                       stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        args = (wire.as_prompts(prompts), max_tokens, temperature, list(stop_ids), seed)
        if self.transport == "http":
            return wire.generate_from_json(await self._http("POST", "/v1/generate",
                                                            orjson.dumps(wire.generate_json(*args))))
        return wire.generate_from_proto(await self._rpc("Generate", wire.generate_proto(*args)))

    async def model(self) -> ModelInfo:
        if self.transport == "http":
            return wire.model_from_json(await self._http("GET", "/v1/model"))
        return wire.model_from_proto(await self._rpc("GetModel", pb.GetModelRequest()))

    async def close(self) -> None:
        for r in self.pool.replicas:
            await r.conn.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


@dataclass(frozen=True)
class _AsyncConn:
    channel: object
    stub: object

    async def aclose(self):
        await self.channel.close()

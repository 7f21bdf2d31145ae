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
over them and fail over between them (the policy block below, balance.py). Wire failures
become OPDErrors in wire_errors.py.
TeacherClient and AsyncTeacherClient share everything but the I/O: each call is built once
(`_Op`) and driven through one retry state machine (`_Attempts`); the two classes only send
and sleep. This module does no scoring and no validation beyond shapes: the server validates.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
import httpx
import orjson

from opd_client import wire, wire_errors
from opd_client.balance import Pool, Replica
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc
from opd_client.errors import DeadlineExceeded, Unavailable
from opd_client.targets import DNS_REFRESH_S, parse_target, resolve
from opd_client.tls import TLS
from opd_client.types import GenerateResponse, ModelInfo, ScoreResponse

# ---- Retry and failover policy (the only one in the client) -----------------------------
# Scoring is a pure function of the request, so a retry can never double-count anything.
# We still retry only failures that say "the server did not get to answer": connection
# errors, HTTP 502/503/504 and gRPC UNAVAILABLE (a replica that is down, loading or
# draining). Never bad input, auth, 404 or 429 (quota is the caller's signal to slow down;
# ResourceExhausted.retry_after says by how much).
# A timeout is one of those: no answer within the client's `timeout` (an HTTP read, write or
# pool timeout; a gRPC DEADLINE_EXCEEDED) is retried like a connection error, and the teacher
# has already dropped the abandoned try (its deadline / closed connection cancels it). When the
# last try timed out the caller gets DeadlineExceeded (an Unavailable and a TimeoutError) naming
# the deadline; so a call can take up to `attempts` x `timeout` plus the backoff.
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


def _retryable(err: Exception) -> bool:
    return isinstance(err, (httpx.TransportError, Unavailable))


def _next_try(pool: Pool, tried: set, attempt: int, policy: RetryPolicy) -> float:
    """Seconds to wait before the next try: 0 while an untried replica is left, else the backoff
    (and every replica is eligible again)."""
    if pool.has_untried(tried):
        return 0.0
    tried.clear()
    return policy.delay(attempt)


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


@dataclass(frozen=True)
class _Op:
    """One call, built for the client's transport, and how its answer becomes the public type.
    HTTP: `method` `path`, `body` the JSON bytes (None: no body). gRPC: `rpc` the method, `body` the message."""
    parse: Callable[[Any], Any]
    body: Any = None
    rpc: str = ""
    method: str = ""
    path: str = ""

    @property
    def headers(self) -> dict | None:
        return {"content-type": "application/json"} if self.body is not None else None


class _Attempts:
    """One request's way through the retry and failover policy above. The sync and the async
    `_call` drive it alike (pick; try; on failure sleep what `failed` returns, which raises once
    the policy gives up) and differ only in how they call the transport and sleep."""

    def __init__(self, client: _Base):
        self.client, self.done, self.tried = client, 0, set()

    def pick(self) -> Replica:
        return self.client.pool.pick(self.tried)

    def succeeded(self, r: Replica, out):
        self.client.pool.succeeded(r)
        return out

    def failed(self, r: Replica, e: Exception) -> float:
        """Seconds to wait before the next try; raises what the caller gets when there is none."""
        c = self.client
        err = wire_errors.classify(e, c.timeout)
        if not _retryable(err):
            raise err from e
        if (refused := wire_errors.tls_refused(c.url, err)) is not None:
            raise refused from e
        c.pool.failed(r)
        self.tried.add(r)
        self.done += 1
        if self.done >= c.retry.attempts:
            if isinstance(err, DeadlineExceeded):
                raise wire_errors.timed_out(c.url, self.done, c.timeout, err) from err
            raise wire_errors.unreachable(c.url, self.done, err) from err
        return _next_try(c.pool, self.tried, self.done - 1, c.retry)


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
        self.teacher = teacher or ""          # named on every score and generate request; "" = whichever this is
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

    def _grpc_call(self, conn, op: _Op):
        return getattr(conn.stub, op.rpc)(op.body, timeout=self.timeout, metadata=self._metadata)

    # ---- the calls, built once for both clients ---------------------------------------------

    def _score_op(self, sequences, top_k, temperature, entropy, chat_template_kwargs, add_special_tokens) -> _Op:
        seqs, opts = _score_args(sequences, top_k, temperature, entropy, chat_template_kwargs, add_special_tokens)
        if self.transport == "http":
            return _Op(wire.response_from_json, orjson.dumps(wire.request_json(seqs, opts, self.teacher)),
                       method="POST", path="/v1/score")
        return _Op(wire.response_from_proto, wire.request_proto(seqs, opts, self.teacher), rpc="Score")

    def _generate_op(self, prompts, max_tokens, temperature, stop_ids, seed) -> _Op:
        args = (wire.as_prompts(prompts), max_tokens, temperature, list(stop_ids), seed)
        if self.transport == "http":
            return _Op(wire.generate_from_json, orjson.dumps(wire.generate_json(*args, teacher=self.teacher)),
                       method="POST", path="/v1/generate")
        return _Op(wire.generate_from_proto, wire.generate_proto(*args, teacher=self.teacher), rpc="Generate")

    def _model_op(self) -> _Op:
        if self.transport == "http":
            return _Op(wire.model_from_json, method="GET", path="/v1/model")
        return _Op(wire.model_from_proto, pb.GetModelRequest(), rpc="GetModel")


class TeacherClient(_Base):
    """Synchronous client. Thread-safe; one per process is enough.

    Errors: an `OPDError` subclass per failure (errors.py). No answer within `timeout` (HTTP
    timeout, gRPC deadline) is retried under the policy above; when the last try timed out the
    caller gets `DeadlineExceeded` (also an `Unavailable` and a `TimeoutError`), naming the deadline."""

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
        run = _Attempts(self)
        while True:
            r = run.pick()
            try:
                return run.succeeded(r, fn(r.conn))
            except Exception as e:  # classified by run.failed; what is not retried re-raises there
                time.sleep(run.failed(r, e))

    def _send(self, op: _Op):
        def once(c):
            if op.rpc:
                return self._grpc_call(c, op)
            return wire_errors.raise_http(c.request(op.method, op.path, content=op.body, headers=op.headers))
        return op.parse(self._call(once))

    def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
              entropy: bool = False, chat_template_kwargs: dict | None = None,
              add_special_tokens: bool = True) -> ScoreResponse:
        return self._send(self._score_op(sequences, top_k, temperature, entropy, chat_template_kwargs,
                                         add_special_tokens))

    def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                 stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        """Sample one completion per prompt from the teacher. `prompts`: token-id lists or
        (id, token_ids) pairs. Retried under the policy above (connection failures, timeouts);
        pass a seed to make a retry return the same samples."""
        return self._send(self._generate_op(prompts, max_tokens, temperature, stop_ids, seed))

    def model(self) -> ModelInfo:
        return self._send(self._model_op())

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
    """asyncio client with the same methods, errors and retries as TeacherClient, awaited."""

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
        run = _Attempts(self)
        while True:
            r = run.pick()
            try:
                return run.succeeded(r, await fn(r.conn))
            except Exception as e:  # classified by run.failed; what is not retried re-raises there
                await asyncio.sleep(run.failed(r, e))

    async def _send(self, op: _Op):
        async def once(c):
            if op.rpc:
                return await self._grpc_call(c, op)
            return wire_errors.raise_http(await c.request(op.method, op.path, content=op.body, headers=op.headers))
        return op.parse(await self._call(once))

    async def score(self, sequences: Iterable, *, top_k: int = 0, temperature: float = 1.0,
                    entropy: bool = False, chat_template_kwargs: dict | None = None,
                    add_special_tokens: bool = True) -> ScoreResponse:
        return await self._send(self._score_op(sequences, top_k, temperature, entropy, chat_template_kwargs,
                                               add_special_tokens))

    async def generate(self, prompts: Iterable, *, max_tokens: int = 16, temperature: float = 1.0,
                       stop_ids: Iterable[int] = (), seed: int | None = None) -> GenerateResponse:
        return await self._send(self._generate_op(prompts, max_tokens, temperature, stop_ids, seed))

    async def model(self) -> ModelInfo:
        return await self._send(self._model_op())

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

"""`opd serve`: the HTTP and gRPC surfaces over one ScoringService and one engine, one process.

Shutdown, spelled out (SIGTERM or SIGINT):
  1) stop being ready: /readyz answers 503 "draining" and gRPC health NOT_SERVING; new
     requests get 503 / UNAVAILABLE (still answered, so clients retry another replica);
  2) wait for in-flight requests to finish, up to drain_timeout_s;
  3) stop accepting connections and close both servers;
  4) stop the batcher and close the engine; exit.
A second signal exits at once. Keep drain_timeout_s below the k8s termination grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import threading
from typing import Callable

import grpc
import uvicorn

from opd_services.config import Settings, check_tls
from opd_services.errors import Unavailable
from opd_services.teacher.engines import engine_factory, tokenizer_factory
from opd_services.teacher.engines.base import Engine
from opd_services.teacher.service import ScoringService
from opd_services.teacher.text.tokenizer import Tokenizer
from opd_services.teacher.surfaces import http
from opd_services.teacher.surfaces.admin_http import admin_router
from opd_services.teacher.surfaces.common import BodyLimit, CancelOnDisconnect, Observe, tenant_dependency
from opd_services.teacher.surfaces.dialects import sglang, vllm
from opd_services.teacher.surfaces.grpc import create_server
from opd_services.tenancy.auth import Authenticator, UsageRecorder
from opd_services.tenancy.registry import Registry

log = logging.getLogger(__name__)
# Every HTTP route, as the request metrics label it (admin routes are labelled by prefix).
HTTP_ROUTES = http.ROUTES | vllm.ROUTES | sglang.ROUTES | {"/v1/admin/experiments"}


def http_app(service: ScoringService, max_body_bytes: int, registry: Registry | None, body_timeout_s: float = 30.0):
    """The one HTTP app: native routes, then admin (with a registry) and the dialects, on one port."""
    app = http.create_app(service)
    if registry is not None:
        app.include_router(admin_router(registry, tenant_dependency(service)))
    vllm.mount(app, service)
    sglang.mount(app, service)
    # The ASGI middlewares, outermost first, applied in this one place. The order matters:
    #  1) Observe, outermost: it counts every answer, the 413 / 408 that BodyLimit gives before
    #     any route runs included, turns a 500 into 499 when CancelOnDisconnect flagged the client
    #     as gone, and keeps an internal error that was already answered from reaching uvicorn.
    #  2) CancelOnDisconnect, outside BodyLimit: once the body is read its watcher waits on the
    #     raw `receive` for a disconnect, which BodyLimit's body deadline must not cut short.
    #  3) BodyLimit, innermost: it bounds the body the routes read (size and arrival time).
    middleware = [
        functools.partial(Observe, routes=HTTP_ROUTES),
        CancelOnDisconnect,
        functools.partial(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s),
    ]
    for wrap in reversed(middleware):
        app = wrap(app)
    return app


def _uvicorn_tls(s: Settings) -> dict:
    """uvicorn's TLS options from OPD_TLS_* (checked at start-up by config.check_tls)."""
    if not s.tls:
        return {}
    opts = {"ssl_certfile": str(s.tls_cert), "ssl_keyfile": str(s.tls_key)}
    if s.tls_client_ca is not None:
        opts |= {"ssl_ca_certs": str(s.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return opts


def _grpc_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """The same certificate for gRPC; with OPD_TLS_CLIENT_CA, a client certificate is required."""
    if not s.tls:
        return None
    ca = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: TeacherServer owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class TeacherServer:
    def __init__(self, settings: Settings, engine: Callable[[], Engine] | None = None,
                 tokenizer: Callable[[], Tokenizer | None] | None = None):
        check_tls(settings)
        self.settings = settings
        self._engine = engine or engine_factory(settings)
        self._tokenizer = tokenizer or tokenizer_factory(settings)
        self.service: ScoringService | None = None
        self._redis = self._usage = self._registry = None
        self.http_port = 0
        self.grpc_port = 0
        self._uvicorn: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._stopping: asyncio.Task | None = None

    async def _tenancy(self) -> Authenticator:
        """With OPD_REDIS_URL: the experiments registry, per-request key lookups, usage."""
        s = self.settings
        if s.redis_url is None:
            return Authenticator("off" if s.auth == "off" else s.auth, s.admin_key, None)
        from redis.exceptions import RedisError

        from opd_client.queue.connection import aconnect, connect
        try:
            self._redis = await aconnect(s.redis_url)
            self._registry = Registry(connect(s.redis_url))
            n = await asyncio.to_thread(self._registry.sync_acl)
        except (RedisError, OSError) as e:
            raise Unavailable(f"cannot reach the experiments registry at OPD_REDIS_URL={s.redis_url!r}: {e}. "
                              "Start Redis, fix the URL, or unset OPD_REDIS_URL to serve without tenancy") from e
        log.info("experiments registry: %d experiment(s), ACL users in sync", n)
        self._usage = UsageRecorder(self._redis)
        self._usage.start()
        self._acl_task = asyncio.create_task(self._keep_acl_in_sync())
        return Authenticator(s.auth, s.admin_key, self._redis)

    async def _keep_acl_in_sync(self) -> None:
        """Experiments' ACL users live in Redis memory: recreate them after a Redis restart."""
        while True:
            await asyncio.sleep(self.settings.acl_sync_s)
            try:
                await asyncio.to_thread(self._registry.sync_acl)
            except Exception as e:  # Redis away for a while: the next round retries
                log.warning("could not sync experiments' ACL users: %s", e)

    async def start(self, wait_ready: bool = True) -> None:
        s = self.settings
        auth = await self._tenancy()
        self.service = ScoringService(s, self._engine, auth, self._usage, self._tokenizer)
        # gRPC first, then HTTP: both answer health while the engine loads
        self._grpc, self._grpc_surface = create_server(self.service, s.max_body_bytes)
        host = f"[{s.host}]" if ":" in s.host else s.host
        creds = _grpc_credentials(s)
        self.grpc_port = (self._grpc.add_secure_port(f"{host}:{s.grpc_port}", creds) if creds else
                          self._grpc.add_insecure_port(f"{host}:{s.grpc_port}"))
        await self._grpc_surface.set_serving(False)
        await self._grpc.start()
        sock = _bind(s.host, s.http_port)
        self.http_port = sock.getsockname()[1]
        app = http_app(self.service, s.max_body_bytes, self._registry, s.http_body_timeout_s)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=int(s.drain_timeout_s) or None,
                                **_uvicorn_tls(s))
        self._uvicorn = _Uvicorn(config)
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        http_scheme, grpc_scheme = ("https", "grpcs") if s.tls else ("http", "grpc")
        log.info("teacher listening: %s://%s:%d %s://%s:%d%s", http_scheme, s.host, self.http_port, grpc_scheme,
                 s.host, self.grpc_port, " (mutual TLS)" if s.tls_client_ca else "")
        loading = asyncio.create_task(self._load())
        if wait_ready:
            await loading

    async def _load(self) -> None:
        await self.service.start()
        await self._grpc_surface.set_serving(True)

    async def stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        await self._stopping

    async def _stop(self) -> None:
        timeout = self.settings.drain_timeout_s
        log.info("draining (up to %.0fs)", timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # 1) not ready any more: new requests are answered 503 / UNAVAILABLE while we drain
        self.service.draining = True
        await self._grpc_surface.set_serving(False)
        # 2) in-flight requests finish (the listeners stay open meanwhile)
        await self.service.drained(timeout)
        # 3) stop accepting, close both servers (what is still running gets the time left)
        left = max(0.0, deadline - loop.time())
        self._uvicorn.config.timeout_graceful_shutdown = max(1, round(left))
        self._uvicorn.should_exit = True
        await asyncio.gather(self._grpc.stop(grace=left), self._http_task, return_exceptions=True)
        # 4) engine down, usage flushed
        await self.service.shutdown(left)
        if self._usage is not None:
            self._acl_task.cancel()
            await self._usage.stop()
            await self._redis.aclose()
        log.info("teacher stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then drain; a second signal exits at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(sig: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting without draining", signal.Signals(sig).name)
                os._exit(1)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await self.start(wait_ready=False)
        await stop.wait()
        await self.stop()


class BackgroundTeacher:
    """A TeacherServer on its own event loop thread: for tests, benches and the demo.

        with BackgroundTeacher(settings) as t:
            TeacherClient(f"http://127.0.0.1:{t.http_port}")
    """

    def __init__(self, settings: Settings, engine: Callable[[], Engine] | None = None):
        self.server = TeacherServer(settings, engine)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opd-teacher-loop", daemon=True)

    def start(self) -> "BackgroundTeacher":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def http_url(self) -> str:
        return f"{'https' if self.server.settings.tls else 'http'}://{self._host()}:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.server.settings.tls else 'grpc'}://{self._host()}:{self.server.grpc_port}"

    def _host(self) -> str:
        h = self.server.settings.host
        return f"[{h}]" if ":" in h else h

    def __enter__(self) -> "BackgroundTeacher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

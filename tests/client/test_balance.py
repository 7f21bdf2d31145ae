"""Client-side balancing and failover over real teacher replicas on loopback (uniform engine):
requests spread per request, a dead or draining replica is taken out and the retry goes to
another one, DNS names (grpc+dns via gRPC's round_robin, http+dns resolved here) work."""
from __future__ import annotations

import asyncio
import socket

import pytest

from opd_client import AsyncTeacherClient, NotFound, RetryPolicy, TeacherClient
from opd_client.balance import Pool
from opd_services.config import Settings
from opd_services.teacher.server import BackgroundTeacher

SEQ = [[1, 5, 9, 4, 7]]


def _settings(name: str = "default", **kw) -> Settings:
    return Settings(engine="uniform", host="127.0.0.1", http_port=0, grpc_port=0, drain_timeout_s=1,
                    teacher_name=name, **kw)


@pytest.fixture(scope="module")
def replicas():
    with BackgroundTeacher(_settings()) as a, BackgroundTeacher(_settings()) as b:
        yield a, b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _url(scheme: str, reps) -> str:
    ports = [t.server.http_port if scheme == "http" else t.server.grpc_port for t in reps]
    return f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def _shares(client) -> list[float]:
    n = sum(r.requests for r in client.pool.replicas)
    return [r.requests / n for r in client.pool.replicas]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_requests_spread_per_request_over_replicas(replicas, scheme):
    with TeacherClient(_url(scheme, replicas)) as c:
        for _ in range(100):
            assert c.score(SEQ).results[0].logprobs_T.shape == (4,)
        assert all(0.4 <= s <= 0.6 for s in _shares(c)), _shares(c)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_async_client_spreads_too(replicas, scheme):
    async def go():
        async with AsyncTeacherClient(_url(scheme, replicas)) as c:
            outs = await asyncio.gather(*(c.score(SEQ) for _ in range(60)))
            assert len(outs) == 60
            return _shares(c)
    shares = asyncio.run(go())
    assert all(0.4 <= s <= 0.6 for s in shares), shares


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_a_dead_replica_is_taken_out_and_the_retry_goes_elsewhere(replicas, scheme):
    live = replicas[0].server.http_port if scheme == "http" else replicas[0].server.grpc_port
    url = f"{scheme}://127.0.0.1:{free_port()},127.0.0.1:{live}"
    with TeacherClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.01)) as c:
        for _ in range(50):
            c.score(SEQ)        # never fails: a failed try moves on to the live replica at once
        dead, ok = c.pool.replicas
        assert dead.failures >= 1 and dead.requests <= 6, (dead.requests, ok.requests)


def test_a_draining_replica_fails_over_and_comes_back_when_ready():
    with BackgroundTeacher(_settings()) as a, BackgroundTeacher(_settings()) as b:
        with TeacherClient(_url("grpc", [a, b]), retry=RetryPolicy(attempts=2, backoff_s=0.01)) as c:
            b.server.service.draining = True                       # /readyz 503, UNAVAILABLE on Score
            for _ in range(20):
                c.score(SEQ)
            assert c.pool.replicas[1].failures >= 1
            b.server.service.draining = False
            c.pool.replicas[1].out_until = 0.0                     # its time out is over
            before = c.pool.replicas[1].requests
            for _ in range(20):
                c.score(SEQ)
            assert c.pool.replicas[1].requests - before >= 8 and c.pool.replicas[1].failures == 0


def test_every_replica_down_says_so_after_the_attempts():
    url = f"grpc://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with TeacherClient(url, retry=RetryPolicy(attempts=3, backoff_s=0.01)) as c:
        with pytest.raises(ConnectionError, match="3 attempt"):
            c.score(SEQ)


@pytest.mark.parametrize("scheme", ["grpc+dns", "http+dns"])
def test_a_dns_name_stands_for_the_replicas(replicas, scheme):
    """`localhost` may resolve to ::1 as well, where nothing listens: that address fails over."""
    port = replicas[0].server.http_port if scheme == "http+dns" else replicas[0].server.grpc_port
    with TeacherClient(f"{scheme}://localhost:{port}", retry=RetryPolicy(attempts=3, backoff_s=0.01)) as c:
        for _ in range(10):
            assert c.score(SEQ).results[0].logprobs_T.shape == (4,)
        if scheme == "http+dns":
            assert any("127.0.0.1" in r.address for r in c.pool.replicas)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_a_request_naming_another_teacher_is_not_found(replicas, scheme):
    with TeacherClient(_url(scheme, replicas[:1]), teacher="math") as c:
        with pytest.raises(NotFound, match="'math'.*'default'"):
            c.score(SEQ)
    with TeacherClient(_url(scheme, replicas[:1]), teacher="default") as c:
        assert c.score(SEQ).model.teacher == "default"
        assert c.model().teacher == "default"


def test_pool_rotation_and_time_out():
    p = Pool(["a", "b", "c"], connect=lambda a: a, eject_s=60)
    assert [p.pick().address for _ in range(3)] == ["a", "b", "c"]
    p.failed(p.replicas[1])
    assert {p.pick().address for _ in range(6)} == {"a", "c"}
    assert p.pick(tried={p.replicas[0], p.replicas[2]}).address == "b"   # everything else tried
    for r in p.replicas:
        p.failed(r)
    assert p.pick().address == "a"          # all out: the one due back soonest, never none

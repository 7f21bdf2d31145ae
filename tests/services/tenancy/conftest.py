"""Fixtures of the tenancy tests: a real embedded Valkey holding the registry, and a real
teacher on loopback whose auth is on by default once experiments exist."""
from __future__ import annotations

import pytest

from opd_client.queue.connection import connect
from opd_services.redis_embed import EmbeddedRedis
from opd_services.tenancy.registry import Registry
from tenancy_helpers import PacedEngine, tenancy_settings


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture(scope="module")
def registry(redis_server) -> Registry:
    return Registry(connect(redis_server.url))


@pytest.fixture(scope="module")
def tenant_teacher(redis_server, cache_dir):
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(tenancy_settings(cache_dir, redis_server.url), engine=lambda: PacedEngine(0.0)) as t:
        yield t

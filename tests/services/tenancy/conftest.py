"""Fixtures of the tenancy tests: a real embedded Valkey holding the registry, and a real
teacher on loopback whose auth is on by default once experiments exist."""
from __future__ import annotations

import time

import pytest

from opd_client.queue.connection import connect
from opd_services.config import Settings
from opd_services.redis_embed import EmbeddedRedis
from opd_services.teacher.uniform_engine import UniformEngine
from opd_services.tenancy.registry import Registry

ADMIN_KEY = "admin-test-key-0123456789"


class PacedEngine(UniformEngine):
    """The uniform engine at a fixed cost per token, so the teacher can be saturated on purpose."""

    def __init__(self, seconds_per_token: float = 0.0):
        super().__init__(vocab_size=1000, max_model_len=2048)
        self.seconds_per_token = seconds_per_token

    def score(self, items):
        time.sleep(self.seconds_per_token * sum(it.n_tokens for it in items))
        return super().score(items)


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as r:
        yield r


@pytest.fixture(scope="module")
def registry(redis_server) -> Registry:
    return Registry(connect(redis_server.url))


def tenancy_settings(cache_dir, redis_url: str, **kw) -> Settings:
    return Settings(engine="uniform", host="127.0.0.1", http_port=0, grpc_port=0, cache_dir=cache_dir,
                    redis_url=redis_url, admin_key=ADMIN_KEY, auth="auto", drain_timeout_s=2, **kw)


@pytest.fixture(scope="module")
def tenant_teacher(redis_server, cache_dir):
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(tenancy_settings(cache_dir, redis_server.url), engine=lambda: PacedEngine(0.0)) as t:
        yield t

"""A teacher with everything mounted (native, admin, dialects) for the fuzz tests: the tiny
torch model, a real embedded Valkey with the experiments registry, auth on."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from opd_client.queue.connection import connect
from opd_services.config import Settings
from opd_services.redis_embed import EmbeddedRedis
from opd_services.teacher.server import BackgroundTeacher
from opd_services.tenancy.registry import Registry

ADMIN_KEY = "fuzz-admin-key-0123456789"
FIXED = [[1, 5, 9, 4, 7, 2], [3, 3, 8]]      # scored before and after fuzzing: answers must not move


@dataclass
class FuzzTarget:
    teacher: BackgroundTeacher
    redis_url: str
    experiment: str
    api_key: str


@contextlib.contextmanager
def fuzz_target(settings: Settings):
    with EmbeddedRedis() as redis:
        creds = Registry(connect(redis.url)).create("fuzzed", max_inflight_tokens=1 << 20)
        s = settings.model_copy(update={"redis_url": redis.url, "admin_key": ADMIN_KEY, "auth": "on"})
        with BackgroundTeacher(s) as t:
            yield FuzzTarget(t, redis.url, creds.experiment, creds.api_key)

"""Helpers of the tenancy tests (imported by conftest and the tests; a unique module name, so
no other folder's conftest can shadow it)."""
from __future__ import annotations

import time

from opd_services.config import Settings
from opd_services.teacher.engines.uniform_engine import UniformEngine

ADMIN_KEY = "admin-test-key-0123456789"


class PacedEngine(UniformEngine):
    """The uniform engine at a fixed cost per token, so the teacher can be saturated on purpose."""

    def __init__(self, seconds_per_token: float = 0.0):
        super().__init__(vocab_size=1000, max_model_len=2048)
        self.seconds_per_token = seconds_per_token

    def score(self, items):
        time.sleep(self.seconds_per_token * sum(it.n_tokens for it in items))
        return super().score(items)


def tenancy_settings(cache_dir, redis_url: str, **kw) -> Settings:
    return Settings(engine="uniform", host="127.0.0.1", http_port=0, grpc_port=0, cache_dir=cache_dir,
                    redis_url=redis_url, admin_key=ADMIN_KEY, auth="auto", drain_timeout_s=2, **kw)

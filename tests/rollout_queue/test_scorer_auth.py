"""A scorer reaches a teacher that requires keys (auth on, experiments registered) with
OPD_TEACHER_API_KEY; every rollout is scored and nothing is dead-lettered."""
from __future__ import annotations

import math

import numpy as np

from opd_client.queue import RolloutProducer, dead_key
from opd_client.queue.connection import connect
from opd_services.redis_embed import EmbeddedRedis
from opd_services.teacher.server import BackgroundTeacher
from opd_services.tenancy.registry import Registry
from queue_helpers import drain_scored, make_rollouts, running_scorer, uniform_settings

ADMIN = "scorer-auth-admin-key-0123"


def test_scorer_sends_its_key_to_a_teacher_that_requires_keys():
    with EmbeddedRedis() as redis:
        Registry(connect(redis.url)).create("keyed")
        s = uniform_settings(redis_url=redis.url, admin_key=ADMIN, auth="on")
        with BackgroundTeacher(s) as t, RolloutProducer(redis.url, "keyed") as q, \
                running_scorer(redis.url, t.grpc_url, teacher_api_key=ADMIN):
            q.push(make_rollouts(20))
            got = drain_scored(redis.url, "keyed", 20, timeout_s=20)
        assert len(got) == 20
        assert all(np.allclose(g.teacher_logprobs, -math.log(32_000)) for g in got)
        assert connect(redis.url).xlen(dead_key("keyed")) == 0

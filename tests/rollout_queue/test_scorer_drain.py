"""`opd scorer` processes sent SIGTERM while they hold a batch: the batch is published (the
teacher answers within the drain timeout) or released to other scorers at once (it does not),
and either way every rollout is scored exactly once and nothing stays pending.

The slow teacher is the uniform engine made slow (1.5 s per engine call), so the scorer is
surely waiting on it when the signal lands."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import pytest

from opd_client.queue import RolloutProducer, keys, rollouts_key
from opd_client.queue.connection import connect
from opd_services.redis_embed import free_port
from opd_services.teacher.engines.uniform_engine import UniformEngine
from queue_helpers import dead_entries, drain_scored, make_rollouts, running_scorer, uniform_settings

DELAY_S = 1.5


class SlowUniform(UniformEngine):
    def score(self, items):
        time.sleep(DELAY_S)
        return super().score(items)


@pytest.fixture(scope="module")
def slow_teacher():
    from opd_services.teacher.server import BackgroundTeacher
    with BackgroundTeacher(uniform_settings(), engine=lambda: SlowUniform(max_top_k=20)) as t:
        yield t


def scorer_process(redis_url: str, teacher_url: str, drain_s: float) -> subprocess.Popen:
    env = {**os.environ, "OPD_REDIS_URL": redis_url, "OPD_TEACHER_URL": teacher_url,
           "OPD_DRAIN_TIMEOUT_S": str(drain_s), "OPD_QUEUE_RECLAIM_IDLE_S": "60", "OPD_SCORER_BATCH_SIZE": "50",
           "OPD_SCORER_CONCURRENCY": "1", "OPD_SCORER_METRICS_PORT": "0", "OPD_SCORER_DISCOVERY_S": "0.2",
           "OPD_SCORER_BLOCK_MS": "50", "OPD_LOG_LEVEL": "info"}
    return subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def sigterm_while_holding(proc: subprocess.Popen, redis, exp: str, n: int, wait_s: float) -> str:
    """Wait until the scorer holds all n rollouts pending, SIGTERM it, return its log (exit 0)."""
    deadline = time.monotonic() + 30
    while redis.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] < n:
        assert proc.poll() is None and time.monotonic() < deadline, "the scorer never took the batch"
        time.sleep(0.02)
    time.sleep(0.2)                                 # inside the teacher call (or its retry loop) now
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"scorer still running {wait_s} s after SIGTERM")
    log = proc.stderr.read()
    assert rc == 0, log[-2000:]
    return log


def assert_each_scored_once(redis_url: str, exp: str, got: list, rollouts: list) -> None:
    counts = collections.Counter(s.rollout.id for s in got)
    assert sorted(counts) == sorted(r.id for r in rollouts), f"lost {len({r.id for r in rollouts} - set(counts))}"
    assert [i for i, c in counts.items() if c > 1] == []
    r = connect(redis_url)
    assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0
    assert dead_entries(r, exp) == []


def test_sigterm_mid_batch_with_the_teacher_answering_publishes_the_batch(redis_url, exp, slow_teacher):
    rollouts = make_rollouts(50, length=24, score_from=4)
    with RolloutProducer(redis_url, exp) as q:
        q.push(rollouts)
    proc = scorer_process(redis_url, slow_teacher.grpc_url, drain_s=10)
    sigterm_while_holding(proc, connect(redis_url), exp, 50, wait_s=20)
    # no other scorer ever ran: what is scored, the stopping scorer published before it exited
    got = drain_scored(redis_url, exp, 50, timeout_s=5)
    got += drain_scored(redis_url, exp, 10 ** 9, timeout_s=0.5)            # and nothing more
    assert_each_scored_once(redis_url, exp, got, rollouts)


def test_sigterm_mid_batch_with_the_teacher_down_releases_the_batch(redis_url, exp, uniform_teacher):
    rollouts = make_rollouts(50, length=24, score_from=4)
    with RolloutProducer(redis_url, exp) as q:
        q.push(rollouts)
    proc = scorer_process(redis_url, f"grpc://127.0.0.1:{free_port()}", drain_s=1)    # nothing listens there
    log = sigterm_while_holding(proc, connect(redis_url), exp, 50, wait_s=15)
    assert "released 50 rollout(s)" in log, log[-2000:]
    # released means idle "forever": a scorer whose reclaim timeout is 60 s takes them at once
    t0 = time.monotonic()
    with running_scorer(redis_url, uniform_teacher.grpc_url, queue_reclaim_idle_s=60):
        got = drain_scored(redis_url, exp, 50, timeout_s=15)
        got += drain_scored(redis_url, exp, 10 ** 9, timeout_s=0.5)
    assert time.monotonic() - t0 < 15
    assert_each_scored_once(redis_url, exp, got, rollouts)


def test_sigterm_mid_batch_with_the_teacher_slower_than_the_drain_releases_the_batch(redis_url, exp, slow_teacher):
    rollouts = make_rollouts(50, length=24, score_from=4)
    with RolloutProducer(redis_url, exp) as q:
        q.push(rollouts)
    proc = scorer_process(redis_url, slow_teacher.grpc_url, drain_s=0.3)       # the teacher takes 1.5 s
    t0 = time.monotonic()
    log = sigterm_while_holding(proc, connect(redis_url), exp, 50, wait_s=15)
    assert "released 50 rollout(s)" in log, log[-2000:]
    with running_scorer(redis_url, slow_teacher.grpc_url, queue_reclaim_idle_s=60):
        got = drain_scored(redis_url, exp, 50, timeout_s=15)
        got += drain_scored(redis_url, exp, 10 ** 9, timeout_s=0.5)
    assert time.monotonic() - t0 < 30
    assert_each_scored_once(redis_url, exp, got, rollouts)

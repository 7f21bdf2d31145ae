"""A teacher fleet under load, as real processes on loopback: two teacher replicas (`opd serve`,
uniform engine), three `opd scorer` processes given both addresses, 5,000 rollouts.

Requests spread over the replicas (each 40-60%); one replica is killed with SIGKILL
mid-run: scoring goes on on the other, nothing is lost or scored twice, and once the
replica is back (same ports) it gets requests again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from opd_client.queue import RolloutProducer
from opd_client.queue.connection import connect
from opd_services.redis_embed import EmbeddedRedis, free_port
from queue_helpers import dead_entries, drain_scored, make_rollouts

SCORE_ROUTE = '/opd.teacher.v1.Teacher/Score'


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
    env.update(OPD_LOG_LEVEL="warning", OMP_NUM_THREADS="1", **kw)
    return env


class Teacher:
    def __init__(self):
        self.http, self.grpc = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Teacher":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opd_services.cli", "serve", "--engine", "uniform", "--host", "127.0.0.1",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc)],
            env=_env(OPD_DRAIN_TIMEOUT_S="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=2)
                return self
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "teacher did not become ready"
                time.sleep(0.2)

    def score_requests(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("opd_requests_total{") and f'route="{SCORE_ROUTE}"' in line and 'code="OK"' in line)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _scorer(redis_url: str, teacher_url: str) -> subprocess.Popen:
    env = _env(OPD_REDIS_URL=redis_url, OPD_TEACHER_URL=teacher_url, OPD_QUEUE_RECLAIM_IDLE_S="2",
               OPD_SCORER_BATCH_SIZE="25", OPD_SCORER_CONCURRENCY="2", OPD_SCORER_METRICS_PORT="0",
               OPD_SCORER_DISCOVERY_S="0.2", OPD_SCORER_BLOCK_MS="50", OPD_SCORER_BACKOFF_MAX_S="0.5",
               OPD_REPLICA_CHECK_RATE="0")
    return subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _scored(redis, exp: str) -> int:
    return redis.xlen(f"opd:{{{exp}}}:scored")


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_replicas_three_scorers_kill_9_one_replica_mid_run():
    total, chunk, exp = 5000, 50, "fleet"
    with EmbeddedRedis() as r:
        redis = connect(r.url)
        a, b = Teacher().start(), Teacher().start()
        url = f"grpc://127.0.0.1:{a.grpc},127.0.0.1:{b.grpc}"
        scorers = [_scorer(r.url, url) for _ in range(3)]
        pushed: list[str] = []

        def produce():                     # ~200 rollouts/s: the run lasts ~25 s
            with RolloutProducer(r.url, exp) as q:
                for i in range(0, total, chunk):
                    q.push(make_rollouts(chunk, length=24, score_from=4, prefix=f"f{i}-", seed=i))
                    pushed.extend(f"f{i}-{j}" for j in range(chunk))
                    time.sleep(0.25)

        producer = threading.Thread(target=produce)
        try:
            producer.start()
            # 1) both replicas share the load
            _wait(lambda: _scored(redis, exp) >= 1000, 60, "1000 rollouts scored")
            na, nb = a.score_requests(), b.score_requests()
            assert 0.4 <= na / (na + nb) <= 0.6, (na, nb)
            # 2) kill -9 one replica: scoring goes on on the other
            b.kill9()
            at_kill, a_at_kill = _scored(redis, exp), a.score_requests()
            _wait(lambda: _scored(redis, exp) >= at_kill + 500, 60, "scoring to go on after the kill")
            assert a.score_requests() > a_at_kill
            # 3) the replica comes back on the same ports and gets requests again
            b.start()
            _wait(lambda: b.score_requests() >= 5, 40, "the restarted replica to get requests")
            producer.join(60)
            got = drain_scored(r.url, exp, total, timeout_s=90)
        finally:
            for p in scorers:
                p.send_signal(signal.SIGTERM)
            for p in scorers:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            a.stop()
            b.stop()
        dead = dead_entries(redis, exp)
    ids = [s.rollout.id for s in got]
    assert len(ids) == len(set(ids)), "a rollout was scored twice"
    assert set(ids) == set(pushed) and len(pushed) == total, f"{total - len(set(ids))} rollouts lost"
    assert dead == []

"""Faults the queue must survive, each bounded in time: scorer processes killed with
SIGKILL mid-flow, and the Redis server itself killed and restarted (AOF on)."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from opd_client.errors import Unavailable
from opd_client.queue import RolloutProducer, keys, rollouts_key
from opd_client.queue.connection import connect
from opd_services.redis_embed import EmbeddedRedis, free_port
from queue_helpers import dead_entries, drain_scored, make_rollouts, running_scorer


def _scorer_process(redis_url: str, teacher_url: str, metrics_port: int) -> subprocess.Popen:
    env = {**os.environ, "OPD_REDIS_URL": redis_url, "OPD_TEACHER_URL": teacher_url,
           "OPD_QUEUE_RECLAIM_IDLE_S": "1", "OPD_SCORER_BATCH_SIZE": "50", "OPD_SCORER_CONCURRENCY": "2",
           "OPD_SCORER_METRICS_PORT": str(metrics_port), "OPD_SCORER_DISCOVERY_S": "0.2",
           "OPD_SCORER_BLOCK_MS": "50", "OPD_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "opd_services.cli", "scorer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _scrape(port: int, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _pending_of(redis, exp: str, pid: int) -> list[str]:
    """Entry ids pending for the loops of scorer process `pid` (consumers named scorer-HOST-PID-i)."""
    key = rollouts_key(exp)
    out = []
    for c in redis.xpending(key, keys.GROUP_SCORERS)["consumers"]:
        name = keys.as_str(c["name"])
        if name.rsplit("-", 2)[-2] == str(pid) and c["pending"]:
            out += [keys.as_str(e["message_id"]) for e in
                    redis.xpending_range(key, keys.GROUP_SCORERS, "-", "+", 10_000, consumername=name)]
    return out


def _kill_while_holding_work(victim: subprocess.Popen, redis, exp: str) -> list[str]:
    """Freeze the victim until a look at XPENDING finds it holding rollouts, then SIGKILL it."""
    deadline = time.monotonic() + 20
    while True:
        victim.send_signal(signal.SIGSTOP)
        held = _pending_of(redis, exp, victim.pid)
        if held:
            victim.send_signal(signal.SIGKILL)
            victim.wait(5)
            return held
        victim.send_signal(signal.SIGCONT)
        if time.monotonic() > deadline:
            victim.kill()
            pytest.fail("the scorer never held pending rollouts to kill it on")
        time.sleep(0.05)


def _wait_reclaimed(redis, exp: str, pid: int, held: list[str]) -> None:
    """The dead scorer's entries leave it: other scorers reclaimed them (XAUTOCLAIM), nobody else can."""
    deadline = time.monotonic() + 30
    while still := set(held) & set(_pending_of(redis, exp, pid)):
        assert time.monotonic() < deadline, f"{len(still)} of the killed scorer's rollouts never reclaimed"
        time.sleep(0.1)


def _reclaimed(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("opd_queue_reclaimed_total{"))


@pytest.mark.slow
def test_kill_9_a_scorer_5_times_while_5000_rollouts_flow_every_one_scored_exactly_once(
        redis_url, exp, uniform_teacher):
    total, chunk = 5000, 100
    start = lambda: (lambda port: (_scorer_process(redis_url, uniform_teacher.grpc_url, port), port))(free_port())
    procs = [start(), start()]
    pushed: list[str] = []
    kills_done = threading.Event()

    def produce():
        """100 rollouts every 0.2 s until the 5 kills are done (every kill lands mid-flow) and 5000 went."""
        with RolloutProducer(redis_url, exp) as q:
            i = 0
            while i < total or not kills_done.is_set():
                q.push(make_rollouts(chunk, length=24, score_from=4, prefix=f"k{i}-", seed=i))
                pushed.extend(f"k{i}-{j}" for j in range(chunk))
                i += chunk
                time.sleep(0.2)

    producer = threading.Thread(target=produce)
    reclaimed, kills = 0.0, []
    try:
        producer.start()
        assert "opd_queue_scored_total" in _scrape(procs[0][1])   # the scorer's own /metrics port
        redis = connect(redis_url)
        for _kill in range(5):
            time.sleep(0.5)
            victim, _port = procs.pop(0)
            held = _kill_while_holding_work(victim, redis, exp)      # each kill hits a scorer mid-batch
            procs.append(start())
            _wait_reclaimed(redis, exp, victim.pid, held)
            kills.append(len(held))
        kills_done.set()
        producer.join(60)
        got = drain_scored(redis_url, exp, len(pushed), timeout_s=90)
        reclaimed = sum(_reclaimed(_scrape(port)) for _p, port in procs)
    finally:
        kills_done.set()                  # the producer stops even when a kill failed
        for p, _port in procs:
            p.send_signal(signal.SIGTERM)
        for p, _port in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    counts = collections.Counter(s.rollout.id for s in got)
    assert len(pushed) >= total and not producer.is_alive()
    r = connect(redis_url)
    state = (f"pending {r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)}, "
             f"scorer exit codes {[p.returncode for p, _ in procs]}")
    assert set(counts) == set(pushed), f"missing {len(set(pushed) - set(counts))}; {state}"
    assert [i for i, n in counts.items() if n > 1] == []
    assert dead_entries(connect(redis_url), exp) == []
    assert len(kills) == 5 and all(n > 0 for n in kills), kills
    print(f"rollouts held by each killed scorer: {kills}; reclaimed by the last survivors: {reclaimed:.0f}")


@pytest.mark.slow
def test_redis_killed_and_restarted_with_aof_nothing_acknowledged_is_lost(exp, uniform_teacher, tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "valkey", appendonly=True).start()
    returned: list[str] = []
    ambiguous: list[str] = []
    stop = threading.Event()

    def produce():
        with RolloutProducer(server.url, exp) as q:
            i = 0
            while not stop.is_set() and i < 4000:
                batch = make_rollouts(50, length=24, score_from=4, prefix=f"p{i}-", seed=i)
                try:
                    q.push(batch)
                    returned.extend(r.id for r in batch)
                except Unavailable:       # Redis is down: some may have landed; retry the next batch
                    ambiguous.extend(r.id for r in batch)
                    time.sleep(0.1)
                i += 50
                time.sleep(0.02)

    try:
        with running_scorer(server.url, uniform_teacher.grpc_url):
            producer = threading.Thread(target=produce)
            producer.start()
            time.sleep(1.0)
            server.kill()
            time.sleep(0.5)
            server.start()
            time.sleep(1.0)
            stop.set()
            producer.join(30)
            assert len(returned) > 0 and not producer.is_alive()
            got = drain_scored(server.url, exp, len(returned), timeout_s=60)
            got += drain_scored(server.url, exp, 10 ** 9, timeout_s=1.0)    # and nothing more
        print(f"returned {len(returned)}, ambiguous {len(ambiguous)}, scored {len(got)}")
        counts = collections.Counter(s.rollout.id for s in got)
        assert set(returned) <= set(counts), f"lost {len(set(returned) - set(counts))} acknowledged rollouts"
        assert [i for i, n in counts.items() if n > 1 and i not in ambiguous] == []
        r = connect(server.url)
        assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0
        assert dead_entries(r, exp) == []
    finally:
        server.stop()

"""RolloutProducer and ScoredConsumer against a real Valkey: pushes, backpressure, trimming,
reclaiming a dead consumer's entries, corrupt scored entries, bad arguments."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from opd_client.codec import encode_scored
from opd_client.errors import InvalidRequest, PermissionDenied, QueueFull, Unavailable
from opd_client.queue import (GROUP_SCORERS, AsyncRolloutProducer, RolloutProducer, ScoredConsumer, keys,
                              rollouts_key, scored_key)
from opd_client.queue.connection import connect
from opd_client.types import ScoredRollout
from queue_helpers import dead_entries, make_rollouts


def _publish_scored(redis, exp, rollouts):
    """Write scored entries the way a scorer would (tests of the consumer side alone)."""
    for r in rollouts:
        s = ScoredRollout(rollout=r, teacher_logprobs=np.full(r.n_scored, -2.0), model_revision="rev")
        redis.xadd(scored_key(exp), {keys.FIELD: encode_scored(s)})


def test_push_returns_ids_in_order_and_creates_the_scorers_group(redis_url, exp):
    with RolloutProducer(redis_url, exp) as q:
        ids = q.push(make_rollouts(5))
        assert len(ids) == 5 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert q.push([]) == []
        groups = q.redis.xinfo_groups(rollouts_key(exp))
        assert [g["name"] for g in groups] == [GROUP_SCORERS.encode()] and q.backlog() == 5


def test_backpressure_raises_queue_full_and_waits_for_room(redis_url, exp):
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp, max_backlog=10) as q:
        q.push(make_rollouts(8))
        with pytest.raises(QueueFull, match="backlog 8 \\+ 3 new rollouts exceeds max_backlog=10"):
            q.push(make_rollouts(3))
        with pytest.raises(InvalidRequest, match="exceeds max_backlog=10; push smaller batches"):
            q.push(make_rollouts(11))
    # a scorer taking (and acking) 5 makes room for a waiting producer
    with RolloutProducer(redis_url, exp, max_backlog=10, block_timeout_s=5) as q:
        def drain_later():
            time.sleep(0.3)
            got = r.xreadgroup(GROUP_SCORERS, "s", {rollouts_key(exp): ">"}, count=5)
            r.xack(rollouts_key(exp), GROUP_SCORERS, *[e[0] for e in got[0][1]])
        import threading
        t = threading.Thread(target=drain_later)
        t.start()
        t0 = time.monotonic()
        assert len(q.push(make_rollouts(3))) == 3
        assert 0.2 < time.monotonic() - t0 < 4
        t.join()


async def test_async_producer_pushes_and_applies_backpressure(redis_url, exp):
    q = await AsyncRolloutProducer.create(redis_url, exp, max_backlog=4)
    async with q:
        assert len(await q.push(make_rollouts(4))) == 4
        with pytest.raises(QueueFull):
            await q.push(make_rollouts(1))
        assert await q.backlog() == 4


def test_consumer_reads_acks_and_trims_only_consumed_entries(redis_url, exp):
    r = connect(redis_url)
    rollouts = make_rollouts(10, top_k=0)
    with ScoredConsumer(redis_url, exp, consumer="a", idle_reclaim_s=30, trim_every_s=0) as q:
        _publish_scored(r, exp, rollouts)
        got = q.read(count=6, block_ms=100)
        assert [s.rollout.id for _, s in got] == [f"r{i}" for i in range(6)]
        s = got[0][1]
        assert s.teacher_logprobs.dtype == np.float32 and s.teacher_logprobs.shape == (24,)
        assert np.array_equal(s.rollout.token_ids, rollouts[0].token_ids)
        assert q.ack([eid for eid, _ in got[:4]]) == 4
        # entries 4, 5 are pending, 6..9 undelivered: only 0..3 may go
        assert r.xlen(scored_key(exp)) == 6
        assert [s.rollout.id for _, s in q.read(count=10, block_ms=100)] == ["r6", "r7", "r8", "r9"]


def test_a_killed_trainer_consumers_batch_is_reclaimed_by_another(redis_url, exp):
    r = connect(redis_url)
    _publish_scored(r, exp, make_rollouts(20))
    # a real trainer process reads 8 entries, then dies by SIGKILL before acking
    code = textwrap.dedent(f"""
        import sys, time
        from opd_client.queue import ScoredConsumer
        q = ScoredConsumer({redis_url!r}, {exp!r}, consumer="doomed", idle_reclaim_s=60)
        got = q.read(count=8, block_ms=1000)
        print(len(got), flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "8"
    finally:
        p.kill()
        p.wait(10)
    with ScoredConsumer(redis_url, exp, consumer="heir", idle_reclaim_s=0.5) as q:
        seen = []
        deadline = time.monotonic() + 10
        while len(seen) < 20 and time.monotonic() < deadline:
            batch = q.read(count=50, block_ms=100)
            q.ack([eid for eid, _ in batch])
            seen += [s.rollout.id for _, s in batch]
        assert sorted(seen, key=lambda i: int(i[1:])) == [f"r{i}" for i in range(20)]
        assert q.reclaimed == 8
    assert r.xpending(scored_key(exp), "trainers")["pending"] == 0


def test_a_corrupt_scored_entry_goes_to_dead_and_is_not_handed_out(redis_url, exp):
    r = connect(redis_url)
    with ScoredConsumer(redis_url, exp, consumer="a") as q:
        r.xadd(scored_key(exp), {keys.FIELD: b"\x93not-a-payload"})
        _publish_scored(r, exp, make_rollouts(1))
        got = q.read(count=10, block_ms=100)
        assert [s.rollout.id for _, s in got] == ["r0"]
    dead = dead_entries(r, exp)
    assert len(dead) == 1 and dead[0]["stage"] == b"trainer" and b"payload" in dead[0]["reason"]
    assert r.xpending(scored_key(exp), "trainers")["pending"] == 1     # r0 read, not yet acked


@pytest.mark.parametrize("kwargs,field", [({"experiment": "bad name"}, "experiment"),
                                          ({"experiment": "a{b}"}, "experiment"),
                                          ({"max_backlog": 0}, "max_backlog"),
                                          ({"redis_url": "http://x"}, "redis_url")])
def test_bad_producer_arguments_are_refused_by_field(redis_url, exp, kwargs, field):
    args = {"redis_url": redis_url, "experiment": exp, **kwargs}
    with pytest.raises(InvalidRequest) as e:
        RolloutProducer(**args)
    assert e.value.field == field


def test_pushing_something_else_than_rollouts_is_refused(redis_url, exp):
    with RolloutProducer(redis_url, exp) as q:
        with pytest.raises(InvalidRequest, match=r"rollouts\[1\]: must be an opd_client.Rollout"):
            q.push(make_rollouts(1) + [{"token_ids": [1, 2]}])
        assert q.backlog() == 0


def test_cluster_mode_can_be_forced_or_detected_and_bad_values_are_refused(redis_url, on_cluster):
    import redis as redis_py
    detected = connect(redis_url)
    forced = connect(redis_url + ("&" if "?" in redis_url else "?") + "cluster=no")
    assert type(forced) is redis_py.Redis and forced.ping()
    assert type(detected) is (redis_py.RedisCluster if on_cluster else redis_py.Redis), type(detected)
    assert detected.ping()
    with pytest.raises(InvalidRequest, match="cluster=yes or cluster=no"):
        connect(redis_url + "?cluster=maybe")


def test_a_user_without_info_rights_still_connects(redis_url, exp, on_cluster):
    """Tenancy gives each experiment an ACL user limited to its keys and stream commands."""
    if on_cluster:
        pytest.skip("ACL users are per node on a cluster; covered on the single-node run")
    admin = connect(redis_url)
    user = f"u{exp}"
    admin.acl_setuser(user, enabled=True, passwords=[f"+pw{exp}"], keys=[f"opd:{{{exp}}}:*"],
                      commands=["+@stream", "+ping", "-info"])
    try:
        url = redis_url.replace("redis://", f"redis://{user}:pw{exp}@", 1)
        with RolloutProducer(url, exp) as q:
            assert len(q.push(make_rollouts(2))) == 2
        with pytest.raises(PermissionDenied, match="only its own") as e:   # other experiments stay out of reach
            RolloutProducer(url, exp + "x")
        assert f"pw{exp}" not in str(e.value)
    finally:
        admin.acl_deluser(user)


def test_no_redis_there_is_unavailable_and_says_where(exp):
    from opd_services.redis_embed import free_port
    with pytest.raises(Unavailable, match="Check OPD_REDIS_URL"):
        RolloutProducer(f"redis://127.0.0.1:{free_port()}", exp)

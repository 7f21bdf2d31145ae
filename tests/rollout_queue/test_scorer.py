"""The scorer against a real Valkey and a real uniform-engine teacher on loopback:
the flow end to end, many experiments, top-k, poison input, a teacher outage, shutdown."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from opd_client.queue import RolloutProducer, keys, rollouts_key
from opd_client.queue.connection import connect
from opd_client.types import Rollout
from opd_services.redis_embed import free_port
from queue_helpers import dead_entries, drain_scored, make_rollouts, running_scorer, uniform_settings

LOG_V = -math.log(32_000)


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_rollouts_flow_to_scored_with_every_field_intact(redis_url, exp, uniform_teacher):
    rollouts = make_rollouts(150, length=40, score_from=10)
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, uniform_teacher.grpc_url):
        q.push(rollouts)
        got = drain_scored(redis_url, exp, 150, timeout_s=20)
    assert sorted(s.rollout.id for s in got) == sorted(r.id for r in rollouts)
    by_id = {r.id: r for r in rollouts}
    for s in got:
        r = by_id[s.rollout.id]
        assert np.array_equal(s.rollout.token_ids, r.token_ids) and s.rollout.score_from == 10
        assert np.array_equal(s.rollout.behaviour_logprobs, r.behaviour_logprobs)
        assert s.rollout.metadata == r.metadata and s.model_revision == "uniform:32000"
        assert s.teacher_logprobs.shape == (30,) and np.allclose(s.teacher_logprobs, LOG_V)
        assert s.top_ids is None
    r = connect(redis_url)
    assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0
    assert _metric("opd_queue_scored_total", experiment=exp) == 150


def test_top_k_per_rollout_and_many_experiments(redis_url, uniform_teacher):
    exps = [f"multi{i}-{time.time_ns()}" for i in range(3)]
    with running_scorer(redis_url, uniform_teacher.grpc_url):
        for i, e in enumerate(exps):
            with RolloutProducer(redis_url, e) as q:
                q.push(make_rollouts(20, top_k=i * 2, prefix=f"{e}-"))
        for i, e in enumerate(exps):
            got = drain_scored(redis_url, e, 20, timeout_s=20)
            assert len(got) == 20
            k = i * 2
            for s in got:
                if k:
                    assert s.top_ids.shape == (24, k) and s.top_ids.dtype == np.int32
                    assert np.allclose(s.top_logprobs, LOG_V)
                else:
                    assert s.top_ids is None


def test_poison_goes_to_dead_with_the_reason_and_the_scorer_keeps_going(redis_url, exp, uniform_teacher):
    good = make_rollouts(30, prefix="good")
    poison = [
        Rollout(id="vocab", token_ids=[1, 2, 40_000, 3], score_from=1),
        Rollout(id="empty", token_ids=[], score_from=0),
        Rollout(id="from0", token_ids=[1, 2, 3], score_from=0),
        Rollout(id="topk", token_ids=[1, 2, 3], score_from=1, top_k=999),
        Rollout(id="toolong", token_ids=np.ones(5000, np.int32), score_from=1),
    ]
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, uniform_teacher.grpc_url):
        q.push(good[:10] + poison[:3] + good[10:20])
        r.xadd(rollouts_key(exp), {keys.FIELD: b"\x01\x02 garbage"})
        r.xadd(rollouts_key(exp), {b"other": b"no payload field"})
        q.push(poison[3:] + good[20:])
        got = drain_scored(redis_url, exp, 30, timeout_s=20)
        deadline = time.monotonic() + 10
        while len(dead_entries(r, exp)) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(s.rollout.id for s in got) == sorted(g.id for g in good)
    entries = dead_entries(r, exp)
    dead = {d["rollout_id"].decode(): d["reason"].decode() for d in entries if d["rollout_id"]}
    assert "outside the vocabulary" in dead["vocab"]
    assert "needs at least 2 tokens" in dead["empty"]
    assert "score_from" in dead["from0"]
    assert "top_k" in dead["topk"]
    assert "max length" in dead["toolong"]
    corrupt = [d for d in entries if not d["rollout_id"]]
    assert len(corrupt) == 2 and all(b"corrupt payload" in d["reason"] for d in corrupt)
    assert corrupt[0]["d"] == b"\x01\x02 garbage" and len(entries) == 7
    assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0
    assert _metric("opd_queue_dead_total", experiment=exp, reason="invalid") == 5
    assert _metric("opd_queue_dead_total", experiment=exp, reason="corrupt") == 2


@pytest.mark.slow
def test_teacher_stopped_for_a_while_scorers_back_off_and_resume_nothing_dead(redis_url, exp):
    from opd_services.teacher.server import BackgroundTeacher
    port = free_port()
    settings = uniform_settings(grpc_port=port)
    url = f"grpc://127.0.0.1:{port}"
    teacher = BackgroundTeacher(settings).start()
    retries0 = _metric("opd_queue_teacher_retries_total")
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, url, queue_reclaim_idle_s=2.0):
        q.push(make_rollouts(50, prefix="a"))
        assert len(drain_scored(redis_url, exp, 50, timeout_s=20, consumer="c1")) == 50
        teacher.stop()
        q.push(make_rollouts(50, prefix="b"))
        time.sleep(4)                  # twice the reclaim timeout: scorers keep retrying
        assert _metric("opd_queue_teacher_retries_total") > retries0
        teacher = BackgroundTeacher(settings).start()
        try:
            got = drain_scored(redis_url, exp, 50, timeout_s=30, consumer="c2")
        finally:
            teacher.stop()
    assert sorted(s.rollout.id for s in got) == sorted(f"b{i}" for i in range(50))
    assert dead_entries(connect(redis_url), exp) == []
    # the waiting scorers kept their batches fresh: nobody reclaimed (and redid) them
    assert _metric("opd_queue_reclaimed_total", experiment=exp, stream="rollouts") == 0


def test_stopping_with_the_teacher_down_releases_the_batch_to_other_scorers(redis_url, exp, uniform_teacher):
    port = free_port()
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp) as q:
        q.push(make_rollouts(10))
        with running_scorer(redis_url, f"grpc://127.0.0.1:{port}", drain_timeout_s=0.3, scorer_concurrency=1,
                            queue_reclaim_idle_s=60):
            deadline = time.monotonic() + 10
            while r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] < 10:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # released: idle "forever", so a scorer with a 60 s reclaim timeout takes them at once
        t0 = time.monotonic()
        with running_scorer(redis_url, uniform_teacher.grpc_url, queue_reclaim_idle_s=60):
            got = drain_scored(redis_url, exp, 10, timeout_s=10)
        assert len(got) == 10 and time.monotonic() - t0 < 8


def test_queue_gauges_report_backlog_and_pending(redis_url, exp):
    from opd_services.scorer.runner import update_gauges
    with RolloutProducer(redis_url, exp) as q:
        q.push(make_rollouts(7))
        r = connect(redis_url)
        r.xreadgroup(keys.GROUP_SCORERS, "s", {rollouts_key(exp): ">"}, count=3)
        update_gauges(r, [exp])
    assert _metric("opd_queue_backlog", experiment=exp, stream="rollouts") == 4
    assert _metric("opd_queue_pending", experiment=exp, stream="rollouts") == 3
    assert _metric("opd_queue_backlog", experiment=exp, stream="scored") == 0


def test_a_stream_deleted_under_a_running_scorer_does_not_stall_the_others(redis_url, exp, uniform_teacher):
    r = connect(redis_url)
    other = f"{exp}-other"
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, uniform_teacher.grpc_url):
        q.push(make_rollouts(5))
        assert len(drain_scored(redis_url, exp, 5, timeout_s=10)) == 5
        r.delete(rollouts_key(exp))          # gone, while the scorer still lists the experiment
        with RolloutProducer(redis_url, other) as q2:
            q2.push(make_rollouts(5))
            assert len(drain_scored(redis_url, other, 5, timeout_s=10)) == 5
        q.push(make_rollouts(3, prefix="again"))   # the producer recreates stream and group
        assert len(drain_scored(redis_url, exp, 3, timeout_s=10)) == 3


def test_a_stalled_scorer_whose_batch_was_taken_over_publishes_nothing(redis_url, exp):
    """The atomic publish checks ownership: after B reclaims A's entry, A's late result is
    dropped and B's is published, once. (Plain MULTI/EXEC would have published both.)"""
    from opd_services.scorer.publish import Outcome, Publisher
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp) as q:
        (eid,) = q.push(make_rollouts(1))
    r.xreadgroup(keys.GROUP_SCORERS, "A", {rollouts_key(exp): ">"}, count=1)
    time.sleep(0.05)
    _, claimed, *_ = r.xautoclaim(rollouts_key(exp), keys.GROUP_SCORERS, "B", 10, start_id="0-0")
    assert [c[0].decode() for c in claimed] == [eid]
    assert Publisher(r, "A").publish(exp, [Outcome(eid, b"from-A")]) == [False]
    assert Publisher(r, "B").publish(exp, [Outcome(eid, b"from-B")]) == [True]
    assert Publisher(r, "B").publish(exp, [Outcome(eid, b"again")]) == [False]    # a retried publish
    assert [f[keys.FIELD] for _, f in r.xrange(keys.scored_key(exp))] == [b"from-B"]
    assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0


def test_touch_refreshes_only_entries_this_scorer_still_owns(redis_url, exp):
    from opd_services.scorer.publish import Publisher
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp) as q:
        a, b = q.push(make_rollouts(2))
    r.xreadgroup(keys.GROUP_SCORERS, "A", {rollouts_key(exp): ">"}, count=2)
    time.sleep(0.3)
    r.xclaim(rollouts_key(exp), keys.GROUP_SCORERS, "B", 0, [b], justid=True)
    assert Publisher(r, "A").touch(exp, [a, b]) == 1
    owners = {e["message_id"].decode(): (e["consumer"].decode(), e["time_since_delivered"])
              for e in r.xpending_range(rollouts_key(exp), keys.GROUP_SCORERS, "-", "+", 10)}
    assert owners[a][0] == "A" and owners[a][1] < 200 and owners[b][0] == "B"

"""Weighted fair share in the scorer: registered weights 1 and 3 -> scored tokens 1:3 while both
experiments are backlogged; an unregistered or idle experiment hoards no credit."""
from __future__ import annotations

import uuid

from opd_client.queue import RolloutProducer
from opd_client.queue.connection import connect
from opd_services.scorer.fair import FairShare
from opd_services.tenancy.registry import Registry

from queue_helpers import drain_scored, make_rollouts, running_scorer


def test_fair_share_orders_by_virtual_time():
    f, served = FairShare(), {"a": 0, "b": 0}
    for _ in range(40):                              # a: weight 1, b: weight 3, both always ready
        e = f.order(["a", "b"])[0]
        f.charge(e, 100, {"a": 1.0, "b": 3.0}[e])
        served[e] += 1
    assert served == {"a": 10, "b": 30}
    f.charge("c", 100, 1.0)                          # c was idle: it starts at the clock, not at 0
    assert f.vtime["c"] == f.clock + 100 and f.clock > 0


def test_scorer_shares_tokens_by_registered_weight(redis_url, uniform_teacher):
    a, b = f"wa{uuid.uuid4().hex[:8]}", f"wb{uuid.uuid4().hex[:8]}"
    reg = Registry(connect(redis_url))
    reg.create(a, weight=1)
    reg.create(b, weight=3)
    try:
        for exp in (a, b):
            with RolloutProducer(redis_url, exp) as q:
                for i in range(0, 1600, 400):
                    q.push(make_rollouts(400, prefix=f"{exp}-{i}-", seed=i))
        with running_scorer(redis_url, uniform_teacher.grpc_url, scorer_concurrency=1, scorer_batch_size=40):
            sa = drain_scored(redis_url, a, 1600)
            sb = drain_scored(redis_url, b, 1600)
        assert len(sa) == len(sb) == 1600
        first = sorted([(s.scored_at, "a") for s in sa] + [(s.scored_at, "b") for s in sb])[:1600]
        n_a, n_b = sum(1 for _, e in first if e == "a"), sum(1 for _, e in first if e == "b")
        assert abs(n_b / (n_a + n_b) - 0.75) <= 0.075, (n_a, n_b)
    finally:
        reg.delete(a)
        reg.delete(b)

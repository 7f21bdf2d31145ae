"""Helpers of the queue tests (imported by conftest and the tests): settings, rollouts,
an in-process scorer, draining the scored stream."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

from opd_client.types import Rollout
from opd_services.config import Settings


def uniform_settings(**kw) -> Settings:
    base = dict(engine="uniform", host="127.0.0.1", http_port=0, grpc_port=0, max_top_k=20,
                drain_timeout_s=2, queue_reclaim_idle_s=1.0, scorer_batch_size=64, scorer_concurrency=2,
                scorer_block_ms=50, scorer_backoff_max_s=0.5, scorer_discovery_s=0.2, scorer_gauges_s=0.2,
                scorer_metrics_port=0, scorer_teacher_timeout_s=10)
    base.update(kw)
    return Settings(**base)


def make_rollouts(n: int, length: int = 32, score_from: int = 8, prefix: str = "r", top_k: int = 0,
                  seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 32_000, (n, length))
    return [Rollout(id=f"{prefix}{i}", token_ids=toks[i], score_from=score_from,
                    behaviour_logprobs=np.full(length - score_from, -1.0), policy_version=1,
                    sampled_at=time.time(), metadata={"i": i}, top_k=top_k) for i in range(n)]


@contextmanager
def running_scorer(redis_url: str, teacher_url: str, **kw):
    """An in-process Scorer on threads until the block ends (then a graceful stop)."""
    from opd_services.scorer.runner import Scorer
    scorer = Scorer(uniform_settings(teacher_url=teacher_url, **kw), redis_url)
    stop = threading.Event()
    t = threading.Thread(target=scorer.run, args=(stop,), daemon=True)
    t.start()
    try:
        yield scorer
    finally:
        stop.set()
        t.join(15)
        assert not t.is_alive(), "scorer did not stop within 15 s"


def drain_scored(redis_url: str, exp: str, want: int, timeout_s: float = 30.0, consumer: str = "t0") -> list:
    """Read (and ack) scored entries until `want` arrived or the timeout; return ScoredRollouts."""
    from opd_client.queue import ScoredConsumer
    out, deadline = [], time.monotonic() + timeout_s
    with ScoredConsumer(redis_url, exp, consumer=consumer, idle_reclaim_s=1.0) as q:
        while len(out) < want and time.monotonic() < deadline:
            batch = q.read(count=500, block_ms=100)
            q.ack([eid for eid, _ in batch])
            out += [s for _, s in batch]
    return out


def dead_entries(redis, exp: str) -> list[dict]:
    from opd_client.queue import dead_key
    return [{k.decode(): v for k, v in fields.items()} for _id, fields in redis.xrange(dead_key(exp))]

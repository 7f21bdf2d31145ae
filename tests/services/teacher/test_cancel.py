"""Requests whose caller gave up (gRPC deadline, HTTP client timeout) leave the batcher: their
queued sequences never reach the engine, and each is counted in opd_requests_cancelled_total."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from prometheus_client import REGISTRY

from opd_client import AsyncTeacherClient, OPDError, RetryPolicy, TeacherClient
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

V, GIVE_UP_S = 64, 0.5


class GatedEngine(UniformEngine):
    """The uniform engine whose first batch holds the engine until the test releases it; it
    counts every sequence it scores itself."""

    def __init__(self):
        super().__init__(vocab_size=V, max_model_len=128)
        self.scored = 0
        self.running, self.release = threading.Event(), threading.Event()

    def score(self, items):
        if not self.running.is_set():
            self.running.set()
            self.release.wait(60)
        self.scored += len(items)
        return super().score(items)


def cancelled() -> float:
    return REGISTRY.get_sample_value("opd_requests_cancelled_total", {"experiment": "default"}) or 0.0


async def _fifty_give_up(t: BackgroundTeacher, engine: GatedEngine) -> list:
    one_try = RetryPolicy(attempts=1)
    async with AsyncTeacherClient(t.grpc_url, timeout=GIVE_UP_S, retry=one_try) as g, \
               AsyncTeacherClient(t.http_url, timeout=GIVE_UP_S, retry=one_try) as h:
        await g.model(), await h.model()           # connections up: every request reaches the teacher
        assert await asyncio.to_thread(engine.running.wait, 10)

        async def give_up(c, i):
            try:
                await c.score([[1, 2, 3, i]])
            except OPDError as e:
                return e
        return await asyncio.gather(*(give_up(g if i < 25 else h, i) for i in range(50)))


def test_requests_that_time_out_never_run_in_the_engine(settings):
    engine = GatedEngine()
    t = BackgroundTeacher(settings.model_copy(update={"batch_wait_ms": 0}), engine=lambda: engine).start()
    try:
        before = cancelled()
        # 1) one request holds the engine
        busy = threading.Thread(target=lambda: TeacherClient(t.grpc_url, timeout=60).score([[1, 2, 3]]))
        busy.start()
        # 2) 50 requests queue behind it and give up: 25 gRPC deadlines, 25 HTTP client timeouts
        errors = asyncio.run(_fifty_give_up(t, engine))
        assert all(e is not None for e in errors), "a request was answered although the engine was held"
        deadline = time.monotonic() + 10
        while cancelled() - before < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled() - before == 50
        # 3) the engine is released: nothing of the 50 runs afterwards
        engine.release.set()
        busy.join(30)
        time.sleep(1.0)
        assert engine.scored == 1, f"the engine scored {engine.scored - 1} sequence(s) of requests that gave up"
        assert t.server.service.batcher.idle()
        # 4) the service still scores
        with TeacherClient(t.http_url) as c:
            out = c.score([[4, 5, 6]])
        np.testing.assert_allclose(out.results[0].logprobs_T, -np.log(V), rtol=1e-6)
        assert engine.scored == 2
    finally:
        engine.release.set()
        t.stop()

"""No answer within the client's timeout, over both transports and both clients: a real teacher on
loopback whose engine is slower than the deadline. The caller gets DeadlineExceeded (an
Unavailable and a TimeoutError) naming the deadline in seconds, after the retry policy's tries
(a timeout is retried like a connection error); a deadline long enough gets the answer."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from opd_client import AsyncTeacherClient, RetryPolicy, TeacherClient, Unavailable
from opd_client.errors import DeadlineExceeded
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import BackgroundTeacher

V, SLOW_S, DEADLINE_S = 64, 0.8, 0.25
TWO_TRIES = RetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01)


class SlowEngine(UniformEngine):
    """The uniform engine, taking SLOW_S per batch."""

    def __init__(self):
        super().__init__(vocab_size=V, max_model_len=128)

    def score(self, items):
        time.sleep(SLOW_S)
        return super().score(items)


@pytest.fixture(scope="module")
def slow_teacher(settings):
    t = BackgroundTeacher(settings.model_copy(update={"batch_wait_ms": 0}), engine=SlowEngine).start()
    yield t
    t.stop()


def score(url: str, is_async: bool, timeout: float, retry: RetryPolicy = TWO_TRIES):
    """One score call through the sync or the async client."""
    if is_async:
        async def go():
            async with AsyncTeacherClient(url, timeout=timeout, retry=retry) as c:
                return await c.score([[1, 2, 3]])
        return asyncio.run(go())
    with TeacherClient(url, timeout=timeout, retry=retry) as c:
        return c.score([[1, 2, 3]])


CASES = [("grpc", False), ("grpc", True), ("http", False), ("http", True)]


@pytest.mark.parametrize("transport,is_async", CASES, ids=[f"{t}-{'async' if a else 'sync'}" for t, a in CASES])
def test_a_deadline_is_a_timeout_that_names_it_after_the_retries(slow_teacher, transport, is_async):
    url = slow_teacher.grpc_url if transport == "grpc" else slow_teacher.http_url
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        score(url, is_async, DEADLINE_S)
    took = time.monotonic() - t0
    err = e.value
    assert isinstance(err, Unavailable) and isinstance(err, TimeoutError)
    assert err.code == "deadline_exceeded"
    msg = str(err)
    assert f"{DEADLINE_S:g} s deadline" in msg and url in msg and "2 attempt" in msg and "timeout=" in msg, msg
    assert 2 * DEADLINE_S <= took < 2 * DEADLINE_S + 2, took      # both tries waited the whole deadline
    assert isinstance(err.__cause__, DeadlineExceeded)                # the last try's own error


@pytest.mark.parametrize("transport,is_async", CASES, ids=[f"{t}-{'async' if a else 'sync'}" for t, a in CASES])
def test_a_deadline_long_enough_gets_the_answer(slow_teacher, transport, is_async):
    url = slow_teacher.grpc_url if transport == "grpc" else slow_teacher.http_url
    out = score(url, is_async, timeout=SLOW_S * 10, retry=RetryPolicy(attempts=1))
    np.testing.assert_allclose(out.results[0].logprobs_T, -np.log(V), rtol=1e-6)

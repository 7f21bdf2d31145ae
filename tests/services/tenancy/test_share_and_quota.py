"""Fair share and quotas through the real service: weights 1 and 3 -> token shares 1:3 (+-10%),
an over-quota client gets 429 with Retry-After while others are unaffected."""
from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from opd_client import AsyncTeacherClient, ResourceExhausted, TeacherClient
from opd_services.teacher.server import BackgroundTeacher

from tenancy_helpers import PacedEngine, tenancy_settings


@pytest.fixture(scope="module")
def paced_teacher(redis_server, cache_dir):
    # 200 us per token: a 100-token request costs 20 ms; batches of <= 1000 tokens
    s = tenancy_settings(cache_dir, redis_server.url, max_batch_tokens=1000)
    with BackgroundTeacher(s, engine=lambda: PacedEngine(2e-4)) as t:
        yield t


async def saturate(url: str, key: str, stop_at: float, counted_from: float, streams: int = 8) -> int:
    """Keep `streams` requests in flight until stop_at; return tokens scored after counted_from."""
    total = 0

    async def loop(c):
        nonlocal total
        while time.monotonic() < stop_at:
            out = await c.score([[1] * 100] * 2)
            if counted_from < time.monotonic() <= stop_at:      # what drains after the stop does not count
                total += out.usage.scored_tokens
    clients = [AsyncTeacherClient(url, api_key=key) for _ in range(streams)]
    try:
        await asyncio.gather(*(loop(c) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return total


def test_weights_1_and_3_share_teacher_tokens_1_to_3(paced_teacher, registry):
    a = registry.create(f"w1-{uuid.uuid4().hex[:6]}", weight=1)
    b = registry.create(f"w3-{uuid.uuid4().hex[:6]}", weight=3)

    async def both():
        t0 = time.monotonic()
        return await asyncio.gather(saturate(paced_teacher.grpc_url, a.api_key, t0 + 4, t0 + 1),
                                    saturate(paced_teacher.grpc_url, b.api_key, t0 + 4, t0 + 1))
    ta, tb = asyncio.run(both())
    share_b = tb / (ta + tb)
    assert abs(share_b - 0.75) <= 0.075, (ta, tb)              # within 10% of 3:1


def test_over_quota_gets_429_with_retry_after_others_unaffected(paced_teacher, registry):
    small = registry.create(f"q-{uuid.uuid4().hex[:6]}", max_inflight_tokens=250)
    other = registry.create(f"o-{uuid.uuid4().hex[:6]}")

    async def burst(url):
        async with AsyncTeacherClient(url, api_key=small.api_key) as c:
            return await asyncio.gather(*(c.score([[1] * 100]) for _ in range(6)), return_exceptions=True)
    for url in (paced_teacher.http_url, paced_teacher.grpc_url):      # 429 and RESOURCE_EXHAUSTED
        results = asyncio.run(burst(url))
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert refused and len(refused) < 6, (url, results)
        # the client reports the server's Retry-After (header / trailer; the quota's 1 s), never a default
        assert all(r.retry_after == 1.0 for r in refused), (url, [r.retry_after for r in refused])
        assert all(not isinstance(r, Exception) or isinstance(r, ResourceExhausted) for r in results)
    r = httpx.post(f"{paced_teacher.http_url}/v1/score", json={"sequences": [{"token_ids": [1] * 100}] * 3},
                   headers={"authorization": f"Bearer {small.api_key}"})
    assert r.status_code == 422 and "quota" in r.json()["error"]["reason"]   # can never fit: not a 429
    with TeacherClient(paced_teacher.grpc_url, api_key=other.api_key) as c:
        assert c.score([[1] * 100] * 5).usage.scored_tokens == 495
    r = httpx.get(f"{paced_teacher.http_url}/metrics").text
    assert f'opd_rejections_total{{experiment="{small.experiment}",reason="quota"}}' in r

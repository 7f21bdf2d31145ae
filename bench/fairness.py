"""Fair share across experiments (issue 4), through the real service, in one run.

    .venv/bin/python bench/fairness.py          # ~1.5 min on a 2-core CPU machine

Experiments A (weight 1) and B (weight 3) saturate the teacher (each keeps several requests
in flight); their scored-token shares should be 1:3 within +-10%. A third, light experiment C
sends one sequence at a time; its p99 latency under that load is compared with its p99 alone.
The teacher runs as its own process (`opd serve`) on BENCH_MODEL with the registry in an
embedded Valkey; experiments are created through the registry, as an operator would.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import numpy as np

from opd_client import AsyncTeacherClient
from opd_client.queue.connection import connect
from opd_services.modeling.checkpoints import BENCH_MODEL, cached_random_llama
from opd_services.redis_embed import EmbeddedRedis
from opd_services.teacher.process import TeacherProcess
from opd_services.tenancy.registry import Registry


CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache/opd"))
HEAVY_REQ = [[7] * 256] * 4          # 4 x 256 tokens per heavy request
LIGHT_REQ = [[5] * 256]              # 1 x 256 tokens per light request


async def heavy(url: str, key: str, stop_at: float, count_from: float, streams: int) -> int:
    total = 0

    async def loop(c):
        nonlocal total
        while time.monotonic() < stop_at:
            out = await c.score(HEAVY_REQ)
            if count_from < time.monotonic() <= stop_at:       # what drains after the stop does not count
                total += out.usage.scored_tokens
    clients = [AsyncTeacherClient(url, api_key=key) for _ in range(streams)]
    await asyncio.gather(*(loop(c) for c in clients))
    await asyncio.gather(*(c.close() for c in clients))
    return total


async def light(url: str, key: str, n: int, gap_s: float, start_after: float = 0.0) -> list[float]:
    await asyncio.sleep(start_after)
    lat = []
    async with AsyncTeacherClient(url, api_key=key) as c:
        await c.score(LIGHT_REQ)                                   # connect
        for _ in range(n):
            t0 = time.perf_counter()
            await c.score(LIGHT_REQ)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(gap_s)
    return lat


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40, help="length of the saturated phase")
    ap.add_argument("--batch-tokens", type=int, default=256, help="OPD_MAX_BATCH_TOKENS of the teacher (bounds how long a light request waits behind a batch)")
    ap.add_argument("--streams", type=int, default=6, help="requests in flight per heavy experiment")
    args = ap.parse_args()
    model = str(cached_random_llama(CACHE, BENCH_MODEL, prefix="bench"))
    with EmbeddedRedis() as redis_server:
        reg = Registry(connect(redis_server.url))
        a, b, c = (reg.create(n, weight=w) for n, w in (("heavy-a", 1), ("heavy-b", 3), ("light-c", 1)))
        env = dict(OPD_MODEL=model, OPD_REDIS_URL=redis_server.url, OPD_MAX_BATCH_TOKENS=str(args.batch_tokens))
        with TeacherProcess(**env) as t:
            alone = asyncio.run(light(t.grpc_url, c.api_key, 30, 0.05))

            async def loaded():
                t0 = time.monotonic()
                stop, count_from = t0 + args.seconds, t0 + 3
                return await asyncio.gather(
                    heavy(t.grpc_url, a.api_key, stop, count_from, args.streams),
                    heavy(t.grpc_url, b.api_key, stop, count_from, args.streams),
                    light(t.grpc_url, c.api_key, 30, 0.3, start_after=3))
            ta, tb, under = asyncio.run(loaded())
    share_b = tb / (ta + tb)
    print(f"teacher: BENCH_MODEL, OPD_MAX_BATCH_TOKENS={args.batch_tokens}; heavy requests 4 x 256, light 1 x 256")
    print(f"A (weight 1) {ta:,} tokens, B (weight 3) {tb:,} tokens over {args.seconds - 3:.0f}s of saturation")
    print(f"{'share of B (target 0.75 +- 0.075)':<52} {share_b:8.3f}  {'PASS' if abs(share_b - 0.75) <= 0.075 else 'MISS'}")
    print(f"{'B:A token ratio (target 3.0)':<52} {tb / max(ta, 1):8.3f}")
    ratio = p99(under) / p99(alone)
    print(f"light C p99 latency: alone {p99(alone) * 1000:,.0f} ms, under load {p99(under) * 1000:,.0f} ms "
          f"(median {np.median(alone) * 1000:,.0f} / {np.median(under) * 1000:,.0f} ms)")
    print(f"{'light C p99 under load / alone (target <= 2)':<52} {ratio:8.3f}  {'PASS' if ratio <= 2 else 'MISS'}")


if __name__ == "__main__":
    main()

"""The dynamic batcher on a recording engine: budget, length grouping, fairness of order, failures."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from opd_services.teacher.batcher import Batcher
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.uniform_engine import UniformEngine


class Recording(UniformEngine):
    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None):
        super().__init__(vocab_size=50, max_model_len=4096)
        self.batches: list[list[int]] = []
        self.gate, self.fail_on = gate, fail_on

    def score(self, items):
        if self.gate:
            self.gate.wait(5)
        self.batches.append([it.n_tokens for it in items])
        if self.fail_on is not None and self.fail_on in [it.n_tokens for it in items]:
            raise RuntimeError("engine blew up")
        return super().score(items)


def item(n: int) -> ScoreItem:
    return ScoreItem(np.arange(n, dtype=np.int64) % 50, 1)


async def run(batcher: Batcher, lengths: list[int], gate: threading.Event | None = None):
    first = asyncio.ensure_future(batcher.submit([item(7)]))       # occupies the engine
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit([item(n)])) for n in lengths]
    await asyncio.sleep(0.05)
    if gate:
        gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


async def test_batches_respect_budget_and_group_by_length():
    gate = threading.Event()
    eng = Recording(gate)
    b = Batcher(eng, max_batch_tokens=400, batch_wait_ms=0)
    b.start()
    lengths = [100, 10, 98, 12, 97, 11, 99, 9]
    out = await run(b, lengths, gate)
    b.stop()
    assert all(not isinstance(o, Exception) for o in out)
    assert eng.batches[0] == [7]
    for batch in eng.batches[1:]:
        assert len(batch) * max(batch) <= 400
    # the long ones travel together and the short ones together
    flat = [sorted(x) for x in eng.batches[1:]]
    assert [97, 98, 99, 100] in flat and [9, 10, 11, 12] in flat


async def test_batching_off_scores_one_sequence_at_a_time():
    gate = threading.Event()
    eng = Recording(gate)
    b = Batcher(eng, max_batch_tokens=10_000, batching=False)
    b.start()
    out = await run(b, [5, 6, 7, 8], gate)
    b.stop()
    assert all(len(x) == 1 for x in eng.batches)
    assert sorted(n for batch in eng.batches for n in batch) == [5, 6, 7, 7, 8]     # each scored once
    # every request got its own sequence's answer back: n - 1 scored positions, each -log 50
    assert [o[0].logprobs_T.shape[0] if not isinstance(o, Exception) else o for o in out] == [6, 4, 5, 6, 7]
    assert all(np.allclose(o[0].logprobs_T, -np.log(50)) for o in out)


async def test_engine_failure_fails_that_batch_only():
    gate = threading.Event()
    eng = Recording(gate, fail_on=13)
    b = Batcher(eng, max_batch_tokens=20, batch_wait_ms=0)     # 13 cannot share a batch with 19
    b.start()
    out = await run(b, [13, 19], gate)
    assert isinstance(out[1], RuntimeError)
    assert not isinstance(out[2], Exception)
    again = await b.submit([item(5)])                           # the loop keeps going
    b.stop()
    assert again[0].logprobs_T.shape == (4,)


async def test_results_come_back_in_request_order():
    b = Batcher(UniformEngine(vocab_size=50), max_batch_tokens=1000)
    b.start()
    res = await b.submit([item(n) for n in (30, 3, 17)])
    b.stop()
    assert [r.logprobs_T.shape[0] for r in res] == [29, 2, 16]


async def test_stopped_batcher_refuses_new_work():
    from opd_services.errors import Unavailable
    b = Batcher(UniformEngine(vocab_size=50))
    b.start()
    b.stop()
    with pytest.raises(Unavailable):
        await b.submit([item(3)])


class ByExperiment(UniformEngine):
    """Records which experiment each scored sequence came from (encoded in its first token)."""

    def __init__(self, gate: threading.Event):
        super().__init__(vocab_size=50, max_model_len=4096)
        self.gate, self.served = gate, []

    def score(self, items):
        self.gate.wait(5)
        time.sleep(0.005)
        self.served.append([int(it.token_ids[0]) for it in items])
        return super().score(items)


def tagged(exp: int, n: int = 20) -> ScoreItem:
    return ScoreItem(np.full(n, exp, dtype=np.int64), 1)


async def test_weighted_fair_share_on_tokens():
    """Weights 1 and 3, both backlogged: tokens served converge to 1:3, and a light
    experiment arriving later is served in the very next batch."""
    gate = threading.Event()
    eng = ByExperiment(gate)
    b = Batcher(eng, max_batch_tokens=200, batch_wait_ms=0)     # 10 sequences of 20 per batch
    b.start()
    blocker = asyncio.ensure_future(b.submit([tagged(9)], "blocker"))
    await asyncio.sleep(0.05)
    heavy1 = [asyncio.ensure_future(b.submit([tagged(1)], "a", weight=1.0)) for _ in range(200)]
    heavy3 = [asyncio.ensure_future(b.submit([tagged(3)], "b", weight=3.0)) for _ in range(200)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.sleep(0.05)
    arrived_at = len(eng.served)
    light = asyncio.ensure_future(b.submit([tagged(7)], "light"))
    await asyncio.gather(blocker, light, *heavy1, *heavy3)
    b.stop()
    served = [x for batch in eng.served[1:] for x in batch]
    first = served[20:180]                  # steady state, both backlogged (after the idle credits)
    share_a, share_b = first.count(1), first.count(3)
    assert abs(share_b / share_a - 3.0) < 0.3, (share_a, share_b)
    light_batch = next(i for i, batch in enumerate(eng.served) if 7 in batch)
    assert arrived_at < 30 and light_batch <= arrived_at + 2, (arrived_at, light_batch)


async def test_sequences_of_one_prompt_go_into_one_batch():
    """One sequence per request, groups interleaved: the batcher puts each prompt's group
    together (the engine then computes the prompt once) rather than the nearest lengths."""
    gate = threading.Event()
    eng = Recording(gate)
    seen: list[list[int]] = []
    score = eng.score
    eng.score = lambda items: (seen.append([int(it.token_ids[0]) for it in items]), score(items))[1]
    b = Batcher(eng, max_batch_tokens=4 * 48, batch_wait_ms=0)   # a group (longest 47) fills a batch
    b.start()
    first = asyncio.ensure_future(b.submit([item(7)]))
    await asyncio.sleep(0.05)
    rest = []
    for j in range(4):                            # 4 members each of prompts 10, 20, 30, 40; lengths mixed
        for p in (10, 20, 30, 40):
            ids = np.concatenate([np.full(20, p), np.arange(12 + 5 * ((j + p // 10) % 4))]) % 50
            rest.append(asyncio.ensure_future(b.submit([ScoreItem(ids.astype(np.int64), 20)])))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, *rest)
    b.stop()
    assert sorted(map(sorted, seen[1:])) == [[10] * 4, [20] * 4, [30] * 4, [40] * 4]

"""The batcher's edges: prompt groups whatever the sign of their hash, an engine answering the
wrong number of sequences, and the fair-share tags a cancelled request gives back."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest

from opd_services.errors import InternalError
from opd_services.teacher import batcher as batcher_mod
from opd_services.teacher.batcher import Batcher
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.uniform_engine import UniformEngine


class Gated(UniformEngine):
    """Waits for `gate` before each batch; records each batch's first tokens (a sequence's tag)."""

    def __init__(self, gate: threading.Event, drop_last: bool = False):
        super().__init__(vocab_size=50, max_model_len=4096)
        self.gate, self.drop_last, self.served = gate, drop_last, []

    def score(self, items):
        self.gate.wait(5)
        self.served.append([int(it.token_ids[0]) for it in items])
        out = super().score(items)
        return out[:-1] if self.drop_last and len(items) > 1 else out


def tagged(tag: int, n: int = 20) -> ScoreItem:
    return ScoreItem(np.full(n, tag, dtype=np.int64), 1)


async def test_prompts_with_negative_hashes_are_grouped(monkeypatch):
    """About half of real prompts hash below zero; their groups must travel whole too. Four
    prompts of 3 sequences, queued interleaved, all one length; a batch holds two groups: after
    the anchor's group, the fill takes one whole other group, not the next three in the queue."""
    real = batcher_mod._prompt_key
    monkeypatch.setattr(batcher_mod, "_prompt_key", lambda it: -abs(real(it)) - 2 if real(it) else 0)
    gate = threading.Event()
    eng = Gated(gate)
    b = Batcher(eng, max_batch_tokens=6 * 30, batch_wait_ms=0)
    b.start()
    first = asyncio.ensure_future(b.submit([tagged(7, 7)]))
    await asyncio.sleep(0.05)
    rest = []
    for _ in range(3):
        for prompt in (10, 20, 30, 40):
            ids = np.concatenate([np.full(20, prompt), np.arange(10)]).astype(np.int64)
            rest.append(asyncio.ensure_future(b.submit([ScoreItem(ids, 20)])))
    await asyncio.sleep(0.05)
    assert all(p.prompt < 0 for p in b._pending)
    gate.set()
    await asyncio.gather(first, *rest)
    b.stop()
    for batch in eng.served[1:]:                  # each prompt's 3 sequences in one batch
        assert all(batch.count(prompt) in (0, 3) for prompt in (10, 20, 30, 40)), eng.served


async def test_engine_returning_fewer_results_fails_the_batch_loudly():
    gate = threading.Event()
    gate.set()
    b = Batcher(Gated(gate, drop_last=True), max_batch_tokens=1000, batch_wait_ms=0)
    b.start()
    with pytest.raises(InternalError, match="returned 2 results for a batch of 3"):
        await asyncio.wait_for(b.submit([tagged(1), tagged(2), tagged(3)]), 5)   # never hangs
    again = await asyncio.wait_for(b.submit([tagged(4)]), 5)                    # the loop goes on
    b.stop()
    assert again[0].logprobs_T.shape == (19,)


async def test_cancelled_request_gives_its_fair_share_tags_back():
    """Experiment a queues 10 sequences, then one more, and gives up on the 10: the one left is
    served as if the 10 had never been queued, next to b's first, not behind b's backlog."""
    gate = threading.Event()
    eng = Gated(gate)
    b = Batcher(eng, max_batch_tokens=20, batch_wait_ms=0)       # one sequence of 20 per batch
    b.start()
    blocker = asyncio.ensure_future(b.submit([tagged(9)], "blocker"))
    await asyncio.sleep(0.05)
    given_up = asyncio.ensure_future(b.submit([tagged(1) for _ in range(10)], "a"))
    backlog = asyncio.ensure_future(b.submit([tagged(2) for _ in range(10)], "b"))
    await asyncio.sleep(0)
    left = asyncio.ensure_future(b.submit([tagged(3)], "a"))
    await asyncio.sleep(0.05)
    given_up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await given_up
    # the cancelled ones left the queue; the one left took the first one's place (tags -20..0)
    assert [(p.start, p.finish) for p in b._pending if p.experiment == "a"] == [(-20.0, 0.0)]
    assert b._last_finish["a"] == 0.0
    gate.set()
    await asyncio.gather(blocker, backlog, left)
    b.stop()
    served = [x for batch in eng.served[1:] for x in batch]
    assert 1 not in served
    assert served.index(3) <= 1, served


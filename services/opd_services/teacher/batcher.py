"""Dynamic batcher: merges concurrent requests' sequences into engine batches.

Requests arrive on the asyncio loop (HTTP and gRPC handlers); one engine thread takes
batches and runs the engine; results go back to the loop with call_soon_threadsafe.
Network I/O never runs on the engine thread and the engine never runs on the loop.

Whole-request jobs (generation: `call`) run on the same engine thread between batches,
first come first served, so the engine is never used from two threads.

Batch selection: the oldest waiting sequence anchors the batch (no starvation); the rest
is filled with the sequences closest to it in length while the padded token count
(sequences x longest) stays within the budget, which keeps padding low.
This module does not validate, authenticate or encode anything.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from opd_services import metrics
from opd_services.errors import Unavailable
from opd_services.teacher.engine import Engine, ItemScores, ScoreItem

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    item: ScoreItem
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    experiment: str
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Job:
    fn: Callable[[Engine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    experiment: str
    n_tokens: int


class Batcher:
    def __init__(self, engine: Engine, *, max_batch_tokens: int = 16_384, batch_wait_ms: float = 2.0,
                 batching: bool = True):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_ms / 1000
        self.batching = batching
        self._pending: list[_Pending] = []
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="opd-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def submit(self, items: list[ScoreItem], experiment: str = "default") -> list[ItemScores]:
        loop = asyncio.get_running_loop()
        entries = [_Pending(it, loop.create_future(), loop, experiment) for it in items]
        tokens = sum(it.n_tokens for it in items)
        with self._cond:
            if self._stopping:
                raise Unavailable("the teacher is shutting down; retry on another replica")
            self._pending.extend(entries)
            metrics.QUEUED_SEQUENCES.set(len(self._pending))
            self._cond.notify()
        metrics.INFLIGHT_TOKENS.inc(tokens)
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        finally:
            metrics.INFLIGHT_TOKENS.dec(tokens)

    async def call(self, fn: Callable[[Engine], Any], n_tokens: int, experiment: str = "default") -> Any:
        """Run fn(engine) on the engine thread (between batches) and return its result."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop, experiment, n_tokens)
        with self._cond:
            if self._stopping:
                raise Unavailable("the teacher is shutting down; retry on another replica")
            self._jobs.append(job)
            self._cond.notify()
        metrics.INFLIGHT_TOKENS.inc(n_tokens)
        try:
            return await job.future
        finally:
            metrics.INFLIGHT_TOKENS.dec(n_tokens)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._jobs and not self._busy

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (up to `timeout`), then stop the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            for p in [*self._pending, *self._jobs]:
                p.loop.call_soon_threadsafe(_fail, p.future, Unavailable("the teacher shut down before scoring this"))
            self._pending.clear()
            self._jobs.clear()

    # ---- engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # 1) take a batch
            batch = self._take()
            if batch is None:
                return
            if isinstance(batch, _Job):
                self._run_job(batch)
                continue
            # 2) score it
            t0 = time.perf_counter()
            try:
                results = self.engine.score([p.item for p in batch])
            except Exception as e:  # an engine failure fails this batch only; the loop goes on
                log.exception("engine failed on a batch of %d sequences", len(batch))
                for p in batch:
                    p.loop.call_soon_threadsafe(_fail, p.future, e)
                results = None
            finally:
                with self._cond:
                    self._busy = 0
            elapsed = time.perf_counter() - t0
            # 3) hand results back to the loop, account the engine time by tokens
            if results is not None:
                for p, r in zip(batch, results):
                    p.loop.call_soon_threadsafe(_resolve, p.future, r)
            self._account(batch, elapsed)

    def _run_job(self, job: _Job) -> None:
        t0 = time.perf_counter()
        try:
            result = job.fn(self.engine)
        except Exception as e:  # a failed job fails its own request only
            log.exception("engine failed on a job")
            job.loop.call_soon_threadsafe(_fail, job.future, e)
        else:
            job.loop.call_soon_threadsafe(_resolve, job.future, result)
        finally:
            with self._cond:
                self._busy = 0
        elapsed = time.perf_counter() - t0
        metrics.FORWARD_SECONDS.observe(elapsed)
        metrics.TEACHER_SECONDS.labels(job.experiment).inc(elapsed)

    def _take(self) -> list[_Pending] | _Job | None:
        with self._cond:
            while not self._pending and not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            if self._jobs:
                self._busy = 1
                return self._jobs.pop(0)
            if self.batching and self.batch_wait_s and not self._stopping:
                deadline = self._pending[0].enqueued_at + self.batch_wait_s
                while self._tokens_waiting() < self.max_batch_tokens and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
            batch = self._select()
            self._busy = len(batch)
            metrics.QUEUED_SEQUENCES.set(len(self._pending))
            return batch

    def _tokens_waiting(self) -> int:
        return sum(p.item.n_tokens for p in self._pending)

    def _select(self) -> list[_Pending]:
        anchor = self._pending[0]
        chosen = [0]
        if self.batching:
            longest = anchor.item.n_tokens
            by_len = sorted(range(1, len(self._pending)),
                            key=lambda i: abs(self._pending[i].item.n_tokens - anchor.item.n_tokens))
            for i in by_len:
                n = self._pending[i].item.n_tokens
                if (len(chosen) + 1) * max(longest, n) <= self.max_batch_tokens:
                    chosen.append(i)
                    longest = max(longest, n)
        picked = set(chosen)
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [p for i, p in enumerate(self._pending) if i not in picked]
        return batch

    def _account(self, batch: list[_Pending], elapsed: float) -> None:
        lens = [p.item.n_tokens for p in batch]
        padded = len(lens) * max(lens)
        metrics.FORWARD_SECONDS.observe(elapsed)
        metrics.BATCH_SEQUENCES.observe(len(batch))
        metrics.BATCH_TOKENS.observe(padded)
        metrics.BATCH_PADDING.observe(1 - sum(lens) / padded)
        real = sum(lens)
        for p in batch:
            metrics.TEACHER_SECONDS.labels(p.experiment).inc(elapsed * p.item.n_tokens / real)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)

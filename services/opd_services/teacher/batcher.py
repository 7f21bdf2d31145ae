"""Dynamic batcher: merges concurrent requests' sequences into engine batches.

Requests arrive on the asyncio loop (HTTP and gRPC handlers); one engine thread takes
batches and runs the engine; results go back to the loop with call_soon_threadsafe.
Network I/O never runs on the engine thread and the engine never runs on the loop.
Whole-request jobs (generation: `call`) run on the same engine thread between batches,
first come first served, so the engine is never used from two threads.

Batch selection is weighted fair queuing on tokens (start-time fair queuing): each sequence
gets a virtual finish tag, start + tokens / weight of its experiment, where start is the later
of the virtual clock and the experiment's previous tag. The sequence with the smallest tag
anchors the batch; the rest is filled, among sequences whose tags lie within a few batches'
worth of virtual time of the anchor, first those with the anchor's prompt (tokens before
score_from: the engine then computes it once), then whole groups of one prompt, nearest in
length first, while the padded token count (sequences x longest) stays within the budget. An experiment that was idle gets a credit
of its first sequence's virtual length (`_idle_credit`). So every experiment's share of teacher tokens
converges to its weight, a light experiment's next sequences go into the next batch instead of
waiting behind a heavy one's backlog, and padding stays low. With one experiment this is FIFO
with length grouping. Batches are not preempted: a sequence can still wait for the batch in
progress, so OPD_MAX_BATCH_TOKENS bounds the latency others add to a light experiment.
A request whose caller gives up (its task is cancelled: gRPC deadline, HTTP disconnect) flags
its queued sequences and jobs; flagged ones never reach the engine (a batch already running
finishes), and the experiment's later sequences get back the virtual time the cancelled ones held.
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
from opd_services.errors import InternalError, Unavailable
from opd_services.memory import give_back_free_memory
from opd_services.teacher.engines.base import MIN_SHARED_PREFIX, Engine, ItemScores, ScoreItem

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    item: ScoreItem
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    experiment: str
    start: float                 # virtual start tag
    finish: float                # virtual finish tag: start + tokens / weight
    weight: float
    prompt: int = 0              # hash of token_ids[:score_from] (0: too short to share): a group shares it
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False      # the caller gave up: dropped when the next batch is formed


@dataclass(slots=True)
class _Job:
    fn: Callable[[Engine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    experiment: str
    n_tokens: int
    cancelled: bool = False
    kind: str = "generate"         # the engine-seconds label: what the job spends its time on


WINDOW_BATCHES = 4   # how far past the anchor's tag (in batches of virtual time) fill may reach


class Batcher:
    def __init__(self, engine: Engine, *, max_batch_tokens: int = 16_384, batch_wait_ms: float = 5.0,
                 batching: bool = True, on_engine_time: Callable[[str, float], None] | None = None):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        metrics.CANCELLED.labels("default")     # exported (at 0) from start-up, before any cancellation
        self.batch_wait_s = batch_wait_ms / 1000
        self.batching = batching
        self.on_engine_time = on_engine_time     # (experiment, seconds): called on the engine thread
        self._pending: list[_Pending] = []
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._vtime = 0.0
        self._last_finish: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="opd-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def submit(self, items: list[ScoreItem], experiment: str = "default",
                     weight: float = 1.0) -> list[ItemScores]:
        loop = asyncio.get_running_loop()
        tokens = sum(it.n_tokens for it in items)
        with self._cond:
            if self._stopping:
                raise Unavailable("the teacher is shutting down; retry on another replica")
            entries = []
            floor = self._vtime - self._idle_credit(items[0], weight) if items else self._vtime
            for it in items:
                start = max(floor, self._last_finish.get(experiment, floor))
                finish = start + it.n_tokens / weight
                self._last_finish[experiment] = finish
                entries.append(_Pending(it, loop.create_future(), loop, experiment, start, finish, weight,
                                        _prompt_key(it)))
            self._pending.extend(entries)
            metrics.QUEUED_SEQUENCES.set(len(self._pending))
            self._cond.notify()
        metrics.INFLIGHT_TOKENS.inc(tokens)
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        except asyncio.CancelledError:
            self._cancel(entries, experiment)
            raise
        finally:
            metrics.INFLIGHT_TOKENS.dec(tokens)

    async def call(self, fn: Callable[[Engine], Any], n_tokens: int, experiment: str = "default",
                   kind: str = "generate") -> Any:
        """Run fn(engine) on the engine thread (between batches) and return its result."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop, experiment, n_tokens, kind=kind)
        with self._cond:
            if self._stopping:
                raise Unavailable("the teacher is shutting down; retry on another replica")
            self._jobs.append(job)
            self._cond.notify()
        metrics.INFLIGHT_TOKENS.inc(n_tokens)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._cancel([job], experiment)
            raise
        finally:
            metrics.INFLIGHT_TOKENS.dec(n_tokens)

    def _cancel(self, entries: list, experiment: str) -> None:
        """The caller gave up: flag what is still queued and hand its virtual time back to the
        experiment (`_roll_back`); count the request if anything was still queued."""
        with self._cond:
            queued = {id(x) for x in (*self._pending, *self._jobs)}
            left = [e for e in entries if id(e) in queued]
            for e in left:
                e.cancelled = True
            if any(isinstance(e, _Pending) for e in left):
                self._roll_back(experiment)
        if left:
            metrics.CANCELLED.labels(experiment).inc()

    def _roll_back(self, experiment: str) -> None:
        """Re-tag the experiment's queued sequences as if its cancelled ones had never been queued
        (lock held), so work nobody waits for does not push its later work back. Its tags form a
        chain (each sequence starts where the previous one finished); walking it, a cancelled
        sequence frees its place and those chained after it move up. A gap in the chain (the
        experiment was idle, or a sequence there already went to the engine) ends the move: what
        follows a gap did not queue behind the cancelled work. Cancelled sequences leave the queue."""
        mine = sorted((p for p in self._pending if p.experiment == experiment), key=lambda p: p.start)
        was = end = None      # the previous sequence's finish tag before / after re-tagging
        for p in mine:
            chained = was is not None and p.start <= was
            was = p.finish
            if not chained:
                end = p.start
            if p.cancelled:
                continue
            p.start, p.finish = end, end + (p.finish - p.start)
            end = p.finish
        if was is not None and self._last_finish.get(experiment) == was:    # the chain ends in the queue
            self._last_finish[experiment] = end
        self._pending = [p for p in self._pending if not p.cancelled]
        metrics.QUEUED_SEQUENCES.set(len(self._pending))

    def _idle_credit(self, first: ScoreItem, weight: float) -> float:
        """An experiment that was idle starts early by its first sequence's own virtual length
        (at most one batch), so that sequence goes into the next batch instead of queueing
        behind the heads of busy experiments' backlogs. Never for a backlogged experiment (its
        own last tag is later), so long-run shares still follow the weights."""
        return min(first.n_tokens, self.max_batch_tokens) / weight

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
            if not batch:
                continue
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
            # 3) account the engine time by tokens, then hand results back to the loop (in this
            # order, so a caller that has its answer also sees its engine seconds in the metrics)
            self._account(batch, elapsed)
            if results is not None:
                self._hand_back(batch, results)
            give_back_free_memory()        # at most once a minute (opd_services/memory.py)

    def _hand_back(self, batch: list[_Pending], results: list[ItemScores]) -> None:
        """Each sequence's result to its caller. An engine that answered a different number of
        sequences than it was given broke its contract: which result belongs to which sequence is
        unknown, so the whole batch fails (InternalError) rather than leaving callers waiting."""
        if len(results) != len(batch):
            log.error("engine returned %d results for a batch of %d sequences", len(results), len(batch))
            err = InternalError(f"the engine returned {len(results)} results for a batch of {len(batch)} "
                                "sequences; this is a bug in the engine, not in the request: report it")
            for p in batch:
                p.loop.call_soon_threadsafe(_fail, p.future, err)
            return
        for p, r in zip(batch, results):
            p.loop.call_soon_threadsafe(_resolve, p.future, r)

    def _run_job(self, job: _Job) -> None:
        t0 = time.perf_counter()
        try:
            answer = (_resolve, job.fn(self.engine))
        except Exception as e:  # a failed job fails its own request only
            log.exception("engine failed on a job")
            answer = (_fail, e)
        finally:
            with self._cond:
                self._busy = 0
        elapsed = time.perf_counter() - t0
        metrics.FORWARD_SECONDS.observe(elapsed)
        metrics.TEACHER_SECONDS.labels(job.experiment).inc(elapsed)
        metrics.TEACHER_ENGINE_SECONDS.labels(job.experiment, job.kind).inc(elapsed)
        if self.on_engine_time:
            self.on_engine_time(job.experiment, elapsed)
        job.loop.call_soon_threadsafe(answer[0], job.future, answer[1])     # after the accounting, as above

    def _take(self) -> list[_Pending] | _Job | None:
        """The next batch or job; None when stopping; [] when every waiting caller gave up."""
        with self._cond:
            while not self._drop_cancelled():
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
            if not self._drop_cancelled() or not self._pending:   # all gave up during the wait
                return []
            batch = self._select()
            self._busy = len(batch)
            metrics.QUEUED_SEQUENCES.set(len(self._pending))
            return batch

    def _drop_cancelled(self) -> bool:
        """Forget work whose caller gave up; True when something is left to run (lock held)."""
        self._pending = [p for p in self._pending if not p.cancelled]
        self._jobs = [j for j in self._jobs if not j.cancelled]
        return bool(self._pending or self._jobs)

    def _tokens_waiting(self) -> int:
        return sum(p.item.n_tokens for p in self._pending)

    def _select(self) -> list[_Pending]:
        pending = self._pending
        a = min(range(len(pending)), key=lambda i: pending[i].finish)
        anchor, chosen = pending[a], [a]
        if self.batching:
            weights = {p.experiment: p.weight for p in pending}
            horizon = anchor.finish + WINDOW_BATCHES * self.max_batch_tokens / sum(weights.values())
            longest = anchor.item.n_tokens
            for i in self._fill_order(a, horizon):
                n = pending[i].item.n_tokens
                if (len(chosen) + 1) * max(longest, n) <= self.max_batch_tokens:
                    chosen.append(i)
                    longest = max(longest, n)
        picked = set(chosen)
        batch = [pending[i] for i in sorted(chosen)]
        self._pending = [p for i, p in enumerate(pending) if i not in picked]
        # the virtual clock follows service; forget experiments that fell behind it
        self._vtime = max(self._vtime, max(p.start for p in batch))
        self._last_finish = {e: f for e, f in self._last_finish.items() if f > self._vtime}
        return batch

    def _fill_order(self, a: int, horizon: float) -> list[int]:
        """Candidates within the horizon: the anchor's prompt group first, then whole prompt
        groups, each group ranked by its member nearest the anchor in length."""
        pending, anchor = self._pending, self._pending[a]
        n0 = anchor.item.n_tokens
        near = [i for i in range(len(pending)) if i != a and pending[i].finish <= horizon]
        # A group key: ("prompt", hash) for a shared prompt (a hash may be negative), ("own", i) for a
        # prompt too short to share, a group of its own that never matches another's.
        group = {i: ("prompt", pending[i].prompt) if pending[i].prompt else ("own", i) for i in near}
        dist: dict[tuple[str, int], int] = {}
        for i in near:
            d = abs(pending[i].item.n_tokens - n0)
            dist[group[i]] = min(d, dist.get(group[i], d))
        return sorted(near, key=lambda i: (group[i] != ("prompt", anchor.prompt), dist[group[i]],
                                           pending[i].finish if group[i][0] == "own" else 0, group[i],
                                           abs(pending[i].item.n_tokens - n0), pending[i].finish))

    def _account(self, batch: list[_Pending], elapsed: float) -> None:
        lens = [p.item.n_tokens for p in batch]
        padded = len(lens) * max(lens)
        metrics.FORWARD_SECONDS.observe(elapsed)
        metrics.BATCH_SEQUENCES.observe(len(batch))
        metrics.BATCH_TOKENS.observe(padded)
        metrics.BATCH_PADDING.observe(1 - sum(lens) / padded)
        real = sum(lens)
        for p in batch:
            share = elapsed * p.item.n_tokens / real
            metrics.TEACHER_SECONDS.labels(p.experiment).inc(share)
            metrics.TEACHER_ENGINE_SECONDS.labels(p.experiment, "score").inc(share)
            if self.on_engine_time:
                self.on_engine_time(p.experiment, share)


def _prompt_key(item: ScoreItem) -> int:
    """Groups sequences by prompt for the engine's prefix sharing; 0 = too short to share."""
    if item.score_from < MIN_SHARED_PREFIX:
        return 0
    return hash(item.token_ids[:item.score_from].tobytes()) or 1


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)

"""The scorer worker loop: rollouts of every experiment -> teacher -> scored entries.

Each `ScorerLoop` is one consumer of the `scorers` group on every `opd:{EXP}:rollouts`:
  1) take a batch: stale entries reclaimed from dead scorers (XAUTOCLAIM) first, then new
     ones, visiting experiments by weighted fair queuing on tokens (fair.py: the most owed
     first, so a busy experiment cannot starve a quiet one and weights set the shares);
  2) decode; a corrupt payload becomes a dead letter at once;
  3) score through each rollout's teacher (gRPC, opd_client; scoring.py routes by name and
     the client spreads over that teacher's replicas), retrying transient failures with
     backoff for as long as it takes; a rollout the teacher refuses becomes a dead letter;
  4) publish + ack in one atomic step (publish.py), then trim consumed rollouts.
Stopping (`stop` event): the loop finishes the batch in hand if the teacher answers within
the drain timeout (down or merely slow), else releases it (marks it idle so another scorer
reclaims it at once).
This module does not own the process (signals, metrics server, Redis): see `runner`.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from redis.exceptions import RedisError, ResponseError

from opd_client.teachers import Teachers
from opd_client.codec import PayloadError, decode_rollout
from opd_client.queue import keys
from opd_services import metrics
from opd_services.scorer.fair import FairShare
from opd_services.scorer.publish import Outcome, Publisher
from opd_services.scorer.scoring import Item, TeacherDown, score_items

log = logging.getLogger(__name__)
_RELEASED_IDLE_MS = 10 ** 10     # "idle forever": any scorer's next XAUTOCLAIM takes it


class Experiments:
    """Experiments with a rollout stream, found by SCAN (all cluster nodes), and their weights
    and default teachers from the registry (1 and the scorer's default when unregistered),
    refreshed now and then."""

    def __init__(self, redis, refresh_s: float):
        self.redis, self.refresh_s = redis, refresh_s
        self.names: list[str] = []
        self.weights: dict[str, float] = {}
        self.teachers: dict[str, str] = {}
        self._next = 0.0

    def current(self) -> list[str]:
        if time.monotonic() >= self._next:
            found = {keys.experiment_of(k) for k in self.redis.scan_iter(match=keys.ROLLOUTS_MATCH, count=1000)}
            found.discard(None)
            for exp in sorted(found - set(self.names)):
                keys.ensure_group(self.redis, keys.rollouts_key(exp), keys.GROUP_SCORERS)
                log.info("scoring experiment %r", exp)
            self.names = sorted(found)
            records = registry_records(self.redis)
            self.weights = {n: e.weight for n, e in records.items()}
            self.teachers = {n: e.teacher for n, e in records.items() if e.teacher}
            self._next = time.monotonic() + self.refresh_s
        return self.names

    def weight(self, exp: str) -> float:
        return self.weights.get(exp, 1.0)

    def teacher(self, exp: str) -> str:
        """The experiment's default teacher; "" = the scorer's default."""
        return self.teachers.get(exp, "")


def registry_records(redis) -> dict:
    """Registered experiments by name; {} when the registry cannot be read (no tenancy, or a
    scorer whose Redis user may not read it): every experiment then weighs the same and
    uses the scorer's default teacher."""
    from opd_services.tenancy.registry import EXPERIMENTS, Experiment
    try:
        return {e.name: e for e in map(Experiment.from_json, redis.hgetall(EXPERIMENTS).values())}
    except RedisError as e:
        log.debug("experiment records unavailable (%s): equal shares, default teacher", e)
        return {}


class ScorerLoop:
    def __init__(self, redis, teachers: Teachers, consumer: str, experiments: Experiments, *,
                 batch_size: int, block_ms: int, reclaim_idle_s: float, backoff_max_s: float, drain_timeout_s: float,
                 check=None):
        self.redis, self.teachers, self.consumer, self.experiments = redis, teachers, consumer, experiments
        self.check = check            # the replica agreement sampler (agreement.py), or None
        self.batch_size, self.block_ms = batch_size, block_ms
        self.reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self.backoff_max_s, self.drain_timeout_s = backoff_max_s, drain_timeout_s
        self.publisher = Publisher(redis, consumer)
        self.fair = FairShare()
        self._next_reclaim: dict[str, float] = {}
        self._next_trim: dict[str, float] = {}
        self._drain_deadline: float | None = None

    # ---- 1) take a batch ----------------------------------------------------------------

    def _reclaim(self, exp: str) -> list:
        now = time.monotonic()
        if now < self._next_reclaim.get(exp, 0.0):
            return []
        self._next_reclaim[exp] = now + min(1.0, self.reclaim_idle_ms / 2000)
        _cursor, entries, *_ = self.redis.xautoclaim(keys.rollouts_key(exp), keys.GROUP_SCORERS, self.consumer,
                                                     self.reclaim_idle_ms, start_id="0-0", count=self.batch_size)
        entries = [e for e in entries if e and e[1] is not None]
        if entries:
            metrics.QUEUE_RECLAIMED.labels(exp, "rollouts").inc(len(entries))
            log.info("reclaimed %d stale rollout(s) of %r", len(entries), exp)
        return entries

    def take(self) -> tuple[str, list] | None:
        exps = self.experiments.current()
        if not exps:
            time.sleep(self.block_ms / 1000)
            return None
        for exp in exps:
            if entries := self._no_group_safe(exp, self._reclaim, exp):
                return exp, entries
        order = self.fair.order(exps)
        for j, exp in enumerate(order):
            block = self.block_ms if j == len(order) - 1 else None
            got = self._no_group_safe(exp, self.redis.xreadgroup, keys.GROUP_SCORERS, self.consumer,
                                      {keys.rollouts_key(exp): ">"}, count=self.batch_size, block=block)
            if got and got[0][1]:
                return exp, got[0][1]
        return None

    def _no_group_safe(self, exp: str, fn, *args, **kw):
        """Run fn; if the stream or its group vanished (deleted, or Redis restarted without
        persistence), recreate the group and report nothing this turn."""
        try:
            return fn(*args, **kw)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            keys.ensure_group(self.redis, keys.rollouts_key(exp), keys.GROUP_SCORERS)
            return None

    # ---- 2) decode, 3) score ------------------------------------------------------------

    @staticmethod
    def decode(entries: list) -> tuple[list[Item], list[Outcome]]:
        items, dead = [], []
        for entry_id, fields in entries:
            eid, raw = entry_id.decode(), fields.get(keys.FIELD, b"")
            try:
                items.append(Item(eid, raw, decode_rollout(raw)))
            except PayloadError as e:
                dead.append(Outcome(eid, raw, dead_reason=f"corrupt payload: {e.reason}"))
        return items, dead

    def score(self, exp: str, items: list[Item], stop: threading.Event) -> list[Outcome] | None:
        """Outcomes, or None when stopping before the teacher answered (batch released)."""
        attempt, self._drain_deadline = 0, None
        while True:
            try:
                return self._call_teacher(exp, items, stop) if items else []
            except TeacherDown as e:
                metrics.QUEUE_TEACHER_RETRIES.inc()
                wait = max(e.retry_after, random.uniform(0, min(self.backoff_max_s, 0.1 * 2 ** attempt)))
                wait = min(wait, self.reclaim_idle_ms / 2000)   # touch the batch well before it looks stale
                attempt += 1
                log.warning("teacher unavailable (%s); retry %d in %.2fs", e, attempt, wait)
                self._touch(exp, items)
            if self._past_drain(stop):
                return None
            if stop.is_set():
                time.sleep(min(wait, 0.2))     # draining: keep trying until the deadline
            else:
                stop.wait(wait)

    def _past_drain(self, stop: threading.Event) -> bool:
        """Stopping, and the drain timeout (counted from when this loop first saw the stop) is over."""
        if not stop.is_set():
            return False
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
        return time.monotonic() >= self._drain_deadline

    def _call_teacher(self, exp: str, items: list[Item], stop: threading.Event) -> list[Outcome] | None:
        """score_items on a helper thread, so a stop can give up on a teacher slower than the drain:
        None then (the late answer is dropped; the caller releases the batch)."""
        answer: Future[list[Outcome]] = Future()
        default_teacher = self.experiments.teacher(exp)

        def call() -> None:
            try:
                answer.set_result(score_items(self.teachers, items, default_teacher, self.check))
            except BaseException as e:  # raised again in the loop's thread by answer.result()
                answer.set_exception(e)
        threading.Thread(target=call, name=f"{self.consumer}-teacher", daemon=True).start()
        while True:
            try:
                return answer.result(timeout=0.05)
            except FutureTimeout:
                if self._past_drain(stop):
                    return None

    def _touch(self, exp: str, items: list[Item]) -> None:
        try:
            self.publisher.touch(exp, [it.entry_id for it in items])
        except RedisError as e:       # only an optimisation: the publish step checks ownership anyway
            log.debug("could not refresh the batch's idle time: %s", e)

    # ---- 4) publish -----------------------------------------------------------------------

    def publish(self, exp: str, outcomes: list[Outcome]) -> None:
        done = self.publisher.publish(exp, outcomes)
        scored = sum(1 for o, d in zip(outcomes, done) if d and not o.dead)
        metrics.QUEUE_SCORED.labels(exp).inc(scored)
        for o, d in zip(outcomes, done):
            if d and o.dead:
                kind = next((k for k in ("corrupt", "teacher") if o.dead_reason.startswith(k)), "invalid")
                metrics.QUEUE_DEAD.labels(exp, kind).inc()
                log.warning("dead-lettered rollout %s of %r: %s", o.rollout_id or o.entry_id, exp, o.dead_reason)
        if len(done) - sum(done):
            log.info("%d rollout(s) of %r were taken over by another scorer meanwhile; left to it",
                     len(done) - sum(done), exp)
        if time.monotonic() >= self._next_trim.get(exp, 0.0):
            self._next_trim[exp] = time.monotonic() + 1.0
            keys.trim_consumed(self.redis, keys.rollouts_key(exp))

    def release(self, exp: str, entry_ids: list[str]) -> None:
        """Hand a batch back: mark it idle 'forever' so the next XAUTOCLAIM anywhere takes it."""
        if entry_ids:
            self.redis.xclaim(keys.rollouts_key(exp), keys.GROUP_SCORERS, self.consumer, 0, entry_ids,
                              idle=_RELEASED_IDLE_MS, justid=True)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self, stop: threading.Event) -> int:
        """One batch, start to finish; returns how many entries it handled."""
        taken = self.take()
        if taken is None:
            return 0
        exp, entries = taken
        items, dead = self.decode(entries)
        self.fair.charge(exp, sum(len(it.rollout.token_ids) for it in items), self.experiments.weight(exp))
        outcomes = self.score(exp, items, stop)
        if outcomes is None:
            self.release(exp, [e[0].decode() for e in entries])
            log.info("stopping: released %d rollout(s) of %r to other scorers", len(entries), exp)
            return 0
        self.publish(exp, dead + outcomes)
        return len(entries)

    def run(self, stop: threading.Event) -> None:
        backoff = 0.05
        while not stop.is_set():
            try:
                self.step(stop)
                backoff = 0.05
            except RedisError as e:
                log.warning("redis error (%s); retrying in %.2fs", e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            except Exception:  # a bug must not kill the loop: the batch stays pending and is reclaimed
                log.exception("scorer loop error; batch left pending, retrying in %.2fs", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
        log.info("scorer %s stopped", self.consumer)

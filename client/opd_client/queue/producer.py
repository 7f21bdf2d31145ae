"""RolloutProducer: push a student's rollouts onto `opd:{EXP}:rollouts`, sync or asyncio.

    with RolloutProducer("redis://127.0.0.1:6379", "exp1", max_backlog=50_000) as q:
        ids = q.push([Rollout(id="r1", token_ids=ids, score_from=12)])

One push = one pipelined round trip of XADDs. Backpressure: with `max_backlog`, a push
that would take the experiment's backlog (undelivered + pending at the scorers) past the
limit waits up to `block_timeout_s` for room, then raises QueueFull. When push returns,
every rollout is in Redis. When it raises Unavailable (Redis went away mid-push), some of
the rollouts may have been added: pushing them again is safe for the trainer only if it
tolerates a rollout scored twice (the id is kept, so it can drop duplicates).
This module does not score, read or trim anything.
"""
from __future__ import annotations

import asyncio
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from opd_client.codec import encode_rollout
from opd_client.errors import InvalidRequest, QueueFull, Unavailable
from opd_client.queue import keys
from opd_client.queue.connection import aconnect, as_opd_error, connect
from opd_client.types import Rollout

_POLL_S = 0.05


def _encode(rollouts: list[Rollout]) -> list[bytes]:
    out = []
    for i, r in enumerate(rollouts):
        if not isinstance(r, Rollout):
            raise InvalidRequest(f"rollouts[{i}]", f"must be an opd_client.Rollout, got {type(r).__name__}")
        out.append(encode_rollout(r))
    return out


def _lost(url: str, n: int, err: RedisError):
    if not isinstance(err, (RedisConnectionError, RedisTimeoutError)):
        return as_opd_error(url, err, f"push of {n} rollout(s) refused")
    return Unavailable(f"Redis at {url.split('@')[-1]} failed during a push of {n} rollout(s) ({type(err).__name__}: "
                       f"{err}); some may have been added. Retry when Redis is back (duplicates keep their rollout id).")


class _Base:
    def __init__(self, redis_url: str, experiment: str, max_backlog: int | None, block_timeout_s: float):
        self.url = redis_url
        self.experiment = keys.check_experiment(experiment)
        if max_backlog is not None and (not isinstance(max_backlog, int) or max_backlog < 1):
            raise InvalidRequest("max_backlog", f"must be a positive integer or None, got {max_backlog!r}")
        self.max_backlog = max_backlog
        self.block_timeout_s = float(block_timeout_s)
        self.key = keys.rollouts_key(self.experiment)

    def _check_size(self, n: int) -> None:
        if self.max_backlog is not None and n > self.max_backlog:
            raise InvalidRequest("rollouts", f"{n} rollouts in one push exceeds max_backlog={self.max_backlog}; "
                                             "push smaller batches")

    def _full(self, backlog: int, n: int) -> QueueFull:
        return QueueFull(f"experiment {self.experiment!r}: backlog {backlog} + {n} new rollouts exceeds "
                         f"max_backlog={self.max_backlog} (waited {self.block_timeout_s:g}s); slow the sampler "
                         "or add scorers", retry_after=1.0)


class RolloutProducer(_Base):
    """Synchronous producer; one per sampler process (thread-safe via redis-py's pool)."""

    def __init__(self, redis_url: str, experiment: str, max_backlog: int | None = None,
                 block_timeout_s: float = 0.0):
        super().__init__(redis_url, experiment, max_backlog, block_timeout_s)
        try:
            self.redis = connect(redis_url, retries=0)
            keys.ensure_group(self.redis, self.key, keys.GROUP_SCORERS)
        except RedisError as e:
            raise as_opd_error(redis_url, e, f"opening the rollout queue of {experiment!r}") from e

    def backlog(self) -> int:
        return keys.backlog_of(self.redis.xinfo_groups(self.key), self.redis.xlen(self.key))

    def _wait_for_room(self, n: int) -> None:
        deadline = time.monotonic() + self.block_timeout_s
        while (b := self.backlog()) + n > self.max_backlog:
            if time.monotonic() >= deadline:
                raise self._full(b, n)
            time.sleep(_POLL_S)

    def push(self, rollouts: list[Rollout]) -> list[str]:
        """XADD every rollout in one round trip; return the stream entry ids, in order."""
        payloads = _encode(list(rollouts))
        if not payloads:
            return []
        self._check_size(len(payloads))
        try:
            if self.max_backlog is not None:
                self._wait_for_room(len(payloads))
            pipe = self.redis.pipeline(transaction=False)
            for p in payloads:
                pipe.xadd(self.key, {keys.FIELD: p})
            return [i.decode() for i in pipe.execute()]
        except RedisError as e:
            raise _lost(self.url, len(payloads), e) from e

    def close(self) -> None:
        self.redis.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRolloutProducer(_Base):
    """asyncio producer: `q = await AsyncRolloutProducer.create(url, exp)`; `await q.push(...)`."""

    redis = None

    @classmethod
    async def create(cls, redis_url: str, experiment: str, max_backlog: int | None = None,
                     block_timeout_s: float = 0.0) -> "AsyncRolloutProducer":
        self = cls(redis_url, experiment, max_backlog, block_timeout_s)
        try:
            self.redis = await aconnect(redis_url, retries=0)
            try:
                await self.redis.xgroup_create(self.key, keys.GROUP_SCORERS, id="0", mkstream=True)
            except RedisError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        except RedisError as e:
            raise as_opd_error(redis_url, e, f"opening the rollout queue of {experiment!r}") from e
        return self

    async def backlog(self) -> int:
        return keys.backlog_of(await self.redis.xinfo_groups(self.key), await self.redis.xlen(self.key))

    async def push(self, rollouts: list[Rollout]) -> list[str]:
        payloads = _encode(list(rollouts))
        if not payloads:
            return []
        self._check_size(len(payloads))
        try:
            if self.max_backlog is not None:
                deadline = time.monotonic() + self.block_timeout_s
                while (b := await self.backlog()) + len(payloads) > self.max_backlog:
                    if time.monotonic() >= deadline:
                        raise self._full(b, len(payloads))
                    await asyncio.sleep(_POLL_S)
            pipe = self.redis.pipeline(transaction=False)
            for p in payloads:
                pipe.xadd(self.key, {keys.FIELD: p})
            return [i.decode() for i in await pipe.execute()]
        except RedisError as e:
            raise _lost(self.url, len(payloads), e) from e

    async def close(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

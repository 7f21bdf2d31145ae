"""ScoredConsumer: a trainer reads scored rollouts of its experiment, acks them after use.

    with ScoredConsumer(url, "exp1", consumer="trainer-0") as q:
        for entry_id, s in q.read(count=64, block_ms=1000):
            ...                                  # s.teacher_logprobs: float32[T]
        q.ack([entry_id for entry_id, _ in batch])   # after the optimizer step

Delivery is at least once per group: an entry read and not acked stays pending; after
`idle_reclaim_s` any consumer of the group (this one included, after a crash and restart
under a new name) reclaims it with XAUTOCLAIM and gets it again. Acked entries are trimmed
from the stream once every group is past them. A scored entry that cannot be decoded is
moved to `opd:{EXP}:dead` with the reason and acked, never handed out.
This module does not score and does not produce rollouts.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from redis.exceptions import RedisError

from opd_client.codec import PayloadError, decode_scored
from opd_client.errors import InvalidRequest
from opd_client.queue import keys
from opd_client.queue.connection import as_opd_error, connect
from opd_client.types import ScoredRollout

log = logging.getLogger(__name__)


def default_consumer_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def dead_letter(pipe, exp: str, payload: bytes, reason: str, *, stage: str, rollout_id: str = "") -> None:
    """Queue an XADD to `opd:{EXP}:dead` on `pipe`: the raw payload, why, and who refused it."""
    pipe.xadd(keys.dead_key(exp), {b"d": payload or b"", b"reason": reason.encode(), b"stage": stage.encode(),
                                   b"rollout_id": rollout_id.encode(), b"at": repr(time.time()).encode()})


class ScoredConsumer:
    """Reads the `trainers` group of `opd:{EXP}:scored`. Not thread-safe: one per trainer loop."""

    def __init__(self, redis_url: str, experiment: str, consumer: str | None = None, *,
                 idle_reclaim_s: float = 60.0, group: str = keys.GROUP_TRAINERS, trim_every_s: float = 1.0):
        self.experiment = keys.check_experiment(experiment)
        if idle_reclaim_s <= 0:
            raise InvalidRequest("idle_reclaim_s", f"must be > 0 seconds, got {idle_reclaim_s!r}")
        self.url, self.group = redis_url, group
        self.consumer = consumer or default_consumer_name("trainer")
        self.idle_reclaim_ms = int(idle_reclaim_s * 1000)
        self.key = keys.scored_key(self.experiment)
        self.reclaimed = 0          # entries this consumer took over from others (or its former self)
        self._trim_every_s, self._next_trim = trim_every_s, 0.0
        self._claim_every_s, self._next_claim, self._cursor = min(1.0, idle_reclaim_s / 2), 0.0, "0-0"
        try:
            self.redis = connect(redis_url)
            keys.ensure_group(self.redis, self.key, group)
        except RedisError as e:
            raise as_opd_error(redis_url, e, f"opening the scored queue of {experiment!r}") from e

    def _reclaim(self, count: int) -> list:
        now = time.monotonic()
        if now < self._next_claim:
            return []
        cursor, entries, *_ = self.redis.xautoclaim(self.key, self.group, self.consumer, self.idle_reclaim_ms,
                                                    start_id=self._cursor, count=count)
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        if self._cursor == "0-0":   # a full pass over the pending list: rest a while
            self._next_claim = now + self._claim_every_s
        entries = [e for e in entries if e and e[1] is not None]
        self.reclaimed += len(entries)
        return entries

    def read(self, count: int = 64, block_ms: int = 1000) -> list[tuple[str, ScoredRollout]]:
        """Up to `count` scored rollouts: reclaimed stale ones first, then new ones (waiting
        up to `block_ms` when there are none). Returns (entry_id, ScoredRollout) pairs."""
        if count < 1:
            raise InvalidRequest("count", f"must be >= 1, got {count!r}")
        block_ms = min(int(block_ms), 10_000)
        try:
            raw = self._reclaim(count)
            if len(raw) < count:
                got = self.redis.xreadgroup(self.group, self.consumer, {self.key: ">"}, count=count - len(raw),
                                            block=None if raw or block_ms <= 0 else block_ms)
                for _key, entries in got or []:
                    raw.extend(entries)
            return self._decode(raw)
        except RedisError as e:
            raise as_opd_error(self.url, e, "read (nothing is lost: unacked entries stay pending)") from e

    def _decode(self, raw: list) -> list[tuple[str, ScoredRollout]]:
        out, bad = [], []
        for entry_id, fields in raw:
            eid = entry_id.decode()
            payload = fields.get(keys.FIELD, b"")
            try:
                out.append((eid, decode_scored(payload)))
            except PayloadError as e:
                log.error("scored entry %s of %s is corrupt (%s): moved to dead", eid, self.experiment, e)
                bad.append((eid, payload, str(e)))
        if bad:
            pipe = self.redis.pipeline(transaction=True)
            for eid, payload, reason in bad:
                dead_letter(pipe, self.experiment, payload, reason, stage="trainer")
                pipe.xack(self.key, self.group, eid)
            pipe.execute()
        return out

    def ack(self, entry_ids: list[str]) -> int:
        """XACK entries after using them; returns how many were still pending (and are now done)."""
        if not entry_ids:
            return 0
        try:
            n = int(self.redis.xack(self.key, self.group, *entry_ids))
            if time.monotonic() >= self._next_trim:
                self._next_trim = time.monotonic() + self._trim_every_s
                keys.trim_consumed(self.redis, self.key)
            return n
        except RedisError as e:
            raise as_opd_error(self.url, e, "ack (safe to repeat)") from e

    def close(self) -> None:
        self.redis.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

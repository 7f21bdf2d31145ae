"""Malformed and oversized queue payloads, generated: the codec refuses each with a PayloadError
(never another exception), and a running scorer dead-letters every bad entry with a reason,
scores every good one, and leaves nothing pending. Beyond test_scorer's hand-written poison:
byte mutations of valid payloads, every field with a wrong type or size, multi-MB entries."""
from __future__ import annotations

import math
import random
import time

import msgpack
import numpy as np

from opd_client.codec import PayloadError, decode_rollout, decode_scored, encode_rollout
from opd_client.queue import RolloutProducer, keys, rollouts_key
from opd_client.queue.connection import connect
from queue_helpers import dead_entries, drain_scored, make_rollouts, running_scorer

ODD = (None, -1, 0, 2**64 - 1, -2**63, 1.5, math.nan, "x", "", b"", b"\x01\x02\x03", [1, 2], {"a": 1}, True)


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(len(b))
        r = rng.random()
        if r < 0.4:
            b[i] ^= 1 << rng.randrange(8)
        elif r < 0.6:
            del b[i:]
            b = b or bytearray(b"\x80")
        else:
            b[i:i] = rng.randbytes(rng.randrange(1, 9))
    return bytes(b)


def _wrong_field(raw: bytes, rng: random.Random) -> bytes:
    """A well-formed msgpack map with one or more fields replaced by a value of the wrong type or size."""
    d = msgpack.unpackb(raw, raw=False)
    for key in rng.sample(sorted(d), rng.randrange(1, 3)):
        d[key] = rng.choice(ODD) if rng.random() < 0.8 else rng.randbytes(rng.choice((3, 5, 4097)))
    return msgpack.packb(d, use_bin_type=True)


def malformed(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = [encode_rollout(r) for r in make_rollouts(8, length=24, score_from=6, seed=seed)]
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(_mutate(rng.choice(valid), rng) if r < 0.5 else
                   _wrong_field(rng.choice(valid), rng) if r < 0.9 else rng.randbytes(rng.choice((1, 17, 300))))
    return out


def test_codec_refuses_garbage_with_payload_error_only():
    decoded = refused = 0
    for raw in malformed(3000, seed=7):
        for decode in (decode_rollout, decode_scored):
            try:
                decode(raw)
                decoded += 1
            except PayloadError:
                refused += 1
    assert refused > 5000, (decoded, refused)


def test_scorer_dead_letters_every_malformed_or_oversized_entry(redis_url, exp, uniform_teacher):
    good = make_rollouts(40, prefix="good")
    bad = malformed(120, seed=11)
    huge_rollout = make_rollouts(1, length=1_000_000, score_from=1, prefix="huge")[0]   # 4 MB of tokens
    r = connect(redis_url)
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, uniform_teacher.grpc_url):
        q.push(good[:20])
        for raw in bad:
            r.xadd(rollouts_key(exp), {keys.FIELD: raw})
        r.xadd(rollouts_key(exp), {keys.FIELD: np.random.default_rng(0).bytes(8 << 20)})   # 8 MB of garbage
        q.push([huge_rollout] + good[20:])
        got = drain_scored(redis_url, exp, 40, timeout_s=60)
        deadline = time.monotonic() + 30
        while r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        scored_ids = sorted(s.rollout.id for s in got)
        # a mutation may leave a payload valid (then it is scored, e.g. with its metadata changed)
        extra = drain_scored(redis_url, exp, 10_000, timeout_s=1, consumer="t1")
    assert {g.id for g in good} <= set(scored_ids)
    dead = dead_entries(r, exp)
    assert len(got) + len(extra) + len(dead) == len(good) + len(bad) + 2, "an entry was lost or doubled"
    assert all(d["reason"] for d in dead)
    reasons = {d["rollout_id"].decode(): d["reason"].decode() for d in dead if d["rollout_id"]}
    assert "max length" in reasons["huge0"]
    assert r.xpending(rollouts_key(exp), keys.GROUP_SCORERS)["pending"] == 0

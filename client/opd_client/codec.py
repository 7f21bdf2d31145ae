"""Binary codec of the queue's payloads: `Rollout` and `ScoredRollout` <-> bytes.

Format (version 1): one msgpack map. Arrays travel as raw little-endian bytes (int32 token
ids, uint8 loss mask, float32 logprobs), never as lists of numbers. Every payload starts
with its format version "v" and its kind "k" ("rollout" | "scored"); a reader decodes the
versions it knows and refuses any other with a `PayloadError` that says which version it
got, which it reads, and what to upgrade. A version-1 reader ignores map keys it does not
know, so fields can be added without a new version; removing or changing one needs one.
Version 2 adds the rollout's `teacher` ("tch"): a field an old reader must NOT ignore (it
would score the rollout with the wrong teacher), so a rollout naming a teacher is written
as version 2 and an old scorer dead-letters it with "upgrade opd-client" instead. Rollouts
that name no teacher are still written as version 1, so old readers keep working through a
rolling upgrade. A scored payload records who scored it ("tsc"), which old readers may ignore.

This module does no I/O and knows nothing of Redis; `opd_client.queue` moves the bytes.
"""
from __future__ import annotations

import msgpack
import numpy as np

from opd_client.errors import InvalidRequest
from opd_client.types import Rollout, ScoredRollout

VERSION = 2            # the newest this writer writes (only when a field of it is used: see above)
READS = (1, 2)          # versions this reader decodes
_I32, _U8, _F32 = np.dtype("<i4"), np.dtype("u1"), np.dtype("<f4")


class PayloadError(InvalidRequest):
    """A queue payload that cannot be decoded: corrupt, of the wrong kind, or of an unknown version."""

    code = "invalid_argument"

    def __init__(self, reason: str, **kw):
        super().__init__("payload", reason, **kw)


# ---- encode ------------------------------------------------------------------------------

def _rollout_map(r: Rollout) -> dict:
    mask = r.loss_mask
    return {
        "id": r.id, "tok": r.token_ids.astype(_I32, copy=False).tobytes(), "s": r.score_from,
        # all-ones masks (single-turn rollouts, the common case) travel as nil: 1 B/token saved
        "mask": None if mask.all() else mask.astype(_U8, copy=False).tobytes(),
        "blp": r.behaviour_logprobs.astype(_F32, copy=False).tobytes(),
        "pv": r.policy_version, "at": r.sampled_at, "md": r.metadata, "tk": r.top_k,
        **({"tch": r.teacher} if r.teacher else {}),
    }


def _version(r: Rollout) -> int:
    return 2 if r.teacher else 1


def _pack(d: dict) -> bytes:
    try:
        return msgpack.packb(d, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest("metadata", f"must hold msgpack-serialisable values only (str, int, float, "
                                         f"bool, None, bytes, lists and dicts of them): {e}") from None


def encode_rollout(r: Rollout) -> bytes:
    return _pack({"v": _version(r), "k": "rollout", **_rollout_map(r)})


def encode_scored(s: ScoredRollout) -> bytes:
    k = 0 if s.top_ids is None else int(s.top_ids.shape[1])
    return _pack({
        "v": _version(s.rollout), "k": "scored", "r": _rollout_map(s.rollout),
        "tlp": s.teacher_logprobs.astype(_F32, copy=False).tobytes(), "K": k,
        "tid": None if k == 0 else s.top_ids.astype(_I32, copy=False).tobytes(),
        "tlk": None if k == 0 else s.top_logprobs.astype(_F32, copy=False).tobytes(),
        "rev": s.model_revision, "sat": s.scored_at, **({"tsc": s.teacher} if s.teacher else {}),
    })


# ---- decode ------------------------------------------------------------------------------

def _unpack(data: bytes, kind: str) -> dict:
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise PayloadError(f"not a msgpack payload ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or "v" not in d:
        raise PayloadError("not an OPD queue payload: no format version 'v'")
    v = d["v"]
    if v not in READS:
        newer = isinstance(v, int) and v > max(READS)
        fix = "upgrade opd-client on this side" if newer else "re-encode it with a current opd-client"
        raise PayloadError(f"format version {v!r} is {'newer than any' if newer else 'not one'} this reader "
                           f"knows (it reads {list(READS)}); {fix}")
    if d.get("k") != kind:
        raise PayloadError(f"expected a {kind!r} payload, got kind {d.get('k')!r}")
    return d


def _arr(d: dict, key: str, dtype: np.dtype, n: int, name: str) -> np.ndarray:
    b = d.get(key)
    if not isinstance(b, bytes) or len(b) != n * dtype.itemsize:
        got = f"{len(b)} bytes" if isinstance(b, bytes) else type(b).__name__
        raise PayloadError(f"{name}: expected {n} x {dtype.name} ({n * dtype.itemsize} bytes), got {got}")
    return np.frombuffer(b, dtype=dtype).astype(dtype.newbyteorder("="))  # a writable copy


def _rollout_from(d: dict) -> Rollout:
    try:
        tok_b, s = d["tok"], int(d["s"])
        n = len(tok_b) // 4 if isinstance(tok_b, bytes) else -1
        tok = _arr(d, "tok", _I32, n, "token_ids")
        t = n - s
        if not 0 <= s <= n:
            raise PayloadError(f"score_from {s} is outside [0, {n}] for {n} tokens")
        mask = None if d.get("mask") is None else _arr(d, "mask", _U8, t, "loss_mask")
        rid, md, top_k, teacher = d["id"], d.get("md") or {}, int(d.get("tk", 0)), d.get("tch", "")
        if not isinstance(rid, str) or not isinstance(md, dict) or top_k < 0 or not isinstance(teacher, str):
            raise PayloadError(f"bad id {rid!r}, metadata of type {type(md).__name__}, top_k {top_k} "
                               f"or teacher {teacher!r}")
        # every array's dtype and length is checked above: skip Rollout's own checks (hot path)
        return Rollout._trusted(id=rid, token_ids=tok, score_from=s, loss_mask=mask,
                                behaviour_logprobs=_arr(d, "blp", _F32, t, "behaviour_logprobs"),
                                policy_version=int(d.get("pv", 0)), sampled_at=float(d.get("at", 0.0)),
                                metadata=md, top_k=top_k, teacher=teacher)
    except KeyError as e:
        raise PayloadError(f"missing field {e.args[0]!r}") from None
    except PayloadError:
        raise
    except (InvalidRequest, TypeError, ValueError) as e:
        raise PayloadError(f"bad rollout: {e}") from None


def decode_rollout(data: bytes) -> Rollout:
    """Bytes -> Rollout, or PayloadError saying what is wrong with them."""
    return _rollout_from(_unpack(data, "rollout"))


def decode_scored(data: bytes) -> ScoredRollout:
    """Bytes -> ScoredRollout, or PayloadError saying what is wrong with them."""
    d = _unpack(data, "scored")
    if not isinstance(d.get("r"), dict):
        raise PayloadError("missing field 'r' (the rollout)")
    r = _rollout_from(d["r"])
    t = r.n_scored
    try:
        k = int(d.get("K", 0))
        ids = lps = None
        if k:
            ids = _arr(d, "tid", _I32, t * k, "top_ids").reshape(t, k)
            lps = _arr(d, "tlk", _F32, t * k, "top_logprobs").reshape(t, k)
        return ScoredRollout(rollout=r, teacher_logprobs=_arr(d, "tlp", _F32, t, "teacher_logprobs"),
                             top_ids=ids, top_logprobs=lps, model_revision=str(d.get("rev", "")),
                             scored_at=float(d.get("sat", 0.0)), teacher=str(d.get("tsc", "")))
    except PayloadError:
        raise
    except (InvalidRequest, TypeError, ValueError) as e:
        raise PayloadError(f"bad scored rollout: {e}") from None

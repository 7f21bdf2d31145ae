"""The queue codec: round trips, compactness, and clear refusals of bad or unknown payloads."""
from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import orjson
import pytest

from opd_client import codec
from opd_client.codec import PayloadError
from opd_client.errors import InvalidRequest
from opd_client.types import Rollout, ScoredRollout


def _rollout(n=12, s=4, mask=None, **kw) -> Rollout:
    rng = np.random.default_rng(0)
    return Rollout(id="r-1", token_ids=rng.integers(0, 32_000, n), score_from=s, loss_mask=mask,
                   behaviour_logprobs=-rng.random(n - s), policy_version=7, sampled_at=1.5e9,
                   metadata={"task": "add", "turn": [1, 2]}, **kw)


def _scored(k=3) -> ScoredRollout:
    r = _rollout(top_k=k)
    t = r.n_scored
    return ScoredRollout(rollout=r, teacher_logprobs=-np.arange(t, dtype=np.float64) / 3,
                         top_ids=np.arange(t * k).reshape(t, k) if k else None,
                         top_logprobs=-np.ones((t, k)) if k else None, model_revision="sha256:ab", scored_at=2.5)


def _same_rollout(a: Rollout, b: Rollout):
    assert (a.id, a.score_from, a.policy_version, a.sampled_at, a.metadata, a.top_k) == \
           (b.id, b.score_from, b.policy_version, b.sampled_at, b.metadata, b.top_k)
    for f in ("token_ids", "loss_mask", "behaviour_logprobs"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f


def test_rollout_round_trip_keeps_every_field_and_dtype():
    mask = np.array([1, 0, 0, 1, 1, 1, 0, 1])
    r = _rollout(mask=mask)
    back = codec.decode_rollout(codec.encode_rollout(r))
    _same_rollout(r, back)
    assert back.token_ids.dtype == np.int32 and back.loss_mask.dtype == np.uint8
    assert back.behaviour_logprobs.dtype == np.float32 and back.token_ids.flags.writeable


def test_all_ones_mask_round_trips_and_is_not_stored():
    r = _rollout()
    assert r.loss_mask.tolist() == [1] * 8
    data = codec.encode_rollout(r)
    assert msgpack.unpackb(data)["mask"] is None
    _same_rollout(r, codec.decode_rollout(data))


@pytest.mark.parametrize("k", [0, 3])
def test_scored_round_trip(k):
    s = _scored(k)
    back = codec.decode_scored(codec.encode_scored(s))
    _same_rollout(s.rollout, back.rollout)
    assert np.array_equal(back.teacher_logprobs, s.teacher_logprobs) and back.teacher_logprobs.dtype == np.float32
    assert (back.model_revision, back.scored_at) == ("sha256:ab", 2.5)
    if k:
        assert back.top_ids.shape == (8, 3) and back.top_ids.dtype == np.int32
        assert np.array_equal(back.top_ids, s.top_ids) and np.array_equal(back.top_logprobs, s.top_logprobs)
    else:
        assert back.top_ids is None and back.top_logprobs is None


def test_payload_is_compact_binary_not_json_numbers():
    r = _rollout(n=256, s=1)
    s = ScoredRollout(rollout=r, teacher_logprobs=np.zeros(255))
    data = codec.encode_scored(s)
    # 4 B token id + 4 B behaviour + 4 B teacher logprob per token, plus a small header
    assert len(data) < 12 * 256 + 150
    as_json = orjson.dumps({"token_ids": r.token_ids.tolist(), "blp": r.behaviour_logprobs.tolist(),
                            "tlp": s.teacher_logprobs.tolist()})
    assert len(as_json) > 2 * len(data)


@pytest.mark.parametrize("version,words", [(3, "newer than any"), (99, "upgrade opd-client"),
                                           (0, "re-encode"), ("1", "not one")])
def test_unknown_versions_are_refused_clearly(version, words):
    d = msgpack.unpackb(codec.encode_rollout(_rollout()))
    d["v"] = version
    with pytest.raises(PayloadError, match=words) as e:
        codec.decode_rollout(msgpack.packb(d))
    assert e.value.field == "payload" and isinstance(e.value, ValueError)


def test_v1_reader_ignores_unknown_fields_and_reads_minimal_payloads():
    d = msgpack.unpackb(codec.encode_rollout(_rollout()))
    d["new_field"] = [1, 2]
    del d["pv"], d["at"], d["md"], d["tk"]
    back = codec.decode_rollout(msgpack.packb(d))
    assert (back.policy_version, back.metadata, back.top_k) == (0, {}, 0)


@pytest.mark.parametrize("data,words", [
    (b"\xc1garbage", "not a msgpack payload"),
    (b"", "not a msgpack payload"),
    (msgpack.packb([1, 2]), "no format version"),
    (msgpack.packb({"v": 1, "k": "scored"}), "expected a 'rollout' payload"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": "x", "s": 1}), "missing field 'tok'"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": "x", "tok": b"\0" * 7, "s": 1, "blp": b""}), "token_ids"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": "x", "tok": b"\0" * 8, "s": 1, "blp": b"\0"}),
     "behaviour_logprobs: expected 1 x float32"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": "x", "tok": b"\0" * 8, "s": 5, "blp": b""}), "outside \\[0, 2\\]"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": "x", "tok": b"\0" * 8, "s": -1, "blp": b"\0" * 12}), "score_from -1"),
    (msgpack.packb({"v": 1, "k": "rollout", "id": 5, "tok": b"\0" * 8, "s": 1, "blp": b"\0" * 4}), "bad id 5"),
])
def test_corrupt_payloads_say_what_is_wrong(data, words):
    with pytest.raises(PayloadError, match=words):
        codec.decode_rollout(data)


def test_truncated_scored_payload_is_refused():
    data = codec.encode_scored(_scored())
    with pytest.raises(PayloadError):
        codec.decode_scored(data[:-20])


def test_rollout_validates_shapes_and_metadata():
    with pytest.raises(InvalidRequest, match="loss_mask: must have shape \\[8\\]"):
        _rollout(mask=[1, 0])
    with pytest.raises(InvalidRequest, match="score_from"):
        Rollout(id="x", token_ids=[1, 2], score_from=3)
    with pytest.raises(InvalidRequest, match="metadata"):
        codec.encode_rollout(Rollout(id="x", token_ids=[1, 2], score_from=1, metadata={"f": object()}))
    with pytest.raises(InvalidRequest, match="teacher_logprobs"):
        ScoredRollout(rollout=_rollout(), teacher_logprobs=np.zeros(3))


def test_a_rollout_naming_a_teacher_is_v2_and_round_trips_others_stay_v1():
    plain, named = _rollout(), dataclasses.replace(_rollout(), teacher="math")
    assert msgpack.unpackb(codec.encode_rollout(plain))["v"] == 1       # old readers still read these
    assert msgpack.unpackb(codec.encode_rollout(named))["v"] == 2
    assert codec.decode_rollout(codec.encode_rollout(named)).teacher == "math"
    assert codec.decode_rollout(codec.encode_rollout(plain)).teacher == ""
    s = ScoredRollout(rollout=named, teacher_logprobs=np.zeros(named.n_scored), model_revision="sha256:x",
                      teacher="math")
    back = codec.decode_scored(codec.encode_scored(s))
    assert (back.teacher, back.rollout.teacher, back.model_revision) == ("math", "math", "sha256:x")


def test_a_v1_reader_refuses_a_rollout_naming_a_teacher(monkeypatch):
    """An old scorer must not score it with its default teacher: it says to upgrade instead."""
    monkeypatch.setattr(codec, "READS", (1,))
    with pytest.raises(PayloadError, match="format version 2 is newer.*upgrade opd-client"):
        codec.decode_rollout(codec.encode_rollout(dataclasses.replace(_rollout(), teacher="math")))
    assert codec.decode_rollout(codec.encode_rollout(_rollout())).id


def test_teacher_must_be_a_string():
    with pytest.raises(InvalidRequest, match="teacher"):
        dataclasses.replace(_rollout(), teacher=3)

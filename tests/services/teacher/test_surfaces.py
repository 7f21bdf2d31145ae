"""HTTP and gRPC surfaces over one real teacher (tiny torch model) on loopback."""
from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from opd_client import AsyncTeacherClient, InvalidRequest, Sequence, TeacherClient
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb

VOCAB, MAX_LEN = 128, 256


def grpc_target(teacher) -> str:
    return teacher.grpc_url.removeprefix("grpc://")


# ---- the same numbers on both surfaces -------------------------------------------------

def test_http_and_grpc_return_identical_numbers(teacher):
    rng = np.random.default_rng(0)
    seqs = [Sequence(id=f"s{i}", token_ids=rng.integers(0, VOCAB, n).tolist(), score_from=int(rng.integers(1, n)))
            for i, n in enumerate([5, 40, 17, 2])]
    seqs.append(Sequence(id="c", token_ids=[1, 2, 3, 4], score_from=2, candidate_ids_T_C=[[3, 4], [4, 8]]))
    with TeacherClient(teacher.http_url) as h, TeacherClient(teacher.grpc_url) as g:
        a = h.score(seqs, top_k=5, temperature=0.8, entropy=True)
        b = g.score(seqs, top_k=5, temperature=0.8, entropy=True)
    assert a.model == b.model and a.usage == b.usage
    assert a.usage.scored_tokens == sum(len(s.token_ids) - s.score_from for s in seqs)
    for s, x, y in zip(seqs, a.results, b.results):
        assert x.id == y.id == s.id
        assert x.logprobs_T.shape == (len(s.token_ids) - s.score_from,)
        np.testing.assert_array_equal(x.logprobs_T, y.logprobs_T)
        np.testing.assert_array_equal(x.top_ids_T_K, y.top_ids_T_K)
        np.testing.assert_array_equal(x.top_logprobs_T_K, y.top_logprobs_T_K)
        np.testing.assert_array_equal(x.entropy_T, y.entropy_T)
    np.testing.assert_array_equal(a.results[-1].candidate_logprobs_T_C, b.results[-1].candidate_logprobs_T_C)
    assert a.results[-1].candidate_logprobs_T_C.shape == (2, 2)


def test_http_json_shape_matches_the_contract(teacher):
    body = {"top_k": 2, "sequences": [{"id": "r1", "token_ids": [1, 7, 9, 4], "score_from": 2,
                                        "candidate_ids": [[3, 4], [4, 8]]}]}
    r = httpx.post(f"{teacher.http_url}/v1/score", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert set(d["model"]) >= {"name", "engine", "engine_version", "dtype", "revision", "vocab_size", "max_model_len"}
    res = d["results"][0]
    assert res["id"] == "r1" and len(res["logprobs"]) == 2
    assert np.array(res["top_ids"]).shape == (2, 2) and np.array(res["candidate_logprobs"]).shape == (2, 2)
    assert d["usage"] == {"scored_tokens": 2, "total_tokens": 4}


def test_model_info_on_both_surfaces(teacher):
    with TeacherClient(teacher.http_url) as h, TeacherClient(teacher.grpc_url) as g:
        assert h.model() == g.model()
        assert h.model().vocab_size == VOCAB and h.model().max_top_k == 20


def test_health_ready_metrics_openapi(teacher):
    assert httpx.get(f"{teacher.http_url}/healthz").status_code == 200
    assert httpx.get(f"{teacher.http_url}/readyz").json() == {"status": "ready"}
    httpx.post(f"{teacher.http_url}/v1/score", json={"sequences": [{"token_ids": [1, 2, 3]}]})
    text = httpx.get(f"{teacher.http_url}/metrics").text
    for name in ("opd_requests_total", "opd_request_latency_seconds_bucket", "opd_scored_tokens_total",
                 "opd_batch_sequences_bucket", "opd_batch_padding_ratio_bucket", "opd_forward_seconds_bucket",
                 "opd_inflight_tokens", "opd_engine_info"):
        assert name in text, name
    assert 'route="/v1/score"' in text
    spec = httpx.get(f"{teacher.http_url}/openapi.json").json()
    assert "/v1/score" in spec["paths"]
    assert httpx.get(f"{teacher.http_url}/docs").status_code == 200


def test_grpc_health_and_reflection(teacher):
    with grpc.insecure_channel(grpc_target(teacher)) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="opd.teacher.v1.Teacher")).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"opd.teacher.v1.Teacher", "grpc.health.v1.Health"} <= names


# ---- bad input: 422 / INVALID_ARGUMENT naming the field, on both surfaces ----------------

def seq(**kw):
    return {"token_ids": [1, 2, 3, 4], **kw}


BAD = [  # (case, JSON body, field named in the error)
    ("id below 0", {"sequences": [seq(token_ids=[1, -1, 3])]}, "sequences[0].token_ids[1]"),
    ("id >= vocab", {"sequences": [seq(), seq(token_ids=[1, 2, VOCAB])]}, "sequences[1].token_ids[2]"),
    ("one token", {"sequences": [seq(token_ids=[5])]}, "sequences[0].token_ids"),
    ("no tokens", {"sequences": [seq(token_ids=[])]}, "sequences[0].token_ids"),
    ("score_from 0", {"sequences": [seq(score_from=0)]}, "sequences[0].score_from"),
    ("score_from = L", {"sequences": [seq(score_from=4)]}, "sequences[0].score_from"),
    ("score_from < 0", {"sequences": [seq(score_from=-3)]}, "sequences[0].score_from"),
    ("too long", {"sequences": [seq(token_ids=[1] * (MAX_LEN + 1))]}, "sequences[0].token_ids"),
    ("too many sequences", {"sequences": [seq()] * 65}, "sequences"),
    ("too many tokens", {"sequences": [seq(token_ids=[1] * 200)] * 41}, "sequences"),
    ("no sequences", {"sequences": []}, "sequences"),
    ("top_k over max", {"top_k": 21, "sequences": [seq()]}, "top_k"),
    ("top_k negative", {"top_k": -1, "sequences": [seq()]}, "top_k"),
    ("temperature 0", {"temperature": 0, "sequences": [seq()]}, "temperature"),
    ("temperature < 0", {"temperature": -1.5, "sequences": [seq()]}, "temperature"),
    ("candidates: wrong rows", {"sequences": [seq(score_from=2, candidate_ids=[[1, 2]])]}, "sequences[0].candidate_ids"),
    ("candidates: empty rows", {"sequences": [seq(score_from=2, candidate_ids=[[], []])]}, "sequences[0].candidate_ids"),
    ("candidates: ragged", {"sequences": [seq(score_from=2, candidate_ids=[[1, 2], [3]])]}, "sequences[0].candidate_ids"),
    ("candidates: out of vocab", {"sequences": [seq(score_from=2, candidate_ids=[[1, 2], [3, 999]])]},
     "sequences[0].candidate_ids[1][1]"),
]
JSON_ONLY = [
    ("token id a string", {"sequences": [seq(token_ids=[1, "2", 3])]}, "sequences[0].token_ids[1]"),
    ("token id a float", {"sequences": [seq(token_ids=[1, 2.5, 3])]}, "sequences[0].token_ids[1]"),
    ("unknown field", {"sequences": [seq(tokens=[1])]}, "sequences[0].tokens"),
    ("missing token_ids", {"sequences": [{"score_from": 1}]}, "sequences[0].token_ids"),
    ("temperature not a number", {"temperature": "hot", "sequences": [seq()]}, "temperature"),
]


def to_proto(body: dict) -> pb.ScoreRequest:
    msg = pb.ScoreRequest(top_k=body.get("top_k", 0))
    if "temperature" in body:
        msg.temperature = body["temperature"]
    for s in body["sequences"]:
        m = msg.sequences.add(token_ids=s["token_ids"], score_from=s.get("score_from", 1))
        if "candidate_ids" in s:
            rows = s["candidate_ids"]
            m.candidate_width = len(rows[0]) if rows else 0
            m.candidate_ids.extend(i for r in rows for i in r)
    return msg


@pytest.mark.parametrize("case,body,field", BAD + JSON_ONLY, ids=[c[0] for c in BAD + JSON_ONLY])
def test_bad_input_http(teacher, case, body, field):
    r = httpx.post(f"{teacher.http_url}/v1/score", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["reason"], err


GRPC_FIELD = {"candidates: ragged": "sequences[0].candidate_ids"}


GRPC_BAD = [c for c in BAD if c[0] != "score_from 0"]   # proto3: 0 is "unset", i.e. the default 1


@pytest.mark.parametrize("case,body,field", GRPC_BAD, ids=[c[0] for c in GRPC_BAD])
def test_bad_input_grpc(teacher, case, body, field):
    if case == "candidates: empty rows":
        body = {"sequences": [seq(score_from=2)]}
        msg = to_proto(body)
        msg.sequences[0].candidate_ids.extend([])
        msg.sequences[0].candidate_width = -1
    else:
        msg = to_proto(body)
    with grpc.insecure_channel(grpc_target(teacher)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/opd.teacher.v1.Teacher/Score")(msg.SerializeToString())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    md = dict(e.value.trailing_metadata())
    assert md["opd-field"] == GRPC_FIELD.get(case, field) and md["opd-reason"]


def test_grpc_score_from_zero_means_default(teacher):
    with grpc.insecure_channel(grpc_target(teacher)) as ch:
        raw = ch.unary_unary("/opd.teacher.v1.Teacher/Score")(to_proto({"sequences": [seq(score_from=0)]}).SerializeToString())
    assert len(pb.ScoreResponse.FromString(raw).results[0].logprobs) == 3


def test_malformed_json_and_protobuf(teacher):
    r = httpx.post(f"{teacher.http_url}/v1/score", content=b'{"sequences": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    with grpc.insecure_channel(grpc_target(teacher)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/opd.teacher.v1.Teacher/Score")(b"\xff\xff\xff\x01garbage")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["opd-field"] == "body"


def test_oversized_body_is_refused_unread(teacher):
    big = json.dumps({"sequences": [seq(token_ids=[1] * 400_000)]}).encode()   # > 1 MiB limit
    r = httpx.post(f"{teacher.http_url}/v1/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks():  # no content-length: the limit is enforced while streaming
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    r = httpx.post(f"{teacher.http_url}/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    with grpc.insecure_channel(grpc_target(teacher)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/opd.teacher.v1.Teacher/Score")(b"\x0a" + b"\x00" * (2 << 20))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_raises_invalid_request_with_field(teacher):
    for url in (teacher.http_url, teacher.grpc_url):
        with TeacherClient(url) as c:
            with pytest.raises(InvalidRequest) as e:
                c.score([Sequence(token_ids=[1, 2, 3], score_from=3)])
            assert e.value.field == "sequences[0].score_from"
            assert isinstance(e.value, ValueError)
            assert c.score([[1, 2, 3]]).results[0].logprobs_T.shape == (2,)   # still serving


# ---- concurrency: 64 clients, mixed lengths, each equals its single-request result -------

async def test_64_concurrent_clients_match_single_requests(teacher):
    rng = np.random.default_rng(7)
    reqs = [[Sequence(token_ids=rng.integers(0, VOCAB, int(n)).tolist(), score_from=int(rng.integers(1, n)))
             for n in rng.integers(2, 200, size=int(rng.integers(1, 4)))] for _ in range(64)]
    clients = [AsyncTeacherClient(teacher.grpc_url if i % 2 else teacher.http_url) for i in range(64)]
    try:
        together = await asyncio.gather(*(c.score(r, top_k=3) for c, r in zip(clients, reqs)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    with TeacherClient(teacher.grpc_url) as c:
        for r, got in zip(reqs, together):
            for s, res in zip(r, got.results):
                alone = c.score([s], top_k=3).results[0]
                np.testing.assert_allclose(res.logprobs_T, alone.logprobs_T, atol=1e-4, rtol=0)
                np.testing.assert_allclose(res.top_logprobs_T_K, alone.top_logprobs_T_K, atol=1e-4, rtol=0)

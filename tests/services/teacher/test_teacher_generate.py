"""POST /v1/generate and gRPC Generate on a real teacher (tiny model, loopback): samples, their
logprobs, stop ids, seeds, and every bad input answered 422 / INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from opd_client import InvalidRequest, TeacherClient
from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc

PROMPTS = [[0, 5, 9, 17], [0, 3], [0, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, teacher):
    url = teacher.http_url if request.param == "http" else teacher.grpc_url
    with TeacherClient(url) as c:
        yield c


def test_generate_logprobs_agree_with_scoring(client):
    out = client.generate([("a", PROMPTS[0]), ("b", PROMPTS[1]), ("c", PROMPTS[2])], max_tokens=12, seed=7)
    assert [r.id for r in out.results] == ["a", "b", "c"]
    assert out.usage.prompt_tokens == sum(map(len, PROMPTS))
    assert out.usage.generated_tokens == sum(len(r.token_ids_T) for r in out.results)
    for prompt, r in zip(PROMPTS, out.results):
        assert r.finish_reason == "length" and len(r.token_ids_T) == 12
        # the sampled tokens' logprobs are the teacher's own scores of the same sequence
        scored = client.score([list(prompt) + r.token_ids_T.tolist()], top_k=0).results[0]
        np.testing.assert_allclose(r.logprobs_T, scored.logprobs_T[len(prompt) - 1:], atol=1e-4)


def test_generate_seed_repeats_and_greedy_is_argmax(client):
    a = client.generate([PROMPTS[0]] * 2, max_tokens=8, seed=123)
    b = client.generate([PROMPTS[0]] * 2, max_tokens=8, seed=123)
    assert [r.token_ids_T.tolist() for r in a.results] == [r.token_ids_T.tolist() for r in b.results]
    g = client.generate([PROMPTS[0]], max_tokens=5, temperature=0).results[0]
    seq = list(PROMPTS[0])
    for tok in g.token_ids_T:
        top = client.score([seq + [0]], top_k=1).results[0].top_ids_T_K[-1, 0]
        assert tok == top
        seq.append(int(tok))


def test_generate_stops_on_stop_ids(client):
    everything = list(range(client.model().vocab_size))
    out = client.generate(PROMPTS, max_tokens=10, stop_ids=everything)
    for r in out.results:
        assert r.finish_reason == "stop" and len(r.token_ids_T) == 1


BAD = [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[]]), "prompts[0].token_ids"),
    (dict(prompts=[[0, 1], [0, 128]]), "prompts[1].token_ids[1]"),
    (dict(prompts=[[0, -3]]), "prompts[0].token_ids[1]"),
    (dict(prompts=[[0, 1]], max_tokens=-1), "max_tokens"),
    (dict(prompts=[[0, 1]], max_tokens=5000), "max_tokens"),
    (dict(prompts=[[0] * 250], max_tokens=10), "prompts[0].token_ids"),
    (dict(prompts=[[0, 1]], temperature=-0.5), "temperature"),
    (dict(prompts=[[0, 1]], stop_ids=[1, 999]), "stop_ids[1]"),
    (dict(prompts=[[0, 1]] * 65), "prompts"),
]


@pytest.mark.parametrize("kwargs,field", BAD)
def test_generate_bad_input_names_the_field(client, kwargs, field):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts")
    with pytest.raises(InvalidRequest) as e:
        client.generate(prompts, **kwargs)
    assert e.value.field == field, e.value


def test_generate_http_wire_errors(teacher):
    url = teacher.http_url + "/v1/generate"
    cases = [
        (b"{not json", "body"),
        (b'{"prompts": [{"token_ids": [0, 1]}], "max_tokens": "7"}', "max_tokens"),
        (b'{"prompts": [{"token_ids": [0, 1.5]}]}', "prompts[0].token_ids[1]"),
        (b'{"prompts": [{"token_ids": [0, 1]}], "top_k": 3}', "top_k"),
        (b'{"prompts": [{"token_ids": [0, 1]}], "seed": -1}', "seed"),
        (b'{"prompts": [{"token_ids": [0, 1]}], "temperature": "hot"}', "temperature"),
    ]
    for body, field in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())


def test_generate_grpc_malformed_protobuf(teacher):
    with grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) as ch:
        call = ch.unary_unary("/opd.teacher.v1.Teacher/Generate", request_serializer=lambda b: b,
                              response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff", timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = pb_grpc.TeacherStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[0, 1])], temperature=float("nan")), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.value.trailing_metadata())["opd-field"] == "temperature"

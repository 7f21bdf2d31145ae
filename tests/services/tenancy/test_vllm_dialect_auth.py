"""The vLLM dialect authenticates as the native surface does: an OpenAI-style api_key is the
experiment's key (Authorization: Bearer); errors come in vLLM's shape."""
from __future__ import annotations

import uuid

import httpx
import pytest

BODY = {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2}


def test_dialect_needs_the_experiment_key(tenant_teacher, registry):
    creds = registry.create(f"exp-{uuid.uuid4().hex[:8]}")
    url = tenant_teacher.http_url
    for headers in ({}, {"authorization": "Bearer opd_not-a-real-key"}):
        for method, path, body in (("POST", "/v1/completions", BODY), ("GET", "/v1/models", None)):
            r = httpx.request(method, url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == 401
    assert httpx.get(url + "/health").status_code == 200          # probes stay open
    ok = httpx.post(url + "/v1/completions", json=BODY, headers={"authorization": f"Bearer {creds.api_key}"})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["prompt_logprobs"]) == 3


def test_openai_client_passes_its_api_key(tenant_teacher, registry):
    openai = pytest.importorskip("openai")
    creds = registry.create(f"exp-{uuid.uuid4().hex[:8]}")
    good = openai.OpenAI(base_url=tenant_teacher.http_url + "/v1", api_key=creds.api_key, max_retries=0)
    name = good.models.list().data[0].id
    out = good.completions.create(model=name, prompt=[4, 5, 6], max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert out.choices[0].prompt_logprobs[0] is None
    bad = openai.OpenAI(base_url=tenant_teacher.http_url + "/v1", api_key="opd_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=name, prompt=[4, 5, 6], max_tokens=1, extra_body={"prompt_logprobs": 0})

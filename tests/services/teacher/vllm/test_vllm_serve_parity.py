"""Our /v1/completions answer against a real `vllm serve` answer on the same tiny model:
same keys, nesting and types position by position; numbers within 1e-3."""
from __future__ import annotations


import httpx
import pytest

from serve_helpers import same_shape
from serve_helpers import vllm_serve as serve_on

pytestmark = pytest.mark.vllm
# values that differ by nature (ids, clocks, fingerprints) or by design (we sample no token: see docs/vllm.md)
VOLATILE = {"id", "created", "system_fingerprint", "completion_tokens", "total_tokens", "token_ids"}


@pytest.fixture(scope="module")
def vllm_serve(vllm_ok, vllm_model, tmp_path_factory):
    with serve_on(vllm_model, tmp_path_factory.mktemp("vllm-serve")) as srv:
        yield srv


def _same_shape(ours, theirs):
    same_shape(ours, theirs, VOLATILE)


@pytest.mark.parametrize("teacher_name", ["vllm_teacher", "torch_teacher"])
@pytest.mark.parametrize("k", [0, 4])
def test_same_answer_as_vllm_serve(vllm_serve, teacher_name, k, request, vllm_model):
    teacher = request.getfixturevalue(teacher_name)
    body = {"model": vllm_model.name, "prompt": [[5, 9, 17, 3, 3, 80, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]],
            "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0, "return_token_ids": True}
    theirs = httpx.post(vllm_serve.url + "/v1/completions", json=body, timeout=60)
    ours = httpx.post(teacher.http_url + "/v1/completions", json=body, timeout=60)
    assert theirs.status_code == ours.status_code == 200, (theirs.text, ours.text)
    _same_shape(ours.json(), theirs.json())


def test_models_card_shape(vllm_serve, vllm_teacher):
    theirs = httpx.get(vllm_serve.url + "/v1/models").json()
    ours = httpx.get(vllm_teacher.http_url + "/v1/models").json()
    assert set(ours["data"][0]) == set(theirs["data"][0])
    assert ours["data"][0]["id"] == theirs["data"][0]["id"]
    assert ours["data"][0]["max_model_len"] == theirs["data"][0]["max_model_len"]


def test_bad_input_error_shape(vllm_serve, vllm_teacher):
    body = {"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 50}
    theirs = httpx.post(vllm_serve.url + "/v1/completions", json=body, timeout=30).json()
    ours = httpx.post(vllm_teacher.http_url + "/v1/completions", json=body, timeout=30).json()
    assert list(ours) == list(theirs) == ["error"]
    assert set(ours["error"]) == set(theirs["error"])
    assert ours["error"]["param"] == theirs["error"]["param"] == "prompt_logprobs"

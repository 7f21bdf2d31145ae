"""Our /v1/completions answer against a real `vllm serve` answer on the same tiny model:
same keys, nesting and types position by position; numbers within 1e-3."""
from __future__ import annotations

import socket

import httpx
import pytest

pytestmark = pytest.mark.vllm
# values that differ by nature (ids, clocks, fingerprints) or by design (we sample no token: see docs/vllm.md)
VOLATILE = {"id", "created", "system_fingerprint", "completion_tokens", "total_tokens", "token_ids"}


@pytest.fixture(scope="module")
def vllm_serve(vllm_ok, vllm_model, tmp_path_factory):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[4] / "bench" / "vllm_peer.py"   # the peer wrapper is bench code
    spec = importlib.util.spec_from_file_location("bench_vllm_peer", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    VllmServe = peer.VllmServe
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    with VllmServe(vllm_model, port, served_name=vllm_model.name, log_path=log) as srv:
        yield srv


def _same_shape(ours, theirs, path="$"):
    assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {int, float}, \
        f"{path}: {type(ours).__name__} vs vLLM's {type(theirs).__name__}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} vs vLLM's {list(theirs)}"
        for k in theirs:
            if k not in VOLATILE:
                _same_shape(ours[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} vs vLLM's {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same_shape(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float):
        assert abs(ours - theirs) <= 1e-3, f"{path}: {ours} vs vLLM's {theirs}"
    else:
        assert ours == theirs, f"{path}: {ours!r} vs vLLM's {theirs!r}"


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

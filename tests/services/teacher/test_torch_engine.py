"""Torch engine vs a float64 log-softmax reference over the full vocabulary (a float64 copy of the
model run by torch's own linears, so the engine's oneDNN linears are checked against it too)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.torch_engine import OneDnnLinear, TorchEngine, use_onednn_linears

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TorchEngine(tiny_model, device="cpu", dtype="float32", max_top_k=20)


@pytest.fixture(scope="module")
def model64(tiny_model):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()


def reference(model64, ids: np.ndarray, s: int, temperature: float) -> np.ndarray:
    """log p(token | prefix) for every vocab entry at positions [s, L), float64: [T, V]."""
    with torch.inference_mode():
        logits = model64(input_ids=torch.from_numpy(ids)[None]).logits[0]
    return torch.log_softmax(logits[s - 1:-1] / temperature, dim=-1).numpy()


def random_items(rng, n, vocab, *, top_k=0, temperature=1.0, entropy=False, cands=0):
    items = []
    for _ in range(n):
        length = int(rng.integers(2, 60))
        ids = rng.integers(0, vocab, size=length).astype(np.int64)
        s = int(rng.integers(1, length))
        c = rng.integers(0, vocab, size=(length - s, cands)).astype(np.int64) if cands else None
        items.append(ScoreItem(ids, s, top_k, temperature, entropy, c))
    return items


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_float64_reference_with_padding(engine, model64, temperature):
    rng = np.random.default_rng(0)
    items = random_items(rng, 12, engine.vocab_size, top_k=5, temperature=temperature, entropy=True, cands=3)
    results = engine.score(items)      # one padded batch of mixed lengths
    for it, r in zip(items, results):
        ref_T_V = reference(model64, it.token_ids, it.score_from, temperature)
        t = np.arange(it.n_scored)
        np.testing.assert_allclose(r.logprobs_T, ref_T_V[t, it.token_ids[it.score_from:]], atol=TOL, rtol=0)
        order = np.argsort(-ref_T_V, axis=1)[:, :5]
        np.testing.assert_allclose(r.top_logprobs_T_K, np.take_along_axis(ref_T_V, order, 1), atol=TOL, rtol=0)
        # ids may differ only where logprobs tie within tolerance
        got = np.take_along_axis(ref_T_V, r.top_ids_T_K, 1)
        np.testing.assert_allclose(got, r.top_logprobs_T_K, atol=TOL, rtol=0)
        assert (np.diff(r.top_logprobs_T_K, axis=1) <= 0).all(), "top-k must be descending"
        np.testing.assert_allclose(r.candidate_logprobs_T_C, np.take_along_axis(ref_T_V, it.candidate_ids_T_C, 1),
                                   atol=TOL, rtol=0)
        ent_ref = -(np.exp(ref_T_V) * ref_T_V).sum(1)
        np.testing.assert_allclose(r.entropy_T, ent_ref, atol=TOL, rtol=0)


def test_padding_does_not_change_results(engine):
    rng = np.random.default_rng(1)
    items = random_items(rng, 10, engine.vocab_size, top_k=3, cands=2, entropy=True)
    batched = engine.score(items)
    for it, b in zip(items, batched):
        (single,) = engine.score([it])
        np.testing.assert_allclose(b.logprobs_T, single.logprobs_T, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.top_logprobs_T_K, single.top_logprobs_T_K, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.candidate_logprobs_T_C, single.candidate_logprobs_T_C, atol=TOL, rtol=0)
        np.testing.assert_allclose(b.entropy_T, single.entropy_T, atol=TOL, rtol=0)


def test_mixed_options_in_one_batch(engine, model64):
    """Items with different top_k / temperature / candidates / entropy share one batch."""
    rng = np.random.default_rng(2)
    items = (random_items(rng, 3, engine.vocab_size, top_k=0, temperature=1.0)
             + random_items(rng, 3, engine.vocab_size, top_k=7, temperature=0.5, cands=4)
             + random_items(rng, 3, engine.vocab_size, top_k=2, temperature=3.0, entropy=True))
    results = engine.score(items)
    for it, r in zip(items, results):
        ref_T_V = reference(model64, it.token_ids, it.score_from, it.temperature)
        np.testing.assert_allclose(r.logprobs_T, ref_T_V[np.arange(it.n_scored), it.token_ids[it.score_from:]],
                                   atol=TOL, rtol=0)
        assert (r.top_ids_T_K is None) == (it.top_k == 0)
        if it.top_k:
            assert r.top_ids_T_K.shape == (it.n_scored, it.top_k)
        assert (r.candidate_logprobs_T_C is None) == (it.candidate_ids_T_C is None)
        assert (r.entropy_T is None) == (not it.entropy)


def test_lm_head_chunks_cover_every_row(engine, monkeypatch):
    """With a chunk smaller than the batch's rows the results are the same."""
    rng = np.random.default_rng(3)
    items = random_items(rng, 6, engine.vocab_size, top_k=4)
    full = engine.score(items)
    monkeypatch.setattr(engine, "chunk_rows", 7)
    chunked = engine.score(items)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a.logprobs_T, b.logprobs_T, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(a.top_ids_T_K, b.top_ids_T_K)


def test_model_identity(engine, tiny_model):
    info = engine.info
    assert info.engine == "torch" and info.engine_version == torch.__version__
    assert info.dtype == "float32" and info.vocab_size == 128 and info.max_model_len == 256
    assert info.revision.startswith("sha256:") and len(info.revision) == 7 + 64
    # the revision is a function of the files: same dir, same hash
    assert TorchEngine(tiny_model, device="cpu").info.revision == info.revision


def test_cpu_linears_run_onednn_and_agree_with_torch_default(engine, tiny_model):
    """On CPU in float32 every linear (body and LM head) runs oneDNN; OPD_CPU_ONEDNN=false keeps
    torch's default, and both give the same numbers within float32 rounding."""
    assert engine.onednn
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDnnLinear for m in linears) and type(engine.head) is OneDnnLinear
    plain = TorchEngine(tiny_model, device="cpu", dtype="float32", max_top_k=20, cpu_onednn=False)
    assert not plain.onednn and not any(type(m) is OneDnnLinear for m in plain.model.modules())
    items = random_items(np.random.default_rng(4), 8, engine.vocab_size, top_k=5, entropy=True)
    for a, b in zip(engine.score(items), plain.score(items)):
        np.testing.assert_allclose(a.logprobs_T, b.logprobs_T, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.top_logprobs_T_K, b.top_logprobs_T_K, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.entropy_T, b.entropy_T, atol=1e-5, rtol=0)
    # generation runs the same swapped modules
    from opd_services.teacher.engines.base import GenerateItem
    from opd_services.modeling.sampling import SampleParams
    item = GenerateItem([np.array([1, 2, 3])], SampleParams(max_tokens=6, temperature=1.0, seed=3))
    (a,), (b,) = engine.generate(item), plain.generate(item)
    assert a.token_ids_T.shape == (6,)
    np.testing.assert_array_equal(a.token_ids_T, b.token_ids_T)     # a 1e-6 logit change does not move a seeded draw


def test_onednn_linears_only_for_float32_on_cpu():
    """Other dtypes keep torch's linears (the swap is for float32 CPU inference)."""
    bf16 = torch.nn.Sequential(torch.nn.Linear(8, 4)).to(torch.bfloat16)
    assert not use_onednn_linears(bf16) and type(bf16[0]) is torch.nn.Linear
    f32 = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 8)
    want = f32(x)
    assert use_onednn_linears(f32) and all(type(f32[i]) is OneDnnLinear for i in (0, 2))
    with torch.inference_mode():
        torch.testing.assert_close(f32(x), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=[True, False], ids=["onednn", "torch-default"])
def bf16_engine(tiny_model, request):
    return TorchEngine(tiny_model, device="cpu", dtype="bfloat16", max_top_k=20, share_prefixes=False,
                       cpu_onednn=request.param)


def test_a_bfloat16_model_gets_float32_exact_logprobs(bf16_engine, request):
    """On a bfloat16 model the head's matmul runs in float32 too: the logprobs equal a float64
    log-softmax of the model's own bfloat16 hidden states times its bfloat16 head weight, to
    float32 rounding. A bfloat16 matmul (the logits rounded to 8 bits) would miss by 100x more."""
    from opd_services.teacher.engines.torch_engine import Float32Head
    engine = bf16_engine
    assert engine.info.dtype == "bfloat16" and engine.head.weight.dtype == torch.bfloat16
    assert isinstance(engine.head_model.lm_head, Float32Head) and engine.head32.linear is engine.head
    onednn = request.node.callspec.params["bf16_engine"]
    assert engine.head32.onednn == (onednn and torch.backends.mkldnn.is_available())
    assert type(engine.model.lm_head) is torch.nn.Linear        # the model itself is unchanged
    with torch.no_grad():
        engine.head.weight.mul_(16)        # logits of ~unit scale, where 8-bit rounding shows
        w64_V_H = engine.head.weight.double()
        try:
            rng = np.random.default_rng(5)
            items = random_items(rng, 6, engine.vocab_size, top_k=5, entropy=True, cands=3)
            got = [engine.score([it])[0] for it in items]       # unpadded: the hidden states below, bit for bit
            worst_bf16 = 0.0
            for it, r in zip(items, got):
                with torch.inference_mode():
                    hidden_L_H = engine.body(input_ids=torch.from_numpy(it.token_ids)[None],
                                             use_cache=False).last_hidden_state[0]
                    rows_T_H = hidden_L_H[it.score_from - 1:-1]
                    ref_T_V = torch.log_softmax(rows_T_H.double() @ w64_V_H.T, -1).numpy()
                    bf16_T_V = torch.log_softmax(engine.head(rows_T_H).float(), -1).double().numpy()
                t, target = np.arange(it.n_scored), it.token_ids[it.score_from:]
                assert np.abs(ref_T_V).max() > 1.0
                np.testing.assert_allclose(r.logprobs_T, ref_T_V[t, target], atol=1e-5, rtol=0)
                np.testing.assert_allclose(r.top_logprobs_T_K, -np.sort(-ref_T_V, 1)[:, :5], atol=1e-5, rtol=0)
                np.testing.assert_allclose(r.candidate_logprobs_T_C,
                                           np.take_along_axis(ref_T_V, it.candidate_ids_T_C, 1), atol=1e-5, rtol=0)
                np.testing.assert_allclose(r.entropy_T, -(np.exp(ref_T_V) * ref_T_V).sum(1), atol=1e-5, rtol=0)
                worst_bf16 = max(worst_bf16, float(np.abs(bf16_T_V - ref_T_V).max()))
            assert worst_bf16 > 100 * 1e-5, worst_bf16
        finally:
            engine.head.weight.div_(16)


def test_the_float32_head_upcasts_its_weight_once_per_batch(bf16_engine, monkeypatch):
    """Off CUDA the float32 copy of the weight is made once per batch, not once per chunk."""
    head32 = bf16_engine.head32
    assert head32 is not None and not head32.native
    made = []
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda t, *a, **kw: made.append(t.shape) or real(t, *a, **kw))
    monkeypatch.setattr(bf16_engine, "chunk_rows", 5)
    items = random_items(np.random.default_rng(6), 6, bf16_engine.vocab_size)
    bf16_engine.score(items)
    assert sum(it.n_scored for it in items) > 3 * 5                      # several chunks
    assert made.count(head32.weight.shape) == 1 and head32._weight32 is None

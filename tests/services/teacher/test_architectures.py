"""The torch engine over the architecture matrix (opd_services.modeling.architectures): every
field equals a float64 log-softmax of the model's own forward() logits, prefix sharing on and
off; the engine refuses to start where its head path cannot reproduce forward()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_services import metrics
from opd_services.errors import ConfigError
from opd_services.modeling.architectures import (ARCHITECTURES, VOCAB, build_architecture, reference_logprobs,
                                                 reference_model)
from opd_services.teacher.engines import torch_engine
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.torch_engine import TorchEngine, model_parts

TOL = 1e-4
K = 5
PROMPT = 24            # the group's shared prompt: over MIN_SHARED_PREFIX, so sharing runs
# where sharing cannot run, and why: sliding windows / attention soft-capping (prefix.install
# refuses them), StableLM's decoder layer drops the attention kwargs (the install probe sees it)
UNSHARED = {"mistral", "gemma2", "gemma3_text", "cohere2", "stablelm"}
# where forward() transforms the logits after the LM head
TRANSFORMED = {"granite": "logits_scaling", "granite_moe": "logits_scaling", "cohere": "logit_scale",
               "cohere2": "logit_scale", "gemma2": "final_logit_softcapping",
               "gemma3_text": "final_logit_softcapping"}


@pytest.fixture(scope="session")
def arch_dirs(cache_dir):
    """Every architecture's checkpoint, built once per session."""
    return {name: build_architecture(name, cache_dir / "architectures" / name, seed=11) for name in ARCHITECTURES}


@pytest.fixture(scope="session")
def references():
    """float64 reference models, loaded once per architecture."""
    return {}


def batch(seed: int = 0) -> list[ScoreItem]:
    """Three completions of one 24-token prompt (lengths over the sliding windows), every field asked,
    mixed temperatures, plus a lone sequence scored from its second token."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, PROMPT)
    items = []
    for n, temp in ((20, 1.0), (28, 0.7), (36, 1.0)):
        ids = np.concatenate([prompt, rng.integers(0, VOCAB, n)]).astype(np.int64)
        cands = rng.integers(0, VOCAB, (n, 3)).astype(np.int64)
        items.append(ScoreItem(ids, PROMPT, top_k=K, temperature=temp, entropy=True, candidate_ids_T_C=cands,
                               rank=True))
    lone = rng.integers(0, VOCAB, 30).astype(np.int64)
    items.append(ScoreItem(lone, 1, top_k=K, temperature=1.5, entropy=True, candidate_ids_T_C=lone[1:, None],
                           rank=True))
    return items


def assert_matches(got, item: ScoreItem, ref_T_V: np.ndarray, what: str) -> None:
    """Every field of one ItemScores against the float64 reference [T, V]."""
    t = np.arange(item.n_scored)
    target_T = ref_T_V[t, item.token_ids[item.score_from:]]
    np.testing.assert_allclose(got.logprobs_T, target_T, atol=TOL, rtol=0, err_msg=f"{what}: logprobs")
    np.testing.assert_allclose(got.top_logprobs_T_K, -np.sort(-ref_T_V, 1)[:, :item.top_k], atol=TOL, rtol=0,
                               err_msg=f"{what}: top_logprobs")
    # ids may differ from the reference's only where logprobs tie within the tolerance
    np.testing.assert_allclose(np.take_along_axis(ref_T_V, got.top_ids_T_K, 1), got.top_logprobs_T_K, atol=TOL,
                               rtol=0, err_msg=f"{what}: top_ids")
    np.testing.assert_allclose(got.candidate_logprobs_T_C, np.take_along_axis(ref_T_V, item.candidate_ids_T_C, 1),
                               atol=TOL, rtol=0, err_msg=f"{what}: candidate_logprobs")
    np.testing.assert_allclose(got.entropy_T, -(np.exp(ref_T_V) * ref_T_V).sum(1), atol=TOL, rtol=0,
                               err_msg=f"{what}: entropy")
    if got.rank_T is not None:    # rank within the tolerance: near-ties may count either way
        lo = 1 + (ref_T_V > target_T[:, None] + TOL).sum(1)
        hi = 1 + (ref_T_V > target_T[:, None] - TOL).sum(1)
        assert ((lo <= got.rank_T) & (got.rank_T <= hi)).all(), f"{what}: rank"


def reference(references, arch_dirs, name: str, item: ScoreItem) -> np.ndarray:
    if name not in references:
        references[name] = reference_model(arch_dirs[name])
    return reference_logprobs(references[name], item.token_ids, item.score_from, item.temperature)


def batch_tokens() -> float:
    return metrics.PREFIX_TOKENS.labels("torch", "batch")._value.get()


@pytest.mark.parametrize("share", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_engine_equals_float64_forward(name, share, arch_dirs, references):
    engine = TorchEngine(arch_dirs[name], device="cpu", dtype="float32", max_top_k=20, share_prefixes=share,
                         prefix_cache_mb=4 if share else 0)
    assert engine.share_prefixes == (share and name not in UNSHARED)
    items = batch()
    before = batch_tokens()
    runs = {"first": engine.score(items)}
    if engine.share_prefixes:
        assert batch_tokens() - before >= 2 * PROMPT          # the group's prompt ran once for three
        runs["cached"] = engine.score(items)                   # the prompt now comes from the cache
    for run, results in runs.items():
        for i, (it, got) in enumerate(zip(items, results)):
            assert_matches(got, it, reference(references, arch_dirs, name, it), f"{name} {run} item {i}")


def test_attention_that_sdpa_would_drop_runs_eager(arch_dirs):
    """transformers' SDPA path ignores Gemma-2's attn_logit_softcapping: the engine's start-up probe
    sees the difference from eager attention and runs eager; elsewhere SDPA stays."""
    assert TorchEngine(arch_dirs["gemma2"], device="cpu").model.config._attn_implementation == "eager"
    assert TorchEngine(arch_dirs["gemma3_text"], device="cpu").model.config._attn_implementation == "sdpa"
    llama = TorchEngine(arch_dirs["llama"], device="cpu", share_prefixes=False)
    assert llama.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", sorted(TRANSFORMED))
def test_a_skipped_transform_would_fail_the_matrix(name, arch_dirs, references):
    """The matrix can fail: where forward() transforms logits, plain LM-head logits are > 100x the
    tolerance away from the reference (the values in architectures.py make every transform count)."""
    (item,) = batch()[:1]
    model64 = references.get(name) or reference_model(arch_dirs[name])
    references[name] = model64
    assert getattr(model64.config, TRANSFORMED[name]) not in (None, 0, 1)
    with torch.inference_mode():
        hidden_L_H = model64.base_model(input_ids=torch.from_numpy(item.token_ids)[None]).last_hidden_state[0]
        plain_T_V = torch.log_softmax(model64.get_output_embeddings()(hidden_L_H)[item.score_from - 1:-1], -1)
    ref_T_V = reference_logprobs(model64, item.token_ids, item.score_from)
    assert np.abs(plain_T_V.numpy() - ref_T_V).max() > 100 * TOL


def _plain_head(model, body_output_cls):
    """The head path before it was derived from forward(): the output embedding alone."""
    lm_head = model.get_output_embeddings()

    class Plain(torch.nn.Module):
        def forward(self, inputs_embeds):
            return type("Out", (), {"logits": lm_head(inputs_embeds)})
    return Plain()


@pytest.mark.parametrize("name", ["granite", "cohere", "gemma2"])
def test_a_head_without_the_transform_is_refused_at_start(name, arch_dirs, monkeypatch):
    monkeypatch.setattr(torch_engine, "head_model", _plain_head)
    with pytest.raises(ConfigError, match=r"differ from its forward\(\) by up to") as e:
        TorchEngine(arch_dirs[name], device="cpu", dtype="float32")
    assert "ForCausalLM" in str(e.value) and "OPD_ENGINE=vllm" in str(e.value)


def _context_bonus(original):
    """A forward() that raises the logits of tokens already in the context (from input_ids):
    something the engine's head path, which sees only hidden states, cannot reproduce."""
    def forward(self, input_ids=None, **kwargs):
        out = original(self, input_ids=input_ids, **kwargs)
        if input_ids is not None:
            seen_B_V = torch.zeros(input_ids.shape[0], out.logits.shape[-1], dtype=out.logits.dtype)
            seen_B_V.scatter_(1, input_ids, 2.0)
            out.logits = out.logits + seen_B_V[:, None, :]
        return out
    return forward


def test_refuses_a_forward_it_cannot_reproduce(tiny_model, monkeypatch):
    from transformers import LlamaForCausalLM
    monkeypatch.setattr(LlamaForCausalLM, "forward", _context_bonus(LlamaForCausalLM.forward))
    with pytest.raises(ConfigError) as e:
        TorchEngine(tiny_model, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "differ from its forward() by up to" in msg and "OPD_ENGINE=vllm" in msg


def test_refuses_a_forward_that_needs_input_ids(tiny_model, monkeypatch):
    from transformers import LlamaForCausalLM
    original = LlamaForCausalLM.forward

    def forward(self, input_ids=None, **kwargs):
        _ = input_ids.shape                     # fails on the head path, which passes hidden states only
        return original(self, input_ids=input_ids, **kwargs)
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM .* cannot run its forward\(\) on given hidden states"):
        TorchEngine(tiny_model, device="cpu", dtype="float32")


def test_refuses_a_model_without_a_body_or_an_output_embedding(tiny_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    body, head = model_parts(model)
    assert body is model.model and head is model.lm_head
    model.base_model_prefix = "transformer"
    with pytest.raises(ConfigError, match=r"no base model under base_model_prefix='transformer'"):
        model_parts(model)
    model.base_model_prefix = "model"
    model.get_output_embeddings = lambda: None
    with pytest.raises(ConfigError, match="no output embeddings"):
        model_parts(model)

"""Documented torch-engine behaviour, each held by a test: only the scored rows reach the LM head;
the prefix cache's default size (OPD_PREFIX_CACHE_MB unset); attention soft-capping turns prefix
sharing off and the numbers stay the model's own."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.torch_engine import TorchEngine

VOCAB = 128


# ---- only span rows reach the LM head ----

@pytest.fixture(scope="module")
def engine(tiny_model):
    return TorchEngine(tiny_model, device="cpu", dtype="float32", max_top_k=20)


def test_only_the_scored_rows_reach_the_lm_head(engine, monkeypatch):
    """The head sees one row per scored token (hidden at i-1 for token i >= score_from), in chunks
    of at most chunk_rows: never the prompt's rows, never the padding, never [B, L, V]."""
    rng = np.random.default_rng(0)
    items = [ScoreItem(rng.integers(0, VOCAB, n).astype(np.int64), s, top_k=3)
             for n, s in [(60, 50), (40, 1), (25, 24), (90, 30)]]
    chunks = []
    hook = engine.head_model.lm_head.register_forward_hook(lambda m, args, out: chunks.append(args[0].shape))
    monkeypatch.setattr(engine, "chunk_rows", 16)
    try:
        engine.score(items)
    finally:
        hook.remove()
    scored = sum(it.n_tokens - it.score_from for it in items)
    assert sum(s[-2] for s in chunks) == scored == 10 + 39 + 1 + 60
    assert max(s[-2] for s in chunks) == 16 and all(s[0] == 1 for s in chunks)


# ---- the prefix cache's default size ----

def fake_machine(monkeypatch, ram_bytes: int):
    from opd_services.teacher import engines
    sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": ram_bytes // 4096}
    monkeypatch.setattr(engines, "os", SimpleNamespace(sysconf=sizes.__getitem__))
    return engines


@pytest.mark.parametrize("ram_gb, want_mb", [(8, 512.0), (16, 1024.0), (32, 2048.0), (256, 2048.0)])
def test_default_prefix_cache_is_a_sixteenth_of_ram_up_to_2_gb_on_cpu(monkeypatch, ram_gb, want_mb):
    engines = fake_machine(monkeypatch, ram_gb << 30)
    assert engines.default_prefix_cache_mb(cuda=False) == want_mb


def test_default_prefix_cache_is_a_tenth_of_the_gpu_on_cuda(monkeypatch):
    from opd_services.teacher import engines
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 << 30))
    assert engines.default_prefix_cache_mb(cuda=True) == 8192.0


@pytest.mark.parametrize("given, want", [(None, 1024.0), (0, 0), (64, 64)])
def test_the_factory_gives_the_engine_the_default_only_when_unset(tiny_model, cache_dir, monkeypatch, given, want):
    from opd_services.config import Settings
    from opd_services.teacher.engines import torch_engine
    engines = fake_machine(monkeypatch, 16 << 30)
    monkeypatch.delenv("OPD_PREFIX_CACHE_MB", raising=False)
    built = {}
    monkeypatch.setattr(torch_engine, "TorchEngine", lambda path, **kw: built.update(kw) or "engine")
    settings = Settings(model=str(tiny_model), engine="torch", device="cpu", cache_dir=cache_dir,
                        prefix_cache_mb=given)
    assert engines.engine_factory(settings)() == "engine"
    assert built["prefix_cache_mb"] == want


# ---- attention soft-capping turns prefix sharing off ----

def gemma2(tmp_path, softcap: float | None):
    """A Gemma-2 body whose layers are all full attention (its mask code needs a window: one longer
    than any sequence here); weights of std 0.2, where a cap of 2 changes the scores."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=256,
                          sliding_window=4096, layer_types=["full_attention"] * 2, attn_logit_softcapping=softcap,
                          final_logit_softcapping=None, initializer_range=0.2, query_pre_attn_scalar=8)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def shared_prompt_items(n: int = 3) -> list[ScoreItem]:
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, 40)
    return [ScoreItem(np.concatenate([prompt, rng.integers(0, VOCAB, 12)]).astype(np.int64), 40, top_k=3)
            for _ in range(n)]


def float64_logprobs(model_dir, it: ScoreItem, capped: bool = True) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager").eval()
    if not capped:                       # what attention that ignores the cap (the prefix merge) computes
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(it.token_ids)[None]).logits[0]
    lp_T_V = torch.log_softmax(logits[it.score_from - 1:-1], -1)
    return lp_T_V[np.arange(it.n_scored), it.token_ids[it.score_from:]].numpy()


def test_attention_soft_capping_turns_prefix_sharing_off(tmp_path, caplog):
    """A soft-capped model runs unshared (with the cache asked for, none is made; the reason is
    logged) and scores a group sharing a 40-token prompt as its own eager float64 forward does."""
    capped = gemma2(tmp_path, softcap=2.0)
    with caplog.at_level("WARNING", logger="opd_services.teacher.engines.torch_engine"):
        engine = TorchEngine(capped, device="cpu", dtype="float32", max_top_k=20, prefix_cache_mb=4)
    assert not engine.share_prefixes and engine.prefix_cache is None
    assert "prefix sharing is off" in caplog.text
    items = shared_prompt_items()
    for it, r in zip(items, engine.score(items)):
        np.testing.assert_allclose(r.logprobs_T, float64_logprobs(capped, it), atol=1e-4, rtol=0)
        assert np.abs(r.logprobs_T - float64_logprobs(capped, it, capped=False)).max() > 100 * 1e-4


def test_install_refuses_soft_capped_attention_even_on_sdpa(tmp_path):
    """The engine runs a Gemma-2 on eager attention (SDPA drops the cap), which `install` refuses;
    were SDPA to implement the cap, `install` would still refuse it, for the cap (checked before the
    window): the prefix merge computes uncapped scores. The model is left on plain SDPA."""
    from transformers import AutoModelForCausalLM
    from opd_services.teacher.engines import prefix
    model = AutoModelForCausalLM.from_pretrained(gemma2(tmp_path, softcap=2.0), attn_implementation="sdpa")
    why = prefix.install(model)
    assert why is not None and "soft-capped" in why and "attn_logit_softcapping=2.0" in why
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="plain causal attention only"):
        prefix.prefix_attention(None, None, None, None, None, opd_prefix=object(), softcap=2.0)

"""Prefix-shared scoring on the torch engine: sequences sharing a prefix (in one batch, or
across requests through the prefix KV cache) get the numbers unshared scoring gives, on every
field; the cache stays within its budget."""
from __future__ import annotations

import numpy as np
import pytest

from opd_services import metrics
from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines.prefix import MIN_PREFIX, Prefix, PrefixCache, plan
from opd_services.teacher.engines.torch_engine import TorchEngine

TOL = 1e-5
VOCAB = 128


@pytest.fixture(scope="module")
def unshared(tiny_model):
    return TorchEngine(tiny_model, device="cpu", max_top_k=20, share_prefixes=False)


@pytest.fixture(scope="module")
def shared(tiny_model):
    return TorchEngine(tiny_model, device="cpu", max_top_k=20)          # in-batch sharing, no cache


def group(rng, prompt_len, g, completion=(3, 30), lead=0, **opts) -> list[ScoreItem]:
    """g completions of one prompt; the first `lead` completion tokens are common to all."""
    prompt = rng.integers(0, VOCAB, prompt_len)
    common = rng.integers(0, VOCAB, lead)
    items, with_cands = [], opts.pop("cands", False)
    for _ in range(g):
        ids = np.concatenate([prompt, common, rng.integers(0, VOCAB, int(rng.integers(*completion)))])
        cands = rng.integers(0, VOCAB, (ids.shape[0] - prompt_len, 3)) if with_cands else None
        items.append(ScoreItem(ids.astype(np.int64), prompt_len, candidate_ids_T_C=cands, **opts))
    return items


def all_fields(rng, prompt_len, g, **kw):
    opts = dict(top_k=5, temperature=float(rng.choice([0.7, 1.0, 2.0])), entropy=True, rank=True, cands=True)
    return group(rng, prompt_len, g, **kw, **opts)


def assert_same(a, b, tol=TOL):
    np.testing.assert_allclose(a.logprobs_T, b.logprobs_T, atol=tol, rtol=0)
    for f in ("top_logprobs_T_K", "candidate_logprobs_T_C", "entropy_T"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_allclose(x, y, atol=tol, rtol=0, err_msg=f)
    for f in ("top_ids_T_K", "rank_T"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f)


def prefix_tokens(source: str) -> float:
    return metrics.PREFIX_TOKENS.labels("torch", source)._value.get()


def test_plan_groups_shared_prompts_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    items = group(rng, 40, 3) + group(rng, 20, 2, lead=5) + group(rng, 30, 1) + group(rng, 8, 2)
    ids, sf = [it.token_ids for it in items], [it.score_from for it in items]
    groups = {tuple(sorted(g.members)): g for g in plan(ids, sf, cache_on=False)}
    assert set(groups) == {(0, 1, 2), (3, 4)}                 # the lone one and the 8-token prompt: nothing
    assert groups[(0, 1, 2)].length == 40
    assert groups[(3, 4)].length == 25 and groups[(3, 4)].key_length == 20   # completions share 5 more
    with_cache = {tuple(sorted(g.members)): g for g in plan(ids, sf, cache_on=True)}
    assert with_cache[(5,)].length == 30                      # a lone prompt is cached
    assert MIN_PREFIX > 8 and (6,) not in with_cache and (6, 7) not in with_cache
    # a prompt that is a small share of long sequences is not worth the second pass
    long = group(rng, 20, 3, completion=(200, 201))
    assert plan([it.token_ids for it in long], [20] * 3, cache_on=True) == []


def test_in_batch_sharing_equals_unshared_on_every_field(shared, unshared):
    rng = np.random.default_rng(1)
    # mixed: groups of different prompt lengths, completions sharing leading tokens, identical
    # sequences, a lone sequence and short unshared ones, in one batch
    items = (all_fields(rng, 40, 4) + all_fields(rng, 17, 3, lead=6) + all_fields(rng, 60, 2, completion=(1, 2))
             + all_fields(rng, 25, 1) + group(rng, 3, 3) + group(rng, 33, 2, top_k=2))
    dup = items[0]
    items.append(dup)
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    before = prefix_tokens("batch")
    got = shared.score(items)
    assert prefix_tokens("batch") - before >= 3 * 40 + 2 * 23 + 60 + 33
    ref = unshared.score(items)
    for a, b in zip(got, ref):
        assert_same(a, b)


def test_sharing_matches_the_float64_reference_on_default_settings(shared):
    """Defaults (dtype auto = the checkpoint's float32 on CPU) against a float64 log-softmax."""
    import torch
    rng = np.random.default_rng(2)
    items = group(rng, 50, 4, top_k=5)
    got = shared.score(items)
    assert shared.info.dtype == "float32"
    for it, r in zip(items, got):
        with torch.inference_mode():
            logits = shared.model(input_ids=torch.from_numpy(it.token_ids)[None]).logits[0].double()
        ref_T_V = torch.log_softmax(logits[it.score_from - 1:-1], -1).numpy()
        np.testing.assert_allclose(r.logprobs_T, ref_T_V[np.arange(it.n_scored), it.token_ids[it.score_from:]],
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(r.top_logprobs_T_K, -np.sort(-ref_T_V, 1)[:, :5], atol=1e-4, rtol=0)


def test_cache_across_requests_hit_equals_miss(tiny_model, unshared):
    engine = TorchEngine(tiny_model, device="cpu", max_top_k=20, prefix_cache_mb=16)
    rng = np.random.default_rng(3)
    members = all_fields(rng, 48, 4) + all_fields(rng, 20, 3, lead=4)
    hits0 = metrics.PREFIX_CACHE_LOOKUPS.labels("torch", "hit")._value.get()
    cached0 = prefix_tokens("cache")
    one_by_one = [engine.score([it])[0] for it in members]            # one sequence per request
    assert prefix_tokens("cache") - cached0 >= 3 * 48 + 2 * 20
    assert metrics.PREFIX_CACHE_LOOKUPS.labels("torch", "hit")._value.get() - hits0 >= 5
    again = engine.score(members)                                    # the whole group, cached prompts
    for x, y, z in zip(one_by_one, again, unshared.score(members)):
        assert_same(x, z)
        assert_same(y, z)
    assert 0 < engine.prefix_cache.bytes <= 16 << 20
    assert metrics.PREFIX_CACHE_BYTES.labels("torch")._value.get() == engine.prefix_cache.bytes


def lookups(result: str) -> float:
    return metrics.PREFIX_CACHE_LOOKUPS.labels("torch", result)._value.get()


@pytest.mark.parametrize("lead", [0, 5])
def test_a_cold_and_a_warm_cache_give_identical_numbers(tiny_model, unshared, lead):
    """The same request on an empty cache (every lookup a miss, the prefixes computed) and again
    on the warm cache (every lookup a hit): bit for bit the same numbers on every field where the
    shared prefix is the prompt. With `lead`, the completions share tokens past the prompt: the
    cache keeps the prompt only, so the hit runs those tokens on the cached prompt's KV where the
    cold run computed the whole prefix in one forward: the same numbers up to float rounding."""
    engine = TorchEngine(tiny_model, device="cpu", max_top_k=20, prefix_cache_mb=16)
    rng = np.random.default_rng(9)
    items = all_fields(rng, 48, 4, lead=lead) + all_fields(rng, 30, 1)
    assert len(engine.prefix_cache) == 0
    hits, misses = lookups("hit"), lookups("miss")
    cold = engine.score(items)
    assert (lookups("hit") - hits, lookups("miss") - misses) == (0, 2)
    assert len(engine.prefix_cache) == 2
    hits, misses = lookups("hit"), lookups("miss")
    warm = engine.score(items)
    assert (lookups("hit") - hits, lookups("miss") - misses) == (2, 0)
    for c, w, u in zip(cold, warm, unshared.score(items)):
        assert_same(c, w, tol=0 if lead == 0 else TOL)
        assert_same(c, u)


def entry(n: int, width: int = 4) -> Prefix:
    import torch
    toks = np.arange(n, dtype=np.int64)
    return Prefix(toks, [torch.zeros(1, n, width)], [torch.zeros(1, n, width)], torch.zeros(n, width))


def test_cache_is_lru_bounded_and_checks_tokens(monkeypatch):
    one = entry(10).nbytes
    cache = PrefixCache(3 * one)
    blocks = [entry(10) for _ in range(4)]
    for i, b in enumerate(blocks):
        b.tokens[:] += 1000 * i
    for b in blocks[:3]:
        cache.put(b)
    assert cache.get(blocks[0].tokens) is blocks[0]          # 0 is now the most recent
    cache.put(blocks[3])                                     # evicts 1, the least recent
    assert cache.get(blocks[1].tokens) is None and len(cache) == 3 and cache.bytes == 3 * one
    cache.put(entry(40))                                     # over the budget: not kept, nothing evicted
    assert len(cache) == 3
    # a hash collision never serves another block's activations
    monkeypatch.setattr("opd_services.teacher.engines.prefix.block_key", lambda t: b"same")
    clash = PrefixCache(10 * one)
    clash.put(blocks[0])
    assert clash.get(blocks[2].tokens) is None and clash.get(blocks[0].tokens) is blocks[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_bounded_under_distinct_prompts(cache_dir):
    """1,000 distinct 512-token prompts through a 64 MB cache: RSS grows by at most the budget
    plus the engine's own (its working memory is warmed up first, cache off, on other prompts;
    64 MB is left for the allocator's slack), and stops growing once the cache is full."""
    import torch
    from opd_services.modeling.checkpoints import LlamaShape, build_random_llama
    model = build_random_llama(cache_dir / "tiny-llama-1k", LlamaShape(128, 32, 2, 2, 2, 64, 1024), seed=7)
    engine = TorchEngine(model, device="cpu", prefix_cache_mb=64)
    prompts = np.random.default_rng(4).integers(0, VOCAB, (1200, 520))
    batches = [[ScoreItem(p, 512) for p in prompts[i:i + 10]] for i in range(0, 1200, 10)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: threads only add contention on a shared box
    try:
        cache, engine.prefix_cache = engine.prefix_cache, None
        for b in batches[100:]:
            engine.score(b)
        base = rss_bytes()
        engine.prefix_cache = cache
        for b in batches[:50]:
            engine.score(b)
        half = rss_bytes()
        for b in batches[50:100]:
            engine.score(b)
    finally:
        torch.set_num_threads(threads)
    entry_bytes = cache.bytes // len(cache)
    assert 1000 * entry_bytes > 3 * (64 << 20)                     # unbounded it would hold ~3x the budget
    assert cache.bytes <= 64 << 20 and len(cache) < 1000
    grown, late = rss_bytes() - base, rss_bytes() - half
    assert grown <= (64 << 20) + (64 << 20), f"RSS grew {grown / 2**20:.0f} MB"
    # unbounded, the last 500 prompts would add 500 entries (> 96 MB, by the first assert); bounded,
    # only the allocator's churn remains (17 MB seen once on a loaded CI machine): a third of the
    # unbounded growth tells the two apart without flaking on fragmentation
    assert late <= 500 * entry_bytes // 3, \
        f"RSS grew {late / 2**20:.0f} MB over the last 500 prompts, cache full (unbounded: {500 * entry_bytes / 2**20:.0f} MB)"


def test_both_surfaces_return_unshared_numbers(teacher, unshared):
    """The session teacher (defaults: sharing and the prefix cache on). Over HTTP one sequence
    per request (later members hit the cache), over gRPC the group in one request: both equal
    unshared scoring; /metrics shows the reuse."""
    import httpx
    from opd_client import Sequence, TeacherClient
    rng = np.random.default_rng(5)
    items = group(rng, 44, 4, cands=True) + group(rng, 30, 3, lead=3, cands=True)
    seqs = [Sequence(id=f"m{i}", token_ids=it.token_ids.tolist(), score_from=it.score_from,
                     candidate_ids_T_C=it.candidate_ids_T_C.tolist()) for i, it in enumerate(items)]
    opts = dict(top_k=5, temperature=0.8, entropy=True)
    ref = unshared.score([ScoreItem(it.token_ids, it.score_from, 5, 0.8, True, it.candidate_ids_T_C) for it in items])
    with TeacherClient(teacher.http_url) as h, TeacherClient(teacher.grpc_url) as g:
        by_one = [h.score([s], **opts).results[0] for s in seqs]
        together = g.score(seqs, **opts).results
    for x, y, z in zip(by_one, together, ref):
        for got in (x, y):
            np.testing.assert_allclose(got.logprobs_T, z.logprobs_T, atol=TOL, rtol=0)
            np.testing.assert_array_equal(got.top_ids_T_K, z.top_ids_T_K)
            np.testing.assert_allclose(got.top_logprobs_T_K, z.top_logprobs_T_K, atol=TOL, rtol=0)
            np.testing.assert_allclose(got.candidate_logprobs_T_C, z.candidate_logprobs_T_C, atol=TOL, rtol=0)
            np.testing.assert_allclose(got.entropy_T, z.entropy_T, atol=TOL, rtol=0)
    text = httpx.get(f"{teacher.http_url}/metrics").text
    assert 'opd_prefix_tokens_total{engine="torch",source="cache"}' in text
    assert 'opd_prefix_cache_lookups_total{engine="torch",result="hit"}' in text
    assert 'opd_prefix_cache_bytes{engine="torch"}' in text


def test_auto_dtype_means_the_same_everywhere(tmp_path):
    import json
    from opd_services.teacher.engines.base import auto_dtype
    for declared, cpu, cuda in [("float32", "float32", "bfloat16"), ("bfloat16", "bfloat16", "bfloat16"),
                                ("float16", "float16", "float16"), (None, "float32", "bfloat16")]:
        (tmp_path / "config.json").write_text(json.dumps({} if declared is None else {"dtype": declared}))
        assert (auto_dtype(tmp_path, cuda=False), auto_dtype(tmp_path, cuda=True)) == (cpu, cuda), declared
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))     # older transformers
    assert auto_dtype(tmp_path, cuda=False) == "bfloat16"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_prefix_attention_formula_matches_the_cpu_kernel(causal, kv_heads):
    """`_attention`'s plain formula (used off CPU, where torch's flash kernel does not return the
    log-sum-exp) against the CPU kernel, and both against attention over KV repeated per query
    head (GQA as transformers' repeat_kv): the merge of prefix and own attention depends on both."""
    import torch
    from opd_services.teacher.engines import prefix
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 9, 8, generator=g)
    k, v = (torch.randn(3, kv_heads, 9, 8, generator=g) for _ in range(2))
    kernel = prefix._attention(q, k, v, causal, 0.3)
    formula = prefix._attention_formula(q, k, v, causal, 0.3)
    rep = 4 // kv_heads
    repeated = prefix._attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal, 0.3)
    for a, b, c in zip(kernel, formula, repeated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_gqa_prefix_kv_is_never_repeated_per_head(shared, unshared, monkeypatch):
    """TINY is GQA (4 query heads on 2 KV heads): shared scoring reads each KV head as it is
    (no repeat_interleave of the prefix's or the rows' KV in any layer) and equals unshared."""
    import torch
    assert shared.model.config.num_key_value_heads < shared.model.config.num_attention_heads
    items = all_fields(np.random.default_rng(7), 40, 3)
    ref = unshared.score(items)

    def no_repeat(*a, **kw):
        raise AssertionError("KV repeated per query head")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    monkeypatch.setattr(torch, "repeat_interleave", no_repeat)
    before = prefix_tokens("batch")
    got = shared.score(items)
    assert prefix_tokens("batch") - before >= 2 * 40
    for a, b in zip(got, ref):
        assert_same(a, b)


def test_gqa_sharing_on_the_formula_path_equals_unshared(shared, unshared, monkeypatch):
    """The off-CPU attention (the plain formula, GQA by grouping queries) run here in the engine:
    shared scoring of a GQA model still equals unshared on every field."""
    from opd_services.teacher.engines import prefix
    monkeypatch.setattr(prefix, "_attention", prefix._attention_formula)
    rng = np.random.default_rng(8)
    items = all_fields(rng, 40, 4) + all_fields(rng, 17, 3, lead=6) + group(rng, 33, 2, top_k=2)
    for a, b in zip(shared.score(items), unshared.score(items)):
        assert_same(a, b)


def test_sharing_is_off_where_attention_is_not_plain_causal(tmp_path, unshared):
    """A sliding-window model (Mistral) cannot take the prefix merge: the engine turns sharing
    off and scores as before."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=256, sliding_window=16))
    model.save_pretrained(tmp_path)
    engine = TorchEngine(tmp_path, device="cpu", max_top_k=20, prefix_cache_mb=4)
    assert not engine.share_prefixes and engine.prefix_cache is None
    items = group(np.random.default_rng(6), 40, 3, top_k=3)
    ref = []
    with torch.inference_mode():
        for it in items:
            logits = engine.model(input_ids=torch.from_numpy(it.token_ids)[None]).logits[0]
            ref.append(torch.log_softmax(logits[it.score_from - 1:-1], -1)[np.arange(it.n_scored), it.token_ids[it.score_from:]])
    for r, want in zip(engine.score(items), ref):
        np.testing.assert_allclose(r.logprobs_T, want.numpy(), atol=TOL, rtol=0)

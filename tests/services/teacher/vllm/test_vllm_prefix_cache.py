"""The vLLM engine with prefix caching read (OPD_VLLM_PREFIX_CACHE): the same numbers as without,
whether vLLM's hit stops before the scored rows (used) or reaches into them (scored again).
Uses the session's vLLM engine, switching its flag for the test."""
from __future__ import annotations

import numpy as np
import pytest

from opd_services import metrics
from opd_services.teacher.engines.base import ScoreItem

pytestmark = pytest.mark.vllm


@pytest.fixture
def engine(vllm_teacher):
    engine = vllm_teacher.server.service.engine
    if not engine.llm.vllm_config.cache_config.enable_prefix_caching:
        pytest.skip("this vLLM build runs without prefix caching")
    yield engine
    engine.prefix_cache = False


def counter(result: str) -> float:
    return metrics.PREFIX_CACHE_LOOKUPS.labels("vllm", result)._value.get()


def test_reading_the_prefix_cache_returns_the_same_numbers(engine):
    block = engine.llm.vllm_config.cache_config.block_size
    rng = np.random.default_rng(21)
    items = []
    for prompt_len, k in ((block + 9, 5), (block, 0), (block + 3, 0)):   # the 2nd: the hit reaches row s-1
        prompt = rng.integers(0, 128, prompt_len)
        items += [ScoreItem(np.concatenate([prompt, rng.integers(0, 128, 10)]), prompt_len, top_k=k) for _ in range(3)]
    plain = engine.score(items)
    engine.prefix_cache = True
    hits0 = counter("hit")
    engine.score(items)                       # fills vLLM's cache with these prompts
    cached = engine.score(items)              # reads it
    assert counter("hit") - hits0 >= 4
    for a, b in zip(plain, cached):
        np.testing.assert_allclose(b.logprobs_T, a.logprobs_T, atol=1e-5, rtol=0)
        if a.top_ids_T_K is not None:
            np.testing.assert_array_equal(b.top_ids_T_K, a.top_ids_T_K)
            np.testing.assert_allclose(b.top_logprobs_T_K, a.top_logprobs_T_K, atol=1e-5, rtol=0)

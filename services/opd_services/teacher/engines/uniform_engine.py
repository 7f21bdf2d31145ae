"""Uniform engine: a real engine whose teacher puts equal mass on every token.

Its answers are exact (log 1/V everywhere, entropy log V) and cost next to nothing, so the
service and the queue can be measured and tested without model compute. It is selected
with OPD_ENGINE=uniform and never passes for a real teacher: its identity says "uniform".
"""
from __future__ import annotations

import math

import numpy as np

from opd_client.types import ModelInfo
from opd_services.teacher.engines.base import GenerateItem, ItemScores, Sampled, ScoreItem


class UniformEngine:
    def __init__(self, vocab_size: int = 32_000, max_model_len: int = 4096, max_top_k: int = 20):
        self.vocab_size = vocab_size
        self.info = ModelInfo(name=f"uniform-{vocab_size}", engine="uniform", engine_version="1",
                              dtype="float32", revision=f"uniform:{vocab_size}", vocab_size=vocab_size,
                              max_model_len=max_model_len, max_top_k=max_top_k)

    def score(self, items: list[ScoreItem]) -> list[ItemScores]:
        lp = np.float32(-math.log(self.vocab_size))
        out = []
        for it in items:
            t, k = it.n_scored, it.top_k
            c = it.candidate_ids_T_C
            out.append(ItemScores(
                logprobs_T=np.full(t, lp, dtype=np.float32),
                top_ids_T_K=np.broadcast_to(np.arange(k, dtype=np.int64), (t, k)) if k else None,
                top_logprobs_T_K=np.full((t, k), lp, dtype=np.float32) if k else None,
                candidate_logprobs_T_C=None if c is None else np.full(c.shape, lp, dtype=np.float32),
                entropy_T=np.full(t, -lp, dtype=np.float32) if it.entropy else None,
                rank_T=np.ones(t, dtype=np.int64) if it.rank else None))
        return out

    def generate(self, item: GenerateItem) -> list[Sampled]:
        """Uniform samples (greedy = id 0); every logprob is log 1/V, like its scores."""
        p = item.params
        rng = np.random.default_rng(p.seed)
        lp = np.float32(-math.log(self.vocab_size))
        stops = np.asarray(sorted(set(p.stop_ids)), dtype=np.int64)
        out = []
        for _ in item.prompts:
            ids = (np.zeros(p.max_tokens, dtype=np.int64) if p.temperature == 0
                   else rng.integers(0, self.vocab_size, size=p.max_tokens))
            hits = np.flatnonzero(np.isin(ids, stops))
            n = int(hits[0]) + 1 if hits.size else p.max_tokens
            out.append(Sampled(ids[:n], np.full(n, lp, dtype=np.float32), "stop" if hits.size else "length"))
        return out

    def close(self) -> None:
        pass

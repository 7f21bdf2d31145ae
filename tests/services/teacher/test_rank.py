"""The torch engine's `rank` output: 1 + the number of vocabulary logits strictly above the
actual token's, with and without a top-k to shortcut it (ties included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_services.teacher.engines.base import ScoreItem
from opd_services.teacher.engines import torch_engine
from opd_services.teacher.engines.torch_engine import TorchEngine, _rank


@pytest.mark.parametrize("block", [1 << 19, 3 * 128])       # one block; blocks of 3 rows, the last one short
@pytest.mark.parametrize("k", [0, 1, 3, 20])
def test_rank_against_a_full_count(k, block, monkeypatch):
    monkeypatch.setattr(torch_engine, "COUNT_BLOCK", block)
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(400, 128, generator=g)
    logits[:60, :6] = 1.5                                      # ties at the top
    target = logits.gather(1, torch.randint(0, 128, (400, 1), generator=g))[:, 0]
    target[:20] = 1.5                                          # the actual token tied with others
    target[20:30] = logits[20:30].max(-1).values               # the argmax
    full = (logits > target[:, None]).sum(-1) + 1
    vals = logits.topk(k, dim=-1).values if k else None
    assert torch.equal(_rank(logits, target, vals), full)


def test_engine_returns_ranks_only_when_asked(tiny_model):
    engine = TorchEngine(tiny_model, device="cpu", dtype="float32", max_top_k=20)
    ids = np.arange(3, 40) % 128
    plain, ranked = engine.score([ScoreItem(ids, 1, top_k=5), ScoreItem(ids, 1, top_k=5, rank=True)])
    assert plain.rank_T is None
    # rank 1 exactly where the actual token is the top-1, and never below 1
    assert (ranked.rank_T >= 1).all()
    assert ((ranked.rank_T == 1) == (ranked.top_ids_T_K[:, 0] == ids[1:])).all()

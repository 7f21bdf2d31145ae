"""What the queue carries is the teacher's real answer, position by position: rollouts of mixed
lengths, score_from and top_k, scored through producer -> scorer -> consumer by the tiny torch
teacher, equal the same teacher's direct scores. (The other queue tests use the uniform engine,
whose answer is -log V everywhere, so a misaligned, shifted or reordered result would pass there.)"""
from __future__ import annotations

import numpy as np

from opd_client import Sequence, TeacherClient
from opd_client.queue import RolloutProducer
from opd_client.types import Rollout
from queue_helpers import drain_scored, running_scorer


def mixed_rollouts(n: int, vocab: int = 128) -> list[Rollout]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 60))
        s = int(rng.integers(1, length - 1))
        out.append(Rollout(id=f"c{i}", token_ids=rng.integers(0, vocab, length), score_from=s,
                           behaviour_logprobs=np.full(length - s, -1.0), policy_version=1,
                           top_k=int(rng.choice([0, 5]))))
    return out


def test_scores_through_the_queue_equal_direct_scores_position_by_position(redis_url, exp, teacher):
    rollouts = mixed_rollouts(60)
    with RolloutProducer(redis_url, exp) as q, running_scorer(redis_url, teacher.grpc_url, scorer_batch_size=16):
        q.push(rollouts)
        got = {s.rollout.id: s for s in drain_scored(redis_url, exp, len(rollouts), timeout_s=60)}
    assert sorted(got) == sorted(r.id for r in rollouts)
    with TeacherClient(teacher.grpc_url) as c:
        for r in rollouts:
            direct = c.score([Sequence(r.token_ids, r.score_from, r.id)], top_k=r.top_k).results[0]
            s = got[r.id]
            assert np.array_equal(s.rollout.token_ids, r.token_ids) and s.rollout.score_from == r.score_from
            assert s.teacher_logprobs.shape == (len(r.token_ids) - r.score_from,)
            np.testing.assert_allclose(s.teacher_logprobs, direct.logprobs_T, atol=1e-5, rtol=0, err_msg=r.id)
            if r.top_k:
                np.testing.assert_array_equal(s.top_ids, direct.top_ids_T_K, err_msg=r.id)
                np.testing.assert_allclose(s.top_logprobs, direct.top_logprobs_T_K, atol=1e-5, rtol=0, err_msg=r.id)
            else:
                assert s.top_ids is None and s.top_logprobs is None
    # a real teacher: the logprobs differ from position to position (not the uniform -log V)
    assert np.std(np.concatenate([s.teacher_logprobs for s in got.values()])) > 0.1
